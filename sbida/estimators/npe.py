r"""Neural posterior estimation (NPE): a normalizing flow over the state conditioned on the encoded window.

With the window encoded into a context map ``h`` on the state grid and a vector ``c``, the standardized state
``x~ = (x - mu_x) / sigma_x`` is modelled as

.. math:: \tilde x = m(h) + s(h) \odot f_c^{-1}(z), \qquad z \sim \mathcal{N}(0, I),

where ``m, s`` are a periodic convolution of the context map (a per-cell location and scale, which scales to large
grids) and ``f`` a normalizing flow for the correlations between cells. The default flow, ``"grid"``
(:class:`sbida.nn.GridFlow`), is a multiscale stack of affine couplings on the grid whose conditioners are local
networks of the state's neighbours and of the context map ``h`` (the window's share computed once per window): it sees
the mask-dependent local structure of the posterior directly, its coarse levels carry the long-range correlations, and
one sampling pass costs a few small matrix products. The others are zuko
flows conditioned on the vector ``c``. The density is exact:

.. math:: \log q(x \mid y, t) = \log p_{f_c}\big((\tilde x - m) / s\big) - \textstyle\sum_i \log s_i
          - \sum_i \log \sigma_{x,i},

and training minimises ``-E[log q(x | y, t)]`` over simulated windows (Papamakarios & Murray, 2016; Greenberg et
al., 2019). Flows: ``"grid"`` (the default, above), and zuko's MLP flows on the context vector: ``"realnvp"``
(affine coupling, one network pass each way), ``"maf"`` (affine autoregressive with ``passes`` passes), ``"nsf"``
(spline, ``passes`` passes).

Inflation. A flow trained by maximum likelihood can come out slightly too narrow on held-out windows, and a joint
coverage target in many dimensions is strict: at ``D = 40`` a uniform 2.5 % deficit of the spread gives a joint
expected calibration error of about 0.065 (:func:`sbida.diagnostics.scaled_gaussian_coverage`). The posterior can
be widened by a factor ``s`` (the ``inflation`` hyperparameter, 1 by default) around the image ``c = f_c^{-1}(0)``
of the base distribution's centre,

.. math:: \tilde x = m + s_h \odot \big(c + s\,(u - c)\big), \qquad u = f_c^{-1}(z),

an affine map of the flow's output, so the density stays exact
(:math:`\log q_s = \log p_{f_c}(u) - D \log s - \ldots`). :meth:`NPE.fit_inflation` chooses ``s`` on held-out windows
(by the coverage of their true states, or by their likelihood), like the multiplicative inflation of ensemble
filters; ``inflation_fit`` does it at the end of :meth:`~sbida.estimators.base.Estimator.fit`. It corrects a spread
error common to all windows (``s_h`` is the head's scale ``s(h)`` above). On ``lorenz96`` K=40 NPE's error depends on
the scale (too narrow at middle wavenumbers, too wide at the grid scale:
:func:`sbida.diagnostics.spread_skill_spectrum`; a coverage curve flatter than the diagonal) and no common factor
lowers its joint ECE (``benchmarks/RESULTS.md``), so it is off by default.

Tails. What a common factor cannot correct, a heavier-tailed base can: a flow that cannot tell the hard windows from
the easy ones puts the truth too far out in some windows and too close in others, so the truths' credibilities pile
up at both ends (a coverage curve flatter than the diagonal). With ``tails = nu`` the flow's base is the isotropic
multivariate Student-t :class:`sbida.nn.IsotropicStudentT` of ``nu > 2`` degrees of freedom scaled to the identity
covariance (scale :math:`\sqrt{(\nu - 2) / \nu}`) instead of :math:`\mathcal N(0, I)`: a Gaussian scale mixture, one
random scale per draw shared by all cells, which widens or narrows the posterior of a window as a whole by a random
factor. It changes the shape of the tails, not the spread (the base's covariance stays ``I``; a common factor on the
spread is the inflation's). The density stays exact. :meth:`NPE.fit_tails` fits ``nu`` by the likelihood of held-out
truths with the network fixed (one number; the truths' images ``z = f(u)`` in the base space are computed once);
``tails_fit`` (on by default) does it at the end of :meth:`~sbida.estimators.base.Estimator.fit` on the validation
windows. On ``lorenz96`` K=40 it takes NPE's joint ECE from 0.081 to 0.021 after 10 minutes of training
(``benchmarks/RESULTS.md``, section ``inflation.py``).

Base scales. A flow can also be wrong by different factors in different directions of its base space: trained long on
``lorenz96-sparse``, the grid flow puts held-out truths up to 1.7 times too far out in its coarsest latent dimensions
(the large scales) and about 1.05 times in the others, a spread error that the tails do not model and that a common
factor corrects only on average. The buffer
``base_scale`` ``(D,)`` (ones by default) scales the base per dimension, :math:`z = \mathrm{diag}(b)\, z_0` with
:math:`z_0` from the base, an exact linear map in the base space (:math:`\log q` loses :math:`\sum_d \log b_d`).
:meth:`NPE.fit_scale` sets :math:`b_d` from the root mean square of the held-out truths' images in the base space
(whose covariance is ``I`` under the model, Gaussian or Student-t base alike), but only where the evidence says so:
a dimension gets its own scale where its deviation from 1 is significant for all ``D`` together, the others share
one pooled scale where that one is significant, with standard errors by trajectory (the windows of a trajectory are
correlated), so a flow that is right is left as it is. ``scale_fit`` (on by default) does it at the end of
:meth:`~sbida.estimators.base.Estimator.fit` on the validation windows, before the tails are fitted. On
``lorenz96-sparse`` it takes the 10 000-step NPE's joint ECE from 0.231 to 0.017, and to 0.010 with the tails
fitted after it (10 of 40 dimensions scaled by 1.1-1.7, the others by 1.03; a common inflation fitted by coverage
gives 0.020, with a marginal ECE of 0.014 against 0.008); on the linear-Gaussian task it changes no scale
(``benchmarks/RESULTS.md``).

Spread per wavenumber. The base scales correct the spread along the flow's latent dimensions, which are not the state's
scales; the spread/skill spectrum (:func:`sbida.diagnostics.spread_skill_spectrum`) measures it per wavenumber of the
state's grid, and on ``lorenz96`` K=40 a trained NPE is too narrow at some wavenumbers and too wide at others. The
buffer ``spectrum_scale`` ``(k,)`` (ones by default) is one factor :math:`g_k` per wavenumber bin on the standardized
state's departure from the image :math:`\tilde x_c` of the flow's centre, :math:`\tilde x \mapsto \tilde x_c + \mathcal
F^{-1}(g_{|k|} \mathcal F(\tilde x - \tilde x_c))` (:class:`SpectralScale`: linear, exact density), after the head.
:meth:`NPE.fit_spectrum` sets the factors from the ratio of the truths' error power to the draws' spread power per
wavenumber on held-out windows, with the significance test of the base scales; ``spectrum_fit`` does it at the end of
:meth:`~sbida.estimators.base.Estimator.fit`, after the base scales and before the tails (whose ``nu`` is fitted for the
corrected spread). It is off by default: on ``lorenz96`` K=40 after 10 minutes of training it takes the spread/skill
from 0.906 to 0.998 and the joint ECE by distance from 0.068 to 0.055 (with the tails refitted), but the joint
highest-density ECE from 0.023 to 0.066 and the held-out NLL up by 0.94 nats per window: matching the mean error power,
which the hard windows dominate, widens the typical window (``benchmarks/RESULTS.md``).

Shape of the spread. A flow can also be too narrow in the wide directions of each window's posterior and too wide in
its narrow ones, which the two joint statistics show as errors of opposite sign (the highest-density coverage above
the diagonal, the distance coverage below it). With ``power`` :math:`\gamma \ne 1` the standardized state's
departure from the image :math:`\tilde x_c` of the flow's centre is mapped by :class:`EigenPower`,
:math:`\tilde x \mapsto \tilde x_c + V \operatorname{diag}\big((\lambda / \bar\lambda)^{(\gamma - 1)/2}\big)
V^\top (\tilde x - \tilde x_c)`, with :math:`V \operatorname{diag}(\lambda) V^\top = J J^\top` the window's local
covariance (:math:`J` the Jacobian of the map from the base to the standardized state at the base's centre) and
:math:`\bar\lambda` the geometric mean of its eigenvalues: the eigenvalues become :math:`\lambda^\gamma
\bar\lambda^{1 - \gamma}`, the volume and so the density's normalization are kept (linear, exact density; the
Jacobian costs one backward pass over ``D`` copies of the batch). :meth:`NPE.fit_power` picks
:math:`\gamma` on held-out windows by the sum of both joint ECEs, and keeps 1 unless that sum drops by more than its
noise (:func:`sbida.diagnostics.coverage_noise`); ``power_fit`` does it at the end of
:meth:`~sbida.estimators.base.Estimator.fit`, after the tails. It is off by default: on ``lorenz96`` K=40 it lowered
both joint ECEs of two networks to about 0.015 (spread/skill 0.99, energy score a little lower) at :math:`\gamma`
= 1.05, but raised their held-out NLL by 0.6-0.8 nats per window; at the configuration file's full budget (50
epochs) the fit keeps 1, and NPE without it has joint ECEs of 0.026 and 0.031 (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
import zuko
from torch import Tensor
from torch.distributions import AffineTransform, Distribution, Transform, TransformedDistribution, constraints
from zuko.distributions import NormalizingFlow
from zuko.transforms import ComposedTransform

from ..data import WindowDataset
from ..diagnostics.coverage import coverage_curve, coverage_noise, default_levels, distance_credibility
from ..diagnostics.scores import spectral_powers, wavenumber_bins
from ..nn import GridFlow, IsotropicStudentT, WindowEncoder, periodic_conv, with_student_t_base
from ..posterior import DistributionPosterior, PointPosterior, _seed_from, fit_student_t
from .base import Batch, Estimator

__all__ = ["NPE"]

_SOFTPLUS_ONE = math.log(math.e - 1)  # softplus(_SOFTPLUS_ONE) == 1


def _gated_log_ratios(v: Tensor, w: Tensor, cluster: Tensor, name: str, kept: str) -> tuple[Tensor, Tensor]:
    r"""The logs of the ratios :math:`\bar v_j / \bar w_j` of column means of ``v, w`` ``(n, k)`` (e.g. squared errors
    and their expected values under the model, which agree for a calibrated model), kept only where they differ from
    0 beyond chance; ``(k,)`` log ratios (0 where kept) and ``(k,)`` bool: the columns with their own.

    The rows are correlated within the groups ``cluster`` ``(n,)`` (the windows of a trajectory), so standard errors
    are by group (cluster-robust, delta method). A column gets its own ratio where its log is further from 0 than all
    ``k`` would be by chance with probability 1 % (Bonferroni: the :math:`1 - 0.005 / k` quantile of Student's t with
    ``G - 1`` degrees of freedom, ``G`` groups, times the standard error); the other columns share their pooled
    ratio where its log is further from 0 than the 0.995 quantile times its error. Rows of one group give no error:
    a warning (``name``, ``kept``), and all logs are 0."""
    n, k = v.shape
    G = int(cluster.max()) + 1
    log_ratio, own = v.new_zeros(k), torch.zeros(k, dtype=torch.bool)
    if G < 2:
        warnings.warn(f"the windows of {name} come from one trajectory: {kept}", stacklevel=3)
        return log_ratio, own

    def log_and_se(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        ma, mb = a.mean(0), b.mean(0)
        dev = a.new_zeros(G, a.shape[1]).index_add_(0, cluster, a / ma - b / mb)
        return (ma / mb).log(), (dev.square().sum(0) * G / (G - 1)).sqrt() / n

    from scipy.stats import t as student_t  # imported here: scipy is slow to import

    bound, bound_pooled = (float(student_t.ppf(q, G - 1)) for q in (1 - 0.005 / k, 0.995))
    ell, se = log_and_se(v, w)
    own = ell.abs() > bound * se
    log_ratio[own] = ell[own]
    if not bool(own.all()):
        pooled, se_pooled = log_and_se(v[:, ~own].sum(1, keepdim=True), w[:, ~own].sum(1, keepdim=True))
        if float(pooled.abs()) > bound_pooled * float(se_pooled):
            log_ratio[~own] = pooled
    return log_ratio, own


class SpectralScale(Transform):
    r"""A spread map per wavenumber about a centre: :math:`x \mapsto c + \mathcal F^{-1}\big(g_{|k|}\,
    \mathcal F(x - c)\big)` for flat states ``x`` ``(..., D)`` on a periodic grid, ``g`` one factor per wavenumber
    bin (:func:`sbida.diagnostics.scores.wavenumber_bins`; the channels of ``(C, H, W)`` states share them).

    The map is linear about ``c``, symmetric and circulant: the covariance of ``x`` is multiplied by :math:`g^2` at each
    wavenumber, and its log-determinant is the sum of :math:`\log g` over the points of the full Fourier grid (times
    the channels), one number for all ``x``.

    Args:
        centre: ``(..., D)`` the fixed point ``c`` (e.g. per window).
        gains: ``(k,)`` positive factors ``g``, one per wavenumber bin.
        state_shape: ``(K,)`` or ``(C, H, W)``, with ``prod(state_shape) == D``.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, centre: Tensor, gains: Tensor, state_shape: tuple[int, ...], cache_size: int = 0):
        super().__init__(cache_size=cache_size)
        self.centre, self.state_shape = centre, tuple(state_shape)
        self.dims = (-1,) if len(self.state_shape) == 1 else (-2, -1)
        grid = self.state_shape[-len(self.dims):]
        bins = wavenumber_bins(grid).to(gains.device)
        if gains.dim() != 1 or len(gains) != int(bins.max()) + 1 or not bool((gains > 0).all()):
            raise ValueError(f"gains must be {int(bins.max()) + 1} factors > 0 for a grid {grid}, got "
                             f"{tuple(gains.shape)}")
        g = gains.to(centre.dtype)
        self.gain = g[bins[..., : grid[-1] // 2 + 1]]  # on the half grid of rfftn (g is even in k)
        channels = 1 if len(self.state_shape) == 1 else self.state_shape[0]
        self.log_det = channels * g.log()[bins].sum()

    def _apply(self, x: Tensor, gain: Tensor) -> Tensor:
        d = (x - self.centre).reshape(*x.shape[:-1], *self.state_shape)
        grid = self.state_shape[-len(self.dims):]
        d = torch.fft.irfftn(torch.fft.rfftn(d, dim=self.dims) * gain, s=grid, dim=self.dims)
        return self.centre + d.reshape(x.shape)

    def _call(self, x: Tensor) -> Tensor:
        return self._apply(x, self.gain)

    def _inverse(self, y: Tensor) -> Tensor:
        return self._apply(y, 1 / self.gain)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.log_det.expand(x.shape[:-1])


class EigenPower(Transform):
    r"""A power on the eigenvalues of a covariance about a centre, keeping the volume: :math:`x \mapsto c + V
    \operatorname{diag}(f) V^\top (x - c)` for flat states ``x`` ``(..., B, D)``, with
    :math:`f_j = (\lambda_j / \bar\lambda)^{(\gamma - 1) / 2}` and :math:`\bar\lambda` the geometric mean of the
    :math:`\lambda_j` of each window.

    A covariance :math:`V \operatorname{diag}(\lambda) V^\top` becomes :math:`V \operatorname{diag}(\lambda^\gamma
    \bar\lambda^{1 - \gamma}) V^\top`: :math:`\gamma > 1` widens the directions wider than :math:`\bar\lambda`
    and narrows the others. :math:`\prod_j f_j = 1`, so the log-determinant is 0; the inverse is the map at
    :math:`2 - \gamma`.

    Args:
        centre: ``(B, D)`` the fixed point ``c`` of each window.
        eigenvalues: ``(B, D)`` positive :math:`\lambda`; eigenvectors: ``(B, D, D)`` orthonormal columns ``V``.
        power: :math:`\gamma > 0`.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, centre: Tensor, eigenvalues: Tensor, eigenvectors: Tensor, power: float, cache_size: int = 0):
        super().__init__(cache_size=cache_size)
        if not (power > 0 and math.isfinite(power)):
            raise ValueError(f"power must be a finite number > 0, got {power}")
        if eigenvalues.shape != centre.shape or eigenvectors.shape != (*centre.shape, centre.shape[-1]):
            raise ValueError(f"need centre (B, D), eigenvalues (B, D) and eigenvectors (B, D, D), got "
                             f"{tuple(centre.shape)}, {tuple(eigenvalues.shape)} and {tuple(eigenvectors.shape)}")
        log_lam = eigenvalues.double().clamp_min(1e-300).log()
        log_f = 0.5 * (power - 1) * (log_lam - log_lam.mean(-1, keepdim=True))
        self.centre, self.vectors = centre, eigenvectors.to(centre.dtype)
        self.factor, self.inverse_factor = log_f.exp().to(centre.dtype), (-log_f).exp().to(centre.dtype)

    def _apply(self, x: Tensor, f: Tensor) -> Tensor:
        V = self.vectors
        d = torch.einsum("bij,...bi->...bj", V, x - self.centre) * f  # V^T (x - c), scaled
        return self.centre + torch.einsum("bij,...bj->...bi", V, d)

    def _call(self, x: Tensor) -> Tensor:
        return self._apply(x, self.factor)

    def _inverse(self, y: Tensor) -> Tensor:
        return self._apply(y, self.inverse_factor)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return x.new_zeros(x.shape[:-1])


class NPE(Estimator):
    """Neural posterior estimation with a window encoder and a conditional zuko flow.

    Hyperparameters (``NPE.defaults``): encoder ``channels``, ``depth``, ``kernel_size``, ``features`` (context
    vector; unused by the ``"grid"`` flow), ``emb_features``, ``aggregate``; flow ``flow`` (``"grid"``,
    ``"realnvp"``, ``"maf"``, ``"nsf"``), ``transforms`` (couplings per level for ``"grid"``: one number, or one per
    level from the finest with the last repeated, by default 3 at the finest level and 2 at the others, which on
    ``lorenz96`` K=40 lowered the validation NLL by 6 nats per window for 3 % more time per training step; one
    number, the couplings in all, for the MLP flows), ``levels`` (multiscale levels of
    the grid flow, ``None``: all), ``hidden`` (channels of the grid conditioners, or widths of
    the MLPs), ``flow_kernel`` (kernel of the grid conditioners), ``passes`` (for ``maf``/``nsf``); ``local`` (the
    convolutional location-scale head); ``sample_rows`` (rows of one sampling pass, bounds memory; the grid flow
    also keeps one activation of its conditioners under 2^22 values, which measured fastest); ``inflation`` (the
    factor ``s`` on the posterior's spread, see the module docstring; :meth:`fit_inflation` fits it),
    ``inflation_fit`` (``None``, ``"coverage"`` or ``"nll"``: the criterion of a :meth:`fit_inflation` on the
    validation windows at the end of :meth:`fit`, over ``inflation_windows`` of them with ``inflation_samples``
    draws each); ``tails`` (``None``: a Gaussian base; a number ``nu > 2``: the Student-t base of ``nu`` degrees of
    freedom and unit covariance, see the module docstring), ``tails_fit`` (run :meth:`fit_tails` on
    ``tails_windows`` validation windows at the end of :meth:`fit`); ``scale_fit`` (run :meth:`fit_scale`, the
    per-dimension scales of the base, on ``scale_windows`` validation windows at the end of :meth:`fit`, before the
    tails); ``spectrum_fit`` (run :meth:`fit_spectrum`, the spread per wavenumber of the state's grid, on
    ``spectrum_windows`` validation windows with ``spectrum_samples`` draws each at the end of :meth:`fit`, after the
    scales and before the tails); ``power`` (gamma, a power on the eigenvalues of each window's local
    covariance that keeps its volume, see the module docstring; 1: none) and ``power_fit`` (run :meth:`fit_power` on
    ``power_windows`` validation windows with ``power_samples`` draws each at the end of :meth:`fit`, after the
    tails; off by default). The sampling settings (``sampler_hparams``) can change between an interrupted fit
    and its resumption.
    """

    defaults: dict[str, Any] = {
        "channels": 32, "depth": 3, "kernel_size": 5, "features": 128, "emb_features": 32, "aggregate": "concat",
        "flow": "grid", "transforms": [3, 2], "levels": None, "hidden": [32], "flow_kernel": 5, "passes": 2,
        "local": True, "sample_rows": 262144, "inflation": 1.0, "inflation_fit": None, "inflation_windows": 1024,
        "inflation_samples": 256, "tails": None, "tails_fit": True, "tails_windows": 4096, "scale_fit": True,
        "scale_windows": 4096, "spectrum_fit": False, "spectrum_windows": 1024, "spectrum_samples": 64,
        "power": 1.0, "power_fit": False, "power_windows": 1024, "power_samples": 256,
    }
    # settings of the posterior, not of the network or its training (an interrupted fit resumes with new ones)
    sampler_hparams = frozenset({"sample_rows", "inflation", "inflation_fit", "inflation_windows",
                                 "inflation_samples", "tails", "tails_fit", "tails_windows", "scale_fit",
                                 "scale_windows", "spectrum_fit", "spectrum_windows", "spectrum_samples", "power",
                                 "power_fit", "power_windows", "power_samples"})

    def build(self) -> None:
        h = self.hparams
        if h["flow"] not in ("grid", "realnvp", "maf", "nsf"):
            raise ValueError(f"flow must be 'grid', 'realnvp', 'maf' or 'nsf', got {h['flow']!r}")
        if not (float(h["inflation"]) > 0 and math.isfinite(float(h["inflation"]))):
            raise ValueError(f"inflation must be a finite factor > 0, got {h['inflation']}")
        if h["inflation_fit"] not in (None, "coverage", "nll"):
            raise ValueError(f"inflation_fit must be null, 'coverage' or 'nll', got {h['inflation_fit']!r}")
        if int(h["inflation_windows"]) < 1 or int(h["inflation_samples"]) < 2:
            raise ValueError(f"inflation_windows must be >= 1 and inflation_samples >= 2, got "
                             f"{h['inflation_windows']} and {h['inflation_samples']}")
        self._check_tails("tails")
        if not isinstance(h["scale_fit"], bool) or int(h["scale_windows"]) < 2:
            raise ValueError(f"scale_fit must be true or false and scale_windows >= 2, got {h['scale_fit']!r} and "
                             f"{h['scale_windows']}")
        if not isinstance(h["spectrum_fit"], bool) or int(h["spectrum_windows"]) < 2 or int(h["spectrum_samples"]) < 2:
            raise ValueError(f"spectrum_fit must be true or false, spectrum_windows and spectrum_samples >= 2, got "
                             f"{h['spectrum_fit']!r}, {h['spectrum_windows']} and {h['spectrum_samples']}")
        if not (float(h["power"]) > 0 and math.isfinite(float(h["power"]))):
            raise ValueError(f"power must be a finite number > 0, got {h['power']}")
        if not isinstance(h["power_fit"], bool) or int(h["power_windows"]) < 2 or int(h["power_samples"]) < 2:
            raise ValueError(f"power_fit must be true or false, power_windows and power_samples >= 2, got "
                             f"{h['power_fit']!r}, {h['power_windows']} and {h['power_samples']}")
        self.power_record: dict[str, Any] | None = None
        self.inflation_record: dict[str, Any] | None = None
        self.tails_record: dict[str, Any] | None = None
        self.scale_record: dict[str, Any] | None = None
        self.spectrum_record: dict[str, Any] | None = None
        D = self.event_size
        self.register_buffer("base_scale", torch.ones(D))  # per dimension of the base space, set by fit_scale
        # per wavenumber of the state's periodic grid, set by fit_spectrum
        self.register_buffer("spectrum_scale", torch.ones(self._wavenumbers(), dtype=torch.float64))
        self._spectrum_key: tuple[int, int] | None = None  # the buffer (id, version) of the cached _spectrum_on
        self._spectrum_identity = True
        grid = h["flow"] == "grid"
        self.encoder = WindowEncoder(self.state_shape, self.obs_shape, self.lags, self.lift, channels=h["channels"],
                                     depth=h["depth"], kernel_size=h["kernel_size"],
                                     features=0 if grid else h["features"],
                                     emb_features=h["emb_features"], aggregate=h["aggregate"])
        sc = self.encoder.state_channels
        self.local_head = periodic_conv(self.encoder.dim, h["channels"], 2 * sc, 3) if h["local"] else None
        if self.local_head is not None:
            torch.nn.init.zeros_(self.local_head.weight)
            torch.nn.init.zeros_(self.local_head.bias)
        if not grid and (not isinstance(h["transforms"], int) or isinstance(h["transforms"], bool)):
            raise ValueError(f"transforms of the {h['flow']!r} flow must be one integer, its couplings in all (per "
                             f"level is for the grid flow only), e.g. 4, got {h['transforms']!r}")
        kw = {"features": D, "context": h["features"], "transforms": h["transforms"],
              "hidden_features": list(h["hidden"])}
        if grid:
            self.flow = GridFlow(self.state_shape, h["channels"], h["transforms"], list(h["hidden"]), h["flow_kernel"],
                                 h["levels"])
        elif h["flow"] == "realnvp":
            self.flow = zuko.flows.RealNVP(**kw)
        elif h["flow"] == "maf":
            self.flow = zuko.flows.MAF(**kw, passes=h["passes"])
        else:
            self.flow = zuko.flows.NSF(**kw, passes=h["passes"])

    def _parts(self, batch: Batch) -> tuple[Distribution, Tensor | None, Tensor | None]:
        """The flow's distribution of ``u`` (batch ``(B,)``, event ``(D,)``) and the location and scale ``(B, D)``
        of the head (``None`` without it), in standardized units."""
        hmap, c = self.encoder(batch.y, batch.mask, batch.t)
        loc = scale = None
        if self.local_head is not None:
            B = hmap.shape[0]
            loc, raw = self.local_head(hmap).chunk(2, dim=1)
            loc, scale = loc.reshape(B, -1), (F.softplus(raw + _SOFTPLUS_ONE) + 1e-3).reshape(B, -1)
        flow = self.flow(hmap if self.hparams["flow"] == "grid" else c)
        flow = with_student_t_base(flow, self.hparams["tails"])
        # z = b * z0: the transform ends with z -> z / b (always composed: testing b == 1 would sync a GPU per step)
        b = self.base_scale.to(flow.base.mean)
        flow = NormalizingFlow(ComposedTransform(flow.transform, AffineTransform(0.0, 1 / b, event_dim=1)), flow.base)
        return flow, loc, scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "base_scale", torch.ones(self.event_size))  # models saved before fit_scale
        state_dict.setdefault(prefix + "spectrum_scale", torch.ones(self._wavenumbers(), dtype=torch.float64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _wavenumbers(self) -> int:
        """Bins of ``spectrum_scale``: the wavenumbers ``0, 1, ...`` of the state's periodic grid (the encoder takes
        ``(K,)`` or ``(C, H, W)`` states)."""
        shape = self.state_shape
        return int(wavenumber_bins(shape[-1:] if len(shape) == 1 else shape[1:]).max()) + 1

    def _spectrum_on(self) -> bool:
        """Whether ``spectrum_scale`` differs from 1 (looked at again only when the buffer has changed: comparing a
        GPU tensor in every training step would wait for the GPU)."""
        b = self.spectrum_scale
        key = (id(b), b._version)
        if key != self._spectrum_key:
            self._spectrum_key, self._spectrum_identity = key, bool((b == 1).all())
        return not self._spectrum_identity

    def _state_transforms(self, flow: Distribution, loc: Tensor | None, scale: Tensor | None,
                          centre: Tensor | None = None, power: bool = True) -> list[Transform]:
        """The maps from the flow's output ``u`` to the standardized state at inflation 1: the head's location and
        scale, then the spread map per wavenumber about the image of the flow's centre (where ``spectrum_scale``
        is not 1; ``centre``: the flow's centre ``(B, D)`` where the caller has it already), then the power on the
        eigenvalues of the local covariance (where ``power`` is not 1, unless ``power=False``)."""
        transforms: list[Transform] = [] if loc is None else [AffineTransform(loc, scale, event_dim=1)]
        gamma = float(self.hparams["power"]) if power else 1.0
        if self._spectrum_on() or gamma != 1.0:
            centre = self._centre(flow) if centre is None else centre
            if loc is not None:
                centre = loc + scale * centre
        if self._spectrum_on():
            transforms.append(SpectralScale(centre, self.spectrum_scale, self.state_shape))
        if gamma != 1.0:
            lam, V = self._local_shape(flow, transforms)
            transforms.append(EigenPower(centre, lam, V, gamma))
        return transforms

    def _local_shape(self, flow: Distribution, transforms: Sequence[Transform]) -> tuple[Tensor, Tensor]:
        """Eigenvalues ``(B, D)`` and eigenvectors ``(B, D, D)`` of ``J J^T``, ``J`` the Jacobian of the map from the
        base (the flow's inverse, then ``transforms``) at the base's centre: the local covariance of each window's
        posterior in standardized units (the base has unit covariance). The base's centre is copied once per output
        variable ``k`` (as a leading sample dimension, ``sample_rows`` rows at a time) and one backward pass of the
        sum of the copies' ``k``-th outputs gives all rows of ``J``: one pass over ``D x B`` rows instead of ``D``
        passes (on ``lorenz96`` K=40, 5 ms for one window against 77 ms)."""
        z0 = flow.base.mean.detach()
        B, D = z0.shape
        step = max(1, self._rows() // B)  # output variables per pass
        rows = []
        with torch.enable_grad():
            for k in range(0, D, step):
                n = min(step, D - k)
                z = z0.unsqueeze(0).expand(n, B, D).clone().requires_grad_(True)
                u = flow.transform.inv(z)
                for tr in transforms:
                    u = tr(u)  # (n, B, D): copy j's output k + j is row k + j of J
                picked = u[torch.arange(n), :, k + torch.arange(n)]  # (n, B)
                rows.append(torch.autograd.grad(picked.sum(), z)[0].detach())
        J = torch.cat(rows).permute(1, 0, 2).double()  # (B, D_x, D_z)
        lam, V = torch.linalg.eigh(J @ J.mT)
        return lam.clamp_min(1e-12 * lam.max(-1, keepdim=True).values).to(z0.dtype), V.to(z0.dtype)

    @staticmethod
    def _centre(flow: Distribution) -> Tensor:
        """``c = f^{-1}(0)`` ``(B, D)``: the flow's image of its base distribution's centre."""
        return flow.transform.inv(flow.base.mean)

    def distribution(self, batch: Batch, unstandardize: bool = False, inflation: float = 1.0,
                     power: bool = True) -> Distribution:
        """Conditional distribution of flat states (standardized, or original if ``unstandardize``), batch ``(B,)``,
        widened by ``inflation`` around the flow's centre and shaped by the ``power`` hyperparameter (module
        docstring; ``power=False``: without it, as in training)."""
        flow, loc, scale = self._parts(batch)
        transforms = []
        centre = None
        if inflation != 1.0:
            centre = self._centre(flow)
            transforms.append(AffineTransform(centre * (1.0 - inflation), inflation, event_dim=1))
        transforms += self._state_transforms(flow, loc, scale, centre, power)
        if unstandardize:
            transforms.append(AffineTransform(self.x_mean.reshape(-1), self.x_std.reshape(-1), event_dim=1))
        return TransformedDistribution(flow, transforms) if transforms else flow

    def loss(self, batch: Batch) -> Tensor:
        """Negative log-likelihood of the standardized states, averaged over the batch."""
        return -self.distribution(batch, power=False).log_prob(batch.x.flatten(1)).mean()

    def make_posterior(self, batch: Batch, uncertainty: str = "flow") -> DistributionPosterior | PointPosterior:
        """The flow's posterior (``uncertainty="flow"``), or its centre as a point estimate (``"none"``): the image
        ``f^{-1}(0)`` of the base's centre through the flow and the location-scale head, one pass per window and no
        draws (the mean where the flow is affine; near the mean and the mode of a unimodal posterior)."""
        if uncertainty not in ("flow", "none"):
            raise ValueError(f"uncertainty must be 'flow' (the posterior) or 'none' (its centre), got {uncertainty!r}")
        if uncertainty == "none":
            flow, loc, scale = self._parts(batch)
            # the centre is the fixed point of the spread map per wavenumber
            x = self._centre(flow) if loc is None else loc + scale * self._centre(flow)
            x = self.x_mean.reshape(-1) + self.x_std.reshape(-1) * x
            return PointPosterior(x.reshape(len(batch.y), *self.state_shape))
        dist = self.distribution(batch, unstandardize=True, inflation=float(self.hparams["inflation"]))
        return DistributionPosterior(dist, self.state_shape, sample_batch=max(1, self._rows() // len(batch.y)),
                                     dtype=self.dtype)

    def _rows(self) -> int:
        """Draws (samples x windows) of one sampling pass."""
        rows = int(self.hparams["sample_rows"])
        if self.hparams["flow"] == "grid":  # a conditioner's activation, rows x width x D / 2 values, kept near the
            rows = min(rows, max(1, 2**23 // (max(self.hparams["hidden"]) * self.event_size)))  # cache: 16 MB
        return rows

    def _truths_in_flow_units(self, data: WindowDataset, idx: Tensor, chunk: int
                              ) -> Iterator[tuple[Distribution, Tensor, Tensor]]:
        """For the windows ``idx`` of ``data``, ``chunk`` at a time (no gradients): the flow of each chunk, its true
        states in the flow's units at inflation 1, ``u = (x_std - loc) / scale`` ``(b, D)``, and the log-Jacobian
        ``log |du/dx|`` ``(b,)`` from the original units (the inverse of the spread map per wavenumber, of the head's
        map and of the standardization; :meth:`make_posterior`'s point estimate is the forward map of the flow's
        centre). Iterate under ``torch.no_grad()``."""
        for i in range(0, len(idx), chunk):
            x, y, m, t = (a.to(self.device) for a in data.get(idx[i:i + chunk]))
            batch = self.standardize(x, y, m, t)
            flow, loc, scale = self._parts(batch)
            u = batch.x.flatten(1)
            log_jac = (-self.x_std.log().sum()).expand(len(u))
            for tr in reversed(self._state_transforms(flow, loc, scale)):
                v = tr.inv(u)
                u, log_jac = v, log_jac - tr.log_abs_det_jacobian(v, u)
            yield flow, u, log_jac

    def fit_inflation(self, data: WindowDataset, windows: int = 1024, samples: int = 256,
                      grid: Sequence[float] | Tensor | None = None, criterion: str = "coverage", seed: int = 0,
                      ) -> dict[str, Any]:
        r"""Fit the inflation ``s`` of the posterior's spread on held-out windows and set it (``hparams["inflation"]``,
        used by :meth:`posterior`, its samples and its ``log_prob``).

        On ``windows`` windows of ``data`` (not training windows), every factor of ``grid`` (default 151 factors
        :math:`2^{k/100}`, ``k = -50 ... 100``, from 0.71 to 2) is scored from one set of ``samples`` draws per window:

        - ``criterion="coverage"``: the ECE of the highest-density coverage of the true states at the levels
          0.05 ... 0.95 (the benchmark's joint ECE). Under the inflated posterior a draw's density ranks as its
          flow density :math:`p_{f_c}(u)` does, whatever ``s``, so only the truth's density is computed again for
          each factor.
        - ``criterion="nll"``: the mean negative log-likelihood of the true states (exact, in the original units).

        Returns:
            ``{"inflation", "criterion", "grid", "score", "score_at_1", "windows", "samples"}`` (``score``: the ECE,
            or the NLL in nats per window, one per factor of ``grid``; ``score_at_1``: without inflation).
        """
        idx = self._calibration_windows(data, windows, seed)
        if criterion not in ("coverage", "nll"):
            raise ValueError(f"criterion must be 'coverage' or 'nll', got {criterion!r}")
        if samples < 2:
            raise ValueError(f"need samples >= 2, got {samples}")
        grid = 2.0 ** (torch.arange(-50, 101, dtype=torch.float64) / 100) if grid is None \
            else torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
        if len(grid) == 0 or not (torch.isfinite(grid) & (grid > 0)).all():
            raise ValueError(f"grid must hold finite factors > 0, got {grid.tolist()}")
        full = torch.cat([grid, torch.ones(1, dtype=torch.float64)])
        gen = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        B = len(idx)
        chunk = max(1, int(self.hparams["sample_rows"]) // max(samples, len(full)))
        per = []  # (S + 1, b) per chunk: credibility or negative log-likelihood of the truths
        with torch.no_grad():
            for flow, u, log_jac in self._truths_in_flow_units(data, idx, chunk):
                centre = self._centre(flow)
                s = full.to(u.dtype)[:, None, None]
                lp_true = flow.log_prob(centre + (u - centre) / s).double()  # (S + 1, b)
                if criterion == "nll":
                    per.append(-(lp_true - u.shape[-1] * full[:, None].log() + log_jac.double()))
                else:
                    with torch.random.fork_rng(devices=[]):  # the base's draws (Gaussian or Student-t), seeded
                        torch.manual_seed(_seed_from(gen))
                        z = flow.base.sample((samples,))
                    lp_draws = flow.log_prob(flow.transform.inv(z))  # (samples, b)
                    per.append((lp_draws.double()[None] > lp_true[:, None]).double().mean(1))
        per = torch.cat(per, 1)
        score = per.mean(1) if criterion == "nll" else \
            (coverage_curve(per.T) - default_levels()[:, None]).abs().mean(0)
        score_at_1, score = float(score[-1]), score[:-1]
        best = int(score.argmin())
        if len(grid) > 1 and best in (0, len(grid) - 1):
            warnings.warn(f"the best inflation is at the edge of the grid ({float(grid[best]):.3g}): widen it",
                          stacklevel=2)
        self.hparams["inflation"] = float(grid[best])
        self.train(was_training)
        return {"inflation": float(grid[best]), "criterion": criterion, "grid": grid.tolist(),
                "score": score.tolist(), "score_at_1": score_at_1, "windows": B, "samples": int(samples)}

    def _truth_latents(self, data: WindowDataset, idx: Tensor) -> tuple[Tensor, Tensor]:
        """The true states of the windows ``idx`` of ``data`` in the base space, ``z = f(u)`` ``(n, D)`` (at the
        current inflation, base scales and spectral scales), and the log-Jacobian ``(n,)`` of ``x -> z`` from the
        original units, both in float64 (no gradients; the caller sets eval mode)."""
        s = float(self.hparams["inflation"])
        chunk = max(1, int(self.hparams["sample_rows"]) // 64)
        zs, rest = [], []
        with torch.no_grad():
            for flow, u, log_jac in self._truths_in_flow_units(data, idx, chunk):
                centre = self._centre(flow)
                z, ladj = flow.transform.call_and_ladj(centre + (u - centre) / s)
                zs.append(z.double())
                rest.append((ladj + log_jac - u.shape[-1] * math.log(s)).double())
        z = torch.cat(zs)
        if not torch.isfinite(z).all():
            raise ValueError("the true states of some windows map to non-finite points of the base space")
        return z, torch.cat(rest)

    def _base_log_prob(self, r2: Tensor) -> Tensor:
        """The current base's log-density (Gaussian, or the Student-t of ``tails``, unit covariance) at squared
        distances ``r2`` from its centre, in float64."""
        D, nu = self.event_size, self.hparams["tails"]
        if nu is None:
            return -r2 / 2 - D / 2 * math.log(2 * math.pi)
        return IsotropicStudentT.unit(r2.new_zeros(1, D), float(nu)).log_prob_at_distance(r2)

    def fit_scale(self, data: WindowDataset, windows: int = 4096, seed: int = 0) -> dict[str, Any]:
        r"""Fit the scale of each dimension of the flow's base space on held-out windows and set it (the buffer
        ``base_scale`` ``(D,)``, saved with the model; module docstring).

        The truths of ``windows`` windows of ``data`` (not training windows) are mapped to the base space once,
        ``z = f(u)`` (at the current inflation and scales); under the model their covariance is ``I`` whatever the
        base, so the mean square :math:`m_d = \overline{z_d^2}` of each dimension should be 1. The windows of a
        trajectory are correlated, so the standard error of :math:`\log m_d` is computed by trajectory (cluster-robust).
        A dimension's scale is multiplied by :math:`\sqrt{m_d}` where :math:`|\log m_d|` exceeds the bound that all
        ``D`` would stay under by chance with probability 99 % (Bonferroni: the :math:`1 - 0.005 / D` quantile of
        Student's t with ``K - 1`` degrees of freedom, ``K`` trajectories, times the standard error); the other
        dimensions share one factor, the root of their pooled mean square, where its log is further from 0 than the
        0.995 quantile times its standard error. Otherwise nothing changes: a few dozen validation trajectories of a
        well-fitted flow differ from 1 by chance, and fitting D scales to them would only add that noise (on the
        linear-Gaussian task it made the joint ECE of fresh windows 0.06-0.08 where it is 0.04). Fit the tails after
        it (:meth:`after_fit` does). Windows of one trajectory give no error estimate: a warning, and the scales stay.

        Returns:
            ``{"scale_min", "scale_median", "scale_max", "own", "nll", "nll_before", "windows", "trajectories"}``: the
            range of the scales, how many dimensions got their own, the mean negative log-likelihood of the truths
            (nats per window, original units) with the new scales and before, under the current base, and the
            windows and trajectories used.
        """
        idx = self._calibration_windows(data, windows, seed, least=2)
        was_training = self.training
        self.eval()
        z, rest = self._truth_latents(data, idx)
        z2 = z.square()
        if not bool((z2.mean(0) > 0).all()):
            raise ValueError("some dimensions of the base space are constant over the windows: no scale to fit")
        _, cluster = data.locate(idx)[0].unique(return_inverse=True)
        log_factor, own = _gated_log_ratios(z2, torch.ones_like(z2), cluster, "fit_scale", "the scales are kept")
        K = int(cluster.max()) + 1
        factor = (log_factor / 2).exp()
        nll_before = float(-(self._base_log_prob(z.square().sum(-1)) + rest).mean())
        nll = float(-(self._base_log_prob((z / factor).square().sum(-1)) - factor.log().sum() + rest).mean())
        self.base_scale.mul_(factor.to(self.base_scale))
        self.train(was_training)
        b = self.base_scale.double()
        return {"scale_min": float(b.min()), "scale_median": float(b.median()), "scale_max": float(b.max()),
                "own": int(own.sum()), "nll": nll, "nll_before": nll_before, "windows": len(idx),
                "trajectories": K}

    def fit_spectrum(self, data: WindowDataset, windows: int = 1024, samples: int = 64, seed: int = 0
                     ) -> dict[str, Any]:
        r"""Fit the posterior's spread per wavenumber of the state's grid on held-out windows and set it (the buffer
        ``spectrum_scale`` ``(k,)``, saved with the model; module docstring).

        On ``windows`` windows of ``data`` (not training windows), ``samples`` draws each (standardized units, at the
        current inflation, base scales, tails and spectral scales) give per window and wavenumber bin the power of the
        truth's departure from the draws' mean and the draws' spread power
        (:func:`sbida.diagnostics.scores.spectral_powers`), whose ratio, with the finite-ensemble factor ``(S + 1) /
        S``, is 1 on average for a calibrated posterior (the inverse square of
        :func:`sbida.diagnostics.spread_skill_spectrum`). A bin's factor is multiplied by the root of its ratio where
        that differs from 1 beyond chance, with the same test as :meth:`fit_scale` (errors by trajectory, Bonferroni
        over the bins; the other bins share their pooled ratio where that one is significant), so a posterior whose
        spread is right at every scale is left as it is. The map is linear about the image of the flow's centre, so the
        density stays exact. Fit the tails after it (:meth:`after_fit` does).

        Returns:
            ``{"gains", "own", "spread_skill", "nll", "nll_before", "windows", "samples", "trajectories"}``: the
            factors ``(k,)`` set, how many bins got their own, the spread/skill per bin before the fit, the mean
            negative log-likelihood of the truths (nats per window, original units) with the new factors and before.
        """
        if samples < 2:
            raise ValueError(f"need samples >= 2, got {samples}")
        idx = self._calibration_windows(data, windows, seed, least=2)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        chunk = max(1, self._rows() // samples)
        spread, error = [], []
        with torch.no_grad():
            for i in range(0, len(idx), chunk):
                x, y, m, t = (a.to(self.device) for a in data.get(idx[i:i + chunk]))
                batch = self.standardize(x, y, m, t)
                dist = self.distribution(batch, inflation=float(self.hparams["inflation"]))
                with torch.random.fork_rng(devices=[] if self.device.type == "cpu" else [self.device]):
                    torch.manual_seed(_seed_from(gen))
                    draws = dist.sample((samples,))
                sp, er = spectral_powers(draws.reshape(samples, *batch.x.shape), batch.x, per_window=True)
                spread.append(sp.cpu())
                error.append(er.cpu())
        v, w = torch.cat(error), torch.cat(spread) * (samples + 1) / samples
        _, cluster = data.locate(idx)[0].unique(return_inverse=True)
        log_ratio, own = _gated_log_ratios(v, w, cluster, "fit_spectrum", "the spectral scales are kept")
        if not bool(torch.isfinite(log_ratio).all()):
            raise ValueError("the draws' spread or the truths' error vanishes at some wavenumber: no spread to fit")
        z, rest = self._truth_latents(data, idx)
        nll_before = float(-(self._base_log_prob(z.square().sum(-1)) + rest).mean())
        nll = nll_before
        if bool((log_ratio != 0).any()):  # else nothing changes: no second pass of the truths
            self.spectrum_scale.mul_((log_ratio / 2).exp().to(self.spectrum_scale))
            z, rest = self._truth_latents(data, idx)
            nll = float(-(self._base_log_prob(z.square().sum(-1)) + rest).mean())
        self.train(was_training)
        return {"gains": self.spectrum_scale.tolist(), "own": int(own.sum()),
                "spread_skill": (w.mean(0) / v.mean(0)).sqrt().tolist(), "nll": nll, "nll_before": nll_before,
                "windows": len(idx), "samples": int(samples), "trajectories": int(cluster.max()) + 1}

    def fit_tails(self, data: WindowDataset, windows: int = 4096, seed: int = 0) -> dict[str, Any]:
        r"""Fit the degrees of freedom ``nu`` of the Student-t base (``tails``, unit covariance) by the likelihood of
        the true states of held-out windows, the network fixed, and set it (``hparams["tails"]``).

        The truths of ``windows`` windows of ``data`` (not training windows) are mapped to the flow's base space,
        ``z = f(u)`` (at the current inflation, base scales and spectral scales), once; their log-likelihood under
        the base then depends on ``|z|^2`` only, and ``nu`` is fitted by L-BFGS in float64, kept between 3 (at 2 the
        variance is infinite) and 10^6 (Gaussian tails).

        Returns:
            ``{"tails", "nll", "nll_gaussian", "windows"}``: the fitted ``nu`` and the mean negative
            log-likelihood of the truths (nats per window, original units) under the fitted base and under the
            Gaussian base.
        """
        idx = self._calibration_windows(data, windows, seed, least=2)
        was_training = self.training
        self.eval()
        z, rest = self._truth_latents(data, idx)
        fit = fit_student_t(z.square().sum(-1), self.event_size, rest)
        nu = fit["df"]
        self.hparams["tails"] = nu
        self.train(was_training)
        return {"tails": nu, "nll": fit["nll"], "nll_gaussian": fit["nll_gaussian"], "windows": len(idx)}

    def fit_power(self, data: WindowDataset, windows: int = 1024, samples: int = 256,
                  grid: Sequence[float] | Tensor | None = None, margin: float | None = None, seed: int = 0
                  ) -> dict[str, Any]:
        r"""Fit the power :math:`\gamma` on the eigenvalues of each window's local covariance (:class:`EigenPower`)
        on held-out windows and set it (``hparams["power"]``, used by :meth:`posterior`, its samples and its
        ``log_prob``).

        On ``windows`` windows of ``data`` (not training windows) the posterior without the power (at the current
        inflation, base scales, spectral scales and tails) is drawn ``samples`` times per window, once; for every
        :math:`\gamma` of ``grid`` (default 0.9, 0.925, ..., 1.2) the draws are mapped by the power and the truths'
        density is computed again (a draw's rank by density does not change: the map keeps the volume). The score of
        :math:`\gamma` is the sum of the two joint ECEs, by highest density and by distance
        (:func:`sbida.diagnostics.expected_coverage`'s statistics): the power corrects a covariance too narrow in its
        wide directions and too wide in its narrow ones, which moves the two in opposite directions. The lowest score
        is kept where it is lower than the score at 1 by more than ``margin`` (default: the noise of that sum on
        these windows, :func:`sbida.diagnostics.coverage_noise` by trajectory, unknown and so never exceeded for the
        windows of one trajectory); otherwise :math:`\gamma = 1`.

        Returns:
            ``{"power", "grid", "ece", "distance_ece", "score", "margin", "nll", "windows", "samples"}``: the
            chosen power, the grid, the two ECEs and their sum per power, the margin, the truths' mean negative
            log-likelihood per power (nats per window, standardized units) and the sizes.
        """
        idx = self._calibration_windows(data, windows, seed, least=2)
        if samples < 2:
            raise ValueError(f"need samples >= 2, got {samples}")
        grid = torch.tensor([round(0.9 + 0.025 * k, 3) for k in range(13)], dtype=torch.float64) if grid is None \
            else torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
        if len(grid) == 0 or not (torch.isfinite(grid) & (grid > 0)).all():
            raise ValueError(f"grid must hold finite powers > 0, got {grid.tolist()}")
        if margin is not None and not margin >= 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        full = torch.cat([grid, torch.ones(1, dtype=torch.float64)])  # 1 last: the score without the power
        gen = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        chunk = max(1, int(self.hparams["sample_rows"]) // samples)
        hpd, dist, nll = [], [], []  # (P, b) per chunk
        for i in range(0, len(idx), chunk):
            x, y, m, t = (a.to(self.device) for a in data.get(idx[i:i + chunk]))
            batch = self.standardize(x, y, m, t)
            with torch.no_grad():
                post = self.distribution(batch, inflation=float(self.hparams["inflation"]), power=False)
                flow, maps = (post.base_dist, list(post.transforms)) if isinstance(post, TransformedDistribution) \
                    else (post, [])
                c = self._centre(flow)  # its image: the centre of the power's map (the inflation keeps it)
                for tr in maps:
                    c = tr(c)
            lam, V = self._local_shape(flow, maps)  # the inflation, a factor on J, leaves the map as it is
            with torch.no_grad():
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_seed_from(gen))
                    draws = post.sample((samples,))  # (S, b, D)
                lp_draws = post.log_prob(draws)
                truth = batch.x.flatten(1)
                rows_h, rows_d, rows_n = [], [], []
                for g in full.tolist():
                    lp_true = post.log_prob(EigenPower(c, lam, V, 2.0 - g)(truth)) if g != 1.0 else \
                        post.log_prob(truth)
                    rows_h.append((lp_draws > lp_true).double().mean(0))
                    mapped = EigenPower(c, lam, V, g)(draws) if g != 1.0 else draws
                    rows_d.append(distance_credibility(mapped, truth).double())
                    rows_n.append(-lp_true.double())
            hpd.append(torch.stack(rows_h))
            dist.append(torch.stack(rows_d))
            nll.append(torch.stack(rows_n))
        self.train(was_training)
        hpd, dist, nll = torch.cat(hpd, 1), torch.cat(dist, 1), torch.cat(nll, 1)
        levels = default_levels()
        ece = (coverage_curve(hpd.T, levels) - levels[:, None]).abs().mean(0)
        ece_d = (coverage_curve(dist.T, levels) - levels[:, None]).abs().mean(0)
        score = ece + ece_d
        if margin is None:
            groups = data.locate(idx)[0]
            margin = coverage_noise(hpd[-1], groups, levels)[1] + coverage_noise(dist[-1], groups, levels)[1]
        best = int(score[:-1].argmin())
        power = float(grid[best]) if float(score[-1] - score[best]) > margin else 1.0
        if power != 1.0 and len(grid) > 1 and best in (0, len(grid) - 1):
            warnings.warn(f"the best power is at the edge of the grid ({power:.3g}): widen it", stacklevel=2)
        self.hparams["power"] = power
        return {"power": power, "grid": grid.tolist(), "ece": ece[:-1].tolist(), "distance_ece": ece_d[:-1].tolist(),
                "score": score[:-1].tolist(), "score_at_1": float(score[-1]), "margin": float(margin),
                "nll": nll[:-1].mean(1).tolist(), "windows": len(idx), "samples": int(samples)}

    def after_fit(self, train: WindowDataset, val: WindowDataset | None, seed: int, progress: bool = False) -> None:
        """After :meth:`fit`: :meth:`fit_inflation` on ``val`` when ``inflation_fit`` names a criterion, then
        :meth:`fit_scale` when ``scale_fit`` is set, then :meth:`fit_spectrum` when ``spectrum_fit`` is set, then
        :meth:`fit_tails` when ``tails_fit`` is set, then :meth:`fit_power` when ``power_fit`` is set (nothing without
        ``val``: the training windows' fit is tighter than held-out windows'; a warning for the inflation, none for
        the others, two of which are on by default). The results are kept in ``inflation_record``, ``scale_record``,
        ``spectrum_record``, ``tails_record`` and ``power_record``, the fitted numbers in ``hparams``,
        ``base_scale`` and ``spectrum_scale`` (saved with the model)."""
        self.inflation_record = self.tails_record = self.scale_record = self.spectrum_record = None
        self.power_record = None
        h = self.hparams
        if h["inflation_fit"] is not None and self._held_out(val, "inflation_fit", f"the inflation stays "
                                                                                    f"{h['inflation']}"):
            self.inflation_record = self.fit_inflation(val, windows=int(h["inflation_windows"]),
                                                       samples=int(h["inflation_samples"]),
                                                       criterion=h["inflation_fit"], seed=seed)
        held_out = val is not None and len(val) > 0  # the fits on by default are skipped without val, silently
        if h["scale_fit"] and held_out:
            self.scale_record = self.fit_scale(val, windows=int(h["scale_windows"]), seed=seed)
        if h["spectrum_fit"] and held_out:
            self.spectrum_record = self.fit_spectrum(val, windows=int(h["spectrum_windows"]),
                                                     samples=int(h["spectrum_samples"]), seed=seed)
        if h["tails_fit"] and held_out:
            self.tails_record = self.fit_tails(val, windows=int(h["tails_windows"]), seed=seed)
        if h["power_fit"] and held_out:
            self.power_record = self.fit_power(val, windows=int(h["power_windows"]),
                                               samples=int(h["power_samples"]), seed=seed)

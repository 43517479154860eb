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
from torch.distributions import AffineTransform, Distribution, TransformedDistribution
from zuko.distributions import NormalizingFlow

from ..data import WindowDataset
from ..diagnostics.coverage import coverage_curve, default_levels
from ..nn import GridFlow, IsotropicStudentT, WindowEncoder, periodic_conv
from ..posterior import DistributionPosterior, PointPosterior, _seed_from, fit_student_t
from .base import Batch, Estimator

__all__ = ["NPE"]

_SOFTPLUS_ONE = math.log(math.e - 1)  # softplus(_SOFTPLUS_ONE) == 1


class NPE(Estimator):
    """Neural posterior estimation with a window encoder and a conditional zuko flow.

    Hyperparameters (``NPE.defaults``): encoder ``channels``, ``depth``, ``kernel_size``, ``features`` (context
    vector; unused by the ``"grid"`` flow), ``emb_features``, ``aggregate``; flow ``flow`` (``"grid"``,
    ``"realnvp"``, ``"maf"``, ``"nsf"``), ``transforms`` (per level for ``"grid"``), ``levels`` (multiscale levels of
    the grid flow, ``None``: all), ``hidden`` (channels of the grid conditioners, or widths of
    the MLPs), ``flow_kernel`` (kernel of the grid conditioners), ``passes`` (for ``maf``/``nsf``); ``local`` (the
    convolutional location-scale head); ``sample_rows`` (rows of one sampling pass, bounds memory; the grid flow
    also keeps one activation of its conditioners under 2^22 values, which measured fastest); ``inflation`` (the
    factor ``s`` on the posterior's spread, see the module docstring; :meth:`fit_inflation` fits it),
    ``inflation_fit`` (``None``, ``"coverage"`` or ``"nll"``: the criterion of a :meth:`fit_inflation` on the
    validation windows at the end of :meth:`fit`, over ``inflation_windows`` of them with ``inflation_samples``
    draws each); ``tails`` (``None``: a Gaussian base; a number ``nu > 2``: the Student-t base of ``nu`` degrees of
    freedom and unit covariance, see the module docstring), ``tails_fit`` (run :meth:`fit_tails` on
    ``tails_windows`` validation windows at the end of :meth:`fit`). The sampling settings (``sampler_hparams``)
    can change between an interrupted fit and its resumption.
    """

    defaults: dict[str, Any] = {
        "channels": 32, "depth": 3, "kernel_size": 5, "features": 128, "emb_features": 32, "aggregate": "concat",
        "flow": "grid", "transforms": 2, "levels": None, "hidden": [32], "flow_kernel": 5, "passes": 2, "local": True,
        "sample_rows": 262144, "inflation": 1.0, "inflation_fit": None, "inflation_windows": 1024,
        "inflation_samples": 256, "tails": None, "tails_fit": True, "tails_windows": 4096,
    }
    # settings of the posterior, not of the network or its training (an interrupted fit resumes with new ones)
    sampler_hparams = frozenset({"sample_rows", "inflation", "inflation_fit", "inflation_windows",
                                 "inflation_samples", "tails", "tails_fit", "tails_windows"})

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
        nu = h["tails"]
        if nu is not None and not (float(nu) > 2 and math.isfinite(float(nu))):
            raise ValueError(f"tails must be null (a Gaussian base) or finite degrees of freedom > 2, got {nu}")
        if not isinstance(h["tails_fit"], bool) or int(h["tails_windows"]) < 2:
            raise ValueError(f"tails_fit must be true or false and tails_windows >= 2, got {h['tails_fit']!r} and "
                             f"{h['tails_windows']}")
        self.inflation_record: dict[str, Any] | None = None
        self.tails_record: dict[str, Any] | None = None
        D = self.event_size
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
        if self.hparams["tails"] is not None:
            nu = float(self.hparams["tails"])
            flow = NormalizingFlow(flow.transform, IsotropicStudentT(flow.base.mean, nu, math.sqrt((nu - 2) / nu)))
        return flow, loc, scale

    @staticmethod
    def _centre(flow: Distribution) -> Tensor:
        """``c = f^{-1}(0)`` ``(B, D)``: the flow's image of its base distribution's centre."""
        return flow.transform.inv(flow.base.mean)

    def distribution(self, batch: Batch, unstandardize: bool = False, inflation: float = 1.0) -> Distribution:
        """Conditional distribution of flat states (standardized, or original if ``unstandardize``), batch ``(B,)``,
        widened by ``inflation`` around the flow's centre (module docstring)."""
        flow, loc, scale = self._parts(batch)
        transforms = []
        if inflation != 1.0:
            transforms.append(AffineTransform(self._centre(flow) * (1.0 - inflation), inflation, event_dim=1))
        if loc is not None:
            transforms.append(AffineTransform(loc, scale, event_dim=1))
        if unstandardize:
            transforms.append(AffineTransform(self.x_mean.reshape(-1), self.x_std.reshape(-1), event_dim=1))
        return TransformedDistribution(flow, transforms) if transforms else flow

    def loss(self, batch: Batch) -> Tensor:
        """Negative log-likelihood of the standardized states, averaged over the batch."""
        return -self.distribution(batch).log_prob(batch.x.flatten(1)).mean()

    def make_posterior(self, batch: Batch, uncertainty: str = "flow") -> DistributionPosterior | PointPosterior:
        """The flow's posterior (``uncertainty="flow"``), or its centre as a point estimate (``"none"``): the image
        ``f^{-1}(0)`` of the base's centre through the flow and the location-scale head, one pass per window and no
        draws (the mean where the flow is affine; near the mean and the mode of a unimodal posterior)."""
        if uncertainty not in ("flow", "none"):
            raise ValueError(f"uncertainty must be 'flow' (the posterior) or 'none' (its centre), got {uncertainty!r}")
        if uncertainty == "none":
            flow, loc, scale = self._parts(batch)
            x = self._centre(flow) if loc is None else loc + scale * self._centre(flow)
            x = self.x_mean.reshape(-1) + self.x_std.reshape(-1) * x
            return PointPosterior(x.reshape(len(batch.y), *self.state_shape))
        dist = self.distribution(batch, unstandardize=True, inflation=float(self.hparams["inflation"]))
        rows = int(self.hparams["sample_rows"])
        if self.hparams["flow"] == "grid":  # a conditioner's activation, rows x width x D / 2 values, kept near the
            rows = min(rows, max(1, 2**23 // (max(self.hparams["hidden"]) * self.event_size)))  # cache: 16 MB
        return DistributionPosterior(dist, self.state_shape, sample_batch=max(1, rows // len(batch.y)),
                                     dtype=self.dtype)

    def _truths_in_flow_units(self, data: WindowDataset, idx: Tensor, chunk: int
                              ) -> Iterator[tuple[Distribution, Tensor, Tensor]]:
        """For the windows ``idx`` of ``data``, ``chunk`` at a time (no gradients): the flow of each chunk, its true
        states in the flow's units at inflation 1, ``u = (x_std - loc) / scale`` ``(b, D)``, and the log-Jacobian
        ``log |du/dx|`` ``(b,)`` from the original units (the inverse of the head's map and of the standardization;
        :meth:`make_posterior`'s point estimate is the forward map of the flow's centre). Iterate under
        ``torch.no_grad()``."""
        for i in range(0, len(idx), chunk):
            x, y, m, t = (a.to(self.device) for a in data.get(idx[i:i + chunk]))
            batch = self.standardize(x, y, m, t)
            flow, loc, scale = self._parts(batch)
            u = batch.x.flatten(1)
            log_jac = (-self.x_std.log().sum()).expand(len(u))
            if loc is not None:
                u, log_jac = (u - loc) / scale, log_jac - scale.log().sum(-1)
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

    def fit_tails(self, data: WindowDataset, windows: int = 4096, seed: int = 0) -> dict[str, Any]:
        r"""Fit the degrees of freedom ``nu`` of the Student-t base (``tails``, unit covariance) by the likelihood of
        the true states of held-out windows, the network fixed, and set it (``hparams["tails"]``).

        The truths of ``windows`` windows of ``data`` (not training windows) are mapped to the flow's base space,
        ``z = f(u)`` (at the current inflation), once; their log-likelihood under the base then depends on
        ``|z|^2`` only, and ``nu`` is fitted by L-BFGS in float64, kept between 3 (at 2 the variance is infinite) and
        10^6 (Gaussian tails).

        Returns:
            ``{"tails", "nll", "nll_gaussian", "windows"}``: the fitted ``nu`` and the mean negative
            log-likelihood of the truths (nats per window, original units) under the fitted base and under the
            Gaussian base.
        """
        idx = self._calibration_windows(data, windows, seed, least=2)
        was_training = self.training
        self.eval()
        s = float(self.hparams["inflation"])
        chunk = max(1, int(self.hparams["sample_rows"]) // 64)
        r2, rest = [], []  # |z|^2 and the log-Jacobian of x -> z, per window
        with torch.no_grad():
            for flow, u, log_jac in self._truths_in_flow_units(data, idx, chunk):
                centre = self._centre(flow)
                z, ladj = flow.transform.call_and_ladj(centre + (u - centre) / s)
                r2.append(z.double().square().sum(-1))
                rest.append((ladj + log_jac - u.shape[-1] * math.log(s)).double())
        fit = fit_student_t(torch.cat(r2), self.event_size, torch.cat(rest))
        nu = fit["df"]
        self.hparams["tails"] = nu
        self.train(was_training)
        return {"tails": nu, "nll": fit["nll"], "nll_gaussian": fit["nll_gaussian"], "windows": len(idx)}

    def after_fit(self, train: WindowDataset, val: WindowDataset | None, seed: int, progress: bool = False) -> None:
        """After :meth:`fit`: :meth:`fit_inflation` on ``val`` when ``inflation_fit`` names a criterion, then
        :meth:`fit_tails` when ``tails_fit`` is set (nothing without ``val``: the training windows' fit is tighter
        than held-out windows'; a warning for the inflation, none for the tails, whose fit is on by default). The
        results are kept in ``inflation_record`` and ``tails_record``, the fitted
        numbers in ``hparams`` (saved with the model)."""
        self.inflation_record = self.tails_record = None
        h = self.hparams
        if h["inflation_fit"] is not None and self._held_out(val, "inflation_fit", f"the inflation stays "
                                                                                    f"{h['inflation']}"):
            self.inflation_record = self.fit_inflation(val, windows=int(h["inflation_windows"]),
                                                       samples=int(h["inflation_samples"]),
                                                       criterion=h["inflation_fit"], seed=seed)
        if h["tails_fit"] and val is not None and len(val) > 0:  # on by default: skipped without val, silently
            self.tails_record = self.fit_tails(val, windows=int(h["tails_windows"]), seed=seed)

r"""Neural ratio estimation (NRE): a classifier of (state, window) pairs gives the posterior up to a constant.

A classifier :math:`d_\phi(\tilde x, y, t) = \sigma(\log r_\phi)` learns to tell pairs drawn jointly,
:math:`(\tilde x, y) \sim p(x, y)`, from pairs with the state of another window, :math:`p(x)\,p(y)`. Its Bayes optimum
is the ratio of the posterior to the state marginal,

.. math:: r(x, y, t) = \frac{d}{1 - d} = \frac{p(x \mid y, t)}{p(x)}, \qquad
          \log q(x \mid y, t) = \log r_\phi(\tilde x, y, t) + \log \hat p(\tilde x) - \textstyle\sum_i \log \sigma_{x,i}
          + \text{const}(y, t),

with :math:`\hat p` a Gaussian (or, with ``marginal="flow"``, a grid flow) fitted to the standardized training
states. The losses are lampe's binary cross-entropy (NRE; Hermans et al., 2020) and its balanced variant (BNRE;
Delaunoy et al., 2022),
:math:`\ell + \lambda\,(\mathbb{E}[d(x, y)] + \mathbb{E}[d(x', y)] - 1)^2`.

The classifier puts the standardized state as a channel beside the window encoder's context map, runs periodic
convolutions and sums a per-cell output over the grid, :math:`f_\phi(\tilde x, y, t)`. A reference density
:math:`g(\tilde x \mid y, t)` from the same context map is trained alongside by maximum likelihood: a per-cell
location-scale map followed by a multiscale grid coupling flow (:class:`sbida.nn.GridFlow`; ``reference="flow"``), or
the diagonal Gaussian alone (``reference="diag"``). The log-ratio is parametrized relative to it,

.. math:: \log r_\phi = f_\phi + \log g - \log \hat p, \qquad \log q(x \mid y, t) = f_\phi + \log g + \text{const},

so that the classifier only corrects the reference (``g`` is held fixed in the classifier's losses). Besides the
NRE/BNRE loss (negatives: the states of other windows), ``f`` alone is trained as the logit of draws of
:math:`p(x \mid y)` against draws of :math:`g` (negatives near the truth, which the marginal's are not). Its optimum,
:math:`f = \log p(x \mid y) - \log g`, is the NRE loss's only where :math:`\hat p` is the states' marginal
:math:`p(x)`; with the Gaussian :math:`\hat p` the NRE loss's optimum differs from it by
:math:`\log \hat p - \log p(x)`.

The sampler is chosen by ``proposal``; the default ``"auto"`` takes ``"smc"`` when the reference is a flow, and
otherwise ``"laplace"`` for states of up to ``LAPLACE_MAX`` values and ``"learned"`` beyond.

- ``"smc"``: tempered SMC (:func:`sbida.samplers.smc`) from ``n`` draws of :math:`g` to :math:`g\,e^{f}` through
  :math:`g\,e^{\beta f}`, :math:`0 = \beta_0 < \dots < \beta_K = 1`, each :math:`\beta_{k+1}` set so that the
  weights :math:`e^{(\beta_{k+1} - \beta_k) f}` keep an effective sample size of ``smc_ess`` x ``n``, then
  systematic resampling and ``smc_moves`` MALA moves invariant for the tempered target (mass matrix: the weighted
  particles' covariance). With ``smc_space="base"`` (the default) the particles are the reference flow's base
  variables :math:`u`, :math:`\tilde x = T(u)`: the path runs from :math:`\mathcal N(0, I)` to
  :math:`\mathcal N(u)\,e^{f(T(u))}`, where the flow has taken out most of the posterior's scales and correlations
  and MALA mixes in fewer moves (the reparametrization of neural-transport MCMC, Hoffman et al., 2019; on
  ``lorenz96`` K=40 after 25 minutes of training, with 100 moves and the temperature refitted, spread/skill 0.88 to
  0.93 and the distance ECE 0.134 to 0.085, ``benchmarks/RESULTS.md``); ``smc_space="state"`` moves the
  standardized states, with :math:`g` as the prior. Its cost is about ``K x smc_moves`` evaluations of ``f`` and of
  the flow (``log g``, or the map ``T``) with their gradients, K the number of temperatures (4 to 6 on ``lorenz96``
  K=40).

The reference flow's base is a standard normal during training; at its end (``ref_tails_fit``, the default)
:meth:`NRE.fit_tails` replaces it by the unit-covariance Student-t (:class:`sbida.nn.IsotropicStudentT`) whose degrees
of freedom give the true states of held-out windows their highest likelihood, before the temperature is fitted: the
reference, like NPE's flow, was too narrow in its tails. On ``lorenz96`` K=40 after 25 minutes of training it took
the reference alone from a joint ECE of 0.085 to 0.033 (1000 test windows, nu = 40), and on two seeds the
temperature fitted after it was 0 (:meth:`NRE.fit_temperature`'s grid starts there): the posterior is then the
reference's, drawn directly (the classifier's correction, learned against the Gaussian base, made it worse at
temperature 1): on 1000 test windows x 1000 samples a joint ECE of 0.024-0.033, ECE-d 0.039-0.044 and spread/skill
0.94, at 0.03 s per window (``benchmarks/RESULTS.md``). The SMC prior in the base space is that Student-t.

The other proposals give draws that are importance-resampled once and then moved by ``steps`` Metropolis-adjusted
Langevin (MALA) steps, all windows and chains at once, the step size of each window adapted towards an acceptance of
0.57 in the first half of the steps.

- ``"reference"``: at least ``REFERENCE_CANDIDATES`` draws of :math:`g` per window, resampled with weights
  :math:`q / g = e^{f}` (no density of :math:`g` is needed); the MALA mass matrix is the covariance of those draws
  (dense up to ``LAPLACE_MAX`` values, shrunk by 0.1 towards its diagonal; diagonal beyond). It costs no Hessian, so
  it scales to large states, and its candidates already have the reference's correlations.
- ``"laplace"``: finds each window's mode of :math:`\log q` by damped Newton steps from the image of the base's mode
  under :math:`g` (its mean for the diagonal Gaussian), with gradients and Hessians of :math:`\log q` by automatic
  differentiation through the flow, and takes the Laplace approximation
  :math:`\mathcal N(\hat z, (-\nabla^2 \log q)^{-1})` (its scales times ``inflate``) as the proposal (weights
  :math:`q / \mathcal N`) and its covariance as the mass matrix. A posterior object makes its Laplace fit once and
  keeps it for later draws. The Hessian costs ``D`` copies of the batch per Newton step: on the 2x32x32 Kolmogorov
  flow, 50 samples of one window took 196 s with it and 1.6 s with the learned proposal (one CPU thread, a barely
  trained network).
- ``"learned"``: the location-scale map, a diagonal proposal and mass matrix. Those mix badly on strongly correlated
  posteriors (on the linear-Gaussian task, 2 distinct draws of 500 after resampling).

Why ``"smc"`` is the default: on ``lorenz96`` K=40 the trained classifier's :math:`f` is sharp relative to
:math:`g` (a standard deviation of about 10 nats over draws of :math:`g`; 8.5 at the truth against -21 on average
at those draws, on 40 test windows of a network after 7 epochs of its full budget), so resampling thousands of draws
of :math:`g` keeps an effective 1 to 17 of them, and 10 MALA steps do not spread them again: on 20 of those windows x
200 samples the spread over the RMSE was 0.66 (90 % intervals covering 68 %), 0.83 after 100 MALA steps, 1.03 after
1500 (90 %, 326 s). SMC with 100 moves per temperature gave 0.91-0.98 (86 %) in 116-169 s, about 35 times the cost
of the ``"reference"`` sampler. Before it, ``"reference"`` had replaced ``"laplace"``, whose draws collapsed in
resampling (200 windows of a 25-minute network: joint ECE 0.129 to 0.058, spread/skill 0.50 to 0.62). On the
linear-Gaussian task every sampler is calibrated (ECE 0.02-0.03 on 400 windows; SMC with 10 to 50 moves
0.028-0.034), the ratio being smooth there.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lampe.inference import BNRELoss, NRELoss
from torch import Tensor, nn
from torch.distributions import AffineTransform, Distribution, Independent, Normal, TransformedDistribution

from ..data import IndexPermutation, WindowDataset
from ..diagnostics.coverage import coverage_curve, default_levels, moments_and_distance
from ..nn import GridFlow, IsotropicStudentT, WindowEncoder, periodic_conv, with_student_t_base
from ..posterior import SamplerPosterior, fit_student_t, student_t_mixing
from ..samplers import SMCResult, path_at, smc, systematic_resample, tempered_log_evidence
from .base import Batch, Estimator

__all__ = ["NRE", "RatioNet"]

LAPLACE_MAX = 256  # proposal "auto": Laplace up to this state size (its Hessian costs D passes), learned beyond
REFERENCE_CANDIDATES = 256  # proposal "reference": at least this many draws of g per window are resampled
_SOFTPLUS_ONE = math.log(math.e - 1)  # softplus(_SOFTPLUS_ONE) == 1
_LOG_2PI = math.log(2 * math.pi)


class RatioNet(nn.Module):
    r"""Log-ratio as a sum of local terms, ``log r(x~, h) = sum_i f([x~, h]_{N(i)})``: the state as channels beside
    a context map, periodic convolutions (the context's share computed once per window), a per-cell output summed
    over the grid. A Gaussian likelihood seen through local operators is of this form.

    Args:
        state_shape: ``(K,)`` or ``(C, H, W)``.
        context_channels: channels of the encoder's context map.
        channels: width of the classifier's feature maps.
        depth: residual periodic convolutions after the first.
        kernel_size: odd kernel size.
    """

    def __init__(self, state_shape: tuple[int, ...], context_channels: int, channels: int = 32, depth: int = 1,
                 kernel_size: int = 3):
        super().__init__()
        self.state_shape = tuple(state_shape)
        self.dim = 1 if len(self.state_shape) == 1 else 2
        self.state_channels = 1 if self.dim == 1 else self.state_shape[0]
        self.grid = self.state_shape[-self.dim:]
        self.x_in = periodic_conv(self.dim, self.state_channels, channels, kernel_size)
        self.c_in = periodic_conv(self.dim, context_channels, channels, 1)
        self.blocks = nn.ModuleList([periodic_conv(self.dim, channels, channels, kernel_size) for _ in range(depth)])
        self.mix = periodic_conv(self.dim, channels, channels, 1)
        self.out = periodic_conv(self.dim, channels, 1, 1)
        self.act = nn.SiLU()

    def context(self, hmap: Tensor) -> Tensor:
        """The classifier's share of a context map ``(B, C, *grid)`` -> ``(B, channels, *grid)`` (once per window)."""
        return self.c_in(hmap)

    def forward(self, theta: Tensor, context: Tensor) -> Tensor:
        """Log-ratios of standardized flat states.

        Args:
            theta: ``(..., B, D)`` standardized flat states.
            context: ``(B, channels, *grid)`` from :meth:`context`.

        Returns:
            ``(..., B)`` log-ratios.
        """
        lead, B = theta.shape[:-2], theta.shape[-2]
        h = self.x_in(theta.reshape(-1, self.state_channels, *self.grid))
        h = self.act((h.reshape(-1, B, *h.shape[1:]) + context).flatten(0, 1))
        for conv in self.blocks:
            h = h + self.act(conv(h))
        h = self.out(self.act(self.mix(h)))
        return h.flatten(1).sum(-1).reshape(*lead, B)


class NRE(Estimator):
    """Neural ratio estimation with a window encoder, a convolutional classifier, a learned reference density and a
    tempered-SMC sampler from that reference.

    Hyperparameters (``NRE.defaults``): encoder ``channels``, ``depth``, ``kernel_size``, ``emb_features``,
    ``aggregate``; classifier ``ratio_channels``, ``ratio_depth``, ``ratio_kernel``; reference ``reference``
    (``"flow"``: location-scale head then a :class:`~sbida.nn.GridFlow`; ``"diag"``: the diagonal Gaussian alone),
    ``ref_transforms``, ``ref_hidden``, ``ref_kernel``, ``ref_levels`` (the grid flow's couplings per level: one number,
    or one per level from the finest with the last repeated; hidden widths, kernel and levels); ``loss`` (``"nre"`` or
    ``"bnre"``) and ``lmbda`` (BNRE's balance weight); ``contrast_weight`` (the cross-entropy against reference draws),
    ``proposal_weight`` (the reference's negative log-likelihood per cell); ``marginal``, the state marginal p^ of the
    ratio: a Gaussian with ``"full"`` or ``"diag"`` covariance, or ``"flow"``, an unconditional grid flow (the
    reference's sizes, a constant context) fitted by maximum likelihood in ``marginal_steps`` Adam steps before training
    and then frozen (on ``lorenz96`` K=40 it did not improve the posterior after 25 minutes of training:
    ``benchmarks/RESULTS.md``); ``shrinkage`` (of the Gaussian's covariance towards the diagonal); sampler ``proposal``
    (``"smc"``, ``"reference"``, ``"laplace"``, ``"learned"`` or ``"auto"``: SMC with a flow reference, else Laplace for
    states of up to ``LAPLACE_MAX`` values and learned beyond; see the module docstring), ``smc_moves`` and ``smc_ess``
    (SMC's MALA moves per temperature and the fraction of effective particles kept at each), ``smc_space`` (``"base"``:
    SMC runs over the reference's base variables, ``"state"``: over the standardized states; models saved before this
    setting existed load with ``"base"``, though a temperature they fitted came from ``"state"``), ``ratio_temperature``
    (``tau`` of the posterior ``g e^{tau f}``, 1 by default, 0 for the reference alone, drawn directly without SMC;
    :meth:`fit_temperature` fits it), ``temperature_fit``
    (``None``, ``"coverage"``, ``"hpd"`` or ``"nll"``: the criterion of a :meth:`fit_temperature` on the validation
    windows at the end of :meth:`fit`, over ``temperature_windows`` of them and temperatures up to ``temperature_max``),
    ``ref_tails`` (``None``: the reference flow's base is a standard normal; a number ``nu > 2``: the unit-covariance
    Student-t of ``nu`` degrees of freedom, :class:`sbida.nn.IsotropicStudentT`, in the reference's density, its draws
    and the base-space SMC's prior), ``ref_tails_fit`` (run :meth:`fit_tails` on ``ref_tails_windows`` validation
    windows at the end of :meth:`fit`, before the temperature),
    ``newton`` (Newton steps to the mode), ``steps`` (MALA steps after resampling), ``inflate`` (proposal scale factor),
    ``sample_rows`` (chains x windows run at once, bounds memory). The sampler's settings (``sampler_hparams``) can
    change between an interrupted fit and its resumption.
    """

    defaults: dict[str, Any] = {
        "channels": 32, "depth": 3, "kernel_size": 5, "emb_features": 32, "aggregate": "concat",
        "ratio_channels": 32, "ratio_depth": 1, "ratio_kernel": 3,
        "reference": "flow", "ref_transforms": [3, 2], "ref_hidden": [32], "ref_kernel": 5, "ref_levels": None,
        "loss": "nre", "lmbda": 100.0, "contrast_weight": 1.0, "proposal_weight": 1.0,
        "marginal": "full", "marginal_steps": 2000, "shrinkage": 0.01, "proposal": "auto", "newton": 3, "steps": 10,
        "inflate": 1.1, "sample_rows": 65536, "smc_moves": 100, "smc_ess": 0.3, "smc_space": "base",
        "ratio_temperature": 1.0, "temperature_fit": None, "temperature_windows": 128, "temperature_max": 1.0,
        "ref_tails": None, "ref_tails_fit": True, "ref_tails_windows": 4096,
    }
    # the sampler's settings: changing them does not change the network or its training (an interrupted fit resumes)
    sampler_hparams = frozenset({"proposal", "newton", "steps", "inflate", "sample_rows", "smc_moves", "smc_ess",
                                 "smc_space", "ratio_temperature", "temperature_fit", "temperature_windows",
                                 "temperature_max", "ref_tails", "ref_tails_fit", "ref_tails_windows"})

    def build(self) -> None:
        h = self.hparams
        if h["loss"] not in ("nre", "bnre"):
            raise ValueError(f"loss must be 'nre' or 'bnre', got {h['loss']!r}")
        if h["marginal"] not in ("full", "diag", "flow"):
            raise ValueError(f"marginal must be 'full', 'diag' or 'flow', got {h['marginal']!r}")
        if int(h["marginal_steps"]) < 1:
            raise ValueError(f"marginal_steps must be >= 1, got {h['marginal_steps']}")
        if h["reference"] not in ("flow", "diag"):
            raise ValueError(f"reference must be 'flow' or 'diag', got {h['reference']!r}")
        if int(h["steps"]) < 0 or float(h["inflate"]) <= 0 or int(h["newton"]) < 0:
            raise ValueError(f"steps and newton must be >= 0 and inflate > 0, got {h['steps']}, {h['newton']} and "
                             f"{h['inflate']}")
        if not float(h["ratio_temperature"]) >= 0:
            raise ValueError(f"ratio_temperature must be >= 0, got {h['ratio_temperature']}")
        if h["temperature_fit"] not in (None, "coverage", "hpd", "nll"):
            raise ValueError(f"temperature_fit must be null, 'coverage', 'hpd' or 'nll', got "
                             f"{h['temperature_fit']!r}")
        if int(h["temperature_windows"]) < 1 or not float(h["temperature_max"]) > 0:
            raise ValueError(f"temperature_windows must be >= 1 and temperature_max > 0, got "
                             f"{h['temperature_windows']} and {h['temperature_max']}")
        if int(h["smc_moves"]) < 1 or not 0 < float(h["smc_ess"]) < 1:
            raise ValueError(f"smc_moves must be >= 1 and 0 < smc_ess < 1, got {h['smc_moves']} and {h['smc_ess']}")
        if h["smc_space"] not in ("base", "state"):
            raise ValueError(f"smc_space must be 'base' or 'state', got {h['smc_space']!r}")
        self._check_tails("ref_tails")
        self.tails_record: dict[str, Any] | None = None
        self._proposal_kind(h["proposal"])
        self.encoder = WindowEncoder(self.state_shape, self.obs_shape, self.lags, self.lift, channels=h["channels"],
                                     depth=h["depth"], kernel_size=h["kernel_size"], features=0,
                                     emb_features=h["emb_features"], aggregate=h["aggregate"])
        self.ratio = RatioNet(self.state_shape, h["channels"], h["ratio_channels"],
                              h["ratio_depth"], h["ratio_kernel"])
        sc = self.encoder.state_channels
        self.proposal_head = periodic_conv(self.encoder.dim, h["channels"], 2 * sc, 3)
        nn.init.zeros_(self.proposal_head.weight)
        nn.init.zeros_(self.proposal_head.bias)
        self.flow = None
        if h["reference"] == "flow":
            self.flow = GridFlow(self.state_shape, h["channels"], h["ref_transforms"], list(h["ref_hidden"]),
                                 int(h["ref_kernel"]), h["ref_levels"])
        D = self.event_size
        self.register_buffer("marginal_tril", torch.ones(D) if h["marginal"] == "diag" else torch.eye(D))
        self.marginal_flow = None
        if h["marginal"] == "flow":  # unconditional: a constant (zero) context map, so translation-invariant
            self.marginal_flow = GridFlow(self.state_shape, 1, h["ref_transforms"], list(h["ref_hidden"]),
                                          int(h["ref_kernel"]), h["ref_levels"])
            self.register_buffer("marginal_context", torch.zeros(1, 1, *self.encoder.grid))

    # -- pieces ------------------------------------------------------------------------------------------------
    def fit_standardization(self, data: WindowDataset, max_windows: int = 20000, seed: int = 0) -> None:
        """The standardization of the base class, and the Gaussian state marginal ``N(0, C)`` of standardized
        states (``C`` a correlation matrix shrunk by ``shrinkage`` towards the identity, or its diagonal)."""
        super().fit_standardization(data, max_windows, seed)
        g = torch.Generator().manual_seed(seed)
        idx = IndexPermutation(len(data), g)[:min(len(data), max_windows)]
        x = ((data.get(idx)[0].double() - self.x_mean.double()) / self.x_std.double()).flatten(1)
        if self.hparams["marginal"] == "diag":
            self.marginal_tril.copy_(x.std(0))
            return
        C = torch.cov(x.T).reshape(self.event_size, self.event_size)
        lam = float(self.hparams["shrinkage"])
        C = (1 - lam) * C + lam * torch.diag(C.diagonal())
        self.marginal_tril.copy_(torch.linalg.cholesky(C))
        if self.marginal_flow is not None:
            self._fit_marginal_flow(x.to(self.x_mean.dtype), int(self.hparams["marginal_steps"]), g)

    def _fit_marginal_flow(self, x: Tensor, steps: int, generator: torch.Generator, batch_size: int = 256) -> None:
        """Maximum likelihood of the marginal flow on standardized flat states ``x`` ``(N, D)``: ``steps`` Adam steps
        (cosine schedule), then frozen (the ratio losses do not train it)."""
        flow = self.marginal_flow
        flow.requires_grad_(True)
        opt = torch.optim.Adam(flow.parameters(), lr=2e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        x = x.to(self.marginal_context.device)
        for _ in range(steps):
            idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=generator)
            loss = -self.marginal_log_prob(x[idx.to(x.device)]).mean() / x.shape[-1]
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(flow.parameters(), 1.0)
            opt.step()
            sched.step()
        flow.requires_grad_(False)

    def marginal_log_prob(self, x: Tensor) -> Tensor:
        """Log-density of the fitted marginal at standardized flat states ``(..., D)`` -> ``(...)``."""
        if self.marginal_flow is not None:
            flat = x.reshape(-1, x.shape[-1])
            dist = self.marginal_flow(self.marginal_context.expand(len(flat), *self.marginal_context.shape[1:]))
            return dist.log_prob(flat).reshape(x.shape[:-1])
        L = self.marginal_tril
        if L.dim() == 1:
            z = x / L
            logdet = L.log().sum()
        else:
            z = torch.linalg.solve_triangular(L, x.reshape(-1, x.shape[-1]).T, upper=False).T.reshape(x.shape)
            logdet = L.diagonal().log().sum()
        return -0.5 * z.square().sum(-1) - logdet - 0.5 * x.shape[-1] * _LOG_2PI

    def precision_floor(self) -> float:
        """The smallest precision of the fitted state marginal (standardized units): the floor of the Laplace
        proposal's precisions, so that no direction of the proposal is wider than the prior. Where the classifier is
        flat or convex, a lower floor makes the proposal far too wide: on ``lorenz96`` K=40 after 25 minutes of
        training (40 windows x 200 samples), a floor of 0.01 gave samples with RMSE 7.0 and a MALA acceptance of
        0.014; this floor (0.42 there) RMSE 2.45 and 0.52."""
        L = self.marginal_tril
        var = L.square() if L.dim() == 1 else torch.linalg.eigvalsh(L @ L.T)
        return float(1.0 / var.max())

    def _proposal(self, hmap: Tensor) -> tuple[Tensor, Tensor]:
        """Location and scale ``(B, D)`` of the per-cell location-scale head over standardized flat states."""
        loc, raw = self.proposal_head(hmap).chunk(2, dim=1)
        return loc.flatten(1), F.softplus(raw + _SOFTPLUS_ONE).flatten(1) + 1e-3

    def reference(self, hmap: Tensor) -> Distribution:
        """The reference density ``g(z~ | y, t)`` of standardized flat states given a context map ``(B, C, *grid)``:
        ``z~ = m + s * u`` with ``u`` the grid flow's (or a standard normal), batch ``(B,)``, event ``(D,)``."""
        loc, scale = self._proposal(hmap)
        if self.flow is None:
            return Independent(Normal(loc, scale), 1)
        flow = with_student_t_base(self.flow(hmap), self._ref_df())
        return TransformedDistribution(flow, [AffineTransform(loc, scale, event_dim=1)])

    def _ref_df(self) -> float | None:
        """Degrees of freedom of the reference's base: ``ref_tails`` for a flow reference, ``None`` (a standard normal)
        otherwise."""
        nu = self.hparams["ref_tails"]
        return None if nu is None or self.flow is None else float(nu)

    def _base_noise(self, n: int, b: int, generator: torch.Generator | None, like: Tensor) -> Tensor:
        """Draws ``(n, b, D)`` of the reference's base (a standard normal, or the unit-covariance Student-t of
        :meth:`_ref_df`), as float tensors like ``like``, from ``generator``."""
        xi = torch.randn(n, b, self.event_size, generator=generator, device=like.device, dtype=like.dtype)
        nu = self._ref_df()
        if nu is None:
            return xi
        return xi * student_t_mixing(nu, (n, b, 1), generator, like.device).sqrt().to(like.dtype)

    def _base_log_prob(self, u: Tensor) -> Tensor:
        """Log-density ``(...)`` of the reference's base at ``u`` ``(..., D)``, up to a constant."""
        nu = self._ref_df()
        if nu is None:
            return -0.5 * u.square().sum(-1)
        return IsotropicStudentT.unit(u.new_zeros(1, u.shape[-1]), nu).log_prob_at_distance(u.square().sum(-1))

    def reference_mode(self, hmap: Tensor, ref: Distribution | None = None) -> Tensor:
        """The image of the base's mode under the reference (its mode for the diagonal Gaussian): ``(B, D)``, the
        start of the Newton steps."""
        ref = self.reference(hmap) if ref is None else ref
        if self.flow is None:
            return ref.mean
        base = ref.base_dist
        u = base.transform.inv(base.base.mean)
        return ref.transforms[0](u)

    def log_posterior(self, z: Tensor, context: Tensor, ref: Distribution, tau: float = 1.0) -> Tensor:
        """Unnormalized log-posterior ``tau f(z~, y) + log g(z~ | y)`` of standardized flat states ``(..., B, D)``
        given the classifier's context ``(B, C, *grid)`` and the reference ``g`` (:meth:`reference`): ``(..., B)``
        (``tau``: the ratio's temperature, 1 in training; at 0 the classifier is not evaluated)."""
        if tau == 0:
            return ref.log_prob(z)
        f = self.ratio(z, context)
        return (f if tau == 1.0 else tau * f) + ref.log_prob(z)

    def log_ratio(self, z: Tensor, context: Tensor, ref: Distribution) -> Tensor:
        """Log posterior-to-marginal ratio ``log r = log q(z~ | y) - log p^(z~)`` ``(..., B)`` (the classifier's
        logit in the NRE loss)."""
        return self.log_posterior(z, context, ref) - self.marginal_log_prob(z)

    def loss(self, batch: Batch) -> Tensor:
        """Ratio loss (NRE or BNRE, from lampe) + ``contrast_weight`` x the cross-entropy against reference draws +
        ``proposal_weight`` x the reference's negative log-likelihood per cell.

        The classifier sees the positives, lampe's shuffled negatives and the reference draws in one batch, and the
        reference's log-density at the positives is that of its likelihood term, held fixed: one classifier pass
        and one flow pass fewer than evaluating each term on its own (12 % of a training step at K=40).
        """
        hmap, _ = self.encoder(batch.y, batch.mask, batch.t)
        context = self.ratio.context(hmap)
        x = batch.x.flatten(1)
        ref = self.reference(hmap)
        log_g_x = ref.log_prob(x)
        nll = -log_g_x.mean() / x.shape[-1]
        with torch.no_grad():
            x_g = ref.sample()
        f: dict[str, Tensor] = {}

        def log_r(theta: Tensor, ctx: Tensor) -> Tensor:  # theta (2, B, D): lampe's positives and negatives
            out = self.ratio(torch.cat([theta, x_g[None]]), ctx)  # the reference draws ride along
            f["x"], f["g"] = out[0], out[2]
            with torch.no_grad():  # the classifier's terms train f only: g is held fixed in them
                log_g = torch.stack([log_g_x, ref.log_prob(theta[1])])
            return out[:2] + log_g - self.marginal_log_prob(theta)

        if self.hparams["loss"] == "bnre":
            ratio_loss = BNRELoss(log_r, lmbda=float(self.hparams["lmbda"]))(x, context)
        else:
            ratio_loss = NRELoss(log_r)(x, context)
        # the same classifier against draws of the reference: logit f = log q - log g (negatives near the truth)
        contrast = -(F.logsigmoid(f["x"]) + F.logsigmoid(-f["g"])).mean() / 2
        h = self.hparams
        return ratio_loss + float(h["contrast_weight"]) * contrast + float(h["proposal_weight"]) * nll

    # -- inference ---------------------------------------------------------------------------------------------
    def _proposal_kind(self, proposal: str) -> str:
        """``"smc"``, ``"reference"``, ``"laplace"`` or ``"learned"``: the sampler's proposal, with ``"auto"``
        resolved by the kind of reference and the state size."""
        if proposal not in ("auto", "smc", "reference", "laplace", "learned"):
            raise ValueError(f"proposal must be 'auto', 'smc', 'reference', 'laplace' or 'learned', got {proposal!r}")
        if proposal == "auto":
            if self.hparams["reference"] == "flow":
                return "smc"
            return "laplace" if math.prod(self.state_shape) <= LAPLACE_MAX else "learned"
        return proposal

    def make_posterior(self, batch: Batch, steps: int | None = None, inflate: float | None = None,
                       proposal: str | None = None, moves: int | None = None,
                       **kwargs: Any) -> SamplerPosterior:
        """Posterior of standardized windows: samples by tempered SMC from the reference (or by importance
        resampling and MALA), unnormalized density.

        The Laplace fit (Newton steps and Hessians, the costly part) is made at the first :meth:`sample` and kept by
        the posterior object for the next calls.

        Args:
            batch: standardized windows (``x`` is ``None``).
            steps: MALA steps after resampling (default the ``steps`` hyperparameter; 0: importance resampling
                only; not used by ``"smc"``).
            inflate: factor on the Laplace or learned proposal's scales (default the ``inflate`` hyperparameter).
            proposal: ``"smc"``, ``"reference"``, ``"laplace"``, ``"learned"`` or ``"auto"`` (default the
                ``proposal`` hyperparameter).
            moves: MALA moves per temperature of ``"smc"`` (default the ``smc_moves`` hyperparameter).

        Returns:
            A :class:`~sbida.posterior.SamplerPosterior` whose ``log_prob`` is the log-density *up to a constant per
            window* (enough for highest-density regions and ranks; not a normalized log score). The acceptance
            rates of the last draw are in its attribute ``acceptance`` ``(B,)``.
        """
        if kwargs:
            raise ValueError(f"unknown options of NRE.posterior: {sorted(kwargs)}; expected steps, inflate, proposal, "
                             "moves")
        steps = int(self.hparams["steps"] if steps is None else steps)
        inflate = float(self.hparams["inflate"] if inflate is None else inflate)
        moves = int(self.hparams["smc_moves"] if moves is None else moves)
        tau = float(self.hparams["ratio_temperature"])
        if steps < 0 or inflate <= 0 or moves < 1:
            raise ValueError(f"steps must be >= 0, inflate > 0 and moves >= 1, got {steps}, {inflate} and {moves}")
        hmap, _ = self.encoder(batch.y, batch.mask, batch.t)
        context = self.ratio.context(hmap)
        ref = self.reference(hmap)
        loc, scale = self._proposal(hmap)
        B, D = loc.shape
        rows = int(self.hparams["sample_rows"])
        # rows of one evaluation: an activation of the classifier or of a coupling (rows x width x D values) kept near
        # the cache, 2^23 values, which measured twice as fast as 2^26 (larger passes are memory bound)
        width = max([int(self.hparams["ratio_channels"])] + list(self.hparams["ref_hidden"] if self.flow else []))
        rows = min(rows, max(1, 2**23 // (width * D)))
        x_mean, x_std = self.x_mean.reshape(-1), self.x_std.reshape(-1)
        log_jac = x_std.log().sum()
        kind = self._proposal_kind(self.hparams["proposal"] if proposal is None else proposal)
        laplace = kind == "laplace"
        newton = int(self.hparams["newton"])
        cache: dict[str, _Metric] = {}

        def target(j: slice, ref_j: Distribution | None = None):
            ref_j = self.reference(hmap[j]) if ref_j is None else ref_j
            return functools.partial(self.log_posterior, context=context[j], ref=ref_j, tau=tau)

        def metric() -> _Metric:
            """The proposal of all windows: the Laplace fit (made once, in chunks of ``rows / D`` windows), or the
            location-scale head."""
            if "m" not in cache:
                if not laplace:
                    cache["m"] = _Metric(loc, scale)
                else:
                    start = self.reference_mode(hmap, ref)
                    chunk = max(1, rows // D)
                    floor = self.precision_floor()
                    parts = [_laplace(target(slice(i, i + chunk)), start[i:i + chunk], newton, floor)
                             for i in range(0, B, chunk)]
                    cache["m"] = _Metric.cat(parts)
            return cache["m"]

        def from_reference(j: slice, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
            """``n`` draws of windows ``j``: candidates from ``g`` resampled with weights ``exp(f)``, then MALA."""
            m_cand = max(n, REFERENCE_CANDIDATES)
            with torch.no_grad():
                ref_j = self.reference(hmap[j])
                xi = self._base_noise(m_cand, j.stop - j.start, generator, loc)
                cand = _reference_draws(ref_j, xi)
                log_w = tau * self.ratio(cand, context[j])  # log q - log g = tau f
                mass = _empirical_metric(cand, dense=D <= LAPLACE_MAX)
                z = _resample(cand, log_w, n, generator)
            return _mala(target(j, ref_j), z, steps, mass, generator)

        def from_smc(j: slice, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
            """``n`` particles of windows ``j`` moved from ``g`` to ``g e^f`` by tempered SMC."""
            res = self._smc_from_reference(hmap[j], context[j], n, tau, moves, generator)
            return res.particles.detach(), res.acceptance

        def sample_fn(n: int, generator: torch.Generator | None) -> Tensor:
            out, acc = [], []
            chunk = max(1, rows // (max(n, REFERENCE_CANDIDATES) if kind == "reference" else n))
            for i in range(0, B, chunk):
                j = slice(i, min(B, i + chunk))
                if tau == 0:  # the reference alone: its own draws, exact, for every proposal
                    with torch.no_grad():
                        z = _reference_draws(self.reference(hmap[j]), self._base_noise(n, j.stop - j.start,
                                                                                         generator, loc))
                    a = torch.ones(j.stop - j.start, device=loc.device)
                elif kind == "smc":
                    z, a = from_smc(j, max(n, 2), generator)
                    z = z[:n]
                elif kind == "reference":
                    z, a = from_reference(j, n, generator)
                else:
                    m = metric()[j]
                    z, a = _sample_windows(target(j), m.loc, None, n, steps, generator, inflate=inflate, metric=m)
                out.append(z)
                acc.append(a)
            post.acceptance = torch.cat(acc)
            x = torch.cat(out, 1) * x_std + x_mean
            return x.reshape(n, B, *self.state_shape)

        @torch.no_grad()
        def log_prob_fn(x: Tensor) -> Tensor:
            lead = x.shape[:-1 - len(self.state_shape)]
            z = ((x.to(loc.dtype).reshape(-1, B, D)) - x_mean) / x_std
            per = max(1, rows // B)
            lp = torch.cat([self.log_posterior(z[k:k + per], context, ref, tau) for k in range(0, z.shape[0], per)])
            return (lp - log_jac).reshape(*lead, B)

        post = SamplerPosterior(sample_fn, B, self.state_shape, log_prob_fn=log_prob_fn, device=loc.device)
        post.acceptance = None
        return post


    def after_fit(self, train: WindowDataset, val: WindowDataset | None, seed: int, progress: bool = False) -> None:
        """After :meth:`fit`: :meth:`fit_tails` on ``val`` when ``ref_tails_fit`` is set and the reference is a flow,
        then :meth:`fit_temperature` when ``temperature_fit`` names a criterion (nothing without ``val``: the training
        windows' ratio is sharper than held-out windows'; a warning for the temperature). The results are kept in
        ``tails_record`` and ``temperature_record``, the fitted numbers in ``hparams["ref_tails"]`` and
        ``hparams["ratio_temperature"]`` (saved with the model)."""
        self.temperature_record = self.tails_record = None
        h = self.hparams
        if h["ref_tails_fit"] and self.flow is not None and val is not None and len(val) > 0:
            self.tails_record = self.fit_tails(val, windows=int(h["ref_tails_windows"]), seed=seed)
        if h["temperature_fit"] is None or not self._held_out(
                val, "temperature_fit", f"the ratio's temperature stays {h['ratio_temperature']}"):
            return
        self.temperature_record = self.fit_temperature(val, windows=int(h["temperature_windows"]),
                                                       max_temperature=float(h["temperature_max"]),
                                                       criterion=h["temperature_fit"], seed=seed,
                                                       progress=progress)

    def _smc_from_reference(self, hmap: Tensor, context: Tensor, n: int, scale: float, moves: int,
                            generator: torch.Generator | None, record: bool = False,
                            progress: bool = False) -> SMCResult:
        """Tempered SMC of ``n`` particles per window from the reference ``g`` to ``g e^{scale f}``.

        Args:
            hmap: encoder features of the windows ``(B, ...)``.
            context: the classifier's context of those windows (:meth:`RatioNet.context`).
            n: particles per window.
            scale: the ratio's temperature at the end of the path.
            moves: MALA moves per temperature.
            generator: random numbers of the initial draws and of SMC.
            record: keep the path (:func:`sbida.samplers.smc`), with the particles' standardized states.
            progress: show SMC's progress bar.

        Returns:
            The :class:`~sbida.samplers.SMCResult` (particles ``(n, B, D)`` in standardized units).
        """
        ref = self.reference(hmap)
        with torch.no_grad():
            xi = self._base_noise(n, hmap.shape[0], generator, hmap)
        options = dict(moves=moves, ess_fraction=float(self.hparams["smc_ess"]), generator=generator, record=record,
                       progress=progress)
        if self.hparams["smc_space"] == "state":
            with torch.no_grad():
                v0 = _reference_draws(ref, xi)
            return smc(lambda z: (ref.log_prob(z), scale * self.ratio(z, context)), v0,
                       record_state=torch.clone if record else None, **options)
        # over the reference's base variables u, z~ = T(u): the prior is the base (N(0, I), or the Student-t of
        # ref_tails) and the target base(u) e^{b f(T(u))}
        to_state = functools.partial(_reference_draws, ref)
        res = smc(lambda u: (self._base_log_prob(u), scale * self.ratio(to_state(u), context)), xi,
                  record_log_prior=(lambda u: ref.log_prob(to_state(u))) if record else None,
                  record_state=to_state if record else None, **options)
        with torch.no_grad():
            return res._replace(particles=to_state(res.particles))

    def fit_tails(self, data: WindowDataset, windows: int = 4096, seed: int = 0) -> dict[str, Any]:
        r"""Fit the degrees of freedom ``nu`` of a Student-t base of the reference flow ``g`` (``ref_tails``, unit
        covariance, as NPE's :meth:`~sbida.estimators.NPE.fit_tails`) by the likelihood of the true states of
        held-out windows, the network fixed, and set it (``hparams["ref_tails"]``).

        The truths of ``windows`` windows of ``data`` (not training windows) are mapped to the reference's base
        space once; their log-likelihood under the base depends on ``|u|^2`` only, and ``nu`` is fitted by L-BFGS in
        float64 between 3 and 10^6 (Gaussian tails; :func:`sbida.posterior.fit_student_t`). The posterior
        ``g e^{tau f}`` and its sampler use that base: fit the temperature after it (:meth:`after_fit` does).

        Returns:
            ``{"tails", "nll", "nll_gaussian", "windows"}``: the fitted ``nu`` and the mean negative log-likelihood of
            the truths under ``g`` (nats per window, original units) with the fitted base and with the Gaussian one.
        """
        if self.flow is None:
            raise ValueError("fit_tails needs a flow reference (reference='flow'); the diagonal Gaussian has none")
        idx = self._calibration_windows(data, windows, seed, least=2)
        was_training = self.training
        self.eval()
        r2, rest = [], []
        chunk = max(1, int(self.hparams["sample_rows"]) // 64)
        with torch.no_grad():
            for i in range(0, len(idx), chunk):
                x, y, m, t = (a.to(self.device) for a in data.get(idx[i:i + chunk]))
                batch = self.standardize(x, y, m, t)
                hmap, _ = self.encoder(batch.y, batch.mask, batch.t)
                ref = self.reference(hmap)
                z = batch.x.flatten(1)
                v = ref.transforms[0].inv(z)  # the flow's units, then its base's
                u, ladj = ref.base_dist.transform.call_and_ladj(v)
                r2.append(u.double().square().sum(-1))
                rest.append((ladj - ref.transforms[0].log_abs_det_jacobian(v, z) - self.x_std.log().sum()).double())
        fit = fit_student_t(torch.cat(r2), self.event_size, torch.cat(rest))
        self.hparams["ref_tails"] = fit["df"]
        self.train(was_training)
        return {"tails": fit["df"], "nll": fit["nll"], "nll_gaussian": fit["nll_gaussian"], "windows": len(idx)}

    def fit_temperature(self, data: WindowDataset, windows: int = 128, particles: int = 128,
                        moves: int | None = None, max_temperature: float = 1.0,
                        grid: Sequence[float] | Tensor | None = None, criterion: str = "coverage",
                        seed: int = 0, progress: bool = False) -> dict[str, Any]:
        r"""Fit the ratio's temperature :math:`\tau` of the posterior :math:`g\,e^{\tau f}` on held-out windows
        and set it (``hparams["ratio_temperature"]``, used by :meth:`posterior` and its ``log_prob``).

        Temperature scaling of the classifier's logit: below 1 it widens an overconfident ratio. One tempered SMC run
        per window of ``data`` (``windows`` of them, not training windows) moves ``particles`` draws of ``g`` to
        :math:`g\,e^{\tau_{max} f}` with ``moves`` MALA moves per temperature (default the ``smc_moves``
        hyperparameter, the sampler the posterior will use) and keeps its path; every temperature of ``grid``
        (default 41 values from 0 to ``max_temperature``; at 0 the posterior is the reference alone, whose draws need
        no SMC) is then scored from that one run:

        - ``criterion="coverage"``: the sum of the ECEs of both joint coverages of the true states at the levels
          0.05 ... 0.95, by highest density (each truth ranked by :math:`\log g + \tau f` among the particles of the
          last temperature at or below :math:`\tau`, reweighted by :math:`e^{(\tau - b_k) f}`) and by distance (the
          truth's standardized distance to the mean ranked among those particles', resampled by the same weights:
          :func:`~sbida.diagnostics.coverage.distance_credibility`). It calibrates the sampler and the model
          together: the particles are what the posterior draws. The distance statistic guards against a temperature
          that calibrates the density's ranks while the draws collapse away from the truth: on ``lorenz96`` K=40
          (15 epochs into the full budget) the highest-density ECE alone chose 0.85 (test RMSE 2.21, spread/skill
          0.89, ECE-d 0.118), where 0.55 gave 1.81, 0.97 and 0.062 at about the same highest-density ECE
          (``benchmarks/RESULTS.md``).
        - ``criterion="hpd"``: the highest-density ECE alone (the criterion before the distance was added).
        - ``criterion="nll"``: the mean negative log-likelihood of the true states,
          :math:`-\log g(x) - \tau f(x) + \log \mathbb E_g[e^{\tau f}]`, the normalizer from the run's evidence
          (:func:`sbida.samplers.tempered_log_evidence`). Proper, but an SMC run that has not mixed underestimates
          the normalizer of a sharp ratio and so favours a high temperature: on ``lorenz96`` K=40 (10 epochs into the
          full budget) it gave 0.90 with 30 moves and 0.85 with 100, where the coverage of 100 test windows asked
          for about 0.5 (``benchmarks/RESULTS.md``).

        ``progress`` shows the SMC runs' progress bars.

        Returns:
            ``{"temperature", "criterion", "grid", "score", "score_by_statistic", "score_at_1", "windows"}``
            (``score``: ECE (the sum of both for ``"coverage"``) or NLL in nats per window up to a constant, one per
            grid temperature; ``score_by_statistic``: the ECE of each statistic per grid temperature, ``{"hpd": [...],
            "distance": [...]}``, empty for ``"nll"``; ``score_at_1``: at temperature 1).
        """
        idx = self._calibration_windows(data, windows, seed)
        if criterion not in ("coverage", "hpd", "nll"):
            raise ValueError(f"criterion must be 'coverage', 'hpd' or 'nll', got {criterion!r}")
        moves = int(self.hparams["smc_moves"] if moves is None else moves)
        if particles < 2 or moves < 1 or not max_temperature > 0:
            raise ValueError(f"need particles >= 2, moves >= 1 and max_temperature > 0, got {particles}, {moves} and "
                             f"{max_temperature}")
        top = float(max_temperature)
        grid = torch.linspace(0, top, 41, dtype=torch.float64) if grid is None \
            else torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
        if len(grid) == 0 or (grid < 0).any() or (grid > top).any():
            raise ValueError(f"grid must hold temperatures in [0, max_temperature={top}], got {grid.tolist()}")
        full = torch.cat([grid, torch.ones(1, dtype=torch.float64)]) if top >= 1 else grid
        gen = torch.Generator(device=self.device).manual_seed(seed)
        was_training = self.training
        self.eval()
        x, y, m, t = (a.to(self.device) for a in data.get(idx))
        batch = self.standardize(x, y, m, t)
        with torch.no_grad():
            hmap, _ = self.encoder(batch.y, batch.mask, batch.t)
            context = self.ratio.context(hmap)
            zt = batch.x.flatten(1)
            f_true = self.ratio(zt[None], context)[0].double()  # (B,)
            g_true = self.reference(hmap).log_prob(zt).double()
        B, D = zt.shape
        chunk = max(1, int(self.hparams["sample_rows"]) // particles)
        scores = []
        for i in range(0, B, chunk):
            j = slice(i, min(B, i + chunk))
            res = self._smc_from_reference(hmap[j], context[j], particles, top, moves, gen, record=True,
                                           progress=progress)
            scores.append(_temperature_scores(res.path, (full / top).to(zt.dtype), g_true[j], top * f_true[j],
                                              criterion, zt[j], gen))
        score, eces = _temperature_score(torch.cat(scores, -1), criterion)
        score_at_1 = float(score[-1]) if top >= 1 else float("nan")
        score = score[:len(grid)]
        best = int(score.argmin())
        if best == len(grid) - 1 and len(grid) > 1 and top < 4:
            warnings.warn(f"the best temperature is the grid's largest ({float(grid[best]):.3g}): raise "
                          "max_temperature", stacklevel=2)
        tau = float(grid[best])
        self.hparams["ratio_temperature"] = tau
        self.train(was_training)
        by_statistic = {} if eces is None else dict(zip(("hpd", "distance"), eces[:, :len(grid)].tolist()))
        return {"temperature": tau, "criterion": criterion, "grid": grid.tolist(), "score": score.tolist(),
                "score_by_statistic": by_statistic, "score_at_1": score_at_1, "windows": B}


def _temperature_scores(path: list[tuple[Tensor, ...]], s: Tensor, log_p_true: Tensor, ll_true: Tensor,
                        criterion: str, z_true: Tensor | None = None,
                        generator: torch.Generator | None = None) -> Tensor:
    """Per statistic, temperature ``s`` ``(S,)`` and window: the truth's negative log-likelihood under ``p l^s / Z(s)``
    (``"nll"``), its highest-density credibility (``"hpd"``), or both its highest-density and its distance
    credibility (``"coverage"``; the truths' states ``z_true (B, D)`` and a path with states needed), ``(C, S, B)``,
    from an SMC path of ``p`` and ``l`` (``log p`` and ``log l`` of the truths ``(B,)``)."""
    if criterion == "nll":
        nll = -(log_p_true.double() + s.double()[:, None] * ll_true.double()) + tempered_log_evidence(path, s).double()
        return nll[None]
    hpd = _tempered_credibility(path, s, log_p_true, ll_true)
    if criterion == "hpd":
        return hpd[None]
    return torch.stack([hpd, _tempered_distance_credibility(path, s, z_true, generator)])


def _temperature_score(per: Tensor, criterion: str) -> tuple[Tensor, Tensor | None]:
    """The score of each temperature ``(S,)`` from :func:`_temperature_scores` ``(C, S, B)``: the mean NLL, or the
    sum over the statistics of the ECE of their coverage at the levels 0.05 ... 0.95; and those ECEs ``(C, S)``
    (``None`` for ``"nll"``)."""
    if criterion == "nll":
        return per[0].mean(1), None
    levels = default_levels()[:, None]
    eces = torch.stack([(coverage_curve(c.T) - levels).abs().mean(0) for c in per])
    return eces.sum(0), eces


def _tempered_distance_credibility(path: list[tuple[Tensor, ...]], s: Tensor, z_true: Tensor,
                                   generator: torch.Generator | None = None) -> Tensor:
    """Distance credibility ``(S, B)`` of the truths ``z_true (B, D)`` under ``p l^s`` for the temperatures ``s``
    ``(S,)``, from an SMC path with the particles' states: the particles of the last temperature ``b_k <= s``,
    resampled systematically by ``l^(s - b_k)``, as the posterior's draws of
    :func:`~sbida.diagnostics.coverage.distance_credibility`."""
    if len(path[0]) < 5:
        raise ValueError("the distance credibility needs the particles' states: smc(..., record_state=...)")
    bk, _, ll_k, _, z_k = path_at(path, s)  # (S, B), (S, N, B), (S, N, B, D)
    log_w = _log_reweight(s.to(bk.dtype), bk, ll_k)
    out = []
    for i in range(len(s)):
        idx = systematic_resample(log_w[i], generator)  # (N, B)
        draws = torch.gather(z_k[i], 0, idx[..., None].expand(-1, -1, z_k.shape[-1]))
        out.append(moments_and_distance(draws.double(), z_true.double())[2])
    return torch.stack(out)


def _log_reweight(s: Tensor, bk: Tensor, ll_k: Tensor) -> Tensor:
    """Log weights ``(S, N, B)`` that take the particles of the path's temperature ``b_k <= s`` (``bk (S, B)``, their
    log-ratios ``ll_k (S, N, B)``) to the temperature ``s`` ``(S,)``: ``(s - b_k) log l``, zero where ``b_k = s``."""
    step = (s[:, None] - bk)[:, None, :]
    return torch.where(step > 0, step * ll_k, torch.zeros_like(ll_k))


def _tempered_credibility(path: list[tuple[Tensor, ...]], s: Tensor, log_p_true: Tensor, ll_true: Tensor) -> Tensor:
    """Highest-density credibility ``(S, B)`` of the truths under ``p l^s`` for the temperatures ``s`` ``(S,)``, from
    an SMC path (:attr:`sbida.samplers.SMCResult.path`): the weighted share of the particles of the last temperature
    ``b_k <= s``, reweighted by ``l^(s - b_k)``, whose density exceeds the truth's (``log p`` and ``log l`` of the
    truths ``(B,)``)."""
    bk, _, ll_k, lp_k = (a.double() for a in path_at(path, s)[:4])  # (S, B), (S, N, B)
    w = torch.softmax(_log_reweight(s.double(), bk, ll_k), 1)
    s = s.double()[:, None, None]
    above = (lp_k + s * ll_k) > (log_p_true + s[..., 0] * ll_true)[:, None, :]
    return (w * above).sum(1)


class _Metric:
    """A Gaussian's location ``(b, D)`` and square root ``S`` of its covariance ``S S^T``, diagonal ``(b, D)`` or dense
    ``(b, D, D)``: draws ``m + S xi``, whitening ``S^{-1} v`` and ``S S^T v`` for batches ``(..., b, D)``."""

    def __init__(self, loc: Tensor, root: Tensor, inv_root: Tensor | None = None):
        self.loc, self.root, self.inv_root = loc, root, inv_root
        self.dense = root.dim() == 3

    def __getitem__(self, j: slice) -> _Metric:
        return _Metric(self.loc[j], self.root[j], None if self.inv_root is None else self.inv_root[j])

    @staticmethod
    def cat(parts: list[_Metric]) -> _Metric:
        inv = None if parts[0].inv_root is None else torch.cat([p.inv_root for p in parts])
        return _Metric(torch.cat([p.loc for p in parts]), torch.cat([p.root for p in parts]), inv)

    def scatter(self, xi: Tensor) -> Tensor:
        return torch.einsum("...bj,bij->...bi", xi, self.root) if self.dense else xi * self.root

    def whiten(self, v: Tensor) -> Tensor:
        return torch.einsum("...bj,bij->...bi", v, self.inv_root) if self.dense else v / self.root

    def cov(self, v: Tensor) -> Tensor:
        if not self.dense:
            return v * self.root.square()
        return self.scatter(torch.einsum("...bi,bij->...bj", v, self.root))


def _value_and_grad(log_target, z: Tensor) -> tuple[Tensor, Tensor]:
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        lp = log_target(z)
        (grad,) = torch.autograd.grad(lp.sum(), z)
    return lp.detach(), grad


def _hessian(log_target, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Value ``(b,)``, gradient ``(b, D)`` and Hessian ``(b, D, D)`` of ``log_target`` at ``z`` ``(b, D)``: one
    double-backward pass over ``D`` copies of the batch, copy ``i`` giving the Hessian's column ``i``."""
    b, D = z.shape
    with torch.enable_grad():
        zr = z.detach().expand(D, b, D).clone().requires_grad_(True)
        lp = log_target(zr)
        (grad,) = torch.autograd.grad(lp.sum(), zr, create_graph=True)
        eye = torch.eye(D, dtype=z.dtype, device=z.device)[:, None, :]
        (hess,) = torch.autograd.grad((grad * eye).sum(), zr)
    hess = hess.permute(1, 2, 0)  # (b, D_out, D_copy)
    return lp[0].detach(), grad[0].detach(), 0.5 * (hess + hess.transpose(1, 2))


def _laplace(log_target, z: Tensor, iters: int, floor: float = 1e-2) -> _Metric:
    """Laplace approximation of each window's target: the mode, by damped Newton steps from ``z`` ``(b, D)`` (each
    step's length the best of 1, 1/2, 1/4, 1/8 or 0 times the Newton step), and the covariance ``(-H)^{-1}`` at it
    (``H`` the Hessian, its eigenvalues floored at ``-floor``)."""
    alphas = torch.tensor([0.0, 0.125, 0.25, 0.5, 1.0], dtype=z.dtype, device=z.device)
    for k in range(iters + 1):
        lp, grad, hess = _hessian(log_target, z)
        lam, V = torch.linalg.eigh(-hess.double())
        lam, V = lam.clamp_min(floor).to(z.dtype), V.to(z.dtype)
        if k == iters:
            break
        step = torch.einsum("bij,bj->bi", V, torch.einsum("bji,bj->bi", V, grad) / lam)
        with torch.no_grad():
            cand = z + alphas[:, None, None] * step  # (5, b, D)
            best = log_target(cand).nan_to_num(nan=-math.inf).argmax(0)  # (b,)
        z = cand.gather(0, best[None, :, None].expand(1, *z.shape))[0]
    root = V / lam.sqrt()[:, None, :]  # S = V diag(lam^-1/2)
    inv_root = (V * lam.sqrt()[:, None, :]).transpose(1, 2)  # S^{-1} = diag(lam^1/2) V^T
    return _Metric(z.detach(), root, inv_root)


def _sample_windows(log_target, loc: Tensor, scale: Tensor | None, n: int, steps: int,
                    generator: torch.Generator | None, newton: int | None = None,
                    inflate: float = 1.0, metric: _Metric | None = None) -> tuple[Tensor, Tensor]:
    """``n`` draws ``(n, b, D)`` for each of ``b`` windows of an unnormalized ``log_target (..., b, D) -> (..., b)``.

    The proposal is ``N(loc, scale^2)`` (``newton`` ``None``) or the Laplace approximation of the target found by
    ``newton`` Newton steps from ``loc``, or ``metric`` if given (a fit made before); its scales are multiplied by
    ``inflate``. Its draws are importance-resampled
    and moved by ``steps`` MALA steps preconditioned by its covariance. Also returns the mean acceptance rate of each
    window ``(b,)``.
    """
    b, D = loc.shape
    dev, dtype = loc.device, loc.dtype
    if metric is None:
        metric = _Metric(loc, scale) if newton is None else _laplace(log_target, loc, newton)
    with torch.no_grad():
        xi = torch.randn(n, b, D, generator=generator, device=dev, dtype=dtype)
        z = metric.loc + inflate * metric.scatter(xi)
        log_w = log_target(z) + 0.5 * xi.square().sum(-1)  # (n, b)
        z = _resample(z, log_w, n, generator)
    return _mala(log_target, z, steps, metric, generator)


def _resample(z: Tensor, log_w: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """``n`` draws ``(n, b, D)`` per window, multinomially resampled from candidates ``z`` ``(m, b, D)`` with
    unnormalized log-weights ``log_w`` ``(m, b)`` (NaN weights count as zero)."""
    log_w = log_w.nan_to_num(nan=-math.inf)
    idx = torch.multinomial(torch.softmax(log_w.T.double(), -1), n, replacement=True, generator=generator).T
    return z.gather(0, idx[..., None].expand(n, *z.shape[1:]))


def _mala(log_target, z: Tensor, steps: int, metric: _Metric,
          generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """``steps`` MALA steps of the chains ``z`` ``(n, b, D)`` with ``metric``'s covariance as mass matrix, the step size
    of each window adapted towards an acceptance of 0.57 in the first half: the chains and the mean acceptance
    rate of each window ``(b,)`` over the second half."""
    n, b, D = z.shape
    dev, dtype = z.device, z.dtype
    acceptance = torch.zeros(b, dtype=dtype, device=dev)
    if steps == 0:
        return z, acceptance
    # MALA with the proposal's covariance as mass matrix: z' = z + eps^2/2 S S^T grad + eps S xi
    eps = torch.full((b, 1), 1.0 * D ** (-1 / 6), dtype=dtype, device=dev)
    adapt = max(1, steps // 2)
    lp, grad = _value_and_grad(log_target, z)
    kept = torch.zeros(b, dtype=dtype, device=dev)
    for k in range(steps):
        drift = z + 0.5 * eps.square() * metric.cov(grad)
        z_new = drift + eps * metric.scatter(torch.randn(n, b, D, generator=generator, device=dev, dtype=dtype))
        lp_new, grad_new = _value_and_grad(log_target, z_new)
        back = z_new + 0.5 * eps.square() * metric.cov(grad_new)
        log_fwd = -0.5 * (metric.whiten(z_new - drift) / eps).square().sum(-1)
        log_bwd = -0.5 * (metric.whiten(z - back) / eps).square().sum(-1)
        log_alpha = (lp_new - lp + log_bwd - log_fwd).nan_to_num(nan=-math.inf)
        u = torch.rand(n, b, generator=generator, device=dev, dtype=dtype)
        accept = u.log() < log_alpha
        z = torch.where(accept[..., None], z_new, z)
        lp = torch.where(accept, lp_new, lp)
        grad = torch.where(accept[..., None], grad_new, grad)
        rate = accept.to(dtype).mean(0)
        if k < adapt:
            eps = eps * torch.exp(0.5 * (rate - 0.574))[:, None]
        else:
            kept += rate
    acceptance = kept / max(1, steps - adapt)
    return z.detach(), acceptance


def _reference_draws(ref: Distribution, xi: Tensor) -> Tensor:
    """Draws ``(m, b, D)`` of the reference ``g`` from its base noise ``xi`` ``(m, b, D)`` (:meth:`NRE._base_noise`;
    drawn by the caller, so that a generator makes them reproducible): the reference's map ``T`` from its base
    variables, differentiable (the base-space SMC moves ``xi``)."""
    if isinstance(ref, TransformedDistribution):
        flow = ref.base_dist
        return ref.transforms[0](flow.transform.inv(xi))
    return ref.base_dist.loc + ref.base_dist.scale * xi


def _empirical_metric(z: Tensor, dense: bool, shrinkage: float = 0.1) -> _Metric:
    """The mass matrix of draws ``z`` ``(m, b, D)``: their mean and covariance per window, dense (shrunk by
    ``shrinkage`` towards its diagonal) or diagonal."""
    loc = z.mean(0)
    c = z - loc
    var = c.square().mean(0).clamp_min(1e-6)
    if not dense:
        return _Metric(loc, var.sqrt())
    cov = torch.einsum("mbi,mbj->bij", c, c) / max(1, z.shape[0] - 1)
    cov = (1 - shrinkage) * cov + shrinkage * torch.diag_embed(var)
    lam, V = torch.linalg.eigh(cov.double())
    lam, V = lam.clamp_min(1e-6).to(z.dtype), V.to(z.dtype)
    return _Metric(loc, V * lam.sqrt()[:, None, :], (V / lam.sqrt()[:, None, :]).transpose(1, 2))

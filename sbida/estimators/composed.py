r"""Composed and guided score estimators: one score network of single observations, combined at sampling time.

**Composed** (``mode="composed"``). One network predicts the noise of ``p_s(x | y_k, l_k, t)`` for a *single*
observation ``y_k`` at lag ``l_k`` of the target (encoded with its lag), and, with the observation dropped (condition
dropout, probability ``p_drop`` in training), of the prior ``p_s(x | t)``. When the observations of a window are
conditionally independent given ``x_t`` (deterministic dynamics),
``p(x | y_{1:T}) \propto p(x)^{1-T} \prod_k p(x | y_k)``, and at diffusion time ``0`` the score is
``sum_k s_k - (T-1) s_prior``. At ``s > 0`` that sum is wrong (diffusion does not commute with products); with
Gaussian approximations ``p(x | y_k) ~ N(m_k, S_k)``, ``p(x) ~ N(m_0, S_0)`` it is exactly corrected by
(Linhart et al., 2024; derived from Tweedie's formula, the diffused posterior's denoiser is a precision-weighted
mean of the single-observation denoisers)

.. math:: \hat\varepsilon = \Lambda_s^{-1} \Big( \sum_k P_{k,s}\, \hat\varepsilon_k + (1 - T) P_{0,s}\,
          \hat\varepsilon_0 \Big), \qquad P_{k,s} = S_k^{-1} + \frac{\mu_s^2}{\sigma_s^2} I, \qquad
          \Lambda_s = \sum_k P_{k,s} + (1 - T) P_{0,s}.

Three kinds of precisions, all from quantities computed once per window. ``precision="diag"``: a
Gaussian head on the same single-observation context predicts the marginal mean and log-variance of ``x`` (trained
by its negative log-likelihood next to the score loss); the precisions are **diagonal**, and the likelihood parts
``S_k^{-1} - S_0^{-1}`` are clipped at zero, so that the weights of the composition sum to one and the prior's is at
most ``T - 1`` in magnitude. (Without the clipping, estimated ``S_k^{-1}`` below ``S_0^{-1}`` made ``Lambda_s``
small or negative; the weights then summed to a negative number, the composed score pushed samples away from the
data, and lorenz96 K=40 samples diverged to RMSE 240.) A residual network's rows take the clipped head as their
Gaussian baseline at sampling (trained beside the unclipped one), so that zero residuals compose to the heads'
closed form exactly at every residual weight. ``precision="full"`` (``"auto"``, the default: full for
1-D states of up to ``FULL_MAX`` cells, diagonal otherwise): the head predicts **full** precisions, the prior's as
``P_0 = diag(exp(-logvar_0)) + V_0^T V_0`` and a single observation's as ``P_0 + V_k^T V_k``, trained by the full
Gaussian negative log-likelihood. The rows ``v_i`` of ``V`` come from a convolution that gives, at each cell ``i``,
a vector over the offsets ``j - i`` (translation equivariant); a linear observation of the cells ``i`` through a
propagator ``G`` has exactly this form (``v_i = g_i / sigma_y`` where cell ``i`` is observed, zero elsewhere), and
the likelihood parts are positive semidefinite by construction. The composition then runs through
:class:`FullComposition`. ``precision="jacobian"``: full precisions read once per window from the Jacobian of each
noise prediction (Tweedie: for ``N(m, S)``, ``d eps / d x_s = sigma_s (mu_s^2 S + sigma_s^2 I)^{-1}``, taken at
``mu_s^2 / sigma_s^2 = PRECISION_SNR``), with the likelihood parts projected on the positive semidefinite cone.
With exact scores a full composition is exact however correlated the cells; on the linear-Gaussian task with exact
Gaussian scores (16 steps) the diagonal one leaves the samples 1.7x too broad (variance), the full one 0.98x. With a
trained network the Jacobian-based precisions are noisy (the prior's precision spans five decades there) and were
worse than the diagonal ones (variance 2.3x against 4.6x). The full head is the better of the three: on the
linear-Gaussian task (4096 trajectories, 16 steps x 1) the diagonal head left the samples 1.90x too broad (ECE 0.34,
C2ST AUC 0.91 after 18 epochs), the full head 1.09x (ECE 0.025, AUC 0.75 after 11 epochs; ``benchmarks/RESULTS.md``).
Network errors of the ``T + 1`` scores add up in the composition, which is the limit of this mode; hence
**the residual parametrization** (``residual=True``, the default): each noise prediction is the exact noise of its
own Gaussian head's distribution diffused to ``s`` (:class:`GaussianNoise`) plus the network's output, so the
network learns only what is not Gaussian, and where the distributions are Gaussian the composition reduces to the
heads' Gaussians composed in closed form (``mode="gaussian"`` at sampling gives that Gaussian directly, with
``log_prob``). Models saved before it load with ``residual=False``. The heads themselves are trained on single
observations, and their small errors add up over the ``T`` observations of a window: hence **the window loss of the
heads** (``window_nll``, weight 1 by default, 0 for models saved before it): the negative log-likelihood of the true
state under the heads composed in closed form over the whole training window, on one window in
``WINDOW_NLL_SHARE`` of each batch (:meth:`ComposedScore.window_nll`). On the linear-Gaussian task, 20 more minutes
of training with it took the composed heads from 0.64 to 0.35 nats from the exact posterior (variance 0.92x to
1.01x), and ``mode="gaussian"`` from ECE 0.154 and C2ST AUC 0.705 to 0.018 and 0.598; trained from scratch with
both (25 minutes), the diffusion sampler met all three targets there (RMSE 1.02x the exact posterior's, ECE 0.034,
AUC 0.55; before them 1.05x, 0.025, 0.75). What errors remain in the heads still add up over the window, and
the closed form comes out too narrow by a factor that varies from window to window; **its calibration**
(:meth:`ComposedScore.fit_gaussian`, at the end of ``fit`` by default) fits a factor on its spread and a Student-t of
the same covariance by the likelihood of held-out truths (lorenz96 K=40, 20 minutes of training: joint ECE 0.137 to
0.018, spread/skill 0.86 to 0.92). The composed sampler of a residual network applies the same calibration to its
Gaussian part: the composition of the heads' noises is exactly the noise of their closed form, which it swaps for the
noise of the closed form with the fitted spread and, per sample, a Student-t variance factor (a Student-t is a
Gaussian scale mixture), so that where the network outputs zero it draws the calibrated closed form
(``calibrated=False`` at sampling: the raw composition). The networks' residuals enter with a weight
(``residual_weight``, fitted on held-out windows by :meth:`ComposedScore.fit_residual_weight` at the end of ``fit``):
on ``lorenz96`` K=40 after 20 minutes of training every share of them narrowed the draws, the fitted weight was 0 and
the sampler the calibrated closed form. At weight 0 the posterior is that closed form drawn exactly (a
:class:`~sbida.posterior.GaussianPosterior`, with ``log_prob``), not by diffusion: the DDIM predictor narrows tight
Gaussians (with the exact noise of ``N(0, v)``, 16 steps and a correction draw variances 0.69 v at ``v = 1e-4``, 0.82 v
at ``1e-3``, 0.94 v at ``1e-2``). Langevin correction steps follow each predictor step. Any
number of observation times, at any lags, may be composed at inference: the window length may differ from training's.

**Guided** (``mode="guided"``). The network is the prior score ``p_s(x | t)`` only, and the likelihood of the window
enters as SDA-style guidance (Rozet & Louppe, 2023) through the denoiser ``x_0(x_s) = (x_s - sigma_s eps_hat)/mu_s``:

.. math:: \nabla_{x_s} \log p(y \mid x_s) \approx \nabla_{x_s} \sum_{k \in R} \sum_{i:\, m_{ki}}
          -\frac{(y_{ki} - (H\, \mathcal{M}^{l_k}(x_0(x_s)))_i)^2}{2 (\sigma_y^2 + \gamma\, \bar\sigma_x^2\,
          \sigma_s^2/\mu_s^2)},

with ``H`` the linear observation operator, ``M^{l}`` the simulator run ``l`` saved states, and ``bar sigma_x^2`` the
mean variance of the state (``sigma_s/mu_s`` is in standardized units). **Which observations** (the set ``R``):
for a *linear* simulator acting on the estimated state (found by testing linearity on random states), every lag whose
propagator is well conditioned (condition number below ``1e6``): past observations ``y_{t+l}``, ``l < 0``, through
the inverse propagator ``A^{l}``, future ones through ``A^{l}``, so a window ending at ``t`` is used whole. For
nonlinear dynamics only lags ``l >= 0``: ``x_{t+l}`` for ``l < 0`` is not a function of ``x_t`` that one can
differentiate stably (backward integration of chaotic or dissipative dynamics blows up), so for windows ending at
``t`` only the last observation guides and the posterior is broader than the full window's; centred windows also use
their future half through the differentiable simulator.

``guidance="tweedie"`` (linear simulators only) replaces ``gamma (sigma_s/mu_s)^2`` by the Tweedie covariance of a
Gaussian prior, ``C_s = (P_0 + mu_s^2/sigma_s^2 I)^{-1}`` with ``P_0`` the precision of the prior's Gaussian head
(residual models: the Gaussian their noise prediction is built on) or else read from the prior network's Jacobian
as above (with a trained residual model the Jacobian's precisions reached the clip at ``1e4`` and the guided
samples turned to NaN), so that with the window's Gaussian likelihood (precision ``F``, information ``u`` of the
standardized state)

.. math:: \nabla_{\hat x_0} \log p(y \mid x_s) = C_s^{-1} (C_s^{-1} + F)^{-1} (u - F \hat x_0),

chained to ``x_s`` through the network's Jacobian: exact for a Gaussian prior (Pi-GDM-like guidance).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..data import WindowDataset
from ..diagnostics.coverage import expected_coverage
from ..diagnostics.scores import energy_score
from ..nn import IsotropicStudentT, ResBlock, SinusoidalEmbedding, WindowEncoder, periodic_conv
from ..posterior import GaussianPosterior, SamplerPosterior, fit_student_t, student_t_mixing
from .base import Batch, Estimator
from .score import ScoreNet, _check_sampler_options, chunked_sampler, pass_rows
from .sde import CosineSchedule, dsm_loss, sample_vp

FULL_MAX = 256  # precision "auto": full matrices up to this state size, diagonal beyond
# (steps, corrections) of the sampler where the hyperparameters leave them None: composed mode evaluates T + 1 scores
# per step, and on lorenz96 K=40 16 x 1 was as accurate as 32 x 2 at a quarter of the cost; guided mode meets the
# linear-Gaussian targets at 32 x 2
SAMPLER_DEFAULTS = {"composed": (16, 1), "guided": (32, 2)}
WINDOW_NLL_SHARE = 8  # the window loss of the heads uses one in this many windows of a training batch
PRECISION_SNR = 4.0  # mu^2 / sigma^2 where the Jacobians of the noise predictions give the precisions

__all__ = ["ComposedScore", "compose_eps", "FullComposition", "GaussianNoise", "denoiser_precision"]


def clip_likelihoods(precision: Tensor) -> Tensor:
    """Diagonal precisions ``(T + 1, ...)`` of ``T`` single-observation posteriors and of the prior (last) with the
    likelihood parts ``S_k^{-1} - S_0^{-1}`` clipped at zero (a likelihood cannot lower the precision)."""
    p0 = precision[-1:]
    return torch.cat([p0 + (precision[:-1] - p0).clamp_min(0), p0])


def compose_eps(eps: Tensor, precision: Tensor, r: Tensor | float, correction: str = "gauss") -> Tensor:
    """Noise prediction of the window posterior from those of single observations and of the prior (diagonal).

    Args:
        eps: ``(T + 1, *batch)`` noise predictions of the ``T`` single-observation posteriors, then of the prior.
        precision: ``(T + 1, *batch)`` (or broadcastable) diagonal precisions ``S_k^{-1}`` of their Gaussian
            approximations (at diffusion time 0, standardized units); ``S_k^{-1} - S_0^{-1}`` is clipped at zero.
        r: ``mu_s^2 / sigma_s^2`` at the current diffusion time.
        correction: ``"gauss"`` (precision-weighted, Linhart et al.) or ``"none"`` (``sum_k eps_k - (T-1) eps_0``).

    Returns:
        ``(*batch)`` the composed noise prediction.
    """
    T = eps.shape[0] - 1
    w = torch.ones(T + 1, dtype=eps.dtype, device=eps.device)
    w[T] = 1 - T
    w = w.reshape(T + 1, *([1] * (eps.dim() - 1)))
    if correction == "none":
        return (w * eps).sum(0)
    # likelihood precisions P_k - P_0 projected on >= 0 (a likelihood cannot lower the precision): the weights then
    # sum to one and the prior's weight is at most T - 1 in magnitude, however noisy the estimated precisions
    p = clip_likelihoods(precision)
    post = p[:T].sum(0) + (1 - T) * p[T]
    return (w * (p + r) * eps).sum(0) / (post + r)


class FullComposition:
    """Gaussian-corrected composition with full precision matrices (exact when every posterior is Gaussian).

    From the precisions ``P_k`` of the ``T`` single-observation posteriors and ``P_0`` of the prior, the likelihood
    precisions ``L_k = P_k - P_0`` are projected on the positive semidefinite cone (a likelihood cannot lower the
    precision; estimated ``P_k`` of a strongly informative prior differ from ``P_0`` by noise in the directions the
    prior pins down), and the composition uses ``P_0 + L_k`` and the window precision ``Lambda = P_0 + sum_k L_k``,
    so that ``P_0 + L_k <= Lambda`` and ``Lambda + r I`` is positive definite. ``Lambda`` is eigendecomposed once.

    Args:
        precision: ``(T + 1, B, D, D)`` symmetric positive definite precisions (standardized units), the prior last.
    """

    def __init__(self, precision: Tensor):
        if precision.dim() != 4 or precision.shape[-1] != precision.shape[-2] or precision.shape[0] < 2:
            raise ValueError(f"expected precisions (T + 1, B, D, D) with T >= 1, got {tuple(precision.shape)}")
        T = precision.shape[0] - 1
        P0 = precision[T]
        d, U = torch.linalg.eigh(0.5 * (precision[:T] - P0 + (precision[:T] - P0).mT))
        L = (U * d.clamp_min(0)[..., None, :]) @ U.mT  # (T, B, D, D), positive semidefinite
        P = torch.cat([P0 + L, P0[None]])
        self.w = torch.ones(T + 1, dtype=precision.dtype, device=precision.device)
        self.w[T] = 1 - T
        lam = P0 + L.sum(0)
        self.eigvals, self.eigvecs = torch.linalg.eigh(0.5 * (lam + lam.mT))  # (B, D), (B, D, D)
        self.weighted = torch.einsum("k,bji,kbjl->kbil", self.w, self.eigvecs, P)  # w_k V^T P_k, (T + 1, B, D, D)

    def __call__(self, eps: Tensor, r: Tensor | float) -> Tensor:
        """Composed noise ``(n, B, D)`` of the noises ``eps (T + 1, n, B, D)`` at ``r = mu_s^2 / sigma_s^2``."""
        z = torch.einsum("kbij,knbj->nbi", self.weighted, eps)
        z = z + r * torch.einsum("bji,nbj->nbi", self.eigvecs, torch.einsum("k,knbj->nbj", self.w, eps))
        return torch.einsum("bij,nbj->nbi", self.eigvecs, z / (self.eigvals + r))


class GaussianNoise:
    r"""The exact noise prediction of Gaussians ``N(m, P^{-1})`` diffused to ``(mu_s, sigma_s)`` (standardized units):

    .. math:: \varepsilon_G(x_s) = \sigma_s\, (\mu_s^2 I + \sigma_s^2 P)^{-1} P\, (x_s - \mu_s m),

    the baseline of the residual parametrization (``residual=True``): the network predicts the difference between
    the noise and this one, so where the distribution is Gaussian and the head exact it has nothing left to learn.
    For ``m = 0, P = I`` it is ``sigma_s x_s``, the baseline of :class:`~sbida.estimators.score.ScoreNet`'s output.

    Args:
        mean: ``(N, D)`` means; precision: ``(N, D)`` diagonal or ``(N, D, D)`` full (symmetric, eigendecomposed
            once; negative eigenvalues are clipped at zero).
    """

    def __init__(self, mean: Tensor, precision: Tensor):
        if precision.shape[:2] != mean.shape or precision.dim() not in (2, 3):
            raise ValueError(f"expected means (N, D) and precisions (N, D) or (N, D, D), got {tuple(mean.shape)} and "
                             f"{tuple(precision.shape)}")
        self.mean = mean
        if precision.dim() == 3:
            p, self.U = torch.linalg.eigh(0.5 * (precision + precision.mT))
            self.p = p.clamp_min(0)
        else:
            self.p, self.U = precision, None
        self._powers: dict[float, Tensor] = {}  # p ** power, computed once per power, not at every diffusion step

    def select(self, rows: Tensor) -> GaussianNoise:
        """The Gaussians of the given rows."""
        out = copy.copy(self)
        out.mean, out.p = self.mean[rows], self.p[rows]
        out.U = None if self.U is None else self.U[rows]
        out._powers = {}
        return out

    def _pow(self, power: float) -> Tensor:
        if power == 1.0:
            return self.p
        if power not in self._powers:
            self._powers[power] = self.p.pow(power)
        return self._powers[power]

    def __call__(self, x: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
        """``eps_G`` of states ``x (n, N, D)`` (row ``j`` of every sample under Gaussian ``j``) at ``mu, sigma``
        broadcastable to ``(n, N, 1)``."""
        return self._apply(x - mu * self.mean, self._gain(mu, sigma, 1.0))

    def widened(self, x: Tensor, mu: Tensor, sigma: Tensor, factor: Tensor | float, power: float = 1.0) -> Tensor:
        """What ``eps_G`` gains when the covariances ``U diag(1/p) U^T`` become ``factor U diag(p^-power) U^T``
        (``factor`` broadcastable to ``(n, N, 1)``): the noise of those Gaussians of the same means, minus
        ``self(x, mu, sigma)`` (one projection for both)."""
        gain = self._gain(mu, sigma, factor, self._pow(power)) - self._gain(mu, sigma, 1.0)
        return self._apply(x - mu * self.mean, gain)

    def _gain(self, mu: Tensor, sigma: Tensor, factor: Tensor | float, p: Tensor | None = None) -> Tensor:
        p = self.p if p is None else p
        return sigma * p / (factor * mu**2 + sigma**2 * p)

    def _apply(self, d: Tensor, gain: Tensor) -> Tensor:
        if self.U is None:
            return gain * d
        return torch.einsum("bij,nbj->nbi", self.U, gain * torch.einsum("bji,nbj->nbi", self.U, d))


def denoiser_precision(eps_fn: Callable[[Tensor, Tensor], Tensor], x0: Tensor, schedule: CosineSchedule,
                       snr: float = 1.0, h: float = 1e-2, rows: int = 65536, max_precision: float = 1e4) -> Tensor:
    r"""Precision of a Gaussian approximation of each distribution from the Jacobian of its noise prediction.

    For ``p = N(m, S)`` diffused to ``(mu, sigma)``, ``eps(x_s) = sigma (mu^2 S + sigma^2 I)^{-1} (x_s - mu m)``, so
    that with ``Q = sym(d eps / d x_s) / sigma`` (Tweedie's second moment), ``S^{-1} = mu^2 Q (I - sigma^2 Q)^{-1}``.
    The Jacobian is taken by central differences at ``x_s = mu x0`` and the diffusion time where
    ``mu^2 / sigma^2 = snr``; eigenvalues of ``Q`` are clipped to ``(0, 1 / sigma^2)`` (a precision at most
    ``max_precision``).

    Args:
        eps_fn: ``(x_s (M, D), rows (M,), s (M,)) -> (M, D)``: noise prediction of distribution ``rows[i]`` (an
            index in ``0..N-1``) at row ``i``.
        x0: ``(N, D)`` a central state of each distribution (standardized units), e.g. its mean.
        schedule: the diffusion schedule.
        snr: ``mu^2 / sigma^2`` where the Jacobian is taken.
        h: finite-difference step.
        rows: rows per network call.
        max_precision: largest eigenvalue of a returned precision.

    Returns:
        ``(N, D, D)`` symmetric positive definite precisions.
    """
    N, D = x0.shape
    theta = math.atan(1 / math.sqrt(snr))
    s = (theta - schedule.theta_min) / (schedule.theta_max - schedule.theta_min)
    mu, sigma = math.cos(theta), math.sin(theta)
    eye = torch.eye(D, dtype=x0.dtype, device=x0.device)
    xs = mu * x0[:, None] + h * torch.cat([eye, -eye])[None]  # (N, 2D, D)
    rowsel = torch.arange(N, device=x0.device).repeat_interleave(2 * D)
    flat = xs.reshape(N * 2 * D, D)
    out = torch.cat([eps_fn(flat[i:i + rows], rowsel[i:i + rows], torch.full((len(flat[i:i + rows]),), s,
                                                                               dtype=x0.dtype, device=x0.device))
                     for i in range(0, len(flat), rows)]).reshape(N, 2, D, D)
    J = ((out[:, 0] - out[:, 1]) / (2 * h)).mT  # J[n, i, j] = d eps_i / d x_j
    Q = 0.5 * (J + J.mT) / sigma
    q, U = torch.linalg.eigh(Q.double())
    qmax = (1 - mu**2 / (sigma**2 * max_precision + mu**2)) / sigma**2  # q at the largest precision
    q = q.clamp(min=1e-6, max=qmax)
    p = mu**2 * q / (1 - sigma**2 * q)
    P = (U * p[:, None]) @ U.mT
    return (0.5 * (P + P.mT)).to(x0.dtype)


class ComposedScore(Estimator):
    """Score network of single observations and of the prior, composed over a window or guided by its likelihood.

    Hyperparameters (``ComposedScore.defaults``): ``mode`` (``"composed"`` or ``"guided"``), ``p_drop`` (condition
    dropout), ``correction`` (``"gauss"``: Linhart et al.'s Gaussian correction, or ``"none"``: the plain sum),
    ``precision`` (``"diag"``, ``"full"``: a full-precision Gaussian head, ``"auto"``: full for 1-D states up to
    ``FULL_MAX`` cells, or ``"jacobian"``: full precisions from the network's Jacobians; see the module), ``gamma``
    (guidance variance factor), ``guidance`` (``"sda"``, ``"tweedie"`` or ``"auto"``: tweedie for linear
    simulators), encoder ``channels``, ``depth``, ``kernel_size``, ``features``, ``emb_features``; U-Net
    ``unet_channels``, ``blocks``; sampler ``steps``, ``corrections`` (``None``: by the sampling mode, 16 x 1
    composed, 32 x 2 guided; ``SAMPLER_DEFAULTS``), ``tau``; schedule ``sigma_min``,
    ``mu_min``; ``sample_rows`` (rows of one sampling pass at most, :func:`~sbida.estimators.score.pass_rows`);
    ``residual`` (composed mode: the network predicts the residual from its Gaussian
    head's noise); ``window_nll`` (composed mode: weight of the heads' negative log-likelihood composed over whole
    training windows, :meth:`window_nll`). A model trained in composed mode also samples in guided mode (its prior
    score) and, as the closed-form composition of its Gaussian heads, in mode ``"gaussian"``; ``posterior_mode``
    (``None``: the training mode) is the mode of :meth:`posterior` when no ``mode`` is given. The calibration of
    mode ``"gaussian"``: ``gaussian_scale`` (a factor on its spread), ``gaussian_power`` (a power ``gamma`` on the
    eigenvalues of its covariance in standardized units, which spreads them apart for ``gamma > 1``) and
    ``gaussian_tails`` (``None``, or the degrees of freedom ``nu > 2`` of a Student-t of the same mean and
    covariance), fitted on held-out windows (the power only with ``gaussian_power_fit``) by
    :meth:`fit_gaussian`, at the end of :meth:`fit` when ``gaussian_fit`` is set and ``fit`` has validation windows
    (``gaussian_windows`` of them; composed mode only). ``residual_weight``: the composed sampler of a residual
    network draws with its heads' calibrated closed form plus this weight times the composition of the networks'
    residuals (1: as trained, 0: the calibrated closed form, drawn exactly as in mode ``"gaussian"``), fitted on
    held-out windows by :meth:`fit_residual_weight` at the end of :meth:`fit` when ``residual_weight_fit`` is set
    (``residual_weight_windows`` windows x ``residual_weight_samples`` draws).

    Args:
        task: the task (its simulator is kept, unregistered, for guidance through the dynamics).
        simulator: the dynamics of guided mode (default the task's); ``every``: simulator steps per saved state.
    """

    needs_task = True
    defaults: dict[str, Any] = {
        "mode": "composed", "p_drop": 0.2, "correction": "gauss", "precision": "auto", "gamma": 1.0,
        "guidance": "auto",
        "channels": 32, "depth": 2, "kernel_size": 5, "features": 64, "emb_features": 32,
        "unet_channels": [16, 32], "blocks": 1, "steps": None, "corrections": None, "tau": 0.4,
        "sigma_min": 1e-3, "mu_min": 2e-2, "sample_rows": 8192, "residual": True, "window_nll": 1.0,
        "posterior_mode": None, "gaussian_scale": 1.0, "gaussian_tails": None, "gaussian_power": 1.0,
        "gaussian_fit": True, "gaussian_power_fit": True, "gaussian_windows": 4096, "residual_weight": 1.0,
        "residual_weight_fit": True, "residual_weight_windows": 64, "residual_weight_samples": 32,
    }
    # settings of the posterior only, not of the training (a changed one does not restart an interrupted fit)
    sampler_hparams = frozenset({"steps", "corrections", "tau", "sample_rows", "posterior_mode", "gaussian_scale",
                                 "gaussian_tails", "gaussian_power", "gaussian_fit", "gaussian_power_fit",
                                 "gaussian_windows", "residual_weight", "residual_weight_fit",
                                 "residual_weight_windows", "residual_weight_samples"})
    # models saved before the residual parametrization and before the window loss of the heads
    legacy_hparams = {"residual": False, "window_nll": 0.0}

    def __init__(self, task: Any = None, *, simulator: nn.Module | None = None, every: int | None = None,
                 **kwargs: Any):
        super().__init__(task, **kwargs)
        sim = simulator if simulator is not None else (task.simulator if task is not None else None)
        self.__dict__["simulator"] = copy.deepcopy(sim)  # not a submodule: not in the state dict
        self.every = int(every if every is not None else (task.config.data.save_every if task is not None else 1))
        self.sigma_y = float(task.observation.sigma) if task is not None else None
        self._call_lags: list[int] | None = None

    def build(self) -> None:
        h = self.hparams
        if h["mode"] not in ("composed", "guided"):
            raise ValueError(f"mode must be 'composed' or 'guided', got {h['mode']!r}")
        _check_sampler_options(h["steps"], h["corrections"], h["tau"])
        if h["correction"] not in ("gauss", "none"):
            raise ValueError(f"correction must be 'gauss' or 'none', got {h['correction']!r}")
        if h["precision"] not in ("auto", "full", "diag", "jacobian"):
            raise ValueError(f"precision must be 'auto', 'full', 'diag' or 'jacobian', got {h['precision']!r}")
        if h["guidance"] not in ("sda", "tweedie", "auto"):
            raise ValueError(f"guidance must be 'sda', 'tweedie' or 'auto', got {h['guidance']!r}")
        if not 0 <= h["p_drop"] <= 1:
            raise ValueError(f"p_drop must be in [0, 1], got {h['p_drop']}")
        if h["posterior_mode"] not in (None, "composed", "guided", "gaussian") or (
                h["mode"] == "guided" and h["posterior_mode"] not in (None, "guided")):
            raise ValueError(f"posterior_mode must be None, 'guided' or (composed mode) 'composed' or 'gaussian', got "
                             f"{h['posterior_mode']!r} for mode {h['mode']!r}")
        if not (math.isfinite(float(h["gaussian_scale"])) and float(h["gaussian_scale"]) > 0):
            raise ValueError(f"gaussian_scale must be a finite number > 0, got {h['gaussian_scale']}")
        if h["gaussian_tails"] is not None and not float(h["gaussian_tails"]) > 2:
            raise ValueError(f"gaussian_tails must be None or a number > 2, got {h['gaussian_tails']}")
        if not (math.isfinite(float(h["gaussian_power"])) and float(h["gaussian_power"]) > 0):
            raise ValueError(f"gaussian_power must be a finite number > 0, got {h['gaussian_power']}")
        if not (math.isfinite(float(h["residual_weight"])) and float(h["residual_weight"]) >= 0):
            raise ValueError(f"residual_weight must be a finite number >= 0, got {h['residual_weight']}")
        if int(h["residual_weight_windows"]) < 1 or int(h["residual_weight_samples"]) < 2:
            raise ValueError(f"residual_weight_windows must be >= 1 and residual_weight_samples >= 2, got "
                             f"{h['residual_weight_windows']} and {h['residual_weight_samples']}")
        self.schedule = CosineSchedule(h["sigma_min"], h["mu_min"])
        C = h["channels"]
        if h["mode"] == "composed":
            self.encoder = WindowEncoder(self.state_shape, self.obs_shape, [0], self.lift, channels=C,
                                         depth=h["depth"], kernel_size=h["kernel_size"], features=h["features"],
                                         emb_features=h["emb_features"], aggregate="mean")
            dim = self.encoder.dim
            self.t_embedding = nn.Sequential(SinusoidalEmbedding(h["emb_features"], min_period=0.05, max_period=20.0),
                                             nn.Linear(h["emb_features"], h["emb_features"]), nn.SiLU())
            self.gauss_block = ResBlock(dim, C + 1, C, h["emb_features"], h["kernel_size"])
            self.gauss_head = periodic_conv(dim, C, 2 * self.encoder.state_channels, 3)
            if self._full_head():  # the rows v_i of the likelihood factor, in offsets from their cell i
                self.factor_head = periodic_conv(dim, C, self.state_shape[0], 3)
            self.net = ScoreNet(self.state_shape, C + 1, h["features"], channels=h["unet_channels"],
                                blocks=h["blocks"], emb_features=h["emb_features"], schedule=self.schedule)
        else:
            self.net = ScoreNet(self.state_shape, 1, 0, channels=h["unet_channels"], blocks=h["blocks"],
                                emb_features=h["emb_features"], schedule=self.schedule)

    # -- single-observation contexts ----------------------------------------------------------------------------
    def contexts(self, y: Tensor, mask: Tensor, t: Tensor, lags: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
        """Context map ``(N, C+1, *grid)`` and vector ``(N, F)`` of single observations (zero where dropped).

        Args:
            y, mask: one standardized observation each, ``(N, *obs_shape)``.
            t: standardized times ``(N,)``; lags: ``(N,)``; keep: ``(N,)`` bool, false for the prior.
        """
        N = y.shape[0]
        hmap, vec = self.encoder(y[:, None], mask[:, None], t, lags=lags.to(y.dtype)[:, None])
        k = keep.to(hmap.dtype)
        hmap = hmap * k.reshape(N, *([1] * (hmap.dim() - 1)))
        ind = k.reshape(N, 1, *([1] * (hmap.dim() - 2))).expand(N, 1, *hmap.shape[2:])
        return torch.cat([hmap, ind], 1), vec * k[:, None]

    def _full_head(self) -> bool:
        """Whether the Gaussian head has full precisions (``precision`` "full", or "auto" where it can)."""
        p = self.hparams["precision"]
        ok = self.hparams["mode"] == "composed" and len(self.state_shape) == 1 and self.state_shape[0] <= FULL_MAX
        if p == "full" and not ok:
            raise ValueError(f"precision 'full' needs a composed-mode model of a 1-D state of at most {FULL_MAX} "
                             f"cells, got state shape {self.state_shape}: use 'diag'")
        return p == "full" or (p == "auto" and ok)

    def gaussian(self, ctx: Tensor, t: Tensor, factor: bool = False):
        """Gaussian approximation of the distribution of one context (standardized units).

        Args:
            ctx: ``(N, C+1, *grid)`` contexts (:meth:`contexts`); t: ``(N,)`` standardized times.
            factor: also return the likelihood factor ``V (N, K, K)`` of the full head (``precision="full"``).

        Returns:
            ``mean, logvar`` ``(N, *state)`` (and ``V``). With the full head the precision of a single observation
            is ``P_0 + V^T V`` and that of the prior ``P_0 = diag(exp(-logvar_0)) + V_0^T V_0`` (its own row):
            see :meth:`full_precision`.
        """
        hid = F.silu(self.gauss_block(ctx, self.t_embedding(t)))
        mean, logvar = self.gauss_head(hid).chunk(2, dim=1)
        mean, logvar = mean.reshape(-1, *self.state_shape), logvar.clamp(-12, 6).reshape(-1, *self.state_shape)
        if not factor:
            return mean, logvar
        R = self.factor_head(hid)  # (N, K offsets, K cells): row i of V is R[:, (j - i) mod K, i] over j
        N, K = R.shape[0], R.shape[-1]
        cells = torch.arange(K, device=R.device)
        offsets = (cells[None, :] - cells[:, None]) % K
        return mean, logvar, R.transpose(1, 2).gather(2, offsets.expand(N, K, K)) / math.sqrt(K)

    @staticmethod
    def full_precision(logvar0: Tensor, V0: Tensor, V: Tensor | None = None) -> Tensor:
        """Full precisions ``(..., D, D)`` of the head: the prior's ``diag(exp(-logvar0)) + V0^T V0`` plus, for a
        single observation, its likelihood part ``V^T V`` (positive semidefinite by construction).

        Args:
            logvar0: ``(..., D)``; V0, V: ``(..., K, D)`` factors of the prior and of the observation.
        """
        P = torch.diag_embed(torch.exp(-logvar0)) + V0.mT @ V0
        return P if V is None else P + V.mT @ V

    def loss(self, batch: Batch) -> Tensor:
        """Denoising score matching of single observations (or of the prior), plus the Gaussian head's NLL."""
        B = batch.y.shape[0]
        if self.hparams["mode"] == "guided":
            ctx = batch.y.new_zeros(B, 1, *self._grid())
            return dsm_loss(lambda xs, s: self.net(xs, s, batch.t, ctx), batch.x, self.schedule)
        k = torch.randint(self.T, (B,), device=batch.y.device)
        rows = torch.arange(B, device=batch.y.device)
        keep = torch.rand(B, device=batch.y.device) >= self.hparams["p_drop"]
        lags = torch.as_tensor(self.lags, device=batch.y.device)[k]
        ctx, vec = self.contexts(batch.y[rows, k], batch.mask[rows, k], batch.t, lags, keep)
        if self._full_head():  # the prior's context beside each row: P = P_0 + V^T V (P_0 alone for dropped rows)
            mean, logvar, V = self.gaussian(torch.cat([ctx, torch.zeros_like(ctx)]), batch.t.repeat(2), factor=True)
            P = self.full_precision(logvar[B:], V[B:], V[:B] * keep.to(V.dtype)[:, None, None])
            d = (batch.x - mean[:B]).flatten(1)
            nll = 0.5 * ((d[:, None] @ P @ d[:, :, None]).flatten() - torch.logdet(P)).mean() / d.shape[1]
            base = GaussianNoise(mean[:B].flatten(1).detach(), P.detach()) if self._residual() else None
        else:
            mean, logvar = self.gaussian(ctx, batch.t)
            nll = 0.5 * (logvar + (batch.x - mean).square() * torch.exp(-logvar)).mean()
            base = GaussianNoise(mean.flatten(1).detach(), torch.exp(-logvar).flatten(1).detach()) \
                if self._residual() else None
        loss = dsm_loss(lambda xs, s: self._add_baseline(self.net(xs, s, batch.t, ctx, vec), xs, s, base), batch.x,
                        self.schedule) + nll
        w = float(self.hparams["window_nll"])
        if w > 0:
            loss = loss + w * self.window_nll(batch)
        return loss

    def window_nll(self, batch: Batch) -> Tensor:
        """Negative log-likelihood (per state value) of the true states under the Gaussian heads composed over their
        whole training windows (:meth:`compose_heads`), the heads' second training signal (``window_nll`` weight).

        Trained only on single observations, each head is off by a little and the composition adds the ``T``
        errors up (on the linear-Gaussian task, 55 minutes of training: single-observation heads within 0.1 nats
        of the exact Gaussians, their composition 0.64 nats off and 9 % too narrow). This term fits the
        composition itself, on the same simulated windows; the heads stay single-observation heads, so windows of
        another length still compose. It uses the first ``1 / WINDOW_NLL_SHARE`` of the batch's windows (each costs
        ``T + 1`` head evaluations; with all of them a training step took 6x longer).
        """
        B, T = -(-batch.y.shape[0] // WINDOW_NLL_SHARE), batch.y.shape[1]
        batch = Batch(*(v[:B] for v in batch))
        _, _, _, mean, logvar, full = self._heads(batch, self.lags)
        m, P = self.compose_heads(mean, logvar, full, B, T)
        d = batch.x.flatten(1) - m
        if P.dim() == 2:
            return 0.5 * (P * d.square() - torch.log(P)).mean()
        L = torch.linalg.cholesky(P)
        quad = (L.mT @ d[:, :, None]).square().sum((1, 2))
        return 0.5 * (quad - 2 * torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1)).mean() / d.shape[1]

    @staticmethod
    def compose_heads(mean: Tensor, logvar: Tensor, full: Tensor | None, B: int, T: int) -> tuple[Tensor, Tensor]:
        """The Gaussian heads of a window's ``T`` observations and of the prior composed in closed form
        (standardized units): precision ``sum_k P_k - (T - 1) P_0``, information likewise.

        Args:
            mean, logvar: ``((T + 1) B, *state)`` rows ``(k, b)``, the prior last (:meth:`_heads`).
            full: ``(T + 1, B, D, D)`` precisions of the full head, or ``None`` (diagonal head: the likelihood parts
                ``p_k - p_0`` are clipped at zero, as in the composition of the sampler).

        Returns:
            The mean ``(B, D)`` and the precision, ``(B, D, D)`` (full head) or ``(B, D)`` (diagonal).

        In float32 the full head's sums cancel ``T P_0`` against ``(T - 1) P_0``: on random precisions (D = 40, T = 10)
        the composed mean is off by 3e-4, 0.03 and 1.5 posterior standard deviations at condition numbers 1e2, 1e4
        and 1e6 of ``P_0`` (its variances by 5e-6, 2e-4 and 1.4e-2); the standardized states of ``lorenz96`` have a
        covariance of condition number 5.8.
        """
        mean = mean.flatten(1).unflatten(0, (T + 1, B))  # (T + 1, B, D)
        if full is not None:  # likelihood parts V^T V: positive semidefinite, nothing to clip
            P = full[:T].sum(0) - (T - 1) * full[T]
            h = torch.einsum("kbij,kbj->bi", full[:T], mean[:T]) - (T - 1) * (full[T] @ mean[T, ..., None])[..., 0]
            P = 0.5 * (P + P.mT)
            return torch.cholesky_solve(h[..., None], torch.linalg.cholesky(P))[..., 0], P
        p = torch.exp(-logvar.flatten(1)).unflatten(0, (T + 1, B))
        p = clip_likelihoods(p)
        P = p[:T].sum(0) - (T - 1) * p[T]
        return ((p[:T] * mean[:T]).sum(0) - (T - 1) * p[T] * mean[T]) / P, P

    def _residual(self) -> bool:
        """Whether the network predicts the residual from its Gaussian head's noise (composed mode, ``residual``)."""
        return self.hparams["mode"] == "composed" and bool(self.hparams["residual"])

    def _add_baseline(self, e: Tensor, x: Tensor, s: Tensor, base: GaussianNoise | None) -> Tensor:
        """The noise prediction of a residual network: its output ``e`` (``sigma_s x + mu_s v``) with ``sigma_s x``
        replaced by the Gaussian baseline ``base`` (one Gaussian per row of each sample: ``x (n N, *state)``,
        ``s (n N,)``); ``e`` unchanged when ``base`` is ``None``."""
        if base is None:
            return e
        N, D = base.mean.shape
        xf = x.reshape(-1, N, D)
        mu, sigma = self.schedule.mu(s).reshape(-1, N, 1), self.schedule.sigma(s).reshape(-1, N, 1)
        return e + (base(xf, mu, sigma) - sigma * xf).reshape(e.shape)

    def prior_eps(self, x: Tensor, s: Tensor, t: Tensor) -> Tensor:
        """Noise prediction of the prior ``p_s(x | t)``: ``x (N, *state)``, ``s (N,)``, ``t (N,)`` standardized.

        In composed mode this is the network with its observation dropped (condition dropout), so a composed model
        also samples in guided mode.
        """
        N = x.shape[0]
        if self.hparams["mode"] == "guided":
            return self.net(x, s, t, x.new_zeros(1, 1, *self._grid()).expand(N, 1, *self._grid()))
        C = self.hparams["channels"] + 1
        ctx = x.new_zeros(1, C, *self._grid()).expand(N, C, *self._grid())
        e = self.net(x, s, t, ctx, x.new_zeros(1, self.hparams["features"]).expand(N, -1))
        if not self._residual():
            return e
        if self._full_head():
            mean, logvar, V = self.gaussian(ctx, t, factor=True)
            base = GaussianNoise(mean.flatten(1), self.full_precision(logvar, V))
        else:
            mean, logvar = self.gaussian(ctx, t)
            base = GaussianNoise(mean.flatten(1), torch.exp(-logvar).flatten(1))
        return self._add_baseline(e, x, s, base)

    def _grid(self) -> tuple[int, ...]:
        return self.state_shape if len(self.state_shape) == 1 else self.state_shape[1:]

    # -- inference ------------------------------------------------------------------------------------------------
    def posterior(self, y: Tensor, mask: Tensor, t: Tensor | float, lags: Sequence[int] | None = None,
                  **kwargs: Any):
        """The posterior of a batch of windows (see :meth:`Estimator.posterior`).

        Args:
            lags: lags ``(T',)`` of the given windows when they differ from training's (composed mode composes any
                number of observation times); default the training window's.
            kwargs: ``steps``, ``corrections``, ``tau``, ``correction`` (composed) or ``gamma`` (guided).
        """
        if lags is not None:
            lags = [int(v) for v in lags]
            if not lags or len(set(lags)) != len(lags):
                raise ValueError(f"lags must be distinct integers, got {lags}")
        self._call_lags = lags
        try:
            return super().posterior(y, mask, t, **kwargs)
        finally:
            self._call_lags = None

    def _check_shapes(self, x: Tensor | None, y: Tensor, mask: Tensor, t: Tensor) -> None:
        if self._call_lags is None:
            return super()._check_shapes(x, y, mask, t)
        saved = self.lags
        self.lags = self._call_lags
        try:
            super()._check_shapes(x, y, mask, t)
        finally:
            self.lags = saved

    def make_posterior(self, batch: Batch, steps: int | None = None, corrections: int | None = None,
                       tau: float | None = None, correction: str | None = None, gamma: float | None = None,
                       guidance: str | None = None, mode: str | None = None, calibrated: bool = True,
                       ) -> SamplerPosterior | GaussianPosterior:
        """A :class:`~sbida.posterior.SamplerPosterior` of the windows (no ``log_prob``; at ``residual_weight`` 0 the
        posterior of mode ``"gaussian"``, which the composition then diffuses); with ``mode="gaussian"``
        (composed-mode models) the :class:`~sbida.posterior.GaussianPosterior` of the Gaussian heads composed over
        the window in closed form (precision ``sum_k P_k - (T - 1) P_0``, information likewise): no diffusion, with
        ``log_prob``, and what the composed sampler of a residual network draws where its network outputs zero;
        ``calibrated``: with the fitted ``gaussian_scale`` and ``gaussian_tails`` (:meth:`fit_gaussian`), in mode
        ``"gaussian"`` and on the Gaussian part of a residual network's composed sampler (its heads' closed form,
        with the ``"gauss"`` correction and head precisions; module docstring). ``mode`` defaults to
        ``posterior_mode``, else the training mode."""
        _check_sampler_options(steps, corrections, tau)
        h = self.hparams
        lags = self._call_lags if self._call_lags is not None else self.lags
        mode = (h["posterior_mode"] or h["mode"]) if mode is None else mode
        if mode not in ("composed", "guided", "gaussian") or (mode != "guided" and h["mode"] == "guided"):
            raise ValueError(f"mode must be 'guided' or (for a model trained in composed mode) 'composed' or "
                             f"'gaussian', got {mode!r} for a model trained in {h['mode']!r} mode")
        if mode == "gaussian":
            return self._head_posterior(batch, lags, calibrated)
        if (mode == "composed" and float(h["residual_weight"]) == 0.0
                and self._weighted(h["correction"] if correction is None else correction)):
            # the composition at weight 0 is the heads' closed form diffused: drawn exactly instead (the DDIM
            # predictor narrows tight Gaussians: variance x0.82 at 1e-3 with 16 steps), with its log_prob
            return self._head_posterior(batch, lags, calibrated)
        default_steps, default_corrections = SAMPLER_DEFAULTS[mode]
        steps = int(steps if steps is not None else h["steps"] if h["steps"] is not None else default_steps)
        corrections = int(corrections if corrections is not None else
                          h["corrections"] if h["corrections"] is not None else default_corrections)
        tau = float(h["tau"] if tau is None else tau)
        if mode == "guided":
            gamma = float(h["gamma"] if gamma is None else gamma)
            if gamma < 0:
                raise ValueError(f"gamma must be >= 0, got {gamma}")
            guidance = h["guidance"] if guidance is None else guidance
            if guidance not in ("sda", "tweedie", "auto"):
                raise ValueError(f"guidance must be 'sda', 'tweedie' or 'auto', got {guidance!r}")
            if guidance == "auto":
                guidance = "tweedie" if self.linear_operators(lags) is not None else "sda"

            def make_eps(part: Batch):
                return self._guided(part, lags, gamma) if guidance == "sda" else self._tweedie(part, lags)
        else:
            correction = h["correction"] if correction is None else correction
            if correction not in ("gauss", "none"):
                raise ValueError(f"correction must be 'gauss' or 'none', got {correction!r}")

            def make_eps(part: Batch):
                return self._composed(part, lags, correction, calibrated)
        scores = len(lags) + 1 if mode == "composed" else 1
        rows = max(1, pass_rows(int(h["sample_rows"]), math.prod(self.state_shape), self.device) // scores)
        # windows in groups of at most `rows`, so that a pass of one sample per window stays within its rows
        B = batch.y.shape[0]
        samplers = []
        for i in range(0, B, rows):
            part = Batch(*(None if v is None else v[i:i + rows] for v in batch))
            samplers.append(chunked_sampler(self._draw(make_eps(part), part.y.shape[0], steps, corrections, tau),
                                            part.y.shape[0], rows, self.device))

        def sample(n: int, generator: torch.Generator | None = None) -> Tensor:
            return torch.cat([draw(n, generator) for draw in samplers], dim=1)

        return SamplerPosterior(sample, B, self.state_shape, device=self.device)

    def _draw(self, eps_fn: Callable[..., Callable[[Tensor, Tensor], Tensor]], B: int, steps: int, corrections: int,
              tau: float) -> Callable[[int, torch.Generator | None], Tensor]:
        """``(n, generator) -> (n, B, *state)`` samples in original units, from ``eps_fn(n, generator)`` of ``B``
        windows."""
        def draw(n: int, generator: torch.Generator | None) -> Tensor:
            fn = eps_fn(n, generator)
            with torch.no_grad():
                x = sample_vp(fn, (n * B, *self.state_shape), self.schedule, steps, corrections, tau, generator,
                              self.dtype, self.device)
            return (x.reshape(n, B, *self.state_shape) * self.x_std + self.x_mean).clone()

        return draw

    def _heads(self, batch: Batch, lags: Sequence[int]):
        """Contexts of the ``T`` observations of each window and of the prior, stacked as ``(T + 1) B`` rows ``(k, b)``
        (the prior last), and their Gaussian heads: ``tt (T+1)B``, ``ctx``, ``vec``, ``mean``, ``logvar`` and, with
        the full head, the precisions ``(T + 1, B, D, D)`` (else ``None``)."""
        B, T = batch.y.shape[:2]
        y = torch.cat([batch.y.transpose(0, 1).flatten(0, 1), batch.y[:, 0]])
        m = torch.cat([batch.mask.transpose(0, 1).flatten(0, 1), batch.mask[:, 0]])
        lag = torch.tensor(list(lags) + [0], dtype=self.dtype, device=self.device).repeat_interleave(B)
        keep = torch.arange((T + 1) * B, device=self.device) < T * B
        tt = batch.t.repeat(T + 1)
        ctx, vec = self.contexts(y, m, tt, lag, keep)
        if not self._full_head():
            return (tt, ctx, vec, *self.gaussian(ctx, tt), None)
        mean, logvar, V = self.gaussian(ctx, tt, factor=True)
        V = V.unflatten(0, (T + 1, B))
        P0 = self.full_precision(logvar[T * B:], V[T])
        return tt, ctx, vec, mean, logvar, torch.cat([P0 + V[:T].mT @ V[:T], P0[None]])

    def _head_posterior(self, batch: Batch, lags: Sequence[int], calibrated: bool = True) -> GaussianPosterior:
        """The Gaussian heads composed over each window (mode ``"gaussian"``, see :meth:`make_posterior`); if
        ``calibrated``, the eigenvalues of its covariance (standardized units) to the power ``gaussian_power``, its
        spread times ``gaussian_scale`` and its tails those of ``gaussian_tails``."""
        B, T = batch.y.shape[:2]
        _, _, _, mean, logvar, full = self._heads(batch, lags)
        m, P = self.compose_heads(mean, logvar, full, B, T)
        sd = self.x_std.flatten() * (float(self.hparams["gaussian_scale"]) if calibrated else 1.0)
        df = self.hparams["gaussian_tails"] if calibrated else None
        power = float(self.hparams["gaussian_power"]) if calibrated else 1.0
        m = (m * self.x_std.flatten() + self.x_mean.flatten()).reshape(B, *self.state_shape)
        if P.dim() == 3:
            if power == 1.0:
                cov = torch.linalg.inv(P)
            else:  # P = U diag(p) U^T -> covariance U diag(p^-power) U^T
                p, U = torch.linalg.eigh(0.5 * (P + P.mT))
                cov = (U * p.pow(-power)[..., None, :]) @ U.mT
            return GaussianPosterior(m, cov=0.5 * (cov + cov.mT) * sd[:, None] * sd[None], df=df)
        return GaussianPosterior(m, std=(P.pow(-power / 2) * sd).reshape(B, *self.state_shape), df=df)

    def fit_gaussian(self, data: WindowDataset, windows: int = 4096, seed: int = 0, power: bool | None = None
                     ) -> dict[str, Any]:
        r"""Fit the calibration of mode ``"gaussian"`` on held-out windows and set it (``hparams["gaussian_scale"]``,
        ``hparams["gaussian_power"]`` and ``hparams["gaussian_tails"]``, saved with the model): with the composed
        covariance ``S = U diag(l) U^T`` in standardized units, the calibrated one is ``c^2 U diag(l^gamma) U^T``
        under a Student-t of ``nu`` degrees of freedom, and ``(c, gamma, nu)`` maximise the likelihood of the true
        states of ``windows`` windows of ``data`` (not training windows): ``gamma`` by scipy's bounded scalar search on
        ``log gamma`` in ``[log 1/4, log 4]``, ``c`` and ``nu`` at each ``gamma`` by
        :func:`~sbida.posterior.fit_student_t` on the squared Mahalanobis distances. ``gamma`` stays 1 unless it
        generalizes across trajectories: fitted on the windows of half the trajectories (every other one), it must
        give the other half's truths a higher likelihood than the factor and tails alone fitted on the same half,
        both ways round, and the mean gain per trajectory must pass a one-sided t-test at 1 % (windows of a
        trajectory are correlated, and on the linear-Gaussian task a power fitted on all of them made held-out
        windows less likely). ``power``: fit ``gamma`` (default: the hyperparameter
        ``gaussian_power_fit``, on by default); otherwise ``gamma`` is 1. On the linear-Gaussian model of
        ``tests/test_composed.py`` the check keeps the power out (held-out gains 0.26 and 0.18 nats per window, but
        t = 1.7 over 25 trajectories), where one fitted on all the windows (1.087) had left the test windows'
        truths a little less likely than the raw composition.

        The heads are trained on single observations and their errors add up over the ``T`` of a window, so the
        composition's spread is off by a factor, and by one that varies from window to window (heavier tails); and
        it can be off by more in its wide directions than in its narrow ones, which a common factor cannot fix:
        after 20 minutes of training on ``lorenz96`` K=40 its covariance came out too wide in its narrow directions
        and too narrow in its wide ones (``gamma`` 1.095; spread/skill 0.93 to 0.98 and joint ECE by distance 0.087
        to 0.031 against the factor and tails alone, ``benchmarks/RESULTS.md``).

        Returns:
            ``{"scale", "power", "tails", "nll", "nll_gaussian", "power_gains", "power_t", "windows"}``: the fitted
            ``c``, ``gamma`` and ``nu``, the mean negative log-likelihood of the truths (nats per window, original
            units), calibrated and not, and the two held-out gains of the power (nats per window; ``nan`` for a
            fold without windows; none where the power is not fitted) and their t-statistic over trajectories
            (``None`` where not computed).
        """
        if self.hparams["mode"] != "composed":
            raise ValueError("fit_gaussian needs a model trained in composed mode (its Gaussian heads)")
        idx = self._calibration_windows(data, windows, seed, least=2)
        was_training = self.training
        a2, log_l = [], []  # per window: the truth's squared coordinates along the eigenvectors, log eigenvalues
        sd = self.x_std.flatten().double()
        with torch.no_grad():
            for i in range(0, len(idx), 256):
                x, y, m, t = data.get(idx[i:i + 256])
                post = self.posterior(y, m, t, mode="gaussian", calibrated=False)
                d = (x.flatten(1).double() - post.mean().flatten(1).double()) / sd
                if isinstance(post.dist, torch.distributions.MultivariateNormal):
                    lam, U = torch.linalg.eigh(post.covariance().double() / (sd[:, None] * sd[None]))
                    d = (U.mT @ d[..., None])[..., 0]
                else:
                    lam = (post.std().flatten(1).double() / sd).square()
                a2.append(d.square())
                log_l.append(lam.clamp_min(torch.finfo(torch.float64).tiny).log())
        a2, log_l = torch.cat(a2), torch.cat(log_l)

        D = self.event_size

        def whiten(rows: Tensor, g: float) -> tuple[Tensor, Tensor]:
            """Squared Mahalanobis distances and log-Jacobians (from original units) at power ``g``."""
            return (a2[rows] * (-g * log_l[rows]).exp()).sum(-1), -sd.log().sum() - g / 2 * log_l[rows].sum(-1)

        def fit_at(rows: Tensor, g: float) -> dict[str, float]:
            r2, jac = whiten(rows, g)
            return fit_student_t(r2, D, jac, scale=True)

        def best_power(rows: Tensor) -> float:  # bounded scalar search on log gamma
            from scipy.optimize import minimize_scalar  # imported here: scipy is slow to import

            res = minimize_scalar(lambda lg: fit_at(rows, math.exp(lg))["nll"], method="bounded",
                                  bounds=(math.log(0.25), math.log(4.0)), options={"xatol": 1e-4})
            return math.exp(float(res.x))

        def held_out_nll(rows: Tensor, g: float, fit: dict[str, float]) -> Tensor:
            r2, jac = whiten(rows, g)
            nu, c = fit["df"], fit["scale"]
            t = IsotropicStudentT.unit(r2.new_zeros(1, D), nu)
            return -(t.log_prob_at_distance(r2 / c**2) - D * math.log(c) + jac)

        # the power is kept only where it generalizes: fitted on the windows of half the trajectories, it must raise
        # the likelihood of the other half's truths above what the factor and tails alone give, both ways round, by
        # more than chance across trajectories (one-sided t-test of the per-trajectory mean gains at 1 %)
        fit_power = bool(self.hparams["gaussian_power_fit"] if power is None else power)
        _, traj = data.locate(idx)[0].unique(return_inverse=True)
        fold = traj % 2
        gains, per_window = [], torch.zeros(len(idx), dtype=torch.float64)
        for f in ((0, 1) if fit_power else ()):
            fit_rows, held = (fold != f).nonzero().squeeze(-1), (fold == f).nonzero().squeeze(-1)
            if len(fit_rows) < 2 or len(held) < 1:
                gains.append(float("nan"))
                continue
            g = best_power(fit_rows)
            d = held_out_nll(held, 1.0, fit_at(fit_rows, 1.0)) - held_out_nll(held, g, fit_at(fit_rows, g))
            per_window[held] = d
            gains.append(float(d.mean()))
        K = int(traj.max()) + 1
        t_stat, keep = float("nan"), False
        if fit_power and K >= 4 and all(math.isfinite(x) for x in gains):
            from scipy.stats import ttest_1samp  # imported here: scipy is slow to import

            n = torch.zeros(K, dtype=torch.float64).index_add_(0, traj, torch.ones_like(per_window))
            by_traj = torch.zeros(K, dtype=torch.float64).index_add_(0, traj, per_window) / n
            test = ttest_1samp(by_traj.numpy(), 0.0, alternative="greater")
            t_stat, keep = float(test.statistic), bool(test.pvalue < 0.01)
        rows = torch.arange(len(idx))
        power = best_power(rows) if fit_power and keep and all(x > 0 for x in gains) else 1.0
        plain = fit_at(rows, 1.0)
        fit = plain if power == 1.0 else fit_at(rows, power)
        self.hparams.update(gaussian_scale=fit["scale"], gaussian_power=power, gaussian_tails=fit["df"])
        self.train(was_training)
        return {"scale": fit["scale"], "power": power, "tails": fit["df"], "nll": fit["nll"],
                "nll_gaussian": plain["nll_gaussian"], "power_gains": gains,
                "power_t": t_stat if math.isfinite(t_stat) else None,
                "windows": fit["windows"]}

    def _weighted(self, correction: str | None = None) -> bool:
        """Whether the composed sampler has a Gaussian part and a residual part to weigh (``residual_weight``): a
        residual network composed with the ``"gauss"`` correction (``correction``, default the hyperparameter) and
        head precisions."""
        h = self.hparams
        correction = h["correction"] if correction is None else correction
        return self._residual() and correction == "gauss" and h["precision"] != "jacobian"

    def fit_residual_weight(self, data: WindowDataset, windows: int = 64, samples: int = 32,
                            grid: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), criterion: str = "coverage",
                            margin: float | None = None, seed: int = 0, progress: bool = False) -> dict[str, Any]:
        r"""Fit the weight ``w`` of the residual network's part of the composed sampler on held-out windows and set
        it (``hparams["residual_weight"]``, saved with the model).

        The composed noise of a residual network is the noise of its heads' (calibrated) closed form plus the
        composition of the networks' residuals; the sampler draws with ``closed form + w * residuals``: ``w = 1`` is
        the composition as trained, ``w = 0`` the calibrated closed form (:meth:`fit_gaussian`) drawn by diffusion.
        The residuals carry what is not Gaussian in the single-observation posteriors, but the Gaussian correction
        of the composition is exact only for Gaussians, and the errors of the ``T + 1`` networks add up (the prior's
        with weight ``T - 1``). Every weight of ``grid`` draws ``samples`` per window for ``windows`` windows of
        ``data`` (not training windows) with the same random numbers, and the smallest weight whose score is within
        ``margin`` of the lowest is kept (less of the networks unless more is clearly better: a smaller weight is
        closer to the calibrated closed form and, at 0, some 100 times cheaper to draw):

        - ``criterion="coverage"``: the ECE of the joint coverage by the distance statistic
          (:func:`~sbida.diagnostics.expected_coverage`, ``method="distance"``), the calibration the benchmarks
          report for samplers;
        - ``criterion="energy"``: the energy score (:func:`~sbida.diagnostics.energy_score`), proper, which trades
          calibration for sharpness.

        ``margin`` (default 0.01 for the coverage, 0 for the energy score, in the criterion's units): on the
        linear-Gaussian task (a 15-minute network) the validation ECEs of the five weights were within 0.006 of each
        other for two draws of the windows (0.082 to 0.076, 0.058 to 0.055) and the lowest at 0.5, where on the test
        windows the weight 0 was as accurate and closer to the exact posterior (C2ST AUC 0.684 against 0.712 at 0.5
        and 0.728 at 1) at a hundredth of the cost.

        After 20 minutes of training on ``lorenz96`` K=40 (the defaults: 64 validation windows x 32 samples) the
        residuals made the draws narrower and worse with every weight (distance ECE 0.045, 0.123, 0.187, 0.231 and
        0.271 at 0, 0.25, 0.5, 0.75 and 1; ``benchmarks/RESULTS.md``), and the fitted 0 took the test windows'
        distance ECE from 0.25 to 0.018. Where the fitted weight is 0 the sampler draws the calibrated closed form
        without evaluating the network (1000 samples in 0.2 s instead of 19 s there); ``mode="gaussian"`` gives the
        same distribution directly, with ``log_prob``.

        Returns:
            ``{"weight", "criterion", "grid", "score", "margin", "windows", "samples"}`` (``score``: one per grid
            weight).
        """
        if not self._weighted():
            h = self.hparams
            raise ValueError(f"fit_residual_weight needs a residual network in composed mode with correction 'gauss' "
                             f"and head precisions (mode {h['mode']!r}, residual {h['residual']}, correction "
                             f"{h['correction']!r}, precision {h['precision']!r})")
        if criterion not in ("coverage", "energy"):
            raise ValueError(f"criterion must be 'coverage' or 'energy', got {criterion!r}")
        grid = [float(w) for w in grid]
        if not grid or any(not math.isfinite(w) or w < 0 for w in grid) or samples < 2:
            raise ValueError(f"need a non-empty grid of finite weights >= 0 and samples >= 2, got {grid} and {samples}")
        margin = (0.01 if criterion == "coverage" else 0.0) if margin is None else float(margin)
        if not margin >= 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        idx = self._calibration_windows(data, windows, seed)
        x, y, m, t = data.get(idx)
        was_training, before = self.training, self.hparams["residual_weight"]
        self.eval()
        scores = []
        try:
            for w in tqdm(grid, desc="residual weight", disable=not progress, leave=False):
                self.hparams["residual_weight"] = w
                with torch.no_grad():  # the same random numbers for every weight
                    s = self.posterior(y, m, t, mode="composed").sample(
                        samples, generator=torch.Generator(device=self.device).manual_seed(seed)).cpu()
                scores.append(energy_score(s, x) if criterion == "energy" else
                              expected_coverage(s, x, method="distance").ece)
        finally:
            self.hparams["residual_weight"] = before
            self.train(was_training)
        best = min(w for w, v in zip(grid, scores) if v <= min(scores) + margin)
        self.hparams["residual_weight"] = best
        return {"weight": best, "criterion": criterion, "grid": grid, "score": scores, "margin": margin,
                "windows": len(idx), "samples": samples}

    def after_fit(self, train: WindowDataset, val: WindowDataset | None, seed: int, progress: bool = False) -> None:
        """After :meth:`fit` of a composed-mode model: :meth:`fit_gaussian` on ``val`` when ``gaussian_fit`` is set
        (with the power where ``gaussian_power_fit`` is set; nothing without ``val``), then, for a residual network,
        :meth:`fit_residual_weight` when ``residual_weight_fit`` is set (``residual_weight_windows`` windows x
        ``residual_weight_samples`` samples); the results are kept in ``gaussian_record`` and
        ``residual_weight_record``."""
        self.gaussian_record = self.residual_weight_record = None
        h = self.hparams
        if h["mode"] != "composed" or val is None or len(val) == 0:
            return
        if h["gaussian_fit"]:
            self.gaussian_record = self.fit_gaussian(val, windows=int(h["gaussian_windows"]), seed=seed)
        if h["residual_weight_fit"] and self._weighted():
            self.residual_weight_record = self.fit_residual_weight(
                val, windows=int(h["residual_weight_windows"]), samples=int(h["residual_weight_samples"]), seed=seed,
                progress=progress)

    def _composed(self, batch: Batch, lags: Sequence[int], correction: str, calibrated: bool = False):
        """``(n, generator) -> eps_fn`` of the composed score of ``n`` samples per window; ``calibrated``: a residual
        network's Gaussian part calibrated (:meth:`make_posterior`)."""
        B, T = batch.y.shape[:2]
        tt, ctx, vec, mean, logvar, full = self._heads(batch, lags)
        comp = None  # the full composition (full head or Jacobian precisions), else the diagonal one
        if full is not None and correction == "gauss":
            comp = FullComposition(full)
        prec = torch.exp(-logvar).unflatten(0, (T + 1, B))  # (T+1, B, *state)
        if full is None:  # the likelihood parts p_k - p_0 clipped at zero, as compose_eps and compose_heads clip them
            prec = clip_likelihoods(prec)
        base = None  # the Gaussian baseline of every row (k, b) of a residual network
        if self._residual():  # with the clipped precisions: zero residuals compose to the heads' closed form exactly
            base = GaussianNoise(mean.flatten(1), prec.flatten(0, 1).flatten(1) if full is None else full.flatten(0, 1))
        if correction == "gauss" and self.hparams["precision"] == "jacobian":
            def row_eps(xs: Tensor, rows: Tensor, s: Tensor) -> Tensor:
                xs = xs.reshape(-1, *self.state_shape)
                e = self.net(xs, s, tt[rows], ctx[rows], vec[rows])
                return self._add_baseline(e, xs, s, None if base is None else base.select(rows)).flatten(1)

            comp = FullComposition(denoiser_precision(row_eps, mean.flatten(1), self.schedule, snr=PRECISION_SNR,
                                                      rows=int(self.hparams["sample_rows"])).unflatten(0, (T + 1, B)))
        # the (T + 1) B conditions, rows (k, b): their share of the network computed once, not at every step
        net = self.net.conditioned(tt, ctx, vec)
        c2, nu = float(self.hparams["gaussian_scale"]) ** 2, self.hparams["gaussian_tails"]
        power = float(self.hparams["gaussian_power"])
        weight = float(self.hparams["residual_weight"])
        parts = self._weighted(correction)
        if weight != 1.0 and not parts:
            raise ValueError(f"residual_weight {weight} needs a residual network composed with correction 'gauss' "
                             f"and head precisions (residual {self.hparams['residual']}, correction {correction!r}, "
                             f"precision {self.hparams['precision']!r})")
        calibrate = calibrated and (c2 != 1.0 or nu is not None or power != 1.0)
        gauss = None  # the heads composed over the window: the Gaussian part of a residual network's composition
        if parts and (weight != 1.0 or calibrate):
            gauss = GaussianNoise(*self.compose_heads(mean, logvar, full, B, T))
        window = gauss if calibrate else None

        def make(n: int, generator: torch.Generator | None = None):
            factor = None  # covariance factors of the calibrated Gaussian part, one per sample (n, B, 1)
            if window is not None:
                factor = torch.full((n, B, 1), c2, dtype=self.dtype, device=self.device)
                if nu is not None:
                    factor = factor * student_t_mixing(nu, (n, B, 1), generator, self.device).to(self.dtype)

            def eps_fn(x: Tensor, s: Tensor) -> Tensor:
                mu, sigma = self.schedule.mu(s[0]), self.schedule.sigma(s[0])
                if weight == 0.0:  # the Gaussian part alone: no network to evaluate
                    out = gauss(x.reshape(n, B, -1), mu, sigma).reshape(x.shape)
                else:
                    out = composed(x, s, mu, sigma)
                if factor is None:
                    return out
                # the Gaussian part's noise swapped for that of the calibrated one
                return out + window.widened(x.reshape(n, B, -1), mu, sigma, factor, power).reshape(x.shape)

            def composed(x: Tensor, s: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
                N = x.shape[0]  # rows (i, b) -> (i, k, b), sample-major as the conditioned network wants
                xs = x.reshape(n, 1, B, *self.state_shape).expand(n, T + 1, B, *self.state_shape).flatten(0, 2)
                sr = s[:1].expand((T + 1) * N)
                e = self._add_baseline(net(xs, sr), xs, sr, base)
                e = e.reshape(n, T + 1, B, *self.state_shape).transpose(0, 1)
                r = (mu / sigma).square()
                if comp is not None:
                    out = comp(e.flatten(3), r).reshape(x.shape)
                else:
                    out = compose_eps(e, prec[:, None], r, correction).reshape(x.shape)
                if weight != 1.0:  # the composed residual scaled: Gaussian part + weight (composition - Gaussian part)
                    g = gauss(x.reshape(n, B, -1), mu, sigma).reshape(x.shape)
                    out = g + weight * (out - g)
                return out

            return eps_fn

        return make

    def linear_operators(self, lags: Sequence[int]) -> dict[int, Tensor] | None:
        """Observation operators ``G_l = H A^{l * every}`` ``(M, D)`` of a linear simulator, for each lag ``l``.

        ``None`` unless the simulator is linear (checked on random states) and acts on the estimated state. Past lags
        (``l < 0``) use the inverse propagator, and only where its condition number stays below ``1e6`` (stable
        backward integration); those lags are left out otherwise.
        """
        sim = self.simulator
        if sim is None or tuple(getattr(sim, "state_shape", ())) != self.state_shape:
            return None
        D = math.prod(self.state_shape)
        if D > FULL_MAX:
            return None
        g = torch.Generator().manual_seed(0)
        z = torch.randn(2, *self.state_shape, generator=g, dtype=torch.float64)
        try:
            with torch.no_grad():
                fz = sim.step(z)
                lin = sim.step(z[0] + 2 * z[1]) - fz[0] - 2 * fz[1]
                if not bool(lin.abs().max() <= 1e-8 * fz.abs().max().clamp_min(1e-30)):
                    return None
                A = sim.step(torch.eye(D, dtype=torch.float64).reshape(D, *self.state_shape)).reshape(D, D).T
        except (RuntimeError, TypeError):  # a simulator that only runs in its own dtype: treated as nonlinear
            return None
        A = torch.linalg.matrix_power(A, self.every)
        H = self.lift.double() if self.lift is not None else torch.eye(D, dtype=torch.float64)
        ops = {}
        for lag in lags:
            G = torch.linalg.matrix_power(A, abs(lag))
            if lag < 0:
                if float(torch.linalg.cond(G)) > 1e6:
                    continue
                G = torch.linalg.inv(G)
            ops[lag] = (H @ G).to(self.dtype)
        return ops

    def _tweedie(self, batch: Batch, lags: Sequence[int]):
        """``n -> eps_fn`` of the prior score guided by the window's likelihood with the Tweedie covariance of a
        Gaussian prior (exact for a Gaussian prior and a linear simulator)."""
        ops = self.linear_operators(lags)
        if ops is None:
            raise ValueError("guidance 'tweedie' needs a linear simulator acting on the estimated state (at most "
                             f"{FULL_MAX} values); use guidance 'sda'")
        B, D = batch.y.shape[0], math.prod(self.state_shape)
        sigma_y = self.sigma_y if self.sigma_y is not None else 1.0
        xs_, xm = self.x_std.flatten(), self.x_mean.flatten()
        # Gaussian likelihood of the standardized x_t: precision F (B, D, D) and information u (B, D)
        y_raw = (batch.y * self.y_std + self.y_mean).flatten(2)
        m = batch.mask.flatten(2).to(self.dtype)
        F = torch.zeros(B, D, D, dtype=self.dtype, device=self.device)
        u = torch.zeros(B, D, dtype=self.dtype, device=self.device)
        for j, lag in enumerate(lags):
            if lag not in ops:
                continue
            G = ops[lag] * xs_
            F = F + torch.einsum("md,bm,me->bde", G, m[:, j], G) / sigma_y**2
            u = u + (m[:, j] * (y_raw[:, j] - ops[lag] @ xm)) @ G / sigma_y**2

        def prior_rows(x: Tensor, rows: Tensor, s: Tensor) -> Tensor:
            N = x.shape[0]
            return self.prior_eps(x.reshape(N, *self.state_shape), s, batch.t[rows]).flatten(1)

        if self._residual():  # the prior's Gaussian head, on which its noise prediction is built
            C = self.hparams["channels"] + 1
            ctx = batch.y.new_zeros(1, C, *self._grid()).expand(B, C, *self._grid())
            if self._full_head():
                _, logvar, V0 = self.gaussian(ctx, batch.t, factor=True)
                P0 = self.full_precision(logvar.flatten(1), V0)
            else:
                P0 = torch.diag_embed(torch.exp(-self.gaussian(ctx, batch.t)[1].flatten(1)))
        else:
            P0 = denoiser_precision(prior_rows, batch.y.new_zeros(B, D), self.schedule, snr=PRECISION_SNR,
                                    rows=int(self.hparams["sample_rows"]))
        d, V = torch.linalg.eigh(P0 + F)

        def make(n: int, generator: torch.Generator | None = None):
            t = batch.t.repeat(n)

            def eps_fn(x: Tensor, s: Tensor) -> Tensor:
                mu, sigma = self.schedule.mu(s[0]), self.schedule.sigma(s[0])
                r = (mu / sigma).square()
                with torch.enable_grad():
                    x = x.detach().requires_grad_(True)
                    e = self.prior_eps(x, s, t)
                    x0 = ((x - sigma * e) / mu).reshape(n, B, D)
                    with torch.no_grad():  # d log p(y | x_s) / d x0_hat = (P0 + r)(P0 + F + r)^{-1} (u - F x0_hat)
                        b = u - torch.einsum("bde,nbe->nbd", F, x0)
                        z = torch.einsum("bde,nbe->nbd", V, torch.einsum("bed,nbe->nbd", V, b) / (d + r))
                        g0 = torch.einsum("bde,nbe->nbd", P0, z) + r * z
                    (g,) = torch.autograd.grad((x0 * g0).sum(), x)
                return (e - sigma * g).detach()

            return eps_fn

        return make

    def _guided(self, batch: Batch, lags: Sequence[int], gamma: float):
        """``n -> eps_fn`` of the prior score guided by the likelihood of the reachable observations."""
        sim = self.simulator
        ops = self.linear_operators(lags)
        if ops is not None:
            reach = [(j, lag) for j, lag in enumerate(lags) if lag in ops]
        else:
            reach = [(j, lag) for j, lag in enumerate(lags) if lag == 0]
            if sim is not None and tuple(getattr(sim, "state_shape", ())) == self.state_shape:
                reach += [(j, lag) for j, lag in enumerate(lags) if lag > 0]
        # raw observations (original units) and masks of the guided times
        y_raw = batch.y * self.y_std + self.y_mean
        H = self.lift
        sigma_y = self.sigma_y if self.sigma_y is not None else 1.0
        xvar = float(self.x_std.square().mean())

        def make(n: int, generator: torch.Generator | None = None):
            t = batch.t.repeat(n)
            yy = [(y_raw[:, j].repeat(n, *([1] * (y_raw.dim() - 2))), batch.mask[:, j].repeat(
                n, *([1] * (y_raw.dim() - 2))), lag) for j, lag in reach]

            def eps_fn(x: Tensor, s: Tensor) -> Tensor:
                mu, sigma = self.schedule.mu(s[0]), self.schedule.sigma(s[0])
                with torch.enable_grad():
                    x = x.detach().requires_grad_(True)
                    e = self.prior_eps(x, s, t)
                    if not yy:
                        return e.detach()
                    x0 = ((x - sigma * e) / mu) * self.x_std + self.x_mean
                    var = sigma_y**2 + gamma * xvar * float((sigma / mu) ** 2)
                    ll, state, at = 0.0, x0, 0
                    for yk, mk, lag in sorted(yy, key=lambda a: a[2]):
                        if ops is not None:
                            hx = x0.flatten(1) @ ops[lag].T
                        else:
                            for _ in range((lag - at) * self.every):
                                state = sim.step(state)
                            at = lag
                            hx = state.flatten(1) @ H.T if H is not None else state.flatten(1)
                        r = torch.where(mk.flatten(1), yk.flatten(1) - hx, torch.zeros((), dtype=hx.dtype))
                        ll = ll + r.square().sum() / (-2 * var)
                    (g,) = torch.autograd.grad(ll, x)
                return (e - sigma * g).detach()

            return eps_fn

        return make

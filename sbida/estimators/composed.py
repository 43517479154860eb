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

Here the precisions are **diagonal** (per cell): a Gaussian head on the same single-observation context predicts the
marginal mean and log-variance of ``x`` (trained by its negative log-likelihood next to the score loss), so
``S_k`` costs one pass per window. ``Lambda_s - mu_s^2/sigma_s^2`` (the posterior precision) is floored at the largest
single-observation precision. Langevin correction steps follow each predictor step. Any number of observation
times, at any lags, may be composed at inference: the window length may differ from training's.

**Guided** (``mode="guided"``). The network is the prior score ``p_s(x | t)`` only, and the likelihood of the window
enters as SDA-style guidance (Rozet & Louppe, 2023) through the denoiser ``x_0(x_s) = (x_s - sigma_s eps_hat)/mu_s``:

.. math:: \nabla_{x_s} \log p(y \mid x_s) \approx \nabla_{x_s} \sum_{k \in R} \sum_{i:\, m_{ki}}
          -\frac{(y_{ki} - (H\, \mathcal{M}^{l_k}(x_0(x_s)))_i)^2}{2 (\sigma_y^2 + \gamma\, \bar\sigma_x^2\,
          \sigma_s^2/\mu_s^2)},

with ``H`` the linear observation operator, ``M^{l}`` the simulator run forward ``l`` saved states, and
``bar sigma_x^2`` the mean variance of the state (``sigma_s/mu_s`` is in standardized units). **Choice:** the guided
set ``R`` holds only the observations reachable from ``x_t`` by the forward model, lags ``l >= 0``: ``y_{t+l}`` for
``l < 0`` depends on ``x_{t+l}``, which for chaotic dynamics run forward is not a function of ``x_t`` that one can
differentiate stably (backward integration blows up). For windows ending at ``t`` that is the last observation only,
so the guided posterior is broader than the full window's; centred windows also use their future half through the
differentiable simulator (only when the simulator's state is the estimated state).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn import ResBlock, SinusoidalEmbedding, WindowEncoder, periodic_conv
from ..posterior import SamplerPosterior
from .base import Batch, Estimator
from .score import ScoreNet, _check_sampler_options, chunked_sampler
from .sde import CosineSchedule, dsm_loss, sample_vp

__all__ = ["ComposedScore", "compose_eps"]


def compose_eps(eps: Tensor, precision: Tensor, r: Tensor | float, correction: str = "gauss") -> Tensor:
    """Noise prediction of the window posterior from those of single observations and of the prior.

    Args:
        eps: ``(T + 1, *batch)`` noise predictions of the ``T`` single-observation posteriors, then of the prior.
        precision: ``(T + 1, *batch)`` (or broadcastable) diagonal precisions ``S_k^{-1}`` of their Gaussian
            approximations (at diffusion time 0, standardized units).
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
    post = (precision[:T].sum(0) + (1 - T) * precision[T]).maximum(precision[:T].amax(0))  # floored
    return (w * (precision + r) * eps).sum(0) / (post + r)


class ComposedScore(Estimator):
    """Score network of single observations and of the prior, composed over a window or guided by its likelihood.

    Hyperparameters (``ComposedScore.defaults``): ``mode`` (``"composed"`` or ``"guided"``), ``p_drop`` (condition
    dropout), ``correction`` (``"gauss"``: Linhart et al.'s Gaussian correction, or ``"none"``: the plain sum),
    ``gamma`` (guidance variance factor), encoder ``channels``, ``depth``, ``kernel_size``, ``features``,
    ``emb_features``; U-Net ``unet_channels``, ``blocks``; sampler ``steps``, ``corrections``, ``tau``; schedule
    ``sigma_min``, ``mu_min``; ``sample_rows``.

    Args:
        task: the task (its simulator is kept, unregistered, for guidance through the dynamics).
        simulator: the dynamics of guided mode (default the task's); ``every``: simulator steps per saved state.
    """

    needs_task = True
    defaults: dict[str, Any] = {
        "mode": "composed", "p_drop": 0.2, "correction": "gauss", "gamma": 1.0,
        "channels": 32, "depth": 2, "kernel_size": 5, "features": 64, "emb_features": 32,
        "unet_channels": [16, 32], "blocks": 1, "steps": 16, "corrections": 1, "tau": 0.4,
        "sigma_min": 1e-3, "mu_min": 2e-2, "sample_rows": 8192,
    }

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
        if h["correction"] not in ("gauss", "none"):
            raise ValueError(f"correction must be 'gauss' or 'none', got {h['correction']!r}")
        if not 0 <= h["p_drop"] <= 1:
            raise ValueError(f"p_drop must be in [0, 1], got {h['p_drop']}")
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

    def gaussian(self, ctx: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Marginal mean and log-variance ``(N, *state)`` of the Gaussian approximation of one context."""
        out = self.gauss_head(F.silu(self.gauss_block(ctx, self.t_embedding(t))))
        mean, logvar = out.chunk(2, dim=1)
        return mean.reshape(-1, *self.state_shape), logvar.clamp(-12, 6).reshape(-1, *self.state_shape)

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
        mean, logvar = self.gaussian(ctx, batch.t)
        nll = 0.5 * (logvar + (batch.x - mean).square() * torch.exp(-logvar)).mean()
        return dsm_loss(lambda xs, s: self.net(xs, s, batch.t, ctx, vec), batch.x, self.schedule) + nll

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
                       tau: float | None = None, correction: str | None = None, gamma: float | None = None
                       ) -> SamplerPosterior:
        """A :class:`~sbida.posterior.SamplerPosterior` of the windows (no ``log_prob``)."""
        _check_sampler_options(steps, corrections, tau)
        h = self.hparams
        steps = int(h["steps"] if steps is None else steps)
        corrections = int(h["corrections"] if corrections is None else corrections)
        tau = float(h["tau"] if tau is None else tau)
        lags = self._call_lags if self._call_lags is not None else self.lags
        if h["mode"] == "guided":
            gamma = float(h["gamma"] if gamma is None else gamma)
            if gamma < 0:
                raise ValueError(f"gamma must be >= 0, got {gamma}")
            eps_fn = self._guided(batch, lags, gamma)
        else:
            correction = h["correction"] if correction is None else correction
            if correction not in ("gauss", "none"):
                raise ValueError(f"correction must be 'gauss' or 'none', got {correction!r}")
            eps_fn = self._composed(batch, lags, correction)
        B = batch.y.shape[0]

        def draw(n: int, generator: torch.Generator | None) -> Tensor:
            fn = eps_fn(n)
            with torch.no_grad():
                x = sample_vp(fn, (n * B, *self.state_shape), self.schedule, steps, corrections, tau, generator,
                              self.dtype, self.device)
            return (x.reshape(n, B, *self.state_shape) * self.x_std + self.x_mean).clone()

        return SamplerPosterior(chunked_sampler(draw, B, int(h["sample_rows"]) // (self._rows_per_sample(lags))),
                                B, self.state_shape, device=self.device)

    def _rows_per_sample(self, lags: Sequence[int]) -> int:
        return len(lags) + 1 if self.hparams["mode"] == "composed" else 1

    def _composed(self, batch: Batch, lags: Sequence[int], correction: str):
        """``n -> eps_fn`` of the composed score of ``n`` samples per window."""
        B, T = batch.y.shape[:2]
        # contexts of the T observations and of the prior, stacked as (T + 1) B rows
        y = torch.cat([batch.y.transpose(0, 1).flatten(0, 1), batch.y[:, 0]])
        m = torch.cat([batch.mask.transpose(0, 1).flatten(0, 1), batch.mask[:, 0]])
        lag = torch.tensor(list(lags) + [0], dtype=self.dtype, device=self.device).repeat_interleave(B)
        keep = torch.arange((T + 1) * B, device=self.device) < T * B
        tt = batch.t.repeat(T + 1)
        ctx, vec = self.contexts(y, m, tt, lag, keep)
        _, logvar = self.gaussian(ctx, tt)
        prec = torch.exp(-logvar).unflatten(0, (T + 1, B))  # (T+1, B, *state)
        ctx, vec = ctx.unflatten(0, (T + 1, B)), vec.unflatten(0, (T + 1, B))

        def make(n: int):
            c = ctx[:, None].expand(T + 1, n, *ctx.shape[1:]).flatten(0, 2)  # rows (k, i, b)
            v = vec[:, None].expand(T + 1, n, *vec.shape[1:]).flatten(0, 2)
            t = batch.t.repeat((T + 1) * n)

            def eps_fn(x: Tensor, s: Tensor) -> Tensor:
                N = x.shape[0]
                xs = x[None].expand(T + 1, *x.shape).flatten(0, 1)
                e = self.net(xs, s[:1].expand((T + 1) * N), t, c, v).reshape(T + 1, n, B, *self.state_shape)
                r = (self.schedule.mu(s[0]) / self.schedule.sigma(s[0])).square()
                return compose_eps(e, prec[:, None], r, correction).reshape(x.shape)

            return eps_fn

        return make

    def _guided(self, batch: Batch, lags: Sequence[int], gamma: float):
        """``n -> eps_fn`` of the prior score guided by the likelihood of the reachable observations."""
        B = batch.y.shape[0]
        reach = [(j, lag) for j, lag in enumerate(lags) if lag == 0]
        sim = self.simulator
        if sim is not None and tuple(getattr(sim, "state_shape", ())) == self.state_shape:
            reach += [(j, lag) for j, lag in enumerate(lags) if lag > 0]
        # raw observations (original units) and masks of the guided times
        y_raw = batch.y * self.y_std + self.y_mean
        H = self.lift
        sigma_y = self.sigma_y if self.sigma_y is not None else 1.0
        xvar = float(self.x_std.square().mean())
        ctx0 = batch.y.new_zeros(1, 1, *self._grid())

        def make(n: int):
            t = batch.t.repeat(n)
            ctx = ctx0.expand(n * B, *ctx0.shape[1:])
            yy = [(y_raw[:, j].repeat(n, *([1] * (y_raw.dim() - 2))), batch.mask[:, j].repeat(
                n, *([1] * (y_raw.dim() - 2))), lag) for j, lag in reach]

            def eps_fn(x: Tensor, s: Tensor) -> Tensor:
                mu, sigma = self.schedule.mu(s[0]), self.schedule.sigma(s[0])
                with torch.enable_grad():
                    x = x.detach().requires_grad_(True)
                    e = self.net(x, s, t, ctx)
                    if not yy:
                        return e.detach()
                    x0 = ((x - sigma * e) / mu) * self.x_std + self.x_mean
                    var = sigma_y**2 + gamma * xvar * float((sigma / mu) ** 2)
                    ll, state, at = 0.0, x0, 0
                    for yk, mk, lag in sorted(yy, key=lambda a: a[2]):
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

r"""Posterior score estimation: a conditional diffusion model of ``p(x_t | y_{t-T:t}, t)``.

The window is encoded into a context map ``h`` on the state grid and a vector ``c``; a periodic U-Net takes the
diffused standardized state ``x_s`` with ``h`` as extra input channels, modulated by embeddings of the diffusion time
``s``, of ``t`` and of ``c``, and predicts the noise. It is trained by conditional denoising score matching on the VP
cosine schedule of :mod:`sbida.estimators.sde`,

.. math:: \mathcal{L} = \mathbb{E}_{(x, y, t),\, s = u^\rho,\, u \sim U(0,1),\, \varepsilon}
          \big\| \hat\varepsilon(\mu_s \tilde x + \sigma_s \varepsilon, s \mid y, t) - \varepsilon \big\|^2,
          \qquad \nabla_{x_s} \log p_s(x_s \mid y, t) \approx -\hat\varepsilon / \sigma_s,

and sampled by the DDIM-like predictor with Langevin corrector, batched over windows and samples, then mapped back
to the original units, ``x = mu_x + sigma_x x~``. What depends on the window only is computed once per window, not
once per step and sample: the encoder, the context map's share of the U-Net's (linear) input convolution and the
share of ``t`` and ``c`` in the embedding's first (linear) layer (:meth:`ScoreNet.conditioned`). The posterior has
samples only: no ``log_prob`` (the probability flow ODE would give one, at the cost of a divergence per step; it is
not provided).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn

from ..nn import SinusoidalEmbedding, UNet, WindowEncoder
from ..posterior import SamplerPosterior
from .base import Batch, Estimator
from .sde import CosineSchedule, dsm_loss, sample_vp

__all__ = ["PosteriorScore", "ScoreNet"]


class ScoreNet(nn.Module):
    """Noise prediction ``eps_hat(x_s, s | context map, context vector, t)`` on a periodic U-Net.

    Args:
        state_shape: ``(K,)`` or ``(C, H, W)``.
        context_channels: channels of the context map (on the state grid).
        context_features: size of the context vector (0: none).
        channels: U-Net widths per level.
        blocks: residual blocks per level.
        emb_features: size of the diffusion/physical time embedding.
        kernel_size: odd kernel size.
    """

    def __init__(self, state_shape: Sequence[int], context_channels: int, context_features: int,
                 channels: Sequence[int] = (32, 64), blocks: int = 2, emb_features: int = 64, kernel_size: int = 3,
                 schedule: CosineSchedule | None = None):
        super().__init__()
        self.schedule = schedule or CosineSchedule()
        self.state_shape = tuple(state_shape)
        self.dim = 1 if len(self.state_shape) == 1 else 2
        self.sc = 1 if self.dim == 1 else self.state_shape[0]
        self.emb_features = emb_features
        self.s_embedding = SinusoidalEmbedding(emb_features, min_period=2e-3, max_period=4.0)
        self.t_embedding = SinusoidalEmbedding(emb_features, min_period=0.05, max_period=20.0)
        self.mlp = nn.Sequential(nn.Linear(2 * emb_features + context_features, emb_features), nn.SiLU(),
                                 nn.Linear(emb_features, emb_features), nn.SiLU())
        self.unet = UNet(self.dim, self.sc, self.sc, channels=channels, blocks=blocks, emb_features=emb_features,
                         context_channels=context_channels, kernel_size=kernel_size)

    def embed(self, s: Tensor, t: Tensor, vec: Tensor | None) -> Tensor:
        """The modulating embedding ``(N, E)`` of ``s (N,)``, ``t (N,)`` and ``vec (N, F)``."""
        parts = [self.s_embedding(s), self.t_embedding(t)] + ([] if vec is None else [vec])
        return self.mlp(torch.cat(parts, -1))

    def forward(self, x: Tensor, s: Tensor, t: Tensor, context: Tensor, vec: Tensor | None = None) -> Tensor:
        """``x (N, *state)``, ``s (N,)``, ``t (N,)``, ``context (N, C, *grid)``, ``vec (N, F)`` -> ``(N, *state)``.

        The U-Net predicts ``v = mu_s eps - sigma_s x_0`` (bounded errors in both the noise and the denoised state at
        every noise level); the noise is ``eps_hat = sigma_s x_s + mu_s v_hat``.
        """
        N = x.shape[0]
        v = self.unet(x.reshape(N, self.sc, *context.shape[2:]), self.embed(s, t, vec), context).reshape(x.shape)
        return self._eps(x, s, v)

    def conditioned(self, t: Tensor, context: Tensor, vec: Tensor | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """The noise prediction for ``B`` fixed windows, with what depends on the windows only computed once.

        The context map's share of the U-Net's input convolution and the windows' share (``t``, ``vec``) of the
        embedding's first layer are computed here, once; the returned function adds them to the state's and the
        diffusion time's shares, broadcast over samples. Same values as :meth:`forward` (up to rounding).

        Args:
            t: ``(B,)`` standardized times; context: ``(B, C, *grid)``; vec: ``(B, F)`` or ``None``.

        Returns:
            ``eps(x (n B, *state), s (n B,)) -> (n B, *state)``, rows ordered sample-major (row ``i B + b`` is window
            ``b``).
        """
        B, E = context.shape[0], self.emb_features
        share = self.unet.context_share(context)
        first = self.mlp[0]
        cond = torch.cat([self.t_embedding(t)] + ([] if vec is None else [vec]), -1)
        cond = nn.functional.linear(cond, first.weight[:, E:], first.bias)  # (B, E)
        w_s, rest = first.weight[:, :E], self.mlp[1:]

        def eps(x: Tensor, s: Tensor) -> Tensor:
            N = x.shape[0]
            if N % B or s.shape != (N,):
                raise ValueError(f"expected states (n * {B}, *state) and s (n * {B},), got {tuple(x.shape)} and "
                                 f"{tuple(s.shape)}")
            a = nn.functional.linear(self.s_embedding(s), w_s).unflatten(0, (N // B, B)) + cond
            v = self.unet(x.reshape(N, self.sc, *context.shape[2:]), rest(a.flatten(0, 1)), context_share=share)
            return self._eps(x, s, v.reshape(x.shape))

        return eps

    def _eps(self, x: Tensor, s: Tensor, v: Tensor) -> Tensor:
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return self.schedule.sigma(s).reshape(shape) * x + self.schedule.mu(s).reshape(shape) * v


PASS_VALUES = 2**14  # on a CPU, state values (rows x D) of one sampling pass: see pass_rows
PASS_MIN_ROWS = 16


def pass_rows(limit: int, D: int, device: torch.device) -> int:
    """Rows (samples x windows, x scores of the composed sampler) of one network pass while sampling: at most
    ``limit`` (the ``sample_rows`` hyperparameter, which bounds memory), and on a CPU about ``PASS_VALUES`` state
    values, no fewer than ``PASS_MIN_ROWS`` rows. The U-Net's memory-bound layers (periodic padding, group norm,
    SiLU: half of a pass) then work in the caches: at K=40 on one thread, 1000 samples of one window took 1.4 s in
    passes of 256-512 rows and 2.4 s in one pass of 1000; ComposedScore's 11 scores per sample, 16.5 s in passes of
    about 400 rows against 45 s in passes of 8192 (``benchmarks/RESULTS.md``)."""
    if device.type != "cpu":
        return max(1, limit)
    return max(1, min(limit, max(PASS_MIN_ROWS, PASS_VALUES // D)))


def chunked_sampler(draw: Callable[[int, torch.Generator | None], Tensor], B: int, rows: int,
                    device: torch.device | str = "cpu") -> Callable[[int, torch.Generator | None], Tensor]:
    """Wrap ``draw(m, generator) -> (m, B, ...)`` so that one call draws at most ``rows // B`` samples per window.

    With several passes, each pass gets its own generator, seeded in order from the caller's (or from torch's default
    one): the samples depend on the seed and the pass size, not on the order in which passes run. On a CPU with
    ``torch.get_num_threads() = P > 1``, up to ``P`` passes run at once in a thread pool, each on ``P // workers``
    threads: the U-Net's many small operators scale poorly over threads within one pass (at K=40 on 2 threads,
    ComposedScore's 1000 samples of one window took 6.1 s one pass after the other and 5.2-5.5 s two at a time,
    ``benchmarks/RESULTS.md``).
    """
    per = max(1, rows // B)
    device = torch.device(device)

    def sample(n: int, generator: torch.Generator | None = None) -> Tensor:
        sizes = [min(per, n - i) for i in range(0, n, per)]
        if len(sizes) <= 1:
            return draw(n, generator)
        seeds = torch.randint(2**62, (len(sizes),), generator=generator,
                              device=generator.device if generator is not None else "cpu").tolist()
        gens = [torch.Generator(device=device).manual_seed(int(v)) for v in seeds]
        threads = torch.get_num_threads()
        workers = min(threads, len(sizes)) if device.type == "cpu" else 1
        if workers <= 1:
            return torch.cat([draw(m, g) for m, g in zip(sizes, gens)])
        try:
            with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(threads // workers,)) as ex:
                return torch.cat(list(ex.map(draw, sizes, gens)))
        finally:
            torch.set_num_threads(threads)  # the workers' setting is also the default of threads started later

    return sample


class PosteriorScore(Estimator):
    """Conditional score-based posterior estimator on a periodic U-Net (samples only, no ``log_prob``).

    Hyperparameters (``PosteriorScore.defaults``): encoder ``channels``, ``depth``, ``kernel_size``, ``features``,
    ``emb_features``, ``aggregate``; U-Net ``unet_channels``, ``blocks``; sampler ``steps`` (predictor steps),
    ``corrections`` (Langevin steps per predictor step), ``tau`` (Langevin step scale); schedule ``sigma_min``,
    ``mu_min``; ``loss_rho`` (training diffusion times ``s = u ** loss_rho``); ``sample_rows`` (samples x windows of
    one sampling pass at most, bounds memory; on a CPU passes are smaller, :func:`pass_rows`).
    """

    defaults: dict[str, Any] = {
        "channels": 32, "depth": 2, "kernel_size": 5, "features": 64, "emb_features": 32, "aggregate": "concat",
        "unet_channels": [16, 32], "blocks": 1, "steps": 16, "corrections": 1, "tau": 0.4,
        "sigma_min": 1e-3, "mu_min": 2e-2, "loss_rho": 1.0, "sample_rows": 8192,
    }

    def build(self) -> None:
        h = self.hparams
        self.schedule = CosineSchedule(h["sigma_min"], h["mu_min"])
        self.encoder = WindowEncoder(self.state_shape, self.obs_shape, self.lags, self.lift, channels=h["channels"],
                                     depth=h["depth"], kernel_size=h["kernel_size"], features=h["features"],
                                     emb_features=h["emb_features"], aggregate=h["aggregate"])
        self.net = ScoreNet(self.state_shape, h["channels"], h["features"], channels=h["unet_channels"],
                            blocks=h["blocks"], emb_features=h["emb_features"], kernel_size=3,
                            schedule=self.schedule)

    def loss(self, batch: Batch) -> Tensor:
        """Denoising score matching loss of a standardized batch."""
        hmap, vec = self.encoder(batch.y, batch.mask, batch.t)
        return dsm_loss(lambda xs, s: self.net(xs, s, batch.t, hmap, vec), batch.x, self.schedule,
                        rho=float(self.hparams["loss_rho"]))

    def make_posterior(self, batch: Batch, steps: int | None = None, corrections: int | None = None,
                       tau: float | None = None, **kwargs: Any) -> SamplerPosterior:
        """A :class:`~sbida.posterior.SamplerPosterior` of the windows (sampler settings override the defaults)."""
        if kwargs:
            raise ValueError(f"unknown posterior options {sorted(kwargs)}; expected steps, corrections, tau")
        _check_sampler_options(steps, corrections, tau)
        h = self.hparams
        steps = int(h["steps"] if steps is None else steps)
        corrections = int(h["corrections"] if corrections is None else corrections)
        tau = float(h["tau"] if tau is None else tau)
        with torch.inference_mode():  # once per window: the encoder, the context's share of the U-Net and embedding
            hmap, vec = self.encoder(batch.y, batch.mask, batch.t)
            eps = self.net.conditioned(batch.t, hmap, vec)
        B = hmap.shape[0]

        @torch.inference_mode()
        def draw(n: int, generator: torch.Generator | None) -> Tensor:
            x = sample_vp(eps, (n * B, *self.state_shape), self.schedule, steps, corrections, tau, generator,
                          self.dtype, self.device)
            return (x.reshape(n, B, *self.state_shape) * self.x_std + self.x_mean).clone()

        rows = pass_rows(int(h["sample_rows"]), math.prod(self.state_shape), self.device)
        return SamplerPosterior(chunked_sampler(draw, B, rows, self.device), B, self.state_shape,
                                device=self.device)


def _check_sampler_options(steps: Any, corrections: Any, tau: Any) -> None:
    if steps is not None and (int(steps) != steps or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps}")
    if corrections is not None and (int(corrections) != corrections or corrections < 0):
        raise ValueError(f"corrections must be a non-negative integer, got {corrections}")
    if tau is not None and not (0 < tau < math.inf):
        raise ValueError(f"tau must be positive and finite, got {tau}")

r"""Encoders of observation windows onto the state grid.

A window of ``T`` observations ``y_k`` with masks ``m_k`` (``k`` over the window's lags ``l_k``) is first lifted onto
the grid of the state with the adjoint of the linear observation operator ``H``,

.. math:: v_k = H^\top (m_k \odot y_k), \qquad w_k = H^\top m_k, \qquad p = H^\top \mathbf{1},

so that every operator (random masks, stations, subsampling) gives fields on the state grid: the values, how much
each cell is observed (the mask as a channel) and where the stations are. Each time ``k`` then goes through a
shared periodic convolution modulated (FiLM) by an embedding of its lag ``l_k``; the ``T`` feature maps are
combined (concatenated for a fixed window, or averaged so that the window length may vary) and refined by
residual blocks modulated by an embedding of the physical time ``t``. The result is a context map
``(B, C, *grid)`` and a context vector ``(B, F)`` (strided convolutions down to a few cells, flattened).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .layers import FiLM, ResBlock, SinusoidalEmbedding, periodic_conv

__all__ = ["WindowEncoder"]


class WindowEncoder(nn.Module):
    """Encode ``(y (B, T, *obs_shape), mask, t (B,))`` into a context map on the state grid and a vector.

    Args:
        state_shape: ``(K,)`` for 1-D states or ``(C, H, W)`` for 2-D states.
        obs_shape: shape of one observation.
        lags: the window's lags ``(T,)`` relative to the target (e.g. ``-9, ..., 0``), in saved states.
        lift: the observation matrix ``H`` ``(M, D)`` over flattened observations and states, or ``None`` when
            observations live on the state grid (``H = I``).
        channels: width of the feature maps.
        depth: residual blocks after the window is combined.
        kernel_size: odd kernel size of the convolutions.
        features: size of the context vector (0: no vector).
        emb_features: size of the time and lag embeddings.
        aggregate: ``"concat"`` (fixed window length) or ``"mean"`` (any length, lags given at call time).
        t_period: the longest period of the embedding of (standardized) ``t``.
    """

    def __init__(self, state_shape: Sequence[int], obs_shape: Sequence[int], lags: Sequence[int],
                 lift: Tensor | None = None, channels: int = 32, depth: int = 3, kernel_size: int = 5,
                 features: int = 128, emb_features: int = 32, aggregate: str = "concat", t_period: float = 20.0):
        super().__init__()
        self.state_shape, self.obs_shape = tuple(state_shape), tuple(obs_shape)
        if len(self.state_shape) not in (1, 3):
            raise ValueError(f"state_shape must be (K,) or (C, H, W), got {self.state_shape}")
        if aggregate not in ("concat", "mean"):
            raise ValueError(f"aggregate must be 'concat' or 'mean', got {aggregate!r}")
        self.dim = 1 if len(self.state_shape) == 1 else 2
        self.state_channels = 1 if self.dim == 1 else self.state_shape[0]
        self.grid = self.state_shape[-self.dim:]
        D, M = math.prod(self.state_shape), math.prod(self.obs_shape)
        if lift is None:
            if self.obs_shape != self.state_shape:
                raise ValueError(f"observations of shape {self.obs_shape} differ from states {self.state_shape}: "
                                 f"give the observation matrix H (M, D) as lift")
        elif tuple(lift.shape) != (M, D):
            raise ValueError(f"lift must be the observation matrix (M, D) = ({M}, {D}), got {tuple(lift.shape)}")
        self.register_buffer("lift", None if lift is None else lift.detach().to(torch.get_default_dtype()).clone())
        self.register_buffer("lags", torch.as_tensor(list(lags), dtype=torch.get_default_dtype()))
        self.T, self.aggregate, self.channels = len(self.lags), aggregate, channels
        sc = self.state_channels
        self.lag_embedding = SinusoidalEmbedding(emb_features, min_period=2.0, max_period=8.0 * max(self.T, 2))
        self.t_embedding = nn.Sequential(SinusoidalEmbedding(emb_features, min_period=0.05, max_period=t_period),
                                         nn.Linear(emb_features, emb_features), nn.SiLU())
        self.inp = periodic_conv(self.dim, 3 * sc, channels, kernel_size)
        self.lag_film = FiLM(emb_features, channels)
        self.act = nn.SiLU()
        self.combine = periodic_conv(self.dim, channels * (self.T if aggregate == "concat" else 1), channels, 1)
        self.blocks = nn.ModuleList([ResBlock(self.dim, channels, channels, emb_features, kernel_size)
                                     for _ in range(depth)])
        self.features = features
        if features:
            down, grid = [], list(self.grid)
            while math.prod(grid) > 64 and min(grid) >= 4:
                down += [periodic_conv(self.dim, channels, channels, 3, stride=2), nn.SiLU()]
                grid = [(g + 1) // 2 for g in grid]
            self.down = nn.Sequential(*down)
            self.head = nn.Sequential(nn.Linear(channels * math.prod(grid) + emb_features, features), nn.SiLU(),
                                      nn.Linear(features, features))

    def lift_window(self, y: Tensor, mask: Tensor) -> Tensor:
        """Values, mask weight and station coverage on the state grid: ``(B, T, 3 * C_state, *grid)``."""
        B, T = y.shape[:2]
        m = mask.to(y.dtype)
        v = torch.where(mask.bool(), y, torch.zeros((), dtype=y.dtype, device=y.device))
        if self.lift is None:
            p = torch.ones_like(v[:1, :1])
        else:
            H = self.lift.to(y.dtype)
            v = (v.reshape(B, T, -1) @ H).reshape(B, T, *self.state_shape)
            m = (m.reshape(B, T, -1) @ H).reshape(B, T, *self.state_shape)
            p = H.sum(0).reshape(1, 1, *self.state_shape)
            p = p / p.max().clamp_min(1e-12)
        grid = (B, T, self.state_channels, *self.grid)
        return torch.cat([v.reshape(grid), m.reshape(grid), p.expand(*grid[:2], *p.shape[2:]).reshape(grid)], 2)

    def forward(self, y: Tensor, mask: Tensor, t: Tensor, lags: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Encode a batch of windows.

        Args:
            y: standardized observations ``(B, T, *obs_shape)`` (values where ``mask`` is false are ignored).
            mask: ``(B, T, *obs_shape)`` boolean.
            t: standardized physical time ``(B,)``.
            lags: lags ``(T,)`` or ``(B, T)``; default the window's own (required for another ``T`` with ``"mean"``).

        Returns:
            The context map ``(B, channels, *grid)`` and the context vector ``(B, features)`` (``None`` if
            ``features == 0``).
        """
        B, T = y.shape[:2]
        if lags is None:
            if T != self.T:
                raise ValueError(f"this encoder was built for windows of {self.T} times, got {T}; pass lags= (with "
                                 f"aggregate='mean') for other lengths")
            lags = self.lags
        lags = torch.as_tensor(lags, dtype=y.dtype, device=y.device).expand(B, T)
        if self.aggregate == "concat" and T != self.T:
            raise ValueError(f"aggregate='concat' needs windows of {self.T} times, got {T}")
        h = self.inp(self.lift_window(y, mask).flatten(0, 1))  # (B T, C, *grid)
        h = self.act(self.lag_film(h, self.lag_embedding(lags.reshape(-1))))
        h = h.unflatten(0, (B, T))
        h = h.flatten(1, 2) if self.aggregate == "concat" else h.mean(1)
        h = self.combine(h)
        emb = self.t_embedding(t.to(y.dtype))
        for block in self.blocks:
            h = block(h, emb)
        if not self.features:
            return h, None
        vec = self.head(torch.cat([self.down(h).flatten(1), emb], dim=-1))
        return h, vec

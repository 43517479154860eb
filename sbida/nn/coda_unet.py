r"""CODA's "1.5-D UNet": observation windows over (time, space) in, one state over space out.

For a 1-D state on ``K`` periodic nodes, the input is a window of ``T`` observation times lifted to the state grid,
``(B, C_in, T, K)`` (values and mask as channels). The encoder is a stack of 2-D convolutions over time and space
(circular padding in space, zero padding in time), each followed by batch normalization and a ReLU, with max
pooling over both axes between levels. The skip connection of each level is the **maximum over time** of its
feature map, ``(B, C, K_l)``, so the decoder is purely spatial: 1-D convolutions (circular padding, batch norm,
ReLU) that upsample and concatenate the skips, ending in a ``1 x 1`` convolution to the state's channels.

For 2-D states ``(C, H, W)`` the same design is one dimension up: 3-D convolutions over ``(T, H, W)`` in the
encoder, maxima over ``T`` as skips, 2-D convolutions in the decoder.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CODAUNet"]


def _circular_space(x: Tensor, spatial: int, pad: int) -> Tensor:
    """Pad the last ``spatial`` axes of ``x`` circularly by ``pad`` on each side."""
    for dim in range(-spatial, 0):
        if pad:
            x = torch.cat((x.narrow(dim, x.shape[dim] - pad, pad), x, x.narrow(dim, 0, pad)), dim=dim)
    return x


def _pool(x: Tensor, spatial: int) -> Tensor:
    """Max pooling of ``(B, C, T, *grid)`` by 2 over time (while ``T > 1``; an odd ``T`` leaves a last window of
    one) and by 2 over each spatial axis (even sizes): ``F.max_pool2d`` / ``F.max_pool3d`` with ``ceil_mode``, as
    elementwise maxima of strided views, about 10x faster on CPU than those kernels (which also compute indices)."""
    T = x.shape[2]
    if T > 1:
        if T % 2:
            x = torch.cat((x, x.narrow(2, T - 1, 1)), dim=2)  # a repeated last time leaves its maximum unchanged
        x = torch.maximum(x[:, :, 0::2], x[:, :, 1::2])
    for dim in range(3, 3 + spatial):
        n = x.shape[dim]
        x = torch.maximum(x.narrow(dim, 0, n - 1)[(slice(None),) * dim + (slice(None, None, 2),)],
                          x.narrow(dim, 1, n - 1)[(slice(None),) * dim + (slice(None, None, 2),)])
    return x


class _Block(nn.Module):
    """Two (convolution, batch norm, ReLU) layers; circular padding in space, zero padding in time (if any). In eval
    mode batch norm is folded into the convolution (same values, 7 % less time for CODA's forward pass at K=40)."""

    def __init__(self, c_in: int, c_out: int, spatial: int, temporal: bool, kernel: int = 3):
        super().__init__()
        dims = spatial + int(temporal)
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.spatial, self.pad = spatial, kernel // 2
        time_pad = (self.pad,) if temporal else ()
        padding = time_pad + (0,) * spatial  # the spatial padding is circular, done by hand
        self.layers = nn.ModuleList()
        for c in (c_in, c_out):
            self.layers.append(nn.ModuleList([conv(c, c_out, kernel, padding=padding, bias=False), norm(c_out)]))

    def forward(self, x: Tensor) -> Tensor:
        for conv, norm in self.layers:
            x = _circular_space(x, self.spatial, self.pad)
            if self.training or norm.running_mean is None:
                x = F.relu(norm(conv(x)))
            else:  # inference: batch norm folded into the convolution (one pass less over the feature map)
                scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
                w = conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1)))
                x = F.relu_(conv._conv_forward(x, w, norm.bias - norm.running_mean * scale))
        return x


class CODAUNet(nn.Module):
    """The DA network of CODA: ``(B, C_in, T, *grid) -> (B, C_out, *grid)``.

    Args:
        in_channels: input channels per observation time (e.g. lifted values and mask: 2 per state channel).
        out_channels: channels of the state (1 for Lorenz-96, 2 for the velocity of 2-D flow).
        spatial: 1 for states on a ring, 2 for states on a periodic plane.
        channels: feature channels per level, e.g. ``(32, 64, 128)``; the grid is halved between levels (so each
            spatial size must be divisible by ``2 ** (len(channels) - 1)``), the time axis too while it is > 1.

    The output is in standardized units; the estimator maps it back.
    """

    def __init__(self, in_channels: int, out_channels: int = 1, spatial: int = 1,
                 channels: tuple[int, ...] | list[int] = (32, 64, 128)):
        super().__init__()
        if spatial not in (1, 2):
            raise ValueError(f"spatial must be 1 or 2, got {spatial}")
        if len(channels) < 1:
            raise ValueError("channels needs at least one level")
        self.spatial, self.channels = spatial, tuple(int(c) for c in channels)
        self.down = nn.ModuleList()
        c_prev = in_channels
        for c in self.channels:
            self.down.append(_Block(c_prev, c, spatial, temporal=True))
            c_prev = c
        self.up = nn.ModuleList()
        for c_skip, c in zip(self.channels[-2::-1], self.channels[-2::-1]):
            self.up.append(_Block(c_prev + c_skip, c, spatial, temporal=False))
            c_prev = c
        conv = nn.Conv1d if spatial == 1 else nn.Conv2d
        self.head = conv(c_prev, out_channels, 1)

    def check_grid(self, grid: tuple[int, ...]) -> None:
        """Raise a ``ValueError`` if the spatial sizes cannot be halved ``len(channels) - 1`` times."""
        f = 2 ** (len(self.channels) - 1)
        if any(n % f for n in grid):
            raise ValueError(f"a CODAUNet with {len(self.channels)} levels needs spatial sizes divisible by {f}, "
                             f"got {tuple(grid)}; use fewer levels")

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(B, C_in, T, *grid)``; returns ``(B, C_out, *grid)``."""
        if x.dim() != 3 + self.spatial:
            raise ValueError(f"expected input (B, C, T, {'K' if self.spatial == 1 else 'H, W'}), got {tuple(x.shape)}")
        self.check_grid(tuple(x.shape[3:]))
        skips = []
        for level, block in enumerate(self.down):
            if level:
                x = _pool(x, self.spatial)
            x = block(x)
            skips.append(x.amax(dim=2))  # max over time
        h = skips.pop()
        for block in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[2:], mode="nearest")
            h = block(torch.cat((h, skip), dim=1))
        return self.head(h)

r"""U-Nets on periodic 1-D and 2-D grids with time modulation (the backbone of score networks).

``UNet(x, emb, context)`` maps a field ``x (B, C_in, *grid)``, concatenated with an optional context map on the same
grid, through levels of residual blocks (periodic convolutions, FiLM by the embedding ``emb`` of diffusion and
physical time) that halve the grid on the way down and restore it on the way up, with skip connections:

.. math:: h_0 = \mathrm{conv}([x, c]), \quad h_{l+1} = \mathrm{down}(\mathrm{blocks}_l(h_l)), \quad
          u_l = \mathrm{blocks}'_l([\mathrm{up}(u_{l+1}), h_l]), \quad \mathrm{out} = \mathrm{conv}(u_0).

The input convolution is linear in ``[x, c]``, so it splits into the shares of ``x`` and of ``c``,
``conv([x, c]) = conv_x(x) + conv_c(c)``: when many states are evaluated against the same context (samples of one
posterior), ``conv_c(c)`` is computed once per context (:meth:`UNet.context_share`) and broadcast over the states.
The output convolution starts at zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import ResBlock, check_dim, periodic_conv

__all__ = ["UNet", "UNet1d", "UNet2d"]


class UNet(nn.Module):
    """A U-Net with circular padding and FiLM time modulation.

    Args:
        dim: spatial dimensions (1 or 2).
        in_channels: channels of ``x``.
        out_channels: channels of the output.
        channels: width of each level, e.g. ``(32, 64, 128)`` (the grid halves between levels).
        blocks: residual blocks per level (on each side).
        emb_features: size of the modulating embedding (0: none).
        context_channels: channels of an optional context map concatenated to ``x``.
        kernel_size: odd kernel size.
    """

    def __init__(self, dim: int, in_channels: int, out_channels: int, channels: Sequence[int] = (32, 64, 128),
                 blocks: int = 2, emb_features: int = 64, context_channels: int = 0, kernel_size: int = 3):
        super().__init__()
        self.dim = check_dim(dim)
        channels = list(channels)
        if not channels or blocks < 1:
            raise ValueError(f"need at least one level and one block, got channels={channels}, blocks={blocks}")
        self.in_channels, self.context_channels = in_channels, context_channels
        e = emb_features or None
        self.inp = periodic_conv(dim, in_channels + context_channels, channels[0], kernel_size)
        self.down_blocks, self.downs = nn.ModuleList(), nn.ModuleList()
        for i, c in enumerate(channels):
            cin = channels[i - 1] if i else channels[0]
            self.down_blocks.append(nn.ModuleList([ResBlock(dim, cin if j == 0 else c, c, e, kernel_size)
                                                   for j in range(blocks)]))
            if i < len(channels) - 1:
                self.downs.append(periodic_conv(dim, c, c, 3, stride=2))
        self.mid = ResBlock(dim, channels[-1], channels[-1], e, kernel_size)
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(len(channels))):
            c, cup = channels[i], channels[min(i + 1, len(channels) - 1)]
            self.up_blocks.append(nn.ModuleList([ResBlock(dim, (cup if j == 0 else c) + c, c, e, kernel_size)
                                                 for j in range(blocks)]))
        self.norm = nn.GroupNorm(next(g for g in (8, 4, 2, 1) if channels[0] % g == 0), channels[0])
        self.out = periodic_conv(dim, channels[0], out_channels, kernel_size)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def context_share(self, context: Tensor) -> Tensor:
        """The context map's share of the input convolution, bias included (once per context, see ``forward``).

        Args:
            context: ``(B, C_ctx, *grid)``.

        Returns:
            ``(B, channels[0], *grid)``.
        """
        if not self.context_channels:
            raise ValueError("this U-Net takes no context map")
        if context.dim() != self.dim + 2 or context.shape[1] != self.context_channels:
            raise ValueError(f"expected a context map (B, {self.context_channels}, *grid) with {self.dim} grid "
                             f"dimensions, got {tuple(context.shape)}")
        return self.inp.partial(context, self.in_channels)

    def forward(self, x: Tensor, emb: Tensor | None = None, context: Tensor | None = None,
                context_share: Tensor | None = None) -> Tensor:
        """``x (N, C_in, *grid)``, ``emb (N, E)``, ``context (N, C_ctx, *grid)`` -> ``(N, C_out, *grid)``.

        Instead of ``context``, ``context_share (B, channels[0], *grid)`` from :meth:`context_share` of ``B``
        contexts may be given; the rows of ``x`` are then ``N = n B`` states ordered sample-major (row ``i B + b``
        goes with context ``b``).
        """
        if x.dim() != self.dim + 2:
            raise ValueError(f"expected x of shape (B, C, {'L' if self.dim == 1 else 'H, W'}), got {tuple(x.shape)}")
        if context_share is not None:
            B, N = context_share.shape[0], x.shape[0]
            if context is not None or N % B or context_share.shape[2:] != x.shape[2:]:
                raise ValueError(f"context_share (B, C, *grid) needs states (n B, C_in, *grid) on the same grid and "
                                 f"no context; got {tuple(context_share.shape)} and {tuple(x.shape)}")
            h = (self.inp.partial(x, 0, bias=False).unflatten(0, (N // B, B)) + context_share).flatten(0, 1)
        elif self.context_channels:
            if context is None or context.shape[1] != self.context_channels or context.shape[2:] != x.shape[2:]:
                got = None if context is None else tuple(context.shape)
                raise ValueError(f"expected a context map (B, {self.context_channels}, *{tuple(x.shape[2:])}), "
                                 f"got {got}")
            h = self.inp(torch.cat([x, context], dim=1))
        else:
            h = self.inp(x)
        skips = []
        for i, level in enumerate(self.down_blocks):
            for block in level:
                h = block(h, emb)
                skips.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        h = self.mid(h, emb)
        for level in self.up_blocks:
            for block in level:
                s = skips.pop()
                if h.shape[2:] != s.shape[2:]:
                    h = F.interpolate(h, size=s.shape[2:], mode="nearest")
                h = block(torch.cat([h, s], dim=1), emb)
        return self.out(F.silu(self.norm(h)))


class UNet1d(UNet):
    """:class:`UNet` on 1-D periodic grids ``(B, C, L)``."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__(1, in_channels, out_channels, **kwargs)


class UNet2d(UNet):
    """:class:`UNet` on 2-D periodic grids ``(B, C, H, W)``."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__(2, in_channels, out_channels, **kwargs)

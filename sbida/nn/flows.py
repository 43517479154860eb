r"""Coupling flows on periodic grids whose conditioner is a local network of the state and of a context map.

A coupling transform splits the grid points by a checkerboard (the parity of the sum of their coordinates, all the
channels of a point together) into a set ``a`` that conditions and a set ``b`` that moves by an affine map,

.. math:: z_a = x_a, \qquad z_{b,i} = x_{b,i}\, e^{\alpha_i} + \beta_i, \qquad
          (\alpha_i, \beta_i) = g\big(x_a[\mathcal{N}(i)],\, c_i(h)\big),

where ``N(i)`` are the points of ``a`` within a window of ``kernel_size`` cells (periodic) around point ``i`` of
``b``, ``c_i(h)`` is a periodic convolution of the context map ``h`` (the encoded observation window on the same grid)
read at ``i``, and ``g`` a small network shared by all points: a convolution evaluated only where its output is
needed. The window's share ``c(h)`` is computed once per window and broadcast over all its samples, and the rest is
matrix products over ``(samples x points, neighbours)``, so a sampling pass is cheap. Translation equivariance makes
the flow data-efficient (one local rule learned at every point) and lets the same weights serve any grid size. The
``log``-determinant is the sum of the ``alpha`` over ``b``; the transforms alternate the checkerboard. The transforms
and distributions are zuko's (:class:`zuko.transforms.CouplingTransform`,
:class:`zuko.transforms.MonotonicAffineTransform`, :class:`zuko.distributions.NormalizingFlow`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from functools import partial

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, constraints
from zuko.distributions import DiagNormal, NormalizingFlow
from zuko.lazy import LazyTransform
from zuko.transforms import (
    ComposedTransform,
    CouplingTransform,
    DependentTransform,
    MonotonicAffineTransform,
    Transform,
)

from .layers import periodic_conv

__all__ = ["GridCoupling", "GridFlow", "IsotropicStudentT", "couplings_per_level", "lattice", "levels_of",
           "with_student_t_base"]


def _split(state_shape: Sequence[int]) -> tuple[int, tuple[int, ...]]:
    shape = tuple(state_shape)
    if len(shape) == 1:
        return 1, shape
    if len(shape) == 3:
        return shape[0], shape[1:]
    raise ValueError(f"state_shape must be (K,) or (C, H, W), got {shape}")


def lattice(grid: Sequence[int], level: int) -> tuple[Tensor, Tensor]:
    """The points still moving at ``level`` of the multiscale split, and those of them that move first.

    1-D: level ``l`` keeps the points ``i = 0 mod 2^l`` and moves ``i = 2^l mod 2^(l+1)``. 2-D: even levels
    ``2k`` keep the lattice ``2^k Z^2`` and move its checkerboard's odd points; odd levels ``2k+1`` keep the
    checkerboard's even points of ``2^k Z^2`` (a quincunx lattice) and move those with odd ``h / 2^k``.

    Returns:
        ``(active, moving)``: boolean tensors of shape ``grid``.
    """
    coords = torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij")
    if len(grid) == 1:
        step = 2**level
        return coords[0] % step == 0, coords[0] % (2 * step) == step
    k, odd = divmod(level, 2)
    step = 2**k
    on = (coords[0] % step == 0) & (coords[1] % step == 0)
    parity = (coords[0] // step + coords[1] // step) % 2
    if not odd:
        return on, on & (parity == 1)
    active = on & (parity == 0)
    return active, active & ((coords[0] // step) % 2 == 1)


def levels_of(grid: Sequence[int]) -> int:
    """The number of multiscale levels of ``grid`` (while the moving set of a level is not empty)."""
    level = 0
    while lattice(grid, level)[1].any():
        level += 1
    return level


def couplings_per_level(transforms: int | Sequence[int], levels: int) -> list[int]:
    """The couplings of each of ``levels`` levels: ``transforms`` for all, or one number per level from the finest
    with the last repeated."""
    per = [transforms] if isinstance(transforms, int) else list(transforms)
    if not per or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in per):
        raise ValueError(f"transforms must be a positive integer or a list of them (per level), got {transforms!r}")
    return [per[min(level, len(per) - 1)] for level in range(levels)]


class GridCoupling(LazyTransform):
    """One affine coupling transform of flat states ``(*, D)``, conditioned on a context map ``(B, C_h, *grid)``.

    At multiscale ``level`` (see :func:`lattice`) the moving points are the level's moving set (or, with ``flip``,
    the rest of its active points); each is moved given the other active points of the level within a window of
    ``kernel_size`` lattice steps, and the context convolution read at its place.

    Args:
        state_shape: ``(K,)`` or ``(C, H, W)``.
        context_channels: channels of the context map.
        level: the multiscale level (``0``: the checkerboard of the full grid).
        flip: move the complement of the level's moving set within its active points.
        hidden: widths of the conditioner's hidden layers.
        kernel_size: odd width of the neighbourhood window (in lattice steps) and of the context convolution.
    """

    def __init__(self, state_shape: Sequence[int], context_channels: int, level: int = 0, flip: bool = False,
                 hidden: Sequence[int] = (32,), kernel_size: int = 5):
        super().__init__()
        self.sc, self.grid = _split(state_shape)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}")
        if not hidden:
            raise ValueError("hidden must name at least one layer")
        dim, L = len(self.grid), math.prod(self.grid)
        active, moving = (m.reshape(-1) for m in lattice(self.grid, level))
        if flip:
            moving = active & ~moving
        fixed = active & ~moving  # the level's conditioning points
        if not moving.any() or not fixed.any():
            raise ValueError(f"level {level} of grid {self.grid} has no point to move or none to condition on")
        pts_b = moving.nonzero().squeeze(-1)
        cell = torch.arange(self.sc)[:, None] * L  # flat index of (channel, point) = channel * L + point
        mask = torch.ones(self.sc * L, dtype=torch.bool)
        mask[(cell + pts_b).reshape(-1)] = False
        # position of every flat cell within x_a; the cells that must not be read (b, and inactive points) go to
        # a last slot that holds a zero
        readable = torch.zeros(self.sc * L, dtype=torch.bool)
        readable[(cell + fixed.nonzero().squeeze(-1)).reshape(-1)] = True
        pos = torch.full((self.sc * L,), int(mask.sum()), dtype=torch.long)
        pos[readable] = mask[: self.sc * L].cumsum(0)[readable] - 1
        # neighbourhoods: the offsets (in lattice steps) from a moving point to conditioning points of the level
        step = 2 ** (level if dim == 1 else level // 2)
        r = kernel_size // 2
        coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in self.grid), indexing="ij"), -1).reshape(L, dim)
        sizes = torch.tensor(self.grid)
        fixed_grid = fixed.reshape(self.grid)
        ref = coords[pts_b[0]]
        offsets = [torch.tensor(o) * step for o in itertools.product(range(-r, r + 1), repeat=dim)]
        offsets = [o for o in offsets if fixed_grid[tuple((ref + o) % sizes)]]
        if not offsets:
            raise ValueError(f"kernel_size {kernel_size} sees no conditioning neighbour: use 3 or more")
        nbr = []
        for o in offsets:
            c = (coords[pts_b] + o) % sizes
            flat = torch.zeros(len(pts_b), dtype=torch.long)
            for d in range(dim):
                flat = flat * self.grid[d] + c[:, d]
            nbr.append(flat)
        nbr = torch.stack(nbr, -1)  # (L_b, n_offsets) points
        patch = pos[(cell[:, :, None] + nbr[None]).permute(1, 0, 2).reshape(len(pts_b), -1)]  # (L_b, sc * n_off)
        self.register_buffer("mask", mask)
        self.register_buffer("pts_b", pts_b)
        self.register_buffer("patch", patch)
        self.inp = nn.Linear(patch.shape[1], hidden[0], bias=False)
        self.ctx = periodic_conv(dim, context_channels, hidden[0], kernel_size)
        self.body = nn.ModuleList(nn.Linear(a, b) for a, b in zip(hidden[:-1], hidden[1:]))
        self.out = nn.Linear(hidden[-1], 2 * self.sc)
        nn.init.zeros_(self.out.weight)  # starts as the identity
        nn.init.zeros_(self.out.bias)
        self.act = nn.SiLU()

    def forward(self, hmap: Tensor) -> Transform:
        """The coupling transform of windows with context map ``hmap (B, C_h, *grid)``, batch ``(B,)``."""
        ctx = self.ctx(hmap).flatten(2)[:, :, self.pts_b].transpose(1, 2)  # (B, L_b, hidden)
        return CouplingTransform(partial(self.meta, ctx), self.mask)

    def meta(self, ctx: Tensor, x_a: Tensor) -> Transform:
        """Affine map of ``x_b`` given ``x_a (*batch, B, D_a)`` and the window's share ``ctx (B, L_b, hidden)``."""
        x = torch.cat([x_a, x_a.new_zeros(*x_a.shape[:-1], 1)], -1)
        hid = self.act(self.inp(x[..., self.patch]) + ctx)  # (*batch, B, L_b, hidden)
        for layer in self.body:
            hid = self.act(layer(hid))
        out = self.out(hid)  # (*batch, B, L_b, 2 sc): per point, then per channel
        shift, scale = out.transpose(-1, -2).flatten(-2).chunk(2, -1)  # channel-major, like the flat cells of b
        return DependentTransform(MonotonicAffineTransform(shift, scale), 1)


class GridFlow(nn.Module):
    """A multiscale normalizing flow of flat states ``(B, D)`` on a grid, standard normal base.

    Level by level from the finest (see :func:`lattice`), ``transforms`` couplings alternate between the level's
    moving set and the rest of its points; each level halves the points still moving, so the coarse levels cost
    little and carry the long-range correlations that a single checkerboard cannot (after the first coupling of a
    checkerboard, the other half's correlations among themselves are out of its reach).

    Args:
        state_shape: ``(K,)`` or ``(C, H, W)``.
        context_channels: channels of the context map.
        transforms: couplings per level: one number for every level, or one per level from the finest (the last
            repeats for the further levels). The finest level moves half the points and costs about as much as all
            the others together. With two couplings there, a sampling pass ends by moving each point of one colour
            from its own base variable given the other colour's values, so their correlations given those values
            come only through the coupling before it; more couplings there give them room.
        hidden: widths of each conditioner's hidden layers.
        kernel_size: odd width of the neighbourhoods (in lattice steps of each level).
        levels: number of levels (``None``: all of the grid's, :func:`levels_of`).
    """

    def __init__(self, state_shape: Sequence[int], context_channels: int, transforms: int | Sequence[int] = 4,
                 hidden: Sequence[int] = (32,), kernel_size: int = 5, levels: int | None = None):
        super().__init__()
        self.state_shape = tuple(state_shape)
        _, grid = _split(self.state_shape)
        most = levels_of(grid)
        levels = most if levels is None else int(levels)
        if not 1 <= levels <= most:
            raise ValueError(f"levels must be between 1 and {most} for the grid {grid}, got {levels}")
        per = couplings_per_level(transforms, levels)
        self.couplings = nn.ModuleList(
            GridCoupling(self.state_shape, context_channels, level, i % 2 == 1, hidden, kernel_size)
            for level in range(levels) for i in range(per[level]))
        self.register_buffer("zero", torch.zeros(math.prod(self.state_shape)), persistent=False)

    def forward(self, hmap: Tensor) -> NormalizingFlow:
        """The flow's distribution for windows with context map ``hmap (B, C_h, *grid)``: batch ``(B,)``, event
        ``(D,)``."""
        transform = ComposedTransform(*(c(hmap) for c in self.couplings))
        zero = self.zero.to(hmap.dtype)
        base = DiagNormal(zero, torch.ones_like(zero)).expand(hmap.shape[:1])
        return NormalizingFlow(transform, base)


class IsotropicStudentT(Distribution):
    r"""A multivariate Student-t distribution with an isotropic scale: the heavy-tailed base of a flow.

    .. math:: z = c \sqrt{\nu / w}\; g, \qquad g \sim \mathcal N(0, I_D), \quad w \sim \chi^2_\nu,

    .. math:: \log p(z) = \log\Gamma\big(\tfrac{\nu + D}{2}\big) - \log\Gamma\big(\tfrac{\nu}{2}\big)
              - \tfrac D2 \log(\nu\pi) - D \log c - \tfrac{\nu + D}{2} \log\Big(1 + \frac{\lVert z - \mu\rVert^2}
              {\nu c^2}\Big).

    One ``w`` per draw scales all ``D`` components together (a Gaussian scale mixture), so the tails are those of
    the whole vector: a draw far out in one direction is far out in all. ``\nu \to \infty`` gives
    :math:`\mathcal N(\mu, c^2 I)`. The covariance is :math:`c^2 \nu / (\nu - 2)\, I` for :math:`\nu > 2`.

    Args:
        loc: ``(*batch, D)`` centres :math:`\mu`.
        df: degrees of freedom :math:`\nu > 0` (a number or a 0-d tensor).
        scale: :math:`c > 0` (a number or a 0-d tensor).
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, loc: Tensor, df: float | Tensor, scale: float | Tensor = 1.0):
        self.loc = loc
        # in float64: the normalizing constant is a difference of log-gammas of size nu log nu (large for large nu)
        self.df = torch.as_tensor(df, dtype=torch.float64, device=loc.device)
        self.scale = torch.as_tensor(scale, dtype=torch.float64, device=loc.device)
        if self.df.dim() != 0 or self.scale.dim() != 0 or not (self.df > 0 and self.scale > 0):
            raise ValueError(f"df and scale must be single numbers > 0, got {df} and {scale}")
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=False)

    @classmethod
    def unit(cls, loc: Tensor, df: float | Tensor) -> IsotropicStudentT:
        """The Student-t of ``df > 2`` degrees of freedom with covariance ``I`` (scale :math:`c = \\sqrt{(\\nu - 2) /
        \\nu}`), centred at ``loc`` ``(*batch, D)``."""
        return cls(loc, df, ((torch.as_tensor(df, dtype=torch.float64) - 2) / df).sqrt())

    @property
    def mean(self) -> Tensor:
        """The centre ``loc`` (the mean where :math:`\\nu > 1`)."""
        return self.loc

    @property
    def variance(self) -> Tensor:
        v = self.scale.square() * self.df / (self.df - 2) if self.df > 2 else torch.tensor(float("inf"))
        return v.to(self.loc).expand_as(self.loc)

    def expand(self, batch_shape, _instance=None) -> IsotropicStudentT:
        return IsotropicStudentT(self.loc.expand(*batch_shape, *self.event_shape), self.df, self.scale)

    def rsample(self, sample_shape: Sequence[int] = ()) -> Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        g = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        w = torch.distributions.Chi2(self.df).rsample(shape[:-1]).unsqueeze(-1)  # one per draw
        return self.loc + (self.scale * (self.df / w).sqrt()).to(self.loc.dtype) * g

    def log_prob(self, value: Tensor) -> Tensor:
        return self.log_prob_at_distance((value - self.loc).square().sum(-1))

    def log_prob_at_distance(self, r2: Tensor) -> Tensor:
        """The log-density of any point at squared distance ``r2`` (any shape) from the centre."""
        D, nu, c = self.event_shape[0], self.df, self.scale
        const = (torch.lgamma((nu + D) / 2) - torch.lgamma(nu / 2) - D / 2 * torch.log(nu * math.pi)
                 - D * torch.log(c))
        tail = ((nu + D) / 2).to(r2.dtype) * torch.log1p(r2 / (nu * c * c).to(r2.dtype))
        return const.to(r2.dtype) - tail


def with_student_t_base(flow: NormalizingFlow, df: float | None) -> NormalizingFlow:
    """``flow`` with its Gaussian base replaced by the unit-covariance Student-t of ``df`` degrees of freedom
    (:meth:`IsotropicStudentT.unit`, same centre; ``None``: ``flow`` unchanged). The transform is the same, so the
    spread of the draws keeps its scale and only the shape of the tails changes."""
    if df is None:
        return flow
    return NormalizingFlow(flow.transform, IsotropicStudentT.unit(flow.base.mean, float(df)))

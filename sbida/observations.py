r"""Observation models.

An observation of a state :math:`x` (shape ``state_shape``) is

.. math:: y = H x + \sigma \varepsilon, \qquad \varepsilon \sim \mathcal{N}(0, I),

of which only the entries where the boolean ``mask`` is true are seen (missing entries of ``y`` are stored as 0).
Given ``(y, mask)``, the log-likelihood of a state is

.. math:: \log p(y \mid x) = -\frac{1}{2} \sum_{i:\, m_i} \Big(\frac{y_i - (Hx)_i}{\sigma}\Big)^2
          - n_{obs} \big(\log \sigma + \tfrac{1}{2} \log 2\pi\big).

All operators here are linear: :meth:`ObservationModel.matrix` gives :math:`H` as a ``(M, D)`` matrix over the
flattened observation and state (what optimal interpolation, the EnKF, 4D-Var and likelihood guidance need).

- :class:`RandomMask`: :math:`H = I`, each value missing independently with probability ``p_missing``.
- :class:`Stations`: a station every few cells, each a Gaussian-weighted average of the cells around it
  (periodic; on 1-D states ``(K,)``, or channel by channel on 2-D states ``(C, H, W)``).
- :class:`Subsample`: every ``stride``-th cell along each spatial axis.
- :class:`Linear`: any matrix ``A`` acting on the flattened state.

An operator acts on states of one shape: give ``state_shape`` to the constructor, or call :meth:`bind` (the data
and task code do it from the simulator).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ObservationModel", "RandomMask", "Stations", "Subsample", "Linear"]


class ObservationModel(nn.Module):
    """Base class: a linear operator :meth:`apply`, Gaussian noise ``sigma`` and a random mask.

    Args:
        sigma: standard deviation of the observation noise (``> 0``).
        p_missing: probability that a value is missing, independently (``0 <= p_missing < 1``).
        state_shape: shape of the states observed; may be given later with :meth:`bind`.
    """

    def __init__(self, sigma: float, p_missing: float = 0.0, state_shape: tuple[int, ...] | None = None):
        super().__init__()
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (0 < sigma < math.inf):
            raise ValueError(f"sigma must be a positive finite number, got {sigma!r}")
        if not 0.0 <= p_missing < 1.0:
            raise ValueError(f"p_missing must be in [0, 1), got {p_missing!r}: with every value missing there is "
                             f"nothing to assimilate")
        self.sigma, self.p_missing = float(sigma), float(p_missing)
        self.state_shape: tuple[int, ...] | None = None
        if state_shape is not None:
            self.bind(state_shape)

    # -- to override ---------------------------------------------------------------------------------------------
    def _obs_shape(self, state_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of one observation; raises a ``ValueError`` if the operator cannot act on ``state_shape``."""
        raise NotImplementedError

    def _apply(self, x: Tensor) -> Tensor:
        """``H x`` for ``x`` ``(..., *state_shape)`` already checked."""
        raise NotImplementedError

    # -- generic -------------------------------------------------------------------------------------------------
    def bind(self, state_shape: tuple[int, ...]) -> ObservationModel:
        """Set the shape of the states observed (checked) and return ``self``.

        Raises:
            ValueError: the operator cannot act on this shape, or is already bound to another one.
        """
        state_shape = tuple(int(s) for s in state_shape)
        if self.state_shape is not None:
            if state_shape != self.state_shape:
                raise ValueError(f"{type(self).__name__} was built for states of shape {self.state_shape}, not "
                                 f"{state_shape}; make a new one for this simulator")
            return self
        self.obs_shape = self._obs_shape(state_shape)
        self.state_shape = state_shape
        self._matrix_cache: dict = {}
        return self

    def _bound(self) -> tuple[int, ...]:
        if self.state_shape is None:
            raise ValueError(f"{type(self).__name__} does not know the state shape yet: pass state_shape= to the "
                             f"constructor or call .bind(state_shape)")
        return self.state_shape

    def _check_x(self, x: Tensor) -> None:
        shape = self._bound()
        if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
            raise ValueError(f"{type(self).__name__} observes states of shape (..., {', '.join(map(str, shape))}), "
                             f"got {tuple(x.shape)}")

    def apply(self, x: Tensor) -> Tensor:
        """The noiseless observation ``H x``: ``(..., *state_shape) -> (..., *obs_shape)``."""
        self._check_x(x)
        return self._apply(x)

    def matrix(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tensor:
        """The operator as a matrix over flattened states and observations: ``(M, D)``.

        Built by applying the operator to the canonical basis, so it agrees with :meth:`apply` by construction.
        """
        shape = self._bound()
        dtype = dtype or torch.get_default_dtype()
        key = (dtype, str(device))
        if key not in self._matrix_cache:
            D = math.prod(shape)
            basis = torch.eye(D, dtype=dtype, device=device).reshape(D, *shape)
            self._matrix_cache[key] = self._apply(basis).reshape(D, -1).T.contiguous()
        return self._matrix_cache[key]

    def adjoint(self, y: Tensor) -> Tensor:
        """``H^T y``: ``(..., *obs_shape) -> (..., *state_shape)``; missing values must be zero in ``y``."""
        shape = self._bound()
        H = self.matrix(dtype=y.dtype, device=y.device)
        return (y.flatten(y.dim() - len(self.obs_shape)) @ H).unflatten(-1, shape)

    def sample(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Observe states.

        Args:
            x: states ``(..., *state_shape)``.
            generator: random generator for the noise and the mask.

        Returns:
            ``y`` ``(..., *obs_shape)`` with zeros where missing, and the boolean ``mask`` of the same shape.
        """
        hx = self.apply(x)
        noise = torch.randn(hx.shape, generator=generator, dtype=hx.dtype, device=hx.device)
        if self.p_missing > 0:
            mask = torch.rand(hx.shape, generator=generator, dtype=hx.dtype, device=hx.device) >= self.p_missing
        else:
            mask = torch.ones(hx.shape, dtype=torch.bool, device=hx.device)
        return torch.where(mask, hx + self.sigma * noise, torch.zeros_like(hx)), mask

    def log_likelihood(self, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        """Gaussian log-likelihood ``log p(y | x)`` over the observed entries.

        Args:
            x: states ``(..., *state_shape)``.
            y: observations ``(..., *obs_shape)``, broadcastable against ``H x``.
            mask: boolean (or 0/1) mask of the shape of ``y``.

        Returns:
            ``(...)``: the log-density summed over the observed entries.
        """
        if y.shape != mask.shape:
            raise ValueError(f"y and mask must have the same shape, got {tuple(y.shape)} and {tuple(mask.shape)}")
        self._bound()
        n = len(self.obs_shape)
        if tuple(y.shape[y.dim() - n:]) != self.obs_shape:
            raise ValueError(f"y must have shape (..., {', '.join(map(str, self.obs_shape))}), got {tuple(y.shape)}")
        hx = self.apply(x)
        mask = mask.bool()
        r = torch.where(mask, (y - hx) / self.sigma, torch.zeros((), dtype=hx.dtype, device=hx.device))
        dims = tuple(range(-n, 0))
        count = mask.expand(r.shape).sum(dims).to(hx.dtype)
        return -0.5 * (r**2).sum(dims) - count * (math.log(self.sigma) + 0.5 * math.log(2 * math.pi))

    def extra_repr(self) -> str:
        return f"sigma={self.sigma:g}, p_missing={self.p_missing:g}, state_shape={self.state_shape}"


class RandomMask(ObservationModel):
    """Every value of the state observed (``H = I``), each missing independently with probability ``p_missing``.

    Args:
        p_missing: fraction of missing values, in ``[0, 1)``.
        sigma: observation noise standard deviation.
        state_shape: optional, see :meth:`ObservationModel.bind`.
    """

    def __init__(self, p_missing: float = 0.75, sigma: float = 1.0, state_shape: tuple[int, ...] | None = None):
        super().__init__(sigma=sigma, p_missing=p_missing, state_shape=state_shape)

    def _obs_shape(self, state_shape):
        return tuple(state_shape)

    def _apply(self, x):
        return x

    def matrix(self, dtype=None, device=None) -> Tensor:
        return torch.eye(math.prod(self._bound()), dtype=dtype or torch.get_default_dtype(), device=device)


def _spatial_ndim(state_shape: tuple[int, ...], name: str) -> int:
    """1 spatial axis for states ``(K,)``, 2 for ``(C, H, W)`` (any leading channel axes)."""
    if len(state_shape) == 1:
        return 1
    if len(state_shape) == 3:
        return 2
    raise ValueError(f"{name} observes 1-D states (K,) or 2-D states (C, H, W), got state shape {state_shape}")


class _Separable(ObservationModel):
    """An operator that acts along each spatial axis by a matrix ``(m_a, n_a)`` (channels observed separately)."""

    def _axis_matrix(self, n: int) -> Tensor:
        raise NotImplementedError

    def _obs_shape(self, state_shape):
        nd = _spatial_ndim(state_shape, type(self).__name__)
        mats = [self._axis_matrix(n) for n in state_shape[-nd:]]
        self._axes = mats
        return tuple(state_shape[:-nd]) + tuple(m.shape[0] for m in mats)

    def _apply(self, x):
        mats = [m.to(dtype=x.dtype, device=x.device) for m in self._axes]
        if len(mats) == 1:
            return x @ mats[0].T
        return mats[0] @ x @ mats[1].T


class Stations(_Separable):
    """Stations on a regular grid, each the Gaussian-weighted average of the cells around it (periodic).

    Along each spatial axis of length ``n``, station ``i`` sits at ``offset + i * n / count`` rounded down, and sees
    ``sum_d w_d x_{p+d}`` over ``|d| <= radius`` with ``w_d`` proportional to ``exp(-d^2 / (2 kernel_width^2))`` and
    summing to one. 2-D states ``(C, H, W)`` get a ``count x count`` grid of stations in each channel (a separable
    kernel); the observation then has shape ``(C, count_H, count_W)``.

    Args:
        every: spacing between stations in cells (``count = n // every``); or give ``count`` instead.
        count: number of stations along each spatial axis.
        kernel_width: standard deviation of the kernel in cells (``0`` observes the station's cell only).
        radius: half-width of the kernel support in cells (default ``ceil(3 * kernel_width)``).
        sigma: observation noise standard deviation.
        p_missing: probability that a station's value is missing.
        offset: position of the first station.
        state_shape: optional, see :meth:`ObservationModel.bind`.
    """

    def __init__(self, every: int | None = 4, count: int | None = None, kernel_width: float = 0.8,
                 radius: int | None = None, sigma: float = 0.5, p_missing: float = 0.0, offset: int = 0,
                 state_shape: tuple[int, ...] | None = None):
        if count is not None:
            every = None
        elif every is None:
            raise ValueError("Stations needs either every= (spacing in cells) or count= (stations per axis)")
        if every is not None and every < 1:
            raise ValueError(f"every must be >= 1 cell, got {every}")
        if count is not None and count < 1:
            raise ValueError(f"count must be >= 1 station, got {count}")
        if kernel_width < 0:
            raise ValueError(f"kernel_width must be >= 0, got {kernel_width}")
        self.every, self.count, self.kernel_width, self.offset = every, count, float(kernel_width), int(offset)
        self.radius = int(math.ceil(3 * kernel_width)) if radius is None else int(radius)
        if self.radius < 0:
            raise ValueError(f"radius must be >= 0, got {radius}")
        super().__init__(sigma=sigma, p_missing=p_missing, state_shape=state_shape)

    def positions(self, n: int) -> Tensor:
        """Cell index of each station along an axis of length ``n``: ``(count,)``."""
        count = n // self.every if self.every is not None else self.count
        if count < 1 or count > n:
            how = f"every={self.every}" if self.every is not None else f"count={self.count}"
            raise ValueError(f"Stations with {how} on an axis of {n} cells leaves "
                             f"{'no station' if count < 1 else 'more stations than cells'}")
        return (self.offset + torch.arange(count) * n // count) % n

    def _axis_matrix(self, n: int) -> Tensor:
        pos = self.positions(n)
        d = torch.arange(-self.radius, self.radius + 1)
        w = torch.exp(-0.5 * (d.double() / self.kernel_width) ** 2) if self.kernel_width > 0 else (d == 0).double()
        w = w / w.sum()  # float64: rows summing to 1 to rounding
        H = torch.zeros(len(pos), n, dtype=torch.float64)
        H.index_put_((torch.arange(len(pos))[:, None].expand(-1, len(d)), (pos[:, None] + d) % n),
                     w.expand(len(pos), -1), accumulate=True)
        return H

    def extra_repr(self) -> str:
        where = f"every={self.every}" if self.every is not None else f"count={self.count}"
        return f"{where}, kernel_width={self.kernel_width:g}, radius={self.radius}, " + super().extra_repr()


class Subsample(_Separable):
    """Every ``stride``-th cell along each spatial axis, starting at ``offset``.

    Args:
        stride: spacing in cells.
        sigma: observation noise standard deviation.
        p_missing: probability that a value is missing.
        offset: first observed cell.
        state_shape: optional, see :meth:`ObservationModel.bind`.
    """

    def __init__(self, stride: int = 2, sigma: float = 1.0, p_missing: float = 0.0, offset: int = 0,
                 state_shape: tuple[int, ...] | None = None):
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.stride, self.offset = int(stride), int(offset)
        super().__init__(sigma=sigma, p_missing=p_missing, state_shape=state_shape)

    def _axis_matrix(self, n: int) -> Tensor:
        if self.stride > n:
            raise ValueError(f"Subsample with stride={self.stride} on an axis of {n} cells keeps one cell at most; "
                             f"use stride <= {n}")
        idx = torch.arange(self.offset % self.stride, n, self.stride)
        return torch.eye(n, dtype=torch.float64)[idx]

    def _apply(self, x):
        nd = len(self._axes)
        sl = (Ellipsis,) + (slice(self.offset % self.stride, None, self.stride),) * nd
        return x[sl]

    def extra_repr(self) -> str:
        return f"stride={self.stride}, " + super().extra_repr()


class Linear(ObservationModel):
    """Any linear operator ``y = A x`` on the flattened state.

    Args:
        A: ``(M, D)`` matrix, ``D`` the number of state values.
        sigma: observation noise standard deviation.
        p_missing: probability that a value is missing.
        state_shape: defaults to ``(D,)``.
    """

    def __init__(self, A: Tensor, sigma: float = 1.0, p_missing: float = 0.0,
                 state_shape: tuple[int, ...] | None = None):
        A = torch.as_tensor(A)
        if A.dim() != 2 or not A.is_floating_point():
            raise ValueError(f"A must be a floating (M, D) matrix, got shape {tuple(A.shape)} and dtype {A.dtype}")
        if not torch.isfinite(A).all():
            raise ValueError("A contains NaN or infinite values")
        self.A = A
        super().__init__(sigma=sigma, p_missing=p_missing, state_shape=state_shape or (A.shape[1],))

    def _obs_shape(self, state_shape):
        if math.prod(state_shape) != self.A.shape[1]:
            raise ValueError(f"A of shape {tuple(self.A.shape)} needs states of {self.A.shape[1]} values, got state "
                             f"shape {state_shape}")
        return (self.A.shape[0],)

    def _apply(self, x):
        A = self.A.to(dtype=x.dtype, device=x.device)
        return x.flatten(x.dim() - len(self.state_shape)) @ A.T

    def matrix(self, dtype=None, device=None) -> Tensor:
        return self.A.to(dtype=dtype or torch.get_default_dtype(), device=device)

    def extra_repr(self) -> str:
        return f"A={tuple(self.A.shape)}, " + super().extra_repr()

r"""Lorenz-96 models.

One level (Lorenz, 1996), on a periodic ring of :math:`K` nodes:

.. math:: \frac{dx_k}{dt} = (x_{k+1} - x_{k-2})\, x_{k-1} - x_k + F.

Two levels (Lorenz, 1996; Wilks, 2005): :math:`K` slow variables :math:`X_k`, each coupled to :math:`J` fast
variables :math:`Y_{j,k}` on one ring of :math:`JK` nodes,

.. math:: \frac{dX_k}{dt} = X_{k-1}(X_{k+1} - X_{k-2}) - X_k + F - \frac{hc}{b} \sum_{j=1}^{J} Y_{j,k},
.. math:: \frac{dY_{j,k}}{dt} = -cb\, Y_{j+1,k}(Y_{j+2,k} - Y_{j-1,k}) - c\, Y_{j,k} + \frac{hc}{b} X_k .

With ``b = J`` this is also the form with :math:`-hc\,\bar Y_k` and :math:`c(\dots + \frac{h}{J} X_k)` used by
CODA (Zinchenko & Greenberg, 2024) for ``K=36, J=10, F=b=c=10, h=1``.

The one-level truncation drops the coupling term :math:`-\frac{hc}{b}\sum_j Y_{j,k}`; closure learning replaces it
by a function of the slow variables. Both models are integrated with RK4.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Simulator
from .integrators import rk4_step

__all__ = ["Lorenz96", "TwoScaleLorenz96", "lorenz96_tendency"]


def lorenz96_tendency(x: Tensor, F: float | Tensor) -> Tensor:
    """Lorenz-96 tendency ``(x_{k+1} - x_{k-2}) x_{k-1} - x_k + F`` on the last axis (periodic), ``(..., K)``.

    The ring is padded once (two nodes before, one after) and the shifts are views of the padded tensor, which
    is cheaper than three ``torch.roll`` copies.
    """
    xp = torch.cat((x[..., -2:], x, x[..., :1]), dim=-1)  # x_{-2}, x_{-1}, x_0..x_{K-1}, x_K
    # with xp[i] = x_{i-2}: x_{k+1} = xp[k+3], x_{k-2} = xp[k], x_{k-1} = xp[k+1]
    return (xp[..., 3:] - xp[..., :-3]) * xp[..., 1:-2] - x + F


class Lorenz96(Simulator):
    """One-level Lorenz-96 on ``K`` periodic nodes, integrated with RK4.

    Args:
        K: number of nodes (``>= 4``).
        F: forcing; a float, or an ``nn.Parameter`` to learn it (parameter tuning).
        dt: time step of one :meth:`step` (0.05 is the usual "6 hours").
        closure: an optional module ``(..., K) -> (..., K)`` added to the tendency (a learned closure).
        init_std: standard deviation of the random initial state ``x0 ~ N(0, init_std^2 I)``.
    """

    def __init__(self, K: int = 40, F: float | Tensor = 8.0, dt: float = 0.05, closure: nn.Module | None = None,
                 init_std: float = 1.0):
        super().__init__()
        if int(K) != K or K < 4:
            raise ValueError(f"Lorenz96 needs K >= 4 nodes, got K={K}")
        if not dt > 0:
            raise ValueError(f"dt must be positive, got {dt}")
        self.K, self.dt, self.init_std = int(K), float(dt), float(init_std)
        self.state_shape = (self.K,)
        if isinstance(F, nn.Parameter):
            self.F = F
        else:
            self.register_buffer("F", torch.as_tensor(float(F), dtype=torch.get_default_dtype()))
        self.closure = closure

    def tendency(self, x: Tensor) -> Tensor:
        """``dx/dt`` for states ``(..., K)``, the closure included."""
        dx = lorenz96_tendency(x, self.F.to(x.dtype))
        if self.closure is not None:
            dx = dx + self.closure(x)
        return dx

    def step(self, x: Tensor) -> Tensor:
        return rk4_step(self.tendency, x, self.dt)

    def initial_state(self, n, generator=None, dtype=None, device=None) -> Tensor:
        return self.init_std * torch.randn(n, self.K, generator=generator, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        return f"K={self.K}, F={float(self.F):g}, dt={self.dt:g}"


class TwoScaleLorenz96(Simulator):
    """Two-scale Lorenz-96 (Wilks, 2005 form) integrated with RK4.

    The state is the flat vector ``[X_1..X_K, Y_{1,1}..Y_{J,K}]`` of shape ``(K * (J + 1),)``, the fast variables
    ordered so that ``Y_{:,k}`` is the block ``K + k*J : K + (k+1)*J``; :meth:`output` returns the slow part
    ``(..., K)``.

    Args:
        K, J: numbers of slow variables and of fast variables per slow one.
        F, b, c, h: forcing, spatial-scale ratio, time-scale ratio and coupling strength.
        dt: time step (0.005 is stable for ``c = 10``).
    """

    def __init__(self, K: int = 36, J: int = 10, F: float = 10.0, b: float = 10.0, c: float = 10.0,
                 h: float = 1.0, dt: float = 0.005):
        super().__init__()
        if K < 4 or J < 1:
            raise ValueError(f"TwoScaleLorenz96 needs K >= 4 and J >= 1, got K={K}, J={J}")
        if not dt > 0:
            raise ValueError(f"dt must be positive, got {dt}")
        self.K, self.J = int(K), int(J)
        self.F, self.b, self.c, self.h, self.dt = float(F), float(b), float(c), float(h), float(dt)
        self.state_shape = (self.K * (self.J + 1),)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self.K,)

    def output(self, x: Tensor) -> Tensor:
        return x[..., : self.K]

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Slow and fast parts of the state: ``(..., K)`` and ``(..., K * J)``."""
        return x[..., : self.K], x[..., self.K:]

    def coupling(self, x: Tensor) -> Tensor:
        """The coupling term of the slow tendency, ``-(h c / b) sum_j Y_{j,k}``: ``(..., K(J+1)) -> (..., K)``."""
        Y = x[..., self.K:].unflatten(-1, (self.K, self.J))
        return -(self.h * self.c / self.b) * Y.sum(-1)

    def tendency(self, x: Tensor) -> Tensor:
        X, Y = self.split(x)
        dX = lorenz96_tendency(X, self.F) + self.coupling(x)
        # fast ring, oriented the other way: Y_{j+1}(Y_{j+2} - Y_{j-1})
        Yp = torch.cat((Y[..., -1:], Y, Y[..., :2]), dim=-1)  # Yp[i] = Y_{i-1}
        adv = Yp[..., 2:-1] * (Yp[..., 3:] - Yp[..., :-3])
        X_rep = X.repeat_interleave(self.J, dim=-1)
        dY = -self.c * self.b * adv - self.c * Y + (self.h * self.c / self.b) * X_rep
        return torch.cat((dX, dY), dim=-1)

    def step(self, x: Tensor) -> Tensor:
        return rk4_step(self.tendency, x, self.dt)

    def initial_state(self, n, generator=None, dtype=None, device=None) -> Tensor:
        X = torch.randn(n, self.K, generator=generator, dtype=dtype, device=device)
        Y = 0.1 * torch.randn(n, self.K * self.J, generator=generator, dtype=dtype, device=device)
        return torch.cat((X, Y), dim=-1)

    def truncated(self, closure: nn.Module | None = None) -> Lorenz96:
        """The one-level model of the slow variables (coupling dropped), optionally with a closure term."""
        return Lorenz96(K=self.K, F=self.F, dt=self.dt, closure=closure)

    def extra_repr(self) -> str:
        return f"K={self.K}, J={self.J}, F={self.F:g}, b={self.b:g}, c={self.c:g}, h={self.h:g}, dt={self.dt:g}"

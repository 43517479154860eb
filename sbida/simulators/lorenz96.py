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

Speed (one level). When no gradient is needed (under ``torch.no_grad()``, or when neither the state nor ``F``
requires one) and there is no closure, :class:`Lorenz96` takes a fused path: the same floating-point operations in
the same order as the differentiable path (so the same bits), written in place into a few work buffers allocated once
per step. The differentiable path allocates some 30 temporaries per RK4 step, and on CPU these fresh allocations
(page faults) cost more than the arithmetic. For long runs on large batches it can also call a ``torch.compile``\d
step (one C++ kernel per RK4 step); see the ``backend`` argument.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .base import Simulator, needs_derivatives
from .integrators import rk4_step

__all__ = ["Lorenz96", "TwoScaleLorenz96", "lorenz96_tendency"]

BACKENDS = ("auto", "fused", "compile", "reference")


def lorenz96_tendency(x: Tensor, F: float | Tensor) -> Tensor:
    """Lorenz-96 tendency ``(x_{k+1} - x_{k-2}) x_{k-1} - x_k + F`` on the last axis (periodic), ``(..., K)``.

    The ring is padded once (two nodes before, one after) and the shifts are views of the padded tensor, which
    is cheaper than three ``torch.roll`` copies.
    """
    xp = torch.cat((x[..., -2:], x, x[..., :1]), dim=-1)  # x_{-2}, x_{-1}, x_0..x_{K-1}, x_K
    # with xp[i] = x_{i-2}: x_{k+1} = xp[k+3], x_{k-2} = xp[k], x_{k-1} = xp[k+1]
    return (xp[..., 3:] - xp[..., :-3]) * xp[..., 1:-2] - x + F


def _rk4_reference(x: Tensor, F: Tensor, dt: float) -> Tensor:
    """The differentiable RK4 step of the one-level model without closure (what ``torch.compile`` traces)."""
    return rk4_step(lambda z: lorenz96_tendency(z, F), x, dt)


def _rk4_fused(x: Tensor, F: Tensor, dt: float) -> Tensor:
    """One RK4 step of ``dx/dt = lorenz96_tendency(x, F)`` without autograd, in place in four work buffers.

    The operations are those of ``rk4_step(lambda z: lorenz96_tendency(z, F), x, dt)`` in the same order, so the
    result has the same bits; only the temporaries differ (four buffers instead of some 30 fresh tensors).
    """
    K = x.shape[-1]
    yp = x.new_empty(*x.shape[:-1], K + 3)  # the stage input, padded as in lorenz96_tendency: yp[i] = y_{i-2}
    y = yp[..., 2:-1]
    k1, k2, k3 = x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape)

    def tendency(out: Tensor) -> Tensor:  # of the stage input y, written into out
        yp[..., :2].copy_(yp[..., K:K + 2])
        yp[..., K + 2:].copy_(yp[..., 2:3])
        torch.sub(yp[..., 3:], yp[..., :-3], out=out)
        return out.mul_(yp[..., 1:-2]).sub_(y).add_(F)

    y.copy_(x)
    tendency(k1)
    torch.mul(k1, 0.5 * dt, out=y).add_(x)  # x + (dt / 2) k1
    tendency(k2)
    torch.mul(k2, 0.5 * dt, out=y).add_(x)
    tendency(k3)
    torch.mul(k3, dt, out=y).add_(x)
    k2.add_(k3).mul_(2.0)  # 2 (k2 + k3)
    k4 = tendency(k3)
    return k1.add_(k2).add_(k4).mul_(dt / 6.0).add_(x)  # x + (dt / 6) (k1 + 2 (k2 + k3) + k4)


_compiled_step = None  # torch.compile(_rk4_reference), made on first use and shared by all instances
_compile_failed = False


def _compiled(x: Tensor, F: Tensor, dt: float) -> Tensor | None:
    """``_rk4_reference`` through ``torch.compile`` (flattened to ``(N, K)``); ``None`` if compilation fails."""
    global _compiled_step, _compile_failed
    if _compile_failed:
        return None
    try:
        if _compiled_step is None:
            _compiled_step = torch.compile(_rk4_reference, dynamic=False)
        return _compiled_step(x.reshape(-1, x.shape[-1]), F, dt).view(x.shape)
    except Exception as e:  # no compiler, unsupported device, ...: the fused path for the rest of the process
        _compile_failed = True
        warnings.warn(f"Lorenz96: torch.compile failed ({type(e).__name__}: {e}); using the fused eager step",
                      RuntimeWarning, stacklevel=3)
        return None


class Lorenz96(Simulator):
    """One-level Lorenz-96 on ``K`` periodic nodes, integrated with RK4.

    Args:
        K: number of nodes (``>= 4``).
        F: forcing; a float, or an ``nn.Parameter`` to learn it (parameter tuning).
        dt: time step of one :meth:`step` (0.05 is the usual "6 hours").
        closure: an optional module ``(..., K) -> (..., K)`` added to the tendency (a learned closure).
        init_std: standard deviation of the random initial state ``x0 ~ N(0, init_std^2 I)``.
        backend: how a step is computed when no gradient is needed and there is no closure (otherwise the
            differentiable ``"reference"`` path is always used):

            - ``"fused"``: the in-place fused step (same bits as the reference);
            - ``"compile"``: ``torch.compile`` of the reference step (C++ with OpenMP on CPU, Triton on GPU), compiled
              on first use (seconds; more the first time on a machine, the cache is on disk), falling back to
              ``"fused"`` with a warning if compilation fails;
            - ``"auto"`` (default): ``"fused"``, switching to ``"compile"`` on CPU once :meth:`rollout` calls on
              batches of at least :attr:`compile_min_numel` values have asked for :attr:`compile_after`
              values x steps in all: compiling costs a few seconds, so it is bought only after about as much time
              was spent integrating without it (small jobs, such as the default training sets in batches of 256,
              never compile);
            - ``"reference"``: always the differentiable path.
    """

    compile_after: float = 1e9  # values x steps of large-batch rollouts before "auto" compiles (~4 s of fused work)
    compile_min_numel: int = 2**16  # smallest state batch (values) that "auto" compiles for

    def __init__(self, K: int = 40, F: float | Tensor = 8.0, dt: float = 0.05, closure: nn.Module | None = None,
                 init_std: float = 1.0, backend: str = "auto"):
        super().__init__()
        if int(K) != K or K < 4:
            raise ValueError(f"Lorenz96 needs K >= 4 nodes, got K={K}")
        if not dt > 0:
            raise ValueError(f"dt must be positive, got {dt}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self._work = 0.0  # values x steps asked of rollout on large batches ("auto")
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

    def _fast(self, x: Tensor) -> bool:
        """Whether ``x`` can take the fused or compiled path: no closure, no gradient wanted."""
        return self.backend != "reference" and self.closure is None and not needs_derivatives(x, self)

    def _use_compiled(self, x: Tensor) -> bool:
        if self.backend == "compile":
            return True
        return (self.backend == "auto" and self._work >= self.compile_after and x.device.type == "cpu"
                and x.numel() >= self.compile_min_numel)

    def step(self, x: Tensor) -> Tensor:
        if not self._fast(x):
            return rk4_step(self.tendency, x, self.dt)
        with torch.no_grad():
            F = self.F.to(x.dtype)
            if self._use_compiled(x):
                y = _compiled(x, F, self.dt)
                if y is not None:
                    return y
            return _rk4_fused(x, F, self.dt)

    def rollout(self, x: Tensor, steps: int, every: int = 1, check: bool = True, output: bool = False,
                callback=None) -> Tensor:
        if (self.backend == "auto" and isinstance(x, Tensor) and x.numel() >= self.compile_min_numel
                and self._fast(x)):
            self._work += float(x.numel()) * max(int(steps), 0)
        return super().rollout(x, steps, every=every, check=check, output=output, callback=callback)

    rollout.__doc__ = Simulator.rollout.__doc__

    def initial_state(self, n, generator=None, dtype=None, device=None) -> Tensor:
        return self.init_std * torch.randn(n, self.K, generator=generator, dtype=dtype, device=device)

    def extra_repr(self) -> str:
        backend = "" if self.backend == "auto" else f", backend={self.backend!r}"
        return f"K={self.K}, F={float(self.F.detach()):g}, dt={self.dt:g}{backend}"


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

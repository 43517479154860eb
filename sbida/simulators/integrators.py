r"""Explicit time integrators.

The classical fourth-order Runge-Kutta step for :math:`\dot x = f(x)`:

.. math:: k_1 = f(x),\; k_2 = f(x + \tfrac{h}{2} k_1),\; k_3 = f(x + \tfrac{h}{2} k_2),\; k_4 = f(x + h k_3),
          \qquad x' = x + \tfrac{h}{6} (k_1 + 2 k_2 + 2 k_3 + k_4).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["rk4_step", "euler_step"]


def rk4_step(f: Callable[[Tensor], Tensor], x: Tensor, dt: float | Tensor) -> Tensor:
    """One fourth-order Runge-Kutta step of ``dx/dt = f(x)``.

    Args:
        f: the tendency, mapping ``(..., *shape)`` to ``(..., *shape)``.
        x: the state, ``(..., *shape)``.
        dt: the time step (a float or a 0-d tensor, which may require a gradient).

    Returns:
        The state after one step, ``(..., *shape)``.
    """
    k1 = f(x)
    k2 = f(x + (0.5 * dt) * k1)
    k3 = f(x + (0.5 * dt) * k2)
    k4 = f(x + dt * k3)
    return x + (dt / 6.0) * (k1 + 2.0 * (k2 + k3) + k4)


def euler_step(f: Callable[[Tensor], Tensor], x: Tensor, dt: float | Tensor) -> Tensor:
    """One forward-Euler step of ``dx/dt = f(x)``; ``x`` is ``(..., *shape)``."""
    return x + dt * f(x)

r"""The simulator interface.

A simulator is a :class:`torch.nn.Module` for a discrete-time map :math:`x_{s+1} = M(x_s)`, batched over any
leading dimensions and differentiable end to end (parameters such as the forcing may be
:class:`torch.nn.Parameter`). Its state has shape :attr:`state_shape`; what a task sees of the state (the part that
is observed and inferred) is :meth:`output`, of shape :attr:`output_shape` (the identity unless the dynamics carry
more than the task needs, e.g. the fast variables of the two-scale Lorenz-96 model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["Simulator", "check_state"]


def check_state(x: Tensor, shape: tuple[int, ...], name: str = "state") -> None:
    """Raise a ``ValueError`` unless ``x`` is a floating tensor ``(..., *shape)`` with finite values."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (..., {', '.join(map(str, shape))}), "
                         f"got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != tuple(shape):
        raise ValueError(f"{name} must have shape (..., {', '.join(map(str, shape))}), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        n = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {n} NaN or infinite value(s)")


def needs_derivatives(x: Tensor, module: nn.Module | None = None) -> bool:
    """Whether operations on ``x`` must keep derivatives: autograd (``x`` or a parameter of ``module`` requires a
    gradient), forward-mode AD (a dual tensor) or a ``torch.func`` transform (``vmap``, ``jvp``, ``grad``...).

    In-place or ``out=`` shortcuts are only safe when this is ``False``.
    """
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return True
    if torch.autograd.forward_ad.unpack_dual(x).tangent is not None:
        return True
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or (module is not None and any(p.requires_grad for p in module.parameters()))


def _all_finite(x: Tensor) -> bool:
    """Whether every value of ``x`` is finite; one reduction when they are (a finite sum implies finite terms)."""
    x = x.detach()
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


class Simulator(nn.Module):
    """Base class of the simulators.

    Subclasses set :attr:`state_shape` and :attr:`dt` (the time between two calls of :meth:`step`) and implement
    :meth:`step` and :meth:`initial_state`; :meth:`output` defaults to the identity.
    """

    state_shape: tuple[int, ...]
    dt: float
    check_every: int = 8  # steps between two finiteness tests in rollout

    @property
    def output_shape(self) -> tuple[int, ...]:
        """Shape of :meth:`output`, the part of the state a task observes and infers."""
        return self.state_shape

    def output(self, x: Tensor) -> Tensor:
        """The task-facing part of the state: ``(..., *state_shape) -> (..., *output_shape)``."""
        return x

    def initial_state(self, n: int, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                      device: torch.device | str | None = None) -> Tensor:
        """Draw ``n`` initial states, ``(n, *state_shape)``."""
        raise NotImplementedError

    def step(self, x: Tensor) -> Tensor:
        """Advance ``(..., *state_shape)`` states by one time step :attr:`dt`."""
        raise NotImplementedError

    def check(self, x: Tensor, name: str = "state") -> None:
        """Validate a state batch: shape ``(..., *state_shape)``, floating point, finite."""
        check_state(x, self.state_shape, name)

    def rollout(self, x: Tensor, steps: int, every: int = 1, check: bool = True, output: bool = False,
                callback: Callable[[], None] | None = None) -> Tensor:
        """Integrate ``steps`` steps from ``x`` and keep every ``every``-th state, the initial one included.

        Args:
            x: initial states, ``(..., *state_shape)``.
            steps: number of calls of :meth:`step`; must be a multiple of ``every``.
            every: keep one state every ``every`` steps.
            check: validate ``x`` and stop with a ``ValueError`` naming the step at which the states stop being
                finite (a time step too large for the dynamics, say). The states are tested every
                :attr:`check_every` steps (and after the last one); on a failure the steps since the last good
                state are replayed one by one to name the first non-finite one. Under ``torch.vmap`` and the
                other ``torch.func`` transforms, where values cannot be inspected, no test is made.
            output: keep :meth:`output` of the states rather than the states (less memory).
            callback: called with no argument after each kept state (a progress bar's update, say).

        Returns:
            The trajectory, ``(..., steps // every + 1, *state_shape)`` (``output_shape`` if ``output``).
        """
        if steps < 0 or every < 1 or steps % every:
            raise ValueError(f"steps must be a non-negative multiple of every >= 1, got steps={steps}, every={every}")
        check = check and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        if check:
            self.check(x)
        keep = self.output if output else (lambda z: z)
        n = len(self.output_shape if output else self.state_shape)
        first = keep(x)
        dim = first.dim() - n  # the time axis of the trajectory
        # Without autograd the kept states go straight into the trajectory (no list of tensors, no final copy);
        # with it they are stacked, which keeps the trajectory differentiable.
        graph = needs_derivatives(x, self)
        if graph:
            states = [first]
        else:
            traj = first.new_empty(*first.shape[:dim], steps // every + 1, *first.shape[dim:])
            traj.select(dim, 0).copy_(first)
        good, good_step = x, 0  # the last state that passed the check
        for s in range(1, steps + 1):
            x = self.step(x)
            if check and (s % self.check_every == 0 or s == steps):
                if not _all_finite(x):
                    self._blew_up(good, good_step, s)
                good, good_step = x, s
            if s % every == 0:
                if graph:
                    states.append(keep(x))
                else:
                    traj.select(dim, s // every).copy_(keep(x))
                if callback is not None:
                    callback()
        return torch.stack(states, dim=dim) if graph else traj

    def _blew_up(self, x: Tensor, start: int, stop: int) -> None:
        """Replay the steps ``start + 1 .. stop`` from the finite state ``x`` and raise naming the first bad one."""
        bad = stop
        with torch.no_grad():
            for s in range(start + 1, stop + 1):
                x = self.step(x)
                if not torch.isfinite(x).all():
                    bad = s
                    break
        raise ValueError(
            f"{type(self).__name__} blew up at step {bad} (time {bad * self.dt:.4g}): the state is no longer "
            f"finite. The time step dt={self.dt:g} is probably too large for these dynamics; try a smaller dt."
        )

    def extra_repr(self) -> str:
        return f"state_shape={self.state_shape}, dt={self.dt:g}"

r"""What the classical baselines share: the window geometry, the dynamics, the observation operator, the climatology.

A window of ``T`` observation times at offsets :math:`o_1 < \dots < o_T` (in saved states, relative to the target)
observes :math:`y_j = H x_{s + o_j} + \sigma \varepsilon_j` on the entries where ``mask`` is true; consecutive
saved states are ``every`` simulator steps apart, so :math:`x_{s + o_{j+1}} = M^{(o_{j+1} - o_j)\,\text{every}}
(x_{s + o_j})`. A baseline turns a batch of windows ``(y, mask, t)`` into a :class:`~sbida.posterior.Posterior` of
:math:`x_s`, with the background (prior) at the window's first time :math:`t + o_1 \cdot \text{every} \cdot dt` from
a time-binned :class:`~sbida.baselines.climatology.Climatology` estimated by :meth:`Baseline.fit`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..observations import ObservationModel
from ..posterior import Posterior
from ..simulators.base import Simulator
from .climatology import Climatology

__all__ = ["Baseline", "baseline_model"]


def baseline_model(task) -> Simulator:
    """The dynamics a baseline integrates for a task: the simulator, or its one-level truncation if it has fast
    variables that the task does not observe (two-scale Lorenz-96)."""
    sim = task.simulator
    if tuple(sim.state_shape) != tuple(sim.output_shape) and hasattr(sim, "truncated"):
        return sim.truncated()
    return sim


class Baseline:
    """Base class: a classical method run on batches of windows.

    Args:
        simulator: the dynamics ``x -> M(x)``; its state must be what is observed and inferred, except for the
            baselines that never run it (``integrates = False``: climatology, interpolation, OI), which estimate its
            output (e.g. the velocity of the Kolmogorov flow).
        observation: the (linear) observation model, bound to the simulator's state shape here.
        offsets: the window's times relative to the target, in saved states (increasing, containing 0).
        every: simulator steps between two saved states.
        climatology: a :class:`Climatology`; otherwise call :meth:`fit`.
    """

    name = "baseline"
    integrates = True  # False: the method never runs the dynamics, so it may estimate a simulator's output

    def __init__(self, simulator: Simulator, observation: ObservationModel, offsets: Sequence[int], every: int = 1,
                 climatology: Climatology | None = None):
        if self.integrates and tuple(simulator.state_shape) != tuple(simulator.output_shape):
            raise ValueError(f"{type(self).__name__} integrates the observed state; {type(simulator).__name__} has "
                             f"state {simulator.state_shape} but output {simulator.output_shape} (use its truncated "
                             "model)")
        offsets = [int(o) for o in offsets]
        if not offsets or any(b <= a for a, b in zip(offsets, offsets[1:])) or 0 not in offsets:
            raise ValueError(f"offsets must be increasing integers containing 0 (the target), got {offsets}")
        if int(every) != every or every < 1:
            raise ValueError(f"every must be a positive integer number of simulator steps, got {every}")
        shape = tuple(simulator.state_shape if self.integrates else simulator.output_shape)
        self.simulator, self.observation = simulator, observation.bind(shape)
        self.offsets, self.every = offsets, int(every)
        self.target_index = offsets.index(0)
        self.state_shape = shape
        self.obs_shape = tuple(self.observation.obs_shape)
        self.D, self.P = math.prod(self.state_shape), math.prod(self.obs_shape)
        self.H = self.observation.matrix(dtype=torch.float64)  # (P, D)
        self.sigma = float(self.observation.sigma)
        if climatology is not None and climatology.dim != self.D:
            raise ValueError(f"the climatology is over {climatology.dim} values, the states have {self.D}")
        self.climatology = climatology

    @classmethod
    def from_task(cls, task, **kwargs):
        """Build from a :class:`~sbida.tasks.Task`: its dynamics, observation model, window and save interval."""
        return cls(baseline_model(task), task.observation, task.window.offsets(), every=task.config.data.save_every,
                   **kwargs)

    # -- climatology ----------------------------------------------------------------------------------------------
    def fit(self, dataset, **kwargs):
        """Estimate the time-binned climatology from a training dataset (see :meth:`Climatology.fit`).

        Returns:
            ``self``.
        """
        if tuple(dataset.state_shape) != self.state_shape:
            raise ValueError(f"the dataset's states have shape {dataset.state_shape}, the baseline's "
                             f"{self.state_shape}")
        every = dataset.meta.get("every") if hasattr(dataset, "meta") else None
        if every is not None and int(every) != self.every:
            raise ValueError(f"the dataset saves a state every {every} simulator steps, the baseline assumes "
                             f"every={self.every}")
        self.climatology = Climatology.fit(dataset, **kwargs)
        return self

    def _clim(self) -> Climatology:
        if self.climatology is None:
            raise ValueError(f"{type(self).__name__} has no climatology yet: call .fit(train_dataset) first")
        return self.climatology

    @property
    def step_time(self) -> float:
        """Time between two saved states, ``every * dt``."""
        return self.every * float(self.simulator.dt)

    def start_time(self, t: Tensor) -> Tensor:
        """Time of each window's first observation, ``t + o_1 * every * dt``: ``(B,)``."""
        return t.to(torch.float64) + self.offsets[0] * self.step_time

    # -- dynamics -------------------------------------------------------------------------------------------------
    def forecast(self, x: Tensor, saved: int = 1) -> Tensor:
        """Advance flattened states ``(..., D)`` by ``saved`` saved states (``saved * every`` simulator steps)."""
        z = x.reshape(*x.shape[:-1], *self.state_shape)
        for _ in range(saved * self.every):
            z = self.simulator.step(z)
        return z.reshape(x.shape)

    # -- input checks ---------------------------------------------------------------------------------------------
    def check_windows(self, y: Tensor, mask: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Validate a batch of windows and flatten it.

        Args:
            y: ``(B, T, *obs_shape)`` observations.
            mask: ``(B, T, *obs_shape)`` boolean or 0/1 mask.
            t: ``(B,)`` target times.

        Returns:
            ``y`` ``(B, T, P)`` with zeros where missing, ``mask`` ``(B, T, P)`` bool, ``t`` ``(B,)``.
        """
        T = len(self.offsets)
        for name, a in (("y", y), ("mask", mask), ("t", t)):
            if not isinstance(a, Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(a).__name__}")
        expected = f"(B, {T}, {', '.join(map(str, self.obs_shape))})"
        if y.dim() != 2 + len(self.obs_shape) or tuple(y.shape[1:]) != (T, *self.obs_shape):
            raise ValueError(f"y must be {expected}, got {tuple(y.shape)}")
        if mask.shape != y.shape:
            raise ValueError(f"mask must have the shape of y {tuple(y.shape)}, got {tuple(mask.shape)}")
        B = y.shape[0]
        if B < 1:
            raise ValueError("the batch of windows is empty")
        if t.shape != (B,):
            raise ValueError(f"t must be ({B},), got {tuple(t.shape)}")
        if not y.is_floating_point():
            raise ValueError(f"y must be floating point, got {y.dtype}")
        mask = mask if mask.dtype == torch.bool else mask != 0
        if not torch.isfinite(torch.where(mask, y, torch.zeros((), dtype=y.dtype))).all():
            raise ValueError("y contains NaN or infinite observed values")
        if not torch.isfinite(t).all():
            raise ValueError("t contains NaN or infinite values")
        empty = ~mask.reshape(B, -1).any(-1)
        if empty.any():
            raise ValueError(f"{int(empty.sum())} window(s) have an empty mask (no observed value), e.g. window "
                             f"{int(empty.nonzero()[0])}")
        y = torch.where(mask, y, torch.zeros((), dtype=y.dtype)).reshape(B, T, self.P)
        return y, mask.reshape(B, T, self.P), t

    # -- interface ------------------------------------------------------------------------------------------------
    def posterior(self, y: Tensor, mask: Tensor, t: Tensor) -> Posterior:
        """The posterior of the target states of a batch of windows (see the subclasses)."""
        raise NotImplementedError

    def __call__(self, y: Tensor, mask: Tensor, t: Tensor) -> Posterior:
        return self.posterior(y, mask, t)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(state {self.state_shape}, obs {self.obs_shape}, offsets "
                f"{self.offsets[0]}..{self.offsets[-1]}, every={self.every})")

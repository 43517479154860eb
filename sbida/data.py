r"""Windows of observations and the datasets made of them.

A dataset holds ``N`` simulated trajectories of ``S`` saved states each, the observation of every state, and a
window specification. Item ``i`` is the triple (with the mask) for one target state:

.. math:: \big(x_{s},\; y_{s + o_1 : s + o_T},\; m_{s + o_1 : s + o_T},\; t_s\big),

where :math:`o_1 < \dots < o_T` are the window's offsets: :math:`-(T-1), \dots, 0` for a window ending at the target
(filtering) and :math:`-\lfloor T/2 \rfloor, \dots, T - 1 - \lfloor T/2 \rfloor` for a window centred on it
(smoothing). Windows that share times share their observations, as in real data assimilation.

The arrays are kept once per trajectory (not once per window), saved to HDF5 chunked by trajectory with the task
configuration beside them, and split by trajectory so that no trajectory crosses train, validation and test.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .observations import ObservationModel
from .simulators.base import Simulator

__all__ = ["Window", "WindowDataset", "simulate_windows", "simulate_trajectories"]

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Window:
    """Which observation times a window holds, relative to its target state.

    Args:
        length: number of observation times ``T`` (``>= 1``).
        align: ``"end"`` (the window ends at the target: filtering) or ``"centre"`` (smoothing).
    """

    length: int = 10
    align: str = "end"

    def __post_init__(self):
        if int(self.length) != self.length or self.length < 1:
            raise ValueError(f"window length must be an integer >= 1, got {self.length!r}")
        if self.align not in ("end", "centre", "center"):
            raise ValueError(f"window align must be 'end' or 'centre', got {self.align!r}")
        if self.align == "center":
            object.__setattr__(self, "align", "centre")

    def offsets(self) -> list[int]:
        """Offsets of the ``T`` observation times from the target, in saved states (increasing)."""
        T = int(self.length)
        first = -(T - 1) if self.align == "end" else -(T // 2)
        return list(range(first, first + T))


def simulate_trajectories(simulator: Simulator, n: int, states: int, every: int = 1, burn_in: int = 0,
                          generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32,
                          batch_size: int = 256, progress: bool = True, desc: str = "simulating") -> Tensor:
    """Simulate ``n`` trajectories and keep the task-facing part of ``states`` saved states of each.

    Args:
        simulator: the dynamics.
        n: number of trajectories, each from :meth:`Simulator.initial_state`.
        states: saved states per trajectory (the first one included).
        every: simulator steps between saved states.
        burn_in: simulator steps run and discarded before the first saved state (spin-up).
        generator: random generator for the initial states.
        dtype: precision of the integration; the result is returned in this dtype.
        batch_size: trajectories integrated at once.
        progress: show a progress bar.

    Returns:
        ``(n, states, *simulator.output_shape)``.
    """
    if n < 1 or states < 1 or every < 1 or burn_in < 0:
        raise ValueError(f"need n >= 1, states >= 1, every >= 1 and burn_in >= 0, got n={n}, states={states}, "
                         f"every={every}, burn_in={burn_in}")
    x0 = simulator.initial_state(n, generator=generator, dtype=dtype)
    out = torch.empty(n, states, *simulator.output_shape, dtype=dtype)
    total = n * (states - 1 + (1 if burn_in else 0))
    with torch.no_grad(), tqdm(total=total, desc=desc, unit="state", disable=not progress, leave=False) as bar:
        for i in range(0, n, batch_size):
            x = x0[i:i + batch_size]
            if burn_in:
                x = simulator.rollout(x, burn_in, every=burn_in)[:, -1]
                bar.update(len(x))
            out[i:i + batch_size] = simulator.rollout(x, (states - 1) * every, every=every, output=True,
                                                      callback=partial(bar.update, len(x)))
    return out


def simulate_windows(simulator: Simulator, observation: ObservationModel, window: int | Window = 10,
                     n_trajectories: int = 1024, states: int = 1024, every: int = 1, burn_in: int = 0,
                     stride: int = 1, seed: int = 0, dtype: torch.dtype = torch.float32, batch_size: int = 256,
                     progress: bool = True, config: dict | None = None) -> WindowDataset:
    """Simulate trajectories, observe every saved state and index the windows.

    Args:
        simulator: the dynamics; its :meth:`~Simulator.output` is what is observed and inferred.
        observation: the observation model (bound to the simulator's output shape here).
        window: a :class:`Window`, or its length (then ending at the target).
        n_trajectories: number of independent trajectories.
        states: saved states per trajectory.
        every: simulator steps between saved states (``t`` advances by ``every * dt``).
        burn_in: simulator steps discarded first (``t = 0`` is the first saved state).
        stride: saved states between the targets of consecutive windows of a trajectory.
        seed: seed of the initial states, the noise and the masks; the same seed gives the same bytes.
        dtype: precision of the integration and of the stored arrays.
        batch_size: trajectories integrated at once.
        progress: show a progress bar.
        config: the task configuration, stored with the data.

    Returns:
        A :class:`WindowDataset`.
    """
    window = window if isinstance(window, Window) else Window(int(window))
    offsets = window.offsets()
    span = offsets[-1] - offsets[0] + 1
    if span > states:
        raise ValueError(f"a window of {window.length} observation times does not fit in a trajectory of {states} "
                         f"saved states; use states >= {span} or a shorter window")
    observation.bind(simulator.output_shape)
    g = torch.Generator().manual_seed(int(seed))
    x = simulate_trajectories(simulator, n_trajectories, states, every=every, burn_in=burn_in, generator=g,
                              dtype=dtype, batch_size=batch_size, progress=progress)
    y, mask = observation.sample(x, generator=g)
    times = torch.arange(states, dtype=torch.float64) * (every * simulator.dt)
    meta = {"seed": int(seed), "every": int(every), "burn_in": int(burn_in), "dt": float(simulator.dt),
            "simulator": repr(simulator), "observation": repr(observation)}
    return WindowDataset(x, y, mask, times, window=window, stride=stride, config=config, meta=meta)


class WindowDataset(Dataset):
    """Windows of observations over stored trajectories; a torch ``Dataset`` of ``(x, y, mask, t)``.

    Args:
        states: ``(N, S, *state_shape)`` true states.
        y: ``(N, S, *obs_shape)`` observations (zeros where missing).
        mask: ``(N, S, *obs_shape)`` boolean mask.
        times: ``(S,)`` time of each saved state.
        window: the window specification.
        stride: saved states between consecutive targets.
        trajectory_ids: ``(N,)`` identifiers of the trajectories (kept through splits).
        config: the task configuration (stored in the HDF5 file).
        meta: other facts about the simulation (seed, ``dt``...).

    Item ``i`` is ``(x (*state_shape), y (T, *obs_shape), mask (T, *obs_shape), t ())``; a batch of items, from
    :meth:`get` or a :meth:`loader`, has a leading batch dimension.
    """

    def __init__(self, states: Tensor, y: Tensor, mask: Tensor, times: Tensor, window: Window | int = 10,
                 stride: int = 1, trajectory_ids: Tensor | None = None, config: dict | None = None,
                 meta: dict | None = None):
        window = window if isinstance(window, Window) else Window(int(window))
        if states.dim() < 3 or y.dim() < 2:
            raise ValueError(f"states must be (N, S, *state_shape) and y (N, S, *obs_shape), got "
                             f"{tuple(states.shape)} and {tuple(y.shape)}")
        if y.shape != mask.shape or y.shape[:2] != states.shape[:2]:
            raise ValueError(f"states {tuple(states.shape)}, y {tuple(y.shape)} and mask {tuple(mask.shape)} must "
                             f"share (N, S), and y and mask their whole shape")
        if times.shape != (states.shape[1],):
            raise ValueError(f"times must be ({states.shape[1]},), got {tuple(times.shape)}")
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.states, self.y, self.mask = states, y, mask.bool()
        self.times = times.to(torch.float64)
        self.window, self.stride = window, int(stride)
        N, S = states.shape[:2]
        self.trajectory_ids = torch.arange(N) if trajectory_ids is None else torch.as_tensor(trajectory_ids)
        self.config = config or {}
        self.meta = meta or {}
        self._offsets = torch.tensor(window.offsets())
        first, last = -int(self._offsets[0]), S - 1 - int(self._offsets[-1])
        if last < first:
            raise ValueError(f"a window of {window.length} observation times ({window.align}-aligned) does not fit "
                             f"in trajectories of {S} saved states")
        self._targets = torch.arange(first, last + 1, self.stride)

    # -- shapes and sizes -----------------------------------------------------------------------------------------
    @property
    def state_shape(self) -> tuple[int, ...]:
        return tuple(self.states.shape[2:])

    @property
    def obs_shape(self) -> tuple[int, ...]:
        return tuple(self.y.shape[2:])

    @property
    def n_trajectories(self) -> int:
        return self.states.shape[0]

    @property
    def windows_per_trajectory(self) -> int:
        return len(self._targets)

    def __len__(self) -> int:
        return self.n_trajectories * self.windows_per_trajectory

    # -- access ---------------------------------------------------------------------------------------------------
    def locate(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Trajectory and saved-state position of the targets of windows ``index`` (``(B,)`` each)."""
        index = torch.as_tensor(index, dtype=torch.long)
        if len(self) == 0 or (index.numel() and (index.min() < -len(self) or index.max() >= len(self))):
            raise IndexError(f"window index out of range for a dataset of {len(self)} windows")
        index = index % len(self)
        return index // self.windows_per_trajectory, self._targets[index % self.windows_per_trajectory]

    def get(self, index: Tensor | Sequence[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A batch of windows.

        Returns:
            ``x`` ``(B, *state_shape)``, ``y`` ``(B, T, *obs_shape)``, ``mask`` ``(B, T, *obs_shape)``, ``t``
            ``(B,)`` (in the dtype of the states).
        """
        n, s = self.locate(index)
        w = s[:, None] + self._offsets
        return self.states[n, s], self.y[n[:, None], w], self.mask[n[:, None], w], self.times[s].to(self.states.dtype)

    def __getitem__(self, i: int):
        x, y, m, t = self.get(torch.tensor([int(i)]))
        return x[0], y[0], m[0], t[0]

    def __getitems__(self, indices: list[int]):
        return [self.get(indices)]

    def loader(self, batch_size: int = 256, shuffle: bool = False, generator: torch.Generator | None = None,
               drop_last: bool = False) -> DataLoader:
        """A ``DataLoader`` of batches ``(x, y, mask, t)`` gathered in one indexing operation per batch."""
        return DataLoader(self, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=drop_last,
                          collate_fn=lambda items: items[0])

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """All windows as one batch (see :meth:`get`)."""
        return self.get(torch.arange(len(self)))

    # -- splits ---------------------------------------------------------------------------------------------------
    def subset(self, trajectories: Tensor | Sequence[int]) -> WindowDataset:
        """The dataset restricted to some trajectories (positions ``0..N-1``)."""
        i = torch.as_tensor(trajectories, dtype=torch.long)
        return WindowDataset(self.states[i], self.y[i], self.mask[i], self.times, self.window, self.stride,
                             self.trajectory_ids[i], self.config, self.meta)

    def split(self, *fractions: float, seed: int = 0) -> tuple[WindowDataset, ...]:
        """Split by trajectory, e.g. ``train, val, test = data.split(0.8, 0.1, 0.1)``.

        Trajectories are shuffled with ``seed`` and cut in the given proportions (which must sum to at most 1;
        rounding gives the remainder to the first part). No trajectory appears in two parts.
        """
        if not fractions or any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9:
            raise ValueError(f"fractions must be non-negative and sum to at most 1, got {fractions}")
        N = self.n_trajectories
        sizes = [int(math.floor(f * N)) for f in fractions]
        if math.isclose(sum(fractions), 1.0):
            sizes[0] += N - sum(sizes)
        if any(s == 0 for s, f in zip(sizes, fractions) if f > 0):
            raise ValueError(f"{N} trajectories are too few to split in proportions {fractions}: a part would be "
                             f"empty")
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
        parts, start = [], 0
        for s in sizes:
            parts.append(self.subset(perm[start:start + s].sort().values))
            start += s
        return tuple(parts)

    # -- HDF5 -----------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write to HDF5: arrays chunked by trajectory, the configuration and window beside them (as attributes).

        Saving the same data twice gives the same bytes (no timestamps are stored).
        """
        import h5py

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(path, "w", track_order=False) as f:
            for name, arr in (("states", self.states), ("y", self.y), ("mask", self.mask)):
                a = arr.numpy()
                f.create_dataset(name, data=a, chunks=(1,) + a.shape[1:], track_times=False)
            f.create_dataset("times", data=self.times.numpy(), track_times=False)
            f.create_dataset("trajectory_ids", data=self.trajectory_ids.numpy(), track_times=False)
            f.attrs["format_version"] = FORMAT_VERSION
            f.attrs["window"] = json.dumps(asdict(self.window))
            f.attrs["stride"] = self.stride
            f.attrs["config"] = json.dumps(self.config, sort_keys=True)
            f.attrs["meta"] = json.dumps(self.meta, sort_keys=True)
        return path

    @classmethod
    def load(cls, path: str | Path) -> WindowDataset:
        """Read a dataset written by :meth:`save`."""
        import h5py

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no dataset at {path}")
        with h5py.File(path, "r") as f:
            missing = {"states", "y", "mask", "times"} - set(f.keys())
            if missing:
                raise ValueError(f"{path} is not a sbida dataset: it lacks {sorted(missing)}")
            version = int(f.attrs.get("format_version", 0))
            if version > FORMAT_VERSION:
                raise ValueError(f"{path} has format version {version}; this sbida reads up to {FORMAT_VERSION}")
            arrays = {k: torch.from_numpy(np.asarray(f[k])) for k in ("states", "y", "mask", "times")}
            ids = torch.from_numpy(np.asarray(f["trajectory_ids"])) if "trajectory_ids" in f else None
            window = Window(**json.loads(f.attrs["window"]))
            stride = int(f.attrs.get("stride", 1))
            config = json.loads(f.attrs.get("config", "{}"))
            meta = json.loads(f.attrs.get("meta", "{}"))
        return cls(arrays["states"], arrays["y"], arrays["mask"], arrays["times"], window, stride, ids, config, meta)

    # -- description ----------------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A short hash of the arrays (equal for equal data)."""
        h = hashlib.sha256()
        for a in (self.states, self.y, self.mask, self.times, self.trajectory_ids):
            h.update(a.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def stats(self) -> dict[str, Any]:
        """Summary figures: sizes, shapes, observed fraction, state mean and std, time range."""
        return {
            "trajectories": self.n_trajectories,
            "states_per_trajectory": self.states.shape[1],
            "windows": len(self),
            "state_shape": list(self.state_shape),
            "obs_shape": list(self.obs_shape),
            "window": f"{self.window.length} times, {self.window.align}-aligned",
            "observed_fraction": float(self.mask.float().mean()),
            "state_mean": float(self.states.double().mean()),
            "state_std": float(self.states.double().std()),
            "t_range": [float(self.times[self._targets[0]]), float(self.times[self._targets[-1]])],
            "fingerprint": self.fingerprint(),
        }

    def summary(self) -> str:
        """A few lines describing the dataset."""
        s = self.stats()
        name = self.config.get("name", "dataset")
        return "\n".join([
            f"{name}: {s['trajectories']} trajectories x {s['states_per_trajectory']} states, {s['windows']} windows",
            f"  state {tuple(s['state_shape'])}, observation {tuple(s['obs_shape'])}, window {s['window']}",
            f"  observed fraction {s['observed_fraction']:.3f}, state mean {s['state_mean']:.3f} "
            f"std {s['state_std']:.3f}, t in [{s['t_range'][0]:.3g}, {s['t_range'][1]:.3g}]",
            f"  fingerprint {s['fingerprint']}",
        ])

    def __repr__(self) -> str:
        return (f"WindowDataset({self.n_trajectories} trajectories, {len(self)} windows, state {self.state_shape}, "
                f"obs {self.obs_shape}, {self.window})")

r"""Windows of observations and the datasets made of them.

A dataset holds ``N`` simulated trajectories of ``S`` saved states each, the observation of every state, and a
window specification. Item ``i`` is the triple (with the mask) for one target state:

.. math:: \big(x_{s},\; y_{s + o_1 : s + o_T},\; m_{s + o_1 : s + o_T},\; t_s\big),

where :math:`o_1 < \dots < o_T` are the window's offsets: :math:`-(T-1), \dots, 0` for a window ending at the target
(filtering) and :math:`-\lfloor T/2 \rfloor, \dots, T - 1 - \lfloor T/2 \rfloor` for a window centred on it
(smoothing). Windows that share times share their observations, as in real data assimilation.

The arrays are kept once per trajectory (not once per window), saved to HDF5 chunked by trajectory with the task
configuration beside them, and split by trajectory so that no trajectory crosses train, validation and test.
A dataset larger than memory is opened from such files without loading them (:meth:`WindowDataset.open`): a
batch then reads, in one sorted selection per file, only the states its windows cover. A large simulation can be
split into shards by seed (:func:`simulate_shards`) and the shard files opened as one dataset.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
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

__all__ = ["Window", "WindowDataset", "H5Array", "IndexPermutation", "simulate_windows", "simulate_shards",
           "shard_seed", "simulate_trajectories"]

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
                     progress: bool = True, config: dict | None = None, first_id: int = 0) -> WindowDataset:
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
        first_id: identifier of the first trajectory (they are numbered ``first_id, first_id + 1, ...``).

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
    ids = torch.arange(int(first_id), int(first_id) + n_trajectories)
    return WindowDataset(x, y, mask, times, window=window, stride=stride, trajectory_ids=ids, config=config,
                         meta=meta)


def shard_seed(seed: int, k: int) -> int:
    """The seed of shard ``k`` of a dataset of seed ``seed``: a 63-bit number drawn from ``(seed, k)``
    (``numpy.random.SeedSequence``), so that no shard repeats a dataset simulated with a small seed of its own (with
    ``seed + k``, a test set of seed 1 was shard 1 of the training set of seed 0, trajectory for trajectory)."""
    state = np.random.SeedSequence([int(seed), int(k)]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def simulate_shards(simulator: Simulator, observation: ObservationModel, directory: str | Path, shards: int,
                    n_trajectories: int, seed: int = 0, progress: bool = True, **kwargs: Any) -> list[Path]:
    """Simulate a dataset in ``shards`` files, shard ``k`` with seed :func:`shard_seed` ``(seed, k)``, and write them
    to ``directory``.

    Open the files as one dataset with ``WindowDataset.open(paths)``; trajectory identifiers run on from shard to
    shard. Each shard is in memory only while it is simulated and written.

    Args:
        simulator, observation: as for :func:`simulate_windows`.
        directory: folder of the files ``shard-00000.h5``, ``shard-00001.h5``...
        shards: number of shards (``1 <= shards <= n_trajectories``).
        n_trajectories: trajectories in all, shared as evenly as possible.
        seed: the dataset's seed (each shard's is drawn from it and the shard's number).
        progress: show a progress bar over the shards.
        kwargs: other arguments of :func:`simulate_windows` (``window``, ``states``, ``every``, ``config``...).

    Returns:
        The paths of the shard files, in order.
    """
    if not 1 <= shards <= n_trajectories:
        raise ValueError(f"need 1 <= shards <= n_trajectories, got shards={shards} and n_trajectories={n_trajectories}")
    directory = Path(directory)
    sizes = [n_trajectories // shards + (k < n_trajectories % shards) for k in range(shards)]
    paths, first = [], 0
    for k in tqdm(range(shards), desc="shards", unit="shard", disable=not progress, leave=False):
        data = simulate_windows(simulator, observation, n_trajectories=sizes[k], seed=shard_seed(seed, k),
                                progress=False, first_id=first, **kwargs)
        paths.append(data.save(directory / f"shard-{k:05d}.h5"))
        first += sizes[k]
    return paths


class IndexPermutation:
    """A random permutation of ``range(n)``, read by slices, that does not hold ``n`` indices when ``n`` is large.

    Up to ``dense`` elements (default ``DENSE``, 4M) it is ``torch.randperm(n, generator=generator)`` (the same
    draw from the generator). Above, position ``i`` maps to a keyed Feistel network of 6 rounds over the ``2**b >= n``
    integers of an even number of bits ``b`` (``2**b < 4 n``), walked again from any value ``>= n`` until it falls
    below ``n``: a bijection of ``range(n)`` computed for the positions asked only, from 6 keys drawn from
    ``generator``. An epoch over a dataset of ``10**9`` windows then costs no memory for its order
    (``torch.randperm`` would take 8 GB).

    ``perm[a:b]`` (a slice with step 1) gives the ``(b - a,)`` int64 indices at positions ``a ... b - 1``; ``perm[:k]``
    is a random subset of ``k`` distinct indices.
    """

    ROUNDS = 6
    DENSE = 1 << 22

    def __init__(self, n: int, generator: torch.Generator | None = None, dense: int | None = None):
        n = int(n)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n > 2**62:
            raise ValueError(f"at most 2**62 elements, got {n}")
        self.n = n
        if n <= (self.DENSE if dense is None else dense) or n < 4:
            self._dense: Tensor | None = torch.randperm(n, generator=generator)
            return
        self._dense = None
        bits = max(2, math.ceil(math.log2(n)))
        self._half = (bits + bits % 2) // 2
        self._mask = (1 << self._half) - 1
        self._keys = [int(k) for k in torch.randint(0, 2**31, (self.ROUNDS,), generator=generator)]

    def __len__(self) -> int:
        return self.n

    def _round(self, r: Tensor, key: int) -> Tensor:
        # integer mixing of 31-bit values: products stay below 2**63 (no int64 overflow)
        h = ((r ^ key) & 0x7FFFFFFF) * 0x9E3779B1
        h = ((h ^ (h >> 29)) & 0x7FFFFFFF) * 0x85EBCA6B
        return (h ^ (h >> 31)) & self._mask

    def _encrypt(self, x: Tensor) -> Tensor:
        left, right = x >> self._half, x & self._mask
        for key in self._keys:
            left, right = right, left ^ self._round(right, key)
        return (left << self._half) | right

    def __getitem__(self, key: slice) -> Tensor:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError(f"an IndexPermutation is read by slices with step 1 (perm[a:b]), got {key!r}")
        start, stop, _ = key.indices(self.n)
        if self._dense is not None:
            return self._dense[start:stop]
        y = self._encrypt(torch.arange(start, max(start, stop), dtype=torch.int64))
        out = y >= self.n
        while bool(out.any()):  # cycle walking: a bijection of [0, 2**b) restricted to [0, n) stays one
            y[out] = self._encrypt(y[out])
            out = y >= self.n
        return y

    def __repr__(self) -> str:
        return f"IndexPermutation(n={self.n}, {'dense' if self._dense is not None else 'Feistel'})"


class H5Array:
    """Arrays ``(N, S, ...)`` stored in HDF5 files (concatenated along ``N``), read on demand.

    Indexing like a tensor, ``a[n, s, ...]`` with index tensors ``n`` and ``s`` that broadcast together, reads for
    each distinct row ``n`` only the span of the positions ``s`` asked of it, rows in increasing order (one
    hyperslab read per row: HDF5 reads many small spans faster one by one than as one union selection).

    Args:
        sources: ``(path, dataset name)`` of each file, in order.
        rows: the rows kept, as positions in the concatenation of the sources (default: all, in order).
    """

    def __init__(self, sources: Sequence[tuple[str | Path, str]], rows: Tensor | None = None):
        import h5py

        if not sources:
            raise ValueError("H5Array needs at least one (path, dataset name) source")
        self.sources = [(str(p), str(name)) for p, name in sources]
        self._files: dict[str, Any] = {}
        self._pid = os.getpid()
        lengths, tail, dtype = [], None, None
        for k, (path, name) in enumerate(self.sources):
            ds = self._dataset(k)
            if not isinstance(ds, h5py.Dataset) or ds.ndim < 2:
                raise ValueError(f"{path}:{name} must be an array of at least 2 dimensions (N, S, ...)")
            if tail is not None and (ds.shape[1:] != tail or ds.dtype != dtype):
                raise ValueError(f"{path}:{name} has shape {ds.shape} and dtype {ds.dtype}; the sources before it "
                                 f"have rows of shape {tail} and dtype {dtype}")
            lengths.append(ds.shape[0])
            tail, dtype = ds.shape[1:], ds.dtype
        self._np_dtype = dtype
        self._starts = torch.tensor([0] + lengths).cumsum(0)
        total = int(self._starts[-1])
        self.rows = torch.arange(total) if rows is None else torch.as_tensor(rows, dtype=torch.long)
        if self.rows.dim() != 1 or (len(self.rows) and (self.rows.min() < 0 or self.rows.max() >= total)):
            raise ValueError(f"rows must be a 1-D tensor of positions in 0..{total - 1}")
        self.shape = torch.Size((len(self.rows), *tail))
        self.dtype = torch.from_numpy(np.empty(0, dtype=dtype)).dtype

    def _dataset(self, k: int):
        import h5py

        path, name = self.sources[k]
        if self._pid != os.getpid():  # a forked process (DataLoader workers): its own handles, not the parent's
            self._files, self._pid = {}, os.getpid()
        if path not in self._files:
            self._files[path] = h5py.File(path, "r")
        return self._files[path][name]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}  # file handles are reopened where unpickled (spawned workers)

    def close(self) -> None:
        """Close the files (they are reopened on the next read)."""
        for f in self._files.values():
            f.close()
        self._files = {}

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return len(self.shape)

    def take(self, positions: Tensor | Sequence[int]) -> H5Array:
        """The rows at ``positions`` (still on disk)."""
        return H5Array(self.sources, self.rows[torch.as_tensor(positions, dtype=torch.long)])

    @staticmethod
    def cat(arrays: Sequence[H5Array]) -> H5Array:
        """The rows of several arrays one after the other (still on disk)."""
        sources = list(dict.fromkeys(src for a in arrays for src in a.sources))
        whole = H5Array(sources)
        rows = []
        for a in arrays:
            k_of = torch.searchsorted(a._starts, a.rows, right=True) - 1
            index = torch.tensor([sources.index(src) for src in a.sources], dtype=torch.long)
            rows.append(whole._starts[index[k_of]] + a.rows - a._starts[k_of])
        return whole.take(torch.cat(rows))

    def _read(self, rows: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """``(U, max(hi - lo), ...)``: row ``u`` holds positions ``lo[u] .. hi[u] - 1`` of global row ``rows[u]``
        (increasing), the rest is left unset. One hyperslab read per row, rows in file order."""
        from h5py import h5s

        tail = tuple(self.shape[2:])
        out = np.empty((len(rows), int((hi - lo).max()), *tail), dtype=self._np_dtype)
        k_of = torch.searchsorted(self._starts, rows, right=True) - 1
        local = rows - self._starts[k_of]
        spaces: dict[int, Any] = {}
        for u, (k, r, a, b) in enumerate(zip(k_of.tolist(), local.tolist(), lo.tolist(), hi.tolist())):
            ds = self._dataset(k)
            if b - a not in spaces:
                spaces[b - a] = h5s.create_simple((1, b - a) + tail)
            fspace = ds.id.get_space()
            fspace.select_hyperslab((r, a) + (0,) * len(tail), (1, b - a) + tail)
            ds.id.read(spaces[b - a], fspace, out[u:u + 1, :b - a])
        return torch.from_numpy(out)

    def __getitem__(self, key: Any) -> Tensor:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis or k is None for k in key) or len(key) > len(self.shape):
            raise IndexError(f"an H5Array of shape {tuple(self.shape)} takes up to {len(self.shape)} indices (no "
                             f"Ellipsis or None), got {key!r}")
        n = torch.arange(len(self))[key[0]] if isinstance(key[0], slice) else torch.as_tensor(key[0])
        n = n.long()
        if n.numel() and (n.min() < -len(self) or n.max() >= len(self)):
            raise IndexError(f"row index out of range for {len(self)} rows")
        rest = list(key[1:])
        S = self.shape[1]
        s = None
        if rest and not isinstance(rest[0], slice):
            s = torch.as_tensor(rest[0]).long()
            if s.numel() and (s.min() < -S or s.max() >= S):
                raise IndexError(f"index out of range for {S} positions along dimension 1")
            n, s = torch.broadcast_tensors(n, s % S)
        if n.numel() == 0:
            return torch.empty(0, *self.shape[1:], dtype=self.dtype)[(n, s, *rest[1:]) if s is not None else (n, *rest)]
        rows, inv = torch.unique(self.rows[n % len(self)], return_inverse=True)
        if s is None:  # whole rows
            return self._read(rows, torch.zeros(len(rows), dtype=torch.long), torch.full((len(rows),), S))[(inv, *rest)]
        first = torch.full((len(rows),), S, dtype=torch.long).scatter_reduce(0, inv.flatten(), s.flatten(), "amin")
        last = torch.zeros(len(rows), dtype=torch.long).scatter_reduce(0, inv.flatten(), s.flatten(), "amax")
        return self._read(rows, first, last + 1)[(inv, s - first[inv], *rest[1:])]

    def blocks(self, rows: int = 64):
        """The array in blocks of ``rows`` rows, in order (tensors ``(<= rows, S, ...)``)."""
        for i in range(0, len(self), rows):
            yield self[torch.arange(i, min(i + rows, len(self)))]

    def __repr__(self) -> str:
        return f"H5Array(shape={tuple(self.shape)}, dtype={self.dtype}, files={len(self.sources)})"


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
    :meth:`get` or a :meth:`loader`, has a leading batch dimension. ``states``, ``y`` and ``mask`` may also be
    :class:`H5Array` (a dataset streamed from disk, see :meth:`open`): the same API, reading only what a batch needs.
    """

    def __init__(self, states: Tensor | H5Array, y: Tensor | H5Array, mask: Tensor | H5Array, times: Tensor,
                 window: Window | int = 10, stride: int = 1, trajectory_ids: Tensor | None = None,
                 config: dict | None = None, meta: dict | None = None):
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
        streamed = [isinstance(a, H5Array) for a in (states, y, mask)]
        if any(streamed) and not all(streamed):
            raise ValueError("states, y and mask must be all tensors or all H5Array (streamed), not a mixture")
        if all(streamed) and mask.dtype != torch.bool:
            raise ValueError(f"a streamed mask must be stored as booleans, got {mask.dtype}")
        self.states, self.y, self.mask = states, y, mask if all(streamed) else mask.bool()
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
    def streamed(self) -> bool:
        """Whether the arrays stay on disk (:meth:`open`) rather than in memory."""
        return isinstance(self.states, H5Array)

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
        if self.streamed:  # still on disk
            return WindowDataset(self.states.take(i), self.y.take(i), self.mask.take(i), self.times, self.window,
                                 self.stride, self.trajectory_ids[i], self.config, self.meta)
        return WindowDataset(self.states[i], self.y[i], self.mask[i], self.times, self.window, self.stride,
                             self.trajectory_ids[i], self.config, self.meta)

    def in_memory(self) -> WindowDataset:
        """The dataset with its arrays read into memory (itself if they are already)."""
        if not self.streamed:
            return self
        arrays = [torch.cat(list(a.blocks())) for a in (self.states, self.y, self.mask)]
        return WindowDataset(*arrays, self.times, self.window, self.stride, self.trajectory_ids, self.config,
                             self.meta)

    @staticmethod
    def concat(datasets: Sequence[WindowDataset]) -> WindowDataset:
        """The trajectories of several datasets (shards) as one dataset; streamed ones stay on disk.

        The parts must share the window, stride, saved times, shapes, dtypes and task configuration. Their trajectory
        identifiers are kept when they are distinct; otherwise part ``k``'s are shifted past those of the parts before
        it (so shards simulated separately, each numbered from 0, are numbered as one).

        Args:
            datasets: the parts, all in memory or all streamed.

        Returns:
            A :class:`WindowDataset` of ``sum(part.n_trajectories)`` trajectories, the parts' in order.
        """
        parts = list(datasets)
        if not parts or not all(isinstance(d, WindowDataset) for d in parts):
            raise ValueError(f"concat needs a non-empty list of WindowDataset, got {datasets!r}")
        first = parts[0]
        for k, d in enumerate(parts[1:], 1):
            same = (d.window == first.window and d.stride == first.stride and d.state_shape == first.state_shape
                    and d.obs_shape == first.obs_shape and d.states.dtype == first.states.dtype
                    and d.times.shape == first.times.shape and torch.equal(d.times, first.times)
                    and d.config == first.config)
            if not same:
                raise ValueError(f"part {k} ({d!r}, config {d.config.get('name')!r}) does not match part 0 ({first!r}, "
                                 f"config {first.config.get('name')!r}): window, stride, saved times, shapes, dtype "
                                 f"and task configuration must be equal")
        if len({d.streamed for d in parts}) > 1:
            raise ValueError("cannot concatenate streamed and in-memory datasets; use in_memory() on the streamed ones")
        ids = [d.trajectory_ids for d in parts]
        if len(torch.cat(ids).unique()) < sum(len(i) for i in ids):
            shift, moved = 0, []
            for i in ids:
                moved.append(i - i.min() + shift)
                shift = int(moved[-1].max()) + 1
            ids = moved
        join = H5Array.cat if first.streamed else torch.cat
        meta = dict(first.meta)
        seeds = [d.meta.get("seed") for d in parts]
        if len(set(map(str, seeds))) > 1:
            meta["seed"] = seeds
        return WindowDataset(join([d.states for d in parts]), join([d.y for d in parts]),
                             join([d.mask for d in parts]), first.times, first.window, first.stride, torch.cat(ids),
                             first.config, meta)

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
                if isinstance(arr, H5Array):  # copied block by block
                    out = f.create_dataset(name, shape=tuple(arr.shape), dtype=arr._np_dtype,
                                           chunks=(1,) + tuple(arr.shape[1:]), track_times=False)
                    for i, block in zip(range(0, len(arr), 64), arr.blocks(64)):
                        out[i:i + len(block)] = block.numpy()
                    continue
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

    @staticmethod
    def _read_header(f: Any, path: Path) -> dict[str, Any]:
        missing = {"states", "y", "mask", "times"} - set(f.keys())
        if missing:
            raise ValueError(f"{path} is not a sbida dataset: it lacks {sorted(missing)}")
        version = int(f.attrs.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise ValueError(f"{path} has format version {version}; this sbida reads up to {FORMAT_VERSION}")
        return {"times": torch.from_numpy(np.asarray(f["times"])),
                "trajectory_ids": torch.from_numpy(np.asarray(f["trajectory_ids"])) if "trajectory_ids" in f else None,
                "window": Window(**json.loads(f.attrs["window"])), "stride": int(f.attrs.get("stride", 1)),
                "config": json.loads(f.attrs.get("config", "{}")), "meta": json.loads(f.attrs.get("meta", "{}"))}

    @classmethod
    def load(cls, path: str | Path, stream: bool = False) -> WindowDataset:
        """Read a dataset written by :meth:`save` (``stream=True``: leave the arrays on disk, as :meth:`open`)."""
        import h5py

        if stream:
            return cls.open(path)
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no dataset at {path}")
        with h5py.File(path, "r") as f:
            h = cls._read_header(f, path)
            arrays = {k: torch.from_numpy(np.asarray(f[k])) for k in ("states", "y", "mask")}
        return cls(arrays["states"], arrays["y"], arrays["mask"], h["times"], h["window"], h["stride"],
                   h["trajectory_ids"], h["config"], h["meta"])

    @classmethod
    def open(cls, paths: str | Path | Sequence[str | Path]) -> WindowDataset:
        """Open one or several files written by :meth:`save` as one dataset, without loading their arrays.

        Batches read only the trajectories and saved states their windows cover; the memory held is ``O(N + S)``
        (times and trajectory identifiers). Several files (shards, e.g. from :func:`simulate_shards`) are joined
        as by :meth:`concat`.

        Args:
            paths: a file, or a list of files.

        Returns:
            A streamed :class:`WindowDataset` (``streamed`` is true).
        """
        import h5py

        paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
        if not paths:
            raise ValueError("open needs at least one file")
        parts = []
        for path in map(Path, paths):
            if not path.exists():
                raise FileNotFoundError(f"no dataset at {path}")
            with h5py.File(path, "r") as f:
                h = cls._read_header(f, path)
            arrays = [H5Array([(path, k)]) for k in ("states", "y", "mask")]
            parts.append(cls(*arrays, h["times"], h["window"], h["stride"], h["trajectory_ids"], h["config"],
                             h["meta"]))
        return parts[0] if len(parts) == 1 else cls.concat(parts)

    # -- description ----------------------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        """A short hash of the arrays (equal for equal data)."""
        h = hashlib.sha256()
        for a in (self.states, self.y, self.mask, self.times, self.trajectory_ids):
            for block in (a.blocks() if isinstance(a, H5Array) else [a]):
                h.update(block.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def stats(self) -> dict[str, Any]:
        """Summary figures: sizes, shapes, observed fraction, state mean and std, time range."""
        if self.streamed:  # by blocks of trajectories, in double precision
            n = total = total2 = observed = 0.0
            for x, m in zip(self.states.blocks(), self.mask.blocks()):
                x = x.double()
                n, total, total2 = n + x.numel(), total + float(x.sum()), total2 + float((x * x).sum())
                observed += float(m.sum())
            mean, fraction = total / n, observed / (n / math.prod(self.state_shape) * math.prod(self.obs_shape))
            std = math.sqrt(max(total2 - n * mean * mean, 0.0) / max(n - 1, 1))
        else:
            fraction = float(self.mask.float().mean())
            mean, std = float(self.states.double().mean()), float(self.states.double().std())
        return {
            "trajectories": self.n_trajectories,
            "states_per_trajectory": self.states.shape[1],
            "windows": len(self),
            "state_shape": list(self.state_shape),
            "obs_shape": list(self.obs_shape),
            "window": f"{self.window.length} times, {self.window.align}-aligned",
            "observed_fraction": fraction,
            "state_mean": mean,
            "state_std": std,
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
                f"obs {self.obs_shape}, {self.window}{', streamed' if self.streamed else ''})")

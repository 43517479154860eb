"""Training beyond one machine: streamed batches against in-memory ones, and data-parallel steps per second.

Reading: a ``lorenz96``-like dataset (K=40, ``--trajectories`` x ``--states`` saved states, window 10) is saved to
HDF5; the wall time of ``get`` on random batches of 256 windows is measured in memory and streamed from the file
(``WindowDataset.open``), best of ``--repeats``. Training: NPE (default architecture) for ``--steps`` steps of a global
batch of 256 windows in one process, then in ``--procs`` processes (gloo, one thread each) on the streamed file; the
rate is steps per second of a second fit (a first one of 2 steps warms up). On a machine with fewer cores than
processes the parallel rate can only drop: the figures check the mechanics, not speed-ups. Wall-clock, noisy.

    python benchmarks/ddp.py [--trajectories 256] [--states 200] [--steps 20] [--procs 2] [--repeats 5]
    torchrun --nproc_per_node=N your_training_script.py   # the same fit() runs data-parallel
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from sbida import distributed
from sbida.data import Window, WindowDataset, simulate_windows
from sbida.estimators import NPE
from sbida.observations import RandomMask
from sbida.simulators import Lorenz96


def _train(rank: int, path: str, steps: int, out: str) -> None:
    data = WindowDataset.open(path)
    est = NPE(None, state_shape=data.state_shape, obs_shape=data.obs_shape, window=data.window)
    est.fit(data, epochs=1, steps_per_epoch=2, batch_size=256, progress=False)  # warm-up
    t0 = time.perf_counter()
    est.fit(data, epochs=1, steps_per_epoch=steps, batch_size=256, progress=False)
    seconds = time.perf_counter() - t0
    if rank == 0:
        Path(out).write_text(json.dumps({"seconds": seconds}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trajectories", type=int, default=256)
    p.add_argument("--states", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    data = simulate_windows(Lorenz96(K=40, dt=0.05), RandomMask(p_missing=0.75, sigma=1.0), Window(10),
                            n_trajectories=a.trajectories, states=a.states, burn_in=200, seed=0)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(data.save(Path(tmp) / "data.h5"))
        streamed = WindowDataset.open(path)
        g = torch.Generator().manual_seed(0)
        for name, d in (("memory", data), ("streamed", streamed)):
            best = float("inf")
            for _ in range(a.repeats):
                idx = torch.randint(0, len(d), (256,), generator=g)
                t0 = time.perf_counter()
                d.get(idx)
                best = min(best, time.perf_counter() - t0)
            result[f"get_256_{name}_ms"] = 1e3 * best
        for procs in (1, a.procs):
            out = str(Path(tmp) / f"time{procs}.json")
            if procs == 1:
                _train(0, path, a.steps, out)
            else:
                distributed.spawn(_train, procs, path, a.steps, out)
            result[f"fit_{procs}proc_steps_per_s"] = a.steps / json.loads(Path(out).read_text())["seconds"]
    result["windows"], result["file_MB"] = len(data), sum(
        t.numel() * t.element_size() for t in (data.states, data.y, data.mask)) / 2**20
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

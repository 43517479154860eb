"""Simulator throughput and dataset generation time.

Prints, in one run:
1. Lorenz-96 (K=40, batch 4096) throughput in state values x steps per second through the public API
   (``rollout`` under ``no_grad``), next to a plain NumPy RK4 step (``np.roll``), and their ratio;
2. the time to simulate the default ``lorenz96`` training set (1024 trajectories x 1024 states);
3. the time to simulate a ``kolmogorov`` set of 64 trajectories (``--quick``: fewer states, said in the table).

    python benchmarks/simulators.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

import sbida


def numpy_rk4(x: np.ndarray, F: float, dt: float) -> np.ndarray:
    def f(z):
        return (np.roll(z, -1, -1) - np.roll(z, 2, -1)) * np.roll(z, 1, -1) - z + F

    k1 = f(x)
    k2 = f(x + 0.5 * dt * k1)
    k3 = f(x + 0.5 * dt * k2)
    k4 = f(x + dt * k3)
    return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def lorenz96_throughput(batch: int = 4096, K: int = 40, steps: int = 200) -> dict:
    sim = sbida.simulators.Lorenz96(K=K, F=8.0, dt=0.05)
    x = sim.initial_state(batch, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = sim.rollout(x, 20, every=20)[:, -1]  # warm-up
        t0 = time.perf_counter()
        sim.rollout(x, steps, every=steps)
        t_torch = time.perf_counter() - t0
    xn = x.numpy().copy()
    t0 = time.perf_counter()
    for _ in range(steps):
        xn = numpy_rk4(xn, 8.0, 0.05)
    t_numpy = time.perf_counter() - t0
    values = batch * K * steps
    return {"torch": values / t_torch, "numpy": values / t_numpy, "ratio": t_numpy / t_torch}


def dataset_time(name: str, **overrides) -> float:
    t0 = time.perf_counter()
    sbida.tasks.get(name).simulate(progress=False, **overrides)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller Kolmogorov set")
    p.add_argument("--json", help="also write the figures as JSON to this path")
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    res = {"torch_version": torch.__version__, "threads": torch.get_num_threads()}
    res["lorenz96_throughput"] = lorenz96_throughput()
    res["lorenz96_dataset_s"] = dataset_time("lorenz96")
    n_states = 16 if args.quick else sbida.tasks.get("kolmogorov").config.data.n_states
    res["kolmogorov_dataset"] = {"seconds": dataset_time("kolmogorov", n_states=n_states), "states": n_states}

    tp = res["lorenz96_throughput"]
    k = res["kolmogorov_dataset"]
    print(f"torch {res['torch_version']}, {res['threads']} threads")
    print(f"{'measure':58s} {'value':>14s}")
    print(f"{'Lorenz-96 K=40 batch 4096, torch (values x steps / s)':58s} {tp['torch']:14.3g}")
    print(f"{'Lorenz-96 K=40 batch 4096, NumPy RK4 (values x steps / s)':58s} {tp['numpy']:14.3g}")
    print(f"{'torch / NumPy':58s} {tp['ratio']:14.2f}")
    print(f"{'lorenz96 training set, 1024 x 1024 states (s)':58s} {res['lorenz96_dataset_s']:14.1f}")
    label = f"kolmogorov set, 64 trajectories x {k['states']} states + 64 spin-up (s)"
    print(f"{label:58s} {k['seconds']:14.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()

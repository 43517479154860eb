"""Simulator throughput and dataset generation time, printed as one table.

What it measures (CPU, float32, ``torch.no_grad()``, best of a few repeats on a possibly shared machine):

1. Lorenz-96 (K=40, batch 4096) throughput in state values x steps per second through the public API,
   ``Lorenz96(...).rollout(x, steps, every)``, for each ``backend`` of :class:`sbida.simulators.Lorenz96`
   ("reference": the differentiable path; "fused": the in-place path that no-gradient steps take by default;
   "compile": ``torch.compile`` of the step, which the default "auto" backend switches to for long runs on large
   batches, with its compilation time), next to the same RK4 step written naively in NumPy (``np.roll``) and to the
   rollout as it was before the fused path (reference step, a finiteness test after every step, list + stack).
   Two regimes: only the final state kept (``every=steps``), and every state kept (``every=1``, a trajectory of
   ``steps + 1`` states; the NumPy loop then also writes each state into a preallocated array).
   The ratio column is torch / NumPy in the same regime.
2. The time to simulate the default ``lorenz96`` training set, ``sbida.tasks.get("lorenz96").simulate()``
   (1024 trajectories x 1024 states, in batches of 256: the "auto" backend stays on the fused path), and the
   same with ``backend="reference"``.
3. The time to simulate a ``kolmogorov`` set of 64 trajectories, ``sbida.tasks.get("kolmogorov").simulate()``
   (sizes from the task file; ``--quick``: fewer saved states and a shorter spin-up, said in the table).

    python benchmarks/simulators.py [--quick] [--json PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable

import numpy as np
import torch

import sbida
from sbida.simulators import Lorenz96, rk4_step

BATCH, K, F, DT = 4096, 40, 8.0, 0.05


def numpy_rk4_step(x: np.ndarray, F: float, dt: float) -> np.ndarray:
    """One RK4 step of Lorenz-96, written as a NumPy user would (np.roll for the periodic shifts)."""

    def f(z):
        return (np.roll(z, -1, axis=-1) - np.roll(z, 2, axis=-1)) * np.roll(z, 1, axis=-1) - z + F

    k1 = f(x)
    k2 = f(x + 0.5 * dt * k1)
    k3 = f(x + 0.5 * dt * k2)
    k4 = f(x + dt * k3)
    return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def numpy_rollout(x: np.ndarray, steps: int, every: int) -> np.ndarray:
    traj = np.empty((steps // every + 1, *x.shape), dtype=x.dtype)
    traj[0] = x
    for s in range(1, steps + 1):
        x = numpy_rk4_step(x, F, DT)
        if s % every == 0:
            traj[s // every] = x
    return traj


def previous_rollout(sim: Lorenz96, x: torch.Tensor, steps: int, every: int) -> torch.Tensor:
    """``Simulator.rollout`` as it was before the fused path: reference step, isfinite after every step, stack."""
    states = [x]
    for s in range(1, steps + 1):
        x = rk4_step(sim.tendency, x, sim.dt)
        if not torch.isfinite(x).all():
            raise ValueError(f"blew up at step {s}")
        if s % every == 0:
            states.append(x)
    return torch.stack(states, dim=x.dim() - 1)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The shortest of ``repeats`` wall-clock times of ``fn()`` (the least disturbed by other processes)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def lorenz96_throughput(steps: int, repeats: int) -> dict:
    values = BATCH * K * steps
    x0 = Lorenz96(K=K).initial_state(BATCH, generator=torch.Generator().manual_seed(0))
    regimes = {"final": steps, "all": 1}  # every
    rows: dict[str, dict] = {}

    xn = x0.numpy().copy()
    rows["numpy"] = {e: values / best_time(lambda e=e: numpy_rollout(xn, steps, regimes[e]), repeats)
                     for e in regimes}

    with torch.no_grad():
        ref = Lorenz96(K=K, F=F, dt=DT, backend="reference")
        previous_rollout(ref, x0, 10, 1)
        rows["previous"] = {e: values / best_time(lambda e=e: previous_rollout(ref, x0, steps, regimes[e]), repeats)
                            for e in regimes}
        compile_s = None
        for backend in ("reference", "fused", "compile"):
            sim = Lorenz96(K=K, F=F, dt=DT, backend=backend)
            t0 = time.perf_counter()
            sim.rollout(x0, 1)  # "compile": compiles here
            if backend == "compile":
                compile_s = time.perf_counter() - t0
            sim.rollout(x0, 20)  # warm-up
            rows[backend] = {e: values / best_time(lambda e=e, sim=sim: sim.rollout(x0, steps, every=regimes[e]),
                                                   repeats)
                             for e in regimes}
        # the fused and compiled paths give the same bits as the reference one
        same = all(torch.equal(Lorenz96(K=K, backend=b).rollout(x0, 50), ref.rollout(x0, 50))
                   for b in ("fused", "compile"))
    return {"batch": BATCH, "K": K, "steps": steps, "rows": rows, "compile_seconds": compile_s,
            "bitwise_equal_to_reference": same,
            "ratio": {name: {e: r[e] / rows["numpy"][e] for e in regimes} for name, r in rows.items()}}


def dataset_seconds(name: str, repeats: int = 1, **overrides) -> float:
    task = sbida.tasks.get(name, **{k: v for k, v in overrides.items() if "." in k})
    data = {k: v for k, v in overrides.items() if "." not in k}
    return best_time(lambda: task.simulate(progress=False, **data), repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer Lorenz-96 steps, a smaller Kolmogorov set")
    p.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    res: dict = {"torch": torch.__version__, "numpy": np.__version__, "threads": torch.get_num_threads(),
                 "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                 "load_average_before": os.getloadavg()[0], "quick": args.quick}
    print(f"torch {torch.__version__} ({torch.get_num_threads()} threads, {os.cpu_count()} cores), "
          f"numpy {np.__version__} (single-threaded), load average {res['load_average_before']:.2f} before the run")
    if res["load_average_before"] > 0.5:
        print("  warning: the machine is busy; threaded torch suffers more from sharing cores than NumPy does")

    steps = 100 if args.quick else 500
    tp = res["lorenz96"] = lorenz96_throughput(steps, repeats=2 if args.quick else 3)
    res["lorenz96_dataset_seconds"] = dataset_seconds("lorenz96", repeats=1 if args.quick else 2)
    res["lorenz96_dataset_reference_seconds"] = dataset_seconds("lorenz96", **{"simulator.backend": "reference"})
    kcfg = sbida.tasks.get("kolmogorov").config.data
    k_states, k_burn = (16, 8) if args.quick else (kcfg.n_states, kcfg.burn_in)
    res["kolmogorov_dataset"] = {"n_trajectories": kcfg.n_trajectories, "n_states": k_states, "burn_in": k_burn,
                                 "seconds": dataset_seconds("kolmogorov", n_states=k_states, burn_in=k_burn)}

    names = {"numpy": "NumPy RK4 (np.roll), single-threaded",
             "previous": "torch, rollout before the fused path",
             "reference": 'Lorenz96(backend="reference").rollout',
             "fused": 'Lorenz96(backend="fused").rollout (no-grad default)',
             "compile": 'Lorenz96(backend="compile").rollout'}
    print(f"\nLorenz-96 K={K}, batch {BATCH}, float32, {steps} steps: values x steps / s (ratio to NumPy)")
    print(f"{'':52s} {'final state kept':>22s} {'every state kept':>22s}")
    for key, label in names.items():
        r, q = tp["rows"][key], tp["ratio"][key]
        cells = " ".join(f"{r[e] / 1e6:10.0f} M ({q[e]:5.2f}x)" for e in ("final", "all"))
        print(f"{label:52s} {cells}")
    print(f"torch.compile: first call {tp['compile_seconds']:.1f} s (compilation; much longer with a cold inductor "
          f"cache); \"auto\" switches to it after {Lorenz96.compile_after:.0e} values x steps of rollouts on batches "
          f">= {Lorenz96.compile_min_numel} values")
    print(f"fused and compiled trajectories bitwise equal to the reference: {tp['bitwise_equal_to_reference']}")

    k = res["kolmogorov_dataset"]
    print(f"\n{'dataset generation (simulate(progress=False))':72s} {'seconds':>8s}")
    print(f"{'lorenz96: 1024 trajectories x 1024 states (default backend)':72s} "
          f"{res['lorenz96_dataset_seconds']:8.2f}")
    print(f"{'lorenz96: the same with backend=reference':72s} {res['lorenz96_dataset_reference_seconds']:8.2f}")
    label = (f"kolmogorov: {k['n_trajectories']} trajectories x {k['n_states']} states + {k['burn_in']} spin-up steps"
             + (" (--quick)" if args.quick else ""))
    print(f"{label:72s} {k['seconds']:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

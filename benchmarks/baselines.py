"""Classical baselines on the same windows, and the cycled ETKF against published Lorenz-96 figures.

1. ``lorenz96`` (K=40, the default task): climatology, OI, EnKF and EnKS (40 and 100 members, inflation tuned on
   validation windows for each size) and 4D-Var on the same test windows: RMSE of the posterior mean, mean
   posterior spread, time per window (and its ratio to the EnKS with 100 members, measured in the same run).
2. Cycled ETKF, K=40, F=8, full observation every 0.05 time units, sigma=1, 40 members, inflation tuned:
   time-mean analysis RMSE and spread after spin-up (published: ~0.18).
3. Cycled ETKF in the ``lorenz96-sparse`` set-up (dt=0.01, 75 % of values missing at random, sigma=1), 40 members,
   inflation tuned (published: ~0.18).

    python benchmarks/baselines.py [--quick] [--json PATH] [--threads N]

Times are wall-clock on a possibly shared machine; compare the ratios rather than the seconds.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import sbida
from sbida.baselines import OI, CycledETKF, EnKF, EnKS, FourDVar
from sbida.data import simulate_windows
from sbida.observations import RandomMask
from sbida.simulators import Lorenz96


def windows_table(quick: bool) -> list[dict]:
    task = sbida.tasks.get("lorenz96")
    n_traj, n_states = (160, 200) if quick else (400, 400)
    data = task.simulate(progress=False, n_trajectories=n_traj, n_states=n_states)
    train, val, test = data.split(0.8, 0.1, 0.1)
    n = 100 if quick else 200
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n]
    x, y, m, t = test.get(idx)
    rows = []

    def record(name, fn, extra=None):
        start = time.perf_counter()
        post = fn()
        sec = time.perf_counter() - start
        rmse = (post.mean() - x).pow(2).mean().sqrt().item()
        spread = post.std().pow(2).mean().sqrt().item()
        rows.append({"method": name, "rmse": rmse, "spread": spread, "ms_per_window": 1e3 * sec / n, **(extra or {})})
        print(f"  {name:<22} rmse {rmse:6.3f}  spread {spread:6.3f}  {1e3 * sec / n:8.2f} ms/window", flush=True)

    oi = OI.from_task(task).fit(train)
    clim = oi.climatology
    mu, _ = clim.moments(t)
    rows.append({"method": "climatology", "rmse": (mu.to(x.dtype) - x).pow(2).mean().sqrt().item(),
                 "spread": clim.cov_[clim.index(t)].diagonal(dim1=-2, dim2=-1).mean().sqrt().item(),
                 "ms_per_window": 0.0})
    print(f"lorenz96 K=40: {n} test windows, {len(train)} training windows ({clim})")
    print(f"  {'climatology':<22} rmse {rows[0]['rmse']:6.3f}  spread {rows[0]['spread']:6.3f}")
    record("OI", lambda: oi.posterior(y, m, t))
    for M in (40, 100):
        for cls in (EnKF, EnKS):
            est = cls.from_task(task, members=M, climatology=clim)
            info = est.tune(val, n_windows=64 if quick else 128)
            record(f"{est.name.upper()} M={M} (rho={est.inflation:g})",
                   lambda est=est: est.posterior(y, m, t, generator=torch.Generator().manual_seed(0)),
                   {"inflation": est.inflation, "tuning": info})
    fv = FourDVar.from_task(task, climatology=clim, max_iter=100 if quick else 200)
    record("4D-Var", lambda: fv.posterior(y, m, t))
    rows[-1]["optimizer"] = fv.last_info
    ref = next(r["ms_per_window"] for r in rows if r["method"].startswith("ENKS M=100"))
    for r in rows:
        r["time_ratio_to_enks100"] = r["ms_per_window"] / ref
    return rows


def cycled(sim, obs, grid, n_traj, states, spin_up, burn_in, every=1, label="") -> dict:
    truth = simulate_windows(sim, obs, 1, n_trajectories=n_traj, states=states, every=every, burn_in=burn_in, seed=3,
                             progress=False)
    pool = simulate_windows(sim, obs, 1, n_trajectories=64, states=64, every=every, burn_in=burn_in, seed=4,
                            progress=False)
    results = []
    for rho in grid:
        etkf = CycledETKF(sim, obs, every=every, members=40, inflation=rho).fit(pool)
        start = time.perf_counter()
        mean, std = etkf.run(truth.y, truth.mask, generator=torch.Generator().manual_seed(0), progress=False)
        sec = time.perf_counter() - start
        rmse = (mean - truth.states).pow(2).mean(-1).sqrt()[:, spin_up:].mean().item()
        spread = std.pow(2).mean(-1).sqrt()[:, spin_up:].mean().item()
        results.append({"inflation": rho, "rmse": rmse, "spread": spread, "seconds": sec})
        print(f"  {label} rho={rho:<7g} rmse {rmse:.3f}  spread {spread:.3f}  ({sec:.1f} s)", flush=True)
    best = min(results, key=lambda r: r["rmse"] if r["rmse"] == r["rmse"] else float("inf"))
    return {"set_up": label, "members": 40, "trajectories": n_traj, "cycles": states, "spin_up": spin_up,
            "grid": results, "best": best}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes on 2 cores)")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = {"machine": platform.platform(), "threads": torch.get_num_threads(), "quick": args.quick}
    out["windows"] = windows_table(args.quick)

    print("cycled ETKF, K=40, F=8, dt=0.05, full observation, sigma=1, 40 members (published ~0.18)")
    sim = Lorenz96(K=40, F=8.0, dt=0.05)
    n, S = (2, 1200) if args.quick else (8, 5000)
    out["cycled_full"] = cycled(sim, RandomMask(p_missing=0.0, sigma=1.0), (1.01, 1.02, 1.03, 1.05), n, S, 200,
                                2000, label="full")

    print("cycled ETKF, lorenz96-sparse: dt=0.01, 75 % missing, sigma=1, 40 members (published ~0.18)")
    task = sbida.tasks.get("lorenz96-sparse")
    n, S = (2, 3000) if args.quick else (8, 10000)
    out["cycled_sparse"] = cycled(task.simulator, task.observation, (1.0025, 1.005, 1.0075, 1.01, 1.02), n, S, 1000,
                                  task.config.data.burn_in, label="sparse")
    for key in ("cycled_full", "cycled_sparse"):
        b = out[key]["best"]
        print(f"{key}: tuned rho={b['inflation']:g}: time-mean analysis RMSE {b['rmse']:.3f}, spread {b['spread']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

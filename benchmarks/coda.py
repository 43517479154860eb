"""CODA on ``lorenz96-sparse`` next to the classical baselines on the same windows; parameter tuning; closure.

What it measures (CPU, one run, figures printed as tables and written to JSON):

1. ``lorenz96-sparse`` (K=40, dt=0.01, 75 % missing, sigma=1, 51-step windows centred on the target): CODA trained on
   observations only with ``alpha = 1`` and ``alpha = 0`` (the same budget), OI, EnKS (100 members, inflation
   tuned) and 4D-Var on the same held-out windows: RMSE of the mean, CRPS and coverage ECE (CODA's Laplace
   posterior), time per window and its ratio to CODA's. The cycled ETKF over the same test trajectories (all past
   observations; inflation tuned on a separate simulation, ``--only cycled`` runs it alone) is the reference of what
   unlimited information buys. CODA's Laplace factor is fitted on that separate simulation (seed 1, 64 trajectories:
   observations only). ``--save DIR`` keeps the trained networks.
   ``--only laplace --model PATH``: a saved network's Laplace posterior on the same windows, with the lags at and
   after the target or the whole window, unscaled or scaled by the factor fitted on that separate simulation.
2. Parameter tuning: ``F`` learned jointly with the network from starts 4, 6, 10 and 12 (data made at F=8), then
   refined by 4D-Var over 256 windows with free initial states (``CODA.refine_parameters``).
3. Closure: on ``lorenz96-two-scale``, a local closure learned inside the truncated model; free-forecast RMSE of the
   hybrid and of the truncated model against the two-scale truth by lead time, and a plot of the learned ``B(x)``
   against the true mean coupling (``--plot PATH``).

    python benchmarks/coda.py [--quick] [--minutes M] [--json PATH] [--plot PATH] [--save DIR]
        [--only sparse tuning closure laplace cycled] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import sbida
from sbida.baselines import OI, CycledETKF, EnKS, FourDVar
from sbida.diagnostics import evaluate
from sbida.estimators import CODA
from sbida.estimators.coda_parts import forecast_rmse


def train_coda(task, train, minutes: float, steps: int, val=None, **hp) -> tuple[CODA, float]:
    est = CODA(task, channels=[32, 64, 128], rollout=hp.pop("rollout", 25), **hp)
    t0 = time.perf_counter()
    est.fit(train, val, epochs=1, batch_size=32, lr=2e-3, steps_per_epoch=steps, max_time=60 * minutes,
            progress=False, val_windows=512)
    return est, time.perf_counter() - t0


def sparse_setup(quick: bool):
    """``lorenz96-sparse``: the task, training and test trajectories, a separate simulation (seed 1) for CODA's
    Laplace factor, the held-out windows and the samples per window."""
    task = sbida.tasks.get("lorenz96-sparse", n_trajectories=64 if quick else 512, n_states=256 if quick else 512)
    train, test = task.simulate(progress=False).split(0.875, 0.125)
    calib = task.simulate(progress=False, n_trajectories=16 if quick else 64, seed=1)
    idx = torch.linspace(0, len(test) - 1, 100 if quick else 400).long()
    return task, train, calib, test, idx, 100 if quick else 500


def evaluate_on(name, method, test, idx, n_samples) -> dict:
    res = evaluate(method, test, n_samples=n_samples, batch_size=50, indices=idx, progress=False, name=name)
    m = res.metrics()
    per_window = (res.timings.get("posterior", 0.0) + res.timings.get("sampling", 0.0)) / len(idx)
    return {"rmse": m["rmse"], "crps": m["crps"], "ece": m["coverage_ece"], "spread_skill": m["spread_skill"],
            "marginal_ece": m.get("marginal_ece"),
            "s_per_window": per_window}


def cycled_reference(task, train, calib, test, grid=(1.0025, 1.005, 1.01, 1.02), spin_up: int = 200) -> dict:
    """The cycled ETKF (40 members, all past observations) on the test trajectories, after ``spin_up`` cycles, with
    its inflation tuned on the separate simulation ``calib`` (the lowest RMSE there). Fixed seeds for the initial
    ensembles: with little inflation a filter can diverge on some trajectories, so an unseeded run is not
    reproducible."""
    etkf = CycledETKF.from_task(task, members=40).fit(train)

    def rmse(data, rho):
        mean, _ = etkf.run(data.y, data.mask, t0=float(data.times[0]), inflation=rho, progress=False,
                           generator=torch.Generator().manual_seed(0))
        return float((mean[:, spin_up:] - data.states[:, spin_up:]).pow(2).mean().sqrt())

    tuned = {rho: rmse(calib, rho) for rho in grid}
    best = min(tuned, key=tuned.get)
    return {"rmse": rmse(test, best), "inflation": best, "grid": tuned}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small data and budgets (a few minutes)")
    parser.add_argument("--minutes", type=float, default=None, help="training budget of each CODA run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    parser.add_argument("--plot", default=None, help="PNG of the learned closure against the true coupling")
    parser.add_argument("--only", nargs="*", default=["sparse", "tuning", "closure"],
                        choices=["sparse", "tuning", "closure", "laplace", "cycled"],
                        help="the parts to run (default: the first three)")
    parser.add_argument("--save", default=None, help="folder for the CODA networks of the sparse part")
    parser.add_argument("--model", default=None, help="a saved CODA network (laplace part)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quick = args.quick
    minutes = args.minutes if args.minutes is not None else (1.5 if quick else 10.0)
    steps = 100_000  # bounded by --minutes
    out: dict = {"threads": args.threads, "minutes": minutes, "quick": quick}
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.2f}; CODA budget {minutes:g} min per run")

    if "sparse" in args.only:
        # 1. lorenz96-sparse -------------------------------------------------------------------------------------------
        task, train, calib, test, idx, n_samples = sparse_setup(quick)
        n_test = len(idx)
        rows = {}
        for alpha in (1.0, 0.0):
            est, secs = train_coda(task, train, minutes, steps, val=calib, alpha=alpha)
            if args.save:
                est.save(os.path.join(args.save, f"coda_alpha{alpha:g}.pt"))
            rows[f"CODA alpha={alpha:g}"] = (evaluate_on("coda", est, test, idx, n_samples)
                                             | {"train_s": secs, "laplace_scale": float(est.laplace_scale)})
        oi = OI.from_task(task).fit(train)
        rows["OI"] = evaluate_on("oi", oi, test, idx, n_samples)
        enks = EnKS.from_task(task, members=100).fit(train)
        tuning = enks.tune(test.subset(torch.arange(min(4, test.n_trajectories))), n_windows=64 if quick else 128)
        rows[f"EnKS-100 (inflation {tuning['inflation']:g})"] = evaluate_on("enks", enks, test, idx, n_samples)
        var = FourDVar.from_task(task).fit(train)
        rows["4D-Var"] = evaluate_on("4dvar", var, test, idx, n_samples)
        cycled = cycled_reference(task, train, calib, test)
        base = rows["CODA alpha=1"]["s_per_window"]
        print(f"\nlorenz96-sparse, {n_test} held-out windows ({test.n_trajectories} trajectories), {n_samples} samples")
        print(f"{'method':34s} {'RMSE':>7s} {'CRPS':>7s} {'ECE':>6s} {'spr/skl':>7s} {'ms/window':>10s} {'x CODA':>8s}")
        for name, r in rows.items():
            print(f"{name:34s} {r['rmse']:7.3f} {r['crps']:7.3f} {r['ece']:6.3f} {r['spread_skill']:7.2f} "
                  f"{1e3 * r['s_per_window']:10.2f} {r['s_per_window'] / base:8.1f}")
        print(f"{'cycled ETKF, 40 members (reference)':34s} {cycled['rmse']:7.3f}   "
              f"(inflation {cycled['inflation']:g})")
        out["sparse"] = rows | {"cycled_etkf": cycled}

    if "cycled" in args.only and "sparse" not in args.only:
        task, train, calib, test, idx, n_samples = sparse_setup(quick)
        out["cycled_etkf"] = cycled = cycled_reference(task, train, calib, test)
        print(f"cycled ETKF, 40 members, on the {test.n_trajectories} test trajectories after 200 cycles: RMSE "
              f"{cycled['rmse']:.3f} (inflation {cycled['inflation']:g}, tuned on the separate simulation: "
              + ", ".join(f"{k:g}: {v:.3f}" for k, v in cycled["grid"].items()) + ")")

    if "laplace" in args.only:
        if args.model is None:
            parser.error("--only laplace needs --model PATH (a CODA network saved by --save)")
        task, train, calib, test, idx, n_samples = sparse_setup(quick)
        est = sbida.estimators.load(args.model)
        rows = {}
        for lags in ("forward", "window"):
            est.hparams["laplace_lags"] = lags
            for scaled in (False, True):
                est.laplace_scale.fill_(1.0)
                scale = est.calibrate_laplace(calib) if scaled else 1.0
                rows[f"{lags}, factor {scale:.3f}"] = evaluate_on("coda", est, test, idx, n_samples)
        print(f"\nCODA's Laplace posterior ({args.model}), {len(idx)} held-out windows, {n_samples} samples")
        print(f"{'lags, factor':24s} {'RMSE':>7s} {'spr/skl':>7s} {'ECE':>6s} {'marg. ECE':>9s} {'CRPS':>7s}")
        for name, r in rows.items():
            print(f"{name:24s} {r['rmse']:7.3f} {r['spread_skill']:7.2f} {r['ece']:6.3f} {r['marginal_ece']:9.3f} "
                  f"{r['crps']:7.3f}")
        out["laplace"] = rows

    if "tuning" in args.only:
        # 2. parameter tuning ------------------------------------------------------------------------------------------
        small = sbida.tasks.get("lorenz96-sparse", n_trajectories=32 if quick else 64, n_states=256)
        tr = small.simulate(progress=False)
        print("\nparameter tuning (data at F=8): start -> estimate after joint training -> after refine_parameters")
        out["tuning"] = {}
        for F0 in (4.0, 6.0, 10.0, 12.0):
            est = CODA(small, channels=[16, 32, 64], rollout=10, alpha=1.0, tune={"F": F0}, param_lr=0.05)
            est.fit(tr, None, epochs=1, batch_size=32, lr=3e-3, steps_per_epoch=300 if quick else 1000, progress=False)
            steps, joint = len(est.parameter_history["F"]), est.parameter_history["F"][-1]
            t0 = time.perf_counter()
            refined = est.refine_parameters(tr, windows=256, rollout=50)["F"]
            secs = time.perf_counter() - t0
            out["tuning"][F0] = {"joint": joint, "refined": refined, "refine_s": secs}
            print(f"  F0 = {F0:4.1f} -> {joint:.3f} (error {joint - 8:+.3f}) after {steps} steps -> {refined:.3f} "
                  f"(error {refined - 8:+.3f}; {secs:.0f} s)")

    if "closure" in args.only:
        # 3. closure ---------------------------------------------------------------------------------------------------
        two_task = sbida.tasks.get("lorenz96-two-scale", n_trajectories=24 if quick else 64, n_states=256)
        data = two_task.simulate(progress=False)
        est = CODA(two_task, channels=[16, 32, 64], rollout=10, alpha=1.0, closure={"hidden": 32, "layers": 2})
        est.fit(data, None, epochs=1, batch_size=32, lr=3e-3, steps_per_epoch=300 if quick else 1500, progress=False)
        two = two_task.simulator
        x0 = two.rollout(two.initial_state(32, torch.Generator().manual_seed(11)), 2000, every=2000)[:, -1]
        truth = two.rollout(x0, 400, every=2, output=True)
        hybrid = forecast_rmse(est.dynamics, two.output(x0), truth, every=2)
        truncated = forecast_rmse(two.truncated(), two.output(x0), truth, every=2)
        print("\nclosure: free-forecast RMSE against the two-scale truth (32 initial states)")
        print(f"{'lead':>6s} {'hybrid':>8s} {'truncated':>10s}")
        out["closure"] = {}
        for lead in (10, 50, 100, 150, 200):
            print(f"{lead * 0.01:6.2f} {float(hybrid[lead]):8.3f} {float(truncated[lead]):10.3f}")
            out["closure"][lead * 0.01] = [float(hybrid[lead]), float(truncated[lead])]
        if args.plot:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            traj = two.rollout(x0, 400, every=2)
            X, C = two.output(traj).flatten(), two.coupling(traj).flatten()
            edges = torch.linspace(float(X.min()), float(X.max()), 31)
            centres, means = [], []
            for a, b in zip(edges[:-1], edges[1:]):
                sel = (X >= a) & (X < b)
                if sel.sum() > 20:
                    centres.append(float((a + b) / 2))
                    means.append(float(C[sel].mean()))
            xs = torch.linspace(float(X.min()), float(X.max()), 200)
            with torch.no_grad():
                b = est.dynamics.closure(xs[None])[0]
            fig, ax = plt.subplots(figsize=(5, 3.5))
            ax.scatter(X[::50], C[::50], s=2, alpha=0.2, color="grey", label="coupling (samples)")
            ax.plot(centres, means, "k-", lw=2, label="mean coupling given $X_k$")
            ax.plot(xs, b, "C3-", lw=2, label="learned $B(X_k)$")
            ax.set_xlabel("$X_k$")
            ax.set_ylabel("tendency")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(args.plot, dpi=120)
            print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=str)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

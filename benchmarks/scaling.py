r"""Scaling of the estimators with the state size: Lorenz-96 with K in {8, ..., 256} and the 2x32x32 Kolmogorov flow.

For every (task, size, estimator) a fresh subprocess (so that its peak memory is its own) simulates a small dataset,
builds the estimator with the hyperparameters of ``configs/estimators/<kind>.yaml``, trains it for two epochs of a
fixed number of steps and reports: the seconds per training step (second epoch, so set-up is excluded), the peak
resident memory (``resource.getrusage`` max RSS, and its growth over the memory after the imports), the seconds for
1000 samples of one window (best of two, after a warm-up draw), and the nRMSE and ECE of
:func:`sbida.diagnostics.evaluate` on a few test windows (after so little training these measure the cost of the
pipeline, not the quality of a trained estimator). ComposedScore's sampler keeps its residual network at weight 1
(``residual_weight_fit`` off): the cost of the composition of ``T + 1`` scores, not of a fitted weight of 0.

Each cost :math:`c` is fitted against the number of state values :math:`D` on Lorenz-96 by least squares in log-log,

.. math:: \log c = a \log D + b,

and the exponent :math:`a` is printed with the table; a PNG plots the costs against :math:`D`. A run that fails or
exceeds ``--timeout`` is reported as where that estimator stopped scaling.

    python benchmarks/scaling.py [--quick | --smoke] [--estimators npe score ...] [--sizes 8 16 ...]
        [--no-lorenz96 | --no-kolmogorov] [--out DIR] [--timeout S]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

__all__ = ["fit_exponent", "measure", "SIZES"]

SIZES = [8, 16, 32, 64, 128, 256]
ESTIMATORS = ["npe", "nre", "score", "composed", "coda"]
COSTS = [("step_seconds", "s/step"), ("sample_seconds", "s/1000 samples"), ("peak_mb", "peak MB"),
         ("extra_mb", "MB above imports")]


def fit_exponent(sizes, costs) -> tuple[float, float]:
    """Least-squares fit of ``log c = a log D + b``.

    Args:
        sizes: ``(n,)`` state sizes ``D`` (positive).
        costs: ``(n,)`` costs (positive, finite).

    Returns:
        The exponent ``a`` and the prefactor ``exp(b)``.
    """
    D = torch.as_tensor(sizes, dtype=torch.float64).flatten()
    c = torch.as_tensor(costs, dtype=torch.float64).flatten()
    if D.shape != c.shape or D.numel() < 2:
        raise ValueError(f"need as many sizes as costs, at least 2, got {D.numel()} sizes and {c.numel()} costs")
    if not (torch.isfinite(D).all() and torch.isfinite(c).all()) or (D <= 0).any() or (c <= 0).any():
        raise ValueError(f"sizes and costs must be positive and finite, got sizes {D.tolist()} and costs {c.tolist()}")
    if D.unique().numel() < 2:
        raise ValueError(f"need at least two distinct sizes, got {D.tolist()}")
    A = torch.stack([D.log(), torch.ones_like(D)], dim=1)
    sol = torch.linalg.lstsq(A, c.log()[:, None]).solution.squeeze(-1)
    return float(sol[0]), float(sol[1].exp())


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def measure(task_name: str, size: int, estimator: str, steps: int = 10, batch_size: int = 64,
            n_trajectories: int = 16, n_states: int = 64, eval_windows: int = 32, n_samples: int = 100,
            seed: int = 0, hparams: dict | None = None) -> dict:
    """Costs and scores of one estimator at one size (run it in a fresh process for a meaningful peak memory).

    Args:
        task_name: ``"lorenz96"`` (``size`` is K) or ``"kolmogorov"`` (``size`` is the output resolution).
        size: see ``task_name``.
        estimator: an estimator name (``npe``, ``nre``, ``score``, ``composed``, ``coda``).
        steps: training steps per epoch (two epochs; the second is timed).
        batch_size: windows per step.
        n_trajectories, n_states: the simulated dataset.
        eval_windows, n_samples: the evaluation.
        seed: seed of everything.
        hparams: estimator settings over the configuration file's.

    Returns:
        ``{"D", "step_seconds", "sample_seconds", "peak_mb", "extra_mb", "nrmse", "ece", ...}``.
    """
    import sbida
    from sbida.diagnostics import evaluate
    from sbida.runs import EstimatorSpec, RunConfig, _estimator_settings

    base_mb = _rss_mb()
    key = {"lorenz96": "simulator.K", "kolmogorov": "simulator.output_resolution"}[task_name]
    task = sbida.tasks.get(task_name, f"{key}={size}", f"data.n_trajectories={n_trajectories}",
                           f"data.n_states={n_states}", f"data.seed={seed}")
    t0 = time.perf_counter()
    data = task.simulate(progress=False)
    sim_seconds = time.perf_counter() - t0
    train, val, test = data.split(0.7, 0.1, 0.2, seed=seed)
    hp = {"rollout": task.window.length} if estimator == "coda" else {}
    if estimator == "composed":  # the cost of the sampler with its network at every step, as trained: after so little
        hp["residual_weight_fit"] = False  # training a fitted weight of 0 would time the closed form's noise alone
    hp.update(hparams or {})
    cfg = RunConfig(task=task_name, estimators={estimator: EstimatorSpec(kind=estimator, estimator=hp)}, seed=seed)
    cls, hp, fit = _estimator_settings(cfg, estimator)
    est = cls(task, **hp)
    fit.update(epochs=2, steps_per_epoch=steps, batch_size=batch_size, val_windows=min(64, len(val)), patience=1000,
               max_time=None)
    history = est.fit(train, val, progress=False, **fit)
    step_seconds = (history["time"][1] - history["time"][0]) / steps
    _, y, m, t = test.get(torch.tensor([0]))
    g = torch.Generator().manual_seed(seed)
    est.posterior(y, m, t).sample(10, generator=g)  # warm-up (first-call overheads)
    sample_seconds = math.inf
    for _ in range(2):  # the best of two draws
        t0 = time.perf_counter()
        est.posterior(y, m, t).sample(1000, generator=g)
        sample_seconds = min(sample_seconds, time.perf_counter() - t0)
    idx = torch.arange(min(eval_windows, len(test)))
    r = evaluate(est, test, n_samples=n_samples, batch_size=eval_windows, indices=idx, progress=False, seed=seed)
    peak = _rss_mb()
    return {"task": task_name, "size": size, "D": math.prod(task.state_shape), "estimator": estimator,
            "parameters": sum(p.numel() for p in est.parameters()), "step_seconds": step_seconds,
            "sample_seconds": sample_seconds, "peak_mb": peak, "extra_mb": max(peak - base_mb, 1e-3),
            "nrmse": r.nrmse, "ece": r.coverage.ece, "simulation_seconds": sim_seconds, "steps": steps,
            "batch_size": batch_size}


def _subprocess(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", *args]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {p.returncode}: {tail[:200]}"}
    return json.loads(lines[-1])


def summarize(rows: list[dict]) -> tuple[str, dict]:
    """The table and the fitted exponents ``{estimator: {cost: a}}`` over the Lorenz-96 sizes."""
    lines = [f"{'task':10s} {'size':>5s} {'D':>6s} {'estimator':10s} {'s/step':>9s} {'s/1000 smp':>11s} "
             f"{'peak MB':>8s} {'+MB':>8s} {'nRMSE':>7s} {'ECE':>6s}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['task']:10s} {r['size']:>5d} {'':>6s} {r['estimator']:10s} {r['error']}")
            continue
        lines.append(f"{r['task']:10s} {r['size']:>5d} {r['D']:>6d} {r['estimator']:10s} {r['step_seconds']:>9.4f} "
                     f"{r['sample_seconds']:>11.3f} {r['peak_mb']:>8.0f} {r['extra_mb']:>8.0f} {r['nrmse']:>7.3f} "
                     f"{r['ece']:>6.3f}")
    exps: dict[str, dict] = {}
    lines.append("\nexponents a of cost ~ D^a (Lorenz-96, log-log least squares)")
    for est in dict.fromkeys(r["estimator"] for r in rows):
        ok = [r for r in rows if r["estimator"] == est and r["task"] == "lorenz96" and "error" not in r]
        failed = [r for r in rows if r["estimator"] == est and "error" in r]
        exps[est] = {}
        parts = []
        for key, name in COSTS:
            if len({r["D"] for r in ok}) >= 2:
                a, _ = fit_exponent([r["D"] for r in ok], [r[key] for r in ok])
                exps[est][key] = a
                parts.append(f"{name} {a:+.2f}")
        stop = f"; stopped at {failed[0]['task']} size {failed[0]['size']} ({failed[0]['error']})" if failed else ""
        lines.append(f"  {est:10s} " + ", ".join(parts) + stop)
    return "\n".join(lines), exps


def plot(rows: list[dict], path: Path) -> Path:
    """Log-log plots of the costs against D, one line per estimator."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, (key, name) in zip(axes, COSTS[:3]):
        for est in dict.fromkeys(r["estimator"] for r in rows):
            ok = sorted((r for r in rows if r["estimator"] == est and "error" not in r and r["task"] == "lorenz96"),
                        key=lambda r: r["D"])
            kol = [r for r in rows if r["estimator"] == est and "error" not in r and r["task"] == "kolmogorov"]
            color = None
            if ok:
                line, = ax.loglog([r["D"] for r in ok], [r[key] for r in ok], "o-", label=est)
                color = line.get_color()
            if kol:
                ax.loglog([r["D"] for r in kol], [r[key] for r in kol], "s", color=color, mfc="none",
                          label=None if ok else est)
        ax.set_xlabel("state size D")
        ax.set_title(name)
    axes[0].legend(fontsize=8)
    fig.suptitle("Lorenz-96 (lines), Kolmogorov 2x32x32 (open squares)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="5 steps per epoch, short evaluation")
    g.add_argument("--smoke", action="store_true", help="two sizes, NPE only, 2 steps (seconds; for testing)")
    p.add_argument("--estimators", nargs="*", default=None)
    p.add_argument("--sizes", type=int, nargs="*", default=None)
    p.add_argument("--no-kolmogorov", action="store_true")
    p.add_argument("--no-lorenz96", action="store_true", help="the Kolmogorov row only")
    p.add_argument("--out", default="runs/scaling")
    p.add_argument("--timeout", type=float, default=None, help="seconds per (size, estimator) before giving up")
    p.add_argument("--one", nargs=3, metavar=("TASK", "SIZE", "ESTIMATOR"), help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    steps = a.steps or (2 if a.smoke else 5 if a.quick else 20)
    if a.one:
        task, size, est = a.one
        small = a.smoke or a.quick
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from run import ESTIMATOR_SHORT  # the sampler settings of the short modes, as in run.py

        hp = ESTIMATOR_SHORT["smoke" if a.smoke else "quick"].get(est) if small else None
        print(json.dumps(measure(task, int(size), est, steps=steps, eval_windows=16 if small else 64,
                                 n_samples=50 if small else 200, n_trajectories=12 if small else 32, hparams=hp)))
        return 0
    sizes = a.sizes or ([8, 16] if a.smoke else SIZES)
    estimators = a.estimators or (["npe"] if a.smoke else ESTIMATORS)
    timeout = a.timeout or (120 if a.smoke else 240 if a.quick else 1800)
    cases = ([] if a.no_lorenz96 else [("lorenz96", k) for k in sizes]) + \
        ([] if a.no_kolmogorov or a.smoke else [("kolmogorov", 32)])
    if not cases:
        p.error("--no-lorenz96 and --no-kolmogorov (or --smoke) leave nothing to run")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    flags = ["--steps", str(steps)] + (["--smoke"] if a.smoke else ["--quick"] if a.quick else [])
    for est in estimators:
        stopped = False
        for task, size in cases:
            if stopped and task == "lorenz96":  # a failure at a smaller K: the larger ones are not tried
                rows.append({"task": task, "size": size, "estimator": est,
                             "error": "not tried (failed at a smaller K)"})
                continue
            t0 = time.perf_counter()
            r = _subprocess([task, str(size), est, *flags], timeout) | {"task": task, "size": size, "estimator": est}
            stopped = stopped or ("error" in r and task == "lorenz96")
            rows.append(r)
            print(f"{task} {size} {est}: {r.get('error') or 'ok'} ({time.perf_counter() - t0:.0f} s)", flush=True)
    table, exps = summarize(rows)
    print(table)
    png = plot(rows, out / "scaling.png")
    (out / "scaling.json").write_text(json.dumps({"rows": rows, "exponents": exps, "steps": steps}, indent=1))
    print(f"written {out / 'scaling.json'} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

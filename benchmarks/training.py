"""Training cost of each estimator on its default budget (``configs/estimators/*.yaml``), measured per step and
projected: the full budgets take hours to days on a CPU, so this script times ``--steps`` training steps of each
estimator with the configuration file's settings (batch size, learning rate, network) and multiplies by the file's
steps (``epochs`` x ``steps_per_epoch``, one pass over the default task's training windows when that is ``null``).
The projection is an upper bound: early stopping (``patience``) may end a fit sooner.

    python benchmarks/training.py [--task lorenz96] [--estimators npe nre score composed coda] [--steps 30]

Each estimator trains two epochs of ``--steps`` steps on a small simulation of the task; the second epoch is timed
(the first pays one-time costs) and includes a validation pass of ``--val-windows`` windows.
"""

from __future__ import annotations

import argparse
import json

import torch

import sbida
from sbida.config import load_yaml
from sbida.runs import CONFIG_DIR, EstimatorSpec, RunConfig, _estimator_settings

ESTIMATORS = ["npe", "nre", "score", "composed", "coda"]


def train_windows_of_default(task_name: str, split: float = 0.8) -> tuple[int, int]:
    """``(training windows, trajectories)`` of the task's default data set under the default 0.8 split by trajectory,
    from a one-trajectory simulation with the default trajectory length."""
    task = sbida.tasks.get(task_name)
    n_traj = int(task.config.data.n_trajectories)
    one = sbida.tasks.get(task_name, "data.n_trajectories=1").simulate(progress=False)
    return round(split * n_traj) * len(one), n_traj


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="lorenz96")
    p.add_argument("--estimators", nargs="*", default=ESTIMATORS)
    p.add_argument("--steps", type=int, default=30, help="steps per epoch of the timed fit")
    p.add_argument("--val-windows", type=int, default=64)
    p.add_argument("--trajectories", type=int, default=16, help="trajectories of the small simulation")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    if a.steps < 1:
        p.error("--steps must be >= 1")
    torch.set_num_threads(a.threads)
    task = sbida.tasks.get(a.task, f"data.n_trajectories={a.trajectories}")
    data = task.simulate(progress=False)
    train, val = data.split(0.75, 0.25, seed=0)
    full_windows, full_traj = train_windows_of_default(a.task)
    print(f"{a.task}: default data {full_traj} trajectories, about {full_windows} training windows; timing on "
          f"{len(train)} windows, {a.threads} thread(s)", flush=True)
    rows = {}
    for name in a.estimators:
        defaults = load_yaml(CONFIG_DIR / "estimators" / f"{name}.yaml").get("fit") or {}
        hp = {"rollout": min(task.window.length, 25)} if name == "coda" else {}
        fit = {"epochs": 2, "steps_per_epoch": a.steps, "max_time": None, "patience": 10**6,
               "val_windows": a.val_windows}
        cfg = RunConfig(task=task.name, estimators={name: EstimatorSpec(kind=name, estimator=hp, fit=fit)})
        cls, hp, fit_args = _estimator_settings(cfg, name)
        est = cls(task, **hp)
        history = est.fit(train, val, progress=False, **fit_args)
        per_step = (history["time"][1] - history["time"][0]) / a.steps
        batch = int(fit_args["batch_size"])
        epochs = int(defaults.get("epochs") or 1)
        spe = defaults.get("steps_per_epoch")
        steps = epochs * (int(spe) if spe else max(1, full_windows // batch))
        rows[name] = {"kind": cls.__name__, "seconds_per_step": per_step, "batch_size": batch, "epochs": epochs,
                      "steps": steps, "projected_hours": steps * per_step / 3600, "threads": a.threads}
        print(f"{name:9s} {per_step:7.3f} s/step (batch {batch}); default budget {epochs} epochs, {steps} steps: "
              f"{steps * per_step / 3600:8.2f} h", flush=True)
    print("\n| estimator | s / step | batch | default epochs | default steps | projected time |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        h = r["projected_hours"]
        when = f"{h:.1f} h" if h >= 1 else f"{h * 60:.0f} min"
        print(f"| {name} | {r['seconds_per_step']:.3f} | {r['batch_size']} | {r['epochs']} | {r['steps']} | {when} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()

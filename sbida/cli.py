"""The ``sbida`` command line.

    sbida tasks                                   list the tasks and the runs
    sbida simulate CONFIG [key=value ...]         simulate a task's (or a run's) dataset into its own folder
    sbida train RUN [key=value ...]               fit the run's estimators (checkpoints in RUN_FOLDER/checkpoints)
    sbida evaluate RUN [key=value ...]            evaluate estimators and baselines on the same test windows
    sbida report RUN [key=value ...]              write the self-contained HTML report and its metrics JSON
    sbida quickstart [key=value ...]              the main job: NPE, PosteriorScore, CODA, EnKS and 4D-Var on
                                                  lorenz96 (K=40), evaluated and reported (configs/runs/quickstart.yaml)

``CONFIG`` is a task name (``sbida tasks``), a run name (``configs/runs``), the path of a task or run YAML file, or
a run folder. ``RUN`` is a run name, a run YAML file or a run folder. Overrides are ``key=value`` with dotted keys:
``simulator.K=64`` for a task, ``seed=1``, ``estimators.npe.fit.epochs=2``, ``task_overrides.data.n_trajectories=64``
or ``evaluation.n_samples=200`` for a run. Each stage runs the earlier ones whose outputs are missing, so
``sbida report RUN`` alone simulates, trains, evaluates and reports.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main"]


def _simulate(task_name: str, overrides: list[str], out: Path | None, progress: bool = True) -> Path:
    from . import tasks
    from .config import to_yaml

    task = tasks.get(task_name, *overrides)
    run = out or Path("runs") / task.name
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(to_yaml(task.config))
    print(task.summary())
    t0 = time.perf_counter()
    data = task.simulate(progress=progress)
    elapsed = time.perf_counter() - t0
    path = data.save(run / "data.h5")
    stats = data.stats() | {"simulation_seconds": round(elapsed, 2), "path": str(path)}
    (run / "data.json").write_text(json.dumps(stats, indent=2))
    print(data.summary())
    print(f"  simulated in {elapsed:.1f} s; written to {path}")
    return path


def cmd_tasks(args) -> int:
    from . import runs, tasks

    for name in tasks.available():
        t = tasks.get(name)
        print(f"{name:20s} state {str(t.state_shape):14s} obs {str(t.obs_shape):12s} window {t.window.length:>3d} "
              f"({t.window.align})")
    print("\nruns (configs/runs): " + ", ".join(runs.available()))
    return 0


def _is_run(config: str) -> bool:
    """Whether ``config`` names a run (a run name, a run YAML file or a run folder) rather than a task."""
    from . import runs, tasks
    from .config import load_yaml

    path = Path(config)
    if path.is_dir():
        return True
    if path.suffix in (".yaml", ".yml"):
        keys = set(load_yaml(path))
        return bool(keys & {"task", "estimators", "baselines"}) and "simulator" not in keys
    return config not in tasks.available() and config in runs.available()


def _run(args):
    from .runs import Run

    return Run(args.config, args.overrides, out=args.out, progress=not args.quiet)


def cmd_simulate(args) -> int:
    if _is_run(args.config):
        run = _run(args)
        data = run.simulate(force=True)
        print(data.summary())
        print(f"run folder: {run.folder}")
        return 0
    _simulate(args.config, args.overrides, Path(args.out) if args.out else None, progress=not args.quiet)
    return 0


def cmd_train(args) -> int:
    run = _run(args)
    record = run.train(force=args.force)
    for label, r in record.items():
        print(f"  {label:16s} {r['kind']:14s} {r['epochs']:4d} epochs {r['seconds']:8.1f} s  best val loss "
              f"{r['best_val_loss']}")
    print(f"run folder: {run.folder}")
    return 0


def cmd_evaluate(args) -> int:
    run = _run(args)
    run.evaluate()
    print(run.headline())
    print(f"metrics: {run.path('metrics.json')}")
    return 0


def cmd_report(args) -> int:
    run = _run(args)
    if args.force or not run.path("metrics.json").exists():
        run.evaluate()
    path = run.report()
    print(run.headline())
    print(f"report: {path}")
    return 0


def cmd_quickstart(args) -> int:
    import torch

    from .runs import Run

    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    run = Run("quickstart", args.overrides, out=args.out, progress=not args.quiet)
    names = ", ".join([*run.config.estimators, *run.config.baselines])
    print(f"sbida quickstart: {names} on {run.task.name} (K={run.task.state_shape[0]}); run folder {run.folder}\n")
    if args.force or not run.path("metrics.json").exists():
        run.evaluate()
    path = run.report()
    minutes = (time.perf_counter() - t0) / 60
    print(f"\n{run.headline()}\n")
    print(f"report: {path}")
    print(f"metrics: {run.path('metrics.json')}")
    print(f"done in {minutes:.1f} min ({torch.get_num_threads()} threads)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sbida", description="Probabilistic data assimilation as simulation-based "
                                "inference.", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("tasks", help="list the tasks", description="List the tasks of configs/tasks.")
    s.set_defaults(func=cmd_tasks)

    s = sub.add_parser("simulate", help="simulate a task's dataset",
                       description="Simulate a task's (or a run's) dataset and write it (HDF5), its config and "
                                   "summary into a run folder.")
    s.add_argument("config", help="task name, run name, task or run YAML file, or run folder")
    s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.n_trajectories=128")
    s.add_argument("--out", help="run folder (default runs/<task or run name>)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_simulate)

    for name, helptext, desc in (
        ("train", "fit the run's estimators",
         "Fit every estimator of a run (simulating its dataset first if needed); checkpoints and training.json go "
         "into the run folder."),
        ("evaluate", "evaluate the run's estimators and baselines",
         "Evaluate every estimator and baseline of a run on the same test windows (training first if needed); "
         "writes metrics.json and examples.pt."),
        ("report", "write the run's HTML calibration report",
         "Write report.html (self-contained, figures embedded) and report.json for a run (evaluating first if "
         "needed)."),
    ):
        s = sub.add_parser(name, help=helptext, description=desc)
        s.add_argument("config", metavar="RUN", help="run name (configs/runs), run YAML file or run folder")
        s.add_argument("overrides", nargs="*", help="key=value overrides, e.g. seed=1 estimators.npe.fit.epochs=2")
        s.add_argument("--out", help="run folder (default: the config's out, else runs/<run name>)")
        s.add_argument("--quiet", action="store_true", help="no progress bars")
        s.add_argument("--force", action="store_true", help="redo the stage even if its outputs exist")
        s.set_defaults(func={"train": cmd_train, "evaluate": cmd_evaluate, "report": cmd_report}[name])

    s = sub.add_parser("quickstart", help="the main job: train, evaluate and report on lorenz96",
                       description="The main job: on the lorenz96 task (K=40) simulate, train NPE, PosteriorScore and "
                                   "CODA with small budgets, run EnKS and 4D-Var on the same test windows, and write "
                                   "the HTML calibration report (the run configs/runs/quickstart.yaml; the same as "
                                   "`sbida report quickstart`, with a summary).")
    s.add_argument("overrides", nargs="*", help="key=value overrides of the run, e.g. seed=1 "
                                                "estimators.npe.fit.epochs=1")
    s.add_argument("--out", default=None, help="run folder (default runs/quickstart)")
    s.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the networks are small, and one thread is faster and steadier "
                        "than two on a shared 2-core machine)")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    s.add_argument("--force", action="store_true", help="evaluate again even if the run folder has metrics")
    s.set_defaults(func=cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options (``--out DIR seed=1``): argparse leaves them over, they join the others
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sbida {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

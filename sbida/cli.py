"""The ``sbida`` command line.

    sbida tasks                                   list the tasks
    sbida simulate CONFIG [key=value ...]         simulate a task's dataset into its own run folder
    sbida quickstart [--out DIR]                  the main job (simulate the lorenz96 task and summarize it)

``CONFIG`` is a task name (``sbida tasks``) or the path of a task YAML file; overrides are ``section.key=value``
(``simulator.K=64``, ``data.n_trajectories=128``).
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
    from . import tasks

    for name in tasks.available():
        t = tasks.get(name)
        print(f"{name:20s} state {str(t.state_shape):14s} obs {str(t.obs_shape):12s} window {t.window.length:>3d} "
              f"({t.window.align})")
    return 0


def cmd_simulate(args) -> int:
    _simulate(args.config, args.overrides, Path(args.out) if args.out else None, progress=not args.quiet)
    return 0


def cmd_quickstart(args) -> int:
    from .data import WindowDataset

    out = Path(args.out)
    print("sbida quickstart: simulate the lorenz96 task (K=40), split it by trajectory and summarize it\n")
    path = _simulate("lorenz96", args.overrides, out, progress=not args.quiet)
    data = WindowDataset.load(path)
    for name, part in zip(("train", "val", "test"), data.split(0.8, 0.1, 0.1)):
        print(f"  {name:5s}: {part.n_trajectories:5d} trajectories, {len(part):8d} windows")
    print(f"\nrun folder: {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sbida", description="Probabilistic data assimilation as simulation-based "
                                "inference.", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("tasks", help="list the tasks", description="List the tasks of configs/tasks.")
    s.set_defaults(func=cmd_tasks)

    s = sub.add_parser("simulate", help="simulate a task's dataset",
                       description="Simulate a task's dataset and write it (HDF5), its config and summary into a run "
                                   "folder.")
    s.add_argument("config", help="task name or path of a task YAML file")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. data.n_trajectories=128")
    s.add_argument("--out", help="run folder (default runs/<task name>)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_simulate)

    s = sub.add_parser("quickstart", help="the main job", description="Simulate the lorenz96 task and summarize it.")
    s.add_argument("overrides", nargs="*", help="section.key=value overrides of the lorenz96 task")
    s.add_argument("--out", default="runs/quickstart", help="run folder (default runs/quickstart)")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"sbida {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

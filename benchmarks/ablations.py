r"""Ablations: time embedding, mask channel, window length and simulation budget, each a small table.

Every row trains an estimator (hyperparameters from ``configs/estimators/<kind>.yaml``, with the cheaper samplers of
``run.ESTIMATOR_SHORT`` under ``--quick``/``--smoke``; a fixed number of steps, :data:`BUDGETS`) and scores it with
:func:`sbida.diagnostics.evaluate` on test windows: RMSE, nRMSE, CRPS, spread/skill and ECE (mean |coverage - level|).

- **Time embedding** (``lorenz96``, K=40; the transient makes :math:`t` informative): *off* sets the time of every
  window to 0 in the training, validation and test sets, so the window encoder's embedding of :math:`t` is a
  constant and carries no information (the networks are not edited). Both are also scored on test windows of the
  transient (``t <= TRANSIENT``), where the climatology still changes with ``t``.
- **Mask channel** (``lorenz96-sparse``, 75 % of values missing; on ``lorenz96`` every station is observed, so the
  mask is constant there): *off* gives the estimator a mask of ones, with the missing values at 0, so a missing
  value cannot be told from an observed 0. CODA's training loss reads the mask as well (it compares its rollout with
  the observations only), so it keeps the data's mask and its network is shown a mask of ones instead
  (``mask_input: false``); until 2026-12-05 it was given the mask of ones in the data, and fitted the zeros.
- **Window length** (``lorenz96``): 1, 5, 10, 25 observation times ending at the target.
- **Simulation budget** (``lorenz96``): 10^3, 10^4, 10^5 training windows (whole trajectories drawn from a larger
  training set), the same steps for all, on the same test windows.

    python benchmarks/ablations.py [--quick | --smoke] [--estimators npe ...] [--only time mask window budget]
                                   [--windows N] [--samples S] [--out DIR] [--lengths L ...]
                                   [--budgets N ...] [--variants with without]

With ``--out DIR`` an interrupted run resumes where it stopped (the full budget takes hours per estimator): the
simulated datasets are cached in ``DIR/data``, every finished row in ``DIR/rows.json`` (a later run with the same
settings skips it), and every fit writes its training state after each epoch to ``DIR/checkpoints`` (resumed by the
next run when its settings are the same, :func:`sbida.runs.resumable`; deleted once its row is recorded), and the
trained estimator of every row is kept in ``DIR/models`` (``sbida.estimators.load``), to be scored again later.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

import sbida
from sbida.data import WindowDataset
from sbida.diagnostics import evaluate
from sbida.runs import EstimatorSpec, RunConfig, _estimator_settings, fit_from_state, resumable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ESTIMATOR_SHORT, _fmt  # noqa: E402  (the short modes' sampler settings; "-" for missing values)

__all__ = ["without_time", "without_mask", "train_and_score", "transient_windows", "BUDGETS", "TRANSIENT"]

BUDGETS = {  # data (trajectories x saved states), fit overrides, evaluation
    "full": {"data": (512, 512), "fit": {"epochs": 20, "steps_per_epoch": 500}, "windows": 1000, "samples": 500,
             "budgets": [1000, 10000, 100000]},
    "quick": {"data": (48, 256), "fit": {"epochs": 2, "steps_per_epoch": 100, "max_time": 60.0}, "windows": 200,
              "samples": 100, "budgets": [1000, 10000, 100000]},
    "smoke": {"data": (12, 64), "fit": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 16, "val_windows": 32},
              "windows": 12, "samples": 32, "budgets": [100, 200]},
}


LENGTHS = (1, 5, 10, 25)  # observation times per window in the window-length ablation

# time units: from x0 ~ N(0, I), Lorenz-96 (K=40, F=8) reaches its climatology (mean 2.3, sd 3.6) by t = 2
TRANSIENT = 2.0


def without_time(data: WindowDataset) -> WindowDataset:
    """The same windows with every time set to 0 (the time embedding then carries no information)."""
    return WindowDataset(data.states, data.y, data.mask, torch.zeros_like(data.times), data.window, data.stride,
                         data.trajectory_ids, data.config, data.meta)


def without_mask(data: WindowDataset) -> WindowDataset:
    """The same windows with a mask of ones and missing values at 0 (the mask channel then carries nothing)."""
    y = torch.where(data.mask, data.y, torch.zeros((), dtype=data.y.dtype))
    return WindowDataset(data.states, y, torch.ones_like(data.mask), data.times, data.window, data.stride,
                         data.trajectory_ids, data.config, data.meta)


def train_and_score(task, estimator: str, train: WindowDataset, val: WindowDataset, test: WindowDataset,
                    fit: dict, n_windows: int, n_samples: int, seed: int = 0, early: Tensor | None = None,
                    hparams: dict | None = None, checkpoint: str | Path | None = None,
                    progress: bool = False, save: str | Path | None = None) -> dict:
    """Train one estimator on ``train`` and score it on ``n_windows`` random windows of ``test``.

    Args:
        early: indices of test windows to score it on as well (e.g. :func:`transient_windows`): keys ``*_early``.
        hparams: estimator settings over the configuration files', by estimator name (e.g. the short modes' cheaper
            samplers, ``run.ESTIMATOR_SHORT``).
        checkpoint: the fit's training state, written after every epoch and resumed from when it holds an
            interrupted fit of the same settings (``seconds`` then counts the earlier sittings too).
        progress: progress bars of the fit and of the evaluation.
        save: where to save the trained estimator (``None``: not saved).

    Returns:
        ``{"rmse", "nrmse", "crps", "spread_skill", "ece", "ece_d", "train_windows", "test_windows", "seconds"}``
        (``ece_d``: by the distance statistic; and
        ``"rmse_early"``, ``"nrmse_early"``, ``"spread_skill_early"``, ``"ece_early"``, ``"early_windows"`` with
        ``early``).
    """
    hp = {"rollout": min(task.window.length, 25)} if estimator == "coda" else {}
    hp.update((hparams or {}).get(estimator, {}))
    cfg = RunConfig(task=task.name, estimators={estimator: EstimatorSpec(kind=estimator, estimator=hp, fit=fit)},
                    seed=seed)
    cls, hp, fit_args = _estimator_settings(cfg, estimator)
    est = cls(task, **hp)
    if checkpoint is not None:
        _, seconds = fit_from_state(est, train, val, fit_args, checkpoint, bool(resumable(checkpoint, est, fit_args)),
                                    progress)
    else:
        t0 = time.perf_counter()
        est.fit(train, val, progress=progress, **fit_args)
        seconds = time.perf_counter() - t0
    if save is not None:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        est.save(save)
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n_windows].sort().values
    r = evaluate(est, test, n_samples=n_samples, indices=idx, progress=progress, seed=seed)
    res = {"rmse": r.rmse, "nrmse": r.nrmse, "crps": r.crps, "spread_skill": r.spread_skill, "ece": r.coverage.ece,
           "ece_d": r.coverage.distance_ece, "train_windows": len(train), "test_windows": len(idx), "seconds": seconds}
    if early is not None:
        e = evaluate(est, test, n_samples=n_samples, indices=early, progress=progress, seed=seed)
        res |= {"rmse_early": e.rmse, "nrmse_early": e.nrmse, "spread_skill_early": e.spread_skill,
                "ece_early": e.coverage.ece, "early_windows": len(early)}
    return res


def transient_windows(data: WindowDataset, until: float, n: int, seed: int = 0) -> Tensor:
    """Indices ``(<= n,)`` of random windows of ``data`` whose target time is at most ``until``, sorted."""
    times = data.times[data.locate(torch.arange(len(data)))[1]]
    pool = torch.nonzero(times <= until).flatten()
    if len(pool) == 0:
        raise ValueError(f"no window of the data has a time <= {until}")
    return pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:n]].sort().values


def _table(title: str, rows: list[dict]) -> str:
    early = any("rmse_early" in r for r in rows)
    lines = [title, f"  {'setting':18s} {'estimator':10s} {'windows':>8s} {'RMSE':>7s} {'nRMSE':>7s} {'CRPS':>7s} "
                    f"{'spr/skl':>8s} {'ECE':>6s} {'ECE-d':>6s} {'train s':>8s}"
                    + (f" {'RMSE t<=T0':>11s} {'spr/skl':>8s} {'ECE':>6s}" if early else "")]
    for r in rows:
        lines.append(f"  {r['setting']:18s} {r['estimator']:10s} {r['train_windows']:>8d} {r['rmse']:>7.3f} "
                     f"{r['nrmse']:>7.3f} {r['crps']:>7.3f} {r['spread_skill']:>8.2f} {r['ece']:>6.3f} "
                     f"{_fmt(r.get('ece_d'), '{:.3f}'):>6s} {r['seconds']:>8.1f}"
                     + (f" {r['rmse_early']:>11.3f} {r['spread_skill_early']:>8.2f} {r['ece_early']:>6.3f}"
                        if "rmse_early" in r else ""))
    if early:
        lines.append(f"  (t<=T0: test windows in the transient, t <= {TRANSIENT} time units)")
    return "\n".join(lines)


def _slug(*parts: str) -> str:
    return "-".join("".join(c if c.isalnum() else "_" for c in p) for p in parts)


def run(mode: str, estimators: list[str], only: list[str], seed: int = 0, K: int | None = None,
        windows: int | None = None, samples: int | None = None, out_dir: str | Path | None = None,
        progress: bool = False, lengths: list[int] | None = None, budgets: list[int] | None = None,
        variants: tuple[str, ...] = ("with", "without")) -> dict:
    """All the ablations of ``only`` for each estimator; returns ``{ablation: rows}`` and prints the tables.

    Args:
        windows, samples: test windows and samples per window, over the budget's (``None``: the budget's). Fewer
            make the slow samplers affordable (ComposedScore takes ~0.1 s per sample at K=40).
        out_dir: a folder that makes the run resumable (datasets, finished rows and training states; see the
            module docstring). A folder of a run with other settings (mode, seed, K, windows, samples) is refused.
        progress: progress bars of every fit and evaluation.
        lengths, budgets: the window lengths and the training windows of the window and budget ablations (``None``:
            1, 5, 10, 25 and the budget's); a subset splits a long run over processes, each with its own ``out_dir``.
        variants: the rows of the on/off ablations (time embedding, mask channel) to run: ``"with"``, ``"without"``.
    """
    b = BUDGETS[mode]
    lengths = list(LENGTHS if lengths is None else lengths)
    budgets = list(b["budgets"] if budgets is None else budgets)
    for name, values in (("lengths", lengths), ("budgets", budgets)):
        if not values or min(values) < 1:
            raise ValueError(f"{name} must be positive numbers, got {values}")
    if not variants or set(variants) - {"with", "without"}:
        raise ValueError(f"variants must be 'with' and/or 'without', got {list(variants)}")
    n_traj, n_states = b["data"]
    fit = {**b["fit"], "patience": 1000, "seed": seed}
    for name, value in (("windows", windows), ("samples", samples)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive number, got {value}")
    kw = {"n_windows": windows or b["windows"], "n_samples": samples or b["samples"], "seed": seed,
          "hparams": ESTIMATOR_SHORT.get(mode, {}), "progress": progress}
    size = {} if K is None else {"K": K}
    out: dict[str, list[dict]] = {}
    folder = None if out_dir is None else Path(out_dir)
    settings = {"mode": mode, "seed": seed, "K": K, "windows": kw["n_windows"], "samples": kw["n_samples"]}
    done: dict[str, dict] = {}
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "rows.json").exists():
            saved = json.loads((folder / "rows.json").read_text())
            if saved["settings"] != settings:
                raise ValueError(f"{folder} holds ablations run with {saved['settings']}, not {settings}: use another "
                                 "folder")
            done = saved["rows"]
        else:  # the folder is bound to these settings from the start (its cached datasets depend on them)
            (folder / "rows.json").write_text(json.dumps({"settings": settings, "rows": done}, indent=1))

    def simulated(task, name: str, **kwargs) -> WindowDataset:
        """The task's dataset, from the folder's cache when there is one."""
        path = None if folder is None else folder / "data" / f"{name}.h5"
        if path is not None and path.exists():
            return WindowDataset.load(path)
        data = task.simulate(progress=False, **kwargs)
        if path is not None:
            data.save(path)
        return data

    def task_data(name: str, **over):
        task = sbida.tasks.get(name, **size, **over, n_trajectories=n_traj, n_states=n_states, seed=seed)
        data = simulated(task, _slug(name, *(f"{k}{v}" for k, v in over.items())))
        return task, data.split(0.8, 0.1, 0.1, seed=seed)

    def record(key: str, setting: str, est: str, task, splits: tuple, early: Tensor | None = None,
               over: dict | None = None) -> None:
        """The row of ``(key, setting, est)``: from the folder, or :func:`train_and_score` on ``splits`` (train,
        validation, test) with the estimator's settings ``over`` on top, then saved."""
        name = _slug(key, setting, est)
        if name in done:
            res = done[name]
            print(f"  {key}: {setting} {est}: recorded in {folder / 'rows.json'}", flush=True)
        else:
            checkpoint = None if folder is None else folder / "checkpoints" / f"{name}.fit.pt"
            hp = dict(kw["hparams"])
            hp[est] = {**hp.get(est, {}), **(over or {})}
            save = None if folder is None else folder / "models" / f"{name}.pt"
            res = train_and_score(task, est, *splits, fit, **{**kw, "hparams": hp}, early=early,
                                  checkpoint=checkpoint, save=save)
            if folder is not None:
                done[name] = res
                (folder / "rows.json").write_text(json.dumps({"settings": settings, "rows": done}, indent=1))
                checkpoint.unlink(missing_ok=True)
                checkpoint.with_suffix(".json").unlink(missing_ok=True)
            print(f"  {key}: {setting} {est}: nRMSE {res['nrmse']:.3f} ECE {res['ece']:.3f} "
                  f"({res['seconds']:.0f} s)", flush=True)
        out.setdefault(key, []).append({"setting": setting, "estimator": est, **res})

    # on/off ablations: (key, task, setting with, setting without, the transform of the data that removes it)
    for key, name, on, off, remove in (("time", "lorenz96", "t embedded", "t set to 0", without_time),
                                       ("mask", "lorenz96-sparse", "mask channel", "mask of ones", without_mask)):
        if key not in only:
            continue
        task, (tr, va, te) = task_data(name)
        # the time ablation is also scored on windows of the transient, where t tells most (picked by their true
        # times, the same windows with and without t)
        early = transient_windows(te, TRANSIENT, kw["n_windows"], seed) if key == "time" else None
        for est in estimators:
            if "with" in variants:
                record(key, on, est, task, (tr, va, te), early)
            if "without" in variants and key == "mask" and est == "coda":
                # CODA's loss reads the mask too: a mask of ones in the data would make it fit the zeros put in the
                # place of the missing values; its network is shown a mask of ones instead
                record(key, off, est, task, (tr, va, te), early, over={"mask_input": False})
            elif "without" in variants:
                record(key, off, est, task, (remove(tr), remove(va), remove(te)), early)
    if "window" in only:
        for length in lengths:
            task, (tr, va, te) = task_data("lorenz96", length=length)
            for est in estimators:
                record("window", f"window {length}", est, task, (tr, va, te))
    if "budget" in only:
        task = sbida.tasks.get("lorenz96", **size, n_states=n_states, seed=seed)
        per_traj = n_states - task.window.length + 1
        # sized for the largest of the budget's and the requested budgets, so a subset has the same test windows
        need = -(-max(*b["budgets"], *budgets) // per_traj)
        data = simulated(task, "budget", n_trajectories=need + max(4, need // 8) * 2)
        n = data.n_trajectories
        half = need + (n - need) // 2  # trajectories after the training pool: validation, then test
        va, te = data.subset(torch.arange(need, half)), data.subset(torch.arange(half, n))
        for budget in budgets:
            tr = data.subset(torch.arange(-(-budget // per_traj)))
            for est in estimators:
                record("budget", f"{budget:g} windows", est, task, (tr, va, te))
    for key, rows in out.items():
        print(_table({"time": "time embedding (lorenz96)", "mask": "mask channel (lorenz96-sparse)",
                      "window": "window length (lorenz96)", "budget": "simulation budget (lorenz96)"}[key], rows))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true")
    g.add_argument("--smoke", action="store_true", help="tiny budgets (seconds; meaningless numbers)")
    p.add_argument("--estimators", nargs="*", default=["npe"])
    p.add_argument("--only", nargs="*", default=["time", "mask", "window", "budget"])
    p.add_argument("--K", type=int, default=None, help="Lorenz-96 size (default the task's, 40)")
    p.add_argument("--windows", type=int, default=None, help="test windows (default the budget's)")
    p.add_argument("--samples", type=int, default=None, help="samples per test window (default the budget's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--out", default=None, help="folder that makes the run resumable (datasets, rows, fit states)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="window lengths (default 1 5 10 25)")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="training windows of the budget ablation")
    p.add_argument("--variants", nargs="+", choices=["with", "without"], default=["with", "without"],
                   help="rows of the time and mask ablations")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    mode = "smoke" if a.smoke else "quick" if a.quick else "full"
    t0 = time.perf_counter()
    res = run(mode, a.estimators, a.only, a.seed, a.K, a.windows, a.samples, a.out, progress=not a.quiet,
              lengths=a.lengths, budgets=a.budgets, variants=tuple(a.variants))
    print(f"{mode}: {time.perf_counter() - t0:.0f} s")
    if a.json:
        Path(a.json).write_text(json.dumps({"mode": mode, "estimators": a.estimators, "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

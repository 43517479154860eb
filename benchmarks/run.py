r"""The benchmark of BENCHMARKS.md on one task: every estimator and every applicable baseline on the same test windows.

For a task, the estimators (hyperparameters and fit budgets from ``configs/estimators/<kind>.yaml``, budgets capped
under ``--quick``/``--smoke``) are trained and the baselines fitted through :class:`sbida.runs.Run`; each method is
scored by :func:`sbida.diagnostics.evaluate` on the same test windows (RMSE, nRMSE = RMSE / climatological std,
CRPS, energy score, spread/skill, ECE = mean |coverage - level| and its largest gap (highest density regions where
the posterior has ``log_prob``, else distance regions), ECE-d (by the distance regions for every method), the
ECE that sampling noise alone gives a calibrated posterior on these windows (``noise``: the coverage resampled by
trajectory, :func:`sbida.diagnostics.coverage_noise`; an ECE near it is consistent with calibration), SBC
p-value, TARP expected coverage, C2ST ROC-AUC against a reference posterior where one exists), timed, and the table
is printed; the metrics go to ``metrics.json`` and ``benchmark.json`` and the HTML report to ``report.html`` in
``--out``.

Timings (wall clock, the same run): training seconds; seconds for 1000 samples of one window (posterior built and
sampled); seconds for 1000 windows, ``1000 x`` the evaluation's time per window (posterior and ``n_samples`` samples
each); and ratios to 4D-Var: its time per window over the method's (speed-up) and the method's RMSE over 4D-Var's.
Point estimates, a second table: the methods with a sample-free point estimate (``posterior(..., uncertainty=
"none")``: CODA's analysis, 4D-Var's L-BFGS analysis without its covariance) are timed on the same windows, batched as
in the evaluation (the faster of two passes), against 4D-Var's analysis and against 4D-Var with its covariance.

A ComposedScore trained in composed mode has a second row, ``LABEL-gaussian``: its Gaussian heads composed in
closed form with their fitted calibration (``posterior(..., mode="gaussian")``), from the same training. An NPE
without its opt-in power (``power_fit`` off) on states of up to ``POWER_ROW_MAX`` values has a second row,
``LABEL-power``: a copy with the power on its local covariance fitted on the validation windows
(:meth:`sbida.estimators.NPE.fit_power`), from the same training.

References for C2ST: the exact Kalman posterior on ``linear-gaussian``; the tempered SMC reference of
``benchmarks/reference.py`` (cached in ``--reference-cache``) on ``lorenz96`` with K=8.

A method that a task does not allow (CODA without a differentiable simulator of the observed state, a baseline
whose class refuses the task) is skipped with the reason its class gives.

    python benchmarks/run.py TASK [--quick | --smoke] [--out DIR] [--estimators npe score ...]
                             [--baselines climatology interpolation oi enks fourdvar] [--seed 0] [--threads N]
                             [--windows N] [--samples M] [--timing-samples S] [--train-minutes MIN]
                             [section.key=value task overrides] [--set NAME.KEY=VALUE NAME.fit.KEY=VALUE ...]

``--set`` changes an estimator's hyperparameters or fit arguments from those of its configuration file, e.g.
``--set nre.loss=bnre nre.fit.lr=1e-3``; unknown names and keys fail before any work.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import sbida
from sbida import baselines as bl
from sbida.runs import (
    BaselineSpec,
    EstimatorSpec,
    EvaluationConfig,
    Run,
    RunConfig,
    _estimator_settings,
    estimator_class,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))

__all__ = ["ESTIMATORS", "BASELINES", "benchmark_config", "run_benchmark", "format_table", "point_estimates",
           "format_point_table"]

ESTIMATORS = ["npe", "nre", "score", "composed", "coda"]
BASELINES = ["climatology", "interpolation", "oi", "enks", "fourdvar"]

# budgets: the fit arguments that replace those of configs/estimators/*.yaml, and the data and evaluation sizes
FIT_QUICK = {"epochs": 4, "max_time": 75.0, "val_windows": 1024, "patience": 1000}
FIT_SMOKE = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 16, "val_windows": 32, "max_time": 30.0,
             "patience": 1000}
CODA_QUICK = {"epochs": 1, "steps_per_epoch": 300, "batch_size": 16}
# sampler settings of the short modes: NRE's default SMC (100 MALA moves per temperature) costs about 35 ms per sample
# at K=40 on one thread, 12 min for the quick evaluation's 200 x 100 samples alone
# ComposedScore's residual weight (64 windows x 32 draws at 5 weights by default; a draw with the network costs ~19 ms
# at K=40) on fewer draws
ESTIMATOR_SHORT = {"quick": {"nre": {"smc_moves": 10},
                             "composed": {"residual_weight_windows": 32, "residual_weight_samples": 16}},
                   "smoke": {"nre": {"smc_moves": 2},
                             "composed": {"residual_weight_windows": 4, "residual_weight_samples": 4},
                             "npe": {"power_windows": 16, "power_samples": 8}}}
# NPE's row with the power fitted: only up to this state size (its Jacobian costs a pass over D copies of the batch and
# an eigendecomposition of a D x D matrix per window: minutes per 1000 windows at 2 x 32 x 32 on a CPU)
POWER_ROW_MAX = 256
DATA = {"quick": {"lorenz96": {"n_trajectories": 128, "n_states": 256},
                  "linear-gaussian": {"n_trajectories": 512, "n_states": 64},
                  "kolmogorov": {"n_trajectories": 48, "n_states": 96}},
        "smoke": {"n_trajectories": 10, "n_states": 40}}
EVALUATION = {"full": {"n_samples": 1000, "max_windows": 1000, "c2st_windows": 10},
              "quick": {"n_samples": 100, "max_windows": 200, "c2st_windows": 5},
              "smoke": {"n_samples": 32, "max_windows": 12, "c2st_windows": 1, "batch_size": 12, "examples": 1,
                        "example_samples": 32}}
# SMC, not MALA: MALA's chains stay in different modes on attractor windows (R-hat 4.5), SMC's runs agree (R-hat
# < 1.01) at a quarter of MALA's cost (benchmarks/RESULTS.md)
# The Gaussian prior sits LEAD_TIME before the window (at t = 0, the exact N(0, I), where the trajectory is younger):
# Lorenz-96 K=8 states are far from Gaussian (C2ST 0.72-0.97 against their fitted Gaussian from t = 0.7 on), while
# that Gaussian carried 1 time unit by the dynamics is close to the attractor's law (C2ST 0.53; benchmarks/RESULTS.md)
REFERENCE = {"full": {"sampler": "smc", "particles": 2048, "moves": 20, "runs": 4, "prior_trajectories": 4096},
             "quick": {"sampler": "smc", "particles": 1024, "moves": 10, "runs": 4, "prior_trajectories": 2048},
             "smoke": {"sampler": "smc", "particles": 64, "moves": 2, "runs": 2, "prior_trajectories": 256}}
LEAD_TIME = 1.0
RHAT_MAX = 1.05  # a reference whose chains (MALA) or runs (SMC) disagree more than this is flagged
ESS_MIN = 400  # ... or whose bulk ESS is below this (it collapses when SMC runs disagree on a mode's weight)


def _reference_ok(d: dict) -> bool:
    """Whether one window's reference diagnostics pass (R-hat and bulk ESS across chains or runs)."""
    return d["rhat"] < RHAT_MAX and d["ess"] >= ESS_MIN


BASELINE_QUICK = {"enks": {"members": 100}, "fourdvar": {"max_iter": 50}}
# left out of --quick unless named with --estimators: why (measured)
QUICK_DEFAULT_SKIP = {"composed": "not in --quick by default: its sampler evaluates T + 1 scores per step (about 10x "
                                  "PosteriorScore's cost; its evaluation alone ran past 15 min on lorenz96); name it "
                                  "with --estimators composed"}
BASELINE_SMOKE = {"enks": {"members": 20}, "fourdvar": {"max_iter": 10}}


def _applicable(task, estimators: list[str], baselines: list[str]) -> tuple[list[str], list[str], dict[str, str]]:
    """The estimators and baselines whose classes accept the task, and the reasons of those that do not."""
    skipped: dict[str, str] = {}
    est_ok, base_ok = [], []
    for name in estimators:
        try:
            estimator_class(name)(task)
            est_ok.append(name)
        except ValueError as e:
            skipped[name] = str(e)
    for name in baselines:
        try:
            bl.get(name, task)
            base_ok.append(name)
        except ValueError as e:
            skipped[name] = str(e)
    return est_ok, base_ok, skipped


def benchmark_config(task: str, mode: str = "full", estimators: list[str] | None = None,
                     baselines: list[str] | None = None, seed: int = 0, task_overrides: dict | None = None,
                     out: str | Path | None = None,
                     settings: dict[str, dict] | None = None) -> tuple[RunConfig, dict[str, str]]:
    """The run configuration of a benchmark, and the methods left out with the reason.

    Args:
        task: a task name (``configs/tasks``).
        mode: ``"full"`` (the budgets of the configuration files), ``"quick"`` or ``"smoke"`` (seconds, for tests).
        estimators: estimator names (default :data:`ESTIMATORS`).
        baselines: baseline names (default :data:`BASELINES`).
        seed: the run's seed.
        task_overrides: nested task overrides, e.g. ``{"simulator": {"K": 8}}``.
        out: the run folder.
        settings: estimator settings over those of the configuration files and the mode, by estimator:
            ``{"nre": {"estimator": {"loss": "bnre"}, "fit": {"lr": 1e-3}}}`` (see :func:`parse_settings`).

    Returns:
        A :class:`~sbida.runs.RunConfig` and ``{name: reason}`` of the skipped methods.
    """
    if mode not in ("full", "quick", "smoke"):
        raise ValueError(f"mode must be 'full', 'quick' or 'smoke', got {mode!r}")
    quick_skip = {}
    if estimators is None and mode == "quick":
        quick_skip = {k: v for k, v in QUICK_DEFAULT_SKIP.items() if k in ESTIMATORS}
    estimators = [e for e in (ESTIMATORS if estimators is None else estimators) if e not in quick_skip]
    baselines = list(BASELINES if baselines is None else baselines)
    over = json.loads(json.dumps(task_overrides or {}))
    data = over.setdefault("data", {})
    if mode == "smoke":
        data.update({k: v for k, v in DATA["smoke"].items() if k not in data})
    elif mode == "quick":
        data.update({k: v for k, v in DATA["quick"].get(task, DATA["quick"]["lorenz96"]).items() if k not in data})
    dotlist = [f"{sec}.{k}={json.dumps(v)}" for sec, d in over.items() for k, v in d.items()]
    t = sbida.tasks.get(task, *dotlist)
    est_ok, base_ok, skipped = _applicable(t, estimators, baselines)
    skipped.update(quick_skip)
    settings = settings or {}
    stray = sorted(set(settings) - set(est_ok))
    if stray:
        raise ValueError(f"settings for {stray}, which this run does not train (its estimators: {est_ok})")
    specs = {}
    for name in est_ok:
        fit = {}
        if mode != "full":
            fit = dict(FIT_SMOKE if mode == "smoke" else FIT_QUICK)
            if name == "coda" and mode == "quick":
                fit.update(CODA_QUICK)
        hp = dict(ESTIMATOR_SHORT.get(mode, {}).get(name, {}))
        if name == "coda":  # the rollout may not exceed the window
            hp["rollout"] = min(int(_default(name, "rollout", 25)), t.window.length)
        hp.update(settings.get(name, {}).get("estimator", {}))
        fit.update(settings.get(name, {}).get("fit", {}))
        specs[name] = EstimatorSpec(kind=name, estimator=hp, fit=fit)
    base_over = {"quick": BASELINE_QUICK, "smoke": BASELINE_SMOKE}.get(mode, {})
    bspecs = {name: BaselineSpec(kind=name, options=dict(base_over.get(name, {})), tune=name == "enks")
              for name in base_ok}
    ev = EvaluationConfig(**EVALUATION[mode])
    if task == "kolmogorov" and mode == "full":
        ev.max_windows = 256
    if task == "kolmogorov" and mode == "quick":  # 2048 values per state: a score sampler costs ~50x lorenz96's
        ev.max_windows, ev.n_samples = 32, 64
    cfg = RunConfig(name=f"benchmark-{task}-{mode}", description=f"benchmarks/run.py {task} ({mode})", task=task,
                    task_overrides=over, seed=seed, out=str(out) if out else None, estimators=specs,
                    baselines=bspecs, evaluation=ev)
    for label in specs:
        _estimator_settings(cfg, label)  # unknown keys fail here, before any work
    return cfg, skipped


def _default(kind: str, key: str, fallback: Any) -> Any:
    return estimator_class(kind).defaults.get(key, fallback)


def reference_for(task, test, cache: str | Path | None, mode: str = "full", progress: bool = False):
    """A reference posterior function ``(y, mask, t) -> Posterior`` for C2ST, or ``None`` (with its label).

    The exact Kalman posterior on the linear-Gaussian task; the cached tempered SMC reference on ``lorenz96`` with
    K=8 (its budget from :data:`REFERENCE` by ``mode``).
    """
    from sbida.posterior import GaussianPosterior

    sim = task.simulator
    if hasattr(sim, "exact_posterior"):
        offsets, every = test.window.offsets(), int(test.meta.get("every", task.config.data.save_every))
        burn_in = int(test.meta.get("burn_in", 0))

        def exact(y, mask, t):
            mean, cov = sim.exact_posterior(y, mask, t, task.observation, offsets, every, burn_in)
            return GaussianPosterior(mean.to(y.dtype), cov=cov.to(y.dtype))

        return exact, "exact (Kalman)"
    if task.config.simulator.get("name") == "lorenz96" and int(getattr(sim, "K", 0)) == 8:
        from reference import MCMCReference

        budget = dict(REFERENCE[mode])
        n_prior = budget.pop("prior_trajectories")
        step_time = sim.dt * int(task.config.data.save_every)
        ref = MCMCReference.for_task(task, cache=cache, progress=progress, lead=round(LEAD_TIME / step_time), **budget)
        if ref.prior is None:
            ref.fit_prior(task, n_trajectories=n_prior)
        return ref, (f"{ref.sampler.upper()} over the state {LEAD_TIME:g} time unit before the window (at t = 0 where "
                     "sooner) (benchmarks/reference.py)")
    return None, None


def _time_one_window(method, test, index: int, n: int = 1000, seed: int = 0) -> float:
    """Seconds to build the posterior of one window and draw ``n`` samples (after a warm-up call)."""
    _, y, m, t = test.get(torch.tensor([index]))
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        method.posterior(y, m, t).sample(2, generator=g)  # warm-up (first-call overheads)
        start = time.perf_counter()
        post = method.posterior(y, m, t)
        post.sample(n, generator=g)
    return time.perf_counter() - start


class PosteriorMode:
    """An estimator's posterior (in another of its modes) as a method of its own, a row of the table:
    ``posterior(y, mask, t)`` is ``estimator.posterior(y, mask, t, mode=mode)`` (without ``mode`` where it is
    ``None``); it has no point estimate of its own (:func:`has_point_mode`)."""

    def __init__(self, estimator, mode: str | None = None):
        self.estimator, self.mode = estimator, mode

    def posterior(self, y, mask, t, **kwargs):
        if self.mode is not None:
            kwargs["mode"] = self.mode
        return self.estimator.posterior(y, mask, t, **kwargs)


def _npe_without_power(method) -> bool:
    """An NPE of at most ``POWER_ROW_MAX`` values whose posterior has no fitted power (``power_fit`` off, power 1)."""
    from sbida.estimators import NPE

    return (isinstance(method, NPE) and not method.hparams["power_fit"] and float(method.hparams["power"]) == 1.0
            and method.event_size <= POWER_ROW_MAX)


def _has_gaussian_mode(method) -> bool:
    """A ComposedScore trained in composed mode whose default posterior is not already its closed form."""
    from sbida.estimators import ComposedScore

    return (isinstance(method, ComposedScore) and method.hparams["mode"] == "composed"
            and method.hparams["posterior_mode"] != "gaussian")


def has_point_mode(method) -> bool:
    """Whether ``method`` gives a point estimate without samples or covariance: ``posterior(..., uncertainty="none")``
    (CODA, 4D-Var)."""
    fn = getattr(method, "make_posterior", None) or method.posterior
    return "uncertainty" in inspect.signature(fn).parameters


def point_estimates(methods: dict, test, idx: torch.Tensor, batch_size: int, repeats: int = 2) -> dict[str, dict]:
    """RMSE and seconds per window of the point estimates of the methods that have one (:func:`has_point_mode`).

    Args:
        methods: ``{label: estimator or baseline}``.
        test: the test :class:`~sbida.data.WindowDataset`; idx: ``(N,)`` its windows.
        batch_size: windows per call, as in the evaluation.
        repeats: timed passes over the windows; the fastest counts (after one warm-up call).

    Returns:
        ``{label: {"rmse", "seconds_per_window"}}``.
    """
    if repeats < 1 or batch_size < 1:
        raise ValueError(f"repeats and batch_size must be >= 1, got {repeats} and {batch_size}")
    out = {}
    batches = [test.get(idx[i:i + batch_size]) for i in range(0, len(idx), batch_size)]
    for label, method in methods.items():
        if not has_point_mode(method):
            continue
        _, y, m, t = batches[0]
        method.posterior(y[:1], m[:1], t[:1], uncertainty="none").mean()  # warm-up (first-call overheads)
        best, sq = math.inf, 0.0
        for r in range(repeats):
            seconds = 0.0
            for x, y, m, t in batches:
                start = time.perf_counter()
                estimate = method.posterior(y, m, t, uncertainty="none").mean()
                seconds += time.perf_counter() - start
                if r == 0:  # the estimates do not change between passes
                    sq += float((estimate.double() - x.double()).pow(2).sum())
            best = min(best, seconds)
        n_values = len(idx) * math.prod(batches[0][0].shape[1:])
        out[label] = {"rmse": math.sqrt(sq / n_values), "seconds_per_window": best / len(idx)}
    return out


def run_benchmark(task: str, out: str | Path, mode: str = "full", estimators: list[str] | None = None,
                  baselines: list[str] | None = None, seed: int = 0, task_overrides: dict | None = None,
                  reference_cache: str | Path | None = None, progress: bool = True, echo: bool = True,
                  report: bool = True, windows: int | None = None, samples: int | None = None,
                  timing_samples: int = 1000, train_minutes: float | None = None,
                  settings: dict[str, dict] | None = None) -> dict:
    """Train, fit, evaluate and time every method on the same test windows; write JSON and the HTML report.

    Args:
        task: a task name.
        out: the run folder (dataset, checkpoints, ``metrics.json``, ``benchmark.json``, ``report.html``).
        mode: ``"full"``, ``"quick"`` or ``"smoke"`` (see :func:`benchmark_config`).
        estimators, baselines: the methods (default all; those the task does not allow are skipped).
        seed: the seed of simulation, training and evaluation.
        task_overrides: nested task overrides, e.g. ``{"simulator": {"K": 8}}``.
        reference_cache: folder of the cached MCMC references (default ``<out>/reference-cache``).
        progress: progress bars; echo: print the log.
        report: write the HTML report.
        windows, samples: test windows and samples per window (default: the mode's evaluation sizes).
        timing_samples: samples drawn for the one-window timing (reported per 1000 samples, scaled linearly:
            fewer keep the slow samplers of large states affordable).
        train_minutes: training budget of each estimator in minutes (``max_time``; its epochs then unbounded).
        settings: estimator settings over the configuration files' (see :func:`benchmark_config`).

    Returns:
        The benchmark record: ``rows`` (one per method: the table's values), ``skipped``, ``reference`` and the
        machine; also written to ``<out>/benchmark.json``.
    """
    from sbida.diagnostics import evaluate
    from sbida.report.html import draw_examples

    cfg, skipped = benchmark_config(task, mode, estimators, baselines, seed, task_overrides, out, settings)
    if windows is not None:
        cfg.evaluation.max_windows = int(windows)
    if samples is not None:
        cfg.evaluation.n_samples = int(samples)
    if train_minutes is not None:
        for spec in cfg.estimators.values():
            spec.fit.update({"max_time": 60.0 * train_minutes, "epochs": 10**6, "patience": 10**6})
    if timing_samples < 1:
        raise ValueError(f"timing_samples must be >= 1, got {timing_samples}")
    if not cfg.estimators and not cfg.baselines:
        raise ValueError(f"no method applies to task {task!r}: {skipped}")
    run = Run(cfg, out=out, progress=progress, echo=echo)
    for name, why in skipped.items():
        run.log(f"{name}: skipped ({why})")
    wall = time.perf_counter()
    methods, seconds = run.methods()
    _, val, test = run.splits()
    for label, method in list(methods.items()):  # one more row, no more training:
        if _has_gaussian_mode(method):  # ComposedScore's closed form
            methods[f"{label}-gaussian"] = PosteriorMode(method, "gaussian")
            seconds[f"{label}-gaussian"] = seconds.get(label)
        if _npe_without_power(method) and len(val) > 1:  # NPE with the power on its local covariance fitted
            start = time.perf_counter()
            powered = copy.deepcopy(method)
            h = powered.hparams
            rec = powered.fit_power(val, windows=int(h["power_windows"]), samples=int(h["power_samples"]), seed=seed)
            run.log(f"{label}-power: power {rec['power']:.4g} on its local covariance, fitted on {rec['windows']} "
                    f"validation windows x {rec['samples']} draws (both joint ECEs {rec['score_at_1']:.3f} at 1, "
                    f"{min(rec['score']):.3f} at best; margin {rec['margin']:.3f})")
            methods[f"{label}-power"] = PosteriorMode(powered)
            seconds[f"{label}-power"] = (seconds.get(label) or 0.0) + time.perf_counter() - start
    ev = cfg.evaluation
    N = len(test)
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(N) if N <= ev.max_windows else torch.randperm(N, generator=g)[:ev.max_windows].sort().values
    ref, ref_label = reference_for(run.task, test, reference_cache or Path(out) / "reference-cache", mode,
                                   progress)
    results, one_window = {}, {}
    for label, method in methods.items():
        run.log(f"{label}: evaluating on {len(idx)} test windows x {ev.n_samples} samples")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            results[label] = evaluate(method, test, n_samples=ev.n_samples, batch_size=ev.batch_size, reference=ref,
                                      seed=seed, progress=progress, coverage=ev.coverage, indices=idx,
                                      c2st_windows=ev.c2st_windows, name=label)
        one_window[label] = _time_one_window(method, test, int(idx[0]), n=timing_samples, seed=seed) \
            * 1000 / timing_samples
        run.log(f"  {results[label]}")
    kinds = {lb: "baseline" if lb in cfg.baselines else "estimator" for lb in methods}
    metrics = {"run": cfg.name, "task": run.task.name, "seed": seed, "dataset": "data.json", "n_windows": len(idx),
               "reference": ref_label,
               "methods": {lb: {"type": kinds[lb], "training_seconds": seconds.get(lb), **r.to_dict()}
                           for lb, r in results.items()}}
    run.path("metrics.json").write_text(json.dumps(metrics, indent=1))
    if report and ev.examples > 0:  # example samples are only drawn for the report
        ex_idx = idx[:ev.examples]
        samples = draw_examples(methods, test, ex_idx, n_samples=ev.example_samples, seed=seed)
        torch.save({"indices": ex_idx, "samples": samples}, run.path("examples.pt"))
    rows = _rows(results, seconds, one_window, kinds)
    point_rows = _point_rows(point_estimates(methods, test, idx, ev.batch_size), results)
    diagnostics = list(getattr(ref, "diagnostics", []))
    if not all(_reference_ok(d) for d in diagnostics):
        run.log(f"warning: the MCMC reference has not converged on every window (R-hat "
                f"{[round(d['rhat'], 3) for d in diagnostics]}, bulk ESS {[round(d['ess']) for d in diagnostics]})"
                "; its C2ST figures are not trustworthy")
    record = {"task": task, "mode": mode, "seed": seed, "task_config": run.task.to_dict(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.platform(),
              "processor": platform.processor(), "threads": torch.get_num_threads(),
              "train_windows": len(run.splits()[0]), "test_windows": len(idx), "n_samples": ev.n_samples,
              "reference": ref_label, "reference_diagnostics": diagnostics,
              "reference_converged": all(_reference_ok(d) for d in diagnostics),
              "skipped": skipped, "rows": rows, "point_rows": point_rows, "wall_seconds": time.perf_counter() - wall}
    run.path("benchmark.json").write_text(json.dumps(record, indent=1))
    if report:
        run.report()
    return record


def _rows(results: dict, seconds: dict, one_window: dict, kinds: dict) -> list[dict]:
    ref = results.get("fourdvar")
    ref_pw = ref.timings["posterior_and_sampling_per_window"] if ref else None
    rows = []
    for label, r in results.items():
        pw = r.timings["posterior_and_sampling_per_window"]
        rows.append({"method": label, "type": kinds[label], **r.metrics(), "coverage_method": r.coverage.method,
                     "training_seconds": seconds.get(label), "seconds_1000_samples_1_window": one_window[label],
                     "seconds_1000_windows": 1000 * pw, "seconds_per_window": pw,
                     "speedup_vs_4dvar": ref_pw / pw if ref_pw and pw > 0 else None,
                     "rmse_ratio_vs_4dvar": r.rmse / ref.rmse if ref and ref.rmse > 0 else None})
    return rows


def _point_rows(points: dict[str, dict], results: dict) -> list[dict]:
    """The point-estimate table: speed-ups over 4D-Var's analysis and over 4D-Var with its covariance (the main
    table's time per window), and RMSE over 4D-Var's analysis."""
    ana = points.get("fourdvar")
    full = results["fourdvar"].timings["posterior_and_sampling_per_window"] if "fourdvar" in results else None
    rows = []
    for label, p in points.items():
        pw = p["seconds_per_window"]
        rows.append({"method": label, "rmse": p["rmse"], "seconds_per_window": pw,
                     "speedup_vs_4dvar_analysis": ana["seconds_per_window"] / pw if ana and pw > 0 else None,
                     "speedup_vs_4dvar": full / pw if full and pw > 0 else None,
                     "rmse_ratio_vs_4dvar": p["rmse"] / ana["rmse"] if ana and ana["rmse"] > 0 else None})
    return rows


def _fmt(v: Any, f: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f.format(v)


COLUMNS = [("rmse", "RMSE", "{:.4g}"), ("nrmse", "nRMSE", "{:.4g}"), ("crps", "CRPS", "{:.4g}"),
           ("energy", "energy", "{:.4g}"), ("spread_skill", "spr/skl", "{:.3g}"), ("coverage_ece", "ECE", "{:.3f}"),
           ("coverage_max_gap", "maxgap", "{:.3f}"), ("coverage_method", "cov", "{}"),
           ("distance_ece", "ECE-d", "{:.3f}"), ("coverage_ece_noise", "noise", "{:.3f}"),
           ("sbc_p_value", "SBC p", "{:.2g}"), ("tarp_atc", "TARP", "{:+.3f}"),
           ("c2st_auc", "C2ST", "{:.3f}"),
           ("training_seconds", "train s", "{:.1f}"), ("seconds_1000_samples_1_window", "1x1000 s", "{:.3f}"),
           ("seconds_1000_windows", "1000w s", "{:.2f}"), ("seconds_per_window", "ms/win", "{:.2f}"),
           ("speedup_vs_4dvar", "x4DVar", "{:.3g}"), ("rmse_ratio_vs_4dvar", "RMSE/4DV", "{:.3g}")]


def _text_table(rows: list[dict], columns: list[tuple[str, str, str]], width: int) -> str:
    """Rows as a text table, one line per method; ``-`` where a value does not exist, seconds per window in ms."""
    name = max([10] + [len(r["method"]) + 1 for r in rows])
    lines = [f"{'method':{name}s}" + "".join(f"{h:>{width}s}" for _, h, _ in columns)]
    for r in rows:
        vals = []
        for k, _, f in columns:
            v = r.get(k)
            if k == "seconds_per_window" and v is not None:
                v = 1e3 * v
            vals.append(_fmt(v, f))
        lines.append(f"{r['method']:{name}s}" + "".join(f"{v:>{width}s}" for v in vals))
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    """The benchmark table as text (one line per method; ``-`` where a value does not exist)."""
    return _text_table(rows, COLUMNS, 10)


POINT_COLUMNS = [("rmse", "RMSE", "{:.4g}"), ("seconds_per_window", "ms/win", "{:.3f}"),
                 ("speedup_vs_4dvar_analysis", "x4DVar-an", "{:.3g}"), ("speedup_vs_4dvar", "x4DVar", "{:.3g}"),
                 ("rmse_ratio_vs_4dvar", "RMSE/4DV", "{:.3g}")]


def format_point_table(rows: list[dict]) -> str:
    """The point-estimate table as text: RMSE, ms per window, speed-up over 4D-Var's analysis (``x4DVar-an``) and
    over 4D-Var with its covariance (``x4DVar``), RMSE over 4D-Var's."""
    return _text_table(rows, POINT_COLUMNS, 11)


def _parse_overrides(items: list[str]) -> dict:
    over: dict[str, dict] = {}
    for item in items:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"task overrides are section.key=value (e.g. simulator.K=8), got {item!r}")
        key, value = item.split("=", 1)
        sec, k = key.split(".", 1)
        try:
            over.setdefault(sec, {})[k] = json.loads(value)
        except json.JSONDecodeError:
            over.setdefault(sec, {})[k] = value
    return over


def parse_settings(items: list[str]) -> dict[str, dict]:
    """``NAME.KEY=VALUE`` (a hyperparameter) or ``NAME.fit.KEY=VALUE`` (a fit argument) -> nested settings.

    Values are read as JSON where they parse (``3``, ``1e-3``, ``[32, 64]``, ``null``), as strings otherwise.
    """
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) not in (2, 3) or (len(parts) == 3 and parts[1] != "fit") or not all(parts):
            raise ValueError(f"estimator settings are NAME.KEY=VALUE or NAME.fit.KEY=VALUE (e.g. nre.loss=bnre, "
                             f"npe.fit.lr=1e-3), got {item!r}")
        try:
            v = json.loads(value)
        except json.JSONDecodeError:
            v = value
        section = "fit" if len(parts) == 3 else "estimator"
        out.setdefault(parts[0], {}).setdefault(section, {})[parts[-1]] = v
    return out


def parser() -> argparse.ArgumentParser:
    """The command line of ``run.py``; task overrides may come before or after the options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", help=f"a task: {', '.join(sbida.tasks.available())}")
    p.add_argument("overrides", nargs="*", help="task overrides section.key=value, e.g. simulator.K=8")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small budgets (<= 15 min on 2 idle cores)")
    g.add_argument("--smoke", action="store_true", help="tiny budgets (seconds; meaningless numbers, for testing)")
    p.add_argument("--out", default=None, help="run folder (default runs/benchmark-TASK-MODE)")
    p.add_argument("--estimators", nargs="*", default=None, help=f"default: {' '.join(ESTIMATORS)}")
    p.add_argument("--baselines", nargs="*", default=None, help=f"default: {' '.join(BASELINES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-cache", default=None, help="cache of the MCMC references (default OUT/reference-cache)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-report", action="store_true")
    p.add_argument("--windows", type=int, default=None, help="test windows (default: the mode's)")
    p.add_argument("--samples", type=int, default=None, help="samples per test window (default: the mode's)")
    p.add_argument("--timing-samples", type=int, default=1000,
                   help="samples of the one-window timing (reported per 1000, scaled linearly)")
    p.add_argument("--train-minutes", type=float, default=None, help="training budget of each estimator")
    p.add_argument("--set", nargs="+", default=[], metavar="NAME.KEY=VALUE", dest="settings",
                   action="extend", help="estimator settings over configs/estimators/*.yaml, e.g. nre.loss=bnre "
                   "npe.fit.lr=1e-3 (task overrides go before --set)")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_intermixed_args(argv)  # overrides may come after the options
    if a.threads:
        torch.set_num_threads(a.threads)
    mode = "smoke" if a.smoke else "quick" if a.quick else "full"
    out = a.out or f"runs/benchmark-{a.task}-{mode}"
    record = run_benchmark(a.task, out, mode, a.estimators, a.baselines, a.seed, _parse_overrides(a.overrides),
                           a.reference_cache, progress=not a.quiet, echo=not a.quiet, report=not a.no_report,
                           windows=a.windows, samples=a.samples, timing_samples=a.timing_samples,
                           train_minutes=a.train_minutes, settings=parse_settings(a.settings))
    print(f"\n{a.task} ({mode}): {record['train_windows']} training windows, {record['test_windows']} test windows x "
          f"{record['n_samples']} samples; C2ST reference: {record['reference'] or 'none'}")
    print(format_table(record["rows"]))
    if record["point_rows"]:
        print("\npoint estimates (no samples, no covariance), the same windows:")
        print(format_point_table(record["point_rows"]))
    if not record["reference_converged"]:
        rh = [round(d["rhat"], 2) for d in record["reference_diagnostics"]]
        ess = [round(d["ess"]) for d in record["reference_diagnostics"]]
        print(f"warning: the MCMC reference did not converge on every window (R-hat {rh}, bulk ESS {ess}): C2ST is "
              "not trustworthy")
    for name, why in record["skipped"].items():
        print(f"skipped {name}: {why}")
    print(f"wall time {record['wall_seconds']:.0f} s; written to {out}/benchmark.json, metrics.json, report.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())

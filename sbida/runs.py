"""Runs: a task, estimators and baselines with their budgets and a seed, carried out into one folder.

A run configuration (``configs/runs/<name>.yaml``, validated into :class:`RunConfig`) names a task with overrides,
the estimators (hyperparameters and fit budgets from ``configs/estimators/<kind>.yaml``, overridable), the
baselines (options from ``configs/baselines/<kind>.yaml``), the data split, the evaluation sizes, the seed and the
output folder. The stages write, in that folder::

    config.yaml      the resolved run configuration       log.txt        what happened, with times
    data.h5          the simulated dataset (or its path in data.json, when ``dataset`` names an existing file)
    checkpoints/     <label>.pt (the trained estimator), <label>.fit.pt (training state) and .fit.json (settings)
    training.json    seconds and history of each fit      metrics.json   the evaluation of every method
    examples.pt      posterior samples of a few windows   report.html    the calibration report (+ report.json)

Every stage runs the ones it needs whose outputs are missing. An interrupted training resumes from its last epoch
when the run is started again with the same estimator and fit settings (and ends as an uninterrupted one would).
The run's ``seed`` seeds the simulation (unless the task overrides set ``data.seed``), the split, the initial
weights, the batch order and the evaluation, so the same configuration and seed give the same metrics.
"""

from __future__ import annotations

import copy
import inspect
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import _coerce, load_yaml, parse_overrides, structured, to_yaml
from .data import IndexPermutation

__all__ = ["RunConfig", "EstimatorSpec", "BaselineSpec", "EvaluationConfig", "Run", "load_config", "available",
           "estimator_class", "resumable", "record_fit_settings", "fit_from_state"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
_FIT_RESERVED = {"self", "train", "val", "progress", "checkpoint", "resume", "callback"}


@dataclass
class EstimatorSpec:
    kind: str | None = None  # estimator class (npe, coda, ...); default: the label
    estimator: dict[str, Any] = field(default_factory=dict)  # hyperparameters, over configs/estimators/<kind>.yaml
    fit: dict[str, Any] = field(default_factory=dict)  # keyword arguments of fit(), over the same file


@dataclass
class BaselineSpec:
    kind: str | None = None  # baseline (oi, enks, fourdvar, ...); default: the label
    options: dict[str, Any] = field(default_factory=dict)  # over configs/baselines/<kind>.yaml
    tune: bool = False  # call .tune(val) when the baseline has it (e.g. the inflation of EnKS)


@dataclass
class EvaluationConfig:
    n_samples: int = 500  # posterior samples per window
    max_windows: int = 512  # test windows evaluated (a random subset drawn with the seed)
    batch_size: int = 100
    coverage: str = "auto"
    examples: int = 2  # example windows in the report
    example_samples: int = 200
    reference: str | None = None  # label of a method of the run used as the C2ST reference
    c2st_windows: int = 5


@dataclass
class RunConfig:
    name: str = "run"
    description: str = ""
    task: str = "lorenz96"  # a task name or the path of a task YAML file
    task_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {data: {n_trajectories: 256}}
    dataset: str | None = None  # an existing HDF5 dataset instead of simulating one
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: int = 0
    out: str | None = None  # run folder (default runs/<name>)
    estimators: dict[str, EstimatorSpec] = field(default_factory=dict)
    baselines: dict[str, BaselineSpec] = field(default_factory=dict)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)


def available() -> list[str]:
    """Names of the runs in ``configs/runs``."""
    return sorted(p.stem for p in (CONFIG_DIR / "runs").glob("*.yaml"))


def _norm(name: str) -> str:
    return name.lower().replace("_", "").replace("-", "")


# short names of estimators whose configuration file is not named after the class
ESTIMATOR_ALIASES = {"score": "PosteriorScore", "composed": "ComposedScore"}


def estimator_class(kind: str) -> type:
    """The estimator class registered under ``kind`` (case, ``_`` and ``-`` ignored: ``npe``, ``posterior_score``;
    or a short name of :data:`ESTIMATOR_ALIASES`, e.g. ``score``)."""
    from .estimators.base import REGISTRY

    kind = ESTIMATOR_ALIASES.get(_norm(kind), kind)
    for name, cls in REGISTRY.items():
        if _norm(name) == _norm(kind):
            return cls
    raise ValueError(f"unknown estimator {kind!r}; registered: {sorted(REGISTRY)}")


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _task_dotlist(cfg: RunConfig) -> list[str]:
    """The task overrides as ``key=value`` strings, with ``data.seed`` the run's seed unless they set it."""
    over = _flat(copy.deepcopy(cfg.task_overrides))
    over.setdefault("data.seed", cfg.seed)
    return [f"{k}={json.dumps(v)}" for k, v in over.items()]


def _config_path(config: str | Path) -> Path:
    path = Path(config)
    if path.is_dir():
        path = path / "config.yaml"
    elif path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / "runs" / f"{config}.yaml"
        if not path.exists():
            raise ValueError(f"unknown run {str(config)!r}; available: {available()} (or give a YAML file's path or a "
                             f"run folder)")
    return path


def load_config(config: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A run configuration from a name in ``configs/runs``, a YAML path or a run folder, with ``key=value`` overrides.

    Raises:
        ValueError: unknown run, unknown key or wrong type (the key is named), unknown estimator or baseline, or an
            estimator hyperparameter / fit argument that the class does not take.
    """
    path = _config_path(config)
    base = load_yaml(path)
    structured(RunConfig, base, where=f"run file {path.name}")
    cfg = structured(RunConfig, base, parse_overrides(list(overrides)), where=f"run {base.get('name', path.stem)}")
    if len(cfg.split) != 3 or any(f <= 0 for f in cfg.split) or sum(cfg.split) > 1 + 1e-9:
        raise ValueError(f"split must be three positive fractions (train, val, test) summing to at most 1, got "
                         f"{cfg.split}")
    if not cfg.estimators and not cfg.baselines:
        raise ValueError("a run needs at least one estimator or baseline")
    clash = set(cfg.estimators) & set(cfg.baselines)
    if clash:
        raise ValueError(f"labels {sorted(clash)} name both an estimator and a baseline")
    ref = cfg.evaluation.reference
    if ref is not None and ref not in cfg.estimators and ref not in cfg.baselines:
        raise ValueError(f"evaluation.reference must be the label of a method of the run, got {ref!r}")
    if cfg.evaluation.coverage not in ("auto", "hpd", "distance"):
        raise ValueError(f"evaluation.coverage must be 'auto', 'hpd' or 'distance', got {cfg.evaluation.coverage!r}")
    for label in cfg.estimators:
        _estimator_settings(cfg, label)  # raises on unknown keys and wrong types
    from . import baselines, tasks

    tasks.get(cfg.task, *_task_dotlist(cfg))  # raises on bad task keys
    for label, spec in cfg.baselines.items():
        if (spec.kind or label) not in baselines.BASELINES:
            raise ValueError(f"baselines.{label}: unknown baseline {spec.kind or label!r}; available: "
                             f"{sorted(baselines.BASELINES)}")
    return cfg


def record_fit_settings(fit_state: str | Path, est, fit: dict) -> Path:
    """Write the settings of a fit (the estimator's configuration and ``fit``'s arguments) beside its training state
    ``fit_state`` (``X.fit.pt`` -> ``X.fit.json``), for :func:`resumable`."""
    path = Path(fit_state).with_suffix(".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"estimator": est.config(), "fit": fit}, indent=1, default=str))
    return path


def resumable(fit_state: str | Path, est, fit: dict) -> bool | None:
    """Whether ``fit_state`` is the training state of an interrupted fit of the same estimator and settings, as
    recorded by :func:`record_fit_settings` when that fit started: ``True`` (resume it), ``False`` (the settings
    changed: train from the start) or ``None`` (no state or no record). The sampler's settings (``sampler_hparams``
    of the estimator's class) are left out: they do not change the training."""
    fit_state = Path(fit_state)
    settings = fit_state.with_suffix(".json")
    if not (fit_state.exists() and settings.exists()):
        return None
    sampler = getattr(est, "sampler_hparams", frozenset())

    def training(record: dict) -> dict:
        hp = record.get("estimator", {}).get("hparams", {})
        record.get("estimator", {})["hparams"] = {k: v for k, v in hp.items() if k not in sampler}
        return record

    now = training(json.loads(json.dumps({"estimator": est.config(), "fit": fit}, default=str)))
    return training(json.loads(settings.read_text())) == now


def fit_from_state(est, train, val, fit: dict, fit_state: str | Path, resume: bool,
                   progress: bool = False) -> tuple[dict, float]:
    """``est.fit(train, val, **fit)`` writing its training state to ``fit_state`` after every epoch (and its
    settings beside it, :func:`record_fit_settings`), continued from that state when ``resume`` (decide it with
    :func:`resumable`; otherwise an old state is deleted first).

    Returns:
        ``(history, seconds)``: ``fit``'s history and the training seconds, the interrupted sittings' included.
    """
    fit_state = Path(fit_state)
    if not resume:
        fit_state.unlink(missing_ok=True)
    record_fit_settings(fit_state, est, fit)
    t0 = time.perf_counter()
    history = est.fit(train, val, progress=progress, checkpoint=fit_state, resume=resume, **fit)
    seconds = time.perf_counter() - t0
    if resume and history.get("time"):
        seconds = max(seconds, history["time"][-1])  # the interrupted sittings' time too
    return history, seconds


def _calibration_lines(records: dict[str, dict]) -> list[str]:
    """One line per calibration fit made at the end of a fit (NRE's temperature, NPE's inflation, scales, spread per
    wavenumber and tails, ComposedScore's Gaussian mode and residual weight)."""
    lines = []
    for kind, r in records.items():
        if kind == "gaussian":
            lines.append(f"mode 'gaussian' calibrated on {r['windows']} validation windows: spread x{r['scale']:.4g}, "
                         f"eigenvalues to the power {r.get('power', 1.0):.4g}, "
                         f"Student-t of {r['tails']:.3g} degrees of freedom (NLL {r['nll']:.4g} nats per window, "
                         f"uncalibrated {r['nll_gaussian']:.4g})")
        elif kind == "residual_weight":
            scores = ", ".join(f"{w:g}: {v:.4g}" for w, v in zip(r["grid"], r["score"]))
            lines.append(f"residual weight {r['weight']:g} fitted on {r['windows']} validation windows x "
                         f"{r['samples']} draws ({r['criterion']} by weight: {scores})")
        elif kind == "scale":
            lines.append(f"scales of the flow's base fitted on {r['windows']} validation windows of "
                         f"{r['trajectories']} trajectories: {r['scale_min']:.3g} to {r['scale_max']:.3g}, median "
                         f"{r['scale_median']:.3g}, {r['own']} dimensions with their own (NLL {r['nll']:.4g} nats "
                         f"per window, before {r['nll_before']:.4g})")
        elif kind == "spectrum":
            lines.append(f"spread per wavenumber fitted on {r['windows']} validation windows of {r['trajectories']} "
                         f"trajectories x {r['samples']} draws: {r['own']} of {len(r['gains'])} wavenumbers with their "
                         f"own factor, factors {min(r['gains']):.3g} to {max(r['gains']):.3g} (NLL {r['nll']:.4g} "
                         f"nats per window, before {r['nll_before']:.4g})")
        elif kind == "tails":
            lines.append(f"Student-t base of {r['tails']:.3g} degrees of freedom fitted on {r['windows']} validation "
                         f"windows (NLL {r['nll']:.4g} nats per window, Gaussian base {r['nll_gaussian']:.4g})")
        else:
            name = "ratio temperature" if kind == "temperature" else "inflation"
            lines.append(f"{name} {r[kind]:.3g} fitted on {r['windows']} validation windows ({r['criterion']} "
                         f"{min(r['score']):.4g}, at 1: {r['score_at_1']:.4g})")
    return lines


def _estimator_settings(cfg: RunConfig, label: str) -> tuple[type, dict[str, Any], dict[str, Any]]:
    """The class, hyperparameters and fit arguments of ``cfg.estimators[label]``: file defaults < run seed < run."""
    spec = cfg.estimators[label]
    kind = spec.kind or label
    cls = estimator_class(kind)
    names = [_norm(kind), kind] + [alias for alias, name in ESTIMATOR_ALIASES.items() if name == cls.__name__]
    file = next((f for f in (CONFIG_DIR / "estimators" / f"{n}.yaml" for n in names) if f.exists()),
                CONFIG_DIR / "estimators" / f"{kind}.yaml")
    defaults = load_yaml(file) if file.exists() else {}
    unknown = set(defaults) - {"name", "estimator", "fit"}
    if unknown:
        raise ValueError(f"{file.name}: unknown keys {sorted(unknown)}; expected name, estimator, fit")
    hp = {**(defaults.get("estimator") or {}), "seed": cfg.seed, **spec.estimator}
    fit = {**(defaults.get("fit") or {}), "seed": cfg.seed, **spec.fit}
    allowed = {**cls.defaults, "seed": 0}
    for key, value in hp.items():
        if key not in allowed:
            raise ValueError(f"unknown key 'estimators.{label}.estimator.{key}' for {cls.__name__}; allowed: "
                             f"{sorted(allowed)}")
        hp[key] = _coerce(value, allowed[key], f"estimators.{label}.estimator.{key}")
    params = {k: p for k, p in inspect.signature(cls.fit).parameters.items() if k not in _FIT_RESERVED}
    for key, value in fit.items():
        if key not in params:
            raise ValueError(f"unknown key 'estimators.{label}.fit.{key}' for {cls.__name__}.fit; allowed: "
                             f"{sorted(params)}")
        fit[key] = _coerce(value, params[key].default, f"estimators.{label}.fit.{key}")
    return cls, hp, fit


def _jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples as lists, other objects as their text)."""
    return json.loads(json.dumps(obj, default=str))


def _differing_keys(stored: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configurations (as JSON); keys of ``current`` missing
    from ``stored`` are not counted (configurations written before the key existed)."""
    stored, current = _jsonable(stored), _jsonable(current)
    if not isinstance(stored, dict) or not isinstance(current, dict):
        return [] if stored == current else [prefix.rstrip(".") or "(all)"]
    out = []
    for key, value in current.items():
        if key in stored:
            out += _differing_keys(stored[key], value, f"{prefix}{key}.")
    return out


class Run:
    """A run folder and its stages: :meth:`simulate`, :meth:`train`, :meth:`evaluate`, :meth:`report`.

    Args:
        config: a :class:`RunConfig`, or what :func:`load_config` takes (a run name, a YAML path, a run folder).
        overrides: ``key=value`` overrides when ``config`` is not a :class:`RunConfig`.
        out: the run folder (default ``config.out``, else ``runs/<name>``).
        progress: show progress bars.
        echo: also print the log lines.
    """

    def __init__(self, config: RunConfig | str | Path, overrides: list[str] | tuple[str, ...] = (),
                 out: str | Path | None = None, progress: bool = True, echo: bool = True):
        self.config = config if isinstance(config, RunConfig) else load_config(config, overrides)
        self.folder = Path(out or self.config.out or Path("runs") / self.config.name)
        self.progress, self.echo = progress, echo
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "config.yaml").write_text(to_yaml(self.config))
        self._task = None
        self._data = None

    # -- helpers --------------------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        """Append a line to ``log.txt`` (and print it when ``echo``)."""
        with open(self.folder / "log.txt", "a", encoding="utf-8") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
        if self.echo:
            print(message, flush=True)

    @property
    def task(self):
        """The task with the run's overrides (``data.seed`` is the run's seed unless the overrides set it)."""
        if self._task is None:
            from . import tasks

            self._task = tasks.get(self.config.task, *_task_dotlist(self.config))
        return self._task

    @property
    def data_path(self) -> Path:
        return Path(self.config.dataset) if self.config.dataset else self.folder / "data.h5"

    def path(self, name: str) -> Path:
        return self.folder / name

    # -- stages ---------------------------------------------------------------------------------------------------
    def simulate(self, force: bool = False):
        """Simulate the task's dataset into ``data.h5`` (or load ``dataset``); returns the :class:`WindowDataset`."""
        from .data import WindowDataset

        if self._data is not None and not force:
            return self._data
        if self.config.dataset or (self.data_path.exists() and not force):
            self._data = WindowDataset.load(self.data_path)
            self.log(f"dataset {self.data_path}: {len(self._data)} windows")
            differ = _differing_keys(self._data.config, self.task.to_dict())
            if not self.config.dataset and differ:
                self.log(f"warning: {self.data_path} was simulated with another task configuration "
                         f"({', '.join(differ)} differ from the run's): its windows are used as they are; delete the "
                         "file, or give another run folder, to simulate the run's task")
        else:
            self.log(self.task.summary())
            t0 = time.perf_counter()
            self._data = self.task.simulate(progress=self.progress)
            seconds = time.perf_counter() - t0
            self._data.save(self.data_path)
            self.log(f"simulated {len(self._data)} windows in {seconds:.1f} s into {self.data_path}")
        stats = self._data.stats() | {"path": str(self.data_path)}
        self.path("data.json").write_text(json.dumps(stats, indent=2))
        return self._data

    def splits(self):
        """``(train, val, test)`` split by trajectory with the run's seed."""
        return self.simulate().split(*self.config.split, seed=self.config.seed)

    def train(self, force: bool = False) -> dict[str, dict]:
        """Fit every estimator (checkpoints in ``checkpoints/``); returns and writes ``training.json``."""
        train, val, _ = self.splits()
        record_path = self.path("training.json")
        record = json.loads(record_path.read_text()) if record_path.exists() and not force else {}
        for label in self.config.estimators:
            ckpt = self.path(f"checkpoints/{label}.pt")
            cls, hp, fit = _estimator_settings(self.config, label)
            requested = _jsonable({"kind": cls.__name__, "estimator": hp, "fit": fit})
            if ckpt.exists() and label in record and not force:
                if record[label].get("requested", requested) == requested:
                    self.log(f"{label}: trained already ({ckpt})")
                    continue
                self.log(f"{label}: its estimator or fit settings changed since {ckpt} was trained: training again")
            est = cls(self.task, **hp)
            self.log(f"{label}: training {cls.__name__} on {len(train)} windows ({fit})")
            fit_state = self.path(f"checkpoints/{label}.fit.pt")
            resume = not force and self._resumable(fit_state, est, fit)
            if resume:
                self.log(f"{label}: resuming its interrupted training from {fit_state}")
            history, seconds = fit_from_state(est, train, val, fit, fit_state, resume, self.progress)
            est.save(ckpt)
            calibration = {k: r for k in ("temperature", "inflation", "scale", "spectrum", "tails", "gaussian",
                                          "residual_weight")
                           if (r := getattr(est, f"{k}_record", None))}
            for line in _calibration_lines(calibration):
                self.log(f"{label}: {line}")
            best = min(history["val_loss"]) if history["val_loss"] else None
            record[label] = {"kind": cls.__name__, "seconds": seconds, "epochs": len(history["epoch"]),
                             "best_val_loss": best, "history": history, "requested": requested}
            if calibration:
                record[label]["calibration"] = calibration
            self.log(f"{label}: {len(history['epoch'])} epochs in {seconds:.1f} s, best validation loss {best}")
            record_path.write_text(json.dumps(record, indent=1))
        record_path.write_text(json.dumps(record, indent=1))
        return record

    def _resumable(self, fit_state: Path, est, fit: dict) -> bool:
        """:func:`resumable`, logging a change of settings."""
        same = resumable(fit_state, est, fit)
        if same is False:
            self.log(f"{fit_state.name}: the estimator or its fit settings changed, training from the start")
        return bool(same)

    def methods(self) -> tuple[dict[str, Any], dict[str, float]]:
        """The trained estimators and the fitted baselines, with their training (fitting) seconds."""
        from . import baselines
        from .estimators import load

        train, val, _ = self.splits()
        record_path = self.path("training.json")
        if self.config.estimators and (not record_path.exists() or any(
                not self.path(f"checkpoints/{lb}.pt").exists() for lb in self.config.estimators)):
            self.train()
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        methods, seconds = {}, {}
        for label in self.config.estimators:
            methods[label] = load(self.path(f"checkpoints/{label}.pt"))
            seconds[label] = record.get(label, {}).get("seconds")
        for label, spec in self.config.baselines.items():
            t0 = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                b = baselines.get(spec.kind or label, self.task, **spec.options)
                b.fit(train)
                if spec.tune and hasattr(b, "tune"):
                    self.log(f"{label}: tuned {b.tune(val, seed=self.config.seed)}")
            seconds[label] = time.perf_counter() - t0
            self.log(f"{label}: {type(b).__name__} fitted in {seconds[label]:.1f} s")
            methods[label] = b
        return methods, seconds

    def evaluate(self) -> dict:
        """Evaluate every method on the same test windows; writes ``metrics.json`` and ``examples.pt``."""
        from .diagnostics import evaluate
        from .report.html import draw_examples

        methods, seconds = self.methods()
        _, _, test = self.splits()
        ev = self.config.evaluation
        N = len(test)
        g = torch.Generator().manual_seed(self.config.seed)
        idx = torch.arange(N) if N <= ev.max_windows else IndexPermutation(N, g)[:ev.max_windows].sort().values
        reference = methods.get(ev.reference) if ev.reference else None
        results = {}
        for label, method in methods.items():
            self.log(f"{label}: evaluating on {len(idx)} test windows x {ev.n_samples} samples")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                r = evaluate(method, test, n_samples=ev.n_samples, batch_size=ev.batch_size,
                             reference=reference if label != ev.reference else None, seed=self.config.seed,
                             progress=self.progress, coverage=ev.coverage, indices=idx,
                             c2st_windows=ev.c2st_windows, name=label)
            results[label] = r
            self.log(f"  {r}")
        kinds = {lb: "estimator" for lb in self.config.estimators} | {lb: "baseline" for lb in self.config.baselines}
        metrics = {"run": self.config.name, "task": self.task.name, "seed": self.config.seed,
                   "dataset": self.path("data.json").name, "n_windows": len(idx), "reference": ev.reference,
                   "methods": {lb: {"type": kinds[lb], "training_seconds": seconds.get(lb), **r.to_dict()}
                               for lb, r in results.items()}}
        self.path("metrics.json").write_text(json.dumps(metrics, indent=1))
        if ev.examples > 0:
            ex_idx = idx[:ev.examples]
            samples = draw_examples(methods, test, ex_idx, n_samples=ev.example_samples, seed=self.config.seed)
            torch.save({"indices": ex_idx, "samples": samples}, self.path("examples.pt"))
        self.log(f"metrics written to {self.path('metrics.json')}")
        return metrics

    def report(self) -> Path:
        """Write ``report.html`` (and ``report.json``) from ``metrics.json`` and ``examples.pt``."""
        from .diagnostics import EvaluationResult
        from .report.html import write

        if not self.path("metrics.json").exists():
            self.evaluate()
        metrics = json.loads(self.path("metrics.json").read_text())
        results = {lb: EvaluationResult.from_dict(m) for lb, m in metrics["methods"].items()}
        training = {lb: m.get("training_seconds") for lb, m in metrics["methods"].items()}
        _, _, test = self.splits()
        examples, ex_idx = None, None
        if self.path("examples.pt").exists():
            ex = torch.load(self.path("examples.pt"), weights_only=True)
            examples, ex_idx = ex["samples"], ex["indices"]
        positions = None
        if len(self.task.state_shape) == 1 and self.task.obs_shape != self.task.state_shape:
            from .baselines import observation_positions

            positions = observation_positions(self.task.observation.matrix(dtype=torch.float64))
        stats = json.loads(self.path("data.json").read_text()) if self.path("data.json").exists() else {}
        info = {"run": self.config.name, "task": self.task.name, "seed": self.config.seed,
                "dataset": f"{stats.get('trajectories')} trajectories, {stats.get('windows')} windows "
                           f"(fingerprint {stats.get('fingerprint')})",
                "split (train, val, test)": self.config.split, "test windows evaluated": metrics["n_windows"],
                "C2ST reference": metrics.get("reference") or "none"}
        path = write(results, test, self.path("report.html"), examples=examples, example_indices=ex_idx,
                     training_time=training, obs_positions=positions, title=f"sbida report: {self.config.name}",
                     info=info, config_text=to_yaml(self.config), progress=self.progress)
        self.log(f"report written to {path}")
        return path

    def headline(self) -> str:
        """The metrics table as text (from ``metrics.json``)."""
        from .diagnostics import EvaluationResult

        metrics = json.loads(self.path("metrics.json").read_text())
        cols = [("rmse", "RMSE", "{:.3f}"), ("crps", "CRPS", "{:.3f}"), ("spread_skill", "spread/skill", "{:.2f}"),
                ("coverage_ece", "ECE", "{:.3f}"), ("coverage_ece_noise", "ECE of noise", "{:.3f}"),
                ("tarp_atc", "TARP", "{:+.3f}")]
        lines = [f"{'method':16s}" + "".join(f"{h:>14s}" for _, h, _ in cols)]
        for label, m in metrics["methods"].items():
            r = EvaluationResult.from_dict(m).metrics()
            lines.append(f"{label:16s}" + "".join(f"{'-' if r[k] is None else f.format(r[k]):>14s}"
                                                  for k, _, f in cols))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self.config)


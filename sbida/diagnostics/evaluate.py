r"""All diagnostics of a posterior estimator on a dataset of windows, batched, in one pass.

For every window :math:`(x, y, m, t)` of the dataset the posterior :math:`q(\cdot \mid y, m, t)` is built and
sampled ``n_samples`` times; per batch only per-window statistics are kept (squared error of the sample mean, member
variance, CRPS, energy score, SBC ranks, coverage and TARP credibilities, and for grid states the spread and error
power per wavenumber), so memory does not grow with the number of windows. At the end they are reduced to the
scores of :mod:`sbida.diagnostics.scores`, the coverage curve of :mod:`~sbida.diagnostics.coverage`, the SBC and
TARP results and, when a reference posterior is given, the C2ST AUC between the two posteriors averaged over the
first ``c2st_windows`` windows. Timings are wall-clock seconds.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..posterior import Posterior
from ._checks import check_samples, flat
from .c2st import c2st
from .coverage import CoverageResult, central_credibility, hpd_credibility, moments_and_distance
from .sbc import SBCResult
from .scores import energy, fair_crps, is_grid, spectral_powers, spectrum_ratio
from .tarp import TARPResult, tarp_credibility, tarp_references

__all__ = ["EvaluationResult", "evaluate", "as_posterior_fn"]

PosteriorFn = Callable[[Tensor, Tensor, Tensor], Posterior]


def as_posterior_fn(estimator_or_posterior_fn: Any) -> PosteriorFn:
    """The function ``(y, mask, t) -> Posterior`` of an estimator (its ``.posterior``) or the callable itself."""
    fn = getattr(estimator_or_posterior_fn, "posterior", None)
    if callable(fn):
        return fn
    if callable(estimator_or_posterior_fn):
        return estimator_or_posterior_fn
    raise ValueError(f"expected an object with .posterior(y, mask, t) or a callable (y, mask, t) -> Posterior, got "
                     f"{type(estimator_or_posterior_fn).__name__}")


@dataclass
class EvaluationResult:
    """Scores, calibration and timings of a posterior on a set of windows.

    Attributes:
        n_windows, n_samples, state_shape: what was evaluated.
        rmse: RMSE of the sample mean; nrmse: divided by ``clim_std``.
        crps: fair CRPS averaged over variables and windows; energy: energy score averaged over windows.
        spread: root mean member variance; spread_skill: ``sqrt((M+1)/M) spread / rmse``.
        coverage, sbc, tarp: the calibration results.
        c2st_auc: mean C2ST ROC-AUC against the reference over ``c2st_aucs`` (one per window), or ``None``.
        spectrum: spread/skill per wavenumber ``0, 1, ...`` of the grid
            (:func:`~sbida.diagnostics.spread_skill_spectrum`) for states ``(K,)`` or ``(C, H, W)``, else ``None``.
        clim_std: the climatological standard deviation used by ``nrmse``.
        timings: seconds: ``posterior``, ``sampling``, ``log_prob``, ``metrics``, ``c2st``, ``total``, and per window
            ``posterior_and_sampling_per_window`` and ``metrics_per_window``.
        name: a label (e.g. the estimator's name).
    """

    n_windows: int
    n_samples: int
    state_shape: tuple[int, ...]
    rmse: float
    nrmse: float
    crps: float
    energy: float
    spread: float
    spread_skill: float
    coverage: CoverageResult
    sbc: SBCResult
    tarp: TARPResult
    clim_std: float
    c2st_auc: float | None = None
    c2st_aucs: list[float] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    name: str = ""
    spectrum: list[float] | None = None

    def metrics(self) -> dict[str, float | None]:
        """The headline numbers as a flat dictionary (for tables)."""
        return {"rmse": self.rmse, "nrmse": self.nrmse, "crps": self.crps, "energy": self.energy,
                "spread_skill": self.spread_skill, "coverage_ece": self.coverage.ece,
                "coverage_max_gap": self.coverage.max_gap, "marginal_ece": self.coverage.marginal_ece,
                "distance_ece": self.coverage.distance_ece, "coverage_ece_noise": self.coverage.ece_noise,
                "distance_ece_noise": self.coverage.distance_ece_noise, "sbc_p_value": self.sbc.p_value,
                "tarp_atc": self.tarp.atc, "c2st_auc": self.c2st_auc}

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return {"name": self.name, "n_windows": self.n_windows, "n_samples": self.n_samples,
                "state_shape": list(self.state_shape), "rmse": self.rmse, "nrmse": self.nrmse, "crps": self.crps,
                "energy": self.energy, "spread": self.spread, "spread_skill": self.spread_skill,
                "clim_std": self.clim_std, "coverage": self.coverage.to_dict(), "sbc": self.sbc.to_dict(),
                "tarp": self.tarp.to_dict(), "c2st_auc": self.c2st_auc, "c2st_aucs": list(self.c2st_aucs),
                "timings": dict(self.timings), "spectrum": self.spectrum}

    @classmethod
    def from_dict(cls, d: dict) -> EvaluationResult:
        """Inverse of :meth:`to_dict`."""
        return cls(d["n_windows"], d["n_samples"], tuple(d["state_shape"]), d["rmse"], d["nrmse"], d["crps"],
                   d["energy"], d["spread"], d["spread_skill"], CoverageResult.from_dict(d["coverage"]),
                   SBCResult.from_dict(d["sbc"]), TARPResult.from_dict(d["tarp"]), d["clim_std"], d.get("c2st_auc"),
                   list(d.get("c2st_aucs", [])), dict(d.get("timings", {})), d.get("name", ""), d.get("spectrum"))

    def to_json(self, path: str | Path | None = None) -> str:
        """The result as JSON text, also written to ``path`` when given."""
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> EvaluationResult:
        """Read a result from JSON text or from a file."""
        s = str(text_or_path)
        text = s if s.lstrip().startswith("{") else Path(s).read_text()
        return cls.from_dict(json.loads(text))

    def __str__(self) -> str:
        m = {k: v for k, v in self.metrics().items() if v is not None}
        body = ", ".join(f"{k}={v:.4g}" for k, v in m.items())
        return f"EvaluationResult({self.name + ': ' if self.name else ''}{self.n_windows} windows, {body})"


def _posterior(fn: PosteriorFn, y: Tensor, m: Tensor, t: Tensor, B: int, state_shape: tuple[int, ...],
               what: str) -> Posterior:
    post = fn(y, m, t)
    if not isinstance(post, Posterior):
        raise ValueError(f"the {what} must return a sbida.posterior.Posterior, got {type(post).__name__}")
    if post.batch_size != B or tuple(post.state_shape) != tuple(state_shape):
        raise ValueError(f"the {what} returned a posterior over {post.batch_size} windows of shape "
                         f"{post.state_shape}, expected {B} windows of shape {state_shape}")
    return post


def evaluate(estimator_or_posterior_fn: Any, dataset, n_samples: int = 1000, batch_size: int = 100,
             reference: Any = None, seed: int = 0, progress: bool = True, coverage: str = "auto",
             levels: Tensor | None = None, indices: Tensor | None = None, clim_std: float | None = None,
             c2st_windows: int = 5, c2st_samples: int = 500, energy_shifts: int = 1, tarp_bins: int | None = None,
             name: str = "") -> EvaluationResult:
    """Evaluate a posterior estimator on the windows of a dataset.

    Args:
        estimator_or_posterior_fn: an object with ``.posterior(y, mask, t) -> Posterior`` or such a callable.
        dataset: a :class:`~sbida.data.WindowDataset` (``get(indices) -> (x, y, mask, t)``).
        n_samples: posterior samples per window (``>= 2``); an ensemble posterior gives at most its ``M`` members,
            each once (:meth:`~sbida.posterior.Posterior.diagnostic_draws`; the result's ``n_samples`` is the number
            taken).
        batch_size: windows per call of the posterior.
        reference: optional reference estimator or posterior function (e.g. an exact posterior) for C2ST.
        seed: seed of the samples and of the TARP reference points.
        progress: show a progress bar.
        coverage: ``"auto"`` (highest density where the posterior has ``log_prob``), ``"hpd"`` or ``"distance"``.
        levels: ``(L,)`` coverage levels (default 0.05, ..., 0.95).
        indices: ``(N,)`` windows to evaluate (default all).
        clim_std: climatological standard deviation for the nRMSE (default: of the evaluated truths).
        c2st_windows: number of windows (the first ones) with a C2ST against ``reference``.
        c2st_samples: samples of each posterior per C2ST (at most ``n_samples``).
        energy_shifts: pair shifts of the energy score estimate (see :func:`~sbida.diagnostics.energy_score`).
        tarp_bins: intervals of the TARP grid (default ``max(N // 10, 10)``).
        name: a label stored in the result.

    Returns:
        An :class:`EvaluationResult`.
    """
    start = time.perf_counter()
    fn = as_posterior_fn(estimator_or_posterior_fn)
    ref_fn = as_posterior_fn(reference) if reference is not None else None
    if coverage not in ("auto", "hpd", "distance"):
        raise ValueError(f"coverage must be 'auto', 'hpd' or 'distance', got {coverage!r}")
    if int(n_samples) != n_samples or n_samples < 2:
        raise ValueError(f"n_samples must be an integer >= 2, got {n_samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not hasattr(dataset, "get") or not hasattr(dataset, "locate"):
        raise ValueError(f"dataset must be a WindowDataset, got {type(dataset).__name__}")
    idx = torch.arange(len(dataset)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
    if idx.dim() != 1 or idx.numel() == 0:
        raise ValueError(f"need a non-empty 1-D set of window indices, got shape {tuple(idx.shape)}")
    n_samples = int(n_samples)
    N = idx.numel()
    traj, pos = dataset.locate(idx)
    truths = dataset.states[traj, pos]  # (N, *state_shape)
    state_shape = tuple(truths.shape[1:])
    X = flat(truths, 1).double()
    lo, hi = X.min(0).values, X.max(0).values
    refs = tarp_references(truths, seed)
    if clim_std is None:
        clim_std = float(X.var(0).mean().sqrt()) if N > 1 else float("nan")

    g = torch.Generator().manual_seed(int(seed))
    g_ref = torch.Generator().manual_seed(int(seed) + 1)
    keys = ("mse", "var", "crps", "energy", "ranks", "cred", "dist", "marginal", "tarp")
    acc: dict[str, list[Tensor]] = {k: [] for k in keys}
    times = dict.fromkeys(("posterior", "sampling", "log_prob", "metrics", "c2st"), 0.0)
    aucs: list[float] = []
    grid = is_grid(state_shape)
    powers = [0.0, 0.0]  # spread and error power per wavenumber, summed over windows
    method = coverage
    done = 0
    n_asked, n_samples = n_samples, None  # draws per window: the posterior's diagnostic_draws(n_asked)
    with tqdm(total=N, desc="evaluating", unit="window", disable=not progress, leave=False) as bar:
        for i in range(0, N, batch_size):
            b = idx[i:i + batch_size]
            x, y, m, t = dataset.get(b)
            B = x.shape[0]
            t0 = time.perf_counter()
            post = _posterior(fn, y, m, t, B, state_shape, "estimator")
            t1 = time.perf_counter()
            n = post.diagnostic_draws(n_asked)
            if n_samples is None:
                if n < 2:
                    raise ValueError(f"the posterior gives {n} draw per window for n_samples={n_asked}: need >= 2")
                n_samples = n
            elif n != n_samples:
                raise ValueError(f"the posteriors of the batches give {n_samples} and then {n} draws per window "
                                 f"(n_samples={n_asked}): ranks among different numbers of draws do not pool")
            samples = post.sample(n_samples, generator=g)
            t2 = time.perf_counter()
            times["posterior"] += t1 - t0
            times["sampling"] += t2 - t1
            if method == "auto":
                method = "hpd" if post.has_log_prob else "distance"
            if method == "hpd":
                if not post.has_log_prob:
                    raise ValueError("coverage 'hpd' needs posteriors with log_prob; use 'distance' or 'auto'")
                cred = hpd_credibility(post.log_prob(samples).double(), post.log_prob(x.to(samples.dtype)).double())
            t3 = time.perf_counter()
            times["log_prob"] += t3 - t2

            x = x.to(samples.dtype)
            samples = check_samples(samples, x)
            s, xf = flat(samples, 2), flat(x, 1)
            mean, var, dist_cred = moments_and_distance(s, xf)
            acc["mse"].append((mean - xf).square().mean(-1).double())
            acc["var"].append(var.mean(-1).double())
            diff = s - xf
            acc["crps"].append(fair_crps(s, xf, diff).mean(-1).double())
            acc["energy"].append(energy(s, xf, energy_shifts, diff).double())
            del diff
            ranks = (s < xf).sum(0)
            acc["ranks"].append(ranks)
            acc["marginal"].append(central_credibility(ranks, n_samples).float())
            acc["cred"].append(dist_cred if method == "distance" else cred)
            acc["dist"].append(dist_cred)
            acc["tarp"].append(tarp_credibility(s, xf, refs[i:i + B], lo.to(s.dtype), hi.to(s.dtype)))
            if grid:
                powers = [a + b for a, b in zip(powers, spectral_powers(samples, x))]
            t4 = time.perf_counter()
            times["metrics"] += t4 - t3

            if ref_fn is not None and done < c2st_windows:
                k = min(c2st_windows - done, B)
                ref = _posterior(ref_fn, y[:k], m[:k], t[:k], k, state_shape, "reference")
                n_c = ref.diagnostic_draws(min(c2st_samples, n_samples))  # balanced: as many of each
                ref_samples = ref.sample(n_c, generator=g_ref)
                aucs += [c2st(samples[:n_c, j], ref_samples[:, j], seed=seed) for j in range(k)]
                done += k
                times["c2st"] += time.perf_counter() - t4
            bar.update(B)

    t5 = time.perf_counter()
    cat = {k: torch.cat(v) for k, v in acc.items()}
    cov = CoverageResult.from_credibility(cat["cred"], method, levels, cat["marginal"], cat["dist"], groups=traj)
    sbc_res = SBCResult.from_ranks(cat["ranks"], n_samples)
    tarp_res = TARPResult.from_credibility(cat["tarp"], tarp_bins)
    rmse = math.sqrt(float(cat["mse"].mean()))
    spectrum = None
    if grid and bool((powers[1] > 0).all()):
        spectrum = spectrum_ratio(powers[0], powers[1], n_samples).tolist()
    spread = math.sqrt(float(cat["var"].mean()))
    times["metrics"] += time.perf_counter() - t5
    times["total"] = time.perf_counter() - start
    times["posterior_and_sampling_per_window"] = (times["posterior"] + times["sampling"]) / N
    times["metrics_per_window"] = (times["metrics"] + times["log_prob"]) / N
    return EvaluationResult(
        n_windows=N, n_samples=n_samples, state_shape=state_shape, rmse=rmse, nrmse=rmse / clim_std,
        crps=float(cat["crps"].mean()), energy=float(cat["energy"].mean()), spread=spread,
        spread_skill=math.sqrt((n_samples + 1) / n_samples) * spread / rmse if rmse > 0 else float("inf"),
        coverage=cov, sbc=sbc_res, tarp=tarp_res, clim_std=clim_std,
        c2st_auc=float(sum(aucs) / len(aucs)) if aucs else None, c2st_aucs=aucs, timings=times, name=name,
        spectrum=spectrum,
    )

r"""A self-contained HTML calibration report of several posteriors on the same windows, and its metrics as JSON.

For every method (an amortized estimator, a classical baseline, or an already computed
:class:`~sbida.diagnostics.EvaluationResult`) the report holds one row of a table of scores and calibration
figures: RMSE and nRMSE of the posterior mean, CRPS, the spread/skill ratio :math:`\sqrt{(M+1)/M}\,s/\mathrm{RMSE}`,
the expected calibration error of the coverage curve :math:`\mathrm{ECE} = \frac1L\sum_l |c(\alpha_l) - \alpha_l|`,
the SBC p-value of rank uniformity, the TARP area-to-curve, the C2ST ROC-AUC against a reference (0.5 is
indistinguishable) where one is given, the training time and the inference time per window. Below it: the coverage
curves of all methods on one figure, one SBC ECDF panel per method, the TARP curves, and example windows (truth,
observations, posterior mean and spread; images for 2-D states). Figures are PNG embedded as base64 ``data:`` URIs,
so the file needs nothing beside it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data import IndexPermutation
from ..diagnostics.evaluate import EvaluationResult, as_posterior_fn, evaluate
from .plots import plot_coverage, plot_sbc, plot_spectrum, plot_tarp, plot_window

__all__ = ["write", "render", "draw_examples", "metrics_table", "COLUMNS"]

#: Columns of the metrics table: (key, header, format). ``None`` values are shown as "-".
COLUMNS: list[tuple[str, str, str]] = [
    ("rmse", "RMSE", "{:.4g}"),
    ("nrmse", "nRMSE", "{:.4g}"),
    ("crps", "CRPS", "{:.4g}"),
    ("spread_skill", "spread/skill", "{:.3f}"),
    ("coverage_ece", "coverage ECE", "{:.3f}"),
    ("distance_ece", "ECE (distance)", "{:.3f}"),
    ("coverage_ece_noise", "ECE of noise alone", "{:.3f}"),
    ("sbc_p_value", "SBC p-value", "{:.3g}"),
    ("tarp_atc", "TARP ATC", "{:+.3f}"),
    ("c2st_auc", "C2ST AUC", "{:.3f}"),
    ("training_seconds", "training time (s)", "{:.1f}"),
    ("ms_per_window", "time per window (ms)", "{:.3g}"),
]

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { font-size: 1.25em; margin-top: 1.6em;
     border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
p.meta { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; font-weight: 600; }
tr:nth-child(even) td { background: #fafafa; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; text-align: center; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
.note { color: #666; font-size: 0.9em; }
"""


def _is_result(obj: Any) -> bool:
    return isinstance(obj, EvaluationResult)


def _figure_png(fig) -> str:
    """A matplotlib figure as a base64 PNG ``data:`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig, caption: str, alt: str) -> str:
    return (f'<figure><img src="{_figure_png(fig)}" alt="{html.escape(alt)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _row_metrics(result: EvaluationResult, training_seconds: float | None) -> dict[str, float | None]:
    m = dict(result.metrics())
    per_window = result.timings.get("posterior_and_sampling_per_window")
    m["training_seconds"] = training_seconds
    m["ms_per_window"] = None if per_window is None else 1e3 * per_window
    return m


def metrics_table(results: Mapping[str, EvaluationResult], training_time: Mapping[str, float | None] | None = None
                  ) -> dict[str, dict[str, float | None]]:
    """The table's numbers: ``{method: {column key: value}}`` (keys of :data:`COLUMNS`, ``None`` where undefined)."""
    training_time = training_time or {}
    rows = {}
    for name, r in results.items():
        m = _row_metrics(r, training_time.get(name))
        rows[name] = {k: m[k] for k, _, _ in COLUMNS}
    return rows


def _fmt(value: float | None, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return fmt.format(value)


def _table(rows: Mapping[str, Mapping[str, float | None]]) -> str:
    has_c2st = any(r.get("c2st_auc") is not None for r in rows.values())
    cols = [c for c in COLUMNS if c[0] != "c2st_auc" or has_c2st]
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in cols)
    body = []
    for name, r in rows.items():
        cells = "".join(f"<td>{_fmt(r.get(k), f)}</td>" for k, _, f in cols)
        body.append(f"<tr><td>{html.escape(name)}</td>{cells}</tr>")
    return (f'<table id="metrics"><thead><tr><th>method</th>{head}</tr></thead><tbody>{"".join(body)}'
            f"</tbody></table>")


def _kv_table(items: Mapping[str, Any], table_id: str) -> str:
    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in items.items())
    return f'<table id="{table_id}"><tbody>{rows}</tbody></table>'


def _sbc_panels(results: Mapping[str, EvaluationResult]):
    from matplotlib.figure import Figure

    n = len(results)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.6 * cols, 3.4 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, r) in zip(axes, results.items()):
        plot_sbc(r.sbc, kind="ecdf", ax=ax)
        ax.set_title(f"{name}: bias {r.sbc.bias:+.3f}, dispersion {r.sbc.dispersion:.2f}", fontsize="medium")
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig


def _check_dataset(dataset: Any) -> None:
    if not all(hasattr(dataset, a) for a in ("get", "locate", "states")):
        raise ValueError(f"dataset must be a WindowDataset, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError("dataset has no windows")


def draw_examples(methods: Mapping[str, Any], dataset: Any, indices: Tensor | Sequence[int], n_samples: int = 200,
                  seed: int = 0) -> dict[str, Tensor]:
    """Posterior samples of a few windows for the example figures.

    Args:
        methods: ``{name: estimator, baseline or callable (y, mask, t) -> Posterior}``.
        dataset: a :class:`~sbida.data.WindowDataset`.
        indices: ``(E,)`` windows of ``dataset``.
        n_samples: samples per window.
        seed: seed of the samples (and of the global generator while the posteriors are built).

    Returns:
        ``{name: samples (n_samples, E, *state_shape)}``.
    """
    _check_dataset(dataset)
    idx = torch.as_tensor(indices, dtype=torch.long)
    if idx.dim() != 1 or idx.numel() == 0:
        raise ValueError(f"indices must be a non-empty 1-D set of windows, got shape {tuple(idx.shape)}")
    _, y, m, t = dataset.get(idx)
    out = {}
    for name, method in methods.items():
        fn = as_posterior_fn(method)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            post = fn(y, m, t)
            out[name] = post.sample(n_samples, generator=torch.Generator().manual_seed(seed)).detach().cpu()
    return out


def _example_figures(examples: Mapping[str, Tensor], dataset: Any, indices: Tensor,
                     obs_positions: Tensor | None) -> str:
    x, y, m, t = dataset.get(indices)
    parts = []
    for e, i in enumerate(indices.tolist()):
        parts.append(f"<h3>window {i} (t = {float(t[e]):.3g})</h3>")
        for name, s in examples.items():
            if s.dim() < 3 or s.shape[1] != len(indices) or tuple(s.shape[2:]) != tuple(x.shape[1:]):
                raise ValueError(f"example samples of {name!r} must be (n, {len(indices)}, *{tuple(x.shape[1:])}), "
                                 f"got {tuple(s.shape)}")
            fig = plot_window(s[:, e], x[e], y[e], m[e], obs_positions=obs_positions)
            fig.suptitle(f"{name}: window {i}", fontsize="medium")
            parts.append(_img(fig, f"{name}, window {i}: truth, observations, posterior mean and spread",
                              f"example window {i}, {name}"))
    return "\n".join(parts)


def render(results: Mapping[str, EvaluationResult], dataset: Any = None, *, title: str = "sbida calibration report",
           training_time: Mapping[str, float | None] | None = None, examples: Mapping[str, Tensor] | None = None,
           example_indices: Tensor | Sequence[int] | None = None, obs_positions: Tensor | None = None,
           info: Mapping[str, Any] | None = None, config_text: str | None = None) -> str:
    """The report as an HTML string (see :func:`write`)."""
    if not results:
        raise ValueError("need at least one result to report")
    for name, r in results.items():
        if not _is_result(r):
            raise ValueError(f"results[{name!r}] must be an EvaluationResult, got {type(r).__name__}")
    rows = metrics_table(results, training_time)
    first = next(iter(results.values()))
    sections = [f"<h1>{html.escape(title)}</h1>",
                f'<p class="meta">{len(results)} methods, {first.n_windows} windows, {first.n_samples} posterior '
                f"samples per window, state shape {tuple(first.state_shape)}</p>"]
    if info:
        sections += ["<h2>Run</h2>", _kv_table(info, "info")]
    sections += ["<h2>Scores and calibration</h2>", _table(rows),
                 '<p class="note">RMSE, nRMSE (RMSE / climatological std) and CRPS: lower is better. spread/skill: 1 '
                 "when the spread matches the error. Coverage ECE: mean |coverage - level| (0 when calibrated), by "
                 "highest density where the posterior has a density, else by a distance statistic; ECE (distance): "
                 "by the distance statistic for every method (dash-dotted in the coverage plot). ECE of noise "
                 "alone: the ECE that a calibrated posterior would show on these windows from sampling noise alone "
                 "(the coverage resampled by trajectory); an ECE near it is consistent with calibration. SBC "
                 "p-value: uniformity of ranks (small: miscalibrated). TARP ATC: below 0 over-confident, above 0 "
                 "under-confident. C2ST AUC against the reference: 0.5 when indistinguishable.</p>"]
    sections += ["<h2>Coverage</h2>",
                 _img(plot_coverage({n: r.coverage for n, r in results.items()}, marginal=False, distance=True),
                      "expected coverage of all methods against the credibility level", "coverage curves"),
                 "<h2>Simulation-based calibration</h2>",
                 _img(_sbc_panels(results), "ECDF of the normalized ranks minus the uniform CDF, per method",
                      "SBC ECDF panels"),
                 "<h2>TARP</h2>",
                 _img(plot_tarp({n: r.tarp for n, r in results.items()}),
                      "TARP expected coverage probability of all methods", "TARP curves")]
    spectra = {n: r.spectrum for n, r in results.items() if r.spectrum and max(r.spectrum) > 0}
    if spectra:  # grid states; point estimates (no spread at any scale) are left out
        sections += ["<h2>Spread/skill by scale</h2>",
                     _img(plot_spectrum(spectra), "spread/skill ratio per wavenumber of the state's grid: a posterior "
                          "can be calibrated on the whole and too narrow at some scales, too wide at others",
                          "spread/skill spectra")]
    if examples:
        if dataset is None or example_indices is None:
            raise ValueError("example figures need the dataset and example_indices")
        _check_dataset(dataset)
        idx = torch.as_tensor(example_indices, dtype=torch.long)
        sections += ["<h2>Example windows</h2>", _example_figures(examples, dataset, idx, obs_positions)]
    timing = {n: {k: round(v, 4) for k, v in r.timings.items()} for n, r in results.items()}
    sections += ["<h2>Timings (s)</h2>", "<pre>" + html.escape(json.dumps(timing, indent=1)) + "</pre>"]
    if config_text:
        sections += ["<h2>Configuration</h2>", "<pre>" + html.escape(config_text) + "</pre>"]
    body = "\n".join(sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style></head>'
            f"<body>\n{body}\n</body></html>\n")


def write(results_or_estimators: Mapping[str, Any], dataset: Any, path: str | Path, *, n_samples: int = 500,
          max_windows: int | None = 512, batch_size: int = 100, reference: Any = None, c2st_windows: int = 5,
          seed: int = 0,
          n_examples: int = 2, examples: Mapping[str, Tensor] | None = None,
          example_indices: Tensor | Sequence[int] | None = None, training_time: Mapping[str, float] | None = None,
          obs_positions: Tensor | None = None, title: str = "sbida calibration report",
          info: Mapping[str, Any] | None = None, config_text: str | None = None, progress: bool = True) -> Path:
    """Write the HTML report to ``path`` and its metrics to ``path`` with the suffix ``.json``.

    Args:
        results_or_estimators: ``{name: EvaluationResult}``, or ``{name: estimator / baseline / callable}`` which
            are evaluated here on ``dataset`` (a mapping may mix both).
        dataset: the :class:`~sbida.data.WindowDataset` of the windows (used for evaluation and example figures).
        path: the HTML file to write.
        n_samples, batch_size, reference, c2st_windows, seed: passed to :func:`~sbida.diagnostics.evaluate`.
        max_windows: evaluate a random subset (drawn with ``seed``) of at most this many windows (``None``: all).
        n_examples: example windows drawn (the first evaluated windows) when methods are evaluated here.
        examples: ``{name: samples (n, E, *state_shape)}`` of the windows ``example_indices (E,)``, for results
            computed elsewhere.
        training_time: ``{name: seconds}`` of training (or fitting) each method.
        obs_positions: ``(M,)`` cell of each observed value, to draw observations of 1-D states off the grid.
        title, info, config_text: the heading, a table of run facts, and a configuration shown verbatim.
        progress: show progress bars while evaluating.

    Returns:
        The path of the HTML file.
    """
    if not isinstance(results_or_estimators, Mapping) or not results_or_estimators:
        raise ValueError(f"results_or_estimators must be a non-empty mapping of names to results or estimators, got "
                         f"{type(results_or_estimators).__name__}")
    _check_dataset(dataset)
    results: dict[str, EvaluationResult] = {}
    to_sample: dict[str, Any] = {}
    indices = None
    for name, obj in results_or_estimators.items():
        if _is_result(obj):
            results[name] = obj
            continue
        if indices is None:
            N = len(dataset)
            g = torch.Generator().manual_seed(seed)
            indices = torch.arange(N) if max_windows is None or N <= max_windows else \
                IndexPermutation(N, g)[:max_windows].sort().values
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            results[name] = evaluate(obj, dataset, n_samples=n_samples, batch_size=batch_size, reference=reference,
                                     c2st_windows=c2st_windows, seed=seed, progress=progress, indices=indices,
                                     name=name)
        to_sample[name] = obj
    if to_sample and examples is None and n_examples > 0:
        example_indices = indices[:n_examples]
        examples = draw_examples(to_sample, dataset, example_indices, n_samples=min(n_samples, 200), seed=seed)
    text = render(results, dataset, title=title, training_time=training_time, examples=examples,
                  example_indices=example_indices, obs_positions=obs_positions, info=info, config_text=config_text)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    metrics = {"table": metrics_table(results, training_time),
               "results": {n: r.to_dict() for n, r in results.items()}}
    path.with_suffix(".json").write_text(json.dumps(metrics, indent=1))
    return path

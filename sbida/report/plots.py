r"""Figures of the diagnostics: coverage, SBC ranks, TARP, spread/skill by scale, and one window's posterior against
the truth.

Calibration bands are pointwise binomial: for ``N`` windows, a calibrated coverage at level :math:`\alpha` is
:math:`\mathrm{Binomial}(N, \alpha) / N`, and the band holds its central ``band`` probability. Every function returns
the ``matplotlib.figure.Figure`` (built without pyplot's global state, so it works with the Agg backend and in
threads); pass ``ax`` to draw into an existing axes instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..diagnostics.coverage import CoverageResult
from ..diagnostics.sbc import SBCResult, rank_bins
from ..diagnostics.tarp import TARPResult

if TYPE_CHECKING:  # matplotlib and scipy.stats are imported when a figure is drawn (they are slow to import)
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_coverage", "plot_sbc", "plot_tarp", "plot_spectrum", "plot_window", "binomial_band"]


def binomial_band(levels: Tensor | np.ndarray, n: int, band: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Central ``band`` interval of ``Binomial(n, level) / n`` at each level: ``(low, high)``, each ``(L,)``."""
    from scipy.stats import binom

    p = np.asarray(levels, dtype=float)
    lo = binom.ppf((1 - band) / 2, n, p) / n
    hi = binom.ppf((1 + band) / 2, n, p) / n
    return lo, hi


def _axes(ax: Axes | None, ncols: int = 1, size: tuple[float, float] = (4.2, 4.0)) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    if ax is not None:
        return ax.figure, [ax]
    fig = Figure(figsize=(size[0] * ncols, size[1]), layout="constrained")
    return fig, list(np.atleast_1d(fig.subplots(1, ncols)))


def _named(results, cls) -> dict[str, object]:
    if isinstance(results, cls):
        return {"": results}
    if isinstance(results, Mapping) and all(isinstance(r, cls) for r in results.values()):
        return dict(results)
    raise ValueError(f"expected a {cls.__name__} or a mapping of names to them, got {type(results).__name__}")


def _diagonal(ax: Axes, xlabel: str, ylabel: str) -> None:
    ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--", label="calibrated")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=xlabel, ylabel=ylabel, aspect="equal")


def _coverage_band(ax, n_windows: int, band: float, label: str) -> None:
    """Shade the binomial band of a calibrated coverage curve over ``n_windows`` windows."""
    grid = np.linspace(0.0, 1.0, 201)
    lo, hi = binomial_band(grid, n_windows, band)
    ax.fill_between(grid, lo, hi, color="0.85", label=label)


def plot_coverage(results: CoverageResult | Mapping[str, CoverageResult], ax: Axes | None = None,
                  band: float = 0.95, marginal: bool = False, distance: bool = False) -> Figure:
    """Expected coverage against credibility level, with the binomial band of a calibrated posterior.

    Args:
        results: one :class:`~sbida.diagnostics.CoverageResult` or a mapping ``name -> result`` (one line each).
        ax: axes to draw into (default: a new figure).
        band: probability of the band (0 to leave it out).
        marginal: also draw the marginal (central interval) curves, dotted.
        distance: also draw the distance-statistic curves of results measured by highest density, dash-dotted
            (where they were computed: :func:`~sbida.diagnostics.evaluate` does).

    Returns:
        The figure.
    """
    named = _named(results, CoverageResult)
    fig, (ax,) = _axes(ax)
    first = next(iter(named.values()))
    if band > 0:
        _coverage_band(ax, first.n_windows, band, f"{band:.0%} band, {first.n_windows} windows")
    _diagonal(ax, "credibility level", "expected coverage")
    for name, r in named.items():
        label = f"{name + ' ' if name else ''}({r.method}, ECE {r.ece:.3f})"
        line, = ax.plot(r.levels.numpy(), r.coverage.numpy(), marker="o", ms=3, label=label)
        if marginal and r.marginal is not None:
            ax.plot(r.levels.numpy(), r.marginal.numpy(), ls=":", color=line.get_color(),
                    label=f"{name + ' ' if name else ''}marginal (ECE {r.marginal_ece:.3f})")
        if distance and r.method != "distance" and r.distance is not None:
            ax.plot(r.levels.numpy(), r.distance.numpy(), ls="-.", color=line.get_color(),
                    label=f"{name + ' ' if name else ''}(distance, ECE {r.distance_ece:.3f})")
    ax.legend(fontsize="small", loc="upper left")
    return fig


def plot_sbc(result: SBCResult | Mapping[str, SBCResult], kind: str = "ecdf", ax: Axes | None = None,
             band: float = 0.95) -> Figure:
    """SBC ranks: the ECDF difference (ECDF of ``rank / (n + 1)`` minus the uniform CDF) or the rank histogram.

    The histogram is the average over variables of one variable's histogram (each bin scaled to ``(n + 1) / bins``
    of the ``n + 1`` possible ranks, :attr:`~sbida.diagnostics.SBCResult.histogram`), drawn over the ranks it holds;
    the ECDF is that of the ranks at the bins' edges. The band is that of one variable (``N`` windows):
    ``Binomial(N, 1/bins)`` counts for the histogram, ``Binomial(N, u) / N - u`` for the ECDF.

    Args:
        result: an :class:`~sbida.diagnostics.SBCResult` or a mapping ``name -> result``.
        kind: ``"ecdf"`` or ``"hist"``.
        ax: axes to draw into.
        band: probability of the band (0 to leave it out).

    Returns:
        The figure.
    """
    if kind not in ("ecdf", "hist"):
        raise ValueError(f"kind must be 'ecdf' or 'hist', got {kind!r}")
    named = _named(result, SBCResult)
    fig, (ax,) = _axes(ax, size=(5.0, 3.6))
    first = next(iter(named.values()))
    N, bins = first.n_windows, len(first.histogram)

    def edges_and_counts(r: SBCResult) -> tuple[np.ndarray, np.ndarray]:
        """The bins' edges in ``[0, 1]`` (the share of the ``n + 1`` ranks below them) and their raw counts."""
        _, per_bin = rank_bins(r.n_samples, len(r.histogram))
        k = per_bin.double().numpy()
        return np.concatenate([[0.0], np.cumsum(k)]) / k.sum(), r.histogram.numpy() * k * len(k) / k.sum()
    if kind == "hist":
        if band > 0:
            lo, hi = binomial_band(np.full(2, 1 / bins), N, band)
            lo, hi = lo[0] * N, hi[0] * N
            ax.axhspan(lo, hi, color="0.85", label=f"{band:.0%} band")
        ax.axhline(N / bins, color="k", lw=0.8, ls="--")
        for name, r in named.items():
            ax.stairs(r.histogram.numpy(), edges_and_counts(r)[0],
                      label=f"{name + ' ' if name else ''}(p = {r.p_value:.2g})")
        ax.set(xlabel="normalized rank", ylabel="windows per bin", xlim=(0, 1))
    else:
        if band > 0:
            grid = np.linspace(0.0, 1.0, 201)
            lo, hi = binomial_band(grid, N, band)
            ax.fill_between(grid, lo - grid, hi - grid, color="0.85", label=f"{band:.0%} band")
        ax.axhline(0, color="k", lw=0.8, ls="--")
        for name, r in named.items():
            edges, h = edges_and_counts(r)
            ecdf = np.concatenate([[0.0], np.cumsum(h) / max(h.sum(), 1e-12)])
            ax.plot(edges, ecdf - edges, marker="o", ms=2, label=f"{name + ' ' if name else ''}(p = {r.p_value:.2g})")
        ax.set(xlabel="normalized rank", ylabel="ECDF - uniform", xlim=(0, 1))
    ax.legend(fontsize="small")
    return fig


def plot_tarp(result: TARPResult | Mapping[str, TARPResult], ax: Axes | None = None, band: float = 0.95) -> Figure:
    """TARP expected coverage probability against credibility level.

    Args:
        result: a :class:`~sbida.diagnostics.TARPResult` or a mapping ``name -> result``.
        ax: axes to draw into.
        band: probability of the binomial band (0 to leave it out).

    Returns:
        The figure.
    """
    named = _named(result, TARPResult)
    fig, (ax,) = _axes(ax)
    first = next(iter(named.values()))
    if band > 0:
        _coverage_band(ax, first.n_windows, band, f"{band:.0%} band")
    _diagonal(ax, "credibility level", "TARP expected coverage")
    for name, r in named.items():
        ax.plot(r.alpha.numpy(), r.ecp.numpy(), label=f"{name + ' ' if name else ''}(ATC {r.atc:+.3f})")
    ax.legend(fontsize="small", loc="upper left")
    return fig


def plot_spectrum(spectra: Sequence[float] | Tensor | Mapping[str, Sequence[float] | Tensor], ax: Axes | None = None
                  ) -> Figure:
    """Spread/skill ratio against the wavenumber of the grid (:func:`sbida.diagnostics.spread_skill_spectrum`, or
    :attr:`~sbida.diagnostics.EvaluationResult.spectrum`), with the calibrated ratio 1.

    Args:
        spectra: the ratios ``(k,)`` of wavenumbers ``0 ... k - 1``, or a mapping ``name -> ratios``.
        ax: axes to draw into.

    Returns:
        The figure.
    """
    named = dict(spectra) if isinstance(spectra, Mapping) else {"": spectra}
    if not named:
        raise ValueError("need at least one spectrum to plot")
    fig, (ax,) = _axes(ax, size=(5.0, 3.6))
    ax.axhline(1.0, color="k", lw=0.8, ls="--", label="calibrated")
    top = 1.2
    for name, ratio in named.items():
        r = np.asarray(torch.as_tensor(ratio, dtype=torch.float64))
        if r.ndim != 1 or len(r) == 0:
            raise ValueError(f"a spectrum must be a non-empty 1-D sequence, got shape {r.shape} for {name!r}")
        ax.plot(np.arange(len(r)), r, marker=".", label=name or None)
        top = max(top, 1.1 * float(np.nanmax(r)))
    ax.set(ylim=(0, top), xlabel="wavenumber", ylabel="spread / skill")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.text(0.01, 0.01, "below 1: over-confident at that scale", transform=ax.transAxes, fontsize="small",
            va="bottom")
    ax.legend(fontsize="small")
    return fig


def _obs_for_state(y: Tensor | None, mask: Tensor | None, state_shape: tuple[int, ...]):
    """The last observation time of a window ``(T, *obs_shape)`` as a state-shaped array with NaN where missing."""
    if y is None:
        return None
    y = torch.as_tensor(y).detach().cpu().double()
    m = torch.ones_like(y, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool().cpu()
    if y.shape != m.shape:
        raise ValueError(f"y and mask must have one shape, got {tuple(y.shape)} and {tuple(m.shape)}")
    if tuple(y.shape[1:]) != tuple(state_shape):
        return None
    return torch.where(m[-1], y[-1], torch.nan).numpy()


def plot_window(samples: Tensor, truth: Tensor | None = None, y: Tensor | None = None, mask: Tensor | None = None,
                obs_positions: Tensor | None = None, n_lines: int = 5, channel: int = 0,
                interval: float = 0.9) -> Figure:
    """One window's posterior samples against the truth and the observations.

    For 1-D states: the truth, the sample mean, the central ``interval`` band and ``n_lines`` samples over the
    cells, and the last observation time of ``y`` as points (at ``obs_positions``, or at the cells when the
    observations have the state's shape). For 2-D states (``(H, W)`` or ``(C, H, W)``, channel ``channel``): images
    of the truth, the mean, the standard deviation and the last observations (blank where missing).

    Args:
        samples: ``(n, *state_shape)`` samples of one window.
        truth: ``(*state_shape)``.
        y: ``(T, *obs_shape)`` observations of the window; mask: ``(T, *obs_shape)``.
        obs_positions: ``(M,)`` cell of each observed value of a 1-D state (e.g. station positions).
        n_lines: samples drawn as lines (1-D).
        channel: channel shown for ``(C, H, W)`` states.
        interval: probability of the band (1-D).

    Returns:
        The figure.
    """
    if not isinstance(samples, Tensor) or samples.dim() < 2 or samples.dim() > 4:
        raise ValueError(f"samples must be (n, K), (n, H, W) or (n, C, H, W), got "
                         f"{tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__}")
    s = samples.detach().cpu().double()
    state_shape = tuple(s.shape[1:])
    if truth is not None and tuple(truth.shape) != state_shape:
        raise ValueError(f"truth must have the state shape {state_shape}, got {tuple(truth.shape)}")
    tr = None if truth is None else truth.detach().cpu().double()
    obs = _obs_for_state(y, mask, state_shape)
    if s.dim() == 2:
        fig, (ax,) = _axes(None, size=(8.0, 3.4))
        cells = np.arange(state_shape[0])
        q = torch.quantile(s, torch.tensor([(1 - interval) / 2, (1 + interval) / 2], dtype=s.dtype), dim=0)
        ax.fill_between(cells, q[0].numpy(), q[1].numpy(), color="C0", alpha=0.25, label=f"{interval:.0%} interval")
        for i in range(min(n_lines, s.shape[0])):
            ax.plot(cells, s[i].numpy(), color="C0", lw=0.5, alpha=0.6, label="samples" if i == 0 else None)
        ax.plot(cells, s.mean(0).numpy(), color="C0", lw=1.5, label="posterior mean")
        if tr is not None:
            ax.plot(cells, tr.numpy(), color="k", lw=1.5, label="truth")
        if y is not None:
            yl = torch.as_tensor(y).detach().cpu().double()[-1]
            ml = torch.ones_like(yl, dtype=torch.bool) if mask is None else torch.as_tensor(mask).bool().cpu()[-1]
            if obs is not None:
                ax.plot(cells, obs, "o", color="C3", ms=4, label="observations (last time)")
            elif obs_positions is not None and len(obs_positions) == yl.numel():
                pos = torch.as_tensor(obs_positions).cpu().numpy()
                ax.plot(pos[ml.numpy()], yl[ml].numpy(), "o", color="C3", ms=4, label="observations (last time)")
        ax.set(xlabel="cell", ylabel="state", xlim=(0, state_shape[0] - 1))
        ax.legend(fontsize="small", ncol=3)
        return fig
    pick = (lambda a: a[channel]) if s.dim() == 4 else (lambda a: a)
    panels = [("truth", None if tr is None else pick(tr).numpy()), ("posterior mean", pick(s.mean(0)).numpy()),
              ("posterior std", pick(s.std(0)).numpy())]
    if obs is not None:
        panels.append(("observations (last time)", pick(torch.from_numpy(obs)).numpy()))
    panels = [(t, a) for t, a in panels if a is not None]
    fig, axes = _axes(None, ncols=len(panels), size=(3.2, 3.2))
    shared = [a for t, a in panels if t != "posterior std"]
    vmin = min(np.nanmin(a) for a in shared)
    vmax = max(np.nanmax(a) for a in shared)
    for ax, (title, a) in zip(axes, panels):
        kw = {} if title == "posterior std" else {"vmin": vmin, "vmax": vmax}
        im = ax.imshow(a, origin="lower", cmap="magma" if title == "posterior std" else "RdBu_r", **kw)
        ax.set(title=title, xticks=[], yticks=[])
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig

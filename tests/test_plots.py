"""Figures of the diagnostics build with the Agg backend and draw what they should."""

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from sbida import diagnostics as dg  # noqa: E402
from sbida.report import binomial_band, plot_coverage, plot_sbc, plot_spectrum, plot_tarp, plot_window  # noqa: E402


@pytest.fixture(scope="module")
def results():
    g = torch.Generator().manual_seed(0)
    mu = 3 * torch.randn(300, 6, generator=g)
    truth = mu + torch.randn(300, 6, generator=g)
    good = mu + torch.randn(500, 300, 6, generator=g)  # the truth and the samples from one distribution
    narrow = mu + 0.3 * torch.randn(500, 300, 6, generator=g)
    return {name: (dg.expected_coverage(s, truth), dg.sbc(s, truth), dg.tarp(s, truth))
            for name, s in (("good", good), ("narrow", narrow))}


def test_binomial_band_contains_level():
    levels = np.linspace(0.05, 0.95, 19)
    lo, hi = binomial_band(levels, 1000)
    assert (lo < levels).all() and (hi > levels).all() and (hi - lo < 0.07).all()
    lo2, hi2 = binomial_band(levels, 100)
    assert ((hi2 - lo2) > (hi - lo)).all()


def test_plot_coverage(results):
    fig = plot_coverage(results["good"][0])
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.lines) == 2  # diagonal + one curve
    assert np.allclose(ax.lines[1].get_xdata(), results["good"][0].levels.numpy())
    assert len(ax.collections) == 1  # the band
    fig = plot_coverage({k: v[0] for k, v in results.items()}, marginal=True, band=0)
    ax = fig.axes[0]
    assert len(ax.lines) == 5 and len(ax.collections) == 0
    assert any("narrow" in t.get_text() for t in ax.get_legend().get_texts())
    fig.savefig(__import__("io").BytesIO(), format="png")
    # the distance curve beside a highest-density one (none for a result measured by distance already)
    hpd = dg.CoverageResult.from_credibility(torch.rand(300, generator=torch.Generator().manual_seed(2)), "hpd",
                                             distance_credibility=torch.rand(300))
    ax = plot_coverage({"hpd": hpd, "good": results["good"][0]}, distance=True, band=0).axes[0]
    assert len(ax.lines) == 4 and ax.lines[2].get_linestyle() == "-."
    assert np.allclose(ax.lines[2].get_ydata(), hpd.distance.numpy())


def test_plot_spectrum():
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(200, 16, generator=g)
    truth = mu + torch.randn(200, 16, generator=g)
    _, good = dg.spread_skill_spectrum(mu + torch.randn(64, 200, 16, generator=g), truth)
    _, narrow = dg.spread_skill_spectrum(mu + 0.5 * torch.randn(64, 200, 16, generator=g), truth)
    fig = plot_spectrum({"good": good, "narrow": narrow.tolist()})
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # the line at 1 and two spectra
    assert np.allclose(ax.lines[2].get_ydata(), narrow.numpy()) and list(ax.lines[2].get_xdata()) == list(range(9))
    assert ax.get_ylim()[0] == 0 and ax.get_ylim()[1] >= 1.2
    fig.savefig(__import__("io").BytesIO(), format="png")
    with pytest.raises(ValueError, match="1-D"):
        plot_spectrum({"bad": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="at least one"):
        plot_spectrum({})


def test_plot_sbc_and_tarp(results):
    for kind in ("ecdf", "hist"):
        fig = plot_sbc({k: v[1] for k, v in results.items()}, kind=kind)
        assert isinstance(fig, Figure) and len(fig.axes) == 1
    ecdf_ax = plot_sbc(results["good"][1]).axes[0]
    diff = ecdf_ax.lines[-1].get_ydata()
    assert diff[0] == pytest.approx(0) and diff[-1] == pytest.approx(0) and np.abs(diff).max() < 0.1
    with pytest.raises(ValueError, match="kind"):
        plot_sbc(results["good"][1], kind="pie")
    fig = plot_tarp({k: v[2] for k, v in results.items()})
    assert len(fig.axes[0].lines) == 3
    with pytest.raises(ValueError, match="TARPResult"):
        plot_tarp(results["good"][0])


def test_plot_window_1d_and_2d():
    g = torch.Generator().manual_seed(1)
    s, x = torch.randn(100, 16, generator=g), torch.randn(16, generator=g)
    y, m = torch.randn(3, 16, generator=g), torch.rand(3, 16, generator=g) > 0.5
    ax = plot_window(s, x, y, m, n_lines=3).axes[0]
    labels = [line.get_label() for line in ax.lines]
    assert "truth" in labels and "posterior mean" in labels and "observations (last time)" in labels
    obs = ax.lines[labels.index("observations (last time)")]
    assert np.isfinite(obs.get_ydata()).sum() == m[-1].sum()
    # stations: observations placed at given positions
    ax = plot_window(s, x, torch.randn(2, 4), torch.ones(2, 4, dtype=torch.bool), obs_positions=torch.arange(0, 16, 4)
                     ).axes[0]
    assert list(ax.lines[-1].get_xdata()) == [0, 4, 8, 12]
    # 2-D (C, H, W): truth, mean, std, observations
    s2, x2 = torch.randn(50, 2, 8, 8), torch.randn(2, 8, 8)
    y2, m2 = torch.randn(4, 2, 8, 8), torch.rand(4, 2, 8, 8) > 0.7
    fig = plot_window(s2, x2, y2, m2, channel=1)
    images = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in images] == ["truth", "posterior mean", "posterior std", "observations (last time)"]
    assert np.allclose(images[0].images[0].get_array(), x2[1].numpy())
    with pytest.raises(ValueError, match="state shape"):
        plot_window(s, torch.randn(5))

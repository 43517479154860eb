"""Reports of the diagnostics: figures (:mod:`sbida.report.plots`)."""

from .plots import binomial_band, plot_coverage, plot_sbc, plot_tarp, plot_window

__all__ = ["binomial_band", "plot_coverage", "plot_sbc", "plot_tarp", "plot_window"]

"""Reports of the diagnostics: figures (:mod:`sbida.report.plots`) and the HTML report (:mod:`sbida.report.html`)."""

from .html import draw_examples, metrics_table, render, write
from .plots import binomial_band, plot_coverage, plot_sbc, plot_spectrum, plot_tarp, plot_window

__all__ = ["binomial_band", "plot_coverage", "plot_sbc", "plot_tarp", "plot_spectrum", "plot_window", "write", "render",
           "draw_examples", "metrics_table"]

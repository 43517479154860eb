"""Diagnostics of posteriors over states: calibration (coverage, SBC, TARP), two-sample tests, scores, arviz.

Every function takes a :class:`~sbida.posterior.Posterior` or its samples ``(n, B, *state_shape)`` with the truths
``(B, *state_shape)``; :func:`evaluate` runs all of them over a dataset of windows.
"""

from .c2st import c2st
from .coverage import (
    CoverageResult,
    central_credibility,
    coverage_curve,
    coverage_noise,
    default_levels,
    distance_credibility,
    expected_coverage,
    hpd_credibility,
    scaled_gaussian_coverage,
)
from .evaluate import EvaluationResult, as_posterior_fn, evaluate
from .inference_data import to_inference_data
from .sbc import SBCResult, rank_bins, sbc, sbc_ranks
from .scores import (
    climatological_std,
    crps,
    energy_score,
    nrmse,
    rmse,
    spread,
    spread_skill,
    spread_skill_spectrum,
)
from .tarp import TARPResult, tarp, tarp_credibility, tarp_curve, tarp_references

__all__ = [
    "CoverageResult", "expected_coverage", "coverage_curve", "coverage_noise", "default_levels", "hpd_credibility",
    "distance_credibility", "central_credibility", "scaled_gaussian_coverage",
    "SBCResult", "sbc", "sbc_ranks", "rank_bins",
    "TARPResult", "tarp", "tarp_credibility", "tarp_curve", "tarp_references",
    "c2st",
    "rmse", "nrmse", "climatological_std", "crps", "energy_score", "spread", "spread_skill",
    "spread_skill_spectrum",
    "to_inference_data",
    "EvaluationResult", "evaluate", "as_posterior_fn",
]

r"""Simulation-based calibration: ranks of the truth among posterior samples, per variable.

For window :math:`b` and variable :math:`d`, the rank of the truth among ``n`` posterior samples is

.. math:: r_{bd} = \#\{i : x^{(i)}_{bd} < x_{bd}\} \in \{0, \dots, n\},

uniform on :math:`\{0, \dots, n\}` when the posterior is calibrated (Talts et al., 2018). Uniformity is tested per
variable with the Kolmogorov-Smirnov test of sbi (``check_uniformity_frequentist``); the variables' p-values are
combined with the Bonferroni bound :math:`p = \min(1, D \min_d p_d)`. With :math:`u = (r + \tfrac12) / (n + 1)`,
the mean of :math:`u - \tfrac12` shows bias (positive: the posterior sits below the truth) and its standard deviation
against that of uniform ranks, :math:`\sqrt{(1 - (n + 1)^{-2}) / 12}`, shows dispersion (larger: over-confident, a
U-shaped histogram); both are exactly 0 and 1 in expectation for a calibrated posterior, whatever :math:`n`.

The histogram bins the :math:`n + 1` possible ranks; a bin holds a whole number :math:`k_j` of them, so where
:math:`n + 1` is not a multiple of the bin count, bins hold unequal numbers of ranks, and each bin's count is scaled
by :math:`(n + 1) / (\text{bins}\, k_j)`: flat at :math:`N / \text{bins}` for a calibrated posterior.

The ranks are computed with one tensor comparison over all windows and variables (sbi's ``run_sbc`` loops over
windows in Python; the test suite checks that both give the same ranks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..posterior import Posterior
from ._checks import check_samples, check_truth, draw, flat

__all__ = ["SBCResult", "rank_bins", "sbc", "sbc_ranks"]


def rank_bins(n_samples: int, bins: int) -> tuple[Tensor, Tensor]:
    """The bins of the ``n + 1`` possible ranks among ``n`` samples (by ``(r + 1/2) / (n + 1)`` in ``[0, 1]``).

    Returns:
        ``(bin of each rank (n + 1,), number of ranks in each bin (bins,))``, both long; ``bins <= n + 1``.
    """
    if not 1 <= bins <= n_samples + 1:
        raise ValueError(f"need 1 <= bins <= n + 1 = {n_samples + 1}, got {bins}")
    r = torch.arange(n_samples + 1, dtype=torch.float64)
    which = ((r + 0.5) / (n_samples + 1) * bins).floor().long().clamp(max=bins - 1)
    return which, torch.bincount(which, minlength=bins)


def sbc_ranks(samples: Tensor, truth: Tensor) -> Tensor:
    """Rank of each variable of the truth among the samples.

    Args:
        samples: ``(n, B, *state_shape)``.
        truth: ``(B, *state_shape)``.

    Returns:
        ``(B, D)`` integer ranks in ``0..n`` (``D = prod(state_shape)``).
    """
    truth = check_truth(truth)
    samples = check_samples(samples, truth)
    return (flat(samples, 2) < flat(truth, 1)).sum(0)


@dataclass
class SBCResult:
    """Rank statistics of a posterior.

    Attributes:
        n_samples: samples the ranks were taken among.
        n_windows: number of windows.
        ks_pvalues: ``(D,)`` Kolmogorov-Smirnov p-values of uniformity, one per variable.
        p_value: Bonferroni-combined p-value ``min(1, D min_d p_d)``.
        bias: mean of ``(rank + 1/2) / (n + 1) - 1/2`` over windows and variables (0 when calibrated).
        dispersion: standard deviation of ``(rank + 1/2) / (n + 1)`` over that of uniform ranks (1 when calibrated,
            above 1 for over-confident posteriors).
        histogram: ``(bins,)`` counts of the ranks (:func:`rank_bins`) pooled over variables and divided by ``D``
            (the average histogram of one variable), each scaled to ``(n + 1) / bins`` ranks per bin: ``N / bins``
            expected in every bin when calibrated. ``bins`` is at most ``n + 1``.
        ranks: ``(B, D)`` ranks (not serialized).
    """

    n_samples: int
    n_windows: int
    ks_pvalues: Tensor
    p_value: float
    bias: float
    dispersion: float
    histogram: Tensor
    ranks: Tensor | None = field(default=None, repr=False)

    def flagged(self, alpha: float = 0.05) -> bool:
        """Whether uniformity is rejected at level ``alpha`` (after the Bonferroni correction)."""
        return self.p_value < alpha

    @classmethod
    def from_ranks(cls, ranks: Tensor, n_samples: int, bins: int = 20) -> SBCResult:
        """Test the uniformity of ranks ``(B, D)`` taken among ``n_samples`` samples."""
        from sbi.diagnostics.sbc import check_uniformity_frequentist

        if ranks.dim() != 2 or ranks.shape[0] < 1:
            raise ValueError(f"ranks must be (B, D) with B >= 1, got shape {tuple(ranks.shape)}")
        if ranks.min() < 0 or ranks.max() > n_samples:
            raise ValueError(f"ranks must lie in 0..{n_samples}, got values in {int(ranks.min())}..{int(ranks.max())}")
        D = ranks.shape[1]
        pvals = check_uniformity_frequentist(ranks.double(), n_samples).double()
        u = (ranks.double() + 0.5) / (n_samples + 1)
        uniform_std = math.sqrt((1 - (n_samples + 1) ** -2) / 12)
        which, per_bin = rank_bins(n_samples, min(bins, n_samples + 1))
        counts = torch.bincount(which[ranks.flatten().long()], minlength=len(per_bin)).double() / D
        hist = counts * (n_samples + 1) / (len(per_bin) * per_bin.double())
        return cls(int(n_samples), int(ranks.shape[0]), pvals, float(min(1.0, D * float(pvals.min()))),
                   float(u.mean() - 0.5), float(u.std() / uniform_std), hist, ranks)

    def to_dict(self) -> dict:
        """A JSON-ready dictionary (without the ranks)."""
        return {"n_samples": self.n_samples, "n_windows": self.n_windows, "ks_pvalues": self.ks_pvalues.tolist(),
                "p_value": self.p_value, "bias": self.bias, "dispersion": self.dispersion,
                "histogram": self.histogram.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> SBCResult:
        """Inverse of :meth:`to_dict`."""
        return cls(d["n_samples"], d["n_windows"], torch.tensor(d["ks_pvalues"], dtype=torch.float64), d["p_value"],
                   d["bias"], d["dispersion"], torch.tensor(d["histogram"], dtype=torch.float64))


def sbc(posterior_or_samples: Posterior | Tensor, truth: Tensor, n_samples: int = 1000, bins: int = 20,
        generator: torch.Generator | None = None) -> SBCResult:
    """Simulation-based calibration of a posterior over a batch of windows.

    Args:
        posterior_or_samples: a :class:`~sbida.posterior.Posterior` over ``B`` windows, or samples
            ``(n, B, *state_shape)``.
        truth: ``(B, *state_shape)`` true states.
        n_samples: samples drawn when a posterior is given.
        bins: bins of the stored rank histogram.
        generator: random generator of the samples.

    Returns:
        An :class:`SBCResult`.
    """
    samples, _ = draw(posterior_or_samples, truth, n_samples, generator)
    return SBCResult.from_ranks(sbc_ranks(samples, truth), samples.shape[0], bins)

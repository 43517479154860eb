r"""TARP: tests of accuracy with random points (Lemos et al., 2023).

Each window :math:`b` gets a random reference point :math:`r_b` (uniform in the box spanned by the truths, sbi's
``get_tarp_references``). The ball around :math:`r_b` through the truth holds a fraction

.. math:: f_b = \frac1n \sum_i \mathbb{1}\big[\lVert x^{(i)}_b - r_b \rVert < \lVert x_b - r_b \rVert\big]

of the posterior samples, and the expected coverage probability is the empirical CDF of :math:`f`,
:math:`\mathrm{ECP}(\alpha) = \frac1B \sum_b \mathbb{1}[f_b < \alpha]`, on a grid of levels :math:`\alpha`. A
calibrated posterior gives the diagonal. As in sbi, states are first scaled to the unit box of the truths
(``z_score``). The summary statistics, the area between the curve and the diagonal for :math:`\alpha > 1/2` (ATC)
and the Kolmogorov-Smirnov p-value between the two curves, come from sbi's ``check_tarp``.

The credibilities :math:`f_b` are computed per batch of windows (so that the samples of all windows need not be held
at once); the test suite checks the curve against sbi's ``_run_tarp`` on the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..posterior import Posterior
from ._checks import check_truth, draw, flat

__all__ = ["TARPResult", "tarp", "tarp_references", "tarp_credibility", "tarp_curve"]


def tarp_references(truth: Tensor, seed: int = 0) -> Tensor:
    """Reference points drawn uniformly in the box of the truths (sbi's ``get_tarp_references``), reproducibly.

    Args:
        truth: ``(B, *state_shape)``.
        seed: seed of the draw (the caller's random state is left untouched).

    Returns:
        ``(B, D)`` reference points.
    """
    from sbi.diagnostics.tarp import get_tarp_references

    x = flat(check_truth(truth), 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_tarp_references(x)


def tarp_credibility(samples: Tensor, truth: Tensor, references: Tensor, lo: Tensor | None = None,
                     hi: Tensor | None = None) -> Tensor:
    """Fraction of samples closer to each window's reference than its truth.

    Args:
        samples: ``(n, B, *state_shape)``.
        truth: ``(B, *state_shape)``.
        references: ``(B, D)`` reference points.
        lo, hi: ``(D,)`` bounds of the box to scale to the unit box (no scaling when ``None``).

    Returns:
        ``(B,)`` credibilities ``f_b``.
    """
    s, x = flat(samples, 2), flat(truth, 1)
    if references.shape != x.shape:
        raise ValueError(f"references must be (B, D) = {tuple(x.shape)}, got {tuple(references.shape)}")
    r, x = references.to(s.dtype), x.to(s.dtype)
    # distances in the unit box: sum_d ((s_d - r_d) / width_d)^2, without rescaling the samples
    w = torch.ones(x.shape[-1], dtype=s.dtype, device=s.device) if lo is None or hi is None else \
        (hi - lo + 1e-10).to(s.dtype).reciprocal().square()
    d_s = (s - r).square_() @ w
    d_x = (x - r).square() @ w
    return (d_s < d_x).double().mean(0)


def tarp_curve(credibility: Tensor, num_bins: int | None = None, alpha: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Expected coverage probability of TARP: the empirical CDF of the credibilities.

    Args:
        credibility: ``(B,)`` values ``f_b``.
        num_bins: number of intervals of the grid ``alpha = 0, 1/num_bins, ..., 1`` (default ``max(B // 10, 10)``).
        alpha: an explicit grid ``(A,)`` instead.

    Returns:
        ``ecp`` ``(A,)`` and ``alpha`` ``(A,)``.
    """
    f = credibility.double()
    if alpha is None:
        bins = num_bins if num_bins is not None else max(f.shape[0] // 10, 10)
        alpha = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    alpha = torch.as_tensor(alpha, dtype=torch.float64)
    ecp = (f.unsqueeze(0) < alpha.unsqueeze(1)).double().mean(1)
    ecp[alpha >= 1] = 1.0
    return ecp, alpha


@dataclass
class TARPResult:
    """TARP expected coverage.

    Attributes:
        alpha: ``(A,)`` credibility grid from 0 to 1.
        ecp: ``(A,)`` expected coverage probability.
        atc: area between ``ecp`` and the diagonal for ``alpha >= 1/2`` (sbi's ``check_tarp``; below 0:
            over-confident, above 0: under-confident).
        ks_pvalue: Kolmogorov-Smirnov p-value between ``ecp`` and ``alpha`` (sbi's ``check_tarp``).
        n_windows: number of windows.
        credibility: ``(B,)`` the ``f_b`` (not serialized).
    """

    alpha: Tensor
    ecp: Tensor
    atc: float
    ks_pvalue: float
    n_windows: int
    credibility: Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_credibility(cls, credibility: Tensor, num_bins: int | None = None) -> TARPResult:
        """Curve and summaries from credibilities ``(B,)``."""
        from sbi.diagnostics.tarp import check_tarp

        ecp, alpha = tarp_curve(credibility, num_bins)
        atc, ks = check_tarp(ecp, alpha)
        return cls(alpha, ecp, float(atc), float(ks), int(credibility.shape[0]), credibility)

    @property
    def ece(self) -> float:
        """Mean absolute gap between the curve and the diagonal."""
        return float((self.ecp - self.alpha).abs().mean())

    def to_dict(self) -> dict:
        """A JSON-ready dictionary (without the credibilities)."""
        return {"alpha": self.alpha.tolist(), "ecp": self.ecp.tolist(), "atc": self.atc, "ks_pvalue": self.ks_pvalue,
                "n_windows": self.n_windows, "ece": self.ece}

    @classmethod
    def from_dict(cls, d: dict) -> TARPResult:
        """Inverse of :meth:`to_dict`."""
        t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
        return cls(t(d["alpha"]), t(d["ecp"]), d["atc"], d["ks_pvalue"], d["n_windows"])


def tarp(posterior_or_samples: Posterior | Tensor, truth: Tensor, references: Tensor | None = None,
         n_samples: int = 1000, num_bins: int | None = None, z_score: bool = True, seed: int = 0,
         generator: torch.Generator | None = None) -> TARPResult:
    """TARP expected coverage of a posterior over a batch of windows.

    Args:
        posterior_or_samples: a :class:`~sbida.posterior.Posterior` over ``B`` windows, or samples
            ``(n, B, *state_shape)``.
        truth: ``(B, *state_shape)`` true states.
        references: ``(B, D)`` reference points (default: :func:`tarp_references` with ``seed``).
        n_samples: samples drawn when a posterior is given.
        num_bins: intervals of the ``alpha`` grid (default ``max(B // 10, 10)``).
        z_score: scale states to the unit box of the truths first (as sbi's ``run_tarp``).
        seed: seed of the reference points.
        generator: random generator of the samples.

    Returns:
        A :class:`TARPResult`.
    """
    samples, _ = draw(posterior_or_samples, truth, n_samples, generator)
    x = flat(truth, 1)
    refs = tarp_references(truth, seed) if references is None else references
    lo, hi = (x.min(0).values, x.max(0).values) if z_score else (None, None)
    return TARPResult.from_credibility(tarp_credibility(samples, truth, refs, lo, hi), num_bins)

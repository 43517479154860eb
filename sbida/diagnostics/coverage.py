r"""Expected coverage of credible regions.

For window :math:`b` with truth :math:`x_b` and posterior :math:`q_b`, a family of nested credible regions gives a
*credibility* :math:`c_b \in [0, 1]`: the smallest level whose region holds the truth. The expected coverage at
level :math:`\alpha` is the fraction of windows whose truth lies in the region of level :math:`\alpha`,

.. math:: \mathrm{C}(\alpha) = \frac1B \sum_b \mathbb{1}[c_b < \alpha],

which equals :math:`\alpha` for a calibrated posterior. Three families of regions, all estimated from ``n`` samples
:math:`x^{(i)}_b \sim q_b`:

- highest density (``"hpd"``, where the posterior has ``log_prob``):
  :math:`c_b = \frac1n \sum_i \mathbb{1}[\log q_b(x^{(i)}_b) > \log q_b(x_b)]`;
- a ball around the posterior mean in the standardized distance (``"distance"``, for samples only):
  :math:`d(x) = \lVert (x - \bar x_b) / s_b \rVert_2` with the sample mean :math:`\bar x_b` and marginal standard
  deviations :math:`s_b`, and :math:`c_b = \frac1n \sum_i \mathbb{1}[d(x^{(i)}_b) < d(x_b)]`;
- central intervals of each variable (the *marginal* coverage): with the rank
  :math:`r_{bd} = \#\{i : x^{(i)}_{bd} < x_{bd}\}`, :math:`c_{bd} = |2u_{bd} - 1|` and
  :math:`u_{bd} = (r_{bd} + \tfrac12) / (n + 1)`.

Summaries: the expected calibration error :math:`\mathrm{ECE} = \operatorname{mean}_\alpha |\mathrm{C}(\alpha) -
\alpha|` and the largest gap :math:`\max_\alpha |\mathrm{C}(\alpha) - \alpha|`. Coverage under the diagonal means
over-confident (too narrow) posteriors, above it under-confident ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..posterior import Posterior
from ._checks import check_truth, draw, flat

__all__ = [
    "CoverageResult",
    "expected_coverage",
    "coverage_curve",
    "hpd_credibility",
    "distance_credibility",
    "central_credibility",
    "default_levels",
    "scaled_gaussian_coverage",
    "coverage_noise",
]


def default_levels() -> Tensor:
    """Credibility levels 0.05, 0.10, ..., 0.95 ``(19,)`` in float64."""
    return torch.linspace(0.05, 0.95, 19, dtype=torch.float64)


@dataclass
class CoverageResult:
    """Expected coverage at a set of levels.

    Attributes:
        levels: ``(L,)`` credibility levels.
        coverage: ``(L,)`` joint coverage (highest density or distance regions, see ``method``).
        ece: mean absolute gap between ``coverage`` and ``levels``.
        max_gap: largest absolute gap.
        method: ``"hpd"`` or ``"distance"``.
        n_windows: number of windows it was measured on.
        marginal: ``(L,)`` coverage of per-variable central intervals, averaged over variables (or ``None``).
        marginal_ece: ECE of ``marginal``.
        distance: ``(L,)`` joint coverage of the distance regions (``None`` where not computed): the same statistic
            for every estimator, with or without ``log_prob``, so that it compares them. A fit of a spread factor or
            tails by the likelihood of held-out truths calibrates the highest density regions of a Gaussian or
            Student-t by construction (they depend on the Mahalanobis distance only) and says nothing of the
            shape of its covariance; the distance regions (marginal variances) do.
        distance_ece: ECE of ``distance``.
        ece_noise: the ECE that sampling noise alone gives a calibrated posterior on these windows
            (:func:`coverage_noise`, by trajectory where the trajectories were given), for the curve ``coverage``;
            an ``ece`` near it is consistent with calibration. ``None`` for windows of a single trajectory.
        distance_ece_noise: the same for ``distance``.
    """

    levels: Tensor
    coverage: Tensor
    ece: float
    max_gap: float
    method: str
    n_windows: int
    marginal: Tensor | None = None
    marginal_ece: float | None = None
    distance: Tensor | None = None
    distance_ece: float | None = None
    ece_noise: float | None = None
    distance_ece_noise: float | None = None

    @classmethod
    def from_credibility(cls, credibility: Tensor, method: str, levels: Tensor | None = None,
                         marginal_credibility: Tensor | None = None,
                         distance_credibility: Tensor | None = None,
                         groups: Tensor | None = None) -> CoverageResult:
        """Build the result from credibilities ``(B,)``, optional marginal credibilities ``(B, D)`` and optional
        distance credibilities ``(B,)`` (``credibility`` itself where ``method`` is ``"distance"``); ``groups``
        ``(B,)``: the windows' trajectories, for the noise figures (default: independent windows)."""
        levels = _checked_levels(levels)
        cov = coverage_curve(credibility, levels)
        gap = (cov - levels).abs()
        noise = _known(coverage_noise(credibility, groups, levels)[1])
        marginal = marginal_ece = distance = distance_ece = distance_noise = None
        if marginal_credibility is not None:
            marginal = coverage_curve(marginal_credibility, levels).mean(-1)
            marginal_ece = float((marginal - levels).abs().mean())
        if method == "distance":
            distance, distance_ece, distance_noise = cov, float(gap.mean()), noise
        elif distance_credibility is not None:
            distance = coverage_curve(distance_credibility, levels)
            distance_ece = float((distance - levels).abs().mean())
            distance_noise = _known(coverage_noise(distance_credibility, groups, levels)[1])
        return cls(levels, cov, float(gap.mean()), float(gap.max()), method, int(credibility.shape[0]), marginal,
                   marginal_ece, distance, distance_ece, noise, distance_noise)

    def to_dict(self) -> dict:
        """A JSON-ready dictionary."""
        return {"levels": self.levels.tolist(), "coverage": self.coverage.tolist(), "ece": self.ece,
                "max_gap": self.max_gap, "method": self.method, "n_windows": self.n_windows,
                "marginal": None if self.marginal is None else self.marginal.tolist(),
                "marginal_ece": self.marginal_ece,
                "distance": None if self.distance is None else self.distance.tolist(),
                "distance_ece": self.distance_ece, "ece_noise": self.ece_noise,
                "distance_ece_noise": self.distance_ece_noise}

    @classmethod
    def from_dict(cls, d: dict) -> CoverageResult:
        """Inverse of :meth:`to_dict`."""
        t = lambda v: None if v is None else torch.tensor(v, dtype=torch.float64)  # noqa: E731
        return cls(t(d["levels"]), t(d["coverage"]), d["ece"], d["max_gap"], d["method"], d["n_windows"],
                   t(d.get("marginal")), d.get("marginal_ece"), t(d.get("distance")), d.get("distance_ece"),
                   d.get("ece_noise"), d.get("distance_ece_noise"))


def _checked_levels(levels: Tensor | None) -> Tensor:
    """``levels`` as float64 ``(L,)`` (default :func:`default_levels`), after checking they lie in (0, 1)."""
    levels = default_levels() if levels is None else torch.as_tensor(levels, dtype=torch.float64)
    if levels.dim() != 1 or not ((levels > 0) & (levels < 1)).all():
        raise ValueError(f"levels must be a 1-D tensor of values in (0, 1), got {levels}")
    return levels


def coverage_curve(credibility: Tensor, levels: Tensor | None = None) -> Tensor:
    """Fraction of windows with credibility below each level.

    Args:
        credibility: ``(B, ...)`` credibilities in ``[0, 1]``.
        levels: ``(L,)`` levels (default :func:`default_levels`).

    Returns:
        ``(L, ...)`` coverage.
    """
    levels = _checked_levels(levels)
    c = credibility.to(torch.float64)
    return (c.unsqueeze(0) < levels.view(-1, *([1] * c.dim()))).double().mean(1)


def _known(value: float) -> float | None:
    return None if math.isnan(value) else value


def coverage_noise(credibility: Tensor, groups: Tensor | None = None, levels: Tensor | None = None,
                   n_boot: int = 500, seed: int = 0) -> tuple[Tensor, float]:
    r"""Sampling noise of a coverage curve and the ECE that this noise alone gives a calibrated posterior.

    Windows of one trajectory are correlated, so a coverage curve measured on ``B`` windows of ``G`` trajectories
    is as noisy as one on far fewer independent windows. The curve is resampled by trajectory (a block bootstrap:
    ``G`` groups drawn with replacement, each with all its windows), which gives the standard error
    :math:`\sigma_\alpha` of the coverage at each level. A calibrated posterior's curve then misses the diagonal by
    about :math:`|\mathcal N(0, \sigma_\alpha^2)|` at each level, so its expected ECE is
    :math:`\sqrt{2/\pi}\,\overline{\sigma_\alpha}`: an ECE near that figure is what calibration looks like on
    these windows, and one of several times it is not. The errors are estimated from the credibilities at hand,
    which is close to the calibrated case for a posterior near calibration; for a far-off one whose curve is flat (every
    truth outside every region) they are 0.

    Args:
        credibility: ``(B,)`` credibilities in ``[0, 1]`` (e.g. :func:`hpd_credibility`).
        groups: ``(B,)`` integer labels of the windows' trajectories (default: every window its own group, for
            independent windows).
        levels: ``(L,)`` levels (default :func:`default_levels`).
        n_boot: bootstrap resamples (``>= 2``).
        seed: seed of the resampling.

    Returns:
        ``(se, ece_noise)``: the standard errors ``(L,)`` (float64) and :math:`\sqrt{2/\pi}` times their mean; NaN
        where all windows come from one group (one trajectory tells nothing of the spread between trajectories).
    """
    levels = _checked_levels(levels)
    c = torch.as_tensor(credibility).to(torch.float64)
    if c.dim() != 1 or c.numel() == 0:
        raise ValueError(f"credibility must be a non-empty 1-D tensor, got shape {tuple(c.shape)}")
    if int(n_boot) != n_boot or n_boot < 2:
        raise ValueError(f"n_boot must be an integer >= 2, got {n_boot}")
    if groups is None:
        label = torch.arange(c.numel())
    else:
        groups = torch.as_tensor(groups)
        if groups.shape != c.shape:
            raise ValueError(f"groups must have the shape of credibility {tuple(c.shape)}, got {tuple(groups.shape)}")
        label = torch.unique(groups, return_inverse=True)[1]
    G = int(label.max()) + 1
    if G < 2:
        return torch.full_like(levels, math.nan), math.nan
    hits = (c.unsqueeze(1) < levels).double()  # (B, L)
    per_group = torch.zeros(G, len(levels), dtype=torch.float64).index_add_(0, label, hits)
    size = torch.bincount(label, minlength=G).double()
    gen = torch.Generator().manual_seed(int(seed))
    curves = []
    chunk = max(1, 2**22 // G)  # resamples at a time: a (chunk, G) weight matrix of at most 2^22 values
    for i in range(0, int(n_boot), chunk):
        n = min(chunk, int(n_boot) - i)
        draws = torch.randint(G, (n, G), generator=gen)
        w = torch.zeros(n, G, dtype=torch.float64).scatter_add_(1, draws, torch.ones(n, G, dtype=torch.float64))
        curves.append((w @ per_group) / (w @ size).unsqueeze(1))
    se = torch.cat(curves).std(0)
    return se, math.sqrt(2 / math.pi) * float(se.mean())


def scaled_gaussian_coverage(scale: float, dim: int, levels: Tensor | None = None) -> Tensor:
    r"""Expected coverage of the highest-density regions of a Gaussian posterior whose covariance is ``scale**2``
    times the right one, in ``dim`` dimensions: what a given spread error does to the joint coverage.

    With the truth :math:`x \sim \mathcal N(\mu, \Sigma)` and the posterior :math:`\mathcal N(\mu, s^2 \Sigma)`,
    the region of level :math:`\alpha` is :math:`\{\lVert x - \mu \rVert^2_{\Sigma} \le s^2 F_D^{-1}(\alpha)\}`,
    so :math:`\mathrm C(\alpha) = F_D\big(s^2 F_D^{-1}(\alpha)\big)`, :math:`F_D` the CDF of :math:`\chi^2_D`.
    The same relative spread error costs more ECE in more dimensions: 8 % too narrow gives an ECE of 0.028 for one
    variable and 0.21 for 40, and an ECE of 0.03 on 40 variables allows about 1 %.

    Args:
        scale: :math:`s > 0` (below 1: over-confident).
        dim: :math:`D \ge 1`, the number of variables.
        levels: ``(L,)`` levels in (0, 1) (default :func:`default_levels`).

    Returns:
        ``(L,)`` coverage in float64; its ECE is ``(coverage - levels).abs().mean()``.
    """
    if not (scale > 0 and math.isfinite(scale)) or int(dim) != dim or dim < 1:
        raise ValueError(f"need scale > 0 and an integer dim >= 1, got scale={scale}, dim={dim}")
    levels = _checked_levels(levels)
    from scipy.stats import chi2  # imported here: scipy is slow to import

    return torch.as_tensor(chi2.cdf(scale**2 * chi2.ppf(levels.numpy(), dim), dim), dtype=torch.float64)


def hpd_credibility(log_prob_samples: Tensor, log_prob_truth: Tensor) -> Tensor:
    """Credibility of the truth under highest-density regions.

    Args:
        log_prob_samples: ``(n, B)`` log-densities of posterior samples.
        log_prob_truth: ``(B,)`` log-density of the truth.

    Returns:
        ``(B,)`` fraction of samples denser than the truth.
    """
    if log_prob_samples.dim() != 2 or log_prob_truth.shape != log_prob_samples.shape[1:]:
        raise ValueError(f"expected log-densities (n, B) and (B,), got {tuple(log_prob_samples.shape)} and "
                         f"{tuple(log_prob_truth.shape)}")
    if not torch.isfinite(log_prob_truth).all():
        raise ValueError("the log-density of the truth is not finite (the truth lies outside the posterior's support)")
    return (log_prob_samples > log_prob_truth).double().mean(0)


def distance_credibility(samples: Tensor, truth: Tensor) -> Tensor:
    """Credibility of the truth under balls around the sample mean in the standardized distance.

    Args:
        samples: ``(n, B, *state_shape)``.
        truth: ``(B, *state_shape)``.

    Returns:
        ``(B,)`` fraction of samples closer to the mean than the truth.
    """
    return moments_and_distance(flat(samples, 2), flat(truth, 1))[2]


def moments_and_distance(s: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sample mean ``(B, D)``, unbiased variance ``(B, D)`` and distance credibility ``(B,)`` of flat samples
    ``(n, B, D)`` and truths ``(B, D)`` (unchecked; one pass over the samples for all three)."""
    n = s.shape[0]
    mean = s.mean(0)
    sq = (s - mean).square_()
    var = sq.sum(0) / max(n - 1, 1)
    tiny = torch.finfo(s.dtype).tiny
    inv = 1 / var.clamp_min(tiny) if n > 1 else torch.ones_like(var)
    d_x = ((x - mean).square() * inv).sum(-1)
    if n > 2:
        # leave one out: sample i is measured against the mean and variance of the other n - 1 samples, as the truth
        # is against the samples (it is not among them); otherwise samples look closer than the truth by O(D / n)
        # and even the exact posterior over-covers (ECE 0.05 at n = 100, D = 32).
        # (s_i - m_{-i})^2 = (n / (n-1))^2 sq_i, and var_{-i} = ((n - 1) var - n / (n-1) sq_i) / (n - 2)
        r = n / (n - 1)
        var_loo = ((n - 1) * var - r * sq).div_(n - 2).clamp_min_(tiny)
        d_s = (r * r) * (sq / var_loo).sum(-1)
    else:
        d_s = torch.einsum("nbd,bd->nb", sq, inv)
    return mean, var, (d_s < d_x).double().mean(0)


def central_credibility(ranks: Tensor, n_samples: int) -> Tensor:
    """Credibility of the truth under per-variable central intervals, from ranks.

    Args:
        ranks: ``(B, D)`` number of samples below the truth, in ``0..n_samples``.
        n_samples: number of samples the ranks were taken among.

    Returns:
        ``(B, D)`` credibilities ``|2u - 1|`` with ``u = (rank + 1/2) / (n + 1)``.
    """
    u = (ranks.double() + 0.5) / (n_samples + 1)
    return (2 * u - 1).abs()


def expected_coverage(posterior_or_samples: Posterior | Tensor, truth: Tensor, levels: Tensor | None = None,
                      n_samples: int = 1000, method: str = "auto", generator: torch.Generator | None = None,
                      samples: Tensor | None = None, groups: Tensor | None = None) -> CoverageResult:
    """Expected coverage of a posterior (or of its samples) over a batch of windows.

    Args:
        posterior_or_samples: a :class:`~sbida.posterior.Posterior` over ``B`` windows, or samples
            ``(n, B, *state_shape)``.
        truth: ``(B, *state_shape)`` true states.
        levels: ``(L,)`` credibility levels in ``(0, 1)`` (default 0.05, ..., 0.95).
        n_samples: samples drawn when a posterior is given.
        method: ``"hpd"`` (needs ``log_prob``), ``"distance"``, or ``"auto"`` (``"hpd"`` where possible).
        generator: random generator of the samples.
        samples: ``(n, B, *state_shape)`` samples already drawn from the given posterior (then none are drawn).
        groups: ``(B,)`` the windows' trajectories, for ``ece_noise`` (default: independent windows).

    Returns:
        A :class:`CoverageResult` with the joint curve, the marginal (central interval) curve and the ECE that
        sampling noise alone would give a calibrated posterior on these windows.
    """
    if method not in ("auto", "hpd", "distance"):
        raise ValueError(f"method must be 'auto', 'hpd' or 'distance', got {method!r}")
    truth = check_truth(truth)
    if samples is not None and not isinstance(posterior_or_samples, Posterior):
        raise ValueError("give samples= only together with the posterior they were drawn from")
    if samples is not None:
        post = posterior_or_samples
        samples, _ = draw(samples, truth, n_samples, generator)
        if post.batch_size != truth.shape[0] or tuple(post.state_shape) != tuple(truth.shape[1:]):
            raise ValueError(f"the posterior is over {post.batch_size} windows of shape {post.state_shape}, the "
                             f"truth has shape {tuple(truth.shape)}")
    else:
        samples, post = draw(posterior_or_samples, truth, n_samples, generator)
    if method == "auto":
        method = "hpd" if post is not None and post.has_log_prob else "distance"
    if method == "hpd":
        if post is None or not post.has_log_prob:
            raise ValueError("method 'hpd' needs a posterior with log_prob; samples alone allow 'distance' only")
        cred = hpd_credibility(post.log_prob(samples), post.log_prob(truth))
    else:
        cred = distance_credibility(samples, truth)
    ranks = (flat(samples, 2) < flat(truth, 1)).sum(0)
    return CoverageResult.from_credibility(cred, method, levels, central_credibility(ranks, samples.shape[0]),
                                           groups=groups)



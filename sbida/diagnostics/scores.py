r"""Scores of a posterior's samples (an ensemble of ``M`` members) against the true states.

With members :math:`x^{(1..M)}_b` of window :math:`b`, their mean :math:`\bar x_b` and :math:`D` variables:

- RMSE of the mean, :math:`\sqrt{\frac{1}{BD}\sum_{b,d} (\bar x_{bd} - x_{bd})^2}`, and the nRMSE, the RMSE divided
  by the climatological standard deviation :math:`\sigma_c = \sqrt{\frac1D \sum_d \operatorname{Var}_b(x_{bd})}`
  (the spread of the truths themselves over the windows, unless given): 1 means no better than the climatology.
- CRPS in its fair ensemble form (Ferro, 2014), per variable then averaged over variables,

  .. math:: \mathrm{CRPS} = \frac1M \sum_i |x^{(i)} - x| - \frac{1}{2M(M-1)} \sum_{i \ne j} |x^{(i)} - x^{(j)}|,

  an unbiased estimate of the CRPS of the distribution the members are drawn from; the pair sum is computed from
  the sorted members, :math:`\sum_{i,j}|x^{(i)} - x^{(j)}| = 2\sum_k (2k - M - 1)\, x^{(k:M)}`.
- Energy score, :math:`\mathrm{ES} = \frac1M \sum_i \lVert x^{(i)} - x \rVert - \tfrac12 \mathbb{E}\lVert X - X'
  \rVert`, the second term estimated without bias from the pairs :math:`(x^{(i)}, x^{(i+s)})`, :math:`s = 1..S`
  (all pairs when :math:`S \ge M - 1`; by default :math:`S = 1`, the :math:`M - 1` consecutive pairs, which costs
  :math:`O(MD)` instead of :math:`O(M^2 D)`).
- Spread/skill: :math:`\sqrt{\frac{M+1}{M}}\,\mathrm{spread} / \mathrm{RMSE}` with the spread
  :math:`\sqrt{\frac{1}{BD}\sum_{b,d} s^2_{bd}}` from the unbiased member variances. For members and truth drawn
  from one distribution, :math:`\mathbb{E}(\bar x - x)^2 = \frac{M+1}{M}\sigma^2`, so the ratio is 1; below 1
  means over-confident.
- Spread/skill by scale (:func:`spread_skill_spectrum`): the same ratio for each wavenumber of the state's grid
  (Fourier modes of a periodic grid, radial wavenumbers on a 2-D grid), from the members' and the truth's
  departures from the ensemble mean. By Parseval's identity the bins add up to the overall ratio; a posterior can be
  calibrated on the whole and still too narrow at some scales and too wide at others, which no common inflation of
  the spread corrects.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ._checks import check_samples, check_truth, flat

__all__ = ["rmse", "nrmse", "climatological_std", "crps", "energy_score", "spread", "spread_skill",
           "spread_skill_spectrum"]


def _reduce(per_window: Tensor, reduction: str) -> Tensor | float:
    if reduction == "none":
        return per_window
    if reduction == "mean":
        return float(per_window.mean())
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _estimate(estimate: Tensor, truth: Tensor) -> Tensor:
    """The point estimate ``(B, *state_shape)``: ``estimate`` itself or the mean of samples ``(n, B, *state)``."""
    truth = check_truth(truth)
    if estimate.shape == truth.shape:
        if not torch.isfinite(estimate).all():
            raise ValueError("the estimate contains NaN or infinite values")
        return estimate
    return check_samples(estimate, truth).mean(0)


def rmse(estimate: Tensor, truth: Tensor, reduction: str = "mean") -> Tensor | float:
    """Root mean squared error of a point estimate (or of the mean of samples).

    Args:
        estimate: ``(B, *state_shape)`` estimates, or samples ``(n, B, *state_shape)`` (their mean is used).
        truth: ``(B, *state_shape)``.
        reduction: ``"mean"``: the RMSE over all windows and variables (a float); ``"none"``: per window ``(B,)``.
    """
    err = flat(_estimate(estimate, truth) - truth, 1).square().mean(-1)
    return _reduce(err, "none").sqrt() if reduction == "none" else math.sqrt(_reduce(err, reduction))


def climatological_std(truth: Tensor) -> float:
    """``sqrt(mean_d Var_b(truth_bd))``: the spread of the truths over windows, root-mean-squared over variables."""
    x = flat(check_truth(truth), 1)
    if x.shape[0] < 2:
        raise ValueError("the climatological std needs at least 2 windows")
    return float(x.var(0).mean().sqrt())


def nrmse(estimate: Tensor, truth: Tensor, clim_std: float | None = None) -> float:
    """RMSE divided by the climatological standard deviation (of ``truth`` unless ``clim_std`` is given).

    Args:
        estimate: ``(B, *state_shape)`` or samples ``(n, B, *state_shape)``.
        truth: ``(B, *state_shape)``.
        clim_std: climatological standard deviation (e.g. of a long trajectory).
    """
    c = climatological_std(truth) if clim_std is None else float(clim_std)
    if not c > 0:
        raise ValueError(f"the climatological std must be > 0, got {c}")
    return rmse(estimate, truth) / c


def crps(samples: Tensor, truth: Tensor, reduction: str = "mean") -> Tensor | float:
    """Fair ensemble CRPS, per variable and then averaged over variables.

    Args:
        samples: ``(M, B, *state_shape)`` with ``M >= 2``.
        truth: ``(B, *state_shape)``.
        reduction: ``"mean"`` (a float) or ``"none"`` (per window, averaged over variables, ``(B,)``).
    """
    truth = check_truth(truth)
    s = flat(check_samples(samples, truth), 2)
    if s.shape[0] < 2:
        raise ValueError(f"the fair CRPS needs at least 2 samples, got {s.shape[0]}")
    return _reduce(fair_crps(s, flat(truth, 1)).mean(-1), reduction)


def fair_crps(s: Tensor, x: Tensor, diff: Tensor | None = None) -> Tensor:
    """Fair CRPS of flat samples ``(M, B, D)`` against ``x`` ``(B, D)``, unchecked: ``(B, D)``.

    ``diff`` may hold ``s - x`` already computed.
    """
    M = s.shape[0]
    skill = (s - x if diff is None else diff).abs().mean(0)
    # numpy's sort is several times faster than torch's along a leading axis on CPU
    srt = torch.from_numpy(np.sort(s.detach().cpu().numpy(), axis=0)).to(s.device)
    w = (2 * torch.arange(1, M + 1, dtype=s.dtype, device=s.device) - M - 1) / (M * (M - 1))
    pair = torch.einsum("m,mbd->bd", w, srt)  # (1 / 2M(M-1)) sum_{i,j} |x_i - x_j|
    return skill - pair


def energy_score(samples: Tensor, truth: Tensor, shifts: int = 1, reduction: str = "mean") -> Tensor | float:
    """Energy score of the samples against the truth (multivariate CRPS).

    Args:
        samples: ``(M, B, *state_shape)`` with ``M >= 2``.
        truth: ``(B, *state_shape)``.
        shifts: the pair term uses pairs ``(x_i, x_{i+s})`` for ``s = 1..shifts`` (all pairs if ``>= M - 1``).
        reduction: ``"mean"`` (a float) or ``"none"`` (per window ``(B,)``).
    """
    truth = check_truth(truth)
    s = flat(check_samples(samples, truth), 2)
    if s.shape[0] < 2 or shifts < 1:
        raise ValueError(f"the energy score needs at least 2 samples and shifts >= 1, got {s.shape[0]} and {shifts}")
    return _reduce(energy(s, flat(truth, 1), shifts), reduction)


def energy(s: Tensor, x: Tensor, shifts: int = 1, diff: Tensor | None = None) -> Tensor:
    """Energy score of flat samples ``(M, B, D)`` against ``x`` ``(B, D)``, unchecked: ``(B,)``.

    ``diff`` may hold ``s - x`` already computed.
    """
    M = s.shape[0]
    skill = torch.linalg.vector_norm(s - x if diff is None else diff, dim=-1).mean(0)
    total, count = 0.0, 0
    for k in range(1, min(shifts, M - 1) + 1):
        total = total + torch.linalg.vector_norm(s[k:] - s[:-k], dim=-1).sum(0)
        count += M - k
    return skill - 0.5 * total / count


def spread(samples: Tensor, reduction: str = "mean") -> Tensor | float:
    """Ensemble spread: root mean (over windows and variables) of the unbiased member variance.

    Args:
        samples: ``(M, B, *state_shape)`` with ``M >= 2``.
        reduction: ``"mean"`` (a float) or ``"none"`` (per window ``(B,)``).
    """
    s = flat(check_samples(samples), 2)
    if s.shape[0] < 2:
        raise ValueError(f"the spread needs at least 2 samples, got {s.shape[0]}")
    var = s.var(0).mean(-1)
    return var.sqrt() if reduction == "none" else math.sqrt(_reduce(var, reduction))


def spread_skill(samples: Tensor, truth: Tensor) -> float:
    """Spread/skill ratio ``sqrt((M+1)/M) * spread / RMSE of the mean`` (1 for a calibrated ensemble).

    Args:
        samples: ``(M, B, *state_shape)`` with ``M >= 2``.
        truth: ``(B, *state_shape)``.
    """
    M = samples.shape[0]
    return math.sqrt((M + 1) / M) * spread(samples) / rmse(samples, truth)


def spread_skill_spectrum(samples: Tensor, truth: Tensor) -> tuple[Tensor, Tensor]:
    """Spread/skill ratio per wavenumber of a periodic grid.

    The departures of the members and of the truth from the ensemble mean are Fourier transformed over the grid (the
    last dimension of 1-D states ``(K,)``, the last two of ``(C, H, W)`` states, whose channels are pooled) and their
    power is summed per wavenumber (``|k|`` in 1-D, the rounded radial ``sqrt(k_x^2 + k_y^2)`` in 2-D); the ratio of
    each bin is ``sqrt((M+1)/M * spread power / error power)``, with the unbiased member variance, as
    :func:`spread_skill` (1 for a calibrated ensemble, below 1 over-confident at that scale).

    Args:
        samples: ``(M, B, *state_shape)`` with ``M >= 2``; states ``(K,)`` or ``(C, H, W)`` on a periodic grid.
        truth: ``(B, *state_shape)``.

    Returns:
        ``(wavenumbers (k,), ratio (k,))`` in float64, wavenumbers ``0, 1, ...`` up to the largest on the grid.
    """
    spread_power, error_power = spectral_powers(samples, truth)
    return torch.arange(len(error_power), dtype=torch.float64), spectrum_ratio(spread_power, error_power,
                                                                                samples.shape[0])


def is_grid(state_shape: tuple[int, ...]) -> bool:
    """Whether :func:`spread_skill_spectrum` applies: states ``(K,)`` or ``(C, H, W)``."""
    return len(state_shape) in (1, 3)


def wavenumber_bins(grid: tuple[int, ...]) -> Tensor:
    """The wavenumber bin of each point of the full (``torch.fft.fftn``) Fourier grid of a periodic grid ``grid``
    (``(K,)`` or ``(H, W)``): ``|k|`` in 1-D, the rounded radial ``sqrt(k_x^2 + k_y^2)`` in 2-D; ``grid``-shaped
    int64, bins ``0, 1, ...`` up to the largest."""
    freqs = [torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64) for n in grid]
    return torch.stack(torch.meshgrid(*freqs, indexing="ij")).square().sum(0).sqrt().round().long()


def spectral_powers(samples: Tensor, truth: Tensor, per_window: bool = False) -> tuple[Tensor, Tensor]:
    """The power per wavenumber of the members' departures from their mean (unbiased member variance) and of the
    truth's, summed over windows (and channels): ``(k,)`` each in float64, which add up over batches of windows
    (``per_window``: ``(B, k)`` each, summed over channels only). Arguments as :func:`spread_skill_spectrum`."""
    truth = check_truth(truth)
    s = check_samples(samples, truth)
    M = s.shape[0]
    if M < 2:
        raise ValueError(f"the spread needs at least 2 samples, got {M}")
    if not is_grid(tuple(truth.shape[1:])):
        raise ValueError(f"states must be (K,) or (C, H, W) grids, got state shape {tuple(truth.shape[1:])}")
    dims = (-1,) if truth.dim() == 2 else (-2, -1)
    mean = s.mean(0, dtype=torch.float64)
    step = max(1, 2**22 // truth.numel())  # members per pass: bounds the memory of the transforms
    spread_power = sum(torch.fft.fftn(s[i:i + step].double() - mean, dim=dims).abs().square().sum(0)
                       for i in range(0, M, step)) / (M - 1)  # (B, *state)
    error_power = torch.fft.fftn(truth.double() - mean, dim=dims).abs().square()
    radius = wavenumber_bins(tuple(truth.shape[len(truth.shape) - len(dims):])).to(truth.device)
    k, B = int(radius.max()) + 1, truth.shape[0]

    def per_bin(power: Tensor) -> Tensor:
        p = power.reshape(B, -1, radius.numel()).sum(1)  # (B, grid points): channels pooled
        p = p.new_zeros(B, k).index_add_(1, radius.reshape(-1), p)
        return p if per_window else p.sum(0)

    return per_bin(spread_power), per_bin(error_power)


def spectrum_ratio(spread_power: Tensor, error_power: Tensor, members: int) -> Tensor:
    """Spread/skill per wavenumber ``(k,)`` from the powers of :func:`spectral_powers` and the ensemble size."""
    if (error_power <= 0).any():
        raise ValueError("the truth equals the ensemble mean at some wavenumber: the ratio is undefined there")
    return math.sqrt((members + 1) / members) * (spread_power / error_power).sqrt()

r"""Ensemble Kalman filter and smoother in square-root form (ETKF, EnKS), over windows and over long trajectories.

An ensemble :math:`E = (x^{(1)}, \dots, x^{(M)})` of forecast states with mean :math:`\bar x` and anomalies
:math:`X_i = \rho (x^{(i)} - \bar x)` (multiplicative inflation :math:`\rho \ge 1`, applied to every forecast but not
to the climatological ensemble at the window's start) is updated by an observation :math:`y` (observed entries
given by the mask, noise :math:`\sigma`) in ensemble space (Bishop et al., 2001; Hunt et al., 2007):

.. math:: S = \frac{\operatorname{diag}(m)\, H X^\top}{\sigma \sqrt{M - 1}}, \quad
          d = \frac{\operatorname{diag}(m)(y - H \bar x)}{\sigma}, \quad C = I_M + S^\top S,

.. math:: w = \frac{C^{-1} S^\top d}{\sqrt{M - 1}}, \qquad
          \bar x^a = \bar x + X^\top w, \qquad X^a = C^{-1/2} X,

with the symmetric square root (which keeps the anomalies centred). The analysis mean and covariance
:math:`X^{a\top} X^a / (M - 1)` are those of the Kalman filter with the ensemble's covariance as prior; for linear
dynamics and an initial ensemble with the prior's exact mean and covariance they are exact for any :math:`M > D`.

*Localization* (optional, 1-D states): each grid point :math:`k` has its own analysis with the observations
tapered by the Gaspari–Cohn function of their distance (LETKF, R-localization): :math:`S \to S\, \operatorname{diag}
(\sqrt{\rho_k})`, :math:`d \to \sqrt{\rho_k}\, d`. An observation's position is the circular centroid of its row of
:math:`H`.

*Smoother* (EnKS): the same ensemble-space transform :math:`(w, C^{-1/2})` computed at a later observation time is
applied to the stored ensemble of the target time, which then holds samples of :math:`p(x_t \mid y_{\text{window}})`
(Evensen & van Leeuwen, 2000). For a window ending at the target the smoother is the filter.

*Cycled ETKF*: the filter run along whole trajectories (all past observations), the reference of what unlimited
information buys.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..data import IndexPermutation
from ..posterior import EnsemblePosterior, GaussianPosterior
from .base import Baseline

__all__ = ["EnKS", "EnKF", "CycledETKF", "gaspari_cohn", "observation_positions", "etkf_transform",
           "apply_transform"]

INFLATION_GRID = (1.0, 1.01, 1.02, 1.04, 1.07, 1.1, 1.15, 1.2, 1.3, 1.5)


def gaspari_cohn(r: Tensor, c: float) -> Tensor:
    """The Gaspari–Cohn (1999) fifth-order taper of distances ``r`` for half-width ``c`` (zero beyond ``2c``)."""
    if not c > 0:
        raise ValueError(f"the localization half-width must be positive, got {c}")
    z = r.abs() / c
    inner = ((-0.25 * z + 0.5) * z + 0.625) * z**3 - (5.0 / 3.0) * z**2 + 1.0
    zs = z.clamp_min(1e-12)
    outer = (((z / 12.0 - 0.5) * z + 0.625) * z + 5.0 / 3.0) * z**2 - 5.0 * z + 4.0 - 2.0 / (3.0 * zs)
    return torch.where(z <= 1, inner, torch.where(z < 2, outer, torch.zeros_like(z))).clamp_min(0.0)


def observation_positions(H: Tensor) -> Tensor:
    """Position of each observation on a ring of ``D`` cells: the circular centroid of ``|H|``'s row, ``(P,)``."""
    D = H.shape[1]
    angle = 2 * math.pi * torch.arange(D, dtype=torch.float64) / D
    w = H.abs().to(torch.float64)
    phase = torch.atan2(w @ torch.sin(angle), w @ torch.cos(angle))
    return (phase * D / (2 * math.pi)) % D


def etkf_transform(Y: Tensor, d: Tensor, mask: Tensor, sigma: float, taper: Tensor | None = None
                   ) -> tuple[Tensor, Tensor]:
    """Ensemble-space weights of the ETKF analysis (see the module).

    Args:
        Y: ``(M, B, P)`` observation anomalies of the (inflated) forecast, ``H X``.
        d: ``(B, P)`` innovations ``y - H mean``.
        mask: ``(B, P)`` boolean, the observed entries.
        sigma: observation noise standard deviation.
        taper: optional ``(L, P)`` localization weights, one row per grid point.

    Returns:
        ``w`` ``(B, L, M)`` and ``T = C^{-1/2}`` ``(B, L, M, M)`` (``L = 1`` without localization), float64.
    """
    M = Y.shape[0]
    m = mask.to(torch.float64)
    S = Y.to(torch.float64).permute(1, 0, 2) * (m / (sigma * math.sqrt(max(M - 1, 1))))[:, None]  # (B, M, P)
    dn = d.to(torch.float64) * m / sigma  # (B, P)
    if taper is None:
        S, dn = S[:, None], dn[:, None]  # (B, 1, M, P), (B, 1, P)
    else:
        r = taper.to(torch.float64).sqrt()
        S, dn = S[:, None] * r[None, :, None], dn[:, None] * r[None]  # (B, L, M, P), (B, L, P)
    C = torch.eye(M, dtype=torch.float64) + S @ S.mT
    lam, V = torch.linalg.eigh(C)
    Sd = (S @ dn[..., None]).squeeze(-1)  # (B, L, M)
    w = (V @ ((V.mT @ Sd[..., None]).squeeze(-1) / lam)[..., None]).squeeze(-1) / math.sqrt(max(M - 1, 1))
    T = (V * lam.rsqrt()[..., None, :]) @ V.mT
    return w, T


def apply_transform(E: Tensor, w: Tensor, T: Tensor, inflation: float = 1.0) -> Tensor:
    """Apply ensemble-space weights to an ensemble: ``mean + X^T w`` and ``T X`` with ``X`` the inflated anomalies.

    Args:
        E: ``(M, B, D)`` ensemble.
        w: ``(B, L, M)`` mean weights (``L`` is 1 or ``D``).
        T: ``(B, L, M, M)`` anomaly transforms.
        inflation: factor on the anomalies of ``E`` before the transform.

    Returns:
        ``(M, B, D)`` in the dtype of ``E``.
    """
    E64 = E.to(torch.float64)
    mean = E64.mean(0)
    X = ((E64 - mean) * inflation).permute(1, 2, 0)  # (B, D, M)
    xa = mean + (w * X).sum(-1)
    if T.shape[1] == 1:  # one transform for the whole state
        Xa = X @ T[:, 0].mT  # (B, D, M)
    else:  # one per grid point
        Xa = (T @ X[..., None]).squeeze(-1)
    return (xa[..., None] + Xa).permute(2, 0, 1).to(E.dtype)


class _Ensemble(Baseline):
    """Shared machinery of the ensemble methods: members, inflation, localization, the analysis step."""

    def __init__(self, simulator, observation, offsets, every=1, members: int = 100, inflation: float = 1.0,
                 localization: float | None = None, init: str = "empirical", moment_match: bool = False,
                 climatology=None):
        super().__init__(simulator, observation, offsets, every=every, climatology=climatology)
        if int(members) != members or members < 2:
            raise ValueError(f"members must be an integer >= 2, got {members}")
        if not (inflation >= 1.0 and math.isfinite(inflation)):
            raise ValueError(f"inflation must be a finite factor >= 1 on the anomalies, got {inflation}")
        if init not in ("empirical", "gaussian"):
            raise ValueError(f"init must be 'empirical' or 'gaussian', got {init!r}")
        self.members, self.inflation, self.init, self.moment_match = int(members), float(inflation), init, moment_match
        self.localization = None if localization is None else float(localization)
        self.taper = None
        if self.localization is not None:
            if len(self.state_shape) != 1:
                raise ValueError(f"localization is implemented for 1-D states (K,), got state shape "
                                 f"{self.state_shape}")
            pos = observation_positions(self.H)
            dist = (torch.arange(self.D, dtype=torch.float64)[:, None] - pos[None]).abs()
            dist = torch.minimum(dist, self.D - dist)
            self.taper = gaspari_cohn(dist, self.localization)  # (D, P)
        self.tuning: dict | None = None

    def analysis(self, E: Tensor, y: Tensor, mask: Tensor, inflation: float) -> tuple[Tensor, Tensor, Tensor]:
        """One ETKF analysis of ``E`` ``(M, B, D)`` by ``y``, ``mask`` ``(B, P)``; returns ``(E_a, w, T)``."""
        H = self.H
        E64 = E.to(torch.float64)
        mean = E64.mean(0)
        Y = ((E64 - mean) * inflation) @ H.T  # (M, B, P)
        d = y.to(torch.float64) - mean @ H.T
        w, T = etkf_transform(Y, d, mask, self.sigma, self.taper)
        return apply_transform(E, w, T, inflation), w, T

    def initial_ensemble(self, t0: Tensor, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
        """Climatological ensemble ``(M, B, D)`` at times ``t0`` ``(B,)``."""
        return self._clim().sample(t0, self.members, generator=generator, kind=self.init,
                                   moment_match=self.moment_match, dtype=dtype)

    def info(self) -> dict:
        return {"method": self.name, "members": self.members, "inflation": self.inflation,
                "localization": self.localization, "tuning": self.tuning}


class EnKS(_Ensemble):
    """ETKF analysis-forecast cycle over each window, from a climatological ensemble at its start, and its smoother.

    Args:
        simulator, observation, offsets, every, climatology: see :class:`~sbida.baselines.base.Baseline`.
        members: ensemble size ``M``.
        inflation: multiplicative factor ``rho >= 1`` on the forecast anomalies (tune it with :meth:`tune`).
        localization: Gaspari–Cohn half-width in cells (1-D states; ``None``: global ETKF).
        init: initial ensemble, ``"empirical"`` (training states of the start time's bin) or ``"gaussian"``.
        moment_match: give a Gaussian initial ensemble the climatology's exact mean and covariance.
        smoother: use the observations after the target too (EnKS); ``False`` gives the filter (EnKF) analysis at
            the target time.
    """

    name = "enks"

    def __init__(self, simulator, observation, offsets, every=1, members: int = 100, inflation: float = 1.0,
                 localization: float | None = None, init: str = "empirical", moment_match: bool = False,
                 smoother: bool = True, climatology=None):
        super().__init__(simulator, observation, offsets, every=every, members=members, inflation=inflation,
                         localization=localization, init=init, moment_match=moment_match, climatology=climatology)
        self.smoother = bool(smoother)
        if not self.smoother:
            self.name = "enkf"

    def _ensemble(self, y: Tensor, m: Tensor, t: Tensor, inflation: float,
                  generator: torch.Generator | None) -> Tensor:
        """Target-time ensemble ``(M, B, D)`` of checked, flattened windows."""
        E = self.initial_ensemble(self.start_time(t), generator, y.dtype)
        target = None
        with torch.no_grad():
            for j in range(len(self.offsets)):
                rho = 1.0
                if j > 0:
                    E = self.forecast(E, self.offsets[j] - self.offsets[j - 1])
                    rho = inflation
                E, w, T = self.analysis(E, y[:, j], m[:, j], rho)
                if target is not None:
                    target = apply_transform(target, w, T)
                if j == self.target_index:
                    target = E
                    if not self.smoother:
                        break
        return target

    def posterior(self, y: Tensor, mask: Tensor, t: Tensor, generator: torch.Generator | None = None
                  ) -> EnsemblePosterior:
        """Ensemble posterior of the target states.

        Args:
            y: ``(B, T, *obs_shape)`` observations.
            mask: ``(B, T, *obs_shape)`` mask.
            t: ``(B,)`` target times.
            generator: random generator of the initial ensemble.

        Returns:
            An :class:`~sbida.posterior.EnsemblePosterior` of ``members`` states ``(M, B, *state_shape)``, with
            ``.info`` (method, members, inflation, tuning).
        """
        y, m, t = self.check_windows(y, mask, t)
        E = self._ensemble(y, m, t, self.inflation, generator)
        post = EnsemblePosterior(E.reshape(self.members, -1, *self.state_shape))
        post.info = self.info()
        return post

    def tune(self, dataset, grid: Sequence[float] = INFLATION_GRID, n_windows: int = 256, seed: int = 0,
             progress: bool = False) -> dict:
        """Choose the inflation minimizing the RMSE of the posterior mean on validation windows; keep it.

        Args:
            dataset: validation :class:`~sbida.data.WindowDataset`.
            grid: inflation factors to try.
            n_windows: windows drawn at random from ``dataset`` (all if fewer).
            seed: seed of the window draw and of the initial ensembles (the same for every factor).
            progress: show a progress bar.

        Returns:
            ``{"members", "grid", "rmse", "spread", "inflation", "n_windows"}`` (``nan`` where the ensemble blew up);
            also stored in :attr:`tuning` and :attr:`inflation`.
        """
        grid = [float(g) for g in grid]
        if not grid or any(not (g >= 1.0 and math.isfinite(g)) for g in grid):
            raise ValueError(f"the inflation grid must hold finite factors >= 1, got {grid}")
        g = torch.Generator().manual_seed(seed)
        n = min(int(n_windows), len(dataset))
        idx = IndexPermutation(len(dataset), g)[:n]
        x, y, mask, t = dataset.get(idx)
        y, m, t = self.check_windows(y, mask, t)
        x = x.reshape(n, -1).to(torch.float64)
        rmse, spread = [], []
        for rho in tqdm(grid, desc=f"tuning inflation (M={self.members})", disable=not progress, leave=False):
            try:
                E = self._ensemble(y, m, t, rho, torch.Generator().manual_seed(seed + 1)).to(torch.float64)
                rmse.append(float((E.mean(0) - x).pow(2).mean().sqrt()))
                spread.append(float(E.var(0).mean().sqrt()))
            except RuntimeError:  # the ensemble blew up (eigh on non-finite values): this factor is unusable
                rmse.append(math.nan)
                spread.append(math.nan)
        best = min(range(len(grid)), key=lambda i: rmse[i] if math.isfinite(rmse[i]) else math.inf)
        self.inflation = grid[best]
        self.tuning = {"members": self.members, "grid": grid, "rmse": rmse, "spread": spread,
                       "inflation": self.inflation, "n_windows": n}
        return dict(self.tuning)


class EnKF(EnKS):
    """The filter analysis at the target time (observations up to it only); see :class:`EnKS`."""

    name = "enkf"

    def __init__(self, *args, **kwargs):
        kwargs["smoother"] = False
        super().__init__(*args, **kwargs)


class CycledETKF(_Ensemble):
    """The ETKF cycled along whole trajectories (every past observation), from a climatological ensemble at ``t0``.

    Args:
        simulator, observation, every, climatology: see :class:`~sbida.baselines.base.Baseline`.
        members, inflation, localization, init, moment_match: see :class:`EnKS`.
    """

    name = "cycled-etkf"

    def __init__(self, simulator, observation, every: int = 1, members: int = 40, inflation: float = 1.0,
                 localization: float | None = None, init: str = "empirical", moment_match: bool = False,
                 climatology=None):
        super().__init__(simulator, observation, [0], every=every, members=members, inflation=inflation,
                         localization=localization, init=init, moment_match=moment_match, climatology=climatology)

    @classmethod
    def from_task(cls, task, **kwargs):
        from .base import baseline_model

        return cls(baseline_model(task), task.observation, every=task.config.data.save_every, **kwargs)

    def run(self, y: Tensor, mask: Tensor, t0: float = 0.0, ensemble: Tensor | None = None,
            generator: torch.Generator | None = None, inflation: float | None = None,
            progress: bool = True) -> tuple[Tensor, Tensor]:
        """Filter trajectories of observations, one saved state apart.

        Args:
            y: ``(N, S, *obs_shape)`` observations (zeros where missing).
            mask: ``(N, S, *obs_shape)`` mask.
            t0: time of the first observation (for the climatological initial ensemble).
            ensemble: optional initial ensemble ``(M, N, *state_shape)`` instead of the climatology's.
            generator: random generator of the initial ensemble.
            inflation: overrides :attr:`inflation`.
            progress: show a progress bar.

        Returns:
            Analysis mean and ensemble spread (standard deviation), each ``(N, S, *state_shape)``.
        """
        if y.dim() != 2 + len(self.obs_shape) or tuple(y.shape[2:]) != self.obs_shape or mask.shape != y.shape:
            raise ValueError(f"y and mask must be (N, S, {', '.join(map(str, self.obs_shape))}), got "
                             f"{tuple(y.shape)} and {tuple(mask.shape)}")
        N, S = y.shape[:2]
        mask = mask if mask.dtype == torch.bool else mask != 0
        if not torch.isfinite(torch.where(mask, y, torch.zeros((), dtype=y.dtype))).all():
            raise ValueError("y contains NaN or infinite observed values")
        yf = torch.where(mask, y, torch.zeros((), dtype=y.dtype)).reshape(N, S, self.P)
        mf = mask.reshape(N, S, self.P)
        rho = self.inflation if inflation is None else float(inflation)
        if ensemble is None:
            E = self.initial_ensemble(torch.full((N,), float(t0)), generator, y.dtype)
        else:
            if tuple(ensemble.shape) != (self.members, N, *self.state_shape):
                raise ValueError(f"ensemble must be ({self.members}, {N}, {', '.join(map(str, self.state_shape))}), "
                                 f"got {tuple(ensemble.shape)}")
            E = ensemble.reshape(self.members, N, self.D).to(y.dtype)
        mean = torch.empty(N, S, self.D, dtype=y.dtype)
        std = torch.empty(N, S, self.D, dtype=y.dtype)
        with torch.no_grad():
            for s in tqdm(range(S), desc="cycled ETKF", disable=not progress, leave=False):
                if s > 0:
                    E = self.forecast(E)
                E = self.analysis(E, yf[:, s], mf[:, s], rho if s > 0 else 1.0)[0]
                mean[:, s], std[:, s] = E.mean(0), E.std(0)
        shape = (N, S, *self.state_shape)
        return mean.reshape(shape), std.reshape(shape)

    def posterior(self, y: Tensor, mask: Tensor, t0: float = 0.0, **kwargs) -> GaussianPosterior:
        """The analyses of whole trajectories as independent Gaussians (mean, spread), ``(N * S, *state_shape)``."""
        mean, std = self.run(y, mask, t0=t0, **kwargs)
        post = GaussianPosterior(mean.reshape(-1, *self.state_shape), std=std.reshape(-1, *self.state_shape))
        post.info = self.info()
        return post

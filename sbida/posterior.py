r"""Posteriors over the state of a batch of windows: one interface for every estimator and baseline.

A :class:`Posterior` stands for ``B`` distributions :math:`p(x_t \mid y^{(b)}_{t-T:t}, t^{(b)})`, one per window of a
batch, over states of shape ``state_shape``. All kinds have

- ``sample(n, generator=None) -> (n, B, *state_shape)``,
- ``mean() -> (B, *state_shape)`` and ``std() -> (B, *state_shape)`` (marginal standard deviations),
- ``log_prob(x) -> (..., B)`` for ``x`` of shape ``(..., B, *state_shape)``, only where the method defines a
  density; the others raise :class:`NotImplementedError` and say so (``has_log_prob`` tells in advance).

Kinds:

- :class:`EnsemblePosterior`: a fixed ensemble (EnKF/EnKS, an ensemble of networks, MCMC draws).
- :class:`GaussianPosterior`: mean and covariance, or its Cholesky factor, or marginal standard deviations
  (optimal interpolation, 4D-Var's Laplace approximation, the linear-Gaussian exact posterior).
- :class:`DistributionPosterior`: any ``torch.distributions.Distribution`` over flat states with batch shape
  ``(B,)`` (a zuko flow conditioned on the windows).
- :class:`SamplerPosterior`: a sampling function, plus optional mean and density functions (score SDEs, ratio
  estimators with MCMC).
- :class:`PointPosterior`: a point estimate without uncertainty (every sample is the estimate).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor
from torch.distributions import Distribution, MultivariateNormal, Normal

from .nn.flows import IsotropicStudentT

__all__ = [
    "Posterior",
    "EnsemblePosterior",
    "GaussianPosterior",
    "DistributionPosterior",
    "SamplerPosterior",
    "PointPosterior",
    "fit_student_t",
    "student_t_mixing",
]


def _seed_from(generator: torch.Generator | None) -> int | None:
    """A seed drawn from ``generator`` (for code that only uses the global generator), or ``None``."""
    if generator is None:
        return None
    return int(torch.randint(2**62, (1,), generator=generator, device=generator.device))


def student_t_mixing(df: float, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> Tensor:
    """Variance factors ``w = (nu - 2) / chi^2_nu`` (float64, of mean 1): a Gaussian draw of covariance ``C`` times
    ``sqrt(w)`` is a draw of the Student-t of ``nu = df`` degrees of freedom and covariance ``C``.

    Seeded from ``generator`` (else from torch's default generator) and drawn by a numpy generator of that seed, on
    the CPU, then moved to ``device``: torch's Chi^2 sampler takes no generator, and seeding torch's global one
    would race between the threads of :func:`~sbida.estimators.score.chunked_sampler`.
    """
    seed = _seed_from(generator) if generator is not None else int(torch.randint(2**62, (1,)))
    w = np.random.default_rng(seed).chisquare(float(df), size=tuple(shape))
    return torch.from_numpy((float(df) - 2) / w).to(device)


class Posterior:
    """Base class: ``B`` posteriors over states of shape ``state_shape``.

    Subclasses implement :meth:`sample`; :meth:`mean` and :meth:`std` default to Monte Carlo estimates from
    ``n_moments`` samples (fixed seed, so repeated calls agree), :meth:`log_prob` to a ``NotImplementedError``.
    """

    state_shape: tuple[int, ...]
    batch_size: int
    n_moments: int = 256
    has_log_prob: bool = False

    @property
    def event_size(self) -> int:
        """Number of values in one state, ``prod(state_shape)``."""
        return math.prod(self.state_shape)

    def __len__(self) -> int:
        return self.batch_size

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` samples for each window: ``(n, B, *state_shape)``."""
        raise NotImplementedError

    def diagnostic_draws(self, n: int) -> int:
        """How many of ``n`` asked-for draws the diagnostics take: ``n`` (an ensemble caps it at its size)."""
        return self._check_n(n)

    def _moment_samples(self) -> Tensor:
        cached = getattr(self, "_moment_cache", None)
        if cached is None:
            g = torch.Generator(device=self._device()).manual_seed(0)
            cached = self._moment_cache = self.sample(self.n_moments, generator=g)
        return cached

    def _device(self) -> torch.device:
        return torch.device("cpu")

    def mean(self) -> Tensor:
        """Posterior mean of each window, ``(B, *state_shape)``."""
        return self._moment_samples().mean(0)

    def std(self) -> Tensor:
        """Marginal posterior standard deviations, ``(B, *state_shape)``."""
        return self._moment_samples().std(0)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of states ``x`` ``(..., B, *state_shape)`` under each window's posterior: ``(..., B)``."""
        raise NotImplementedError(
            f"{type(self).__name__} has no density: this method gives samples only (use sample-based diagnostics)"
        )

    def _check_x(self, x: Tensor) -> Tensor:
        """``x`` as ``(..., B, D)`` after checking its trailing shape."""
        tail = (self.batch_size, *self.state_shape)
        if tuple(x.shape[x.dim() - len(tail):]) != tail:
            raise ValueError(f"expected states of shape (..., {', '.join(map(str, tail))}), got {tuple(x.shape)}")
        return x.reshape(*x.shape[: x.dim() - len(self.state_shape)], self.event_size)

    def _check_n(self, n: int) -> int:
        if int(n) != n or n < 1:
            raise ValueError(f"the number of samples must be a positive integer, got {n}")
        return int(n)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(batch_size={self.batch_size}, state_shape={self.state_shape})"


class EnsemblePosterior(Posterior):
    """An ensemble of ``M`` members per window, ``(M, B, *state_shape)``.

    ``sample(n)`` returns ``n`` members drawn without replacement when ``n <= M`` (all of them, in a random order,
    when ``n == M``) and with replacement otherwise. ``mean`` and ``std`` are the ensemble's (``std`` with the
    ``M - 1`` denominator). The diagnostics (:func:`~sbida.diagnostics.evaluate`, coverage, SBC, TARP) take at most
    its ``M`` members (:meth:`diagnostic_draws`): repeated members would tie with each other, and an exact ensemble
    would look over-confident (its distance ECE, its fair CRPS and its C2ST, where copies land in both folds).
    """

    def __init__(self, members: Tensor, state_shape: tuple[int, ...] | None = None):
        if members.dim() < 2:
            raise ValueError(f"members must be (M, B, *state_shape), got shape {tuple(members.shape)}")
        self.state_shape = tuple(state_shape) if state_shape is not None else tuple(members.shape[2:])
        if tuple(members.shape[2:]) != self.state_shape:
            raise ValueError(f"members of shape {tuple(members.shape)} do not end with state_shape {self.state_shape}")
        if not torch.isfinite(members).all():
            raise ValueError("the ensemble contains NaN or infinite values")
        self.members = members
        self.batch_size = members.shape[1]

    @property
    def size(self) -> int:
        """Ensemble size ``M``."""
        return self.members.shape[0]

    def diagnostic_draws(self, n: int) -> int:
        """``min(n, M)``: the diagnostics draw each member at most once."""
        return min(self._check_n(n), self.size)

    def _device(self) -> torch.device:
        return self.members.device

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        n, M = self._check_n(n), self.size
        if n <= M:
            idx = torch.randperm(M, generator=generator, device=generator.device if generator else None)[:n]
        else:
            idx = torch.randint(M, (n,), generator=generator, device=generator.device if generator else None)
        return self.members[idx.to(self.members.device)]

    def mean(self) -> Tensor:
        return self.members.mean(0)

    def std(self) -> Tensor:
        return self.members.std(0) if self.size > 1 else torch.zeros_like(self.members[0])


class GaussianPosterior(Posterior):
    r"""Gaussian posteriors ``N(mean_b, C_b)`` over flattened states, or Student-t ones of the same mean and covariance.

    Give exactly one of ``cov`` ``(B, D, D)``, ``scale_tril`` ``(B, D, D)`` (lower Cholesky factor) or ``std``
    ``(B, *state_shape)`` (independent marginals), with ``mean`` of shape ``(B, *state_shape)`` and
    ``D = prod(state_shape)``. Sampling and densities go through ``torch.distributions``.

    With ``df`` (``nu > 2``), each window's distribution is the multivariate Student-t of ``nu`` degrees of freedom
    with that mean and covariance, ``x = m + sqrt((nu - 2) / w) L g`` (``g ~ N(0, I)``, one ``w ~ chi^2_nu`` per
    draw): the same ellipsoids, heavier tails (:class:`sbida.nn.IsotropicStudentT` of the whitened state; fit
    ``nu`` with :func:`fit_student_t`). ``df=None`` is the Gaussian.
    """

    has_log_prob = True

    def __init__(self, mean: Tensor, cov: Tensor | None = None, scale_tril: Tensor | None = None,
                 std: Tensor | None = None, df: float | None = None):
        if sum(a is not None for a in (cov, scale_tril, std)) != 1:
            raise ValueError("give exactly one of cov, scale_tril or std")
        if df is not None and not (math.isfinite(float(df)) and float(df) > 2):
            raise ValueError(f"df must be a finite number > 2 (the covariance is infinite at 2) or None, got {df}")
        self.df = None if df is None else float(df)
        if mean.dim() < 2:
            raise ValueError(f"mean must be (B, *state_shape), got shape {tuple(mean.shape)}")
        if not torch.isfinite(mean).all():
            raise ValueError("the posterior mean contains NaN or infinite values")
        self.batch_size, self.state_shape = mean.shape[0], tuple(mean.shape[1:])
        self._mean = mean
        B, D = self.batch_size, self.event_size
        loc = mean.reshape(B, D)
        if std is not None:
            if std.shape != mean.shape:
                raise ValueError(f"std must have the shape of mean {tuple(mean.shape)}, got {tuple(std.shape)}")
            self._std = std
            self.dist = torch.distributions.Independent(Normal(loc, std.reshape(B, D)), 1)
            return
        matrix = cov if cov is not None else scale_tril
        if tuple(matrix.shape) != (B, D, D):
            name = "cov" if cov is not None else "scale_tril"
            raise ValueError(f"{name} must be (B, D, D) = ({B}, {D}, {D}), got {tuple(matrix.shape)}")
        if cov is not None:
            self.dist = MultivariateNormal(loc, covariance_matrix=cov)
            self._std = cov.diagonal(dim1=-2, dim2=-1).sqrt().reshape(mean.shape)
        else:
            self.dist = MultivariateNormal(loc, scale_tril=scale_tril)
            self._std = scale_tril.square().sum(-1).sqrt().reshape(mean.shape)

    def _device(self) -> torch.device:
        return self._mean.device

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        n = self._check_n(n)
        B, D = self.batch_size, self.event_size
        z = torch.randn(n, B, D, generator=generator, dtype=self._mean.dtype, device=self._mean.device)
        if self.df is not None:  # one variance factor per draw
            z = z * student_t_mixing(self.df, (n, B, 1), generator, self._mean.device).sqrt().to(z)
        if isinstance(self.dist, MultivariateNormal):
            # einsum, not a broadcast matmul: that one expands the factors to (n, B, D, D) first (50x slower)
            x = self.dist.loc + torch.einsum("bij,nbj->nbi", self.dist.scale_tril, z)
        else:
            x = self.dist.base_dist.loc + self.dist.base_dist.scale * z
        return x.reshape(n, B, *self.state_shape)

    def mean(self) -> Tensor:
        return self._mean

    def std(self) -> Tensor:
        return self._std

    def covariance(self) -> Tensor:
        """Covariance matrices ``(B, D, D)``."""
        if isinstance(self.dist, MultivariateNormal):
            return self.dist.covariance_matrix
        return torch.diag_embed(self._std.reshape(self.batch_size, -1).square())

    def log_prob(self, x: Tensor) -> Tensor:
        if self.df is None:
            return self.dist.log_prob(self._check_x(x).to(self._mean.dtype))
        D, nu = self.event_size, self.df
        whitened = IsotropicStudentT.unit(self._mean.new_zeros(1, D, dtype=torch.float64), nu)
        return (whitened.log_prob_at_distance(self.mahalanobis(x)) - self.half_log_det()).to(self._mean.dtype)

    def mahalanobis(self, x: Tensor) -> Tensor:
        """Squared Mahalanobis distances ``(..., B)`` (float64) of states ``x`` ``(..., B, *state_shape)`` under the
        covariance (Gaussian or not), ``|L^{-1} (x - mean)|^2``: what :func:`fit_student_t` fits ``nu`` on."""
        d = (self._check_x(x).to(self._mean.dtype) - self._mean.flatten(1)).double()
        if isinstance(self.dist, MultivariateNormal):
            L = self.dist.scale_tril.double().expand(*d.shape[:-1], -1, -1)
            z = torch.linalg.solve_triangular(L, d.unsqueeze(-1), upper=False).squeeze(-1)
        else:
            z = d / self._std.flatten(1).double()
        return z.square().sum(-1)

    def half_log_det(self) -> Tensor:
        """``log |det L| = log det(C) / 2`` ``(B,)`` (float64): minus the log-Jacobian of the whitening
        ``x -> L^{-1} (x - mean)``."""
        if isinstance(self.dist, MultivariateNormal):
            return self.dist.scale_tril.diagonal(dim1=-2, dim2=-1).double().log().sum(-1)
        return self._std.flatten(1).double().log().sum(-1)


def fit_student_t(r2: Tensor, dim: int, log_jac: Tensor | float = 0.0, scale: bool = False,
                  df_bounds: tuple[float, float] = (3.0, 1e6)) -> dict[str, float]:
    r"""Fit the degrees of freedom ``nu`` (and, with ``scale``, a factor ``c`` on the spread) of a unit-covariance
    Student-t to held-out truths, by their likelihood.

    The truths enter through their squared whitened distances ``r2`` ``(N,)`` to their posteriors' centres (e.g.
    :meth:`GaussianPosterior.mahalanobis`, or ``|z|^2`` in a flow's base space): the density of a whitened truth
    under ``c x`` a unit-covariance t of ``nu`` degrees of freedom in ``dim`` dimensions is a function of
    ``r2 / c^2`` only. ``log_jac`` ``(N,)`` (or a number): the log-Jacobian from the original units to the whitened
    ones, added so that the NLLs are those of the truths in original units. L-BFGS in float64 on ``log nu``
    (within ``df_bounds``: at 2 the variance is infinite, 10^6 is Gaussian) and ``log c``.

    Returns:
        ``{"df", "scale", "nll", "nll_gaussian", "windows"}``: the fitted ``nu`` and ``c`` (1 without ``scale``),
        and the mean negative log-likelihood of the truths (nats per window) under the fitted t and under the
        Gaussian of the same covariance (``c = 1``).
    """
    r2 = torch.as_tensor(r2, dtype=torch.float64).reshape(-1).detach()
    if len(r2) < 2 or not torch.isfinite(r2).all() or (r2 < 0).any():
        raise ValueError(f"r2 must hold at least 2 finite squared distances >= 0, got {len(r2)} values")
    rest = torch.as_tensor(log_jac, dtype=torch.float64).detach()
    lo, hi = math.log(df_bounds[0]), math.log(df_bounds[1])
    centre = r2.new_zeros(1, dim)

    def nll(p: Tensor) -> Tensor:
        nu, log_c = p[0].clamp(lo, hi).exp(), (p[1] if scale else p[1].detach() * 0)
        base = IsotropicStudentT.unit(centre, nu)
        return -(base.log_prob_at_distance(r2 / (2 * log_c).exp()) - dim * log_c + rest).mean()

    p = torch.tensor([math.log(30.0), 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([p], lr=1.0, max_iter=200, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = nll(p)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        fitted = float(nll(p))
    gaussian = float(-(-r2 / 2 - dim / 2 * math.log(2 * math.pi) + rest).mean())
    return {"df": float(p[0].detach().clamp(lo, hi).exp()), "scale": float(p[1].detach().exp()) if scale else 1.0,
            "nll": fitted, "nll_gaussian": gaussian, "windows": len(r2)}


class DistributionPosterior(Posterior):
    """A ``torch.distributions.Distribution`` with batch shape ``(B,)`` over flat states ``(D,)``.

    Samples are reshaped to ``state_shape``. A ``generator`` seeds the global generator inside a
    :func:`torch.random.fork_rng` block (distributions draw from the global generator), so sampling with the same
    generator state gives the same samples without touching the caller's random state. ``dtype``: the floating
    type the distribution computes in (states given to :meth:`log_prob` are cast to it; ``None`` leaves them as they
    are).
    """

    has_log_prob = True

    def __init__(self, dist: Distribution, state_shape: tuple[int, ...], sample_batch: int | None = None,
                 dtype: torch.dtype | None = None):
        self.dist, self.state_shape, self.dtype = dist, tuple(state_shape), dtype
        if len(dist.batch_shape) != 1 or tuple(dist.event_shape) != (math.prod(self.state_shape),):
            raise ValueError(
                f"expected a distribution with batch shape (B,) and event shape ({math.prod(self.state_shape)},), "
                f"got batch shape {tuple(dist.batch_shape)} and event shape {tuple(dist.event_shape)}"
            )
        self.batch_size = dist.batch_shape[0]
        self.sample_batch = sample_batch

    def _draw(self, n: int) -> Tensor:
        if self.sample_batch is None or n <= self.sample_batch:
            return self.dist.sample((n,))
        return torch.cat([self.dist.sample((min(self.sample_batch, n - i),)) for i in range(0, n, self.sample_batch)])

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        n = self._check_n(n)
        seed = _seed_from(generator)
        if seed is None:
            x = self._draw(n)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                x = self._draw(n)
        return x.reshape(n, self.batch_size, *self.state_shape)

    def log_prob(self, x: Tensor) -> Tensor:
        x = self._check_x(x)
        if self.dtype is not None:
            x = x.to(self.dtype)
        lead = x.shape[:-2]
        if self.sample_batch is None or x.dim() < 3 or math.prod(lead) <= self.sample_batch:
            return self.dist.log_prob(x)
        flat = x.reshape(-1, *x.shape[-2:])  # samples in chunks of sample_batch rows, like sample()
        out = [self.dist.log_prob(flat[i:i + self.sample_batch]) for i in range(0, len(flat), self.sample_batch)]
        return torch.cat(out).reshape(*lead, self.batch_size)


class SamplerPosterior(Posterior):
    """A posterior given by functions of the batch it stands for.

    Args:
        sample_fn: ``(n, generator) -> (n, B, *state_shape)``.
        batch_size: ``B``.
        state_shape: the shape of one state.
        mean_fn: optional ``() -> (B, *state_shape)``; otherwise a Monte Carlo mean.
        log_prob_fn: optional ``x (..., B, *state_shape) -> (..., B)``; without it :meth:`log_prob` raises.
        device: where the samples live (for the generator of the Monte Carlo moments).
    """

    def __init__(self, sample_fn: Callable[[int, torch.Generator | None], Tensor], batch_size: int,
                 state_shape: tuple[int, ...], mean_fn: Callable[[], Tensor] | None = None,
                 log_prob_fn: Callable[[Tensor], Tensor] | None = None, device: torch.device | str = "cpu"):
        self.sample_fn, self.mean_fn, self.log_prob_fn = sample_fn, mean_fn, log_prob_fn
        self.batch_size, self.state_shape = int(batch_size), tuple(state_shape)
        self.has_log_prob = log_prob_fn is not None
        self.device = torch.device(device)

    def _device(self) -> torch.device:
        return self.device

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        x = self.sample_fn(self._check_n(n), generator)
        expected = (n, self.batch_size, *self.state_shape)
        if tuple(x.shape) != expected:
            raise ValueError(f"the sampler returned shape {tuple(x.shape)}, expected {expected}")
        return x

    def mean(self) -> Tensor:
        return self.mean_fn() if self.mean_fn is not None else super().mean()

    def log_prob(self, x: Tensor) -> Tensor:
        if self.log_prob_fn is None:
            return super().log_prob(x)
        self._check_x(x)
        return self.log_prob_fn(x)


class PointPosterior(Posterior):
    """A point estimate ``(B, *state_shape)`` without uncertainty: every sample is the estimate, ``std`` is 0."""

    def __init__(self, estimate: Tensor):
        if estimate.dim() < 2:
            raise ValueError(f"estimate must be (B, *state_shape), got shape {tuple(estimate.shape)}")
        self.estimate = estimate
        self.batch_size, self.state_shape = estimate.shape[0], tuple(estimate.shape[1:])

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return self.estimate.expand(self._check_n(n), *self.estimate.shape)

    def mean(self) -> Tensor:
        return self.estimate

    def std(self) -> Tensor:
        return torch.zeros_like(self.estimate)

r"""Gradient-based samplers of unnormalized densities, vectorized over many independent targets.

Every function works on ``(C, B, D)`` tensors: ``C`` chains (or particles) for each of ``B`` independent targets
(e.g. test windows) of ``D`` variables, and takes a differentiable ``(C, B, D) -> (C, B)`` log density.

**Preconditioned MALA** (:func:`mala`),

.. math:: v' = v + \tfrac{h}{2} S \nabla \log\pi(v) + \sqrt{h}\, S^{1/2} \xi, \qquad \xi \sim \mathcal{N}(0, I),

with a Metropolis-Hastings correction; the step :math:`h` is adapted per target towards an acceptance of 0.574 during
warm-up, and the preconditioner :math:`S` is the covariance of the warm-up draws of the target (pooled over chains).

**Tempered SMC** (:func:`smc`), for :math:`\pi(v) \propto p(v)\,\ell(v)` with draws of :math:`p` at hand, moves
:math:`N` particles from :math:`p` through :math:`\pi_b \propto p\, \ell^{\,b}`,
:math:`0 = b_0 < b_1 < \dots < b_K = 1`. At each step, per target,

.. math:: w_i = \ell(v_i)^{b_{k+1} - b_k}, \qquad
          \frac{(\sum_i w_i)^2}{\sum_i w_i^2} = \rho N \ \text{(bisection on } b_{k+1}\text{)}, \qquad
          \log \hat Z \mathrel{+}= \log \frac1N \sum_i w_i,

then systematic resampling by :math:`w` and ``moves`` MALA steps invariant for :math:`\pi_{b_{k+1}}` (:math:`S` the
weighted particles' covariance, shrunk towards its diagonal by :math:`\min(1, D / \mathrm{ESS})`; :math:`h` adapted
towards an acceptance of 0.5). Unlike importance resampling
of draws of :math:`p` followed by a few MALA steps, it does not collapse when :math:`\ell` is sharp relative to
:math:`p` (an effective sample size of a few draws in thousands), and it weighs separated modes by their mass.

The preconditioner is dense (a ``(B, D, D)`` Cholesky factor) up to ``DENSE_MAX`` variables when there are at least
``2 D`` draws to estimate it from, and diagonal otherwise (``dense=`` overrides it): the dense one costs ``D^2`` per
chain and step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["mala", "smc", "SMCResult", "path_at", "tempered_log_evidence", "systematic_resample",
           "effective_sample_size", "DENSE_MAX"]

DENSE_MAX = 256  # dense preconditioners up to this many variables (their cost grows as D^2 per chain and step)


def _apply(M: Tensor, v: Tensor) -> Tensor:
    """``M v`` for every chain: ``M`` ``(B, D, D)`` dense or ``(B, D)`` diagonal, ``v`` ``(C, B, D)``."""
    return torch.einsum("bij,cbj->cbi", M, v) if M.dim() == 3 else M * v


def _drift(v: Tensor, g: Tensor, h: Tensor, S_half: Tensor) -> Tensor:
    """``v + h/2 S g`` with ``S = S_half S_half^T``: ``v, g (C, B, D)``, ``h (B,)``."""
    if S_half.dim() == 3:
        return v + 0.5 * h[None, :, None] * torch.einsum("bij,bkj,cbk->cbi", S_half, S_half, g)
    return v + 0.5 * h[None, :, None] * S_half.square() * g


def _preconditioner(draws: Tensor, dense: bool, jitter: float, floor: float = 1e-12,
                    log_w: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Square root of the covariance of ``draws`` ``(n, B, D)`` per target and its inverse: ``(B, D, D)`` Cholesky
    factors (``dense``) or ``(B, D)`` standard deviations, with ``jitter`` x the mean variance + ``floor`` added.

    With log-weights ``log_w`` ``(n, B)`` the covariance is the weighted one, shrunk towards its diagonal by
    ``min(1, D / ESS)`` (a sample covariance of few effective draws is noisy in its off-diagonal terms)."""
    n, B, D = draws.shape
    if log_w is None:
        c = draws - draws.mean(0)
        w, shrink = torch.full((n, B), 1 / max(n - 1, 1), dtype=draws.dtype, device=draws.device), None
    else:
        w = torch.softmax(log_w, 0)
        c = draws - torch.einsum("nb,nbi->bi", w, draws)
        w = w / (1 - w.square().sum(0)).clamp_min(1e-12)  # unbiased weighted covariance
        shrink = (D / effective_sample_size(log_w)).clamp(max=1.0)[:, None, None]
    if not dense:
        var = torch.einsum("nb,nbi->bi", w, c.square())
        sd = (var + jitter * var.mean(-1, keepdim=True) + floor).sqrt()
        return sd, 1 / sd
    cov = torch.einsum("nb,nbi,nbj->bij", w, c, c)
    if shrink is not None:
        cov = (1 - shrink) * cov + shrink * torch.diag_embed(cov.diagonal(dim1=-2, dim2=-1))
    eye = torch.eye(D, dtype=draws.dtype, device=draws.device)
    cov = cov + (jitter * cov.diagonal(dim1=-2, dim2=-1).mean(-1) + floor)[:, None, None] * eye
    S_half = torch.linalg.cholesky(cov)
    return S_half, torch.linalg.inv(S_half)


def _mala_step(value_and_grad: Callable[[Tensor], tuple[Tensor, Tensor, tuple[Tensor, ...]]], v: Tensor,
               target: Tensor, g: Tensor, aux: tuple[Tensor, ...], h: Tensor, S_half: Tensor, S_half_inv: Tensor,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, ...], Tensor]:
    """One preconditioned MALA step with its Metropolis-Hastings correction, for ``(C, B, D)`` chains.

    Args:
        value_and_grad: ``v -> (log target (C, B), its gradient (C, B, D), aux)``, ``aux`` a tuple of ``(C, B)``
            values carried along with the accepted states.
        v, target, g, aux: the current states and their values.
        h: ``(B,)`` step sizes; S_half, S_half_inv: the preconditioner's square root and its inverse, ``(B, D, D)``
            (dense) or ``(B, D)`` (diagonal).
        generator: random generator.

    Returns:
        The new ``v, target, g, aux`` and the acceptance rate per target ``(B,)``.
    """

    def log_q(to: Tensor, frm: Tensor, g_frm: Tensor) -> Tensor:  # log N(to; drift(frm), h S) up to a constant
        r = _apply(S_half_inv, to - _drift(frm, g_frm, h, S_half))
        return -0.5 * r.pow(2).sum(-1) / h[None]

    xi = torch.randn(v.shape, generator=generator, dtype=v.dtype, device=v.device)
    prop = _drift(v, g, h, S_half) + h.sqrt()[None, :, None] * _apply(S_half, xi)
    target_p, g_p, aux_p = value_and_grad(prop)
    log_alpha = torch.nan_to_num(target_p - target + log_q(v, prop, g_p) - log_q(prop, v, g), nan=-math.inf)
    acc = torch.rand(log_alpha.shape, generator=generator, dtype=v.dtype, device=v.device).log() < log_alpha
    v = torch.where(acc[..., None], prop, v)
    g = torch.where(acc[..., None], g_p, g)
    target = torch.where(acc, target_p, target)
    aux = tuple(torch.where(acc, a_p, a) for a_p, a in zip(aux_p, aux))
    return v, target, g, aux, acc.to(v.dtype).mean(0)


def _dense(dense: bool | None, D: int, draws: int) -> bool:
    """The preconditioner's kind: ``dense`` if given, else dense up to ``DENSE_MAX`` variables and ``2 D`` draws."""
    return D <= DENSE_MAX and draws >= 2 * D if dense is None else bool(dense)


def _check_chains(v0: Tensor, least: int) -> None:
    if v0.dim() != 3 or v0.shape[0] < least:
        raise ValueError(f"v0 must be (chains or particles >= {least}, targets, D), got {tuple(v0.shape)}")
    if not torch.isfinite(v0).all():
        raise ValueError("v0 has non-finite values")


def mala(log_prob: Callable[[Tensor], Tensor], v0: Tensor, steps: int, warmup: int, thin: int = 1,
         generator: torch.Generator | None = None, progress: bool = False,
         dense: bool | None = None) -> tuple[Tensor, Tensor]:
    """Preconditioned MALA over ``(C, B, D)`` chains (``C`` chains of ``B`` independent targets).

    Args:
        log_prob: ``(C, B, D) -> (C, B)`` unnormalized log density (differentiable).
        v0: ``(C, B, D)`` initial states.
        steps: iterations after warm-up.
        warmup: iterations of step-size adaptation; the preconditioner is the covariance of the second half of the
            warm-up draws (per target, pooled over chains), the step re-adapted after it is set.
        thin: keep every ``thin``-th draw after warm-up.
        generator: random generator.
        progress: show a progress bar.
        dense: dense preconditioner (default: up to ``DENSE_MAX`` variables and from ``2 D`` draws), else diagonal.

    Returns:
        Draws ``(steps // thin, C, B, D)`` and the acceptance rate per target after warm-up ``(B,)``.
    """
    _check_chains(v0, 1)
    if steps < 1 or warmup < 4 or thin < 1:
        raise ValueError(f"need steps >= 1, warmup >= 4 and thin >= 1, got {steps}, {warmup}, {thin}")
    C, B, D = v0.shape
    dense = _dense(dense, D, C * (warmup // 2 - warmup // 4))

    def value_and_grad(v: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
        with torch.enable_grad():
            v = v.detach().requires_grad_(True)
            lp = log_prob(v)
            (g,) = torch.autograd.grad(lp.sum(), v)
        return lp.detach(), g, ()

    ones = torch.ones(B, D, dtype=v0.dtype, device=v0.device)
    S_half = torch.diag_embed(ones) if dense else ones  # S = S_half S_half^T
    S_half_inv = S_half.clone()
    log_h = torch.full((B,), math.log(0.1 / D ** (1 / 3)), dtype=v0.dtype, device=v0.device)
    v, (lp, g, _) = v0, value_and_grad(v0)
    draws, accepted, warm = [], torch.zeros(B, dtype=v0.dtype, device=v0.device), []
    half = warmup // 2  # first half: identity preconditioner; second half: the covariance of the first half's draws

    for it in tqdm(range(warmup + steps), desc="MALA", disable=not progress, leave=False):
        v, lp, g, _, rate = _mala_step(value_and_grad, v, lp, g, (), log_h.exp(), S_half, S_half_inv, generator)
        if it < warmup:  # Robbins-Monro on log h, restarted with the preconditioner
            k = it if it < half else it - half
            log_h = log_h + 0.5 * (rate - 0.574) / math.sqrt(1 + k)
            if it >= half // 2:
                warm.append(v)
            if it == half - 1:
                S_half, S_half_inv = _preconditioner(torch.stack(warm).reshape(-1, B, D), dense, 1e-8, 0.0)
                log_h = torch.full((B,), math.log(1.0 / D ** (1 / 3)), dtype=v.dtype, device=v.device)
        else:
            accepted += rate
            if (it - warmup) % thin == 0:
                draws.append(v)
    return torch.stack(draws), accepted / steps


class SMCResult(NamedTuple):
    """Output of :func:`smc` for ``B`` targets of ``N`` particles each."""

    particles: Tensor  # (N, B, D) equally weighted draws of the final target
    log_evidence: Tensor  # (B,) estimate of log Z = log E_prior[likelihood]
    temperatures: Tensor  # (B,) number of temperatures b_1, ..., b_K = 1 (K)
    ess: Tensor  # (B,) smallest ESS of the incremental weights over the temperatures (a count of particles)
    acceptance: Tensor  # (B,) mean MALA acceptance over all moves
    # with record=True, per temperature (b_0 = 0 first): b (B,), log Z_b (B,), and log l and log p of the particles
    # (N, B) after their moves at b (and, with record_state, the mapped particles (N, B, D'))
    path: list[tuple[Tensor, ...]] | None = None


def systematic_resample(log_w: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Systematic resampling of ``(N, B)`` log weights (one column per target): ancestor indices ``(N, B)``."""
    N, B = log_w.shape
    cdf = torch.softmax(log_w, dim=0).T.cumsum(-1)  # (B, N)
    cdf[:, -1] = 1.0
    u = (torch.rand(B, 1, generator=generator, dtype=log_w.dtype, device=log_w.device)
         + torch.arange(N, dtype=log_w.dtype, device=log_w.device)) / N
    return torch.searchsorted(cdf.contiguous(), u).clamp_(max=N - 1).T


def effective_sample_size(log_w: Tensor) -> Tensor:
    """Effective sample size ``(sum w)^2 / sum w^2`` of ``(N, B)`` log weights, per target ``(B,)``."""
    return (2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)).exp()


def smc(log_prior_and_likelihood: Callable[[Tensor], tuple[Tensor, Tensor]], v0: Tensor, moves: int = 10,
        ess_fraction: float = 0.5, target_acceptance: float = 0.5, max_temperatures: int = 500,
        generator: torch.Generator | None = None, progress: bool = False, dense: bool | None = None,
        record: bool = False, record_log_prior: Callable[[Tensor], Tensor] | None = None,
        record_state: Callable[[Tensor], Tensor] | None = None) -> SMCResult:
    r"""Likelihood-tempered SMC over ``B`` independent targets of ``N`` particles each (see the module).

    Targets :math:`\pi_b(v) \propto p(v)\, \ell(v)^b` for :math:`0 = b_0 < b_1 < \dots < b_K = 1`; each step picks
    :math:`b_{k+1}` per target by bisection so that the incremental weights :math:`w_i = \ell(v_i)^{b_{k+1} - b_k}`
    have :math:`\mathrm{ESS} = (\sum w_i)^2 / \sum w_i^2 = \rho N` (or :math:`b_{k+1} = 1` if that ESS is larger),
    accumulates :math:`\log Z \mathrel{+}= \log \frac1N \sum_i w_i`, resamples systematically and moves every particle
    by ``moves`` preconditioned MALA steps invariant for :math:`\pi_{b_{k+1}}` (preconditioner: the weighted
    particles' covariance before resampling, shrunk towards its diagonal by ``min(1, D / ESS)``; step size adapted
    towards ``target_acceptance`` from the population's acceptance).
    Targets that reach :math:`b = 1` first keep being moved at :math:`b = 1` until all have.

    Args:
        log_prior_and_likelihood: ``v (N, B, D) -> (log p(v) (N, B), log l(v) (N, B))`` (differentiable; ``p`` and
            ``l`` need not be normalized: ``log_evidence`` is then relative to their constants).
        v0: ``(N, B, D)`` draws from the prior ``p``.
        moves: MALA steps per temperature.
        ess_fraction: the ESS of each step's incremental weights, as a fraction of ``N`` (``rho``).
        target_acceptance: MALA acceptance the step size is adapted towards.
        max_temperatures: raise if a target needs more temperatures than this.
        generator: random generator.
        progress: show a progress bar (of the smallest temperature over the targets).
        dense: dense preconditioner (default: up to ``DENSE_MAX`` variables and from ``2 D`` draws), else diagonal.
        record: keep the path of temperatures, evidences and the particles' log-likelihoods
            (:func:`tempered_log_evidence` reads it).
        record_log_prior: ``v (N, B, D) -> (N, B)``: the log prior density the path records instead of ``log p``
            (called without gradients, once per temperature), e.g. the density of the original variables where SMC
            runs over a reparametrization ``v`` of them (the prior's log-Jacobian added back).
        record_state: ``v (N, B, D) -> (N, B, D')``: with ``record``, the path also keeps the particles through this
            map after their moves at each temperature (a fifth element of each entry), e.g. the original variables
            where SMC runs over a reparametrization; the distance statistics of the tempered targets need them.

    Returns:
        An :class:`SMCResult`.
    """
    _check_chains(v0, 2)
    if moves < 1 or not 0 < ess_fraction < 1 or not 0 < target_acceptance < 1 or max_temperatures < 1:
        raise ValueError(f"need moves >= 1, 0 < ess_fraction < 1, 0 < target_acceptance < 1 and max_temperatures "
                         f">= 1, got {moves}, {ess_fraction}, {target_acceptance}, {max_temperatures}")
    N, B, D = v0.shape
    dt, dev = v0.dtype, v0.device
    dense = _dense(dense, D, N)

    def evaluate(v: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # log prior, log lik, grad of the tempered
        with torch.enable_grad():
            v = v.detach().requires_grad_(True)
            lp, ll = log_prior_and_likelihood(v)
            (g,) = torch.autograd.grad((lp + b * ll).sum(), v)
        bad = ~(torch.isfinite(lp) & torch.isfinite(ll) & torch.isfinite(g).all(-1))
        ll = torch.where(bad, torch.full_like(ll, -math.inf), ll.detach())
        return lp.detach(), ll, torch.where(bad[..., None], torch.zeros_like(g), g)

    b = torch.zeros(B, dtype=dt, device=dev)
    v = v0.detach().clone()
    lp, ll, g = evaluate(v, b)
    if not torch.isfinite(ll).any(0).all():
        raise ValueError("the likelihood is not finite at any prior draw of some target")
    log_z = torch.zeros(B, dtype=dt, device=dev)
    log_h = torch.full((B,), math.log(1.0 / D ** (1 / 3)), dtype=dt, device=dev)
    n_temp = torch.zeros(B, dtype=torch.long, device=dev)
    min_ess = torch.full((B,), float(N), dtype=dt, device=dev)
    acc_sum, n_moves = torch.zeros(B, dtype=dt, device=dev), 0
    bar = tqdm(total=100, desc="SMC", disable=not progress, leave=False)
    def recorded(v: Tensor, lp: Tensor) -> Tensor:
        if record_log_prior is None:
            return lp.clone()
        with torch.no_grad():
            return record_log_prior(v.detach()).to(lp.dtype)

    def entry(v: Tensor, lp: Tensor) -> tuple[Tensor, ...]:
        kept = (b.clone(), log_z.clone(), ll.clone(), recorded(v, lp))
        if record_state is None:
            return kept
        with torch.no_grad():
            return (*kept, record_state(v.detach()))

    path = [entry(v, lp)] if record else None

    while bool((b < 1).any()):
        if int(n_temp.max()) >= max_temperatures:
            raise RuntimeError(f"SMC needed more than {max_temperatures} temperatures (b = {b.tolist()})")
        # next temperature: bisection on the increment so that ESS(exp(delta * ll)) = rho * N
        room = 1 - b
        full = effective_sample_size(room * ll) >= ess_fraction * N
        lo, hi = torch.zeros_like(b), room.clone()
        for _ in range(60):
            mid = 0.5 * (lo + hi)
            ok = effective_sample_size(mid * ll) >= ess_fraction * N
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
        delta = torch.where(full, room, lo)
        delta = torch.where(b < 1, delta.clamp(min=torch.finfo(dt).tiny), torch.zeros_like(delta))
        log_w = torch.where(delta > 0, delta * ll, torch.zeros_like(ll))  # -inf likelihoods get weight 0
        log_z = log_z + torch.logsumexp(log_w, 0) - math.log(N)
        min_ess = torch.minimum(min_ess, torch.where(b < 1, effective_sample_size(log_w), min_ess))
        n_temp = n_temp + (b < 1).long()
        b = torch.where(full, torch.ones_like(b), b + delta)
        # the preconditioner from the weighted particles, then resample and move at the new temperature
        S_half, S_half_inv = _preconditioner(v, dense, 1e-9, log_w=log_w)
        idx = systematic_resample(log_w, generator)
        v, lp, ll = (torch.gather(a, 0, idx[..., None].expand(-1, -1, D)) if a.dim() == 3 else torch.gather(a, 0, idx)
                     for a in (v, lp, ll))

        def tempered(x: Tensor, b: Tensor = b) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
            lp_x, ll_x, g_x = evaluate(x, b)
            return lp_x + b * ll_x, g_x, (lp_x, ll_x)

        target, g, (lp, ll) = tempered(v)
        for _ in range(moves):
            v, target, g, (lp, ll), rate = _mala_step(tempered, v, target, g, (lp, ll), log_h.exp(), S_half,
                                                      S_half_inv, generator)
            log_h = log_h + (rate - target_acceptance)
            acc_sum, n_moves = acc_sum + rate, n_moves + 1
        if path is not None:
            path.append(entry(v, lp))
        bar.update(int(100 * float(b.min())) - bar.n)
    bar.close()
    return SMCResult(v, log_z, n_temp, min_ess, acc_sum / max(n_moves, 1), path)


def path_at(path: list[tuple[Tensor, ...]], tau: Tensor) -> tuple[Tensor, ...]:
    """The state of a recorded :func:`smc` path at the last temperature :math:`b_k \\le \\tau` of each target, for
    every temperature of ``tau`` ``(S,)`` in ``[0, 1]``: ``b_k``, ``log Z(b_k)`` ``(S, B)`` and the particles' log
    likelihoods and log prior densities ``(S, N, B)`` there (and their recorded states ``(S, N, B, D')`` where the
    path has them, ``smc(..., record_state=...)``)."""
    if not path:
        raise ValueError("path is empty: run smc(..., record=True)")
    tau = torch.as_tensor(tau, dtype=path[0][0].dtype, device=path[0][0].device).reshape(-1)
    if (tau < 0).any() or (tau > 1).any():
        raise ValueError(f"temperatures must lie in [0, 1], got {tau.tolist()}")
    b = torch.stack([p[0] for p in path])  # (K, B), non-decreasing down the path
    k = (b[None] <= tau[:, None, None]).sum(1) - 1  # (S, B): the last temperature at or below tau
    pick = k[:, None, :].expand(-1, path[0][2].shape[0], -1)
    out = (torch.gather(b, 0, k), torch.gather(torch.stack([p[1] for p in path]), 0, k),
           torch.gather(torch.stack([p[2] for p in path]), 0, pick),
           torch.gather(torch.stack([p[3] for p in path]), 0, pick))
    if len(path[0]) < 5:
        return out
    states = torch.stack([p[4] for p in path])  # (K, N, B, D')
    return (*out, torch.gather(states, 0, pick[..., None].expand(-1, -1, -1, states.shape[-1])))


def tempered_log_evidence(path: list[tuple[Tensor, ...]], tau: Tensor) -> Tensor:
    r"""``log Z(tau) = log E_p[l^tau]`` for temperatures ``tau`` in ``[0, 1]``, from the ``path`` of an
    :func:`smc` run with ``record=True``: from the last temperature :math:`b_k \le \tau` of each target
    (:func:`path_at`), :math:`\log Z(\tau) = \log Z(b_k) + \log \frac1N \sum_i \ell(v_i)^{\tau - b_k}` over
    its particles (an importance-sampling step no longer than the run's own, whose effective sample size was kept at
    ``rho N``).

    Args:
        path: ``SMCResult.path``.
        tau: ``(S,)`` temperatures.

    Returns:
        ``(S, B)`` log-evidences (relative to the constants of ``p`` and ``l``).
    """
    bk, zk, llk = path_at(path, tau)[:3]
    tau = torch.as_tensor(tau, dtype=bk.dtype, device=bk.device).reshape(-1)
    step = (tau[:, None] - bk)[:, None, :]
    log_w = torch.where(step > 0, step * llk, torch.zeros_like(llk))
    return zk + torch.logsumexp(log_w, 1) - math.log(llk.shape[1])

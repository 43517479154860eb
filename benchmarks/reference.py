r"""Reference posterior of a window by MCMC over the window's initial state through the deterministic dynamics.

The states of a window are a deterministic function of the state at its first observation time :math:`s_0`:
:math:`x_{s_j} = M^{(s_j - s_0)}(x_{s_0})`. With a Gaussian prior :math:`x_{s_0} \sim \mathcal{N}(\mu, LL^\top)` and
whitened coordinates :math:`x_{s_0} = \mu + L v`, the target density is

.. math:: \log \pi(v) = -\tfrac12 \lVert v \rVert^2
          - \tfrac{1}{2\sigma^2} \sum_j \lVert m_j \odot (y_j - H M^{(s_j - s_0)}(\mu + L v)) \rVert^2 + c,

(the negative strong-constraint 4D-Var cost). It is sampled by preconditioned MALA, vectorized over chains and
windows, gradients by autograd through the differentiable simulator:

.. math:: v' = v + \tfrac{h}{2} S \nabla \log\pi(v) + \sqrt{h}\, S^{1/2} \xi, \qquad \xi \sim \mathcal{N}(0, I),

with a Metropolis-Hastings correction; the step :math:`h` is adapted per window towards an acceptance of 0.574 during
warm-up, and the preconditioner :math:`S` is the covariance of the warm-up draws of the window (pooled over chains).
Chains start from prior draws (over-dispersed), and the draws of :math:`x_t` (the window's target, pushed through
the dynamics) are checked with arviz's rank-normalized split R-hat and bulk ESS across chains.

**Prior choice for ``lorenz96``**: the task draws :math:`x_0 \sim \mathcal{N}(0, I)` and integrates for :math:`t`
time units, so the exact prior of :math:`x_{s_0}` is the push-forward of that Gaussian. Sampling over :math:`x_0`
through :math:`t` up to 50 time units of chaotic dynamics is hopeless, so the prior used is the Gaussian fitted to
simulated states at the window's start time (the time-binned :class:`~sbida.baselines.Climatology` of a dedicated
simulation of ``prior_trajectories`` trajectories, one bin per saved time): exact in its first two moments, Gaussian
in shape. For ``linear-gaussian`` the exact Gaussian prior :meth:`LinearGaussian.prior` is used, which makes the
sampler checkable against the Kalman posterior.

Samples are cached to disk, one ``.pt`` file per window, keyed by the task configuration, the sampler settings and
the window's content (observations, mask, time).

    python benchmarks/reference.py [--K 8] [--windows 0 1 2] [--cache DIR] [--chains 16] [--steps 4000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sbida.baselines import Climatology, FourDVar
from sbida.posterior import EnsemblePosterior

__all__ = ["MCMCReference", "mala", "convergence"]

PriorFn = Callable[[Tensor], tuple[Tensor, Tensor]]


def mala(log_prob: Callable[[Tensor], Tensor], v0: Tensor, steps: int, warmup: int, thin: int = 1,
         generator: torch.Generator | None = None, progress: bool = False) -> tuple[Tensor, Tensor]:
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

    Returns:
        Draws ``(steps // thin, C, B, D)`` and the acceptance rate per target after warm-up ``(B,)``.
    """
    if v0.dim() != 3:
        raise ValueError(f"v0 must be (chains, targets, D), got {tuple(v0.shape)}")
    if steps < 1 or warmup < 4 or thin < 1:
        raise ValueError(f"need steps >= 1, warmup >= 4 and thin >= 1, got {steps}, {warmup}, {thin}")
    C, B, D = v0.shape

    def value_and_grad(v: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            v = v.detach().requires_grad_(True)
            lp = log_prob(v)
            (g,) = torch.autograd.grad(lp.sum(), v)
        return lp.detach(), g

    eye = torch.eye(D, dtype=v0.dtype)
    S_half = eye.expand(B, D, D).clone()  # (B, D, D): S = S_half S_half^T
    S_half_inv = S_half.clone()
    log_h = torch.full((B,), math.log(0.1 / D ** (1 / 3)), dtype=v0.dtype)
    v, (lp, g) = v0, value_and_grad(v0)
    draws, accepted, warm = [], torch.zeros(B, dtype=v0.dtype), []
    half = warmup // 2  # first half: identity preconditioner; second half: the covariance of the first half's draws

    def drift(v, g, h):  # v + h/2 S g, with S = S_half S_half^T
        Sg = torch.einsum("bij,bkj,cbk->cbi", S_half, S_half, g)
        return v + 0.5 * h[None, :, None] * Sg

    def log_q(to, frm, g_frm, h):  # log N(to; drift(frm), h S) up to a constant shared by both directions
        r = torch.einsum("bij,cbj->cbi", S_half_inv, to - drift(frm, g_frm, h))
        return -0.5 * r.pow(2).sum(-1) / h[None]

    for it in tqdm(range(warmup + steps), desc="MALA", disable=not progress, leave=False):
        h = log_h.exp()
        xi = torch.randn(v.shape, generator=generator, dtype=v.dtype)
        prop = drift(v, g, h) + h.sqrt()[None, :, None] * torch.einsum("bij,cbj->cbi", S_half, xi)
        lp_p, g_p = value_and_grad(prop)
        log_alpha = torch.nan_to_num(lp_p - lp + log_q(v, prop, g_p, h) - log_q(prop, v, g, h), nan=-math.inf)
        u = torch.rand(log_alpha.shape, generator=generator, dtype=v.dtype)
        acc = u.log() < log_alpha  # (C, B)
        v = torch.where(acc[..., None], prop, v)
        lp = torch.where(acc, lp_p, lp)
        g = torch.where(acc[..., None], g_p, g)
        rate = acc.to(v.dtype).mean(0)
        if it < warmup:  # Robbins-Monro on log h, restarted with the preconditioner
            k = it if it < half else it - half
            log_h = log_h + 0.5 * (rate - 0.574) / math.sqrt(1 + k)
            if it >= half // 2:
                warm.append(v)
            if it == half - 1:
                W = torch.stack(warm).reshape(-1, B, D)
                Wc = W - W.mean(0)
                cov = torch.einsum("nbi,nbj->bij", Wc, Wc) / max(W.shape[0] - 1, 1)
                cov = cov + 1e-8 * cov.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * eye
                S_half = torch.linalg.cholesky(cov)
                S_half_inv = torch.linalg.inv(S_half)
                log_h = torch.full((B,), math.log(1.0 / D ** (1 / 3)), dtype=v.dtype)
        else:
            accepted += rate
            if (it - warmup) % thin == 0:
                draws.append(v)
    return torch.stack(draws), accepted / steps


def convergence(draws: Tensor) -> dict[str, float]:
    """Largest rank-normalized split R-hat and smallest bulk ESS over variables, by arviz.

    Args:
        draws: ``(n, C, B, D)`` draws of ``C`` chains for ``B`` targets.

    Returns:
        ``{"rhat": max R-hat, "ess": min bulk ESS}`` over targets and variables (and per target in lists).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz as az

        a = draws.permute(1, 0, 2, 3).detach().cpu().double().numpy()  # (chain, draw, target, var)
        ds = az.convert_to_dataset({"x": a}, dims={"x": ["window", "var"]})
        rhat = torch.as_tensor(az.rhat(ds)["x"].values)  # (B, D)
        ess = torch.as_tensor(az.ess(ds, method="bulk")["x"].values)
    return {"rhat": float(rhat.max()), "ess": float(ess.min()), "rhat_per_window": rhat.amax(-1).tolist(),
            "ess_per_window": ess.amin(-1).tolist()}


class MCMCReference(FourDVar):
    """Reference posteriors of windows by MALA over the window's initial state (see the module).

    Args:
        simulator, observation, offsets, every: as for :class:`~sbida.baselines.FourDVar` (use :meth:`for_task`).
        prior: ``(t_start (B,)) -> (mean (B, D), cov (B, D, D))`` the Gaussian prior of the window's first state;
            default: the moments of the climatology (call :meth:`fit` or :meth:`fit_prior`).
        chains: chains per window.
        steps: MALA iterations kept per chain (after warm-up), thinned by ``thin``.
        warmup: adaptation iterations.
        thin: thinning of the kept draws.
        cache: folder of the cached samples (``None``: no cache).
        key: a description of the task (its configuration) in the cache key.
        seed: seed of the chains.
        progress: show progress bars.
    """

    name = "mcmc"

    def __init__(self, simulator, observation, offsets, every=1, prior: PriorFn | None = None, chains: int = 16,
                 steps: int = 2000, warmup: int = 1000, thin: int = 4, cache: str | Path | None = None,
                 key: dict | None = None, seed: int = 0, progress: bool = False, climatology=None):
        super().__init__(simulator, observation, offsets, every=every, climatology=climatology)
        if chains < 2 or steps < thin or warmup < 10:
            raise ValueError(f"need chains >= 2, steps >= thin and warmup >= 10, got {chains}, {steps}, {warmup}")
        self.prior = prior
        self.chains, self.steps, self.warmup, self.thin = int(chains), int(steps), int(warmup), int(thin)
        self.cache = Path(cache) if cache is not None else None
        self.key = key or {}
        self.seed, self.progress = int(seed), progress
        self._diagnostics: dict[str, dict] = {}

    @classmethod
    def for_task(cls, task, **kwargs) -> MCMCReference:
        """The reference of a task: the exact Gaussian prior where the simulator has one (``prior(steps)``, the
        linear-Gaussian task), otherwise the climatology (call :meth:`fit_prior`). The cache key holds the task's
        configuration."""
        ref = cls(task.simulator, task.observation, task.window.offsets(), every=task.config.data.save_every,
                  key=task.to_dict(), **kwargs)
        if hasattr(task.simulator, "prior") and task.config.data.burn_in == 0:
            sim = task.simulator

            def exact_prior(t_start: Tensor) -> tuple[Tensor, Tensor]:
                steps = torch.round(t_start / sim.dt).long().tolist()
                moments = [sim.prior(s) for s in steps]
                return torch.stack([m for m, _ in moments]), torch.stack([c for _, c in moments])

            ref.prior = exact_prior
        return ref

    def fit_prior(self, task, n_trajectories: int = 2048, seed: int = 12345) -> MCMCReference:
        """Fit the climatological prior to a dedicated simulation of the task (one bin per saved time).

        Args:
            task: the task (its data settings, with ``n_trajectories`` and ``seed`` replaced).
            n_trajectories: trajectories of the simulation.
            seed: its seed (distinct from the data's).

        Returns:
            ``self``.
        """
        data = task.simulate(progress=self.progress, n_trajectories=n_trajectories, seed=seed)
        self.climatology = Climatology.fit(data, width=1, keep_samples=False)
        self.key = {**self.key, "prior": f"climatology of {n_trajectories} trajectories, seed {seed}"}
        return self

    def _prior(self, t_start: Tensor) -> tuple[Tensor, Tensor]:
        if self.prior is not None:
            return self.prior(t_start)
        return self._clim().moments(t_start)

    def _key(self, y: Tensor, mask: Tensor, t: Tensor) -> str:
        """Hash of the task, the sampler settings and one window's content."""
        h = hashlib.sha1()
        settings = {"task": self.key, "chains": self.chains, "steps": self.steps, "warmup": self.warmup,
                    "thin": self.thin, "seed": self.seed}
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
        for a in (y.double(), mask.bool(), t.double()):
            h.update(a.contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:20]

    @property
    def diagnostics(self) -> list[dict]:
        """Convergence diagnostics of every window seen so far (sampled or read from the cache), once each."""
        return list(self._diagnostics.values())

    def sample_windows(self, y: Tensor, mask: Tensor, t: Tensor) -> tuple[Tensor, dict]:
        """Run the chains for a batch of windows (no cache).

        Args:
            y: ``(B, T, *obs_shape)``; mask: the same shape; t: ``(B,)``.

        Returns:
            Draws of the targets ``(n, B, *state_shape)`` with ``n = chains * steps // thin`` and the convergence
            diagnostics (:func:`convergence`, plus acceptance rates and seconds).
        """
        yf, mf, t = self.check_windows(y, mask, t)
        dtype = torch.float64
        mu, cov = self._prior(self.start_time(t))
        mu, L = mu.to(dtype), torch.linalg.cholesky(cov.to(dtype))
        yd, w = yf.to(dtype), mf.to(dtype) / self.sigma
        H = self.H.to(dtype)

        def log_prob(v: Tensor) -> Tensor:  # (C, B, D) -> (C, B)
            x0 = mu + torch.einsum("bij,cbj->cbi", L, v)
            r = (yd - self.trajectory(x0) @ H.T) * w
            return -0.5 * v.pow(2).sum(-1) - 0.5 * r.pow(2).sum((-2, -1))

        g = torch.Generator().manual_seed(self.seed)
        B = yd.shape[0]
        v0 = torch.randn(self.chains, B, self.D, generator=g, dtype=dtype)
        start = time.perf_counter()
        v, acc = mala(log_prob, v0, self.steps, self.warmup, self.thin, generator=g, progress=self.progress)
        with torch.no_grad():
            x0 = mu + torch.einsum("bij,ncbj->ncbi", L, v)
            xt = self.trajectory(x0)[..., self.target_index, :]  # (n, C, B, D)
        info = convergence(xt) | {"acceptance": acc.tolist(), "seconds": time.perf_counter() - start,
                                  "chains": self.chains, "draws_per_chain": xt.shape[0]}
        samples = xt.reshape(-1, B, *self.state_shape).to(y.dtype)
        return samples, info

    def posterior(self, y: Tensor, mask: Tensor, t: Tensor) -> EnsemblePosterior:
        """The reference posterior of each window (from the cache where it holds the window), as an ensemble.

        Args:
            y: ``(B, T, *obs_shape)``; mask: the same shape; t: ``(B,)``.

        Returns:
            An :class:`~sbida.posterior.EnsemblePosterior` of ``chains * steps // thin`` draws per window.
        """
        self.check_windows(y, mask, t)
        keys = [self._key(y[i], mask[i], t[i:i + 1]) for i in range(len(t))]
        files = [self.cache / f"{k}.pt" if self.cache is not None else None for k in keys]
        out: list[Tensor | None] = [None] * len(t)
        for i, f in enumerate(files):
            if f is not None and f.exists():
                entry = torch.load(f, weights_only=True)
                out[i] = entry["samples"].to(y.dtype)
                self._diagnostics[keys[i]] = entry["info"]
        todo = [i for i, s in enumerate(out) if s is None]
        if todo:
            samples, info = self.sample_windows(y[todo], mask[todo], t[todo])
            for j, i in enumerate(todo):
                out[i] = samples[:, j]
                entry_info = {"rhat": info["rhat_per_window"][j], "ess": info["ess_per_window"][j],
                              "acceptance": info["acceptance"][j], "seconds": info["seconds"] / len(todo),
                              "chains": info["chains"], "draws_per_chain": info["draws_per_chain"],
                              "t": float(t[i])}
                self._diagnostics[keys[i]] = entry_info
                if files[i] is not None:
                    files[i].parent.mkdir(parents=True, exist_ok=True)
                    torch.save({"samples": samples[:, j].float().clone(), "info": entry_info}, files[i])
        return EnsemblePosterior(torch.stack(out, dim=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="lorenz96")
    p.add_argument("--K", type=int, default=8)
    p.add_argument("--windows", type=int, nargs="+", default=[0, 1, 2], help="test-window indices (run.py's split)")
    p.add_argument("--trajectories", type=int, default=128, help="trajectories of the dataset the windows come from")
    p.add_argument("--states", type=int, default=256)
    p.add_argument("--cache", default="runs/reference-cache")
    p.add_argument("--chains", type=int, default=16)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--thin", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import sbida

    task = sbida.tasks.get(a.task, K=a.K, n_trajectories=a.trajectories, n_states=a.states)
    data = task.simulate(progress=False)
    _, _, test = data.split(0.8, 0.1, 0.1, seed=0)
    ref = MCMCReference.for_task(task, chains=a.chains, steps=a.steps, warmup=a.warmup, thin=a.thin,
                                 cache=a.cache, progress=True)
    if ref.prior is None:
        ref.fit_prior(task)
    x, y, m, t = test.get(torch.tensor(a.windows))
    t0 = time.perf_counter()
    post = ref.posterior(y, m, t)
    print(f"{a.task} K={a.K}: {len(a.windows)} windows, {post.size} draws each, {time.perf_counter() - t0:.1f} s")
    err = (post.mean() - x).pow(2).mean(-1).sqrt()
    spread = post.std().pow(2).mean(-1).sqrt()
    for j, i in enumerate(a.windows):
        d = ref._diagnostics[ref._key(y[j], m[j], t[j:j + 1])]
        print(f"  window {i}: t={float(t[j]):.2f}  R-hat {d['rhat']:.3f}  ESS {d['ess']:.0f}  acceptance "
              f"{d['acceptance']:.2f}  RMSE of the mean {float(err[j]):.3f}  spread {float(spread[j]):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

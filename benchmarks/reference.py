r"""Reference posterior of a window by MCMC over the window's initial state through the deterministic dynamics.

The states of a window are a deterministic function of the state at its first observation time :math:`s_0`:
:math:`x_{s_j} = M^{(s_j - s_0)}(x_{s_0})`. With a Gaussian prior :math:`x_{s_0} \sim \mathcal{N}(\mu, LL^\top)` and
whitened coordinates :math:`x_{s_0} = \mu + L v`, the target density is

.. math:: \log \pi(v) = -\tfrac12 \lVert v \rVert^2
          - \tfrac{1}{2\sigma^2} \sum_j \lVert m_j \odot (y_j - H M^{(s_j - s_0)}(\mu + L v)) \rVert^2 + c,

(the negative strong-constraint 4D-Var cost), sampled by one of two samplers, vectorized over windows, gradients by
autograd through the differentiable simulator.

**MALA** (``sampler="mala"``, :func:`sbida.samplers.mala`), vectorized over chains:

.. math:: v' = v + \tfrac{h}{2} S \nabla \log\pi(v) + \sqrt{h}\, S^{1/2} \xi, \qquad \xi \sim \mathcal{N}(0, I),

with a Metropolis-Hastings correction; the step :math:`h` is adapted per window towards an acceptance of 0.574 during
warm-up, and the preconditioner :math:`S` is the covariance of the warm-up draws of the window (pooled over chains).
Chains start from prior draws (over-dispersed), and the draws of :math:`x_t` (the window's target, pushed through
the dynamics) are checked with arviz's rank-normalized split R-hat and bulk ESS across chains. On attractor windows
of ``lorenz96`` the posterior is multimodal and chains started in different modes do not mix (R-hat 4.5).

**Tempered SMC** (``sampler="smc"``, :func:`sbida.samplers.smc`), with
:math:`\log\pi(v) = \log p(v) + \log \ell(v)`, moves :math:`N` particles from the prior
:math:`p = \mathcal N(0, I)` through :math:`\pi_b \propto p\, \ell^{\,b}`,
:math:`0 = b_0 < b_1 < \dots < b_K = 1`. At each step, per window,

.. math:: w_i = \ell(v_i)^{b_{k+1} - b_k}, \qquad
          \frac{(\sum_i w_i)^2}{\sum_i w_i^2} = \rho N \ \text{(bisection on } b_{k+1}\text{)}, \qquad
          \log \hat Z \mathrel{+}= \log \frac1N \sum_i w_i,

then systematic resampling by :math:`w` and ``moves`` MALA steps invariant for :math:`\pi_{b_{k+1}}` (as above, with
:math:`S` the particles' covariance after resampling and :math:`h` adapted towards an acceptance of 0.5). The
reference pools ``runs`` independent runs; each run's particles, randomly permuted, are one chain for arviz's R-hat and
bulk ESS (:func:`smc_convergence`): runs that disagree on the weight of a mode give a low ESS and a high R-hat. On
``lorenz96`` K=8 the runs agree (R-hat < 1.03) on every window tried, in 7 to 9 temperatures, for about 3 s per window
(1024 particles, 10 moves, 4 runs; ``benchmarks/RESULTS.md``).

**Prior choice for ``lorenz96``**: the task draws :math:`x_0 \sim \mathcal{N}(0, I)` and integrates for :math:`t`
time units, so the exact prior of :math:`x_{s_0}` is the push-forward of that Gaussian. Sampling over :math:`x_0`
through :math:`t` up to 50 time units of chaotic dynamics is hopeless, so the prior is a Gaussian fitted to simulated
states (the time-binned :class:`~sbida.baselines.Climatology` of a dedicated simulation of ``prior_trajectories``
trajectories, one bin per saved time), placed ``lead`` saved states before the window's first observation and carried
to it by the dynamics. Placed at the window's start (``lead=0``) it is exact in its first two moments only, and the
states there are far from Gaussian: on K=8 a classifier tells them from their fitted Gaussian with C2ST 0.72 at
t = 0.7 and 0.97 at t = 1.5, and the reference then misses the posterior wherever the observations leave the prior
in charge. A lead of 1 time unit fixes that: windows that start sooner get the task's exact :math:`\mathcal N(0, I)`
at t = 0, and on the attractor the fitted Gaussian carried 1 time unit is close to the attractor's law (C2ST 0.53).
For ``linear-gaussian`` the exact Gaussian prior :meth:`LinearGaussian.prior` is used, which makes the
sampler checkable against the Kalman posterior.

Samples are cached to disk, one ``.pt`` file per window, keyed by the task configuration, the sampler settings and
the window's content (observations, mask, time).

    python benchmarks/reference.py [--K 8] [--windows 0 1 2] [--cache DIR] [--sampler mala|smc]
        [--chains 16] [--steps 4000] [--particles 1024] [--moves 10] [--runs 4]
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
from sbida.samplers import SMCResult, mala, smc

__all__ = ["MCMCReference", "SMCResult", "mala", "smc", "convergence", "smc_convergence"]

PriorFn = Callable[[Tensor], tuple[Tensor, Tensor]]


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


def smc_convergence(runs: Tensor, generator: torch.Generator | None = None) -> dict[str, float]:
    """:func:`convergence` across independent SMC runs, each run's particles taken as one chain after a random
    permutation (so that the R-hat measures the disagreement between the runs, e.g. in their mode weights).

    Args:
        runs: ``(R, N, B, D)`` equally weighted particles of ``R`` independent runs for ``B`` targets.
        generator: random generator of the permutations.

    Returns:
        As :func:`convergence`, with the runs as chains.
    """
    if runs.dim() != 4 or runs.shape[0] < 2:
        raise ValueError(f"runs must be (runs >= 2, particles, targets, D), got {tuple(runs.shape)}")
    R, N = runs.shape[:2]
    perm = torch.argsort(torch.rand(R, N, generator=generator), dim=1)
    shuffled = torch.stack([runs[r, perm[r]] for r in range(R)])
    return convergence(shuffled.transpose(0, 1))


class MCMCReference(FourDVar):
    """Reference posteriors of windows by MALA or tempered SMC over the window's initial state (see the module).

    Args:
        simulator, observation, offsets, every: as for :class:`~sbida.baselines.FourDVar` (use :meth:`for_task`).
        prior: ``(t_start (B,)) -> (mean (B, D), cov (B, D, D))`` the Gaussian prior of the window's first state;
            default: the moments of the climatology (call :meth:`fit` or :meth:`fit_prior`).
        sampler: ``"mala"`` (:func:`mala`) or ``"smc"`` (:func:`smc`).
        chains: MALA chains per window.
        steps: MALA iterations kept per chain (after warm-up), thinned by ``thin``.
        warmup: MALA adaptation iterations.
        thin: thinning of the kept MALA draws.
        particles: SMC particles per run and window.
        moves: SMC MALA moves per temperature.
        runs: independent SMC runs per window (their particles are pooled; R-hat is taken across them).
        lead: saved states before the window's first observation at which the Gaussian prior is placed (fewer where
            the trajectory starts sooner: the prior then sits at ``t = 0``, the task's exact initial distribution);
            the dynamics carry it to the window. ``0``: the prior of the window's first state itself.
        cache: folder of the cached samples (``None``: no cache).
        key: a description of the task (its configuration) in the cache key.
        seed: seed of the chains.
        progress: show progress bars.
    """

    name = "mcmc"

    def __init__(self, simulator, observation, offsets, every=1, prior: PriorFn | None = None, sampler: str = "mala",
                 chains: int = 16, steps: int = 2000, warmup: int = 1000, thin: int = 4, particles: int = 1024,
                 moves: int = 10, runs: int = 4, lead: int = 0, cache: str | Path | None = None,
                 key: dict | None = None, seed: int = 0, progress: bool = False, climatology=None):
        super().__init__(simulator, observation, offsets, every=every, climatology=climatology)
        if sampler not in ("mala", "smc"):
            raise ValueError(f"sampler must be 'mala' or 'smc', got {sampler!r}")
        if chains < 2 or steps < thin or warmup < 10:
            raise ValueError(f"need chains >= 2, steps >= thin and warmup >= 10, got {chains}, {steps}, {warmup}")
        if particles < 2 or moves < 1 or runs < 2:
            raise ValueError(f"need particles >= 2, moves >= 1 and runs >= 2, got {particles}, {moves}, {runs}")
        if lead < 0:
            raise ValueError(f"lead must be >= 0 saved states, got {lead}")
        self.lead = int(lead)
        self.prior, self.sampler = prior, sampler
        self.chains, self.steps, self.warmup, self.thin = int(chains), int(steps), int(warmup), int(thin)
        self.particles, self.moves, self.runs = int(particles), int(moves), int(runs)
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
        if self.sampler == "mala":  # the settings of the MALA cache entries written before SMC existed
            settings = {"task": self.key, "chains": self.chains, "steps": self.steps, "warmup": self.warmup,
                        "thin": self.thin, "seed": self.seed}
        else:
            settings = {"task": self.key, "sampler": "smc", "particles": self.particles, "moves": self.moves,
                        "runs": self.runs, "seed": self.seed}
        if self.lead:  # (entries without a lead keep their keys)
            settings["lead"] = self.lead
        h.update(json.dumps(settings, sort_keys=True, default=str).encode())
        for a in (y.double(), mask.bool(), t.double()):
            h.update(a.contiguous().cpu().numpy().tobytes())
        return h.hexdigest()[:20]

    @property
    def diagnostics(self) -> list[dict]:
        """Convergence diagnostics of every window seen so far (sampled or read from the cache), once each."""
        return list(self._diagnostics.values())

    def sample_windows(self, y: Tensor, mask: Tensor, t: Tensor) -> tuple[Tensor, dict]:
        """Run the sampler for a batch of windows (no cache).

        Args:
            y: ``(B, T, *obs_shape)``; mask: the same shape; t: ``(B,)``.

        Returns:
            Draws of the targets ``(n, B, *state_shape)`` (``n = chains * steps // thin`` for MALA,
            ``runs * particles`` for SMC) and the diagnostics: ``windows``, one dict per window with ``rhat`` and
            ``ess`` (:func:`convergence` across MALA chains or :func:`smc_convergence` across SMC runs),
            ``acceptance`` and ``seconds``; for SMC also ``temperatures`` (largest over the runs), ``ess_weights``
            (smallest ESS of the incremental weights over temperatures and runs) and ``log_evidence`` (per run).
        """
        yf, mf, t = self.check_windows(y, mask, t)
        dtype = torch.float64
        start = self.start_time(t)
        lead = torch.round(start / self.step_time).long().clamp(0, self.lead)  # (B,) saved states of lead
        mu, cov = self._prior(start - lead * self.step_time)
        mu, L = mu.to(dtype), torch.linalg.cholesky(cov.to(dtype))
        yd, w = yf.to(dtype), mf.to(dtype) / self.sigma
        H = self.H.to(dtype)

        def window(v: Tensor) -> Tensor:  # (..., B, D) whitened prior draws -> (..., B, T, D) the window's states
            x = mu + torch.einsum("bij,...bj->...bi", L, v)
            for k in range(int(lead.max()) if len(lead) else 0):  # each window its own lead
                x = torch.where((k < lead)[:, None], self.forecast(x), x)
            return self.trajectory(x)

        def log_prior_and_likelihood(v: Tensor) -> tuple[Tensor, Tensor]:  # (C, B, D) -> (C, B), (C, B)
            r = (yd - window(v) @ H.T) * w
            return -0.5 * v.pow(2).sum(-1), -0.5 * r.pow(2).sum((-2, -1))

        def target(v: Tensor) -> Tensor:  # (..., B, D) -> (..., B) states at the target time
            with torch.no_grad():
                return window(v)[..., self.target_index, :]

        g = torch.Generator().manual_seed(self.seed)
        B = yd.shape[0]
        clock = time.perf_counter()
        if self.sampler == "mala":
            v0 = torch.randn(self.chains, B, self.D, generator=g, dtype=dtype)
            v, acc = mala(lambda v: torch.stack(log_prior_and_likelihood(v)).sum(0), v0, self.steps, self.warmup,
                          self.thin, generator=g, progress=self.progress)
            xt = target(v)  # (n, C, B, D)
            conv = convergence(xt)
            seconds = (time.perf_counter() - clock) / B
            windows = [{"sampler": "mala", "rhat": conv["rhat_per_window"][j], "ess": conv["ess_per_window"][j],
                        "acceptance": float(acc[j]), "seconds": seconds, "chains": self.chains,
                        "draws_per_chain": xt.shape[0]} for j in range(B)]
            samples = xt.reshape(-1, B, *self.state_shape).to(y.dtype)
            return samples, {"windows": windows, "seconds": seconds * B}
        results = []
        for _ in tqdm(range(self.runs), desc="SMC runs", disable=not self.progress, leave=False):
            v0 = torch.randn(self.particles, B, self.D, generator=g, dtype=dtype)
            results.append(smc(log_prior_and_likelihood, v0, moves=self.moves, generator=g, progress=self.progress))
        xt = target(torch.stack([r.particles for r in results]))  # (R, N, B, D)
        conv = smc_convergence(xt, generator=g)
        seconds = (time.perf_counter() - clock) / B
        windows = [{"sampler": "smc", "rhat": conv["rhat_per_window"][j], "ess": conv["ess_per_window"][j],
                    "ess_weights": min(float(r.ess[j]) for r in results),
                    "temperatures": max(int(r.temperatures[j]) for r in results),
                    "log_evidence": [float(r.log_evidence[j]) for r in results],
                    "acceptance": sum(float(r.acceptance[j]) for r in results) / len(results),
                    "seconds": seconds, "chains": self.runs, "draws_per_chain": self.particles} for j in range(B)]
        samples = xt.reshape(-1, B, *self.state_shape).to(y.dtype)
        return samples, {"windows": windows, "seconds": seconds * B}

    def posterior(self, y: Tensor, mask: Tensor, t: Tensor) -> EnsemblePosterior:
        """The reference posterior of each window (from the cache where it holds the window), as an ensemble.

        Args:
            y: ``(B, T, *obs_shape)``; mask: the same shape; t: ``(B,)``.

        Returns:
            An :class:`~sbida.posterior.EnsemblePosterior` of ``chains * steps // thin`` (MALA) or
            ``runs * particles`` (SMC) draws per window.
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
                entry_info = info["windows"][j] | {"t": float(t[i])}
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
    p.add_argument("--sampler", choices=["mala", "smc"], default="mala")
    p.add_argument("--particles", type=int, default=1024, help="SMC particles per run")
    p.add_argument("--moves", type=int, default=10, help="SMC MALA moves per temperature")
    p.add_argument("--runs", type=int, default=4, help="independent SMC runs per window")
    p.add_argument("--lead", type=int, default=20,
                   help="saved states between the Gaussian prior and the window (20: 1 time unit, as run.py)")
    p.add_argument("--compare", nargs="*", default=[], metavar="CHECKPOINT",
                   help="estimators (saved with .save) to compare with the reference, window by window")
    p.add_argument("--samples", type=int, default=1000, help="draws per side in the comparison")
    p.add_argument("--gaussianity", action="store_true",
                   help="only print how far simulated states are from their fitted Gaussian (the choice of --lead)")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    import sbida

    task = sbida.tasks.get(a.task, K=a.K, n_trajectories=a.trajectories, n_states=a.states)
    if a.gaussianity:
        gaussianity(task.simulator)
        return 0
    data = task.simulate(progress=False)
    _, _, test = data.split(0.8, 0.1, 0.1, seed=0)
    ref = MCMCReference.for_task(task, sampler=a.sampler, chains=a.chains, steps=a.steps, warmup=a.warmup,
                                 thin=a.thin, particles=a.particles, moves=a.moves, runs=a.runs, lead=a.lead,
                                 cache=a.cache,
                                 progress=True)
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
        extra = ""
        if d.get("sampler") == "smc":
            z = torch.tensor(d["log_evidence"])
            extra = (f"  temperatures {d['temperatures']}  weight ESS {d['ess_weights']:.0f}  log Z "
                     f"{float(z.mean()):.2f} +- {float(z.std()):.2f}")
        print(f"  window {i}: t={float(t[j]):.2f}  R-hat {d['rhat']:.3f}  ESS {d['ess']:.0f}  acceptance "
              f"{d['acceptance']:.2f}  RMSE of the mean {float(err[j]):.3f}  spread {float(spread[j]):.3f}"
              f"  {d['seconds']:.1f} s{extra}")
    if a.compare:
        compare(a.compare, post, x, y, m, t, a.windows, a.samples)
    return 0


def gaussianity(sim, n: int = 4000, times=(0.0, 0.3, 0.7, 1.0, 1.5, 3.0, 10.0), leads=(0.25, 0.5, 1.0, 2.0, 3.0),
                attractor: float = 10.0, seed: int = 0) -> None:
    """Print the C2ST AUC of ``n / 2`` simulated states against as many draws of their fitted Gaussian at each time
    from the task's start, then of the attractor's states (at ``attractor``) against its fitted Gaussian carried
    ``lead`` time units by the dynamics."""
    import sbida

    g = torch.Generator().manual_seed(seed)
    x0 = sim.initial_state(n, generator=g)

    def at(x, time_units):
        steps = int(round(time_units / sim.dt))
        return sim.rollout(x, steps, every=steps, check=False)[:, -1] if steps else x

    def fitted(x):
        return torch.distributions.MultivariateNormal(x.mean(0), torch.cov(x.T)).sample((len(x),))

    h = n // 2
    for tu in times:
        xs = at(x0, tu)
        print(f"t = {tu:g}: C2ST(states, their fitted Gaussian) = {sbida.diagnostics.c2st(xs[:h], fitted(xs)[:h]):.3f}")
    xa = at(x0, attractor)
    ga = fitted(xa)
    for lead in leads:
        auc = sbida.diagnostics.c2st(xa[:h], at(ga, lead)[:h])
        print(f"lead {lead:g}: C2ST(attractor states, their fitted Gaussian carried {lead:g}) = {auc:.3f}")


def compare(checkpoints: list[str], ref, x: Tensor, y: Tensor, m: Tensor, t: Tensor, windows: list[int],
            n: int = 1000) -> None:
    """Print, per estimator and window, the C2ST AUC of ``n`` draws against ``n`` reference draws, the offset of
    the mean in reference standard deviations (averaged over cells) and the ratio of standard deviations."""
    import sbida

    rs = ref.sample(n, generator=torch.Generator().manual_seed(0))
    sd = rs.std(0)
    for path in checkpoints:
        est = sbida.estimators.load(path)
        s = est.posterior(y, m, t).sample(n, generator=torch.Generator().manual_seed(1))
        print(f"{Path(path).stem} ({type(est).__name__}) against the reference, {n} draws each:")
        for j, i in enumerate(windows):
            auc = sbida.diagnostics.c2st(s[:, j], rs[:, j])
            off = float(((s[:, j].mean(0) - rs[:, j].mean(0)) / sd[j]).abs().mean())
            ratio = float((s[:, j].std(0) / sd[j]).mean())
            err = float((s[:, j].mean(0) - x[j]).pow(2).mean().sqrt())
            print(f"  window {i}: t={float(t[j]):.2f}  C2ST {auc:.3f}  |mean offset| {off:.2f} sd  std ratio "
                  f"{ratio:.2f}  RMSE of the mean {err:.3f}")


if __name__ == "__main__":
    sys.exit(main())

"""The tempered SMC reference of benchmarks/reference.py: exact Gaussian posteriors and evidences, mode weights of a
bimodal target that MALA from one mode misses, and the SMC reference of the linear-Gaussian task against Kalman."""

import math
import sys
from pathlib import Path

import pytest
import torch

import sbida

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import reference  # noqa: E402


def _linear_problem(B: int = 2, D: int = 3, P: int = 4):
    """``B`` linear-Gaussian targets in whitened coordinates: prior N(0, I), log l(v) = -|A v - r|^2 / 2."""
    g = torch.Generator().manual_seed(3)
    A = 2.0 * torch.randn(B, P, D, generator=g, dtype=torch.float64)
    r = 6.0 * torch.randn(B, P, generator=g, dtype=torch.float64)

    def f(v):
        res = torch.einsum("bpd,nbd->nbp", A, v) - r
        return -0.5 * v.pow(2).sum(-1), -0.5 * res.pow(2).sum(-1)

    prec = torch.eye(D, dtype=torch.float64) + A.mT @ A
    cov = torch.linalg.inv(prec)
    mean = (cov @ A.mT @ r[..., None]).squeeze(-1)
    # Z = int N(v; 0, I) exp(-|A v - r|^2 / 2) dv = det(I + A^T A)^(-1/2) exp(-r^T (I + A A^T)^(-1) r / 2)
    outer = torch.eye(P, dtype=torch.float64) + A @ A.mT
    log_z = -0.5 * torch.logdet(prec) - 0.5 * (r[..., None, :] @ torch.linalg.solve(outer, r[..., None]))[..., 0, 0]
    return f, mean, cov, log_z


def test_smc_matches_an_exact_gaussian_posterior_and_evidence():
    f, mean, cov, log_z = _linear_problem()
    N = 2000
    g = torch.Generator().manual_seed(0)
    res = reference.smc(f, torch.randn(N, 2, 3, generator=g, dtype=torch.float64), moves=5, generator=g)
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    # the prior is far from the posterior: a sampler that stayed at the prior would fail the checks below
    assert ((mean / sd).abs().max(-1).values > 3).all()
    assert (res.temperatures >= 3).all() and (res.ess >= 0.49 * N).all()
    assert ((res.acceptance > 0.3) & (res.acceptance < 0.8)).all()
    s = res.particles
    # the particles are correlated by resampling: allow 5 standard errors of an ESS of N / 4
    assert ((s.mean(0) - mean).abs() / sd).max() < 5 / math.sqrt(N / 4)
    for b in range(2):
        emp = torch.cov(s[:, b].T)
        assert torch.allclose(emp.diagonal().sqrt() / sd[b], torch.ones(3, dtype=torch.float64), atol=0.1)
        corr = emp / emp.diagonal().sqrt()[:, None] / emp.diagonal().sqrt()[None]
        exact_corr = cov[b] / sd[b][:, None] / sd[b][None]
        assert (corr - exact_corr).abs().max() < 0.08
    assert torch.allclose(res.log_evidence, log_z, atol=0.15)
    assert (log_z < -3).all()  # the evidence is far from 1: the check can fail


def _bimodal():
    """Prior N(0, I) in 2-D; likelihood: a mixture 0.3 N(m1, s^2 I) + 0.7 N(m2, s^2 I) with m1 = (-3, 1),
    m2 = (3, 1), s = 0.3. The posterior is the mixture with weights w_k ~ pi_k N(m_k; 0, (1 + s^2) I)."""
    m = torch.tensor([[-3.0, 1.0], [3.0, 1.0]], dtype=torch.float64)
    pi = torch.tensor([0.3, 0.7], dtype=torch.float64)
    s = 0.3

    def f(v):  # (N, B, 2)
        d = (v[..., None, :] - m).pow(2).sum(-1)  # (N, B, 2)
        ll = torch.logsumexp(pi.log() - 0.5 * d / s**2 - 2 * math.log(s), -1)
        return -0.5 * v.pow(2).sum(-1), ll

    w = pi * torch.exp(-0.5 * m.pow(2).sum(-1) / (1 + s**2))
    return f, w / w.sum()


def test_smc_recovers_the_mode_weights_where_mala_from_one_mode_does_not():
    f, weights = _bimodal()
    assert weights[1] == pytest.approx(0.7)  # the modes are symmetric about the prior's mean
    g = torch.Generator().manual_seed(1)
    N, R = 1000, 4
    runs = torch.stack([reference.smc(f, torch.randn(N, 1, 2, generator=g, dtype=torch.float64), moves=5,
                                      generator=g).particles for _ in range(R)])  # (R, N, 1, 2)
    right = (runs[..., 0] > 0).double().mean(1).squeeze(-1)  # (R,) weight of the mode at x = +3, per run
    assert (right - weights[1]).abs().max() < 0.08
    assert (runs[..., 1].mean() - 1 / (1 + 0.09)).abs() < 0.05  # both modes sit at y = 1 / (1 + s^2)
    assert reference.smc_convergence(runs, generator=g)["rhat"] < 1.05

    # MALA started in the left mode stays there: it gives that mode all the weight and its chains agree
    def log_prob(v):
        lp, ll = f(v)
        return lp + ll

    v0 = torch.tensor([-2.75, 0.9], dtype=torch.float64) + 0.05 * torch.randn(8, 1, 2, generator=g,
                                                                                 dtype=torch.float64)
    draws, _ = reference.mala(log_prob, v0, steps=1000, warmup=300, generator=g)
    assert (draws[..., 0] > 0).double().mean() < 0.05


def test_smc_convergence_flags_runs_that_disagree():
    g = torch.Generator().manual_seed(0)
    runs = torch.randn(4, 500, 1, 2, generator=g, dtype=torch.float64)
    assert reference.smc_convergence(runs, generator=g)["rhat"] < 1.02
    assert reference.smc_convergence(runs, generator=g)["ess"] > 1500
    runs[:2, :100] += 6.0  # two runs give a second mode weight 0.2, two give it none
    conv = reference.smc_convergence(runs, generator=g)
    # R-hat grows only a little for such a disagreement in the weight of a mode; the bulk ESS collapses
    assert conv["rhat"] > 1.02 and conv["ess"] < 400


def test_smc_rejects_bad_inputs():
    f, *_ = _linear_problem()
    with pytest.raises(ValueError, match="v0 must be"):
        reference.smc(f, torch.zeros(10, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="non-finite"):
        reference.smc(f, torch.full((10, 2, 3), math.nan, dtype=torch.float64))
    with pytest.raises(ValueError, match="ess_fraction"):
        reference.smc(f, torch.zeros(10, 2, 3, dtype=torch.float64), ess_fraction=1.5)
    with pytest.raises(ValueError, match="runs must be"):
        reference.smc_convergence(torch.zeros(1, 10, 1, 2))
    task = sbida.tasks.get("linear-gaussian", K=8)
    with pytest.raises(ValueError, match="sampler"):
        reference.MCMCReference.for_task(task, sampler="hmc")
    with pytest.raises(ValueError, match="runs"):
        reference.MCMCReference.for_task(task, sampler="smc", runs=1)


def test_smc_reference_matches_the_exact_linear_gaussian_posterior(tmp_path):
    task = sbida.tasks.get("linear-gaussian", K=8, n_trajectories=6, n_states=16)
    data = task.simulate(progress=False)
    x, y, m, t = data.get(torch.tensor([0, 4, 13]))
    ref = reference.MCMCReference.for_task(task, sampler="smc", particles=1000, moves=5, runs=2, cache=tmp_path)
    post = ref.posterior(y, m, t)
    assert post.size == 2000
    mean, cov = task.simulator.exact_posterior(y, m, t, task.observation, data.window.offsets(), data.meta["every"])
    s = post.members.double()
    sd = cov.diagonal(dim1=-2, dim2=-1).sqrt()
    assert all(d["rhat"] < 1.05 and d["sampler"] == "smc" and d["temperatures"] >= 2 for d in ref.diagnostics)
    assert ((s.mean(0) - mean).abs() / sd).max() < 5 / math.sqrt(2000 / 4)
    assert ((s.std(0) / sd) - 1).abs().max() < 0.1
    assert ((mean - 0).abs() / sd).max() > 1  # the prior alone would be far
    # the cache is keyed by the sampler: MALA does not read SMC's entries, a second SMC reference does
    mala = reference.MCMCReference.for_task(task, chains=2, steps=4, warmup=10, thin=1, cache=tmp_path)
    assert mala._key(y[0], m[0], t[:1]) != ref._key(y[0], m[0], t[:1])
    again = reference.MCMCReference.for_task(task, sampler="smc", particles=1000, moves=5, runs=2, cache=tmp_path)
    again.sample_windows = None  # would fail if called
    assert torch.equal(again.posterior(y, m, t).members, post.members.float())


def test_run_uses_the_smc_reference_on_lorenz96_k8_and_flags_unconverged_windows(tmp_path):
    import run as bench

    task = sbida.tasks.get("lorenz96", K=8, n_trajectories=16, n_states=64)
    _, _, test = task.simulate(progress=False).split(0.8, 0.1, 0.1, seed=0)
    ref, label = bench.reference_for(task, test, tmp_path, "smoke")
    assert label.startswith("SMC") and ref.sampler == "smc"
    _, y, m, t = test.get(torch.tensor([0]))
    assert ref.posterior(y, m, t).size == 2 * 64
    (d,) = ref.diagnostics
    assert d["sampler"] == "smc" and len(d["log_evidence"]) == 2
    assert not bench._reference_ok(d)  # 128 draws cannot reach the bulk ESS the flag asks for
    assert bench._reference_ok({"rhat": 1.01, "ess": 3000}) and not bench._reference_ok({"rhat": 1.2, "ess": 3000})


def test_a_lead_carries_the_prior_from_t0_and_matches_importance_sampling_from_the_true_prior():
    """lorenz96 K=8 at t = 1.45, one observed value: the simulated states there are far from Gaussian (C2ST 0.97
    against their fitted Gaussian), so the Gaussian prior at the window's start biases the reference; with a lead of
    20 states the prior sits at t = 0 (the exact N(0, I)) and the reference matches importance sampling of 4e5
    trajectories drawn from the true prior (ESS ~1e5)."""
    task = sbida.tasks.get("lorenz96", "simulator.K=8")
    sim, obs = task.simulator, task.observation
    T = len(task.window.offsets())
    g = torch.Generator().manual_seed(0)
    win = torch.cat([sim.rollout(sim.initial_state(200000, generator=g), 29, check=False)[:, -T:] for _ in range(2)])
    y = obs.apply(win[0]) + obs.sigma * torch.randn(T, *obs.obs_shape, generator=g)
    mask = torch.zeros(T, *obs.obs_shape, dtype=torch.bool)
    mask[-1, 0] = True
    loglik = -0.5 * (((obs.apply(win[1:]) - y) / obs.sigma) ** 2 * mask).sum((-2, -1))
    w = torch.softmax(loglik.double(), 0)
    assert 1 / w.square().sum() > 20000  # far more effective draws than the 1000 taken
    exact = win[1:][torch.multinomial(w, 1000, generator=g), -1]
    auc = {}
    for lead in (0, 20):
        ref = reference.MCMCReference.for_task(task, sampler="smc", particles=512, moves=10, runs=2, lead=lead)
        ref.fit_prior(task, n_trajectories=2048)
        s = ref.posterior(y[None], mask[None], torch.tensor([1.45])).sample(1000, generator=g)[:, 0]
        auc[lead] = sbida.diagnostics.c2st(s, exact)
    assert auc[20] < 0.55 < 0.65 < auc[0], auc

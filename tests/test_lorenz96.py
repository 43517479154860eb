"""Physics and autograd checks of the Lorenz-96 models."""

import math

import pytest
import torch

from sbida.simulators import Lorenz96, TwoScaleLorenz96, lorenz96_tendency, rk4_step


def loop_tendency(x, F):
    """Element-by-element Lorenz-96 tendency, written independently of the library's shifts."""
    K = x.shape[-1]
    out = torch.empty_like(x)
    for k in range(K):
        out[..., k] = (x[..., (k + 1) % K] - x[..., (k - 2) % K]) * x[..., (k - 1) % K] - x[..., k] + F
    return out


def test_tendency_matches_loop():
    x = torch.randn(3, 2, 11, dtype=torch.float64)
    assert torch.allclose(lorenz96_tendency(x, 8.0), loop_tendency(x, 8.0), atol=1e-12)


def test_long_run_statistics():
    """K=40, F=8: climatological mean 2.34 and standard deviation 3.64 (+-0.1)."""
    sim = Lorenz96(K=40, F=8.0, dt=0.05).double()
    g = torch.Generator().manual_seed(1)
    traj = sim.rollout(sim.initial_state(64, generator=g, dtype=torch.float64), steps=4000)
    attractor = traj[:, 400:]  # drop 20 time units of transient
    assert abs(attractor.mean().item() - 2.34) < 0.1
    assert abs(attractor.std().item() - 3.64) < 0.1


def test_leading_lyapunov_exponent():
    """Benettin's method on K=40, F=8: leading exponent ~ 1.7 per time unit (+-10 %)."""
    sim = Lorenz96(K=40, F=8.0, dt=0.05).double()
    g = torch.Generator().manual_seed(2)
    x = sim.rollout(sim.initial_state(32, generator=g, dtype=torch.float64), steps=400, every=400)[:, -1]
    d0 = 1e-8
    p = torch.randn(x.shape, generator=g, dtype=torch.float64)
    p = x + d0 * p / p.norm(dim=-1, keepdim=True)
    log_growth = torch.zeros(32, dtype=torch.float64)
    n = 3000
    for _ in range(n):
        x, p = sim.step(x), sim.step(p)
        d = (p - x).norm(dim=-1, keepdim=True)
        log_growth += torch.log(d / d0).squeeze(-1)
        p = x + (p - x) * (d0 / d)
    lyap = (log_growth / (n * sim.dt)).mean().item()
    assert 1.53 < lyap < 1.87, lyap


def test_rk4_fourth_order():
    """Halving dt divides the error at a fixed time by ~16."""
    g = torch.Generator().manual_seed(3)
    x0 = Lorenz96(K=8).double().initial_state(4, generator=g, dtype=torch.float64) * 3
    T = 0.4

    def integrate(dt):
        sim = Lorenz96(K=8, F=8.0, dt=dt).double()
        return sim.rollout(x0, round(T / dt), every=round(T / dt))[:, -1]

    ref = integrate(T / 1024)
    errors = [(integrate(T / n) - ref).abs().max().item() for n in (8, 16, 32)]
    orders = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(3.7 < o < 4.3 for o in orders), orders


def test_gradient_through_rollout_matches_finite_differences():
    """25 RK4 steps, differentiable in the initial state and in F (gradcheck in float64)."""
    x0 = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    F = torch.tensor(8.0, dtype=torch.float64, requires_grad=True)

    def rollout(x, F):
        for _ in range(25):
            x = rk4_step(lambda z: lorenz96_tendency(z, F), x, 0.02)
        return x

    assert torch.autograd.gradcheck(rollout, (x0, F), eps=1e-6, atol=1e-5)


def test_forward_mode_and_vmap_through_the_fast_path():
    """jvp, jacfwd under vmap and forward-AD duals must not take the in-place no-grad shortcut (zero tangents)."""
    sim = Lorenz96(K=8, dt=0.05)
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(4, 8, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64)
    fd = (sim.rollout(x + 1e-6 * v, 10) - sim.rollout(x - 1e-6 * v, 10)) / 2e-6
    _, tangent = torch.func.jvp(lambda z: sim.rollout(z, 10), (x,), (v,))
    assert (tangent - fd).abs().max() < 1e-6 * fd.abs().max()
    J = torch.vmap(torch.func.jacfwd(lambda z: sim.rollout(z[None], 10)[0, -1]))(x)  # (4, 8, 8)
    assert torch.allclose(J @ v[..., None], fd[:, -1, :, None], atol=1e-6 * fd.abs().max())
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, v)
        out = torch.autograd.forward_ad.unpack_dual(sim.rollout(dual, 10)).tangent
    assert torch.allclose(out, fd, atol=1e-6 * fd.abs().max())


def test_learnable_forcing_gets_its_gradient():
    """F as an nn.Parameter of the module: autograd derivative = central finite difference."""
    x0 = torch.randn(3, 10, dtype=torch.float64)
    sim = Lorenz96(K=10, F=torch.nn.Parameter(torch.tensor(8.0, dtype=torch.float64)), dt=0.02)
    target = torch.randn(3, 26, 10, dtype=torch.float64)

    def loss():
        return ((sim.rollout(x0, 25) - target) ** 2).mean()

    loss().backward()
    eps = 1e-5
    with torch.no_grad():
        sim.F += eps
        up = loss()
        sim.F -= 2 * eps
        down = loss()
        sim.F += eps
    fd = (up - down) / (2 * eps)
    assert sim.F.grad is not None and abs(sim.F.grad.item() - fd.item()) < 1e-6 * max(1.0, abs(fd.item()))


def test_dtype_and_batch_dims():
    sim = Lorenz96(K=12)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 3, 12, dtype=dtype)
        traj = sim.rollout(x, 6, every=2)
        assert traj.shape == (2, 3, 4, 12) and traj.dtype == dtype
        assert torch.allclose(traj[1, 2], sim.rollout(x[1, 2], 6, every=2))


def test_bad_input():
    sim = Lorenz96(K=12)
    with pytest.raises(ValueError, match="shape"):
        sim.rollout(torch.randn(4, 13), 3)
    x = torch.randn(4, 12)
    x[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sim.rollout(x, 3)
    with pytest.raises(ValueError, match="multiple"):
        sim.rollout(torch.randn(4, 12), 5, every=2)
    with pytest.raises(ValueError, match="K >= 4"):
        Lorenz96(K=2)


def test_blow_up_names_the_step():
    sim = Lorenz96(K=40, F=8.0, dt=0.5)
    with pytest.raises(ValueError, match=r"blew up at step \d+"):
        sim.rollout(8 * torch.randn(16, 40), 200)


def test_two_scale_tendency_matches_loop():
    """Slow and fast tendencies against an element-wise transcription of the equations."""
    m = TwoScaleLorenz96(K=5, J=3, F=10.0, b=10.0, c=10.0, h=1.0).double()
    x = torch.randn(2, 5 * 4, dtype=torch.float64)
    X, Y = x[:, :5], x[:, 5:]
    K, J, N = 5, 3, 15
    dX, dY = torch.empty_like(X), torch.empty_like(Y)
    for k in range(K):
        s = sum(Y[:, k * J + j] for j in range(J))
        dX[:, k] = X[:, (k - 1) % K] * (X[:, (k + 1) % K] - X[:, (k - 2) % K]) - X[:, k] + 10.0 - 1.0 * s
    for i in range(N):
        k = i // J
        dY[:, i] = (-100.0 * Y[:, (i + 1) % N] * (Y[:, (i + 2) % N] - Y[:, (i - 1) % N]) - 10.0 * Y[:, i]
                    + 1.0 * X[:, k])
    assert torch.allclose(m.tendency(x), torch.cat((dX, dY), -1), atol=1e-10)
    assert torch.allclose(m.coupling(x), -Y.unflatten(-1, (K, J)).sum(-1), atol=1e-12)


def test_two_scale_without_coupling_is_the_truncated_model():
    m = TwoScaleLorenz96(K=8, J=4, h=0.0, dt=0.005).double()
    x0 = m.initial_state(3, dtype=torch.float64)
    full = m.output(m.rollout(x0, 200))
    one = m.truncated().double().rollout(m.output(x0), 200)
    assert torch.allclose(full, one, atol=1e-10)


def test_two_scale_coupling_damps_the_slow_variables():
    """With h=1 the fast variables drain energy: the coupling correlates negatively with X (the closure's sign)."""
    m = TwoScaleLorenz96().double()
    g = torch.Generator().manual_seed(4)
    traj = m.rollout(m.initial_state(8, generator=g, dtype=torch.float64), 3000, every=10)[:, 100:]
    X, U = m.output(traj).flatten(), m.coupling(traj).flatten()
    corr = torch.corrcoef(torch.stack((X, U)))[0, 1].item()
    assert corr < -0.5, corr
    assert 2.0 < X.mean().item() < 3.5 and torch.isfinite(traj).all()

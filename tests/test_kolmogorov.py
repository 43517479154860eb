"""Tests of the Kolmogorov-flow simulator (2-D Navier-Stokes, pseudo-spectral, IMEX RK3/CN)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sbida.simulators.kolmogorov import KolmogorovFlow

NU, ALPHA, KF = 1e-3, 0.1, 4  # the default parameters: nu = 1 / Re, drag, forcing wavenumber
LAMBDA = NU * KF**2 + ALPHA  # decay rate of the forced shear mode


def np_derivative(f: np.ndarray, axis: int) -> np.ndarray:
    """Spectral derivative of a periodic field on [0, 2 pi) along ``axis`` (numpy, full complex FFT)."""
    n = f.shape[axis]
    k = np.fft.fftfreq(n, d=1.0 / n)
    if n % 2 == 0:
        k[n // 2] = 0.0
    shape = [1] * f.ndim
    shape[axis] = n
    return np.fft.ifft(1j * k.reshape(shape) * np.fft.fft(f, axis=axis), axis=axis).real


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


# -------------------------------------------------------------------------------- kinematics


def test_velocity_divergence_free_and_curl_is_vorticity():
    sim = KolmogorovFlow()
    g = torch.Generator().manual_seed(0)
    w0 = sim.initial_state(3, g, dtype=torch.float64)
    w = torch.cat((w0, sim.step(w0) + 0.7))  # random fields and evolved ones, one with a non-zero mean
    uv = sim.velocity(w)
    assert uv.shape == (6, 2, 64, 64) and uv.dtype == torch.float64
    u, v = uv[:, 0].numpy(), uv[:, 1].numpy()
    ux, uy, vx, vy = np_derivative(u, -1), np_derivative(u, -2), np_derivative(v, -1), np_derivative(v, -2)
    grad = np.sqrt(ux**2 + uy**2 + vx**2 + vy**2)
    for b in range(len(w)):  # per field
        assert np.linalg.norm((ux + vy)[b]) < 1e-5 * np.linalg.norm(grad[b])
    wn = w.numpy()
    assert rel(vx - uy, wn - wn.mean((-2, -1), keepdims=True)) < 1e-5
    # the library's curl agrees, and the kinetic energy is <u^2 + v^2> / 2
    assert rel(sim.vorticity_from_velocity(uv).numpy(), vx - uy) < 1e-10
    np.testing.assert_allclose(sim.kinetic_energy(w).numpy(), 0.5 * (u**2 + v**2).mean((-2, -1)), rtol=1e-10)
    np.testing.assert_allclose(sim.energy_spectrum(w).sum(-1).numpy(), sim.kinetic_energy(w).numpy(),
                               rtol=1e-10)

    # axis convention, last axis x and second-to-last y: omega = sin(2x) has psi = sin(2x) / 4, so u = 0 and
    # v = -cos(2x) / 2
    x = torch.arange(64, dtype=torch.float64) * (2 * math.pi / 64)
    uv1 = sim.velocity(torch.sin(2 * x).expand(64, 64))
    torch.testing.assert_close(uv1[0], torch.zeros(64, 64, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(uv1[1], (-0.5 * torch.cos(2 * x)).expand(64, 64), atol=1e-12, rtol=0)

    # pooled output: shape and 2 x 2 cell means of the solver-grid velocity
    out = sim.output(w)
    assert out.shape == (6, 2, 32, 32) and sim.output_shape == (2, 32, 32)
    pooled = uv.numpy().reshape(6, 2, 32, 2, 32, 2).mean((3, 5))
    np.testing.assert_allclose(out.numpy(), pooled, rtol=0, atol=1e-12)


def test_lift_inverts_output_on_resolved_modes(long_run):
    sim, _, traj = long_run
    w = sim.initial_state(2, torch.Generator().manual_seed(1), dtype=torch.float64)
    ky = torch.fft.fftfreq(64, d=1 / 64, dtype=torch.float64).reshape(-1, 1)
    kx = torch.fft.rfftfreq(64, d=1 / 64, dtype=torch.float64)
    w_low = torch.fft.irfft2(torch.fft.rfft2(w) * ((ky.abs() < 16) & (kx < 16)), s=(64, 64))
    # exact inverse for fields with |k_x|, |k_y| < 16 ...
    assert rel(sim.lift(sim.output(w_low)), w_low) < 1e-12
    # ... which the plain zero-padded curl (no deconvolution of the pooling) is not
    assert rel(sim.lift(sim.output(w_low), deconvolve=False), w_low) > 0.05
    # approximate for a turbulent field (small scales lost to the pooling)
    w_turb = traj[:, -1]
    err = rel(sim.lift(sim.output(w_turb)), w_turb)
    plain = rel(sim.lift(sim.output(w_turb), deconvolve=False), w_turb)
    assert 1e-3 < err < 0.5 and err < 0.85 * plain  # measured 0.264 against 0.367 without the deconvolution


def test_initial_state():
    sim = KolmogorovFlow(init_scale=1.5)
    w1 = sim.initial_state(4, torch.Generator().manual_seed(5))
    w2 = sim.initial_state(4, torch.Generator().manual_seed(5))
    w3 = sim.initial_state(4, torch.Generator().manual_seed(6))
    assert w1.shape == (4, 64, 64) and w1.dtype == torch.float32
    torch.testing.assert_close(w1, w2, rtol=0, atol=0)
    assert not torch.allclose(w1, w3)
    assert w1.mean((-2, -1)).abs().max() < 1e-5
    rms = (2 * sim.kinetic_energy(w1.double())).sqrt()
    torch.testing.assert_close(rms, torch.full((4,), 1.5, dtype=torch.float64), rtol=1e-5, atol=0)
    E = sim.energy_spectrum(w1.double()).mean(0)
    assert 3 <= int(E.argmax()) <= 5  # peaked at init_wavenumber = 4
    assert E[22:].sum() < 1e-8  # dealiased band only


# -------------------------------------------------------------------------------- dynamics


def test_advection_matches_direct_product_and_conserves():
    sim = KolmogorovFlow()
    ops = sim._solver_ops(torch.float64, torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    ky = torch.fft.fftfreq(64, d=1 / 64, dtype=torch.float64).reshape(-1, 1)
    kx = torch.fft.rfftfreq(64, d=1 / 64, dtype=torch.float64)
    w_full = torch.fft.rfft2(torch.randn(2, 64, 64, generator=g, dtype=torch.float64)) * ops.mask
    # modes |k| <= 10: the product u . grad(omega) has modes <= 20, inside the kept band, so the dealiased
    # pseudo-spectral term is exact and must equal the product computed directly (numpy derivatives)
    w_low = w_full * ((ky.abs() <= 10) & (kx <= 10))
    w = torch.fft.irfft2(w_low, s=(64, 64))
    uv = sim.velocity(w).numpy()
    wn = w.numpy()
    direct = -(uv[:, 0] * np_derivative(wn, -1) + uv[:, 1] * np_derivative(wn, -2))
    adv = torch.fft.irfft2(sim._advection(w_low, ops), s=(64, 64)).numpy()
    assert rel(adv, direct) < 1e-12
    # on the full dealiased band (a Galerkin truncation) the advection conserves energy and enstrophy:
    # sum over modes of conj(psi_hat) N_hat and conj(omega_hat) N_hat vanish
    n_hat = sim._advection(w_full, ops)
    outside = (ky.abs() > 21) | (kx > 21)  # 2/3 rule at N = 64: modes |k_x|, |k_y| <= 21 only
    assert n_hat[:, outside].abs().max() == 0
    k2 = (kx**2 + ky**2).clamp(min=1)
    weight = torch.full_like(k2, 2.0)
    weight[:, 0] = weight[:, -1] = 1.0
    for field in (w_full, w_full / k2):
        scale = (weight * field.abs() * n_hat.abs()).sum((-2, -1))
        assert ((weight * (field.conj() * n_hat).real).sum((-2, -1)).abs() < 1e-12 * scale).all()


@pytest.fixture(scope="module")
def long_run():
    """Batch 2 at the default parameters: 50 time units of spin-up, then 100 saved at every time unit."""
    sim = KolmogorovFlow(dt=1.0)
    w0 = sim.initial_state(2, torch.Generator().manual_seed(42))
    with torch.no_grad():
        w = sim.rollout(w0, 50, every=50)[:, -1]
        traj = sim.rollout(w, 100)[:, 1:]  # (2, 100, 64, 64), times 51 .. 150
    return sim, w0.double(), traj.double()


def test_energy_bounded_and_turbulence_sustained(long_run):
    sim, _, traj = long_run
    assert torch.isfinite(traj).all()
    ke = sim.kinetic_energy(traj)  # (2, 100)
    # Energy bound: dE/dt = <u . f> - nu <|grad u|^2> - 2 alpha E <= sqrt(E) - 2 alpha E for the
    # unit-amplitude forcing (<|f|^2> = 1/2, Cauchy-Schwarz), so E <= 1 / (4 alpha^2) = 25 forever if it
    # starts below. The laminar Kolmogorov flow u = sin(4y) / lambda has E = 1 / (4 lambda^2) = 18.6; the
    # turbulent flow, which transfers energy out of the forced mode, sits far below it (E ~ 1, measured).
    e_laminar = 1.0 / (4 * LAMBDA**2)
    assert ke.max() < 1.0 / (4 * ALPHA**2)
    assert ke.max() < 0.2 * e_laminar
    # sustained: the mean energy over the last half is neither decaying to zero nor drifting
    first, last = ke[:, :50].mean(), ke[:, 50:].mean()
    assert 0.5 < last < 2.0
    assert ke[:, 50:].min() > 0.2 * last
    assert abs(last / first - 1) < 0.25
    # and unsteady, with a v component: not the laminar shear flow
    assert ke.std(dim=1).min() > 0.02 * last
    v = sim.velocity(traj[:, -1])[:, 1]
    assert v.square().mean() > 0.1 * last


def test_spectrum_stationary(long_run):
    sim, w0, traj = long_run
    E = sim.energy_spectrum(traj)  # (2, 100, 32)
    k = slice(1, 64 // 3 + 1)  # wavenumbers 1 .. 21
    E1, E2 = E[:, :50, k].mean((0, 1)), E[:, 50:, k].mean((0, 1))
    log_ratio = (E1 / E2).log().abs()
    assert log_ratio.max() < math.log(1.6)  # the largest scales fluctuate most (few modes)
    assert log_ratio[4:].max() < math.log(1.25)  # k >= 5
    # ... while the initial spectrum (a bump at k = 4) is far from it
    E0 = sim.energy_spectrum(w0).mean(0)[k]
    assert (E0 / E1).log().abs().max() > math.log(100)


def test_laminar_profile_from_rest():
    sim = KolmogorovFlow(dt=0.5)
    w = sim.rollout(torch.zeros(1, 64, 64, dtype=torch.float64), 2)[0, -1]  # t = 1
    uv = sim.velocity(w)
    y = torch.arange(64, dtype=torch.float64) * (2 * math.pi / 64)
    u_exact = (torch.sin(KF * y) * (1 - math.exp(-LAMBDA)) / LAMBDA).reshape(64, 1).expand(64, 64)
    assert rel(uv[0], u_exact) < 1e-3
    assert uv[1].abs().max() < 1e-10 * u_exact.abs().max()
    w_exact = (-KF * torch.cos(KF * y) * (1 - math.exp(-LAMBDA)) / LAMBDA).reshape(64, 1).expand(64, 64)
    assert rel(w, w_exact) < 1e-3


@pytest.mark.parametrize("Re", [1000.0, 20.0])  # advection-dominated, and diffusion-dominated (implicit part)
def test_time_stepping_second_order(Re):
    t = 0.5
    common = dict(resolution=32, output_resolution=16, Re=Re, dt=t)
    w0 = KolmogorovFlow(**common).initial_state(2, torch.Generator().manual_seed(7), dtype=torch.float64)
    ref = KolmogorovFlow(**common, inner_steps=640).step(w0)
    errors = [float((KolmogorovFlow(**common, inner_steps=n).step(w0) - ref).norm()) for n in (20, 40, 80)]
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert min(ratios) > 3.5, (errors, ratios)
    assert errors[0] < 1e-2 * float(ref.norm())


# -------------------------------------------------------------------------------- autograd, dtypes


def test_gradcheck_short_rollout():
    sim = KolmogorovFlow(resolution=16, output_resolution=8, dt=0.1, inner_steps=2)
    x = sim.initial_state(1, torch.Generator().manual_seed(3), dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sim.output(sim.rollout(x, 3, check=False)[:, -1]), (x,))


def test_batching_and_dtypes():
    sim = KolmogorovFlow(resolution=32, output_resolution=8, dt=0.1)
    w = sim.initial_state(6, torch.Generator().manual_seed(4), dtype=torch.float64)
    out = sim.step(w.reshape(2, 3, 32, 32))
    torch.testing.assert_close(out.reshape(6, 32, 32), sim.step(w), rtol=0, atol=1e-12)
    assert sim.output(out).shape == (2, 3, 2, 8, 8)
    w32 = sim.step(w.float())
    assert w32.dtype == torch.float32
    assert rel(w32.double(), sim.step(w)) < 1e-4
    assert sim.energy_spectrum(w).shape == (6, 16) and sim.kinetic_energy(out).shape == (2, 3)
    # a step's output has only the dealiased modes |k_x|, |k_y| <= (32 - 1) // 3 = 10, even from rough input
    rough = torch.randn(2, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    spec = torch.fft.rfft2(sim.step(rough)).abs()
    ky = torch.fft.fftfreq(32, d=1 / 32).abs().reshape(-1, 1)
    kx = torch.fft.rfftfreq(32, d=1 / 32)
    assert spec[:, (ky > 10) | (kx > 10)].max() < 1e-12 * spec.max()
    assert spec[:, (ky <= 10) & (kx <= 10)].min() > 0


# -------------------------------------------------------------------------------- errors


def test_bad_input_raises():
    sim = KolmogorovFlow(resolution=32, output_resolution=16)
    with pytest.raises(ValueError, match="shape"):
        sim.check(torch.zeros(2, 32, 31))
    with pytest.raises(ValueError, match="shape"):
        sim.step(torch.zeros(2, 64, 64))
    with pytest.raises(ValueError, match="shape"):
        sim.rollout(torch.zeros(32), 1)
    with pytest.raises(ValueError, match="shape"):
        sim.lift(torch.zeros(2, 3, 16, 16))
    w = torch.zeros(2, 32, 32)
    w[1, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        sim.rollout(w, 1)
    with pytest.raises(ValueError, match="divide"):
        KolmogorovFlow(resolution=64, output_resolution=24)
    with pytest.raises(ValueError, match="forcing_wavenumber"):
        KolmogorovFlow(resolution=16, output_resolution=8, forcing_wavenumber=6)
    with pytest.raises(ValueError, match="dt"):
        KolmogorovFlow(dt=0.0)
    with pytest.raises(ValueError, match="inner_steps"):
        KolmogorovFlow(inner_steps=0)

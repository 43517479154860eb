r"""Two-dimensional Kolmogorov flow.

The incompressible Navier-Stokes equations on the periodic square :math:`[0, 2\pi)^2`, in vorticity form,

.. math:: \frac{\partial \omega}{\partial t} + \mathbf{u} \cdot \nabla \omega
          = \nu \nabla^2 \omega - \alpha \omega + f, \qquad \nu = 1 / \mathrm{Re},

with the vorticity :math:`\omega = \partial_x v - \partial_y u`, the stream function
:math:`\nabla^2 \psi = -\omega`, the velocity :math:`u = \partial_y \psi`, :math:`v = -\partial_x \psi`, a
linear drag :math:`\alpha` and the Kolmogorov forcing :math:`\mathbf{f}_u = (\sin(k_f y), 0)` of the velocity,
i.e. of the vorticity

.. math:: f = \partial_x f_v - \partial_y f_u = -k_f \cos(k_f y).

The shear flow :math:`u(y, t) = a(t) \sin(k_f y)`, :math:`v = 0` has
:math:`\mathbf{u} \cdot \nabla \omega = 0`, so that from rest the flow follows the laminar profile :math:`a(t)
= (1 - e^{-\lambda t}) / \lambda`, :math:`\lambda = \nu k_f^2 + \alpha`; at ``Re = 1000`` it is unstable and
the flow becomes turbulent.

**Discretisation.** Pseudo-spectral on an :math:`N \times N` grid with ``torch.fft.rfft2``: the state is
projected on the Fourier modes :math:`|k_x|, |k_y| \le K = \lfloor (N - 1) / 3 \rfloor` (2/3 rule), so that
the quadratic products are free of aliasing on the kept modes (a Galerkin truncation: energy and enstrophy are
conserved by the discrete advection). The advection is evaluated from the velocity only, with the identity
(valid for divergence-free fields)

.. math:: \mathbf{u} \cdot \nabla \omega
          = (\partial_x^2 - \partial_y^2)(uv) + \partial_x \partial_y (v^2 - u^2),

which costs two inverse and two forward real FFTs per evaluation (the flux form
:math:`\nabla \cdot (\mathbf{u} \omega)` costs five). Time stepping is the low-storage three-stage IMEX
Runge-Kutta / Crank-Nicolson scheme of Spalart, Moser & Rogers (1991): advection and forcing explicit
(third-order Runge-Kutta), diffusion and drag implicit (a Crank-Nicolson-like split of each stage, diagonal in
Fourier space); second order overall. For stage :math:`s = 1, 2, 3`, with :math:`L = -\nu |k|^2 - \alpha` and
:math:`N` the explicit tendency,

.. math:: (1 - \beta_s h L)\, \hat\omega_s = (1 + \alpha_s h L)\, \hat\omega_{s-1}
          + \gamma_s h N(\hat\omega_{s-1}) + \zeta_s h N(\hat\omega_{s-2}).

**Grid and axes.** Image convention: ``w[..., i, j]`` is the vorticity at :math:`y = 2\pi i / N`
(second-to-last axis) and :math:`x = 2\pi j / N` (last axis); velocities are stacked as ``(..., 2, N, N)``
with channel 0 the :math:`x` component :math:`u` and channel 1 the :math:`y` component :math:`v`. The forcing
depends on :math:`y`, i.e. on the row index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Simulator

__all__ = ["KolmogorovFlow"]

# Spalart, Moser & Rogers (1991), low-storage IMEX RK3 / Crank-Nicolson; alpha_s + beta_s = gamma_s + zeta_s
_SMR_ALPHA = (29 / 96, -3 / 40, 1 / 6)
_SMR_BETA = (37 / 160, 5 / 24, 1 / 6)
_SMR_GAMMA = (8 / 15, 5 / 12, 3 / 4)
_SMR_ZETA = (0.0, -17 / 60, -5 / 12)


@dataclass
class _Spectral:
    """Fourier operators of an ``n x n`` grid (``m = n // 2 + 1`` rfft columns); Nyquist derivatives are 0."""

    ikx: Tensor       # (1, m) complex, i k_x
    iky: Tensor       # (n, 1) complex, i k_y
    vel: Tensor       # (2, n, m) complex, omega_hat -> (u_hat, v_hat) = (i k_y, -i k_x) / |k|^2
    weight: Tensor    # (n, m) real, multiplicity of each rfft mode in a full FFT (1 or 2)
    shells: Tensor    # (n * m, n // 2) real, one-hot of the shell round(|k|) of each mode, times weight / n^4


@dataclass
class _Solver:
    """Solver operators on the ``N x N`` grid: dealiasing mask, velocity, advection and stage factors."""

    mask: Tensor      # (N, M) real, 1 on the kept modes
    vel: Tensor       # (2, N, M) complex, masked velocity factors
    adv: Tensor       # (2, N, M) real, masked advection factors (k_x^2 - k_y^2, k_x k_y)
    A: list[Tensor]   # per stage, (1 + alpha h L) / (1 - beta h L)
    G: list[Tensor]   # per stage, gamma h / (1 - beta h L)
    Z: list[Tensor]   # per stage, zeta h / (1 - beta h L)
    F: list[Tensor]   # per stage, (gamma + zeta) h f_hat / (1 - beta h L), complex
    init: Tensor      # (N, M) real, amplitude filter of the initial random field


def _wavenumbers(n: int, dtype: torch.dtype, device: torch.device | str | None) -> tuple[Tensor, Tensor]:
    """Integer wavenumbers of an ``n x n`` grid, rfft2 layout: ``ky`` ``(n, 1)``, ``kx`` ``(1, n//2 + 1)``."""
    ky = torch.fft.fftfreq(n, d=1.0 / n, dtype=dtype, device=device).reshape(n, 1)
    kx = torch.fft.rfftfreq(n, d=1.0 / n, dtype=dtype, device=device).reshape(1, n // 2 + 1)
    return ky, kx


class KolmogorovFlow(Simulator):
    r"""Two-dimensional Kolmogorov flow (vorticity, pseudo-spectral, IMEX RK3/CN), see the module docstring.

    The state is the vorticity on the solver grid, ``(..., N, N)`` with ``N = resolution`` (rows along
    :math:`y`, columns along :math:`x`); :meth:`output` is the velocity ``(u, v)`` mean-pooled to
    ``(..., 2, R, R)`` with ``R = output_resolution``. One :meth:`step` advances by ``dt`` with
    :attr:`inner_steps` solver sub-steps of length :attr:`h` ``= dt / inner_steps``; the states returned by
    :meth:`step` carry only the dealiased Fourier modes (its input is projected on them first).

    Wavenumber grids, dealiasing mask and implicit factors are built on first use for each (dtype, device) and
    cached: change ``Re``, ``drag``, ``dt``... by making a new instance, not by setting attributes.

    Args:
        resolution: solver grid size ``N`` (64 by default; smaller grids are allowed, for tests). At
            ``Re = 1000``, 64 resolves the energy-containing scales but not the end of the enstrophy cascade:
            E(k) sits above a 128 x 128 reference from k ~ 14 on (x2 at the cutoff k = 21); 128 resolves it.
        output_resolution: size ``R`` of the pooled velocity; must divide ``resolution``.
        Re: Reynolds number, ``nu = 1 / Re``.
        drag: linear drag coefficient ``alpha``.
        forcing_wavenumber: ``k_f`` of the forcing ``(sin(k_f y), 0)``; must lie within the dealiased band.
        dt: time between two saved states (one call of :meth:`step`).
        inner_steps: solver sub-steps per :meth:`step`. By default the smallest number such that
            ``h u_max / dx <= 0.5`` (CFL) for ``u_max = 5`` and ``dx = 2 pi / N``: 21 sub-steps of 0.0095 for
            ``dt = 0.2`` at ``N = 64`` (the turbulent flow has ``max |u|`` of about 3.6 on average, 6 at most;
            sub-steps up to 0.02 were seen to be stable, 0.025 not).
        init_scale: root-mean-square speed ``sqrt(<u^2 + v^2>)`` of the random initial fields.
        init_wavenumber: peak wavenumber ``k_0`` of the energy spectrum ``E(k) ~ k^4 exp(-2 (k / k_0)^2)``
            of the random initial fields.
    """

    def __init__(self, resolution: int = 64, output_resolution: int = 32, Re: float = 1000.0,
                 drag: float = 0.1, forcing_wavenumber: int = 4, dt: float = 0.2,
                 inner_steps: int | None = None, init_scale: float = 1.0, init_wavenumber: float = 4.0):
        super().__init__()
        if int(resolution) != resolution or resolution < 8:
            raise ValueError(f"resolution must be an integer >= 8, got {resolution}")
        if int(output_resolution) != output_resolution or output_resolution < 1:
            raise ValueError(f"output_resolution must be a positive integer, got {output_resolution}")
        if resolution % output_resolution:
            raise ValueError(f"output_resolution={output_resolution} must divide resolution={resolution}")
        if not Re > 0:
            raise ValueError(f"Re must be positive, got {Re}")
        if not drag >= 0:
            raise ValueError(f"drag must be non-negative, got {drag}")
        if not dt > 0:
            raise ValueError(f"dt must be positive, got {dt}")
        self.N, self.R = int(resolution), int(output_resolution)
        self.kmax = (self.N - 1) // 3  # 2/3 rule: |k_x|, |k_y| <= kmax
        if int(forcing_wavenumber) != forcing_wavenumber or not 1 <= forcing_wavenumber <= self.kmax:
            raise ValueError(f"forcing_wavenumber must be an integer in [1, {self.kmax}] at resolution "
                             f"{self.N}, got {forcing_wavenumber}")
        if inner_steps is None:
            h_cfl = 0.5 * (2 * math.pi / self.N) / 5.0
            inner_steps = max(1, math.ceil(dt / h_cfl - 1e-9))
        if int(inner_steps) != inner_steps or inner_steps < 1:
            raise ValueError(f"inner_steps must be a positive integer, got {inner_steps}")
        self.Re, self.nu, self.drag = float(Re), 1.0 / float(Re), float(drag)
        self.kf = int(forcing_wavenumber)
        self.dt, self.inner_steps = float(dt), int(inner_steps)
        self.h = self.dt / self.inner_steps
        self.init_scale, self.init_wavenumber = float(init_scale), float(init_wavenumber)
        self.state_shape = (self.N, self.N)
        self._spectral: dict[tuple, _Spectral] = {}
        self._solver: dict[tuple, _Solver] = {}

    # ------------------------------------------------------------------ cached operators

    def _spectral_ops(self, n: int, dtype: torch.dtype, device: torch.device) -> _Spectral:
        key = (n, dtype, device)
        ops = self._spectral.get(key)
        if ops is None:
            ky, kx = _wavenumbers(n, dtype, device)
            # derivatives of the Nyquist modes are set to zero (they are not those of a real field)
            dky = torch.where(ky.abs() == n / 2, torch.zeros_like(ky), ky)
            dkx = torch.where(kx.abs() == n / 2, torch.zeros_like(kx), kx)
            k2 = kx**2 + ky**2
            inv_k2 = torch.where(k2 > 0, 1.0 / k2.clamp(min=1.0), torch.zeros_like(k2))
            ikx, iky = 1j * dkx, 1j * dky
            vel = torch.stack((iky * inv_k2, -ikx * inv_k2))
            weight = torch.full_like(k2, 2.0)
            weight[:, 0] = 1.0
            if n % 2 == 0:
                weight[:, -1] = 1.0
            shell = torch.round(k2.sqrt()).long().flatten()
            nb = n // 2
            onehot = torch.zeros(n * (n // 2 + 1), nb, dtype=dtype, device=device)
            keep = shell < nb
            onehot[keep.nonzero().squeeze(-1), shell[keep]] = 1.0
            shells = onehot * (weight.flatten() / float(n) ** 4).unsqueeze(-1)
            ops = _Spectral(ikx=ikx, iky=iky, vel=vel, weight=weight, shells=shells)
            self._spectral[key] = ops
        return ops

    def _solver_ops(self, dtype: torch.dtype, device: torch.device) -> _Solver:
        key = (dtype, device)
        ops = self._solver.get(key)
        if ops is None:
            N, K, h = self.N, self.kmax, self.h
            sp = self._spectral_ops(N, dtype, device)
            ky, kx = _wavenumbers(N, dtype, device)
            mask = ((kx.abs() <= K) & (ky.abs() <= K)).to(dtype)
            vel = sp.vel * mask
            adv = torch.stack((kx**2 - ky**2, kx * ky)) * mask
            L = -self.nu * (kx**2 + ky**2) - self.drag
            y = torch.arange(N, dtype=torch.float64) * (2 * math.pi / N)
            f = (-self.kf * torch.cos(self.kf * y)).reshape(N, 1).expand(N, N)
            f_hat = (torch.fft.rfft2(f) * mask.double().cpu()).to(device=device, dtype=sp.vel.dtype)
            A, G, Z, F = [], [], [], []
            for a, b, g, z in zip(_SMR_ALPHA, _SMR_BETA, _SMR_GAMMA, _SMR_ZETA):
                inv = 1.0 / (1.0 - b * h * L)
                A.append((1.0 + a * h * L) * inv)
                G.append(g * h * inv)
                Z.append(z * h * inv)
                F.append((g + z) * h * inv * f_hat)
            k = (kx**2 + ky**2).sqrt()
            # |omega_hat|^2 ~ k E(k) with E(k) ~ k^4 exp(-2 (k / k0)^2)
            init = k**2.5 * torch.exp(-((k / self.init_wavenumber) ** 2)) * mask
            ops = _Solver(mask=mask, vel=vel, adv=adv, A=A, G=G, Z=Z, F=F, init=init)
            self._solver[key] = ops
        return ops

    @staticmethod
    def _check_grid(x: Tensor, shape: tuple[int, ...], name: str) -> None:
        """Cheap check (no device sync) of a floating tensor ``(..., *shape)``."""
        n = len(shape)
        if not isinstance(x, Tensor) or x.dim() < n or tuple(x.shape[x.dim() - n:]) != shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape (..., {', '.join(map(str, shape))}), got {got}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")

    @staticmethod
    def _square_size(x: Tensor, channels: int | None, name: str) -> int:
        """Size ``n`` of a field ``(..., n, n)`` (``channels is None``) or ``(..., channels, n, n)``."""
        lead = 2 if channels is None else 3
        if not isinstance(x, Tensor) or x.dim() < lead or x.shape[-1] != x.shape[-2] or x.shape[-1] < 2 or (
                channels is not None and x.shape[-3] != channels):
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            want = "(..., n, n)" if channels is None else f"(..., {channels}, n, n)"
            raise ValueError(f"{name} must have shape {want}, got {got}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
        return x.shape[-1]

    # ------------------------------------------------------------------ dynamics

    def _advection(self, w_hat: Tensor, ops: _Solver) -> Tensor:
        """Dealiased ``-(u . grad) omega`` in Fourier space, ``(..., N, M)`` -> ``(..., N, M)`` complex.

        Two inverse FFTs (u, v) and two forward ones (uv, v^2 - u^2), batched in one call each.
        """
        uv = torch.fft.irfft2(w_hat.unsqueeze(-3) * ops.vel, s=(self.N, self.N))
        u, v = uv.unbind(-3)
        q = torch.fft.rfft2(torch.stack((u * v, (v - u) * (v + u)), dim=-3))
        return (q * ops.adv).sum(-3)

    def substep(self, w_hat: Tensor) -> Tensor:
        """One IMEX RK3/CN sub-step of length :attr:`h` on dealiased Fourier coefficients of the vorticity
        (``torch.fft.rfft2`` of the state, times the dealiasing mask), ``(..., N, N // 2 + 1)`` complex."""
        ops = self._solver_ops(w_hat.real.dtype, w_hat.device)
        n_prev = None
        for s in range(3):
            n_cur = self._advection(w_hat, ops)
            w_new = ops.A[s] * w_hat + ops.G[s] * n_cur + ops.F[s]
            if n_prev is not None:
                w_new = w_new + ops.Z[s] * n_prev
            w_hat, n_prev = w_new, n_cur
        return w_hat

    def step(self, x: Tensor) -> Tensor:
        """Advance vorticity fields ``(..., N, N)`` by :attr:`dt` (:attr:`inner_steps` sub-steps)."""
        self._check_grid(x, self.state_shape, "state")
        ops = self._solver_ops(x.dtype, x.device)
        w_hat = torch.fft.rfft2(x) * ops.mask
        for _ in range(self.inner_steps):
            w_hat = self.substep(w_hat)
        return torch.fft.irfft2(w_hat, s=self.state_shape)

    def initial_state(self, n: int, generator: torch.Generator | None = None,
                      dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tensor:
        """``n`` random smooth vorticity fields ``(n, N, N)``.

        Gaussian white noise filtered in Fourier space to the energy spectrum ``E(k) ~ k^4 exp(-2 (k /
        k_0)^2)`` (peak at ``k_0 = init_wavenumber``, dealiased band only, zero mean), each field then scaled
        to the rms speed ``init_scale``. The noise is drawn on the generator's device (then moved to
        ``device``), so that a generator gives the same fields whatever ``device``.
        """
        dtype = dtype or torch.get_default_dtype()
        gen_device = generator.device if generator is not None else device
        noise = torch.randn(n, self.N, self.N, generator=generator, dtype=dtype, device=gen_device).to(device)
        ops = self._solver_ops(dtype, noise.device)
        w = torch.fft.irfft2(torch.fft.rfft2(noise) * ops.init, s=self.state_shape)
        rms = (2.0 * self.kinetic_energy(w)).sqrt()
        return w * (self.init_scale / rms)[..., None, None]

    # ------------------------------------------------------------------ diagnostics and observation

    def velocity(self, w: Tensor) -> Tensor:
        """Velocity ``(u, v)`` of vorticity fields, spectrally from the stream function: ``(..., n, n)`` ->
        ``(..., 2, n, n)``, any ``n`` (the solver grid ``N`` for states); the mean of ``w`` is ignored."""
        n = self._square_size(w, None, "vorticity")
        ops = self._spectral_ops(n, w.dtype, w.device)
        return torch.fft.irfft2(torch.fft.rfft2(w).unsqueeze(-3) * ops.vel, s=(n, n))

    def vorticity_from_velocity(self, uv: Tensor) -> Tensor:
        """Spectral curl ``dv/dx - du/dy`` of velocities, ``(..., 2, n, n)`` -> ``(..., n, n)``, any ``n``."""
        n = self._square_size(uv, 2, "velocity")
        ops = self._spectral_ops(n, uv.dtype, uv.device)
        uv_hat = torch.fft.rfft2(uv)
        return torch.fft.irfft2(ops.ikx * uv_hat[..., 1, :, :] - ops.iky * uv_hat[..., 0, :, :], s=(n, n))

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (2, self.R, self.R)

    def output(self, x: Tensor) -> Tensor:
        """Velocity on the solver grid, mean-pooled over ``r x r`` cells (``r = N / R``): ``(..., N, N)`` ->
        ``(..., 2, R, R)``. Output pixel ``[c, i, j]`` is the mean of the solver points
        ``[c, i r : (i + 1) r, j r : (j + 1) r]``."""
        self._check_grid(x, self.state_shape, "state")
        uv = self.velocity(x)
        r = self.N // self.R
        if r == 1:
            return uv
        return uv.unflatten(-1, (self.R, r)).unflatten(-3, (self.R, r)).mean(dim=(-1, -3))

    def lift(self, uv: Tensor, deconvolve: bool = True) -> Tensor:
        """Solver-grid vorticity from a pooled velocity, ``(..., 2, R, R)`` -> ``(..., N, N)``: an approximate
        inverse of :meth:`output`.

        The spectral curl on the ``R x R`` grid, its Fourier coefficients zero-padded to the ``N x N`` grid
        (the coarse Nyquist modes dropped). With ``deconvolve`` (default) the transfer function of the ``r x
        r`` mean pooling (a half-cell shift and a low-pass ``sin(k r dx / 2) / (r sin(k dx / 2))`` per axis)
        is divided out first, so that ``lift(output(w)) == w`` exactly for zero-mean fields whose Fourier
        modes all have ``|k_x|, |k_y| < R / 2``. The modes of ``w`` beyond that (up to ``N / 3``) are lost to
        the pooling (and alias onto the kept ones), hence only an approximate inverse in general (about 25 %
        relative error on the vorticity of a turbulent state at the default parameters).
        """
        self._check_grid(uv, self.output_shape, "velocity")
        R, N, r = self.R, self.N, self.N // self.R
        ops = self._spectral_ops(R, uv.dtype, uv.device)
        uv_hat = torch.fft.rfft2(uv)
        w_hat = ops.ikx * uv_hat[..., 1, :, :] - ops.iky * uv_hat[..., 0, :, :]
        if deconvolve and r > 1:
            ky, kx = _wavenumbers(R, uv.dtype, uv.device)
            w_hat = w_hat / (self._pool_transfer(ky, r) * self._pool_transfer(kx, r))
        w_hat = w_hat * (N / R) ** 2  # rfft2 is unnormalised: coefficients scale with the number of points
        keep = (R - 1) // 2 + 1  # non-negative wavenumbers below the coarse Nyquist one
        top, bottom = w_hat[..., :keep, :], w_hat[..., R // 2 + 1:, :]  # k_y >= 0 and k_y < 0 rows
        zeros_rows = w_hat.new_zeros(*w_hat.shape[:-2], N - top.shape[-2] - bottom.shape[-2], w_hat.shape[-1])
        w_hat = torch.cat((top, zeros_rows, bottom), dim=-2)
        w_hat = torch.cat((w_hat[..., :keep], w_hat.new_zeros(*w_hat.shape[:-1], N // 2 + 1 - keep)), dim=-1)
        return torch.fft.irfft2(w_hat, s=(N, N))

    def _pool_transfer(self, k: Tensor, r: int) -> Tensor:
        """Transfer ``(1/r) sum_m exp(i k m dx)`` of the mean over ``r`` solver points, ``dx = 2 pi / N``."""
        m = torch.arange(r, dtype=k.dtype, device=k.device)
        phase = k.unsqueeze(-1) * m * (2 * math.pi / self.N)
        return torch.complex(phase.cos(), phase.sin()).mean(-1)

    def kinetic_energy(self, w: Tensor) -> Tensor:
        """Kinetic energy per unit area ``<u^2 + v^2> / 2`` of vorticities, ``(..., n, n)`` -> ``(...)``."""
        n = self._square_size(w, None, "vorticity")
        ops = self._spectral_ops(n, w.dtype, w.device)
        e = (torch.fft.rfft2(w).unsqueeze(-3) * ops.vel).abs().square().sum(-3)
        return 0.5 * (e * ops.weight).sum((-2, -1)) / float(n) ** 4

    def energy_spectrum(self, w: Tensor) -> Tensor:
        """Shell-summed kinetic energy spectrum ``E(k)``, ``(..., n, n)`` -> ``(..., n // 2)``, ``k < n / 2``.

        ``E[k]`` sums ``(|u_hat|^2 + |v_hat|^2) / 2`` (normalised per unit area) over the modes with
        ``round(|k|) == k``, so that ``E.sum(-1)`` is :meth:`kinetic_energy` but for the modes with
        ``|k| >= n/2 - 1/2``; solver states have none (their modes stop at ``|k| <= sqrt(2) N / 3``).
        """
        n = self._square_size(w, None, "vorticity")
        ops = self._spectral_ops(n, w.dtype, w.device)
        e = (torch.fft.rfft2(w).unsqueeze(-3) * ops.vel).abs().square().sum(-3)
        return 0.5 * e.flatten(-2) @ ops.shells

    def extra_repr(self) -> str:
        return (f"resolution={self.N}, output_resolution={self.R}, Re={self.Re:g}, drag={self.drag:g}, "
                f"forcing_wavenumber={self.kf}, dt={self.dt:g}, inner_steps={self.inner_steps}")

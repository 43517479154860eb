r"""Strong-constraint 4D-Var over a window, with a Gaussian (Laplace) posterior from the Gauss–Newton Hessian.

The state at the window's first time :math:`x_0` determines the whole window through the model,
:math:`x_j = M^{(j)}(x_0)`. With the climatological background :math:`x_b, B` at that time and the window's
observations, 4D-Var minimizes

.. math:: J(x_0) = \tfrac12 (x_0 - x_b)^\top B^{-1} (x_0 - x_b)
          + \frac{1}{2\sigma^2} \sum_j \big\| m_j \odot \big(y_j - H M^{(j)}(x_0)\big) \big\|^2

by L-BFGS through the differentiable simulator, in the control variable :math:`v` with :math:`x_0 = x_b + L v`,
:math:`B = L L^\top` (the background term becomes :math:`\tfrac12 \|v\|^2`, a well-conditioned problem). The
windows of a batch are optimized together but independently (:func:`batched_lbfgs`: one history, step length and
stopping test per window, one batched evaluation of the model per line-search trial); L-BFGS on their summed cost
would mix the windows' curvature and step lengths and converge far more slowly.

At the minimum, the Gauss–Newton Hessian in :math:`v` and the posterior covariance of the target state
:math:`x_t = M^{(d)}(x_0)` are

.. math:: \mathcal H = I + \sigma^{-2} \sum_j (H \mathbf M_j L)^\top \operatorname{diag}(m_j) (H \mathbf M_j L),
          \qquad P_t = (\mathbf M_d L)\, \mathcal H^{-1} (\mathbf M_d L)^\top,

with :math:`\mathbf M_j = \partial M^{(j)} / \partial x_0` the tangent-linear model (from ``torch.func.jacrev``).
For linear dynamics with the exact prior as background this is the exact posterior.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import jacrev, vmap

from ..posterior import GaussianPosterior, PointPosterior
from .base import Baseline

__all__ = ["FourDVar", "batched_lbfgs"]


def batched_lbfgs(fun: Callable[[Tensor], tuple[Tensor, Tensor]], v: Tensor, max_iter: int = 200,
                  tol: float = 1e-6, history: int = 20, c1: float = 1e-4, max_backtrack: int = 30
                  ) -> tuple[Tensor, int]:
    r"""Minimize ``B`` independent functions at once by L-BFGS with a backtracking (Armijo) line search per problem.

    Near a minimum, where the decrease of a step is below the cost's round-off, the line search takes the approximate
    Wolfe conditions instead (Hager & Zhang): the cost equal up to round-off and the directional derivative
    :math:`\nabla f(v + a d)^\top d \le (2 c_1 - 1)\, \nabla f(v)^\top d`. Tolerances far below
    :math:`\sqrt{\epsilon |f|}` in the gradient are then reached in a few more iterations.

    Args:
        fun: ``v (B, D) -> (f (B,), grad (B, D))``, the ``B`` costs and their gradients.
        v: ``(B, D)`` starting points.
        max_iter: largest number of iterations.
        tol: a problem stops when the largest entry of its gradient is below ``tol``.
        history: number of curvature pairs kept.
        c1: Armijo constant.
        max_backtrack: largest number of step halvings per iteration; a problem for which none decreases its cost
            is at its minimum up to round-off and stops.

    Returns:
        The minimizers ``(B, D)`` and the number of iterations run.
    """
    f, g = fun(v)
    B = v.shape[0]
    round_off = 100 * torch.finfo(f.dtype).eps
    S, Y, R = [], [], []  # curvature pairs (B, D) and 1 / (s.y) (B,), 0 where a pair was skipped
    gamma = torch.ones(B, dtype=v.dtype, device=v.device)
    stalled = torch.zeros(B, dtype=torch.bool, device=v.device)  # no decrease found along a descent direction
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007
        active = (g.abs().amax(-1) > tol) & ~stalled
        if not active.any():
            it -= 1
            break
        q, alpha = g.clone(), []
        for s, y, rho in zip(reversed(S), reversed(Y), reversed(R)):
            a = rho * (s * q).sum(-1)
            q = q - a[:, None] * y
            alpha.append(a)
        r = gamma[:, None] * q
        for (s, y, rho), a in zip(zip(S, Y, R), reversed(alpha)):
            b = rho * (y * r).sum(-1)
            r = r + (a - b)[:, None] * s
        d = -r
        slope = (g * d).sum(-1)
        bad = ~(slope < 0)
        d = torch.where(bad[:, None], -g, d)  # not a descent direction: steepest descent
        slope = torch.where(bad, -(g * g).sum(-1), slope)
        step = torch.where(active, torch.ones_like(f), torch.zeros_like(f))
        if not S:  # first iteration: a step of at most one unit
            step = step * torch.clamp(1.0 / g.norm(dim=-1), max=1.0)
        f_new, g_new = f.clone(), g.clone()
        todo = active.clone()
        for _ in range(max_backtrack):
            ft, gt = fun(v + step[:, None] * d)
            armijo = ft <= f + c1 * step * slope
            # near a minimum the decrease falls below the cost's round-off and Armijo's test compares noise (it then
            # accepts tiny steps that change nothing): the approximate Wolfe test accepts a step whose cost is equal
            # up to round-off and whose directional derivative has shrunk
            approx = (ft <= f + round_off * f.abs()) & ((gt * d).sum(-1) <= (2 * c1 - 1) * slope)
            ok = todo & torch.isfinite(ft) & (armijo | approx)
            f_new, g_new = torch.where(ok, ft, f_new), torch.where(ok[:, None], gt, g_new)
            todo = todo & ~ok
            if not todo.any():
                break
            step = torch.where(todo, 0.5 * step, step)
        step = torch.where(todo, torch.zeros_like(step), step)  # no decrease found: stay, and stop (round-off)
        stalled = stalled | todo
        s_new = step[:, None] * d
        y_new = g_new - g
        sy, yy = (s_new * y_new).sum(-1), (y_new * y_new).sum(-1)
        valid = sy > 1e-10 * yy.sqrt() * s_new.norm(dim=-1)
        S.append(s_new)
        Y.append(y_new)
        R.append(torch.where(valid, 1.0 / torch.where(valid, sy, torch.ones_like(sy)), torch.zeros_like(sy)))
        gamma = torch.where(valid, sy / torch.where(valid, yy, torch.ones_like(yy)), gamma)
        if len(S) > history:
            S.pop(0), Y.pop(0), R.pop(0)
        v = v + s_new
        f, g = f_new, g_new
    return v, it


class FourDVar(Baseline):
    """Strong-constraint 4D-Var with a climatological background at the window's start (see the module).

    Args:
        simulator, observation, offsets, every, climatology: see :class:`~sbida.baselines.base.Baseline`.
        max_iter: largest number of L-BFGS iterations.
        tol: stop when the largest gradient entry (in the whitened control variable) is below this.
        history: L-BFGS memory.
        background_scale: factor on the background standard deviations (``1``: the climatology).
    """

    name = "4dvar"

    def __init__(self, simulator, observation, offsets, every=1, max_iter: int = 200, tol: float = 1e-6,
                 history: int = 20, background_scale: float = 1.0, climatology=None):
        super().__init__(simulator, observation, offsets, every=every, climatology=climatology)
        if int(max_iter) != max_iter or max_iter < 1 or not tol > 0 or int(history) != history or history < 1:
            raise ValueError(f"need max_iter >= 1, tol > 0 and history >= 1, got {max_iter}, {tol}, {history}")
        if not (background_scale > 0 and math.isfinite(background_scale)):
            raise ValueError(f"background_scale must be positive, got {background_scale}")
        self.max_iter, self.tol, self.history = int(max_iter), float(tol), int(history)
        self.background_scale = float(background_scale)
        self.last_info: dict = {}

    def trajectory(self, x0: Tensor) -> Tensor:
        """States at the window's times from the first one: ``(..., D) -> (..., T, D)`` (differentiable)."""
        states, x = [x0], x0
        for j in range(1, len(self.offsets)):
            x = self.forecast(x, self.offsets[j] - self.offsets[j - 1])
            states.append(x)
        return torch.stack(states, dim=-2)

    def _optimize(self, xb: Tensor, L: Tensor, y: Tensor, w: Tensor) -> tuple[Tensor, int, float]:
        """Batched L-BFGS over ``v`` ``(B, D)``; returns ``x0``, the iterations and the largest final gradient."""
        H = self.H.to(xb.dtype)

        def cost(v: Tensor) -> tuple[Tensor, Tensor]:  # per-window cost (B,) and gradient (B, D)
            with torch.enable_grad():
                v = v.detach().requires_grad_(True)
                x0 = xb + (L @ v[..., None]).squeeze(-1)
                r = (y - self.trajectory(x0) @ H.T) * w
                J = 0.5 * v.pow(2).sum(-1) + 0.5 * r.pow(2).sum((-2, -1))
                (g,) = torch.autograd.grad(J.sum(), v)
            return J.detach(), g

        v, n_iter = batched_lbfgs(cost, torch.zeros_like(xb), max_iter=self.max_iter, tol=self.tol,
                                  history=self.history)
        grad = float(cost(v)[1].abs().max())
        return xb + (L @ v[..., None]).squeeze(-1), n_iter, grad

    def posterior(self, y: Tensor, mask: Tensor, t: Tensor,
                  uncertainty: str = "laplace") -> GaussianPosterior | PointPosterior:
        """Gaussian (Laplace, Gauss–Newton) posterior of the target states, or the analysis alone.

        Args:
            y: ``(B, T, *obs_shape)`` observations.
            mask: ``(B, T, *obs_shape)`` mask.
            t: ``(B,)`` target times.
            uncertainty: ``"laplace"`` (the Gauss–Newton covariance) or ``"none"`` (the analysis only, without the
                tangent-linear model and the Hessian: what a point estimate costs).

        Returns:
            A :class:`~sbida.posterior.GaussianPosterior` (mean ``(B, *state_shape)``, Cholesky factor of the
            covariance ``(B, D, D)``), or with ``uncertainty="none"`` a :class:`~sbida.posterior.PointPosterior`;
            with ``.info`` (iterations, largest final gradient entry).
        """
        if uncertainty not in ("laplace", "none"):
            raise ValueError(f"uncertainty must be 'laplace' or 'none', got {uncertainty!r}")
        yf, mf, t = self.check_windows(y, mask, t)
        dtype = torch.float64
        xb, Bc = self._clim().moments(self.start_time(t))
        L = torch.linalg.cholesky(Bc) * self.background_scale  # (B, D, D)
        yd, w = yf.to(dtype), mf.to(dtype) / self.sigma
        x0, n_iter, grad = self._optimize(xb, L, yd, w)
        self.last_info = {"method": self.name, "iterations": n_iter, "max_grad": grad}
        with torch.no_grad():
            mean = self.trajectory(x0)[:, self.target_index].to(y.dtype).reshape(-1, *self.state_shape)
        if uncertainty == "none":
            post = PointPosterior(mean)
            post.info = dict(self.last_info)
            return post
        # tangent-linear model at the optimum: J[b, j] = d x_j / d x_0, (B, T, D, D)
        Jx = vmap(jacrev(self.trajectory))(x0)
        G = torch.einsum("pd,btde,bef->btpf", self.H, Jx, L) * w[..., None]  # (B, T, P, D), whitened and masked
        hess = torch.eye(self.D, dtype=dtype) + torch.einsum("btpd,btpe->bde", G, G)
        Lh = torch.linalg.cholesky(0.5 * (hess + hess.mT))
        A = Jx[:, self.target_index] @ L  # d x_t / d v, (B, D, D)
        # P_t = A hess^{-1} A^T = (A Lh^{-T})(A Lh^{-T})^T
        F = torch.linalg.solve_triangular(Lh, A.mT, upper=False).mT
        cov = F @ F.mT
        cov = 0.5 * (cov + cov.mT)
        tril = torch.linalg.cholesky(cov + 1e-12 * cov.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None]
                                     * torch.eye(self.D, dtype=dtype))
        post = GaussianPosterior(mean, scale_tril=tril.to(y.dtype))
        post.info = dict(self.last_info)
        return post

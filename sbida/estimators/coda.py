r"""CODA: a deterministic DA network trained on observations only, with optional parameter tuning and closure.

The network :math:`g` (:class:`~sbida.nn.coda_unet.CODAUNet`) maps a window of observations, lifted onto the state
grid (values and mask as channels, over time x space), to the state at the window's target. It is trained with the
weak-constraint 4D-Var loss of :mod:`sbida.estimators.coda_parts` through the differentiable simulator: the true
states are never used, not even for standardization (state statistics come from the observed values and the
known noise level: :math:`\mu_x = \bar y`, :math:`\sigma_x^2 = \mathrm{var}(y) - \sigma_y^2`).

- **Parameter tuning**: ``tune={"F": 6.0}`` turns simulator parameters into learnable ones started at the given
  values, optimized jointly with :math:`g` (their own learning rate ``param_lr``, no weight decay); the estimate
  after every step is kept in :attr:`CODA.parameter_history`. Joint training biases them (the analyses' errors
  grow along the rollouts; a damped model makes them grow less); :meth:`CODA.refine_parameters` then re-estimates
  them by 4D-Var over windows with free initial states, which removes that bias.
- **Closure learning**: ``closure={"hidden": 32, "layers": 2}`` adds a local network
  :math:`B_\psi(x_k)` (:class:`~sbida.estimators.coda_parts.LocalClosure`) to the tendency of the model inside RK4;
  on a two-scale task the model is the one-level truncation, so the trained :attr:`CODA.dynamics` is the hybrid
  model.
- **Uncertainty** (so that the diagnostics apply): ``uncertainty="laplace"`` (the default) gives a Gaussian around
  :math:`\hat x_t` with the Gauss-Newton covariance of the window's cost: every observation of the window
  (``laplace_lags="window"``; the earlier ones through a short backward rollout of the same simulator, see
  :func:`~sbida.estimators.coda_parts.time_reversed`) plus the climatological variance as a weak background,
  computed with forward-mode derivatives: one batched Jacobian per window and no extra training, which is why it is
  the default. That covariance measures how well the observations pin the state down, not the network's own error,
  so after training it is **scaled by one factor fitted on observations only** (:meth:`CODA.calibrate_laplace`):
  the innovations :math:`d = y_{t+l} - H\mathcal M^{(l)}(\hat x_t)` at the lags just after the window, which the
  network never saw, have variance :math:`\sigma_y^2 + \lambda\,\mathrm{diag}(J_l C J_l^\top)` if the analysis
  error is :math:`\mathcal N(0, \lambda C)`; :math:`\lambda` is the ratio of the mean excess of :math:`d^2` over
  :math:`\sigma_y^2` to the mean predicted variance, on held-out windows (``val`` in :meth:`CODA.fit`).
  ``laplace_lags="forward"`` keeps only the lags ``>= 0``, which
  the model reaches without backward integration. ``"none"`` gives a point estimate.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..data import IndexPermutation, WindowDataset
from ..nn.coda_unet import CODAUNet
from ..observations import ObservationModel
from ..posterior import GaussianPosterior, PointPosterior, Posterior
from ..simulators.base import Simulator
from .base import Batch, Estimator, _masked_stats
from .coda_parts import (
    CODAWindows,
    LocalClosure,
    coda_loss,
    gauss_newton_posterior,
    in_dtype,
    observation_jacobians,
    rollout_outputs,
)

__all__ = ["CODA"]


def _make_learnable(module: nn.Module, name: str, value: float) -> None:
    """Replace the buffer or attribute ``name`` of ``module`` by a learnable scalar started at ``value``."""
    if name in module._parameters:
        old = module._parameters.pop(name)
    elif name in module._buffers:
        old = module._buffers.pop(name)
    elif hasattr(module, name):
        old = torch.as_tensor(getattr(module, name))
        delattr(module, name)
    else:
        raise ValueError(f"{type(module).__name__} has no parameter {name!r} to tune")
    module.register_parameter(name, nn.Parameter(torch.full_like(torch.as_tensor(old, dtype=torch.float32),
                                                                 float(value))))


class CODA(Estimator):
    """Combined Optimization of Dynamics and Assimilation (module docstring).

    Args:
        task: the task (simulator, observation model, window, ``save_every``); or explicit shapes plus
            ``simulator``, ``observation`` and ``every``.
        simulator: the dynamics used in the loss (default: the task's, or its one-level truncation when it has
            one, e.g. :class:`~sbida.simulators.TwoScaleLorenz96`); a deep copy is kept.
        every: simulator steps per saved state (default: the task's ``data.save_every``).
        hyperparameters: see :attr:`defaults`: ``channels`` (per UNet level), ``rollout`` (``w``), ``alpha``,
            ``tune`` (``{name: initial value}``), ``param_lr``, ``closure`` (``None`` or
            ``{"hidden", "layers", "stencil"}``), ``uncertainty`` (``"laplace"`` or ``"none"``), ``laplace_lags``
            (``"window"`` or ``"forward"``), ``calibration_lags`` (lags after the window used by
            :meth:`calibrate_laplace` after :meth:`fit`; ``0``: no calibration, the scale stays 1), ``mask_input``
            (``True``: the network sees where the observations are, as a channel beside their values; ``False``: a
            channel of ones and the missing values at the observations' mean, the mask ablation of
            ``benchmarks/ablations.py``; the training loss keeps the observations' mask either way).
    """

    needs_task = True  # load() rebuilds the dynamics and the observation model from the stored task
    defaults = {"channels": [32, 64, 128], "rollout": 25, "alpha": 1.0, "tune": None, "param_lr": 1e-2,
                "closure": None, "uncertainty": "laplace", "laplace_lags": "window", "calibration_lags": 5,
                "every": None, "mask_input": True}

    def __init__(self, task: Any = None, *, simulator: Simulator | None = None, **kwargs: Any):
        super().__init__(task, **kwargs)
        hp = self.hparams
        if hp["uncertainty"] not in ("laplace", "none"):
            raise ValueError(f"uncertainty must be 'laplace' or 'none', got {hp['uncertainty']!r}")
        if hp["laplace_lags"] not in ("window", "forward"):
            raise ValueError(f"laplace_lags must be 'window' or 'forward', got {hp['laplace_lags']!r}")
        if int(hp["calibration_lags"]) != hp["calibration_lags"] or hp["calibration_lags"] < 0:
            raise ValueError(f"calibration_lags must be an integer >= 0, got {hp['calibration_lags']!r}")
        if int(hp["rollout"]) != hp["rollout"] or hp["rollout"] < 1:
            raise ValueError(f"rollout must be an integer >= 1, got {hp['rollout']!r}")
        if not hp["alpha"] >= 0:
            raise ValueError(f"alpha must be >= 0, got {hp['alpha']!r}")
        observation = kwargs.get("observation") or (task.observation if task is not None else None)
        if not isinstance(observation, ObservationModel):
            raise ValueError("CODA needs the observation model (a task, or observation=ObservationModel(...))")
        self.__dict__["observation_model"] = observation  # not a submodule: it has no weights
        if simulator is None:
            if task is None:
                raise ValueError("CODA needs the dynamics: give a task or simulator=...")
            simulator = task.simulator
            if hasattr(simulator, "truncated"):
                simulator = simulator.truncated()
        simulator = copy.deepcopy(simulator)
        if tuple(simulator.output_shape) != self.state_shape:
            raise ValueError(f"the simulator's output {simulator.output_shape} is not the estimated state "
                             f"{self.state_shape}")
        if tuple(simulator.state_shape) != tuple(simulator.output_shape):
            raise ValueError("CODA integrates its estimate with the simulator, so the simulator's state must be what "
                             f"is estimated; got state {simulator.state_shape} and output {simulator.output_shape}")
        if hp["every"] is None:
            hp["every"] = int(task.config.data.save_every) if task is not None else 1
        if hp["closure"] is not None:
            if not hasattr(simulator, "closure"):
                raise ValueError(f"{type(simulator).__name__} takes no closure")
            simulator.closure = LocalClosure(**hp["closure"])
        for name, value in (hp["tune"] or {}).items():
            _make_learnable(simulator, name, value)
        self.dynamics = simulator
        self.register_buffer("laplace_scale", torch.ones(()))  # set by calibrate_laplace
        self.parameter_history: dict[str, list[float]] = {name: [] for name in (hp["tune"] or {})}

    # -- network -------------------------------------------------------------------------------------------------
    def build(self) -> None:
        spatial = 1 if len(self.state_shape) == 1 else 2
        c = 1 if spatial == 1 else self.state_shape[0]
        self.net = CODAUNet(2 * c, c, spatial, self.hparams["channels"])
        self.net.check_grid(self.state_shape[-spatial:])

    def analysis(self, y: Tensor, mask: Tensor) -> Tensor:
        """The network's estimate from standardized windows ``(B, T, *obs)``: states ``(B, *state)``, original units."""
        B, T = y.shape[:2]
        m = mask.to(y.dtype)
        if not self.hparams["mask_input"]:  # what a network without the mask channel sees
            y, m = y * m, torch.ones_like(m)
        if self.lift is not None:
            v = ((y * m).flatten(2) @ self.lift).reshape(B, T, *self.state_shape)
            w = (m.flatten(2) @ self.lift).reshape(B, T, *self.state_shape)
        else:
            v, w = y, m
        if len(self.state_shape) == 1:
            inp = torch.stack((v, w), dim=1)  # (B, 2, T, K)
        else:
            inp = torch.cat((v, w), dim=2).transpose(1, 2)  # (B, 2C, T, H, W)
        out = self.net(inp).reshape(B, *self.state_shape)
        return self.x_mean + self.x_std * out

    # -- standardization from observations only ------------------------------------------------------------------
    def fit_standardization(self, data: WindowDataset, max_windows: int = 20000, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        idx = IndexPermutation(len(data), g)[:min(len(data), max_windows)]
        _, y, m, t = data.get(idx)
        m = m.bool()
        ym, ys = _masked_stats(y, m, (0, 1))
        self.y_mean.copy_(ym)
        self.y_std.copy_(ys)
        obs = y.double()[m]
        var = float(obs.var()) - self.observation_model.sigma**2
        if var <= 0.01 * float(obs.var()):
            var = 0.01 * float(obs.var())  # the noise explains (nearly) all the spread: keep a floor
        self.x_mean.fill_(float(obs.mean()))
        self.x_std.fill_(math.sqrt(var))
        t = t.double()
        self.t_stats.copy_(torch.stack([t.mean(), t.std().clamp_min(1e-6) if len(t) > 1 else t.new_tensor(1.0)]))
        self.fitted.fill_(True)

    # -- training hooks ------------------------------------------------------------------------------------------
    def training_view(self, data: WindowDataset) -> CODAWindows:
        return CODAWindows(data, self.hparams["rollout"])

    def _batch(self, data: Any, idx: Tensor) -> Any:
        if not isinstance(data, CODAWindows):
            return super()._batch(data, idx)
        yw, mw, ys, ms, yr, mr, t, tw = data.get(idx)
        return (self.standardize(None, yw, mw, t), self.standardize(None, ys, ms, tw),
                yr.to(self.device, self.dtype), mr.to(self.device))

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        tuned = [p for n, p in self.dynamics.named_parameters(recurse=False)]
        closure = list(self.dynamics.closure.parameters()) if getattr(self.dynamics, "closure", None) else []
        groups = [{"params": list(self.net.parameters())}]
        if closure:  # a part of the model, like the tuned parameters: no weight decay pulling it to zero
            groups.append({"params": closure, "weight_decay": 0.0})
        if tuned:
            groups.append({"params": tuned, "lr": self.hparams["param_lr"], "weight_decay": 0.0})
        return groups

    def loss(self, batch: Any) -> Tensor:
        if isinstance(batch, Batch):  # a plain window batch: no rollout observations to compare with
            raise ValueError("CODA trains on CODAWindows batches (see training_view)")
        now, shifted, y_roll, m_roll = batch
        alpha = float(self.hparams["alpha"])
        x_t = self.analysis(now.y, now.mask)
        x_tw = self.analysis(shifted.y, shifted.mask) if alpha else None
        loss, _ = coda_loss(x_t, x_tw, y_roll, m_roll, self.dynamics, self.observation_model,
                            every=self.hparams["every"], alpha=alpha)
        if self.training:
            for name in self.parameter_history:
                self.parameter_history[name].append(float(getattr(self.dynamics, name).detach()))
        return loss

    def after_fit(self, train: WindowDataset, val: WindowDataset | None, seed: int, progress: bool = False) -> None:
        """After :meth:`fit`: :meth:`calibrate_laplace` on ``val`` when the uncertainty is ``"laplace"``,
        ``calibration_lags > 0`` and ``val`` is given. Without ``val`` the factor stays 1: the training windows would
        understate it (the network fits their observations; on ``lorenz96-sparse`` they gave 1.4 where held-out
        windows gave 3.4), so call :meth:`calibrate_laplace` on held-out windows yourself."""
        if (self.hparams["uncertainty"] == "laplace" and self.hparams["calibration_lags"] and val is not None
                and len(self.state_shape) == 1):
            self.calibrate_laplace(val, seed=seed)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "laplace_scale", torch.ones(()))  # models saved before the calibration existed
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _laplace_lags(self) -> list[int]:
        """Indices into the window of the observations the Laplace covariance uses."""
        if self.hparams["laplace_lags"] == "window":
            return list(range(len(self.lags)))
        return [i for i, lag in enumerate(self.lags) if lag >= 0]

    def _laplace_tril(self, x: Tensor, mask: Tensor) -> Tensor:
        """The Cholesky factor ``(B, D, D)`` of the unscaled Gauss-Newton covariance around ``x`` ``(B, D)``;
        ``mask`` ``(B, T, *obs)``."""
        lags = self._laplace_lags()
        if not lags:
            raise ValueError("the window has no observation at or after the target: no Laplace posterior")
        var = self.x_std.square().expand(self.state_shape).to(x.dtype)
        return gauss_newton_posterior(self.dynamics, self.observation_model, x, mask[:, lags],
                                      [self.lags[i] for i in lags], self.hparams["every"], var)

    @torch.no_grad()
    def calibrate_laplace(self, data: WindowDataset, windows: int = 512, lags: int | None = None,
                          seed: int = 0) -> float:
        """Fit the factor on the Laplace covariance from observations only (module docstring).

        Args:
            data: windows of trajectories that go on for ``lags`` saved states after each window, held out from
                training (the network fits the observations of its training windows, which understates the error).
            windows: windows used (drawn at random).
            lags: observation times after the window's last one (default ``calibration_lags``).
            seed: seed of the draw.

        Returns:
            The factor, also kept in :attr:`laplace_scale` (saved with the model).
        """
        if len(self.state_shape) != 1:
            raise NotImplementedError("the Laplace posterior of CODA is implemented for 1-D states")
        n = int(self.hparams["calibration_lags"] if lags is None else lags)
        if n < 1:
            raise ValueError(f"lags must be >= 1, got {n}")
        last = int(max(self.lags))
        view = CODAWindows(data, last + n)  # a rollout reaching n states past the window
        g = torch.Generator().manual_seed(seed)
        idx = IndexPermutation(len(view), g)[:windows]
        yw, mw, _, _, yr, mr, t, _ = view.get(idx)
        was = self.training
        self.eval()
        try:
            batch = self.standardize(None, yw, mw, t)
            x = self.analysis(batch.y, batch.mask).to(torch.float64)
            tril = self._laplace_tril(x, batch.mask)  # (B, D, D)
            after = list(range(last + 1, last + n + 1))
            dynamics = in_dtype(self.dynamics, x.dtype)
            J = observation_jacobians(dynamics, self.observation_model, x, after, self.hparams["every"])
            pred = rollout_outputs(dynamics, x, last + n, self.hparams["every"], check=False)[:, after]
            d = (yr[:, after].to(x.dtype) - self.observation_model.apply(pred)).flatten(2)  # (B, n, M)
            m = mr[:, after].flatten(2) & torch.isfinite(J).all(-1) & torch.isfinite(d)
            if not bool(m.any()):
                raise ValueError("no observation after the windows to calibrate the Laplace covariance with")
            var = torch.einsum("blmd,bde->blme", torch.nan_to_num(J), tril).square().sum(-1)  # diag(J C J^T)
            excess = torch.where(m, d, 0).square().sum() - m.sum() * self.observation_model.sigma**2
            scale = float(excess / torch.where(m, var, 0).sum())
        finally:
            self.train(was)
        self.laplace_scale.fill_(min(max(scale, 1e-3), 1e3))
        return float(self.laplace_scale)

    def refine_parameters(self, data: WindowDataset, windows: int = 256, rollout: int = 50,
                          iterations: int = 300, seed: int = 0) -> dict[str, float]:
        r"""Re-estimate the tuned parameters jointly with the initial states of ``windows`` windows of ``data``.

        4D-Var over the window with free parameters: L-BFGS (double precision) minimizes

        .. math:: \sum_j \Big[\tfrac{1}{2\sigma_y^2} \sum_{i=0}^{w} \|y^j_{t+i} - H\,\mathcal{M}_\theta^{(i)}(x^j_t)\|^2
            + \tfrac12 \|(x^j_t - \mu_x) / \sigma_x\|^2\Big]

        over the parameters :math:`\theta` and the states :math:`x^j_t`, started from the network's analyses and
        the current parameters; :math:`\mu_x, \sigma_x` are the climatology the network was standardized with (from
        observations only).

        Why: in joint training the parameters are fitted to rollouts started from the network's analyses, and the
        analyses' errors bias them (errors in variables: on a chaotic model the analysis errors grow along the
        rollout, and a damped model, e.g. a lower Lorenz-96 forcing, makes them grow less). With the initial states
        free the observation noise is the only error left. The weak climatological background keeps the directions
        that the sparse observations of one window do not determine from fitting the noise (without it the
        forcing comes out too high: 8.16 instead of 8 on ``lorenz96-sparse``, against 8.07 with it, for the same
        128 windows). The windows should be long enough for the parameters to show: after joint training from
        ``F = 6`` (estimate 7.87), 256 windows of 25, 50 and 75 saved states gave 7.95, 8.00 and 8.01 (and 8.03 and
        7.98 for two other draws of 50). The refined values are set in :attr:`dynamics` and appended to
        :attr:`parameter_history`.

        Args:
            data: windows (the training set is fine: only observations are used).
            windows: how many windows, drawn at random with ``seed`` (the statistical error of the estimate falls
                as ``1 / sqrt(windows)``).
            rollout: saved states of each window's rollout (longer windows carry more information about the
                parameters, until chaos makes the cost too rugged).
            iterations: L-BFGS iterations.
            seed: seed of the draw.

        Returns:
            ``{name: refined value}``.
        """
        names = list(self.parameter_history)
        if not names:
            raise ValueError("no tuned parameters to refine: build CODA with tune={name: initial value}")
        if not bool(self.fitted):
            raise RuntimeError("fit CODA first: the refinement starts from the network's analyses")
        w = int(rollout)
        view = CODAWindows(data, w)
        idx = IndexPermutation(len(view), torch.Generator().manual_seed(seed))[:windows]
        yw, mw, _, _, y_roll, m_roll, t, _ = view.get(idx)
        self.eval()
        with torch.no_grad():
            now = self.standardize(None, yw, mw, t)
            x0 = self.analysis(now.y, now.mask).double().requires_grad_(True)
        params = {n: getattr(self.dynamics, n) for n in names}
        start = {n: p.detach().double().clone() for n, p in params.items()}
        scale = math.sqrt(len(x0))  # the parameters' curvature grows with the windows: keep it near the states'
        shifts = [torch.zeros_like(v, requires_grad=True) for v in start.values()]
        y_roll, m = y_roll.double().to(self.device), m_roll.double().to(self.device)
        mu, sd = self.x_mean.double(), self.x_std.double()
        sigma2 = self.observation_model.sigma ** 2
        dynamics = copy.deepcopy(self.dynamics).double()
        for n in names:
            del dynamics._parameters[n]
        opt = torch.optim.LBFGS([x0, *shifts], lr=1.0, max_iter=iterations, history_size=20,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure() -> Tensor:
            opt.zero_grad()
            for (n, v), u in zip(start.items(), shifts):
                setattr(dynamics, n, v + u / scale)
            hx = self.observation_model.apply(rollout_outputs(dynamics, x0, w, self.hparams["every"]))
            cost = 0.5 * (m * (y_roll - hx) ** 2).sum() / sigma2 + 0.5 * ((x0 - mu) / sd).square().sum()
            cost.backward()
            return cost

        with torch.enable_grad():
            opt.step(closure)
        out = {}
        for (n, v), u, p in zip(start.items(), shifts, params.values()):
            value = (v + u.detach() / scale).to(p.dtype)
            with torch.no_grad():
                p.copy_(value)
            out[n] = float(value) if value.numel() == 1 else value.tolist()
            self.parameter_history[n].append(out[n])
        return out

    # -- inference -----------------------------------------------------------------------------------------------
    def make_posterior(self, batch: Batch, uncertainty: str | None = None) -> Posterior:
        """A Gaussian (Laplace) posterior around the analysis, or a point estimate (``uncertainty="none"``)."""
        x = self.analysis(batch.y, batch.mask)
        kind = uncertainty or self.hparams["uncertainty"]
        if kind == "none":
            return PointPosterior(x)
        if len(self.state_shape) != 1:
            raise NotImplementedError("the Laplace posterior of CODA is implemented for 1-D states; use "
                                      "uncertainty='none' on 2-D states")
        tril = self._laplace_tril(x, batch.mask) * self.laplace_scale.sqrt().to(x.dtype)
        return GaussianPosterior(x, scale_tril=tril)

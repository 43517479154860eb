r"""CODA: a deterministic DA network trained on observations only, with optional parameter tuning and closure.

The network :math:`g` (:class:`~sbida.nn.coda_unet.CODAUNet`) maps a window of observations, lifted onto the state
grid (values and mask as channels, over time x space), to the state at the window's target. It is trained with the
weak-constraint 4D-Var loss of :mod:`sbida.estimators.coda_parts` through the differentiable simulator: the true
states are never used, not even for standardization (state statistics come from the observed values and the
known noise level: :math:`\mu_x = \bar y`, :math:`\sigma_x^2 = \mathrm{var}(y) - \sigma_y^2`).

- **Parameter tuning**: ``tune={"F": 6.0}`` turns simulator parameters into learnable ones started at the given
  values, optimized jointly with :math:`g` (their own learning rate ``param_lr``, no weight decay); the estimate
  after every step is kept in :attr:`CODA.parameter_history`.
- **Closure learning**: ``closure={"hidden": 32, "layers": 2}`` adds a local network
  :math:`B_\psi(x_k)` (:class:`~sbida.estimators.coda_parts.LocalClosure`) to the tendency of the model inside RK4;
  on a two-scale task the model is the one-level truncation, so the trained :attr:`CODA.dynamics` is the hybrid
  model.
- **Uncertainty** (so that the diagnostics apply): ``uncertainty="laplace"`` (the default) gives a Gaussian around
  :math:`\hat x_t` with the Gauss-Newton covariance of the window's cost (the observations at and after the target,
  which the model reaches from :math:`\hat x_t`, plus the climatological variance as a weak background), computed
  with forward-mode derivatives of the same simulator: it costs one batched Jacobian per window and no extra
  training, which is why it is the default. It measures how well the observations pin the state down, not the
  network's own error, so it tends to be overconfident where the network is biased; ``"none"`` gives a point
  estimate.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..data import WindowDataset
from ..nn.coda_unet import CODAUNet
from ..observations import ObservationModel
from ..posterior import GaussianPosterior, PointPosterior, Posterior
from ..simulators.base import Simulator
from .base import Batch, Estimator, _masked_stats
from .coda_parts import CODAWindows, LocalClosure, coda_loss, gauss_newton_posterior

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
            ``{"hidden", "layers", "stencil"}``), ``uncertainty`` (``"laplace"`` or ``"none"``).
    """

    needs_task = True  # load() rebuilds the dynamics and the observation model from the stored task
    defaults = {"channels": [32, 64, 128], "rollout": 25, "alpha": 1.0, "tune": None, "param_lr": 1e-2,
                "closure": None, "uncertainty": "laplace", "every": None}

    def __init__(self, task: Any = None, *, simulator: Simulator | None = None, **kwargs: Any):
        super().__init__(task, **kwargs)
        hp = self.hparams
        if hp["uncertainty"] not in ("laplace", "none"):
            raise ValueError(f"uncertainty must be 'laplace' or 'none', got {hp['uncertainty']!r}")
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
        idx = torch.randperm(len(data), generator=g)[: min(len(data), max_windows)]
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
        if closure:
            groups.append({"params": closure})
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
        lags = [i for i, lag in enumerate(self.lags) if lag >= 0]
        if not lags:
            raise ValueError("the window has no observation at or after the target: no Laplace posterior")
        var = self.x_std.square().expand(self.state_shape).to(x.dtype)
        with torch.enable_grad():
            cov = gauss_newton_posterior(self.dynamics, self.observation_model, x, batch.mask[:, lags],
                                         [self.lags[i] for i in lags], self.hparams["every"], var)
        return GaussianPosterior(x, cov=cov)

r"""The shared machinery of amortized posterior estimators: standardization, training loop, checkpoints.

An estimator learns ``p(x_t | y_{t-T:t}, t)`` from simulated windows. It works on standardized variables

.. math:: \tilde x = (x - \mu_x) / \sigma_x, \qquad \tilde y = (y - \mu_y) / \sigma_y \ (\text{observed entries}),
          \qquad \tilde t = (t - \mu_t) / \sigma_t,

with ``mu``, ``sigma`` estimated from the training set and saved with the model, and minimises a subclass's loss
``E[ loss(x~, y~, m, t~) ]`` with AdamW, a cosine or one-cycle learning-rate schedule, gradient clipping and early
stopping on the validation loss (the best weights are kept and restored at the end). Under ``torchrun`` the same
loop runs data-parallel (:mod:`sbida.distributed`): every rank takes its shard of each global batch, gradients are
averaged so that the step is the one of the whole batch, and rank 0 alone shows progress and writes checkpoints.

A subclass sets ``defaults`` (its hyperparameters), and implements :meth:`Estimator.build` (the networks),
:meth:`Estimator.loss` (a scalar from a standardized :class:`Batch`) and :meth:`Estimator.make_posterior`
(a :class:`~sbida.posterior.Posterior` in the original units).
"""

from __future__ import annotations

import copy
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .. import distributed as _dist
from ..data import IndexPermutation, Window, WindowDataset
from ..observations import ObservationModel
from ..posterior import Posterior

__all__ = ["Estimator", "Batch", "load", "REGISTRY"]

REGISTRY: dict[str, type[Estimator]] = {}
CHECKPOINT_VERSION = 1


class Batch(NamedTuple):
    """A standardized batch: ``x (B, *state)``, ``y (B, T, *obs)`` (0 where missing), ``mask`` (bool), ``t (B,)``."""

    x: Tensor | None
    y: Tensor
    mask: Tensor
    t: Tensor


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then renamed over it: a process killed while writing leaves
    the former file whole (a fit's training state is written after every epoch, and long fits are stopped at any
    time)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _masked_stats(v: Tensor, m: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Mean and std of ``v`` over ``dims`` where ``m`` is true (the global figures where fewer than 2 values)."""
    v, m = v.double(), m.double()
    n = m.sum(dims)
    gn = m.sum().clamp_min(1)
    gmean = (v * m).sum() / gn
    gstd = (((v - gmean) ** 2 * m).sum() / gn).sqrt()
    mean = (v * m).sum(dims) / n.clamp_min(1)
    std = (((v - mean) ** 2 * m).sum(dims) / (n - 1).clamp_min(1)).sqrt()
    few = n < 2
    mean, std = torch.where(few, gmean, mean), torch.where(few, gstd, std)
    return mean, std.clamp_min(1e-6 * max(float(gstd), 1e-6))


class Estimator(nn.Module):
    """Base class of the amortized estimators of ``p(x_t | y_{t-T:t}, t)``.

    Args:
        task: a :class:`~sbida.tasks.Task` giving the state and observation shapes, the window and the observation
            model; or ``None`` and the keywords below.
        state_shape: shape of a state, e.g. ``(40,)`` or ``(2, 32, 32)``.
        obs_shape: shape of one observation.
        window: a :class:`~sbida.data.Window`, its length (ending at the target), or the list of lags.
        observation: the linear observation model (bound), or its matrix ``H (M, D)``; ``None`` when observations
            live on the state grid.
        hyperparameters: overrides of the class's ``defaults`` (unknown keys are errors); ``seed`` seeds the
            initial weights.
    """

    defaults: dict[str, Any] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        REGISTRY[cls.__name__] = cls

    def __init__(self, task: Any = None, *, state_shape: Sequence[int] | None = None,
                 obs_shape: Sequence[int] | None = None, window: Window | int | Sequence[int] | None = None,
                 observation: ObservationModel | Tensor | None = None, **hyperparameters: Any):
        super().__init__()
        unknown = set(hyperparameters) - set(self.defaults) - {"seed"}
        if unknown:
            raise ValueError(f"unknown hyperparameters for {type(self).__name__}: {sorted(unknown)}; expected some of "
                             f"{sorted(self.defaults) + ['seed']}")
        self.hparams: dict[str, Any] = {"seed": 0, **copy.deepcopy(self.defaults), **hyperparameters}
        self.task_config = None
        if task is not None:
            state_shape, obs_shape = task.state_shape, task.obs_shape
            window = window if window is not None else task.window
            observation = observation if observation is not None else task.observation
            self.task_config = task.to_dict()
        if state_shape is None or obs_shape is None or window is None:
            raise ValueError("give a task, or state_shape, obs_shape and window")
        self.state_shape, self.obs_shape = tuple(int(s) for s in state_shape), tuple(int(s) for s in obs_shape)
        if isinstance(window, Window):
            self.lags = window.offsets()
        elif isinstance(window, int):
            self.lags = Window(window).offsets()
        else:
            self.lags = [int(o) for o in window]
        if not self.lags or sorted(set(self.lags)) != self.lags:
            raise ValueError(f"window lags must be increasing integers, got {self.lags}")
        self.register_buffer("lift", self._lift_matrix(observation))
        D = math.prod(self.state_shape)
        self.register_buffer("x_mean", torch.zeros(self.state_shape))
        self.register_buffer("x_std", torch.ones(self.state_shape))
        self.register_buffer("y_mean", torch.zeros(self.obs_shape))
        self.register_buffer("y_std", torch.ones(self.obs_shape))
        self.register_buffer("t_stats", torch.tensor([0.0, 1.0]))
        self.register_buffer("fitted", torch.tensor(False))
        self.event_size = D
        with torch.random.fork_rng(devices=range(torch.cuda.device_count())):  # manual_seed seeds every GPU too
            torch.manual_seed(int(self.hparams["seed"]))
            self.build()

    # -- hooks for subclasses ------------------------------------------------------------------------------------
    def build(self) -> None:
        """Create the networks (called once by the constructor, under the seed of the weights)."""
        raise NotImplementedError

    def loss(self, batch: Batch) -> Tensor:
        """Scalar training loss of a standardized batch."""
        raise NotImplementedError

    def make_posterior(self, batch: Batch, **kwargs: Any) -> Posterior:
        """The posterior of standardized windows (``batch.x`` is ``None``), in the original units of the state."""
        raise NotImplementedError

    # -- shapes and standardization -------------------------------------------------------------------------------
    @property
    def T(self) -> int:
        """Number of observation times in a window."""
        return len(self.lags)

    @property
    def device(self) -> torch.device:
        return self.x_mean.device

    def _rng_devices(self) -> list[torch.device]:
        """The accelerator whose random state a seeded block forks beside the CPU's (``torch.manual_seed`` seeds
        it too): none on the CPU."""
        return [] if self.device.type == "cpu" else [self.device]

    def _device_rng_state(self) -> Tensor | None:
        """The random state of this rank's accelerator (``None`` on the CPU), kept in a fit's training state."""
        return torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None

    @property
    def dtype(self) -> torch.dtype:
        return self.x_mean.dtype

    def _lift_matrix(self, observation: ObservationModel | Tensor | None) -> Tensor | None:
        if observation is None:
            return None
        if isinstance(observation, ObservationModel):
            if observation.state_shape is None:
                observation.bind(self.state_shape)
            if tuple(observation.state_shape) != self.state_shape or tuple(observation.obs_shape) != self.obs_shape:
                raise ValueError(f"the observation model maps {observation.state_shape} to {observation.obs_shape}, "
                                 f"but the estimator has states {self.state_shape} and observations {self.obs_shape}")
            H = observation.matrix(dtype=torch.float32)
        else:
            H = torch.as_tensor(observation, dtype=torch.float32)
        if self.obs_shape == self.state_shape and H.shape[0] == H.shape[1] and torch.equal(H, torch.eye(len(H))):
            return None  # observations on the state grid
        return H

    def fit_standardization(self, data: WindowDataset, max_windows: int = 20000, seed: int = 0) -> None:
        """Estimate the standardization from (up to ``max_windows`` random windows of) a training set."""
        g = torch.Generator().manual_seed(seed)
        n = min(len(data), max_windows)
        idx = IndexPermutation(len(data), g)[:n]
        x, y, m, t = data.get(idx)
        self._check_shapes(x, y, m, t)
        x = x.double()
        self.x_mean.copy_(x.mean(0))
        std = x.std(0)
        self.x_std.copy_(std.clamp_min(1e-6 * max(float(std.mean()), 1e-6)))
        ym, ys = _masked_stats(y, m.bool(), (0, 1))
        self.y_mean.copy_(ym)
        self.y_std.copy_(ys)
        t = t.double()
        self.t_stats.copy_(torch.stack([t.mean(), t.std().clamp_min(1e-6) if n > 1 else t.new_tensor(1.0)]))
        self.fitted.fill_(True)

    def standardize(self, x: Tensor | None, y: Tensor, mask: Tensor, t: Tensor) -> Batch:
        """Standardized :class:`Batch` of raw tensors (missing observations set to 0)."""
        mask = mask.to(self.device).bool()
        y = y.to(self.device, self.dtype)
        y = torch.where(mask, (y - self.y_mean) / self.y_std, torch.zeros((), dtype=self.dtype, device=self.device))
        t = (t.to(self.device, self.dtype) - self.t_stats[0]) / self.t_stats[1]
        if x is not None:
            x = (x.to(self.device, self.dtype) - self.x_mean) / self.x_std
        return Batch(x, y, mask, t)

    def _check_shapes(self, x: Tensor | None, y: Tensor, mask: Tensor, t: Tensor) -> None:
        T, o = self.T, self.obs_shape
        if y.dim() != 2 + len(o) or tuple(y.shape[1:]) != (T, *o):
            raise ValueError(f"expected observations y of shape (B, {T}, {', '.join(map(str, o))}) (a window of {T} "
                             f"times), got {tuple(y.shape)}")
        if mask.shape != y.shape:
            raise ValueError(f"mask must have the shape of y {tuple(y.shape)}, got {tuple(mask.shape)}")
        B = y.shape[0]
        if B == 0:
            raise ValueError("empty batch: no windows given")
        if tuple(t.shape) != (B,):
            raise ValueError(f"expected times t of shape ({B},), got {tuple(t.shape)}")
        if x is not None and tuple(x.shape) != (B, *self.state_shape):
            raise ValueError(f"expected states of shape ({B}, {', '.join(map(str, self.state_shape))}), got "
                             f"{tuple(x.shape)}")

    # -- training ------------------------------------------------------------------------------------------------
    def training_view(self, data: WindowDataset) -> Any:
        """What training draws batches from (indexable by :meth:`_batch`, with ``len``); the dataset by default.

        Subclasses that need more than ``(x, y, mask, t)`` per item (CODA's shifted windows) return their own view.
        """
        return data

    def _batch(self, data: Any, idx: Tensor) -> Any:
        return self.standardize(*data.get(idx))

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Parameter groups of the optimizer (one by default; subclasses may give simulator parameters their own
        learning rate and no weight decay)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    @torch.no_grad()
    def evaluate(self, data: WindowDataset, batch_size: int = 512, max_windows: int | None = 4096,
                 seed: int = 0) -> float:
        """Mean loss over (a fixed random subset of ``max_windows`` windows of) ``data``, with a fixed seed."""
        total, n = self._loss_sum(data, batch_size, max_windows, seed)
        return total / n

    @torch.no_grad()
    def _loss_sum(self, data: WindowDataset, batch_size: int, max_windows: int | None, seed: int,
                  rank: int = 0, world: int = 1) -> tuple[float, int]:
        """Sum of the per-window loss and number of windows, over the batches ``rank, rank + world, ...``."""
        data = self.training_view(data)
        n = len(data) if max_windows is None else min(len(data), max_windows)
        idx = IndexPermutation(len(data), torch.Generator().manual_seed(seed))[:n]
        was = self.training
        self.eval()
        total, count = 0.0, 0
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(seed)
            for i in range(rank * batch_size, n, batch_size * world):
                j = idx[i:i + batch_size]
                total += float(self.loss(self._batch(data, j))) * len(j)
                count += len(j)
        self.train(was)
        return total, count

    def fit(self, train: WindowDataset, val: WindowDataset | None = None, epochs: int = 50, batch_size: int = 256,
            lr: float = 1e-3, weight_decay: float = 1e-4, clip: float | None = 1.0, patience: int | None = 10,
            seed: int = 0, progress: bool = True, checkpoint: str | Path | None = None, resume: bool = False,
            max_time: float | None = None, schedule: str = "cosine", steps_per_epoch: int | None = None,
            val_windows: int | None = 4096, callback: Callable[[int, dict], bool | None] | None = None,
            distributed: bool | None = None) -> dict[str, list[float]]:
        """Train on ``train``, early-stopping on the loss over ``val``; the best weights are restored at the end.

        Args:
            train, val: window datasets (``val`` ``None``: the training loss decides the best epoch).
            epochs: maximum number of epochs.
            batch_size: windows per step (the global batch, shared among the ranks when distributed).
            lr: peak learning rate of AdamW.
            weight_decay: AdamW's decoupled weight decay.
            clip: maximum gradient norm (``None``: no clipping).
            patience: epochs without improvement of the validation loss before stopping (``None``: never).
            seed: seed of the batch order and of stochastic losses; the same seed gives the same weights.
            progress: show a progress bar (on rank 0 only).
            checkpoint: file written after every epoch (model, optimizer, schedule, history, best weights), by rank 0.
            resume: continue from ``checkpoint`` if it exists.
            max_time: stop after this many seconds (at the end of the running step).
            schedule: ``"cosine"`` (decay to lr/100 over the budget: the steps, or ``max_time`` when that is
                reached first, so a run stopped by the clock still ends at the low learning rate; such a run is
                not bit-reproducible, since its schedule follows the clock), ``"onecycle"`` (over the steps) or
                ``"constant"``.
            steps_per_epoch: steps of one epoch (default: one pass over ``train``); windows are drawn at random.
            val_windows: windows of ``val`` used for the validation loss (a fixed subset; ``None``: all).
            callback: ``callback(epoch, history)`` after every epoch (on every rank); returning ``True`` stops.
            distributed: ``None``: data-parallel when a process group of several ranks is initialized or the
                ``torchrun`` environment variables are set; ``False``: never; ``True``: required.

        Returns:
            The history: lists ``epoch``, ``train_loss``, ``val_loss``, ``lr`` and ``time`` (seconds since the start).
        """
        if not isinstance(train, WindowDataset) or len(train) == 0:
            raise ValueError(f"train must be a non-empty WindowDataset, got {train!r}")
        for name, d in (("train", train), ("val", val)):
            if d is not None and (d.state_shape != self.state_shape or d.obs_shape != self.obs_shape
                                  or d.window.offsets() != self.lags):
                raise ValueError(f"{name} has states {d.state_shape}, observations {d.obs_shape} and lags "
                                 f"{d.window.offsets()}; the estimator expects {self.state_shape}, {self.obs_shape} "
                                 f"and {self.lags}")
        if schedule not in ("cosine", "onecycle", "constant"):
            raise ValueError(f"schedule must be 'cosine', 'onecycle' or 'constant', got {schedule!r}")
        if epochs < 1 or batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
        parallel = distributed is not False and _dist.init()
        if distributed and not parallel:
            raise ValueError("distributed=True needs an initialized process group of several ranks (run the script "
                             "with torchrun --nproc_per_node=N, or call sbida.distributed.init() there)")
        rank, world = (_dist.rank(), _dist.world_size()) if parallel else (0, 1)
        view = self.training_view(train)
        if world > 1:
            if min(batch_size, len(view)) < world:
                raise ValueError(f"a global batch of {min(batch_size, len(view))} windows cannot be shared among "
                                 f"{world} ranks: use batch_size >= {world}")
            if _dist.device().type == "cuda" and self.device != _dist.device():
                self.to(_dist.device())
        steps = steps_per_epoch or max(1, len(view) // batch_size)
        total = epochs * steps
        opt = torch.optim.AdamW(self.param_groups(lr, weight_decay), lr=lr, weight_decay=weight_decay)
        clock = [time.perf_counter()]  # the start of training (set below, after a resumed run's elapsed time)
        agreed: list[float | None] = [None]  # with several ranks: the elapsed time of the slowest, after each step

        def budget_used(step: int) -> float:
            """The fraction of the budget used: of the steps, or of ``max_time`` when that comes first (with several
            ranks, by the slowest rank's clock: every rank then follows the same learning-rate schedule)."""
            done = step / total
            if max_time is not None:
                elapsed = agreed[0] if agreed[0] is not None else time.perf_counter() - clock[0]
                done = max(done, elapsed / max_time)
            return min(done, 1.0)

        if schedule == "cosine":  # lr/100 + (lr - lr/100) (1 + cos(pi p)) / 2 over the budget's progress p
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda step: 0.01 + 0.495 * (1.0 + math.cos(math.pi * budget_used(step))))
        elif schedule == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total)
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        history: dict[str, list[float]] = {"epoch": [], "train_loss": [], "val_loss": [], "lr": [], "time": []}
        order = torch.Generator().manual_seed(seed)
        start_epoch, best, best_state, bad, elapsed0 = 0, math.inf, None, 0, 0.0
        checkpoint = Path(checkpoint) if checkpoint is not None else None

        with torch.random.fork_rng(devices=self._rng_devices()):
            # every rank draws its own noise for stochastic losses (rank 0 the noise of a single process)
            torch.manual_seed(seed if rank == 0 else seed + 7919 * rank)
            ck = None
            if resume and checkpoint is not None:
                if world == 1:
                    ck = torch.load(checkpoint, map_location=self.device, weights_only=True) \
                        if checkpoint.exists() else None
                else:  # read by rank 0, sent to the others (no shared file system needed)
                    ck = _dist.broadcast_object(torch.load(checkpoint, map_location="cpu", weights_only=True)
                                                if rank == 0 and checkpoint.exists() else None)
            if ck is not None:
                self.load_state_dict(ck["model"])
                opt.load_state_dict(ck["optimizer"])
                sched.load_state_dict(ck["scheduler"])
                history, best, bad = ck["history"], ck["best_val"], ck["bad_epochs"]
                best_state, start_epoch = ck["best"], ck["epoch"] + 1
                order.set_state(ck["order_rng"])
                ranks_rng = ck.get("rng_ranks")
                torch.set_rng_state(ranks_rng[rank] if ranks_rng is not None and len(ranks_rng) == world
                                    else ck["rng"])
                dev = ck.get("device_rng_ranks")
                dev = dev[rank] if dev is not None and len(dev) == world else ck.get("device_rng")
                if dev is not None and self.device.type == "cuda":
                    torch.cuda.set_rng_state(dev.cpu(), self.device)
                elapsed0 = history["time"][-1] if history["time"] else 0.0
            elif not bool(self.fitted):
                self.fit_standardization(train, seed=seed)
            model, synced = (self._data_parallel() if world > 1 else (None, []))
            t0 = time.perf_counter() - elapsed0
            clock[0] = t0
            stop = start_epoch >= epochs or (patience is not None and bad >= patience)
            hide = not progress or stop or rank != 0
            if max_time is None:
                bar = tqdm(total=(epochs - start_epoch) * steps, desc=f"{type(self).__name__}", unit="step",
                           disable=hide, leave=False)
            else:  # steps or time, whichever runs out first: the bar shows the share of that budget used
                bar = tqdm(total=100.0, desc=f"{type(self).__name__}", disable=hide, leave=False,
                           bar_format="{desc}: {n:3.0f}% of the budget |{bar}| [{elapsed}<{remaining}{postfix}]")
            epoch = start_epoch
            while not stop:
                self.train()
                running, count = 0.0, 0
                perm = IndexPermutation(len(view), order)  # no n indices held for large data
                for s in range(steps):
                    i = (s * batch_size) % len(view)
                    idx = perm[i:i + batch_size]
                    if len(idx) < batch_size and len(view) >= batch_size:
                        idx = torch.cat([idx, perm[:batch_size - len(idx)]])
                    if world == 1:
                        loss = self.loss(self._batch(view, idx))
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"the training loss became {float(loss)} at epoch {epoch}, "
                                                     f"step {s}; lower lr or check the data")
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        step_loss, late = float(loss.detach()), False
                    else:
                        step_loss, late, agreed[0] = self._parallel_step(model, view, idx, opt, max_time, t0,
                                                                         clock[0])
                        if not math.isfinite(step_loss):
                            raise FloatingPointError(f"the training loss became {step_loss} at epoch {epoch}, "
                                                     f"step {s}; lower lr or check the data")
                    if clip is not None:
                        nn.utils.clip_grad_norm_(self.parameters(), clip)
                    opt.step()
                    if sched.last_epoch < total:
                        sched.step()
                    running, count = running + step_loss, count + 1
                    bar.update(1 if max_time is None else 100.0 * budget_used(epoch * steps + s + 1) - bar.n)
                    if late or (world == 1 and max_time is not None and time.perf_counter() - t0 > max_time):
                        break
                train_loss = running / count
                if val is None:
                    val_loss = train_loss
                elif world == 1:
                    val_loss = self.evaluate(val, max_windows=val_windows, seed=seed)
                else:
                    part = self._loss_sum(val, 512, val_windows, seed, rank, world)
                    part = _dist.all_reduce(torch.tensor(part, dtype=torch.float64, device=self.device))
                    val_loss = float(part[0] / part[1])
                for key, value in (("epoch", epoch), ("train_loss", train_loss), ("val_loss", val_loss),
                                   ("lr", opt.param_groups[0]["lr"]), ("time", time.perf_counter() - t0)):
                    history[key].append(value)
                if val_loss < best:
                    best, bad = val_loss, 0
                    best_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
                else:
                    bad += 1
                timed_out = max_time is not None and time.perf_counter() - t0 > max_time
                stop = epoch + 1 >= epochs or (patience is not None and bad >= patience) or timed_out
                if max_time is not None:  # the validation spends the budget too (a time-out reads 100 %)
                    bar.update(100.0 * budget_used(epoch * steps + count) - bar.n)
                bar.set_postfix(epoch=epoch, train=f"{train_loss:.4g}", val=f"{val_loss:.4g}", best=f"{best:.4g}")
                if checkpoint is not None:
                    rngs, dev_rngs, dev_rng = None, None, self._device_rng_state()
                    if world > 1:
                        rngs, dev_rngs = [None] * world, [None] * world
                        torch.distributed.all_gather_object(rngs, torch.get_rng_state())
                        torch.distributed.all_gather_object(dev_rngs, dev_rng)
                    if rank == 0:
                        checkpoint.parent.mkdir(parents=True, exist_ok=True)
                        atomic_save({"model": self.state_dict(), "optimizer": opt.state_dict(),
                                    "scheduler": sched.state_dict(), "history": history, "best_val": best,
                                    "bad_epochs": bad, "best": best_state, "epoch": epoch,
                                    "order_rng": order.get_state(), "rng": torch.get_rng_state(),
                                    "config": self.config(), **({"rng_ranks": rngs} if rngs else {}),
                                    **({"device_rng": dev_rng} if dev_rng is not None else {}),
                                    **({"device_rng_ranks": dev_rngs} if dev_rng is not None and dev_rngs else {})},
                                   checkpoint)
                if callback is not None and callback(epoch, history):
                    stop = True
                if world > 1:  # the ranks stop together (clocks and callbacks may disagree)
                    stop = bool(_dist.all_reduce(torch.tensor([float(stop)], device=self.device), "max").item())
                epoch += 1
            bar.close()
        if best_state is not None:
            self.load_state_dict(best_state)
        if world > 1:
            for parent, name, original in synced:  # back to plain BatchNorm (same parameters and buffers)
                setattr(parent, name, original)
            del model
            _dist.broadcast_module(self)  # the very same weights on every rank
        self.eval()
        self.after_fit(train, val, seed, progress=progress and rank == 0)
        return history

    def after_fit(self, train: WindowDataset, val: WindowDataset | None, seed: int, progress: bool = False) -> None:
        """Called at the end of :meth:`fit`, with the best weights in place (e.g. CODA calibrates its Laplace
        covariance there, NRE its ratio's temperature). Does nothing by default. ``progress``: :meth:`fit`'s (on
        rank 0 only)."""

    @staticmethod
    def _calibration_windows(data: WindowDataset, windows: int, seed: int, least: int = 1) -> Tensor:
        """``(n,)`` indices of ``windows`` windows of ``data`` drawn at random with ``seed`` (all of them if it has
        fewer), for a calibration fit on held-out windows; a clear error for no data or fewer than ``least``."""
        if not isinstance(data, WindowDataset) or len(data) == 0:
            raise ValueError(f"data must be a non-empty WindowDataset, got {data!r}")
        if windows < least:
            raise ValueError(f"need windows >= {least}, got {windows}")
        return IndexPermutation(len(data), torch.Generator().manual_seed(seed))[:windows]

    def _check_tails(self, key: str) -> None:
        """Check the Student-t base settings ``key`` (``None`` or degrees of freedom > 2), ``key_fit`` (a bool) and
        ``key_windows`` (>= 2) of the hyperparameters."""
        h = self.hparams
        nu, fit, windows = h[key], h[f"{key}_fit"], h[f"{key}_windows"]
        if nu is not None and not (float(nu) > 2 and math.isfinite(float(nu))):
            raise ValueError(f"{key} must be null (a Gaussian base) or finite degrees of freedom > 2, got {nu}")
        if not isinstance(fit, bool) or int(windows) < 2:
            raise ValueError(f"{key}_fit must be true or false and {key}_windows >= 2, got {fit!r} and {windows}")

    @staticmethod
    def _held_out(val: WindowDataset | None, setting: str, kept: str) -> bool:
        """Whether ``val`` has windows for the calibration fit that ``setting`` asks for at the end of :meth:`fit`;
        warns (``kept``: what stays as it is) when it has none."""
        if val is not None and len(val) > 0:
            return True
        warnings.warn(f"{setting} is set but fit() got no validation windows: {kept}", stacklevel=4)
        return False

    def _data_parallel(self) -> tuple[DistributedDataParallel, list[tuple[nn.Module, str, nn.Module]]]:
        """The estimator's loss wrapped in DistributedDataParallel (BatchNorm made SyncBatchNorm on GPU).

        DDP starts by copying rank 0's parameters and buffers to every rank. On the CPU (``gloo``) SyncBatchNorm is
        not available: BatchNorm layers then normalize with the statistics of the rank's own shard.
        """
        synced: list[tuple[nn.Module, str, nn.Module]] = []
        if self.device.type == "cuda":
            for parent in list(self.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                        synced.append((parent, name, child))
                        setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(_LossOf(self), device_ids=ids, find_unused_parameters=True), synced

    def _parallel_step(self, model: DistributedDataParallel, view: Any, idx: Tensor, opt: torch.optim.Optimizer,
                       max_time: float | None, t0: float, clock0: float) -> tuple[float, bool, float | None]:
        """Gradients of the global batch ``idx`` from this rank's shard (averaged over ranks by DDP); returns the
        loss of the global batch, whether any rank ran out of time and (with ``max_time``) the largest elapsed time
        since ``clock0`` over the ranks."""
        local = _dist.shard(idx)
        loss = model(self._batch(view, local))
        opt.zero_grad(set_to_none=True)
        (loss * (len(local) * _dist.world_size() / len(idx))).backward()
        late = max_time is not None and time.perf_counter() - t0 > max_time
        stats = torch.stack([loss.detach().double() * len(local), loss.new_tensor(float(late), dtype=torch.float64)])
        stats = _dist.all_reduce(stats)
        elapsed = None
        if max_time is not None:
            now = torch.tensor([time.perf_counter() - clock0], dtype=torch.float64, device=loss.device)
            elapsed = float(_dist.all_reduce(now, "max")[0])
        return float(stats[0]) / len(idx), bool(stats[1] > 0), elapsed

    # -- inference -----------------------------------------------------------------------------------------------
    def posterior(self, y: Tensor, mask: Tensor, t: Tensor | float, **kwargs: Any) -> Posterior:
        """The posterior of a batch of windows.

        Args:
            y: observations ``(B, T, *obs_shape)`` (values where ``mask`` is false are ignored; may be NaN there).
            mask: ``(B, T, *obs_shape)``, boolean or 0/1.
            t: physical time of each target ``(B,)`` (or a number for all).
            kwargs: options of the subclass's posterior.

        Returns:
            A :class:`~sbida.posterior.Posterior` of batch size ``B`` over states of shape ``state_shape``.
        """
        if not bool(self.fitted):
            raise RuntimeError(f"{type(self).__name__} is not trained: call fit() (or load a trained model) first")
        y, mask = torch.as_tensor(y), torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            if not ((mask == 0) | (mask == 1)).all():
                raise ValueError("mask must be boolean or hold only 0 and 1")
            mask = mask.bool()
        t = torch.as_tensor(t, dtype=torch.float64)
        if t.dim() == 0 and y.dim() >= 1:
            t = t.expand(y.shape[0])
        self._check_shapes(None, y, mask, t)
        if not torch.isfinite(torch.where(mask, y, torch.zeros((), dtype=y.dtype))).all():
            bad = (~torch.isfinite(y) & mask).nonzero()[0].tolist()
            raise ValueError(f"observations contain NaN or infinite values where observed (first at index {bad})")
        if not torch.isfinite(t).all():
            raise ValueError("times t contain NaN or infinite values")
        empty = ~mask.flatten(1).any(1)
        if empty.any():
            raise ValueError(f"windows {empty.nonzero().squeeze(-1).tolist()[:10]} have no observed value at all "
                             f"(empty mask)")
        self.eval()
        with torch.no_grad():
            return self.make_posterior(self.standardize(None, y, mask, t), **kwargs)

    # -- persistence ---------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild the estimator (without its weights), as plain values."""
        return {"class": type(self).__name__, "hparams": copy.deepcopy(self.hparams),
                "state_shape": list(self.state_shape), "obs_shape": list(self.obs_shape), "lags": list(self.lags),
                "lift_shape": None if self.lift is None else list(self.lift.shape), "task": self.task_config,
                "version": CHECKPOINT_VERSION}

    def save(self, path: str | Path) -> Path:
        """Write the weights, standardization and configuration to one file (read with :func:`load`)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"config": self.config(), "state_dict": self.state_dict()}, path)
        return path

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu", weights: str = "best") -> Estimator:
        """Read an estimator written by :meth:`save` (``weights_only``); ``Estimator.load`` finds the class.

        ``path`` may also be the training state that :meth:`fit` writes with ``checkpoint=...`` after every epoch, to
        look at a long training while it runs: ``weights`` picks its ``"best"`` weights so far (by the validation
        loss) or its ``"last"`` ones. Such an estimator lacks what the end of :meth:`fit` adds (the calibration fits
        of :meth:`after_fit`, e.g. NPE's tails or NRE's temperature): a warning says so, and
        ``est.after_fit(train, val, seed=0)`` makes them.
        """
        if weights not in ("best", "last"):
            raise ValueError(f"weights must be 'best' or 'last', got {weights!r}")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"no estimator at {path}")
        ck = torch.load(path, map_location=map_location, weights_only=True)
        if isinstance(ck, dict) and "model" in ck and "config" in ck and "epoch" in ck:  # fit's training state
            state = ck["model"] if weights == "last" or ck.get("best") is None else ck["best"]
            warnings.warn(f"{path.name} is the training state of fit() after epoch {ck['epoch'] + 1}: loaded its "
                          f"{'best' if state is ck.get('best') else 'last'} weights, without the calibration fits that "
                          f"end fit() (call after_fit(train, val, seed) for them)", stacklevel=2)
            ck = {"config": ck["config"], "state_dict": state}
        if not isinstance(ck, dict) or "config" not in ck or "state_dict" not in ck:
            raise ValueError(f"{path} is not a sbida estimator (neither a file of save() nor a training state of "
                             f"fit(checkpoint=...))")
        cfg = ck["config"]
        if cfg["class"] not in REGISTRY:
            raise ValueError(f"{path} holds a {cfg['class']}, which is not a known estimator ({sorted(REGISTRY)})")
        kind = REGISTRY[cfg["class"]]
        if cls is not Estimator and not issubclass(kind, cls):
            raise ValueError(f"{path} holds a {cfg['class']}, not a {cls.__name__}")
        lift = None if cfg["lift_shape"] is None else ck["state_dict"]["lift"]
        # hyperparameters added after a model was saved take the value that reproduces the old model
        hp = {**getattr(kind, "legacy_hparams", {}), **cfg["hparams"]}
        if getattr(kind, "needs_task", False) and cfg["task"] is not None:  # rebuilt with its dynamics
            from ..config import structured
            from ..tasks import Task, TaskConfig

            task = Task(structured(TaskConfig, cfg["task"], where=f"the task stored in {path.name}"))
            est = kind(task, window=cfg["lags"], **hp)
        else:
            est = kind(None, state_shape=cfg["state_shape"], obs_shape=cfg["obs_shape"], window=cfg["lags"],
                       observation=lift, **hp)
        est.task_config = cfg["task"]
        est.load_state_dict(ck["state_dict"])
        return est.eval()

    def extra_repr(self) -> str:
        return f"state_shape={self.state_shape}, obs_shape={self.obs_shape}, T={self.T}"


class _LossOf(nn.Module):
    """The loss of an estimator as a module's ``forward`` (what DistributedDataParallel wraps)."""

    def __init__(self, estimator: Estimator):
        super().__init__()
        self.estimator = estimator

    def forward(self, batch: Any) -> Tensor:
        return self.estimator.loss(batch)


def load(path: str | Path, map_location: str | torch.device = "cpu", weights: str = "best") -> Estimator:
    """Load any estimator saved with :meth:`Estimator.save`, or the weights of a training state written by
    :meth:`Estimator.fit` (``weights``: ``"best"`` or ``"last"``; see :meth:`Estimator.load`)."""
    return Estimator.load(path, map_location, weights)

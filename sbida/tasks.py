"""Named tasks: a simulator, an observation model, a window and the size of the simulated data.

The tasks of the benchmark protocol are YAML files in ``configs/tasks/``; :func:`get` loads one by name (or any
YAML file by path) and applies overrides, :func:`available` lists them.

>>> task = sbida.tasks.get("lorenz96", K=64)             # a short key, if it names one key only
>>> task = sbida.tasks.get("lorenz96", **{"data.seed": 3})
>>> data = task.simulate()                                # a WindowDataset
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from . import observations as _obs
from . import simulators as _sim
from .config import build, load_yaml, parse_overrides, structured
from .data import Window, WindowDataset, simulate_windows

__all__ = ["Task", "TaskConfig", "get", "available", "CONFIG_DIR", "SIMULATORS", "OBSERVATIONS"]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

SIMULATORS: dict[str, type] = {
    "lorenz96": _sim.Lorenz96,
    "two_scale_lorenz96": _sim.TwoScaleLorenz96,
    "kolmogorov": _sim.KolmogorovFlow,
    "linear_gaussian": _sim.LinearGaussian,
}
OBSERVATIONS: dict[str, type] = {
    "random_mask": _obs.RandomMask,
    "stations": _obs.Stations,
    "subsample": _obs.Subsample,
}


@dataclass
class WindowConfig:
    length: int = 10
    align: str = "end"


@dataclass
class DataConfig:
    n_trajectories: int = 1024
    n_states: int = 1024  # saved states per trajectory
    save_every: int = 1  # simulator steps between saved states
    burn_in: int = 0  # simulator steps discarded before the first saved state
    stride: int = 1  # saved states between the targets of consecutive windows
    seed: int = 0
    dtype: str = "float32"
    batch_size: int = 256


@dataclass
class TaskConfig:
    name: str = "custom"
    description: str = ""
    simulator: dict[str, Any] = field(default_factory=dict)
    observation: dict[str, Any] = field(default_factory=dict)
    window: WindowConfig = field(default_factory=WindowConfig)
    data: DataConfig = field(default_factory=DataConfig)


class Task:
    """A task built from a :class:`TaskConfig`: ``simulator``, ``observation`` (bound) and ``window``."""

    def __init__(self, config: TaskConfig):
        self.config = config
        self.simulator = build(SIMULATORS, config.simulator, "simulator")
        self.observation = build(OBSERVATIONS, config.observation, "observation").bind(self.simulator.output_shape)
        self.window = Window(config.window.length, config.window.align)
        if config.data.dtype not in ("float32", "float64"):
            raise ValueError(f"data.dtype must be float32 or float64, got {config.data.dtype!r}")

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def state_shape(self) -> tuple[int, ...]:
        """Shape of the inferred state (the simulator's output)."""
        return self.simulator.output_shape

    @property
    def obs_shape(self) -> tuple[int, ...]:
        return self.observation.obs_shape

    def to_dict(self) -> dict:
        return asdict(self.config)

    def simulate(self, progress: bool = True, **overrides: Any) -> WindowDataset:
        """Simulate the task's dataset; keyword arguments override ``data`` keys (e.g. ``n_trajectories=64``)."""
        d = structured(DataConfig, asdict(self.config.data), overrides, where="data")
        cfg = self.to_dict()
        cfg["data"] = asdict(d)
        return simulate_windows(
            self.simulator, self.observation, self.window, n_trajectories=d.n_trajectories, states=d.n_states,
            every=d.save_every, burn_in=d.burn_in, stride=d.stride, seed=d.seed, dtype=getattr(torch, d.dtype),
            batch_size=d.batch_size, progress=progress, config=cfg,
        )

    def independent_windows(self, n: int, seed: int = 12345, progress: bool = False
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """One window at a random position of each of ``n`` fresh trajectories: windows that share no trajectory.

        Calibration figures (ECE, SBC) over the windows of a few trajectories are correlated and noisy (even an exact
        posterior scores ECE ~0.04 on ~25 trajectories); these are independent draws of ``(x, y, t)``.

        Returns:
            ``x (n, *state_shape)``, ``y (n, T, *obs_shape)``, ``mask`` (bool, like ``y``), ``t (n,)``.
        """
        data = self.simulate(progress=progress, n_trajectories=n, seed=seed)
        per = len(data) // n
        g = torch.Generator().manual_seed(seed)
        return data.get(torch.arange(n) * per + torch.randint(per, (n,), generator=g))

    def summary(self) -> str:
        c = self.config
        return (f"{c.name}: {c.description}\n  simulator {self.simulator!r}\n  observation {self.observation!r}\n"
                f"  window {self.window}, data {asdict(c.data)}")

    def __repr__(self) -> str:
        return f"Task({self.config.name!r}, state {self.state_shape}, obs {self.obs_shape}, {self.window})"


def available() -> list[str]:
    """Names of the tasks in ``configs/tasks``."""
    return sorted(p.stem for p in (CONFIG_DIR / "tasks").glob("*.yaml"))


def _resolve_short_keys(base: dict, overrides: dict[str, Any]) -> dict[str, Any]:
    """Turn ``K=64`` into ``simulator.K=64`` when exactly one section of ``base`` has a key ``K``."""
    out = {}
    for key, value in overrides.items():
        if "." in key or key in base:
            out[key] = value
            continue
        owners = [s for s, v in base.items() if isinstance(v, dict) and key in v]
        if len(owners) > 1:
            raise ValueError(f"override key {key!r} is ambiguous: it is in {owners}; write e.g. '{owners[0]}.{key}'")
        if not owners:
            raise ValueError(f"unknown override key {key!r}: it is in no section of the task "
                             f"({', '.join(s for s, v in base.items() if isinstance(v, dict))})")
        out[f"{owners[0]}.{key}"] = value
    return out


def get(name: str | Path, *dotlist: str, **overrides: Any) -> Task:
    """Load a task by name (``configs/tasks/<name>.yaml``) or from a YAML path, with overrides.

    Args:
        name: a task name from :func:`available`, or the path of a YAML file.
        dotlist: overrides as ``"section.key=value"`` strings (the command line's form).
        overrides: overrides as keyword arguments: ``K=64``, or ``**{"data.seed": 1}``.

    Raises:
        ValueError: unknown task, unknown key or wrong type, naming the offending key.
    """
    path = Path(name)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / "tasks" / f"{name}.yaml"
        if not path.exists():
            raise ValueError(f"unknown task {name!r}; available: {available()} (or give a YAML file's path)")
    base = load_yaml(path)
    structured(TaskConfig, base, where=f"task file {path.name}")  # report the file's own errors first
    over = parse_overrides(list(dotlist))
    kw = OmegaConf.create({})
    for key, value in _resolve_short_keys(base, overrides).items():
        OmegaConf.update(kw, key, value, force_add=True)
    merged = OmegaConf.merge(OmegaConf.create(base), over, kw)
    return Task(structured(TaskConfig, merged, where=f"task {base.get('name', path.stem)}"))

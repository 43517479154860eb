"""Classical data assimilation on the same windows as the learned estimators: OI, EnKF/EnKS, 4D-Var, cycled ETKF,
and the reference points climatology and naive interpolation.

Every baseline is built from a task (``EnKS.from_task(task, members=100)``), estimates its time-dependent
climatology from training simulations (``.fit(train)``) and returns a :class:`~sbida.posterior.Posterior` for a batch
of windows (``.posterior(y, mask, t)``).
"""

from pathlib import Path
from typing import Any

from ..config import load_yaml
from .base import Baseline, baseline_model
from .climatology import Climatology
from .enkf import CycledETKF, EnKF, EnKS, apply_transform, etkf_transform, gaspari_cohn, observation_positions
from .fourdvar import FourDVar, batched_lbfgs
from .naive import ClimatologicalPrior, Interpolation
from .oi import OI

__all__ = ["get", "available", "Baseline", "baseline_model", "Climatology", "OI", "EnKF", "EnKS", "CycledETKF",
           "FourDVar", "ClimatologicalPrior", "Interpolation", "batched_lbfgs", "etkf_transform",
           "apply_transform", "gaspari_cohn", "observation_positions"]

BASELINES: dict[str, type] = {"climatology": ClimatologicalPrior, "interpolation": Interpolation, "oi": OI,
                              "enks": EnKS, "enkf": EnKF, "fourdvar": FourDVar, "cycled_etkf": CycledETKF}
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "baselines"


def available() -> list[str]:
    """Names of the baselines with a default configuration in ``configs/baselines``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def get(name: str, task, **overrides: Any) -> Baseline:
    """A baseline for a task with its defaults from ``configs/baselines/<name>.yaml`` and keyword overrides.

    Raises:
        ValueError: unknown baseline or unknown option.
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; available: {sorted(BASELINES)}")
    path = CONFIG_DIR / f"{name}.yaml"
    options = load_yaml(path) if path.exists() else {}
    options.pop("name", None)
    options.update(overrides)
    try:
        return BASELINES[name].from_task(task, **options)
    except TypeError as e:
        raise ValueError(f"bad option for baseline {name!r}: {e}") from None

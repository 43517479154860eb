"""sbida: probabilistic data assimilation as simulation-based inference.

Simulators produce trajectories, observation models turn them into sparse noisy observations, and windows of
observations become datasets of ``(x_t, y_{t-T:t}, mask, t)`` from which posteriors ``p(x_t | y, t)`` are learned.
"""

from . import (
    baselines,
    data,
    diagnostics,
    distributed,
    estimators,
    nn,
    observations,
    posterior,
    report,
    runtime,
    simulators,
    tasks,
)
from .data import Window, WindowDataset, simulate_windows
from .tasks import Task

__version__ = "0.1.0"

runtime._tune_on_import()  # glibc allocator thresholds: see sbida.runtime (SBIDA_TUNE_MALLOC=0 to skip)

__all__ = ["baselines", "data", "diagnostics", "distributed", "estimators", "nn", "observations", "report", "posterior",
           "runtime", "simulators", "tasks", "Window", "WindowDataset", "simulate_windows", "Task", "__version__"]

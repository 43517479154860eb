"""Amortized estimators of ``p(x_t | y_{t-T:t}, t)``: the shared training loop, NPE and CODA."""

from .base import Batch, Estimator, load
from .coda import CODA
from .npe import NPE

__all__ = ["Estimator", "Batch", "NPE", "CODA", "load"]

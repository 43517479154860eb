"""Amortized estimators of ``p(x_t | y_{t-T:t}, t)``: the shared training loop, NPE, the score estimators and CODA."""

from .base import Batch, Estimator, load
from .coda import CODA
from .composed import ComposedScore
from .npe import NPE
from .score import PosteriorScore

__all__ = ["Estimator", "Batch", "NPE", "CODA", "PosteriorScore", "ComposedScore", "load"]

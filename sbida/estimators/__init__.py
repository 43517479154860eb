"""Amortized estimators of ``p(x_t | y_{t-T:t}, t)``: the shared training loop, NPE, NRE, score estimators, CODA."""

from .base import Batch, Estimator, load
from .coda import CODA
from .composed import ComposedScore
from .npe import NPE
from .nre import NRE
from .score import PosteriorScore

__all__ = ["Estimator", "Batch", "NPE", "NRE", "CODA", "PosteriorScore", "ComposedScore", "load"]

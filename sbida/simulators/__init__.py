"""Batched, differentiable simulators: Lorenz-96 (one and two scales), Kolmogorov flow, linear-Gaussian."""

from .base import Simulator, check_state
from .integrators import euler_step, rk4_step
from .kolmogorov import KolmogorovFlow
from .linear import LinearGaussian, gaussian_window_posterior
from .lorenz96 import Lorenz96, TwoScaleLorenz96, lorenz96_tendency

__all__ = [
    "Simulator", "check_state", "rk4_step", "euler_step", "Lorenz96", "TwoScaleLorenz96", "lorenz96_tendency",
    "LinearGaussian", "gaussian_window_posterior", "KolmogorovFlow",
]

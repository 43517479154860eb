"""Shared input handling of the diagnostics: posteriors or samples, truths, flattening and validation."""

from __future__ import annotations

import torch
from torch import Tensor

from ..posterior import Posterior


def check_truth(truth: Tensor, name: str = "truth") -> Tensor:
    """``truth`` as a finite floating tensor ``(B, *state_shape)`` with ``B >= 1``."""
    if not isinstance(truth, Tensor):
        raise ValueError(f"{name} must be a tensor (B, *state_shape), got {type(truth).__name__}")
    if truth.dim() < 2 or truth.shape[0] < 1:
        raise ValueError(f"{name} must be (B, *state_shape) with B >= 1, got shape {tuple(truth.shape)}")
    if not torch.isfinite(truth).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return truth if truth.is_floating_point() else truth.float()


def check_samples(samples: Tensor, truth: Tensor | None = None, name: str = "samples") -> Tensor:
    """``samples`` ``(n, B, *state_shape)`` checked for finiteness and against ``truth`` ``(B, *state_shape)``."""
    if not isinstance(samples, Tensor):
        raise ValueError(f"{name} must be a tensor (n, B, *state_shape), got {type(samples).__name__}")
    if samples.dim() < 3 or samples.shape[0] < 1:
        raise ValueError(f"{name} must be (n, B, *state_shape) with n >= 1, got shape {tuple(samples.shape)}")
    if truth is not None and tuple(samples.shape[1:]) != tuple(truth.shape):
        raise ValueError(f"{name} of shape {tuple(samples.shape)} do not match truth of shape {tuple(truth.shape)}: "
                         f"expected (n, {', '.join(map(str, truth.shape))})")
    if not torch.isfinite(samples).all():
        raise ValueError(f"{name} contain NaN or infinite values")
    return samples if samples.is_floating_point() else samples.float()


def draw(posterior_or_samples: Posterior | Tensor, truth: Tensor, n_samples: int,
         generator: torch.Generator | None) -> tuple[Tensor, Posterior | None]:
    """Samples ``(n, B, *state_shape)`` of a posterior (drawn here) or given, checked against ``truth``."""
    truth = check_truth(truth)
    if isinstance(posterior_or_samples, Posterior):
        post = posterior_or_samples
        if post.batch_size != truth.shape[0] or tuple(post.state_shape) != tuple(truth.shape[1:]):
            raise ValueError(f"the posterior is over {post.batch_size} windows of shape {post.state_shape}, the truth "
                             f"has shape {tuple(truth.shape)}")
        return check_samples(post.sample(post.diagnostic_draws(int(n_samples)), generator=generator), truth), post
    return check_samples(posterior_or_samples, truth), None


def flat(x: Tensor, lead: int) -> Tensor:
    """``x`` with everything after its first ``lead`` dimensions flattened into one."""
    return x.reshape(*x.shape[:lead], -1)

r"""Posterior samples as an arviz ``InferenceData``, for arviz's rank, ECDF and summary tools.

Samples ``(n, B, *state_shape)`` become a ``posterior`` group with one chain, ``n`` draws, a ``window`` dimension of
size ``B`` and one dimension per state axis; the truths, when given, go in the ``constant_data`` group under
``<name>_true`` with the same ``window`` and state dimensions.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import Tensor

from ._checks import check_samples, check_truth

__all__ = ["to_inference_data"]


def to_inference_data(samples: Tensor, truth: Tensor | None = None, name: str = "x",
                      dims: Sequence[str] | None = None):
    """Wrap posterior samples in an ``arviz.InferenceData``.

    Args:
        samples: ``(n, B, *state_shape)``.
        truth: optional ``(B, *state_shape)`` true states.
        name: the variable's name.
        dims: names of the state axes (default ``cell`` for 1-D states, ``channel, row, col`` for 3-D ones,
            ``axis0, axis1...`` otherwise).

    Returns:
        An ``arviz.InferenceData`` with ``posterior[name]`` of dims ``(chain, draw, window, *dims)``.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz as az

    if truth is not None:
        truth = check_truth(truth)
    samples = check_samples(samples, truth)
    state_ndim = samples.dim() - 2
    if dims is None:
        dims = {1: ["cell"], 3: ["channel", "row", "col"]}.get(state_ndim, [f"axis{i}" for i in range(state_ndim)])
    dims = list(dims)
    if len(dims) != state_ndim:
        raise ValueError(f"dims must name the {state_ndim} state axes, got {dims}")
    all_dims = {name: ["window", *dims]}
    constant = None
    if truth is not None:
        all_dims[f"{name}_true"] = ["window", *dims]
        constant = {f"{name}_true": truth.detach().cpu().double().numpy()}
    posterior = {name: samples.detach().cpu().double().unsqueeze(0).numpy()}
    return az.from_dict(posterior=posterior, constant_data=constant, dims=all_dims)



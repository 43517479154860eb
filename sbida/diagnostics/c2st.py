r"""Classifier two-sample test (C2ST) as a ROC-AUC.

A classifier learns to tell samples :math:`x \sim p` (label 0) from :math:`x \sim q` (label 1); its cross-validated
area under the ROC curve is 0.5 when it cannot (:math:`p = q`) and tends to 1 as the distributions separate
(Lopez-Paz & Oquab, 2017). The classifier, the z-scoring on the first sample set and the K-fold cross-validation are
sbi's ``sbi.utils.metrics.c2st`` (scikit-learn's random forest or MLP), scored here with ``roc_auc``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import flat

__all__ = ["c2st"]


def c2st(samples_p: Tensor, samples_q: Tensor, classifier: str = "rf", n_folds: int = 5, max_samples: int | None = None,
         seed: int = 0) -> float:
    """Cross-validated ROC-AUC of a classifier between two sets of samples of one distribution each.

    Args:
        samples_p: ``(n, *state_shape)`` samples of the first distribution (e.g. an estimated posterior).
        samples_q: ``(m, *state_shape)`` samples of the second (e.g. the reference posterior).
        classifier: ``"rf"`` (random forest) or ``"mlp"``, as in sbi.
        n_folds: folds of the cross-validation.
        max_samples: use at most this many samples of each set (the first ones), to bound the cost.
        seed: seed of the classifier and of the folds.

    Returns:
        The mean ROC-AUC over the folds (0.5: indistinguishable).
    """
    from sbi.utils.metrics import c2st as sbi_c2st

    if classifier not in ("rf", "mlp"):
        raise ValueError(f"classifier must be 'rf' or 'mlp', got {classifier!r}")
    for name, s in (("samples_p", samples_p), ("samples_q", samples_q)):
        if not isinstance(s, Tensor) or s.dim() < 2:
            raise ValueError(f"{name} must be a tensor (n, *state_shape), got "
                             f"{tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__}")
        if not torch.isfinite(s).all():
            raise ValueError(f"{name} contain NaN or infinite values")
        if s.shape[0] < 2 * n_folds:
            raise ValueError(f"{name} need at least 2 * n_folds = {2 * n_folds} samples, got {s.shape[0]}")
    if samples_p.shape[1:] != samples_q.shape[1:]:
        raise ValueError(f"the two sample sets must share their state shape, got {tuple(samples_p.shape[1:])} and "
                         f"{tuple(samples_q.shape[1:])}")
    p, q = flat(samples_p, 1).float().cpu(), flat(samples_q, 1).float().cpu()
    if max_samples is not None:
        p, q = p[:max_samples], q[:max_samples]
    return float(sbi_c2st(p, q, seed=seed, n_folds=n_folds, metric="roc_auc", classifier=classifier))

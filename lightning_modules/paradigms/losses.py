"""Loss functions shared by teachers and students (pure, unit-tested without a Trainer)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def hard_to_soft(label: torch.Tensor, num_classes: int, label_smoothing: float = 0.0) -> torch.Tensor:
    """Hard labels (-1 = unknown) to target distributions; unknown rows are all zero (ignored by the loss)."""
    known = label >= 0
    target = torch.zeros(label.shape[0], num_classes, device=label.device)
    target[known] = F.one_hot(label[known], num_classes).float()
    return smooth(target, label_smoothing)


def smooth(target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Mix a target distribution with the uniform one; all-zero rows stay zero."""
    if label_smoothing <= 0:
        return target
    row_mass = target.sum(dim=1, keepdim=True)
    return (1 - label_smoothing) * target + label_smoothing * row_mass / target.shape[1]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against target distributions (N,K); rows with zero mass are ignored.

    Returns 0 (with a gradient path) when no row has a target, so a batch of unlabelled samples cannot NaN.
    """
    mass = target.sum(dim=1)
    valid = mass > 0
    if not valid.any():
        return logits.sum() * 0.0
    target = target[valid] / mass[valid, None]
    return -(target * F.log_softmax(logits[valid], dim=1)).sum(dim=1).mean()


def weighted_soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i CE_i / n`` over the ``n`` rows with a target (zero-mass rows are ignored, as above).

    Divided by the row count, not by ``sum w``: a real face (w = 1) then pulls exactly as hard as in an unweighted
    batch whatever else the batch holds, and a synthetic weight w scales only the synthetic faces' gradient.
    Dividing by ``sum w`` would renormalise it away in batches of one source (w would do nothing in a synthetic-only
    batch) and raise the real faces' step size whenever w < 1. All weights 1 = ``soft_cross_entropy``."""
    if weight.shape != logits.shape[:1]:
        raise ValueError(f"weight must have shape ({logits.shape[0]},), got {tuple(weight.shape)}")
    if (weight < 0).any():
        raise ValueError("sample weights must be >= 0")
    mass = target.sum(dim=1)
    valid = mass > 0
    if not valid.any():
        return logits.sum() * 0.0
    target = target[valid] / mass[valid, None]
    per_sample = -(target * F.log_softmax(logits[valid], dim=1)).sum(dim=1)
    return (weight[valid].to(per_sample.dtype) * per_sample).sum() / valid.sum()


def masked_au_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over known AUs only (mask False = AU unknown, contributes nothing)."""
    mask = mask.to(pred.dtype)
    denom = mask.sum()
    if denom == 0:
        return pred.sum() * 0.0
    return (((pred - target) ** 2) * mask).sum() / denom

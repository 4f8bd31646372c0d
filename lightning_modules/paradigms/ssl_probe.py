"""Linear probing of a frozen encoder: features of the real labelled train split -> one linear layer (plain torch,
seeded), scored on the real val and test splits with the suite's torchmetrics (accuracy, mean per-class accuracy,
macro-F1)."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score


@dataclass(frozen=True)
class ProbeSettings:
    epochs: int = 100
    lr: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 256

    def __post_init__(self):
        if not (isinstance(self.epochs, int) and not isinstance(self.epochs, bool) and self.epochs >= 1):
            raise ValueError(f"ssl.probe.epochs must be an integer >= 1, got {self.epochs!r}")
        if not self.lr > 0:
            raise ValueError(f"ssl.probe.lr must be > 0, got {self.lr}")
        if not self.weight_decay >= 0:
            raise ValueError(f"ssl.probe.weight_decay must be >= 0, got {self.weight_decay}")
        if not (isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool) and self.batch_size >= 1):
            raise ValueError(f"ssl.probe.batch_size must be an integer >= 1, got {self.batch_size!r}")


@torch.no_grad()
def extract_features(encode: Callable[[torch.Tensor], torch.Tensor], loader, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D), labels (N,)) on the CPU, in loader order; faces that failed to load are already dropped
    by the loader (and counted in the data summary)."""
    feats, labels = [], []
    for batch in loader:
        if batch["image"].shape[0] == 0:
            continue
        feats.append(encode(batch["image"].to(device)).float().cpu())
        labels.append(batch["label"].cpu())
    if not feats:
        raise ValueError("linear probe: no face of the split could be loaded")
    return torch.cat(feats), torch.cat(labels)


class Standardize(nn.Module):
    """Per-feature z-score with the train features' statistics (an affine map: the probe stays linear)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def train_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, settings: ProbeSettings,
                       seed: int) -> nn.Module:
    """A standardised linear classifier on ``features``, AdamW + cosine over ``settings.epochs`` shuffled passes.
    Rows labelled -1 (unknown) are left out, with one warning. Deterministic for a seed."""
    known = labels >= 0
    if int(known.sum()) == 0:
        raise ValueError("linear probe: the real train split has no labelled face")
    if not bool(known.all()):
        warnings.warn(f"linear probe: {int((~known).sum())} of {len(labels)} train faces have no label; left out")
    x, y = features[known], labels[known]
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():  # seeded init, independent of the global RNG
        bound = 1 / math.sqrt(x.shape[1])
        linear.weight.copy_(torch.rand(linear.weight.shape, generator=gen) * 2 * bound - bound)
        linear.bias.zero_()
    probe = nn.Sequential(Standardize(x.mean(0), x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones(x.shape[1])),
                          linear)
    steps_per_epoch = math.ceil(len(x) / settings.batch_size)
    optimizer = torch.optim.AdamW(linear.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.epochs * steps_per_epoch)
    with torch.enable_grad():
        for _ in range(settings.epochs):
            for idx in torch.randperm(len(x), generator=gen).split(settings.batch_size):
                loss = F.cross_entropy(probe(x[idx]), y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                scheduler.step()
    return probe.eval()


@torch.no_grad()
def score_probe(probe: nn.Module, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """acc, mean_class_acc, macro_f1 (labels -1 ignored): ``classification_metrics``' definitions, computed here
    without syncing (the probe runs in one process while the others of a DDP run may have left)."""
    preds = probe(features).argmax(dim=1)
    common = dict(num_classes=num_classes, ignore_index=-1)
    return {"acc": float(multiclass_accuracy(preds, labels, average="micro", **common)),
            "mean_class_acc": float(multiclass_accuracy(preds, labels, average="macro", **common)),
            "macro_f1": float(multiclass_f1_score(preds, labels, average="macro", **common))}


def linear_probe(encode: Callable[[torch.Tensor], torch.Tensor], loaders: dict, num_classes: int,
                 settings: ProbeSettings, seed: int, device: torch.device) -> dict[str, object]:
    """``loaders``: {"train", "val", "test"} real-data loaders without augmentation. Returns {"val": {...},
    "test": {...}, "train_size": n} (val/test: acc, mean_class_acc, macro_f1)."""
    feats = {split: extract_features(encode, loader, device) for split, loader in loaders.items()}
    probe = train_linear_probe(*feats["train"], num_classes, settings, seed)
    out: dict[str, object] = {split: score_probe(probe, *feats[split], num_classes) for split in ("val", "test")}
    out["train_size"] = int((feats["train"][1] >= 0).sum())
    out["feature_dim"] = int(feats["train"][0].shape[1])
    return out

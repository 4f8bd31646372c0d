"""How a set of generated faces covers the real ones, in a judge's feature space (pure functions over features):

- ``knn_precision_recall``: improved precision and recall (Kynkäänniemi et al., 2019): each set's manifold is the
  union of balls reaching every sample's k-th nearest neighbour; precision = the share of generated samples inside
  the real manifold (do they look real?), recall = the share of real samples inside the generated manifold (is the
  real variety covered?);
- ``class_spread``: per class, the mean pairwise distance between its samples (diversity: a generator that draws
  the same face for every seed of a condition has spread 0);
- ``fid_of_features``: FID of features already computed (torchmetrics' FID over them, nothing embedded twice);
- ``au_spread``: per class, the mean over AUs of the standard deviation of AU intensities (how varied the AUs of
  one expression are).
"""
from __future__ import annotations

from typing import Optional

import torch


def knn_radii(features: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every row of ``features`` (N, D) to its k-th nearest other row."""
    if not 1 <= k < len(features):
        raise ValueError(f"k must be in [1, {len(features) - 1}] for {len(features)} samples, got {k}")
    distances = torch.cdist(features, features)
    return distances.kthvalue(k + 1, dim=1).values  # k + 1: the row itself is at distance 0


def _inside(samples: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Per sample: within the radius of at least one centre."""
    return (torch.cdist(samples, centres) <= radii[None, :]).any(dim=1)


def knn_precision_recall(real: torch.Tensor, generated: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision / recall of ``generated`` (M, D) against ``real`` (N, D) features, k-NN manifolds."""
    real, generated = real.double(), generated.double()
    precision = _inside(generated, real, knn_radii(real, k)).double().mean().item()
    recall = _inside(real, generated, knn_radii(generated, k)).double().mean().item()
    return {"precision": precision, "recall": recall}


class _Given(torch.nn.Module):
    """A feature extractor that returns its input: torchmetrics' FID over features computed elsewhere."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


def fid_of_features(real: torch.Tensor, generated: torch.Tensor) -> float:
    """Fréchet distance between two sets of features (N, D) and (M, D)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=_Given(real.shape[1]), sync_on_compute=False)
    fid.update(real, real=True)
    fid.update(generated, real=False)
    return fid.compute().item()


def class_spread(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[int, Optional[float]]:
    """Mean pairwise distance between the samples of each class (None for a class with fewer than 2)."""
    out: dict[int, Optional[float]] = {}
    for c in range(num_classes):
        group = features[labels == c].double()
        n = len(group)
        out[c] = torch.pdist(group).mean().item() if n >= 2 else None
    return out


def au_spread(aus: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[int, Optional[float]]:
    """Per class: the mean over AUs of the AU intensities' standard deviation (None for fewer than 2 samples)."""
    out: dict[int, Optional[float]] = {}
    for c in range(num_classes):
        group = aus[labels == c].double()
        out[c] = group.std(dim=0).mean().item() if len(group) >= 2 else None
    return out


def mean_of_shared(a: dict, b: dict) -> tuple[Optional[float], Optional[float]]:
    """The means of two per-class dicts over the classes both have a value for (None, None when none)."""
    shared = [c for c in a if a[c] is not None and b.get(c) is not None]
    if not shared:
        return None, None
    return sum(a[c] for c in shared) / len(shared), sum(b[c] for c in shared) / len(shared)

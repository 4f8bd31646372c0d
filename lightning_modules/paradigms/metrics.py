"""Classification metrics (torchmetrics) and the confusion-matrix figure."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Overall accuracy, mean per-class accuracy (the AffectNet protocol's number) and macro-F1.

    Labels of -1 (unknown) are ignored.
    """
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=-1),
            "mean_class_acc": MulticlassAccuracy(num_classes, average="macro", ignore_index=-1),
            "macro_f1": MulticlassF1Score(num_classes, average="macro", ignore_index=-1),
        },
        prefix=prefix,
    )


def confusion_matrix_metric(num_classes: int) -> MulticlassConfusionMatrix:
    return MulticlassConfusionMatrix(num_classes, ignore_index=-1)


def save_confusion_matrix(matrix: torch.Tensor, class_names: Sequence[str], path: str | Path, title: str = ""):
    """Row-normalised confusion matrix (rows = true class) as a PNG; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = matrix.detach().cpu().float()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * n, 0.8 + 0.7 * n))
    ax.imshow(rates.numpy(), vmin=0, vmax=1, cmap="Blues")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{rates[i, j]:.2f}\n({int(counts[i, j])})", ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(n), class_names, rotation=45, ha="right")
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return fig

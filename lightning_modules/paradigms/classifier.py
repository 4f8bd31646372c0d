"""FER classifier LightningModules: the shared body of teachers and students.

``FERClassifierBase`` holds everything that does not depend on the network: soft-label cross-entropy (hard labels
become one-hot rows, optional label smoothing), the optional AU-regression loss, torchmetrics accuracy / mean
per-class accuracy / macro-F1, the confusion matrix saved as PNG and logged to wandb at the end of testing, the
predict output and AdamW + one-cycle schedule over the trainable parameters. A subclass provides
``forward(image) -> {"logits", "features"[, "aus"]}``, an ``au_head`` attribute (or None) and saves its
hyperparameters (``num_classes``, ``label_smoothing``, ``au_loss_weight``, ``lr``, ``weight_decay``,
``warmup_fraction``). ``FERClassifier`` is the timm backbone; ``lightning_modules.labeling.feranno.FERAnnoTeacher``
classifies the generator's own UNet features.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import timm
import torch
import torch.nn as nn

from datamodules.labels import AU_MAX_INTENSITY, EXPRESSIONS
from lightning_modules.paradigms.losses import (hard_to_soft, masked_au_mse, smooth, soft_cross_entropy,
                                               weighted_soft_cross_entropy)
from lightning_modules.paradigms.metrics import classification_metrics, confusion_matrix_metric, save_confusion_matrix

# Checkpoint key naming the class that wrote it (``module.QualName``), read by ``teacher.load_fer_classifier``.
CLASS_MARKER = "fer_classifier_class"


def create_backbone(name: str, num_classes: int, pretrained: Optional[str] = None, in_chans: int = 3,
                    drop_rate: float = 0.0) -> nn.Module:
    """A timm model; weights only from a local file (``pretrained`` = path), never from a hub."""
    if not timm.is_model(name):
        raise ValueError(f"unknown timm backbone {name!r} (config key: backbone)")
    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    if pretrained:
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file not found: {path} (config key: pretrained)")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    return timm.create_model(name, **kwargs)


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


class FERClassifierBase(L.LightningModule):
    """Losses, metrics, steps and optimiser of every FER classifier; the subclass supplies the network."""

    def __init__(self, num_classes: int = 8, class_names: Optional[Sequence[str]] = None):
        super().__init__()
        self.au_head: Optional[nn.Module] = None  # subclasses set an nn.Module to predict AU intensities
        self.class_names = list(class_names or EXPRESSIONS[:num_classes])
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")
        self.test_confusion = confusion_matrix_metric(num_classes)

    @property
    def display_name(self) -> str:
        """Model name in figure titles."""
        return type(self).__name__

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict_aus(self, features: torch.Tensor) -> torch.Tensor:
        """AU intensities on the 0..5 scale from pooled features (needs ``au_head``)."""
        return torch.sigmoid(self.au_head(features)) * AU_MAX_INTENSITY

    # ------------------------------------------------------------------ losses
    def _targets(self, batch: dict) -> torch.Tensor:
        if "soft_label" in batch:
            return smooth(batch["soft_label"].float(), self.hparams.label_smoothing)
        return hard_to_soft(batch["label"], self.hparams.num_classes, self.hparams.label_smoothing)

    def _loss(self, batch: dict, out: dict, weighted: bool = False) -> dict[str, torch.Tensor]:
        """``weighted``: per-sample ``batch["weight"]`` (a mixed train set's synthetic loss weight) scales the
        classification loss; validation and test are unweighted."""
        if weighted and "weight" in batch:
            cls = weighted_soft_cross_entropy(out["logits"], self._targets(batch), batch["weight"])
        else:
            cls = soft_cross_entropy(out["logits"], self._targets(batch))
        losses = {"cls": cls}
        if self.au_head is not None:
            losses["au"] = masked_au_mse(out["aus"], batch["aus"], batch["au_mask"])
            losses["total"] = losses["cls"] + self.hparams.au_loss_weight * losses["au"]
        else:
            losses["total"] = losses["cls"]
        return losses

    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        if batch["image"].shape[0] == 0:  # every face of the batch failed to load (counted by the datamodule)
            return None  # Lightning skips the step; BatchNorm never sees an empty batch
        out = self(batch["image"])
        losses = self._loss(batch, out, weighted=True)
        n = batch["image"].shape[0]
        self.log_dict({f"train/loss_{k}": v for k, v in losses.items()}, prog_bar=False, batch_size=n)
        self.log("train/loss", losses["total"], prog_bar=True, batch_size=n)
        return losses["total"]

    def _eval_step(self, batch: dict, stage: str, metrics) -> torch.Tensor:
        if batch["image"].shape[0] == 0:  # every face failed to load: nothing to score
            return batch["label"]
        out = self(batch["image"])
        losses = self._loss(batch, out)
        n = batch["image"].shape[0]
        self.log(f"{stage}/loss", losses["total"], batch_size=n, sync_dist=True)
        preds = out["logits"].argmax(dim=1)
        metrics.update(preds, batch["label"])
        if self.au_head is not None and batch["au_mask"].any():
            self.log(f"{stage}/au_mae", _masked_mae(out["aus"], batch["aus"], batch["au_mask"]), batch_size=n,
                     sync_dist=True)
        return preds

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_metrics)
        self.log_dict(self.val_metrics, prog_bar=True)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        preds = self._eval_step(batch, "test", self.test_metrics)
        self.test_confusion.update(preds, batch["label"])
        self.log_dict(self.test_metrics)

    def on_test_epoch_end(self) -> None:
        matrix = self.test_confusion.compute()
        self.test_confusion.reset()
        if not self.trainer.is_global_zero:
            return
        out_dir = Path(self.trainer.default_root_dir)
        fig = save_confusion_matrix(matrix, self.class_names, out_dir / "confusion_matrix.png",
                                    title=f"{self.display_name} test")
        for logger in self.loggers:
            if hasattr(logger, "log_image"):  # WandbLogger
                logger.log_image(key="test/confusion_matrix", images=[fig])
        import matplotlib.pyplot as plt

        plt.close(fig)
        torch.save(matrix.cpu(), out_dir / "confusion_matrix.pt")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        out = self(batch["image"])
        pred = {"probs": out["logits"].softmax(dim=1), "features": out["features"],
                "sample_id": batch["sample_id"]}
        if "aus" in out:
            pred["aus"] = out["aus"]
        return pred

    # ------------------------------------------------------------------ checkpoint
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CLASS_MARKER] = class_path(type(self))

    # ------------------------------------------------------------------ optim
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.hparams.lr,
                                      weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=max(1, int(self.trainer.estimated_stepping_batches)),
            pct_start=self.hparams.warmup_fraction, anneal_strategy="cos")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class FERClassifier(FERClassifierBase):
    """A timm backbone (+ optional AU-intensity head on its pooled features)."""

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 8,
        num_aus: int = 12,
        pretrained: Optional[str] = None,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        au_head: bool = False,
        au_loss_weight: float = 1.0,
        label_smoothing: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.05,
        class_names: Optional[Sequence[str]] = None,
        channels_last: bool = True,
    ):
        super().__init__(num_classes, class_names)
        self.save_hyperparameters()
        self.model = create_backbone(backbone, num_classes, pretrained, in_chans, drop_rate)
        if channels_last:  # ~25 % faster convolutions on CPU (measured: resnet18 48 px 127 -> 158 img/s)
            self.model = self.model.to(memory_format=torch.channels_last)
        self.au_head = nn.Linear(self.model.num_features, num_aus) if au_head else None

    @property
    def display_name(self) -> str:
        return self.hparams.backbone

    # ------------------------------------------------------------------ forward
    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features (N, D): the embedding for AU regression, FID/KID and voting."""
        if self.hparams.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.model.forward_head(self.model.forward_features(image), pre_logits=True)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.forward_features(image)
        out = {"logits": self.model.get_classifier()(features), "features": features}
        if self.au_head is not None:
            out["aus"] = self.predict_aus(features)
        return out


def _masked_mae(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(pred.dtype)
    return ((pred - target).abs() * mask).sum() / mask.sum().clamp_min(1)

"""Self-supervised pretraining on faces: SimCLR (two augmented views per face, NT-Xent over in-batch negatives).

Why SimCLR and not MoCo v3 (the method the paper names): both learn from the same signal, in-batch negatives of a
contrastive InfoNCE loss; MoCo v3 has no queue either (that was MoCo v1/v2), it adds a momentum encoder and a
prediction head, which mainly stabilise ViT training and cost a second encoder's memory and forward pass. SimCLR is
one encoder + a projection head, so the same budget buys a larger batch, and under DDP the negatives of every rank
are gathered (``torch.distributed.nn`` all_gather, gradients flow back to their rank), so the negatives per anchor
are ``2 x global batch - 2``, logged as ``train/negatives``.

The honest trade-off: contrastive learning wants many negatives. At the CPU toy scale (batch 32-64) an anchor sees
62-126 negatives, far from the thousands of the paper's setting; a MoCo v2-style queue would decouple negatives from
the batch size, at the price of stale keys from an older encoder. With small batches the toy numbers show whether
the plumbing works and how real vs synthetic faces compare at that scale, not what SimCLR reaches at full scale.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2

from datamodules.transforms import check_color_mode
from lightning_modules.paradigms.classifier import create_backbone

METHODS = ("simclr",)


# ---------------------------------------------------------------------------------------------------- the loss
def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float, all_a: Optional[torch.Tensor] = None,
            all_b: Optional[torch.Tensor] = None, offset: int = 0) -> torch.Tensor:
    """NT-Xent (SimCLR's InfoNCE) of the local pairs ``(z_a[i], z_b[i])``, mean over all 2n anchors.

    Each anchor's positive is the other view of its face; its negatives are every other embedding of both views in
    the candidate set ``all_a``/``all_b`` (default: the local batch; under DDP: every rank's, gathered), whose rows
    ``offset .. offset + n`` are the local pairs. With T candidate pairs an anchor has ``2T - 2`` negatives.
    Embeddings are L2-normalised here (cosine similarity)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    all_a = z_a if all_a is None else all_a
    all_b = z_b if all_b is None else all_b
    if z_a.dim() != 2 or z_a.shape != z_b.shape or all_a.shape != all_b.shape or all_a.shape[1:] != z_a.shape[1:]:
        raise ValueError(f"expected (n, d) views and (T, d) candidates, got {tuple(z_a.shape)}, {tuple(z_b.shape)}, "
                         f"{tuple(all_a.shape)}, {tuple(all_b.shape)}")
    n, total = z_a.shape[0], all_a.shape[0]
    if not 0 <= offset <= total - n:
        raise ValueError(f"offset {offset} puts the {n} local pairs outside the {total} candidates")
    if total < 2:
        raise ValueError("NT-Xent needs at least 2 pairs (an anchor needs a negative)")
    anchors = F.normalize(torch.cat([z_a, z_b]), dim=1)
    candidates = F.normalize(torch.cat([all_a, all_b]), dim=1)
    logits = anchors @ candidates.T / temperature  # (2n, 2T)
    local = torch.arange(n, device=z_a.device) + offset
    own = torch.cat([local, local + total])        # each anchor itself: never its own negative
    positive = torch.cat([local + total, local])   # the other view of the same face
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(2 * n, device=z_a.device), own] = True
    return F.cross_entropy(logits.masked_fill(is_self, float("-inf")), positive)


def negatives_per_anchor(global_pairs: int) -> int:
    return 2 * global_pairs - 2


# ------------------------------------------------------------------------------------------------ the two views
@dataclass(frozen=True)
class ViewAugment:
    """SimCLR's view recipe for faces: random resized crop, horizontal flip, colour jitter of ``strength`` s
    (brightness/contrast/saturation 0.8 s, hue 0.2 s) applied with ``jitter_p``, grayscale with ``grayscale_p``."""
    strength: float = 0.5
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: bool = True
    jitter_p: float = 0.8
    grayscale_p: float = 0.2

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"ssl.augment.crop_scale must satisfy 0 < lo <= hi <= 1, got {list(self.crop_scale)}")
        if not 0 <= self.strength <= 2:
            raise ValueError(f"ssl.augment.strength must be in [0, 2] (hue jitter 0.2 x strength), got {self.strength}")
        for key in ("jitter_p", "grayscale_p"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"ssl.augment.{key} must be in [0, 1], got {getattr(self, key)}")
        if not isinstance(self.hflip, bool):
            raise ValueError(f"ssl.augment.hflip must be true or false, got {self.hflip!r}")


def view_transform(image_size: int, augment: ViewAugment, color_mode: str = "rgb") -> v2.Compose:
    """PIL face -> one augmented view, float (3, H, W) in [-1, 1] like every other transform of the suite."""
    steps: list = [v2.Grayscale(num_output_channels=3)] if check_color_mode(color_mode) == "gray" else []
    steps.append(v2.RandomResizedCrop(image_size, scale=augment.crop_scale, antialias=True))
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip())
    s = augment.strength
    if s > 0 and augment.jitter_p > 0:
        steps.append(v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=augment.jitter_p))
    if augment.grayscale_p > 0:
        steps.append(v2.RandomGrayscale(p=augment.grayscale_p))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    return v2.Compose(steps)


class TwoViews:
    """A dataset transform: two independent draws of ``transform`` of one face, stacked (2, C, H, W); batches then
    hold (N, 2, C, H, W) and a face's views never leave its row."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image) -> torch.Tensor:
        return torch.stack([self.transform(image), self.transform(image)])


# ------------------------------------------------------------------------------------------------- the model
class SimCLR(L.LightningModule):
    """A timm backbone (pooled features, no classifier) + a projection MLP, trained with NT-Xent; AdamW with linear
    warmup and cosine decay over the planned steps (like the classifiers). ``encode`` gives the features the linear
    probe reads."""

    def __init__(self, backbone: str = "resnet18", pretrained: Optional[str] = None, in_chans: int = 3,
                 channels_last: bool = True, projection_hidden_dim: int = 512, projection_dim: int = 128,
                 temperature: float = 0.2, lr: float = 1e-3, weight_decay: float = 0.05,
                 warmup_fraction: float = 0.05):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.save_hyperparameters()
        self.backbone = create_backbone(backbone, num_classes=0, pretrained=pretrained, in_chans=in_chans)
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        dim = self.backbone.num_features
        self.projector = nn.Sequential(nn.Linear(dim, projection_hidden_dim), nn.BatchNorm1d(projection_hidden_dim),
                                       nn.ReLU(inplace=True), nn.Linear(projection_hidden_dim, projection_dim))
        self.last_negatives: Optional[int] = None  # negatives per anchor of the latest step (2 x global batch - 2)

    @property
    def feature_dim(self) -> int:
        return int(self.backbone.num_features)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.backbone(image)

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled features: what the linear probe and few-shot episodes read."""
        return self.encode(image)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encode(image))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from lightning_modules.paradigms.fewshot import FEATURE_MARKER

        checkpoint[FEATURE_MARKER] = f"{type(self).__module__}.{type(self).__qualname__}"  # stage=fewshot loads it

    def _gather(self, pairs: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(n, 2, d) local pairs -> (every rank's pairs, this rank's offset among them); gradients flow back to the
        rank that made each row. Ranks may hold different n (unreadable faces are dropped per rank): padded."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return pairs, 0
        sizes = self.all_gather(torch.tensor([pairs.shape[0]], device=pairs.device)).flatten().tolist()
        padded = F.pad(pairs, (0, 0, 0, 0, 0, max(sizes) - pairs.shape[0]))
        gathered = self.all_gather(padded, sync_grads=True)  # (world, max n, 2, d)
        rank = self.trainer.global_rank
        return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)]), int(sum(sizes[:rank]))

    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        images = batch["image"]
        if images.dim() != 5 or images.shape[1] != 2:
            raise ValueError(f"SimCLR needs two views per face, (N, 2, C, H, W) images; got {tuple(images.shape)}")
        n = images.shape[0]
        if n == 0:
            if self.trainer.world_size > 1:  # the other ranks wait in all_gather for this one
                from datamodules.errors import DataError

                raise DataError("every face of a train batch failed to load on this rank (see the unreadable-image "
                                "warning); DDP cannot skip a step on one rank only")
            return None  # counted by the datamodule; Lightning skips the step
        z = self(torch.cat([images[:, 0], images[:, 1]]))  # one pass: BatchNorm sees both views
        pairs = torch.stack([z[:n], z[n:]], dim=1)
        every, offset = self._gather(pairs)
        loss = nt_xent(pairs[:, 0], pairs[:, 1], self.hparams.temperature, every[:, 0], every[:, 1], offset)
        self.last_negatives = negatives_per_anchor(every.shape[0])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/negatives", float(self.last_negatives), batch_size=n)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=max(1, int(self.trainer.estimated_stepping_batches)),
            pct_start=self.hparams.warmup_fraction, anneal_strategy="cos")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

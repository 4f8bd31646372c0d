"""Image transforms: PIL RGB -> float tensor (C,H,W) in [-1, 1] (torchvision v2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.transforms import v2


@dataclass(frozen=True)
class AugmentConfig:
    hflip: bool = True
    crop_scale: tuple[float, float] = (0.85, 1.0)   # RandomResizedCrop area range; (1, 1) disables
    rotation_deg: float = 10.0
    color_jitter: float = 0.2                        # brightness/contrast/saturation strength; 0 disables
    random_erasing: float = 0.0                      # probability

    def __post_init__(self):
        lo, hi = self.crop_scale
        if not (0 < lo <= hi <= 1):
            raise ValueError(f"augment.crop_scale must satisfy 0 < lo <= hi <= 1, got {self.crop_scale}")
        if not (0 <= self.rotation_deg <= 180):
            raise ValueError(f"augment.rotation_deg must be in [0, 180], got {self.rotation_deg}")
        if not (0 <= self.color_jitter <= 1):
            raise ValueError(f"augment.color_jitter must be in [0, 1], got {self.color_jitter}")
        if not (0 <= self.random_erasing <= 1):
            raise ValueError(f"augment.random_erasing must be in [0, 1], got {self.random_erasing}")


_TO_SIGNED = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]


def eval_transform(image_size: int) -> v2.Compose:
    return v2.Compose([v2.Resize((image_size, image_size), antialias=True), *_TO_SIGNED])


def train_transform(image_size: int, augment: AugmentConfig) -> v2.Compose:
    steps: list = []
    if augment.crop_scale != (1.0, 1.0):
        steps.append(v2.RandomResizedCrop(image_size, scale=augment.crop_scale, ratio=(0.9, 1.1), antialias=True))
    else:
        steps.append(v2.Resize((image_size, image_size), antialias=True))
    if augment.hflip:
        steps.append(v2.RandomHorizontalFlip())
    if augment.rotation_deg > 0:
        steps.append(v2.RandomRotation(augment.rotation_deg))
    if augment.color_jitter > 0:
        j = augment.color_jitter
        steps.append(v2.ColorJitter(brightness=j, contrast=j, saturation=j))
    steps += _TO_SIGNED
    if augment.random_erasing > 0:
        steps.append(v2.RandomErasing(p=augment.random_erasing, value=0))
    return v2.Compose(steps)

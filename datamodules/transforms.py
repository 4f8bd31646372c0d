"""Image transforms: PIL RGB -> float tensor (C,H,W) in [-1, 1] (torchvision v2), and the colour modes.

``color_mode`` is the colour of a dataset's faces: ``rgb``, or ``gray`` (FER2013, FERPlus). Gray faces keep three
channels (every model takes RGB input) holding the same ITU-R 601 luma, so a gray face is gray whatever produced
it: a gray dataset's loader, or a generator whose output channels drift apart (the tinted faces of a generator
trained on gray faces).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.transforms import v2

COLOR_MODES = ("rgb", "gray")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, what PIL's convert("L") uses


def check_color_mode(mode: str, key: str = "data.color_mode") -> str:
    """The mode itself, or ValueError naming ``key``."""
    if mode not in COLOR_MODES:
        raise ValueError(f"{key} must be one of {', '.join(COLOR_MODES)}, got {mode!r}")
    return mode


def to_color_mode(image: Image.Image, mode: str) -> Image.Image:
    """A PIL image as an RGB image of ``mode``: gray = its luma in all three channels."""
    check_color_mode(mode)
    if mode == "gray":
        return image.convert("L").convert("RGB")
    return image.convert("RGB")


def gray_tensor(images: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) -> the same shape with each pixel's luma in all three channels (any value range)."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected (N,3,H,W) images, got shape {tuple(images.shape)}")
    weights = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True).expand_as(images).contiguous()


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


def _color_steps(color_mode: str) -> list:
    # first: the augmentations below keep equal channels equal (saturation jitter blends with the gray image)
    return [v2.Grayscale(num_output_channels=3)] if check_color_mode(color_mode) == "gray" else []


def eval_transform(image_size: int, color_mode: str = "rgb") -> v2.Compose:
    return v2.Compose([*_color_steps(color_mode), v2.Resize((image_size, image_size), antialias=True), *_TO_SIGNED])


def check_resample_size(size, key: str = "data.train_resample_size"):
    """``size`` as an int in [8, 1024], or None; ValueError naming ``key``."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or not (8 <= size <= 1024):
        raise ValueError(f"{key} must be a size in pixels in [8, 1024] or null, got {size!r}")
    return size


def train_transform(image_size: int, augment: AugmentConfig, color_mode: str = "rgb",
                    resample_size: int | None = None) -> v2.Compose:
    """Train-time augmentation to ``image_size``. ``resample_size`` first shrinks every face to that many pixels,
    so real faces reach the model with the detail of smaller ones (a 32 px generator's, upsampled like them)."""
    steps: list = _color_steps(color_mode)
    if check_resample_size(resample_size) is not None:
        steps.append(v2.Resize((resample_size, resample_size), antialias=True))
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

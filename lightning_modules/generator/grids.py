"""Labelled image grids (PNG) for generator samples: one row per condition, a name at the row start."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

LABEL_WIDTH = 96


def save_labelled_grid(images: torch.Tensor, row_names: Sequence[str], path: str | Path, scale: int = 2,
                       col_names: Sequence[str] = ()) -> Path:
    """``images`` (rows*cols, 3, H, W) in [0,1], row-major; writes a PNG and returns its path."""
    from PIL import Image, ImageDraw

    rows = len(row_names)
    if rows == 0 or images.shape[0] % rows:
        raise ValueError(f"{images.shape[0]} images do not fill {rows} rows")
    cols = images.shape[0] // rows
    h, w = images.shape[2] * scale, images.shape[3] * scale
    top = 14 if col_names else 0
    grid = Image.new("RGB", (LABEL_WIDTH + cols * w, top + rows * h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for j, name in enumerate(col_names):
        draw.text((LABEL_WIDTH + j * w + 2, 1), str(name), fill=(0, 0, 0))
    for r, name in enumerate(row_names):
        draw.text((4, top + r * h + h // 2 - 6), str(name), fill=(0, 0, 0))
        for c in range(cols):
            face = Image.fromarray(pixels[r * cols + c]).resize((w, h), Image.NEAREST)
            grid.paste(face, (LABEL_WIDTH + c * w, top + r * h))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, optimize=True)
    return path

"""The one sample/batch contract shared by every reader, datamodule and LightningModule (DESIGN.md §4)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, TypedDict

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from datamodules.labels import UNKNOWN_LABEL


class FERBatch(TypedDict, total=False):
    image: torch.Tensor        # float (N,C,H,W) in [-1, 1]
    label: torch.Tensor        # long (N,), -1 = unknown
    soft_label: torch.Tensor   # float (N,K), rows sum to 1 (optional)
    aus: torch.Tensor          # float (N,A), OpenFace 0..5 scale
    au_mask: torch.Tensor      # bool (N,A), False = AU unknown (not the same as intensity 0)
    caption: list[str]
    sample_id: list[str]


@dataclass
class FERRecord:
    """One labelled face as a reader finds it, before any pixels are decoded.

    ``image`` is a file path or an in-memory uint8 array (H,W) or (H,W,3) (FER2013 stores pixels in a csv).
    ``crop`` is an optional (x, y, w, h) face box applied after loading (AffectNet csv).
    """

    sample_id: str
    image: str | np.ndarray
    label: int = UNKNOWN_LABEL
    soft_label: Optional[np.ndarray] = None
    aus: Optional[np.ndarray] = None
    au_mask: Optional[np.ndarray] = None
    caption: str = ""
    crop: Optional[tuple[int, int, int, int]] = None
    meta: dict = field(default_factory=dict)

    @property
    def file_name(self) -> str:
        """Base name used to join sidecars (OpenFace csv, captions jsonl)."""
        return Path(self.image).name if isinstance(self.image, str) else self.sample_id


def load_record_image(record: FERRecord) -> Image.Image:
    """Decode a record's pixels as an RGB PIL image (gray is replicated), applying the face crop."""
    if isinstance(record.image, np.ndarray):
        img = Image.fromarray(record.image)
    else:
        with Image.open(record.image) as f:
            img = f.convert("RGB")
            img.load()
    img = img.convert("RGB")
    if record.crop is not None:
        x, y, w, h = record.crop
        if w <= 0 or h <= 0:
            raise ValueError(f"empty face crop {record.crop} for {record.sample_id}")
        img = img.crop((x, y, x + w, y + h))
    return img


class RecordDataset(torch.utils.data.Dataset):
    """Map-style dataset over records; decodes lazily and applies ``transform`` (PIL -> float tensor in [-1,1]).

    A record whose image cannot be decoded is skipped: the next decodable record is served instead, the skip
    is counted and one warning names the first bad file. ``num_aus``/``num_classes`` fill absent fields so that
    every sample has the same keys and collates.
    """

    def __init__(self, records: Sequence[FERRecord], transform: Callable[[Image.Image], torch.Tensor],
                 num_aus: int, num_classes: int, with_soft_labels: bool = False):
        if len(records) == 0:
            raise ValueError("RecordDataset got no records")
        self.records = list(records)
        self.transform = transform
        self.num_aus = num_aus
        self.num_classes = num_classes
        self.with_soft_labels = with_soft_labels
        self.corrupt: set[int] = set()
        self._warned = False

    def __len__(self) -> int:
        return len(self.records)

    def _sample(self, rec: FERRecord) -> dict:
        image = self.transform(load_record_image(rec))
        if rec.aus is not None:
            aus = torch.as_tensor(rec.aus, dtype=torch.float32)
            mask = torch.as_tensor(rec.au_mask if rec.au_mask is not None else np.ones(len(rec.aus), bool))
        else:
            aus, mask = torch.zeros(self.num_aus), torch.zeros(self.num_aus, dtype=torch.bool)
        out = {"image": image, "label": torch.tensor(rec.label, dtype=torch.long), "aus": aus,
               "au_mask": mask, "caption": rec.caption, "sample_id": rec.sample_id}
        if self.with_soft_labels:
            if rec.soft_label is not None:
                out["soft_label"] = torch.as_tensor(rec.soft_label, dtype=torch.float32)
            else:
                # A hard label as a one-hot distribution; unknown labels get an all-zero row (masked by the loss).
                soft = torch.zeros(self.num_classes)
                if 0 <= rec.label < self.num_classes:
                    soft[rec.label] = 1.0
                out["soft_label"] = soft
        return out

    def __getitem__(self, index: int) -> dict:
        for offset in range(len(self.records)):
            i = (index + offset) % len(self.records)
            if i in self.corrupt:
                continue
            try:
                return self._sample(self.records[i])
            except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as err:
                self.corrupt.add(i)
                if not self._warned:
                    self._warned = True
                    warnings.warn(f"skipping unreadable image {self.records[i].image!r} ({err}); further "
                                  f"unreadable images are counted in .corrupt without another warning")
        raise RuntimeError("no record in this dataset has a readable image")


def collate_fer(samples: list[dict]) -> FERBatch:
    """Stack tensors, keep strings as lists."""
    batch: dict = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        batch[key] = values if isinstance(values[0], str) else torch.stack(values)
    return batch  # type: ignore[return-value]

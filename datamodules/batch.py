"""The one sample/batch contract shared by every reader, datamodule and LightningModule."""
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
    weight: torch.Tensor       # float (N,), per-sample loss weight (optional: a mixed train set's synthetic weight)


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


class BadFaceBox(ValueError):
    """A face box that is empty or lies wholly outside its image: there is no face to crop."""


def crop_box(box: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x, y, w, h) clipped to an image of ``size`` = (width, height), as PIL (left, top, right, bottom).

    A box partly outside the image is clipped to the image (the crop is then smaller than the box, never padded
    with black); an empty box or one wholly outside raises ``BadFaceBox``.
    """
    x, y, w, h = box
    width, height = size
    left, top, right, bottom = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
    if w <= 0 or h <= 0 or right <= left or bottom <= top:
        raise BadFaceBox(f"face box (x={x}, y={y}, w={w}, h={h}) has no pixels inside the {width}x{height} image")
    return left, top, right, bottom


def load_record_image(record: FERRecord) -> Image.Image:
    """Decode a record's pixels as an RGB PIL image (gray is replicated), applying the face crop (``crop_box``)."""
    if isinstance(record.image, np.ndarray):
        img = Image.fromarray(record.image)
    else:
        with Image.open(record.image) as f:
            img = f.convert("RGB")
            img.load()
    img = img.convert("RGB")
    if record.crop is not None:
        img = img.crop(crop_box(record.crop, img.size))
    return img


# Why a record could not be loaded: the reason keys of the data summary (index = code in RecordDataset.flags).
UNREADABLE_REASONS = ("", "corrupt_image", "bad_face_box", "missing_image")
_UNREADABLE = "_unreadable"  # marker key of a sample that collate_fer drops


def _failure_code(err: BaseException) -> int:
    if isinstance(err, BadFaceBox):
        return UNREADABLE_REASONS.index("bad_face_box")
    if isinstance(err, FileNotFoundError):
        return UNREADABLE_REASONS.index("missing_image")
    return UNREADABLE_REASONS.index("corrupt_image")


# What load_record_image raises for bad user data (corrupt or vanished file, bad face box); catch these to skip.
LOAD_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


class RecordDataset(torch.utils.data.Dataset):
    """Map-style dataset over records; decodes lazily and applies ``transform`` (PIL -> float tensor in [-1,1]).

    A record whose image cannot be loaded (corrupt bytes, file gone since the read, a face box with no pixels in
    the image) is never replaced by another record: ``__getitem__`` returns a marker sample that ``collate_fer``
    drops, so the batch is smaller and no record is seen twice in an epoch. The failure is recorded in
    ``flags`` (one byte per record, a code into ``UNREADABLE_REASONS``), a tensor in shared memory, so flags
    set by DataLoader worker processes are seen by the main process: ``unreadable()`` counts distinct bad
    records per reason, and ``FERDataLoader`` issues one warning per pass that found new ones. Under DDP each
    rank has its own flags and counts only the records it loaded. ``num_aus``/``num_classes`` fill absent
    fields so that every sample has the same keys and collates. ``weight`` (optional): every sample carries it as
    its loss weight (a mixed train set whose synthetic part is weighted).
    """

    def __init__(self, records: Sequence[FERRecord], transform: Callable[[Image.Image], torch.Tensor],
                 num_aus: int, num_classes: int, with_soft_labels: bool = False, name: str = "data",
                 flags: Optional[torch.Tensor] = None, weight: Optional[float] = None):
        if len(records) == 0:
            raise ValueError("RecordDataset got no records")
        self.records = list(records)
        self.transform = transform
        self.num_aus = num_aus
        self.num_classes = num_classes
        self.with_soft_labels = with_soft_labels
        self.name = name
        self.weight = weight
        if flags is None:
            flags = torch.zeros(len(self.records), dtype=torch.uint8).share_memory_()
        if flags.shape != (len(self.records),):
            raise ValueError(f"flags must have shape ({len(self.records)},), got {tuple(flags.shape)}")
        self.flags = flags
        self._warned = 0  # main process: how many bad records the warnings have covered

    def variant(self, transform: Optional[Callable] = None, with_soft_labels: Optional[bool] = None,
                weight: Optional[float] = None) -> "RecordDataset":
        """The same records (and shared failure flags) with another transform, soft-label setting or weight."""
        return RecordDataset(self.records, transform or self.transform, self.num_aus, self.num_classes,
                             self.with_soft_labels if with_soft_labels is None else with_soft_labels, self.name,
                             self.flags, self.weight if weight is None else weight)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def corrupt(self) -> set[int]:
        """Indices of the records that could not be loaded so far."""
        return set(torch.nonzero(self.flags).flatten().tolist())

    def unreadable(self) -> dict[str, int]:
        """reason -> number of distinct records that could not be loaded so far."""
        counts = torch.bincount(self.flags.long(), minlength=len(UNREADABLE_REASONS)).tolist()
        return {reason: n for reason, n in zip(UNREADABLE_REASONS[1:], counts[1:]) if n}

    def warn_new_failures(self) -> None:
        """One warning if records failed since the last call (main process; ``FERDataLoader`` calls it)."""
        bad = torch.nonzero(self.flags).flatten()
        if len(bad) <= self._warned:
            return
        new, self._warned = len(bad) - self._warned, len(bad)
        rec = self.records[int(bad[0])]
        name = rec.image if isinstance(rec.image, str) else rec.sample_id
        try:  # re-load the first bad record here for its error message (workers cannot send it back)
            load_record_image(rec)
            why = "could not be loaded"
        except LOAD_ERRORS as err:
            why = " ".join(str(err).replace(f"'{name}'", "").replace(name, "").split())[:120]
        warnings.warn(f"{self.name}: {new} unreadable image(s) left out, none served in their place (first: {name}: "
                      f"{why}); counted in the data summary: {self.unreadable()}", stacklevel=2)

    def _sample(self, rec: FERRecord, pil: Image.Image) -> dict:
        image = self.transform(pil)
        if rec.aus is not None:
            aus = torch.as_tensor(rec.aus, dtype=torch.float32)
            mask = torch.as_tensor(rec.au_mask if rec.au_mask is not None else np.ones(len(rec.aus), bool))
        else:
            aus, mask = torch.zeros(self.num_aus), torch.zeros(self.num_aus, dtype=torch.bool)
        out = {"image": image, "label": torch.tensor(rec.label, dtype=torch.long), "aus": aus,
               "au_mask": mask, "caption": rec.caption, "sample_id": rec.sample_id}
        if self.weight is not None:
            out["weight"] = torch.tensor(float(self.weight))
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
        rec = self.records[index]
        if not self.flags[index]:
            try:
                pil = load_record_image(rec)
            except LOAD_ERRORS as err:
                self.flags[index] = _failure_code(err)
            else:
                return self._sample(rec, pil)
        # A blank stand-in with the right shapes: collate_fer drops it (and needs its shapes only if the whole
        # batch is bad).
        marker = self._sample(rec, Image.new("RGB", (64, 64)))
        marker[_UNREADABLE] = UNREADABLE_REASONS[int(self.flags[index])]
        return marker


def collate_fer(samples: list[dict]) -> FERBatch:
    """Stack tensors, keep strings as lists; samples that ``RecordDataset`` marked unreadable are dropped (a
    batch of only such samples gives zero-length tensors)."""
    good = [s for s in samples if _UNREADABLE not in s]
    source = good or samples
    batch: dict = {}
    for key in source[0]:
        if key == _UNREADABLE:
            continue
        values = [s[key] for s in source]
        batch[key] = (values if good else []) if isinstance(values[0], str) else torch.stack(values)[: len(good)]
    return batch  # type: ignore[return-value]


class EpochRandomSampler(torch.utils.data.RandomSampler):
    """A shuffle whose order is a function of (seed, epoch) alone, so a resumed run can replay the epoch it was
    killed in. Lightning calls ``set_epoch``; still a ``RandomSampler`` for Lightning's shuffle detection (under DDP
    it is replaced by a ``DistributedSampler``, seeded the same way)."""

    def __init__(self, data_source, seed: int):
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=gen).tolist())


class _SkipFirstPass:
    """``sampler`` whose next pass leaves out its first ``skip`` items (later passes are whole): the batches a
    killed run already trained on are skipped as indices, no image is read for them."""

    def __init__(self, sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):  # a generator: a worker iterator calls iter() twice and draws from the second only
        skip, self.skip = self.skip, 0
        it = iter(self.sampler)
        for _ in range(skip):
            next(it, None)
        yield from it


class FERDataLoader(torch.utils.data.DataLoader):
    """A DataLoader that, in the main process, warns once per pass in which its ``RecordDataset`` (or one inside a
    ``ConcatDataset``) found new unreadable images (workers cannot warn usefully: each would print its own).

    Resumable: ``shuffle=True`` draws its order from (the process seed, epoch) and worker seeds from the loader's
    own generator, so no pass consumes the global RNG; ``skip_batches`` (set by a fit resumed mid-epoch) leaves
    out the first batches of the next pass."""

    def __init__(self, dataset, *args, shuffle: Optional[bool] = None, sampler=None, batch_sampler=None,
                 generator=None, **kwargs):
        seed = torch.initial_seed() % 2**62  # seed_everything's seed (an unseeded process: a random one)
        if shuffle and sampler is None and batch_sampler is None:
            sampler, shuffle = EpochRandomSampler(dataset, seed), None
        if generator is None:
            generator = torch.Generator().manual_seed(seed)
        super().__init__(dataset, *args, shuffle=shuffle, sampler=sampler, batch_sampler=batch_sampler,
                         generator=generator, **kwargs)
        self.skip_batches = 0

    @property
    def _index_sampler(self):
        base = super()._index_sampler
        return _SkipFirstPass(base, self._skip_now) if getattr(self, "_skip_now", 0) else base

    def __iter__(self):
        self._skip_now, self.skip_batches = self.skip_batches, 0
        try:
            iterator = super().__iter__()  # reads _index_sampler now
        finally:
            self._skip_now = 0
        try:
            yield from iterator
        finally:
            for dataset in getattr(self.dataset, "datasets", [self.dataset]):
                if isinstance(dataset, RecordDataset):
                    dataset.warn_new_failures()

"""RealFERDataModule: any public format (or the embedded toy faces) as train/val/test loaders of the batch dict.

Skipped samples are counted in ``summary()["skipped"]`` as ``<split>/<reason>``: what the readers dropped
(missing image, duplicate, bad face box, label ids outside the protocol, ...) and what failed to load at decode
time (``corrupt_image``, ``bad_face_box``, ``missing_image``; such a record is left out of its batch, never
replaced by another). Decode-time counts are distinct records, gathered from DataLoader workers through shared
memory; under DDP each rank counts only the records it loaded, and ``summary()`` reports this process's counts
(rank 0's share in metrics.json; summing over ranks is not done yet).
"""
from __future__ import annotations

import collections
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from datamodules.batch import FERDataLoader, FERRecord, RecordDataset, collate_fer
from datamodules.errors import DataError, DataFileNotFound
from datamodules.labels import DISFA_AUS, class_names, in_protocol, parse_au_list
from datamodules.transforms import (AugmentConfig, check_color_mode, check_resample_size, eval_transform,
                                   train_transform)

SPLITS = ("train", "val", "test")
# Skip reasons already warned about where they are counted (readers, verify_images, _drop_shared_files).
READER_WARNED = {"missing_image", "duplicate", "bad_face_box", "corrupt_image", "in_test_split", "in_val_split"}
# Formats without a usable validation split: RAF-DB has none; AffectNet's validation set is its test set.
CARVE_VAL_FORMATS = {"rafdb", "affectnet", "affectnet_npy"}
# Where a run's AUs come from (data.au_source): an OpenFace csv, the annotate_aus stage's csv, or nowhere.
AU_SOURCES = ("sidecar", "annotate", "none")


class RealFERDataModule(L.LightningDataModule):
    def __init__(
        self,
        format: str = "toy",
        root: Optional[str] = None,
        protocol: int = 8,
        image_size: int = 48,
        batch_size: int = 64,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        val_split: str = "auto",           # auto | split | carve
        val_fraction: float = 0.1,
        train_limit: Optional[int] = None,  # seeded random subset of the train split (low-data protocols)
        seed: int = 0,
        aus: Optional[Sequence[int]] = None,
        openface: Optional[str] = None,
        au_source: Optional[str] = None,    # sidecar | annotate | none; None: sidecar with openface (or toy), else none
        captions: Optional[str] = None,
        format_options: Optional[dict] = None,
        toy: Optional[dict] = None,
        augment: Optional[dict] = None,
        soft_labels: bool = False,
        verify_images: bool = False,
        color_mode: str = "rgb",            # rgb | gray: the colour every face reaches a model in
        train_resample_size: Optional[int] = None,  # train faces shrunk to this size first (resolution studies)
    ):
        super().__init__()
        from datamodules.formats import READERS

        if format != "toy" and format not in READERS:
            raise ValueError(f"unknown data format {format!r} (config key: data.format); "
                             f"known: toy, {', '.join(sorted(READERS))}")
        if format != "toy":
            if root is None:
                raise ValueError(f"data.root must be set for data.format={format}")
            if not Path(root).is_dir():
                raise DataFileNotFound(f"data.root does not exist: {root} (config key: data.root)")
        for key, path in (("data.openface", openface), ("data.captions", captions)):
            if path is not None and not Path(path).exists():
                raise DataFileNotFound(f"{key} does not exist: {path}")
        self.au_source = resolve_au_source(format, au_source, openface)
        if protocol not in (7, 8):
            raise ValueError(f"data.protocol must be 7 or 8, got {protocol}")
        if val_split not in ("auto", "split", "carve"):
            raise ValueError(f"data.val_split must be auto, split or carve, got {val_split!r}")
        if val_split == "split" and format == "rafdb":
            raise ValueError("data.val_split=split: RAF-DB has no val split; use auto or carve (val is carved "
                             "from train)")
        if not (0 < val_fraction < 1):
            raise ValueError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
        if not (16 <= image_size <= 1024):
            raise ValueError(f"data.image_size must be in [16, 1024], got {image_size}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if train_limit is not None and train_limit < 1:
            raise ValueError(f"data.train_limit must be >= 1 or null, got {train_limit}")
        self.color_mode = check_color_mode(color_mode)
        self.train_resample_size = check_resample_size(train_resample_size)
        self.format, self.root, self.protocol = format, root, protocol
        self.image_size, self.batch_size = image_size, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers, self.val_split, self.val_fraction = num_workers, val_split, val_fraction
        self.train_limit, self.seed = train_limit, seed
        self.vocab = parse_au_list(aus)
        self.openface, self.captions = openface, captions
        self.format_options = dict(format_options or {})
        if format != "toy":
            check_format_options(format, self.format_options)
        self.toy_options = dict(toy or {})
        if format == "toy":
            self.toy_sizes, self.toy_config = parse_toy_options(self.toy_options)  # validates before any work
        self.augment = AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in (augment or {}).items()})
        self.soft_labels, self.verify_images = soft_labels, verify_images
        self.num_classes = protocol
        self.class_names = list(class_names(protocol))
        self.skipped: collections.Counter = collections.Counter()
        self.records: dict[str, list[FERRecord]] = {}
        self.datasets: dict[str, RecordDataset] = {}
        # train faces outside the data.train_limit subset: no loader of this class serves them (only a generator's
        # datamodule adds them, without their labels; see datamodules/unlabelled.py)
        self.outside_subset: list[FERRecord] = []

    # ------------------------------------------------------------------ reading
    def _read(self, split: str) -> list[FERRecord]:
        if self.format == "toy":
            records = toy_records(self.toy_config, split, self.toy_sizes[split], self.vocab.aus)
            return drop_aus(records) if self.au_source == "none" else records
        from datamodules.formats import attach_captions, attach_openface, read_split, verify_images

        result = read_split(self.format, self.root, split, **self.format_options)
        self.skipped.update({f"{split}/{k}": v for k, v in result.skipped.items()})
        records = result.records
        ids = [r.sample_id for r in records]
        if len(set(ids)) != len(ids):  # readers drop duplicates with a count; reaching here is a bug
            raise RuntimeError(f"{self.format} reader returned a sample_id twice in the {split} split")
        if self.verify_images:
            checked = verify_images(records)
            self.skipped.update({f"{split}/{k}": v for k, v in checked.skipped.items()})
            records = checked.records
        if self.openface:
            attach_openface(records, self.openface, self.vocab)
        if self.captions:
            attach_captions(records, self.captions)
        return records

    def _in_protocol(self, records: list[FERRecord], split: str) -> list[FERRecord]:
        kept = []
        for rec in records:
            if rec.label >= 0 and not in_protocol(rec.label, self.protocol):
                self.skipped[f"{split}/outside_{self.protocol}_class_protocol"] += 1
                continue
            if rec.soft_label is not None and len(rec.soft_label) != self.num_classes:
                soft = np.asarray(rec.soft_label[: self.num_classes], dtype=np.float32)
                if soft.sum() <= 0:
                    self.skipped[f"{split}/outside_{self.protocol}_class_protocol"] += 1
                    continue
                rec.soft_label = soft / soft.sum()
            kept.append(rec)
        return kept

    def _drop_shared_files(self, train: list[FERRecord], other: list[FERRecord], split: str) -> list[FERRecord]:
        """Train records whose image file is also listed in ``split`` are dropped from train (counted
        ``train/in_<split>_split``, one warning): the evaluation split keeps its samples and stays unseen."""
        files = {r.image for r in other if isinstance(r.image, str)}
        shared = [r for r in train if isinstance(r.image, str) and r.image in files]
        if not shared:
            return train
        self.skipped[f"train/in_{split}_split"] += len(shared)
        warnings.warn(f"{self.format}: dropped {len(shared)} train record(s) whose image file is also in the {split} "
                      f"split (first: {shared[0].image})")
        drop = {id(r) for r in shared}
        return [r for r in train if id(r) not in drop]

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        carve = self.val_split == "carve" or (self.val_split == "auto" and self.format in CARVE_VAL_FORMATS)
        train = self._in_protocol(self._read("train"), "train")
        test = self._in_protocol(self._read("test"), "test")
        train = self._drop_shared_files(train, test, "test")
        rng = np.random.default_rng(self.seed)
        if carve:
            order = rng.permutation(len(train))
            n_val = max(1, int(round(self.val_fraction * len(train))))
            val = [train[i] for i in order[:n_val]]
            train = [train[i] for i in order[n_val:]]
            # Disjoint by sample and by image file: readers drop a file listed twice, so no face is in both.
            shared = ({r.sample_id for r in val} & {r.sample_id for r in train}) or (
                {r.image for r in val if isinstance(r.image, str)} & {r.image for r in train if isinstance(r.image, str)})
            if shared:
                raise RuntimeError(f"carved val split shares {len(shared)} sample(s) with train, e.g. {min(shared)}")
        else:
            val = self._in_protocol(self._read("val"), "val")
            train = self._drop_shared_files(train, val, "val")
        train, self.outside_subset = labelled_subset(train, self.train_limit, rng)
        self.records = {"train": train, "val": val, "test": test}
        for split, recs in self.records.items():
            if not recs:
                raise DataError(f"the {split} split of data.format={self.format} at {self.root} has no usable "
                                 f"samples (skipped: {dict(self.skipped)})")
        # Readers and verify_images already warned about their own skips; this covers the label drops.
        unwarned = {k: v for k, v in self.skipped.items() if k.split("/", 1)[1] not in READER_WARNED}
        if unwarned:
            warnings.warn(f"{self.format}: skipped samples: {unwarned}")
        tf_train = train_transform(self.image_size, self.augment, self.color_mode, self.train_resample_size)
        tf_eval = eval_transform(self.image_size, self.color_mode)
        common = dict(num_aus=len(self.vocab), num_classes=self.num_classes, with_soft_labels=self.soft_labels)
        self.datasets = {"train": RecordDataset(train, tf_train, name=f"{self.format} train", **common),
                         "val": RecordDataset(val, tf_eval, name=f"{self.format} val", **common),
                         "test": RecordDataset(test, tf_eval, name=f"{self.format} test", **common)}

    def summary(self) -> dict[str, Any]:
        """Counts per split and class, and skips: written into each run's metrics.json.

        Records that failed to load so far (see the module doc) are counted under ``skipped`` and left out of
        ``<split>_size`` / ``<split>_class_counts``, which therefore count the faces actually used.
        """
        skipped = collections.Counter(self.skipped)
        out: dict[str, Any] = {"format": self.format}
        for split, recs in self.records.items():
            dataset = self.datasets.get(split)
            bad = dataset.flags.numpy() != 0 if dataset is not None else np.zeros(len(recs), bool)
            if dataset is not None:
                skipped.update({f"{split}/{k}": v for k, v in dataset.unreadable().items()})
            labels = np.array([r.label for r in recs])[~bad]
            out[f"{split}_size"] = len(labels)
            out[f"{split}_class_counts"] = [int((labels == k).sum()) for k in range(self.num_classes)]
            out[f"{split}_with_aus"] = int(sum(r.au_mask is not None and bool(np.any(r.au_mask))
                                               for r, b in zip(recs, bad) if not b))
        out["skipped"] = dict(skipped)
        out["au_source"] = self.au_source
        return out

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return FERDataLoader(self.datasets[split], batch_size=self.batch_size if split == "train" else self.eval_batch_size,
                          shuffle=shuffle, num_workers=self.num_workers, collate_fn=collate_fer,
                          persistent_workers=self.num_workers > 0, drop_last=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


def labelled_subset(train: list[FERRecord], limit: Optional[int], rng: np.random.Generator
                    ) -> tuple[list[FERRecord], list[FERRecord]]:
    """(the seeded ``data.train_limit`` subset in file order, the other train faces in file order)."""
    if limit is None or limit >= len(train):
        return train, []
    keep = np.sort(rng.choice(len(train), size=limit, replace=False))
    chosen = np.zeros(len(train), dtype=bool)
    chosen[keep] = True
    return [train[i] for i in keep], [r for r, c in zip(train, chosen) if not c]


def native_size(datamodule: "RealFERDataModule") -> Optional[tuple[int, int]]:
    """(width, height) of the dataset's faces as stored: the first readable of the first train faces, after its
    face crop (None when none of them can be read; the loaders count those)."""
    from datamodules.batch import LOAD_ERRORS, load_record_image

    if datamodule.format == "toy":
        return (int(datamodule.toy_config.image_size),) * 2
    for record in datamodule.records["train"][:16]:
        try:
            return tuple(load_record_image(record).size)
        except LOAD_ERRORS:
            continue
    return None


def au_source_problem(format: str, au_source: Optional[str], openface: Optional[str]) -> Optional[tuple[str, str]]:
    """``(config key, message)`` when ``data.au_source``, ``data.openface`` and ``data.format`` do not fit together.

    An OpenFace csv is never silently ignored: ``none`` with ``data.openface`` set is an error, and so is a csv
    given to the toy faces (they carry their own ground-truth AUs). ``annotate`` reads the csv that stage
    ``annotate_aus`` wrote; train.py points ``data.openface`` at it, a user-set one is refused there.
    """
    if au_source is None:
        au_source = "sidecar" if openface is not None or format == "toy" else "none"
    if au_source not in AU_SOURCES:
        return "data.au_source", (f"must be one of {', '.join(AU_SOURCES)} (or null: sidecar when data.openface is "
                                  f"set), got {au_source!r}")
    if format == "toy" and au_source == "annotate":
        return "data.au_source", ("the toy faces carry ground-truth AUs (sidecar); to try annotate, export them "
                                  "without AUs (python -m datamodules.toyfaces_export --sidecars none) and read the "
                                  "export through a public format")
    if format == "toy" and openface is not None:
        return "data.openface", ("the toy faces carry ground-truth AUs in memory and read no OpenFace csv; unset it "
                                 "(data.au_source=none drops their AUs)")
    if au_source == "sidecar" and openface is None and format != "toy":
        return "data.openface", ("data.au_source=sidecar reads AUs from an OpenFace csv (or a folder of per-image "
                                 "csvs): set data.openface=<path>, or choose data.au_source=annotate|none")
    if au_source == "none" and openface is not None:
        return "data.openface", (f"is set ({openface}) but data.au_source=none uses no AUs; unset data.openface or "
                                 "choose data.au_source=sidecar")
    if au_source == "annotate" and openface is None:
        return "data.au_source", ("annotate reads the csv written by stage=annotate_aus; run through train.py, which "
                                  "points data.openface at it")
    return None


def resolve_au_source(format: str, au_source: Optional[str], openface: Optional[str]) -> str:
    """The run's AU source (``data.au_source``, null resolved); a bad combination is a ValueError naming the key."""
    problem = au_source_problem(format, au_source, openface)
    if problem is not None:
        raise ValueError(f"{problem[0]}: {problem[1]}")
    if au_source is None:
        return "sidecar" if openface is not None or format == "toy" else "none"
    return au_source


def drop_aus(records: list[FERRecord]) -> list[FERRecord]:
    """``au_source=none`` on the toy faces: their ground-truth AUs become unknown, as on a download without AUs."""
    for rec in records:
        rec.aus, rec.au_mask = None, None
    return records


def check_format_options(format: str, options: dict) -> None:
    """Unknown ``data.format_options`` keys, or a bad FERPlus label_mode, fail here rather than at setup."""
    import inspect

    from datamodules.formats import READERS
    from datamodules.formats.ferplus import LABEL_MODES

    try:
        inspect.signature(READERS[format]).bind("root", "train", **options)
    except TypeError as err:
        known = [p for p in inspect.signature(READERS[format]).parameters if p not in ("root", "split")]
        raise ValueError(f"data.format_options: {err} (options of {format}: {', '.join(known) or 'none'})") from None
    if format == "ferplus" and options.get("label_mode", "majority") not in LABEL_MODES:
        raise ValueError(f"data.format_options.label_mode must be one of {', '.join(LABEL_MODES)}, "
                         f"got {options['label_mode']!r}")


def parse_toy_options(options: dict):
    """``data.toy`` -> ({split: size}, ToyFacesConfig); n_train/n_val/n_test plus any ToyFacesConfig field."""
    from datamodules.toyfaces import ToyFacesConfig

    options = dict(options)
    sizes = {s: int(options.pop(f"n_{s}", d)) for s, d in (("train", 1000), ("val", 500), ("test", 2000))}
    for split, n in sizes.items():
        if n < 1:
            raise ValueError(f"data.toy.n_{split} must be >= 1, got {n}")
    try:
        config = ToyFacesConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()})
    except TypeError as err:  # unknown knob
        raise ValueError(f"data.toy: {err}") from err
    return sizes, config


def toy_records(config, split: str, n: int, aus: Sequence[int] = DISFA_AUS, progress: bool = True,
                start: int = 0) -> list[FERRecord]:
    """Render toy faces ``start .. start+n-1`` of a split in memory as records (AUs in the configured vocabulary
    order)."""
    from datamodules.toyfaces import make_split

    aus = tuple(aus)
    index = [DISFA_AUS.index(a) if a in DISFA_AUS else -1 for a in aus]
    mask = np.array([i >= 0 for i in index])
    records = []
    for face in make_split(config, split, n, progress=progress, start=start):
        values = np.array([face.aus[i] if i >= 0 else 0.0 for i in index], dtype=np.float32)
        records.append(FERRecord(sample_id=face.sample_id, image=face.image, label=face.label, aus=values,
                                 au_mask=mask.copy(), caption=face.caption,
                                 meta={"true_label": face.true_label}))
    return records

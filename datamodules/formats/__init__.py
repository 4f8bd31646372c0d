"""Readers for the public FER formats, sidecar joins, and the exporter.

``read_split(format, root, split, **options)`` returns a ``ReadResult`` (records with canonical labels and a
stable unique ``sample_id``, plus a reason -> count tally of skipped rows). Bad files raise
``datamodules.errors.DataError`` (``DataFileNotFound`` for a missing path) with a one-line message naming the
file and line. Split conventions:

* ``affectnet`` / ``affectnet_npy``: train = training.csv / train_set; val AND test = validation.csv / val_set
  (AffectNet's test set is not public; the validation set serves as the test set).
* ``rafdb``: train / test only; ``val`` is a ``DataError`` (carve it from train).
* ``fer2013`` / ``ferplus``: Usage Training / PublicTest / PrivateTest -> train / val / test.
* ``imagefolder``: ``root/<split>/<class>/`` with val|validation|valid aliases.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from datamodules.formats.affectnet import read_affectnet, read_affectnet_npy
from datamodules.formats.captions import attach_captions, load_captions
from datamodules.formats.common import SPLITS, ReadResult, check_split, data_error, require_dir, shorten, verify_images
from datamodules.formats.fer2013 import read_fer2013
from datamodules.formats.ferplus import read_ferplus
from datamodules.formats.imagefolder import read_imagefolder
from datamodules.formats.openface import attach_openface, load_openface
from datamodules.formats.rafdb import read_rafdb

READERS: dict[str, Callable[..., ReadResult]] = {
    "affectnet": read_affectnet,
    "affectnet_npy": read_affectnet_npy,
    "rafdb": read_rafdb,
    "fer2013": read_fer2013,
    "ferplus": read_ferplus,
    "imagefolder": read_imagefolder,
}


def read_split(format: str, root: str | Path, split: str, **options) -> ReadResult:
    """Read one split of a dataset in one of the ``READERS`` formats (options go to that reader)."""
    if format not in READERS:
        raise data_error(f"unknown data format {shorten(format)!r}; known: {', '.join(sorted(READERS))}")
    check_split(split, format)
    require_dir(root, format)
    return READERS[format](root, split, **options)


def __getattr__(name: str):
    # The exporter pulls in nothing heavy, but keep it out of the reader import path anyway.
    if name in ("export_fer_dataset", "ExportSample", "ALL_FORMATS"):
        from datamodules.formats import export

        return getattr(export, name)
    raise AttributeError(name)


__all__ = ["READERS", "ReadResult", "SPLITS", "read_split", "attach_openface", "attach_captions", "load_openface",
           "load_captions", "verify_images", "export_fer_dataset", "ExportSample", "ALL_FORMATS"]

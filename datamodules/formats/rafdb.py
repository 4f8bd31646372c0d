"""RAF-DB basic: ``EmoLabel/list_patition_label.txt`` (sic) + ``Image/aligned/<stem>_aligned.jpg``.

Lines are ``train_00001.jpg 5`` / ``test_0001.jpg 3`` with RAF ids 1..7 (Surprise, Fear, Disgust, Happiness,
Sadness, Anger, Neutral) mapped to canonical ids. The split comes from the name prefix. RAF-DB has no val
split: asking for one is an error (the datamodule carves val from train). A name listed twice (or two names with
one aligned image, e.g. ``train_00001.jpg`` and ``train_00001.png``) is a counted ``duplicate`` skip: the first
line is kept.
"""
from __future__ import annotations

import os
from pathlib import Path

from datamodules.batch import FERRecord
from datamodules.formats.common import (MISSING_IMAGE, Duplicates, FileIndex, ReadResult, check_split, data_error,
                                        parse_int, require_dir, require_file, row_error, shorten, warn_skips)
from datamodules.labels import RAFDB_TO_CANONICAL

LABEL_FILE = Path("EmoLabel") / "list_patition_label.txt"
ALIGNED_DIR = Path("Image") / "aligned"


def read_rafdb(root: str | Path, split: str, check_files: bool = True) -> ReadResult:
    check_split(split, "rafdb")
    if split == "val":
        raise data_error("rafdb: RAF-DB has no val split (only train_* and test_* images); read 'train' and "
                         "carve a validation subset from it (RealFERDataModule does this with val_split=auto)")
    root = require_dir(root, "rafdb")
    path = require_file(root / LABEL_FILE, "rafdb", "label list")
    prefix = f"{split}_"
    result, files, duplicates = ReadResult(), FileIndex(), Duplicates(path)
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line, text in enumerate(f, start=1):
            parts = text.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise row_error(path, line, f"expected '<name> <label>', found {shorten(text.strip())!r}")
            name, raw = parts
            if not (name.startswith("train_") or name.startswith("test_")):
                raise row_error(path, line, f"image name {shorten(name)!r} starts with neither 'train_' nor 'test_'")
            label_id = parse_int(raw, path, line, "label")
            if label_id not in RAFDB_TO_CANONICAL:
                raise row_error(path, line, f"unknown RAF-DB label {label_id} (expected 1..7)")
            if not name.startswith(prefix):
                continue
            stem = Path(name).stem
            image = os.fspath(root / ALIGNED_DIR / f"{stem}_aligned.jpg")
            if duplicates.seen(stem, line, result):
                continue
            if check_files and not files.exists(image):
                result.skip(MISSING_IMAGE, image)
                continue
            result.records.append(FERRecord(sample_id=f"rafdb/{name}", image=image,
                                            label=RAFDB_TO_CANONICAL[label_id], meta={"name": name}))
    return warn_skips(result, "rafdb", split)

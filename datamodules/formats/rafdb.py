"""RAF-DB basic: ``EmoLabel/list_patition_label.txt`` (sic) + ``Image/aligned/<stem>_aligned.jpg``.

Lines are ``train_00001.jpg 5`` / ``test_0001.jpg 3`` with RAF ids 1..7 (Surprise, Fear, Disgust, Happiness,
Sadness, Anger, Neutral) mapped to canonical ids. The split comes from the name prefix. RAF-DB has no val
split: asking for one is an error (the datamodule carves val from train).
"""
from __future__ import annotations

import os
from pathlib import Path

from datamodules.batch import FERRecord
from datamodules.formats.common import (MISSING_IMAGE, FileIndex, ReadResult, check_split, parse_int, require_dir,
                                        require_file, row_error, warn_skips)
from datamodules.labels import RAFDB_TO_CANONICAL

LABEL_FILE = Path("EmoLabel") / "list_patition_label.txt"
ALIGNED_DIR = Path("Image") / "aligned"


def read_rafdb(root: str | Path, split: str, check_files: bool = True) -> ReadResult:
    check_split(split, "rafdb")
    if split == "val":
        raise ValueError("rafdb: RAF-DB has no val split (only train_* and test_* images); read 'train' and "
                         "carve a validation subset from it (RealFERDataModule does this with val_split=auto)")
    root = require_dir(root, "rafdb")
    path = require_file(root / LABEL_FILE, "rafdb", "label list")
    prefix = f"{split}_"
    result, files, first_missing = ReadResult(), FileIndex(), None
    with open(path, encoding="utf-8-sig") as f:
        for line, text in enumerate(f, start=1):
            parts = text.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise row_error(path, line, f"expected '<name> <label>', found {text.strip()!r}")
            name, raw = parts
            if not (name.startswith("train_") or name.startswith("test_")):
                raise row_error(path, line, f"image name {name!r} starts with neither 'train_' nor 'test_'")
            label_id = parse_int(raw, path, line, "label")
            if label_id not in RAFDB_TO_CANONICAL:
                raise row_error(path, line, f"unknown RAF-DB label {label_id} (expected 1..7)")
            if not name.startswith(prefix):
                continue
            stem = Path(name).stem
            image = os.fspath(root / ALIGNED_DIR / f"{stem}_aligned.jpg")
            if check_files and not files.exists(image):
                result.skipped[MISSING_IMAGE] += 1
                first_missing = first_missing or image
                continue
            result.records.append(FERRecord(sample_id=f"rafdb/{name}", image=image,
                                            label=RAFDB_TO_CANONICAL[label_id], meta={"name": name}))
    return warn_skips(result, "rafdb", split, first_missing)

"""ImageFolder: ``root/<split>/<class_name>/*.{jpg,jpeg,png,bmp,webp}``.

Class folder names go through ``labels.class_name_to_id`` (e.g. ``happy``, ``Happiness``, ``1``); an unknown
class folder is an error. Split folder aliases: train|training, val|validation|valid, test|testing (more than
one present is an error). Hidden files are ignored; other non-image files are counted as skipped. Every file is
its own sample (a path cannot be listed twice).
"""
from __future__ import annotations

import os
from pathlib import Path

from datamodules.batch import FERRecord
from datamodules.formats.common import IMAGE_EXTENSIONS, ReadResult, check_split, data_error, not_found, require_dir
from datamodules.labels import class_name_to_id

SPLIT_DIRS = {"train": ("train", "training"), "val": ("val", "validation", "valid"), "test": ("test", "testing")}


def split_dir(root: Path, split: str) -> Path:
    present = [root / d for d in SPLIT_DIRS[split] if (root / d).is_dir()]
    if not present:
        raise not_found(f"imagefolder: no {split} folder under {root} "
                                f"(looked for {', '.join(SPLIT_DIRS[split])})")
    if len(present) > 1:
        raise data_error(f"imagefolder: ambiguous {split} split, several folders exist: "
                         f"{', '.join(map(str, present))}")
    return present[0]


def read_imagefolder(root: str | Path, split: str) -> ReadResult:
    check_split(split, "imagefolder")
    root = require_dir(root, "imagefolder")
    base = split_dir(root, split)
    result = ReadResult()
    for class_dir in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            label = class_name_to_id(class_dir.name)
        except KeyError:
            raise data_error(f"imagefolder: unknown expression class folder {class_dir} "
                             f"(name {class_dir.name!r} is not a known class name)") from None
        for file in sorted(os.listdir(class_dir)):
            if file.startswith("."):
                continue
            path = class_dir / file
            if path.suffix.lower() not in IMAGE_EXTENSIONS or not path.is_file():
                result.skipped["not_an_image_file"] += 1
                continue
            result.records.append(FERRecord(sample_id=f"imagefolder/{split}/{class_dir.name}/{file}",
                                            image=os.fspath(path), label=label, meta={"name": file}))
    return result

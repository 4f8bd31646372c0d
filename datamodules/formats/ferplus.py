"""FERPlus: ``fer2013new.csv`` (Usage, Image name, 10 vote columns) over the FER2013 images.

Images come from ``root/FER2013Train|FER2013Valid|FER2013Test/<Image name>`` when that folder exists,
otherwise from the pixels of ``root/fer2013.csv`` at the same data row (FERPlus rows align with FER2013 rows;
the two files' Usage must agree, or it is an error). Rows with an empty Image name (not a face) are skipped
and counted; an Image name listed twice in one split is a counted ``duplicate`` skip (the first row is kept).

``label_mode="majority"``: label = argmax over all 10 columns (ties -> the earlier column, so an expression
beats unknown/NF on a tie); a majority of unknown/NF, or no expression vote at all, drops the row (counted).
``label_mode="distribution"``: ``soft_label`` = the 8 expression votes normalised (index = canonical id),
label = its argmax; rows without expression votes are dropped (counted).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from datamodules.batch import FERRecord
from datamodules.formats.common import (MISSING_IMAGE, Duplicates, FileIndex, ReadResult, check_split, data_error,
                                        not_found, parse_float, read_csv_rows, require_dir, row_error, shorten,
                                        warn_skips)
from datamodules.formats.fer2013 import CSV_NAME as FER2013_CSV
from datamodules.formats.fer2013 import read_fer2013_pixels, usage_split
from datamodules.labels import EXPRESSIONS, FERPLUS_TO_CANONICAL, FERPLUS_VOTE_COLUMNS

CSV_NAME = "fer2013new.csv"
COLUMNS = ("Usage", "Image name", *FERPLUS_VOTE_COLUMNS)
IMAGE_DIRS = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}
LABEL_MODES = ("majority", "distribution")
# Column position (0..7) -> canonical id.
_CANONICAL = np.asarray([FERPLUS_TO_CANONICAL[c] for c in FERPLUS_VOTE_COLUMNS[:8]])


def votes_to_canonical(votes: np.ndarray) -> np.ndarray:
    """The 8 expression votes (file column order) rearranged so that index = canonical id."""
    out = np.zeros(len(EXPRESSIONS), dtype=np.float32)
    out[_CANONICAL] = votes[:8]
    return out


def read_ferplus(root: str | Path, split: str, label_mode: str = "majority", check_files: bool = True) -> ReadResult:
    check_split(split, "ferplus")
    if label_mode not in LABEL_MODES:
        raise data_error(f"ferplus: label_mode (data.format_options.label_mode) must be one of "
                         f"{', '.join(LABEL_MODES)}, got {shorten(label_mode)!r}")
    root = require_dir(root, "ferplus")
    path = root / CSV_NAME
    image_dir = root / IMAGE_DIRS[split]
    use_folder = image_dir.is_dir()
    if not use_folder and not (root / FER2013_CSV).is_file():
        raise not_found(f"ferplus: neither the image folder {image_dir} nor the pixel file "
                                f"{root / FER2013_CSV} exists")
    result, files, duplicates = ReadResult(), FileIndex(), Duplicates(path)
    pending: list[tuple[int, int, FERRecord]] = []  # (row index, line, record) awaiting csv pixels
    for index, (line, row) in enumerate(read_csv_rows(path, "ferplus", COLUMNS)):
        if usage_split(row["Usage"], path, line) != split:
            continue
        name = row["Image name"].strip()
        if not name:
            result.skipped["ferplus_no_name"] += 1
            continue
        if duplicates.seen(name, line, result):
            continue
        votes = np.asarray([parse_float(row[c], path, line, c) for c in FERPLUS_VOTE_COLUMNS], dtype=np.float32)
        if (votes < 0).any():
            raise row_error(path, line, f"negative vote count {votes.tolist()}")
        if votes[:8].sum() <= 0:
            result.skipped["ferplus_no_expression_votes"] += 1
            continue
        soft = None
        if label_mode == "majority":
            top = int(np.argmax(votes))
            if top >= 8:
                result.skipped[f"ferplus_majority_{FERPLUS_VOTE_COLUMNS[top]}"] += 1
                continue
            label = int(_CANONICAL[top])
        else:
            soft = votes_to_canonical(votes)
            soft /= soft.sum()
            label = int(np.argmax(soft))
        meta = {"name": name, "row": index, "votes": votes}
        rec = FERRecord(sample_id=f"ferplus/{name}", image="", label=label, soft_label=soft, meta=meta)
        if use_folder:
            image = os.fspath(image_dir / name)
            if check_files and not files.exists(image):
                result.skip(MISSING_IMAGE, image)
                continue
            rec.image = image
        pending.append((index, line, rec))
    if not use_folder and pending:
        pixels = read_fer2013_pixels(root / FER2013_CSV, "ferplus", {i for i, _, _ in pending})
        for index, line, rec in pending:
            if index not in pixels:
                raise row_error(path, line, f"no row {index} in {root / FER2013_CSV} (FERPlus rows must align "
                                            f"with FER2013 rows)")
            fer_split, image = pixels[index]
            if fer_split != split:
                raise row_error(path, line, f"Usage disagrees with {root / FER2013_CSV} data row {index} "
                                            f"({fer_split}): the two files are not aligned")
            rec.image = image
    result.records = [rec for _, _, rec in pending]
    return warn_skips(result, "ferplus", split)

"""FER2013: ``fer2013.csv`` with columns ``emotion,pixels,Usage``.

``pixels`` is 2304 space-separated ints (48x48 gray) decoded into an in-memory uint8 (48,48) array;
``Usage`` Training/PublicTest/PrivateTest -> train/val/test; emotion 0..6 (Angry, Disgust, Fear, Happy, Sad,
Surprise, Neutral) mapped to canonical ids. Row ``i`` (0-based data row) is named ``fer{i:07d}.png``, the
name FERPlus gives the same image, so sidecars keyed on FERPlus names join to FER2013 records (ids are row
numbers, so no sample can be listed twice). A file without its header line is an error naming the file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from datamodules.batch import FERRecord
from datamodules.formats.common import ReadResult, check_split, parse_int, read_csv_rows, require_dir, row_error, shorten
from datamodules.labels import FER2013_TO_CANONICAL

CSV_NAME = "fer2013.csv"
COLUMNS = ("emotion", "pixels", "Usage")
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
SPLIT_TO_USAGE = {v: k for k, v in USAGE_TO_SPLIT.items()}
SIDE = 48


def fer_name(row_index: int) -> str:
    """FERPlus's file name for FER2013 data row ``row_index`` (0-based)."""
    return f"fer{row_index:07d}.png"


def parse_pixels(text: str, path, line) -> np.ndarray:
    tokens = text.split()
    if len(tokens) != SIDE * SIDE:
        raise row_error(path, line, f"pixels has {len(tokens)} values, expected {SIDE * SIDE} (48x48)")
    try:
        values = np.asarray(tokens, dtype=np.int64)
    except ValueError:
        bad = next(t for t in tokens if not t.isdigit())
        raise row_error(path, line, f"pixels contains a non-integer value {shorten(bad)!r}") from None
    if values.min() < 0 or values.max() > 255:
        raise row_error(path, line, f"pixels outside 0..255 (min {values.min()}, max {values.max()})")
    return values.astype(np.uint8).reshape(SIDE, SIDE)


def usage_split(usage: str, path, line) -> str:
    usage = usage.strip()
    if usage not in USAGE_TO_SPLIT:
        raise row_error(path, line, f"unknown Usage {shorten(usage)!r} (expected {', '.join(USAGE_TO_SPLIT)})")
    return USAGE_TO_SPLIT[usage]


def read_fer2013_pixels(path: Path, fmt: str, rows: set[int] | None = None) -> dict[int, tuple[str, np.ndarray]]:
    """Data row index -> (split, pixels) for ``rows`` (all rows if None); used by the FERPlus fallback."""
    out = {}
    for index, (line, row) in enumerate(read_csv_rows(path, fmt, ("pixels", "Usage"))):
        if rows is None or index in rows:
            out[index] = (usage_split(row["Usage"], path, line), parse_pixels(row["pixels"], path, line))
    return out


def read_fer2013(root: str | Path, split: str) -> ReadResult:
    check_split(split, "fer2013")
    root = require_dir(root, "fer2013")
    path = root / CSV_NAME
    result = ReadResult()
    for index, (line, row) in enumerate(read_csv_rows(path, "fer2013", COLUMNS)):
        if usage_split(row["Usage"], path, line) != split:
            continue
        raw = parse_int(row["emotion"], path, line, "emotion")
        if raw not in FER2013_TO_CANONICAL:
            raise row_error(path, line, f"unknown FER2013 emotion id {raw} (expected 0..6)")
        name = fer_name(index)
        result.records.append(FERRecord(sample_id=f"fer2013/{name}", image=parse_pixels(row["pixels"], path, line),
                                        label=FER2013_TO_CANONICAL[raw], meta={"name": name, "row": index}))
    return result

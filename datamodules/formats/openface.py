"""OpenFace 2 action-unit sidecar: attach ``AUxx_r`` intensities to records by image file name.

Accepted sources:

* one csv with a file-name column (``file``, ``filename``, ``input`` or ``image``; the first present wins) and
  one row per image (several rows for one image = several faces: the successful row with the highest
  confidence is used);
* a directory of per-image csvs ``<image stem>.csv`` (OpenFace ``FaceLandmarkImg`` output).

OpenFace headers (and values) carry leading spaces (``frame, face_id, timestamp, confidence, success,
AU01_r, ...``): they are stripped. Only ``success == 1`` rows count (no ``success`` column = all rows count).
AUs of the vocabulary that the csv lacks are unknown (mask False); so are NaN values. Values are clipped to
[0, max_intensity] (OpenFace emits small negatives and over-range values) with one warning giving the count.
"""
from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from datamodules.batch import FERRecord
from datamodules.formats.common import SidecarIndex, not_found, parse_float, row_error, warn_unmatched
from datamodules.labels import AUVocabulary

FILE_COLUMNS = ("file", "filename", "input", "image")


class _Row:
    __slots__ = ("values", "confidence")

    def __init__(self, values: np.ndarray, confidence: float):
        self.values, self.confidence = values, confidence


def _read_openface_csv(path: Path, vocab: AUVocabulary, need_file_column: bool, clip_count: list[int]):
    """-> list of (file name or None, _Row) for the successful rows of one csv."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, skipinitialspace=True)
        try:
            return _read_rows(path, reader, vocab, need_file_column, clip_count)
        except (csv.Error, UnicodeDecodeError) as err:  # binary junk or a broken quote: one line, not a traceback
            raise row_error(path, reader.line_num or 1, f"not a readable csv ({err})") from None


def _read_rows(path: Path, reader, vocab: AUVocabulary, need_file_column: bool, clip_count: list[int]):
    out = []
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise row_error(path, 1, "empty OpenFace csv (no header)") from None
    col = {name: i for i, name in enumerate(header)}
    file_col = next((c for c in FILE_COLUMNS if c in col), None)
    if need_file_column and file_col is None:
        raise row_error(path, 1, f"no file-name column (one of {', '.join(FILE_COLUMNS)}) in the header; "
                                 f"a per-frame OpenFace csv needs one to join rows to images")
    names = vocab.openface_columns()
    au_cols = [(i, col.get(name)) for i, name in enumerate(names)]
    if all(c is None for _, c in au_cols):
        listed = ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]}, …, {names[-1]}"
        raise row_error(path, 1, f"none of the vocabulary's {len(names)} AU columns ({listed}) is in the header")
    for fields in reader:
        line = reader.line_num
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if len(fields) != len(header):
            raise row_error(path, line, f"expected {len(header)} fields, found {len(fields)}")
        if "success" in col and parse_float(fields[col["success"]], path, line, "success") != 1:
            continue
        confidence = (parse_float(fields[col["confidence"]], path, line, "confidence")
                      if "confidence" in col else 1.0)
        values = np.full(len(vocab), np.nan, dtype=np.float32)
        for i, c in au_cols:
            if c is not None:
                text = fields[c].strip()
                values[i] = np.nan if text.lower() in ("", "nan") else parse_float(text, path, line, header[c])
        known = ~np.isnan(values)
        clipped = np.clip(values[known], 0.0, vocab.max_intensity)
        clip_count[0] += int((clipped != values[known]).sum())
        values[known] = clipped
        name = fields[col[file_col]].strip() if file_col else None
        if need_file_column and not name:
            raise row_error(path, line, f"a successful row has an empty {file_col!r}")
        out.append((name, _Row(values, confidence)))
    return out


def load_openface(source: str | Path, vocab: AUVocabulary) -> tuple[dict[str, _Row], int]:
    """file name -> best successful row; plus the number of clipped values."""
    source = Path(source)
    clip_count = [0]
    best: dict[str, _Row] = {}

    def keep(name: str, row: _Row) -> None:
        if name not in best or row.confidence > best[name].confidence:
            best[name] = row

    if source.is_dir():
        files = sorted(source.glob("*.csv"))
        if not files:
            raise not_found(f"openface: no per-image .csv files in {source}")
        for path in files:
            for name, row in _read_openface_csv(path, vocab, need_file_column=False, clip_count=clip_count):
                keep(path.stem, row)
    elif source.is_file():
        for name, row in _read_openface_csv(source, vocab, need_file_column=True, clip_count=clip_count):
            keep(name, row)
    else:
        raise not_found(f"openface: AU sidecar not found: {source}")
    return best, clip_count[0]


def attach_openface(records: Sequence[FERRecord], source: str | Path, vocab: AUVocabulary) -> int:
    """Set ``rec.aus``/``rec.au_mask`` in place from an OpenFace sidecar; returns how many records matched.

    Records without a successful OpenFace row keep their previous AUs (unknown if None); one warning counts them.
    """
    rows, clipped = load_openface(source, vocab)
    if clipped:
        warnings.warn(f"openface: clipped {clipped} AU value(s) in {source} to [0, {vocab.max_intensity}]",
                      stacklevel=2)
    index = SidecarIndex(rows)
    matched = 0
    for rec in records:
        row = index.lookup(rec)
        if row is None:
            continue
        mask = ~np.isnan(row.values)
        rec.aus = np.where(mask, row.values, 0.0).astype(np.float32)
        rec.au_mask = mask
        matched += 1
    warn_unmatched("openface", matched, len(records), source)
    return matched

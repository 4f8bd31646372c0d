"""AffectNet: the csv release (``training.csv``/``validation.csv`` + ``Manually_Annotated_Images/``) and the
npy release (``train_set|val_set/images/<id>.jpg`` + ``annotations/<id>_exp.npy``).

AffectNet's test set is not public: the validation set is used as the test set, so ``split="val"`` and
``split="test"`` both read the validation data (the datamodule carves its own val split from train).
Expression ids 0..7 are canonical already; 8 (none), 9 (uncertain), 10 (no face) are dropped and counted;
any other id is an error.

Face boxes (csv release): a box with zero or negative width/height, or one wholly left of or above the image,
is a counted ``bad_face_box`` skip at read time. The image size is only known when the image is decoded, so a
box partly outside the image is clipped to it at load time, and one wholly right of or below it is counted as
``bad_face_box`` by ``RecordDataset`` then (or up front with ``verify_images``); it is never loaded as black.
A file listed twice in one csv is a counted ``duplicate`` skip (the first row is kept).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from datamodules.batch import FERRecord
from datamodules.formats.common import (BAD_FACE_BOX, MISSING_IMAGE, Duplicates, FileIndex, ReadResult, check_split,
                                        not_found, parse_float, parse_int, read_csv_rows, require_dir, row_error,
                                        shorten, sort_key_natural, warn_skips)
from datamodules.labels import AFFECTNET_DROPPED_IDS, EXPRESSIONS

CSV_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
               "expression", "valence", "arousal")
CSV_FILES = {"train": "training.csv", "val": "validation.csv", "test": "validation.csv"}
IMAGE_DIR = "Manually_Annotated_Images"
NPY_SETS = {"train": "train_set", "val": "val_set", "test": "val_set"}
DROPPED_REASON = {8: "affectnet_id_8_none", 9: "affectnet_id_9_uncertain", 10: "affectnet_id_10_no_face"}


def affectnet_label(raw: int, path, line) -> int | None:
    """Canonical id, or None for the dropped ids 8/9/10; anything else is an error naming file:line."""
    if 0 <= raw < len(EXPRESSIONS):
        return raw
    if raw in AFFECTNET_DROPPED_IDS:
        return None
    raise row_error(path, line, f"unknown AffectNet expression id {raw} (expected 0..7, or 8/9/10 which are dropped)")


def parse_landmarks(text: str, path, line) -> np.ndarray:
    values = [v for v in text.strip().split(";") if v.strip()]
    try:
        arr = np.asarray([float(v) for v in values], dtype=np.float32)
    except ValueError:
        raise row_error(path, line, f"facial_landmarks is not a ';'-separated number list: {shorten(text)!r}") from None
    if arr.size % 2:
        raise row_error(path, line, f"facial_landmarks has an odd number of values ({arr.size})")
    return arr.reshape(-1, 2)


def read_affectnet(root: str | Path, split: str, landmarks: bool = False, check_files: bool = True) -> ReadResult:
    """Read ``root/training.csv`` (train) or ``root/validation.csv`` (val and test; see module doc).

    ``landmarks=True`` parses facial_landmarks into ``meta["landmarks"]`` (float32 (68,2)); valence/arousal
    always go to ``meta``. ``check_files=False`` skips the per-file existence check.
    """
    check_split(split, "affectnet")
    root = require_dir(root, "affectnet")
    path = root / CSV_FILES[split]
    images = root / IMAGE_DIR
    result, files, duplicates = ReadResult(), FileIndex(), Duplicates(path)
    for line, row in read_csv_rows(path, "affectnet", CSV_COLUMNS):
        raw = parse_int(row["expression"], path, line, "expression")
        label = affectnet_label(raw, path, line)
        rel = row["subDirectory_filePath"].strip()
        if not rel:
            raise row_error(path, line, "empty subDirectory_filePath")
        x, y, w, h = (parse_int(row[c], path, line, c) for c in ("face_x", "face_y", "face_width", "face_height"))
        if duplicates.seen(rel, line, result):
            continue
        if w <= 0 or h <= 0 or x + w <= 0 or y + h <= 0:
            result.skip(BAD_FACE_BOX, f"{path.name}:{line} (x={x}, y={y}, w={w}, h={h})")
            continue
        meta = {"name": Path(rel).name, "valence": parse_float(row["valence"], path, line, "valence"),
                "arousal": parse_float(row["arousal"], path, line, "arousal"), "line": line}
        if landmarks:
            meta["landmarks"] = parse_landmarks(row["facial_landmarks"], path, line)
        if label is None:
            result.skipped[DROPPED_REASON[raw]] += 1
            continue
        image = os.fspath(images / rel)
        if check_files and not files.exists(image):
            result.skip(MISSING_IMAGE, image)
            continue
        result.records.append(FERRecord(sample_id=f"affectnet/{rel}", image=image, label=label,
                                        crop=(x, y, w, h), meta=meta))
    return warn_skips(result, "affectnet", split)


def _npy_scalar(path: Path, parse):
    try:
        value = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise not_found(f"affectnet_npy: annotation file not found: {path}") from None
    except (OSError, ValueError, EOFError) as err:
        raise row_error(path, None, f"cannot read annotation ({err})") from None
    if value.size != 1:
        raise row_error(path, None, f"expected a scalar annotation, found shape {value.shape}")
    item = value.reshape(()).item()
    if isinstance(item, bytes):
        item = item.decode()
    return parse(str(item), path, None, path.name)


def read_affectnet_npy(root: str | Path, split: str, with_va: bool = False, check_files: bool = True) -> ReadResult:
    """Read ``root/train_set`` (train) or ``root/val_set`` (val and test) of the npy release.

    Records follow the ``annotations/<id>_exp.npy`` files (the id is a numpy string scalar like '3' or an int;
    ids come from file names, so none can be listed twice);
    ``with_va=True`` also loads ``_val.npy``/``_aro.npy`` into ``meta``.
    """
    check_split(split, "affectnet_npy")
    root = require_dir(root, "affectnet_npy")
    base = require_dir(root / NPY_SETS[split], "affectnet_npy", f"{NPY_SETS[split]} folder")
    annotations = require_dir(base / "annotations", "affectnet_npy", "annotations folder")
    images = base / "images"
    ids = sorted((n[: -len("_exp.npy")] for n in os.listdir(annotations) if n.endswith("_exp.npy")),
                 key=sort_key_natural)
    if not ids:
        raise not_found(f"affectnet_npy: no <id>_exp.npy files in {annotations}")
    result, files = ReadResult(), FileIndex()
    for sid in ids:
        exp_path = annotations / f"{sid}_exp.npy"
        raw = _npy_scalar(exp_path, parse_int)
        label = affectnet_label(raw, exp_path, None)
        if label is None:
            result.skipped[DROPPED_REASON[raw]] += 1
            continue
        image = os.fspath(images / f"{sid}.jpg")
        if check_files and not files.exists(image):
            result.skip(MISSING_IMAGE, image)
            continue
        meta = {"name": f"{sid}.jpg"}
        if with_va:
            meta["valence"] = _npy_scalar(annotations / f"{sid}_val.npy", parse_float)
            meta["arousal"] = _npy_scalar(annotations / f"{sid}_aro.npy", parse_float)
        result.records.append(FERRecord(sample_id=f"affectnet_npy/{NPY_SETS[split]}/{sid}", image=image,
                                        label=label, meta=meta))
    return warn_skips(result, "affectnet_npy", split)

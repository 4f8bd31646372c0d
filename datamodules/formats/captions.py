"""Caption sidecar: JSONL lines ``{"file": ..., "caption": ...}`` joined to records by file name."""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

from datamodules.batch import FERRecord
from datamodules.formats.common import SidecarIndex, require_file, row_error, shorten, warn_unmatched


def load_captions(jsonl_path: str | Path) -> dict[str, str]:
    """file -> caption. Malformed json, a non-object line or missing/non-string keys are errors with file:line.
    A file listed twice keeps its first caption (one warning counts the duplicates and names the first)."""
    path = require_file(jsonl_path, "captions", "caption jsonl")
    out: dict[str, str] = {}
    lines: dict[str, int] = {}
    duplicates, first = 0, ""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as err:
                raise row_error(path, line, f"malformed json ({err.msg})") from None
            if not isinstance(obj, dict):
                raise row_error(path, line, f"expected a json object, found {type(obj).__name__}")
            for key in ("file", "caption"):
                if key not in obj:
                    raise row_error(path, line, f"missing key {key!r}")
                if not isinstance(obj[key], str):
                    raise row_error(path, line, f"key {key!r} must be a string, found {type(obj[key]).__name__}")
            if not obj["file"].strip():
                raise row_error(path, line, "empty 'file'")
            if obj["file"] in out:
                duplicates += 1
                first = first or f"{shorten(obj['file'])!r} at lines {lines[obj['file']]} and {line}"
                continue
            out[obj["file"]] = obj["caption"]
            lines[obj["file"]] = line
    if duplicates:
        warnings.warn(f"captions: {duplicates} duplicate file entr(y/ies) in {path} (first: {first}); the first "
                      f"caption of each file was kept", stacklevel=3)
    return out


def attach_captions(records: Sequence[FERRecord], jsonl_path: str | Path) -> int:
    """Set ``rec.caption`` in place; returns how many records matched (one warning counts the unmatched)."""
    index = SidecarIndex(load_captions(jsonl_path))
    matched = 0
    for rec in records:
        caption = index.lookup(rec)
        if caption is not None:
            rec.caption = caption
            matched += 1
    warn_unmatched("captions", matched, len(records), jsonl_path)
    return matched

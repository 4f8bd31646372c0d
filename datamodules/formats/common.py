"""Helpers shared by the format readers: the result type, counted skips, file:line errors, existence checks.

Bad-input rules (DESIGN.md §4, the project's standard):

* a missing image file is a counted skip (``skipped["missing_image"]``) with ONE warning per read carrying the
  count, never one warning per file;
* an unknown label id or a malformed row is a ``ValueError`` that names the file and the line;
* a missing root or annotation file is a ``FileNotFoundError`` that names the path and the format;
* corrupt image bytes are found at decode time by ``RecordDataset``, or up front by the opt-in ``verify_images``.
"""
from __future__ import annotations

import collections
import csv
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from PIL import Image, UnidentifiedImageError

from datamodules.batch import FERRecord
from datamodules.errors import DataError, DataFileNotFound

SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"


@dataclass
class ReadResult:
    """What a reader found: usable records plus a reason -> count tally of what it dropped."""

    records: list[FERRecord] = field(default_factory=list)
    skipped: collections.Counter = field(default_factory=collections.Counter)

    def __len__(self) -> int:
        return len(self.records)


def where(path: str | Path, line: int | None = None) -> str:
    """``path:line`` prefix for error messages."""
    return f"{path}:{line}" if line is not None else str(path)


def row_error(path: str | Path, line: int | None, message: str) -> DataError:
    return DataError(f"{where(path, line)}: {message}")


def check_split(split: str, fmt: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"{fmt}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def require_dir(path: str | Path, fmt: str, what: str = "dataset root") -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataFileNotFound(f"{fmt}: {what} not found: {path}")
    return path


def require_file(path: str | Path, fmt: str, what: str = "annotation file") -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFound(f"{fmt}: {what} not found: {path}")
    return path


def parse_int(value: str, path: str | Path, line: int | None, column: str) -> int:
    """A strict integer ('3', ' 3 ', '3.0' are fine; '3.5', '', 'x' are errors)."""
    text = str(value).strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        as_float = float(text)
    except ValueError:
        raise row_error(path, line, f"column {column!r} is not an integer: {value!r}") from None
    if not as_float.is_integer():
        raise row_error(path, line, f"column {column!r} is not an integer: {value!r}")
    return int(as_float)


def parse_float(value: str, path: str | Path, line: int | None, column: str) -> float:
    try:
        out = float(str(value).strip())
    except ValueError:
        raise row_error(path, line, f"column {column!r} is not a number: {value!r}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise row_error(path, line, f"column {column!r} is not a finite number: {value!r}")
    return out


def read_csv_rows(path: Path, fmt: str, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line_number, row)`` for each data row; header names are stripped of surrounding spaces.

    A header lacking a required column, or a row with a different number of fields than the header, is a
    ``ValueError`` naming the file (and line).
    """
    require_file(path, fmt)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise row_error(path, 1, "empty file (no header)") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise row_error(path, 1, f"header lacks column(s) {missing}; found {header}")
        for fields in reader:
            line = reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # blank line
            if len(fields) != len(header):
                raise row_error(path, line, f"expected {len(header)} fields, found {len(fields)}")
            yield line, dict(zip(header, fields))


class FileIndex:
    """Existence checks through one ``os.listdir`` per directory (fast on 10^5-file datasets)."""

    def __init__(self) -> None:
        self._dirs: dict[str, frozenset[str]] = {}

    def exists(self, path: str | Path) -> bool:
        parent, name = os.path.split(os.fspath(path))
        if parent not in self._dirs:
            try:
                self._dirs[parent] = frozenset(os.listdir(parent or "."))
            except (FileNotFoundError, NotADirectoryError):
                self._dirs[parent] = frozenset()
        return name in self._dirs[parent]


def warn_skips(result: ReadResult, fmt: str, split: str, first_missing: str | None = None) -> ReadResult:
    """The one warning per read for missing images (the count; the first missing path as an example)."""
    n = result.skipped.get(MISSING_IMAGE, 0)
    if n:
        example = f" (first: {first_missing})" if first_missing else ""
        warnings.warn(f"{fmt} {split}: skipped {n} record(s) whose image file is missing{example}", stacklevel=3)
    return result


def verify_images(records: Iterable[FERRecord], decode: bool = True) -> ReadResult:
    """Opt-in up-front check: open every image file with PIL and ``verify()`` it; drop and count bad ones.

    ``verify()`` alone does not notice a truncated JPEG, so by default the file is also fully decoded
    (``decode=False`` for the quick structural check only). In-memory images (FER2013) always pass.
    One warning with the count is issued if anything was dropped.
    """
    from tqdm.auto import tqdm

    result = ReadResult()
    first_bad = None
    records = list(records)
    for rec in tqdm(records, desc="verify images", unit="img", disable=len(records) < 2000):
        if isinstance(rec.image, str):
            try:
                with Image.open(rec.image) as img:
                    img.verify()
                if decode:
                    with Image.open(rec.image) as img:
                        img.load()
            except FileNotFoundError:
                result.skipped[MISSING_IMAGE] += 1
                first_bad = first_bad or rec.image
                continue
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
                result.skipped[CORRUPT_IMAGE] += 1
                first_bad = first_bad or f"{rec.image} ({err})"
                continue
        result.records.append(rec)
    if result.skipped:
        warnings.warn(f"verify_images: dropped {dict(result.skipped)} of {len(result.records) + sum(result.skipped.values())} "
                      f"record(s) (first: {first_bad})", stacklevel=2)
    return result


def sort_key_natural(name: str) -> tuple:
    """'2' < '10' for numeric ids, otherwise plain string order."""
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


# ------------------------------------------------------------------ sidecar joins (OpenFace, captions)
def _norm(path: str) -> str:
    return str(path).strip().replace("\\", "/").removeprefix("./")


def record_join_keys(rec: FERRecord) -> list[str]:
    """Names a sidecar may use for this record, most specific first.

    Path suffixes of the image file (``a/b/c.jpg``, ``b/c.jpg``), its base name, the dataset's own name for the
    sample (``meta["name"]``, e.g. RAF-DB ``train_00001.jpg`` for ``train_00001_aligned.jpg``, FER2013
    ``fer0000000.png``), then the stems of those names.
    """
    names: list[str] = []
    if isinstance(rec.image, str) and rec.image:
        parts = _norm(rec.image).split("/")
        names += ["/".join(parts[-k:]) for k in range(min(len(parts), 4), 1, -1)]
        names.append(parts[-1])
    meta_name = rec.meta.get("name") if rec.meta else None
    if meta_name:
        names.append(_norm(meta_name).split("/")[-1])
    if not names:
        names.append(rec.sample_id.split("/")[-1])
    stems = [Path(n).stem for n in names if "/" not in n]
    out: list[str] = []
    for n in (*names, *stems):
        if n not in out:
            out.append(n)
    return out


class SidecarIndex:
    """Look up sidecar entries (keyed by the file name the sidecar gives) for records.

    Sidecar keys are matched as full relative paths, base names and stems. A base name or stem that two
    different sidecar entries share is ambiguous and never used (a wrong join would silently attach another
    image's AUs or caption).
    """

    def __init__(self, entries: dict[str, object]):
        self.exact: dict[str, object] = {}
        self.short: dict[str, object] = {}
        ambiguous: set[str] = set()
        for key, value in entries.items():
            norm = _norm(key)
            self.exact[norm] = value
            base = norm.split("/")[-1]
            for short in {base, Path(base).stem}:
                if short in self.short and self.short[short] is not value:
                    ambiguous.add(short)
                self.short[short] = value
        for short in ambiguous:
            del self.short[short]
        self.ambiguous = ambiguous

    def lookup(self, rec: FERRecord):
        for key in record_join_keys(rec):
            if key in self.exact:
                return self.exact[key]
            if key in self.short:
                return self.short[key]
        return None


def warn_unmatched(what: str, matched: int, total: int, source) -> None:
    if total and matched < total:
        warnings.warn(f"{what}: {total - matched} of {total} record(s) have no entry in {source}", stacklevel=3)

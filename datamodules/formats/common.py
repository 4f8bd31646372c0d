"""Helpers shared by the format readers: the result type, counted skips, file:line errors, existence checks.

Bad-input rules (the project's standard):

* a missing image file (``missing_image``), a file or id listed twice in one split (``duplicate``: the first
  listing is kept) and an unusable face box (``bad_face_box``) are counted skips with ONE warning per read that
  gives each count and the first example, never one warning per file;
* an unknown label id or a malformed row is a ``DataError`` whose message is one line naming the file and line;
  long values (a FER2013 pixel string) are shortened with '…' so the message stays short;
* a missing root or annotation file is a ``DataFileNotFound`` that names the path and the format;
* corrupt image bytes are found at decode time by ``RecordDataset``, or up front by the opt-in ``verify_images``.
"""
from __future__ import annotations

import collections
import csv
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from PIL import Image, UnidentifiedImageError

from datamodules.batch import BadFaceBox, FERRecord, crop_box
from datamodules.errors import DataError, DataFileNotFound

SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
DUPLICATE = "duplicate"
BAD_FACE_BOX = "bad_face_box"
# Skip reasons that the readers warn about (the rest are documented label drops, e.g. AffectNet ids 8/9/10).
WARNED_REASONS = {MISSING_IMAGE: "whose image file is missing", DUPLICATE: "listed twice (first listing kept)",
                  BAD_FACE_BOX: "whose face box is empty or outside the image"}
MAX_VALUE_CHARS = 60
MAX_MESSAGE_CHARS = 280


@dataclass
class ReadResult:
    """What a reader found: usable records plus a reason -> count tally of what it dropped."""

    records: list[FERRecord] = field(default_factory=list)
    skipped: collections.Counter = field(default_factory=collections.Counter)
    first: dict[str, str] = field(default_factory=dict)  # reason -> first example, for the one warning

    def __len__(self) -> int:
        return len(self.records)

    def skip(self, reason: str, example: str | None = None) -> None:
        self.skipped[reason] += 1
        if example is not None:
            self.first.setdefault(reason, example)


class Duplicates:
    """Keeps the first listing of each key in one split; later ones are counted ``duplicate`` skips."""

    def __init__(self, path: str | Path):
        self.path = path
        self.lines: dict[str, int | None] = {}

    def seen(self, key: str, line: int | None, result: ReadResult) -> bool:
        if key not in self.lines:
            self.lines[key] = line
            return False
        at = f" (lines {self.lines[key]} and {line} of {self.path})" if line is not None else ""
        result.skip(DUPLICATE, f"{shorten(key)!r}{at}")
        return True


def shorten(value, limit: int = MAX_VALUE_CHARS) -> str:
    """``str(value)`` cut to ``limit`` characters with '…' (a 9,000-character pixel string must not fill a
    terminal)."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_QUOTED = re.compile(r"'[^'\n]{%d,}'|\"[^\"\n]{%d,}\"" % (MAX_VALUE_CHARS, MAX_VALUE_CHARS))


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A message fit for one terminal line: no newlines, quoted values over ``MAX_VALUE_CHARS`` shortened, and
    at most ``limit`` characters (the middle is cut, so the leading ``file:line`` survives)."""
    text = " ".join(str(message).split())
    text = _QUOTED.sub(lambda m: m.group(0)[0] + shorten(m.group(0)[1:-1]) + m.group(0)[-1], text)
    if len(text) > limit:
        text = text[: limit - 41] + " … " + text[-38:]
    return text


def where(path: str | Path, line: int | None = None) -> str:
    """``path:line`` prefix for error messages."""
    return f"{path}:{line}" if line is not None else str(path)


def row_error(path: str | Path, line: int | None, message: str) -> DataError:
    """``DataError("file:line: message")`` on one short line."""
    return DataError(one_line(f"{where(path, line)}: {message}"))


def data_error(message: str) -> DataError:
    return DataError(one_line(message))


def not_found(message: str) -> DataFileNotFound:
    return DataFileNotFound(one_line(message))


def check_split(split: str, fmt: str) -> None:
    if split not in SPLITS:
        raise data_error(f"{fmt}: unknown split {shorten(split)!r}; expected one of {', '.join(SPLITS)}")


def require_dir(path: str | Path, fmt: str, what: str = "dataset root") -> Path:
    path = Path(path)
    if not path.is_dir():
        raise not_found(f"{fmt}: {what} not found: {path}")
    return path


def require_file(path: str | Path, fmt: str, what: str = "annotation file") -> Path:
    path = Path(path)
    if not path.is_file():
        raise not_found(f"{fmt}: {what} not found: {path}")
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
        raise row_error(path, line, f"column {column!r} is not an integer: {shorten(value)!r}") from None
    if not as_float.is_integer():
        raise row_error(path, line, f"column {column!r} is not an integer: {shorten(value)!r}")
    return int(as_float)


def parse_float(value: str, path: str | Path, line: int | None, column: str) -> float:
    try:
        out = float(str(value).strip())
    except ValueError:
        raise row_error(path, line, f"column {column!r} is not a number: {shorten(value)!r}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise row_error(path, line, f"column {column!r} is not a finite number: {shorten(value)!r}")
    return out


def read_csv_rows(path: Path, fmt: str, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line_number, row)`` for each data row; header names are stripped of surrounding spaces.

    A header lacking a required column (e.g. a file that starts directly with data rows), or a row with a
    different number of fields than the header, is a ``DataError`` naming the file (and line).
    """
    require_file(path, fmt)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise row_error(path, 1, "empty file (no header)") from None
        except (csv.Error, UnicodeDecodeError) as err:
            raise row_error(path, 1, f"not a readable csv ({err})") from None
        missing = [c for c in required if c not in header]
        if missing:
            found = ", ".join(repr(shorten(h, 24)) for h in header[:10]) + (", …" if len(header) > 10 else "")
            if len(missing) == len(required):  # most likely data rows with no header line above them
                wanted = ", ".join(required) if len(required) <= 3 else f"{required[0]}, {required[1]}, …"
                raise row_error(path, 1, f"no header line (expected columns {wanted}); found [{found}]")
            raise row_error(path, 1, f"header lacks column(s) {', '.join(missing)}; found [{found}]")
        try:
            for fields in reader:
                line = reader.line_num
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue  # blank line
                if len(fields) != len(header):
                    raise row_error(path, line, f"expected {len(header)} fields, found {len(fields)}")
                yield line, dict(zip(header, fields))
        except (csv.Error, UnicodeDecodeError) as err:
            raise row_error(path, reader.line_num, f"not a readable csv row ({err})") from None


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


def warn_skips(result: ReadResult, fmt: str, split: str) -> ReadResult:
    """The one warning per read: each warned skip reason with its count and first example."""
    parts = []
    for reason, what in WARNED_REASONS.items():
        n = result.skipped.get(reason, 0)
        if n:
            example = f" (first: {result.first[reason]})" if reason in result.first else ""
            parts.append(f"skipped {n} record(s) {what}{example}")
    if parts:
        warnings.warn(f"{fmt} {split}: " + "; ".join(parts), stacklevel=3)
    return result


def verify_images(records: Iterable[FERRecord], decode: bool = True) -> ReadResult:
    """Opt-in up-front check: open every image file with PIL and ``verify()`` it; drop and count bad ones.

    ``verify()`` alone does not notice a truncated JPEG, so by default the file is also fully decoded
    (``decode=False`` for the quick structural check only). A face box (AffectNet) that lies wholly outside the
    image is dropped as ``bad_face_box``. In-memory images (FER2013) always pass. One warning with the counts is
    issued if anything was dropped.
    """
    from tqdm.auto import tqdm

    result = ReadResult()
    first_bad = None
    records = list(records)
    for rec in tqdm(records, desc="verify images", unit="img", disable=len(records) < 2000):
        if isinstance(rec.image, str):
            try:
                with Image.open(rec.image) as img:
                    size = img.size
                    img.verify()
                if rec.crop is not None:
                    crop_box(rec.crop, size)
                if decode:
                    with Image.open(rec.image) as img:
                        img.load()
            except FileNotFoundError:
                result.skip(MISSING_IMAGE)
                first_bad = first_bad or rec.image
                continue
            except BadFaceBox as err:
                result.skip(BAD_FACE_BOX)
                first_bad = first_bad or f"{rec.image} ({err})"
                continue
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
                result.skip(CORRUPT_IMAGE)
                first_bad = first_bad or f"{rec.image} ({shorten(err, 120)})"
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
    """One warning counting the records a sidecar has no entry for."""
    if total and matched < total:
        warnings.warn(f"{what}: {total - matched} of {total} record(s) have no entry in {source}", stacklevel=3)

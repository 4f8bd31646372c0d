"""Write any labelled image set in every public FER layout the readers read.

``export_fer_dataset({"train": [...], "val": [...], "test": [...]}, out_dir)`` writes ``out_dir/<format>/``:

============== ============================================================================================
affectnet      ``training.csv`` (train + val samples), ``validation.csv`` (test samples),
               ``Manually_Annotated_Images/<k>/<name>.jpg``: the image padded into a larger canvas at a
               known offset, face_x/y/width/height = that box (the crop gives back the original size),
               68 plausible landmarks, valence/arousal typical for the label (+ seeded noise).
affectnet_npy  ``train_set`` (train + val) / ``val_set`` (test): ``images/<name>.jpg`` +
               ``annotations/<name>_{exp,val,aro}.npy`` (numpy string scalars) and ``_lnd.npy``.
rafdb          ``EmoLabel/list_patition_label.txt`` + ``Image/aligned/<stem>_aligned.jpg``; names are
               ``train_00001.jpg`` (train + val samples) and ``test_0001.jpg``; contempt samples skipped.
fer2013        ``fer2013.csv`` (48x48 gray pixels; Usage Training/PublicTest/PrivateTest); contempt skipped.
ferplus        ``fer2013new.csv`` (10 votes per image, >= 7 on the label, a seeded spread over the others),
               ``fer2013.csv`` aligned row for row, and ``FER2013Train|FER2013Valid|FER2013Test/fer*.png``.
imagefolder    ``<split>/<class name>/<name>.png`` (lossless).
openface       ``openface_aus.csv``: a ``file`` column + OpenFace's leading-space headers, success=1,
               confidence ~0.98, ``AUxx_r`` (3 decimals) and ``AUxx_c`` for the vocabulary's AUs; samples
               without AUs get a success=0 row (so they read back as unknown).
captions       ``captions.jsonl``: ``{"file": ..., "caption": ...}`` per image file (samples with a caption).
============== ============================================================================================

Splits: AffectNet and RAF-DB have no public val split, so val samples go into their train files (the
datamodule carves val from train for those formats); AffectNet's validation files hold the test samples.
Row order of fer2013.csv: non-contempt train, val, test samples, so FERPlus (same rows, then the contempt
samples appended) and FER2013 agree on the ``fer%07d.png`` name of every shared image. In
``ferplus/fer2013.csv`` a contempt image's 7-class emotion is its runner-up FERPlus vote (FER2013 has no
contempt; the FERPlus reader never reads that column).

Sidecars list every image file name the export wrote for a sample (``<name>.png``, the RAF-DB
``train_00001_aligned.jpg`` name, the FERPlus ``fer0000000.png`` name), like OpenFace run over all of them,
so ``attach_openface``/``attach_captions`` join to records of any exported format (by stem for
``<name>.jpg``).
"""
from __future__ import annotations

import collections
import json
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from datamodules.formats.common import SPLITS
from datamodules.formats.fer2013 import SPLIT_TO_USAGE, fer_name
from datamodules.formats.ferplus import IMAGE_DIRS as FERPLUS_IMAGE_DIRS
from datamodules.labels import (CONTEMPT, EXPRESSIONS, FER2013_TO_CANONICAL, FERPLUS_TO_CANONICAL,
                                FERPLUS_VOTE_COLUMNS, RAFDB_TO_CANONICAL, AUVocabulary)

ALL_FORMATS = ("affectnet", "affectnet_npy", "rafdb", "fer2013", "ferplus", "imagefolder", "openface", "captions")
SIDECARS = ("openface", "captions")
SIDECAR_MODES = ("all", "none", "partial")
JPEG_QUALITY = 95
FER_SIDE = 48
OPENFACE_CSV = "openface_aus.csv"
CAPTIONS_JSONL = "captions.jsonl"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CANONICAL_TO_FER2013 = {c: k for k, c in FER2013_TO_CANONICAL.items()}
_CANONICAL_TO_RAFDB = {c: k for k, c in RAFDB_TO_CANONICAL.items()}
_CANONICAL_TO_FERPLUS_COL = {c: FERPLUS_VOTE_COLUMNS.index(name) for name, c in FERPLUS_TO_CANONICAL.items()}
# Typical (valence, arousal) per canonical label (circumplex model), AffectNet's [-1, 1] scale.
VALENCE_AROUSAL = {0: (0.0, 0.0), 1: (0.8, 0.45), 2: (-0.65, -0.3), 3: (0.2, 0.8), 4: (-0.6, 0.75),
                   5: (-0.7, 0.35), 6: (-0.6, 0.7), 7: (-0.45, 0.25)}


@dataclass
class ExportSample:
    name: str                          # unique file stem, e.g. "toy_train_000001"
    image: np.ndarray                  # uint8 (H,W,3) (or (H,W) gray)
    label: int                         # canonical id
    aus: Optional[np.ndarray] = None   # float (A,) in the vocabulary's order (NaN = that AU unknown)
    caption: str = ""


class ExportResult(dict):
    """format -> root dir (the sidecar file for openface/captions), plus what the readers should find.

    ``counts[format][split]`` is the number of records the format's reader returns for that split (AffectNet
    val and test both read the validation files); ``skipped[format]`` counts samples a format cannot hold.
    """

    counts: dict[str, dict[str, int]]
    skipped: dict[str, collections.Counter]


# ------------------------------------------------------------------ helpers
def _rgb(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"export: sample {name!r}: image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"export: sample {name!r}: image must be (H,W,3) or (H,W), got {image.shape}")
    return image


def _save(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, quality=JPEG_QUALITY)
    else:
        img.save(path)


def _gray48(image: np.ndarray) -> np.ndarray:
    img = Image.fromarray(image).convert("L")
    if img.size != (FER_SIDE, FER_SIDE):
        img = img.resize((FER_SIDE, FER_SIDE), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def _landmark_template() -> np.ndarray:
    """68 iBUG points in unit face-box coordinates (jaw, brows, nose, eyes, mouth)."""
    pts = []
    a = np.linspace(-np.pi / 2, np.pi / 2, 17)
    pts += list(zip(0.5 - 0.45 * np.sin(-a), 0.45 + 0.5 * np.cos(a)))
    arc = 0.04 * np.sin(np.linspace(0, np.pi, 5))
    pts += list(zip(np.linspace(0.15, 0.42, 5), 0.32 - arc))
    pts += list(zip(np.linspace(0.58, 0.85, 5), 0.32 - arc))
    pts += [(0.5, y) for y in np.linspace(0.40, 0.58, 4)]
    pts += list(zip(np.linspace(0.40, 0.60, 5), [0.63, 0.645, 0.65, 0.645, 0.63]))
    for cx in (0.3, 0.7):
        t = np.linspace(np.pi, -np.pi, 6, endpoint=False)
        pts += list(zip(cx + 0.07 * np.cos(t), 0.42 - 0.025 * np.sin(t)))
    for n, rx, ry in ((12, 0.16, 0.06), (8, 0.10, 0.03)):
        t = np.linspace(np.pi, -np.pi, n, endpoint=False)
        pts += list(zip(0.5 + rx * np.cos(t), 0.78 - ry * np.sin(t)))
    out = np.asarray(pts, dtype=np.float64)
    assert out.shape == (68, 2)
    return out


_LANDMARKS = _landmark_template()


def _landmarks(rng, x: int, y: int, w: int, h: int) -> np.ndarray:
    jitter = rng.normal(0.0, 0.01, size=_LANDMARKS.shape)
    return np.stack([x + (_LANDMARKS[:, 0] + jitter[:, 0]) * w, y + (_LANDMARKS[:, 1] + jitter[:, 1]) * h], 1)


def _valence_arousal(rng, label: int) -> tuple[float, float]:
    v, a = VALENCE_AROUSAL[label]
    return tuple(float(np.clip(c + rng.normal(0.0, 0.05), -1.0, 1.0)) for c in (v, a))  # type: ignore[return-value]


def _ferplus_votes(rng, label: int) -> np.ndarray:
    """10 votes: >= 7 on the label's column, 0..3 spread over the other expressions and 'unknown'."""
    votes = np.zeros(len(FERPLUS_VOTE_COLUMNS), dtype=np.int64)
    col = _CANONICAL_TO_FERPLUS_COL[label]
    others = [c for c in range(9) if c != col]  # 7 other expressions + unknown; never NF
    spread = int(rng.integers(0, 4))
    votes[col] = 10 - spread
    for c in rng.choice(others, size=spread, replace=True):
        votes[c] += 1
    return votes


def _runner_up_fer2013(votes: np.ndarray) -> int:
    """A 7-class FER2013 emotion for a contempt image: its best non-contempt expression vote (neutral if none)."""
    best, best_votes = 0, 0  # canonical neutral if no other expression got a vote
    for col, name in enumerate(FERPLUS_VOTE_COLUMNS[:8]):
        canon = FERPLUS_TO_CANONICAL[name]
        if canon != CONTEMPT and votes[col] > best_votes:
            best, best_votes = canon, votes[col]
    return _CANONICAL_TO_FER2013[best]


def _check(splits: Mapping[str, Sequence[ExportSample]], vocab: AUVocabulary) -> None:
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"export: unknown split(s) {sorted(unknown)}; expected {SPLITS}")
    seen: set[str] = set()
    for split, samples in splits.items():
        for s in samples:
            if not isinstance(s.name, str) or not _NAME_RE.match(s.name):
                raise ValueError(f"export: sample name {s.name!r} must match {_NAME_RE.pattern}")
            if s.name in seen:
                raise ValueError(f"export: duplicate sample name {s.name!r}")
            if re.match(r"^(fer\d{7}|(train|test)_\d+(_aligned)?)$", s.name):
                raise ValueError(f"export: sample name {s.name!r} collides with the FERPlus/RAF-DB naming scheme")
            seen.add(s.name)
            if not (isinstance(s.label, (int, np.integer)) and 0 <= s.label < len(EXPRESSIONS)):
                raise ValueError(f"export: sample {s.name!r}: label {s.label!r} is not a canonical id 0..7")
            if s.aus is not None:
                aus = np.asarray(s.aus, dtype=np.float64)
                if aus.shape != (len(vocab),):
                    raise ValueError(f"export: sample {s.name!r}: aus shape {aus.shape} != ({len(vocab)},)")
                known = aus[~np.isnan(aus)]
                if ((known < 0) | (known > vocab.max_intensity)).any():
                    raise ValueError(f"export: sample {s.name!r}: AU intensities outside [0, {vocab.max_intensity}]")
            _rgb(s.image, s.name)


def with_sidecars(splits: Mapping[str, Sequence[ExportSample]], formats: Sequence[str], mode: str = "all",
                  au_fraction: float = 0.5, seed: int = 0
                  ) -> tuple[dict[str, list[ExportSample]], tuple[str, ...]]:
    """The samples and formats of an export as researchers download it: ``mode`` is

    - ``all``: the OpenFace AU csv and the captions jsonl for every face (unchanged);
    - ``none``: no sidecar at all (asking for ``openface``/``captions`` in ``formats`` is then an error);
    - ``partial``: AUs for a seeded ``au_fraction`` of the faces (the others get OpenFace's success=0 row, i.e.
      unknown AUs, as when OpenFace finds no face); captions for every face.

    The image formats never carry AUs or captions, so they are the same files in every mode.
    """
    if mode not in SIDECAR_MODES:
        raise ValueError(f"export: sidecars must be one of {SIDECAR_MODES}, got {mode!r}")
    formats = tuple(formats)
    splits = {split: list(samples) for split, samples in splits.items()}
    if mode == "all":
        return splits, formats
    if mode == "none":
        asked = [f for f in formats if f in SIDECARS]
        if asked:
            raise ValueError(f"export: sidecars=none but formats ask for {asked}")
        return splits, formats
    if not 0.0 <= au_fraction <= 1.0:
        raise ValueError(f"export: au_fraction must be in [0, 1], got {au_fraction}")
    names = [s.name for split in SPLITS for s in splits.get(split, ())]
    rng = np.random.default_rng([seed, len(ALL_FORMATS)])  # a stream no format's own rng uses
    keep = set(np.asarray(names)[rng.permutation(len(names))[:int(round(au_fraction * len(names)))]].tolist())
    for split, samples in splits.items():
        splits[split] = [s if s.name in keep else ExportSample(s.name, s.image, s.label, None, s.caption)
                         for s in samples]
    return splits, formats


# ------------------------------------------------------------------ the exporter
def export_fer_dataset(splits: Mapping[str, Sequence[ExportSample]], out_dir, formats: Sequence[str] = ALL_FORMATS,
                       vocab: AUVocabulary = AUVocabulary(), seed: int = 0, overwrite: bool = False) -> ExportResult:
    """Write ``splits`` under ``out_dir/<format>/`` for each of ``formats``; returns format -> root (see module doc).

    A non-empty ``out_dir/<format>`` is an error unless ``overwrite=True`` (then it is replaced), so stale files
    never mix into an export. Contempt samples are skipped for the 7-class formats (rafdb, fer2013); the counts
    are printed and returned in ``.skipped``.
    """
    formats = tuple(formats)
    bad = [f for f in formats if f not in ALL_FORMATS]
    if bad:
        raise ValueError(f"export: unknown format(s) {bad}; known: {ALL_FORMATS}")
    _check(splits, vocab)
    out_dir = Path(out_dir)
    ordered = {s: list(splits.get(s, ())) for s in SPLITS}

    # -- plans shared by several formats (names that sidecars must know)
    raf_names: dict[str, tuple[str, str]] = {}  # sample -> (list name, split)
    raf_counter = collections.Counter()
    for split in SPLITS:
        raf_split = "test" if split == "test" else "train"
        for s in ordered[split]:
            if s.label != CONTEMPT:
                raf_counter[raf_split] += 1
                width = 4 if raf_split == "test" else 5
                raf_names[s.name] = (f"{raf_split}_{raf_counter[raf_split]:0{width}d}.jpg", raf_split)
    fer_rows = [(sp, s) for sp in SPLITS for s in ordered[sp] if s.label != CONTEMPT]
    n_fer2013 = len(fer_rows)
    fer_rows += [(sp, s) for sp in SPLITS for s in ordered[sp] if s.label == CONTEMPT]
    fer_index = {s.name: i for i, (_, s) in enumerate(fer_rows)}

    result = ExportResult()
    result.counts, result.skipped = {}, {}
    for fmt in formats:
        target = out_dir / fmt
        if target.exists() and any(target.iterdir()):
            if not overwrite:
                raise FileExistsError(f"export: {target} exists and is not empty (pass overwrite=True to replace it)")
            shutil.rmtree(target)
        target.mkdir(parents=True, exist_ok=True)
        result.skipped[fmt] = collections.Counter()
        fmt_rng = np.random.default_rng([seed, ALL_FORMATS.index(fmt)])

        if fmt == "affectnet":
            result[fmt] = target
            files = {"train": ("training.csv", ordered["train"] + ordered["val"]),
                     "test": ("validation.csv", ordered["test"])}
            k = 0
            for csv_name, samples in files.values():
                lines = ["subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
                         "expression,valence,arousal"]
                for s in samples:
                    img = _rgb(s.image, s.name)
                    h, w = img.shape[:2]
                    left, top, right, bottom = (int(v) for v in fmt_rng.choice([8, 16, 24, 32], size=4))
                    canvas = np.full((h + top + bottom, w + left + right, 3), int(fmt_rng.integers(40, 200)),
                                     dtype=np.uint8)
                    canvas[top:top + h, left:left + w] = img
                    rel = f"{1 + k % 4}/{s.name}.jpg"
                    k += 1
                    _save(canvas, target / "Manually_Annotated_Images" / rel)
                    lnd = ";".join(f"{v:.2f}" for v in _landmarks(fmt_rng, left, top, w, h).ravel())
                    val, aro = _valence_arousal(fmt_rng, s.label)
                    lines.append(f"{rel},{left},{top},{w},{h},{lnd},{s.label},{val:.6f},{aro:.6f}")
                (target / csv_name).write_text("\n".join(lines) + "\n")
            n_test = len(ordered["test"])
            result.counts[fmt] = {"train": len(files["train"][1]), "val": n_test, "test": n_test}

        elif fmt == "affectnet_npy":
            result[fmt] = target
            sets = {"train_set": ordered["train"] + ordered["val"], "val_set": ordered["test"]}
            for set_name, samples in sets.items():
                (target / set_name / "annotations").mkdir(parents=True, exist_ok=True)
                (target / set_name / "images").mkdir(parents=True, exist_ok=True)
                for s in samples:
                    img = _rgb(s.image, s.name)
                    _save(img, target / set_name / "images" / f"{s.name}.jpg")
                    ann = target / set_name / "annotations"
                    val, aro = _valence_arousal(fmt_rng, s.label)
                    np.save(ann / f"{s.name}_exp.npy", np.array(str(int(s.label))))
                    np.save(ann / f"{s.name}_val.npy", np.array(f"{val:.6f}"))
                    np.save(ann / f"{s.name}_aro.npy", np.array(f"{aro:.6f}"))
                    h, w = img.shape[:2]
                    np.save(ann / f"{s.name}_lnd.npy", _landmarks(fmt_rng, 0, 0, w, h).ravel().astype(np.float32))
            n_test = len(ordered["test"])
            result.counts[fmt] = {"train": len(sets["train_set"]), "val": n_test, "test": n_test}

        elif fmt == "rafdb":
            result[fmt] = target
            lines = []
            for split in SPLITS:
                for s in ordered[split]:
                    if s.label == CONTEMPT:
                        result.skipped[fmt]["contempt_not_in_7_class_dataset"] += 1
                        continue
                    name, _ = raf_names[s.name]
                    lines.append(f"{name} {_CANONICAL_TO_RAFDB[int(s.label)]}")
                    _save(_rgb(s.image, s.name), target / "Image" / "aligned" / f"{Path(name).stem}_aligned.jpg")
            (target / "EmoLabel").mkdir(parents=True, exist_ok=True)
            (target / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
            result.counts[fmt] = {"train": raf_counter["train"], "test": raf_counter["test"]}

        elif fmt in ("fer2013", "ferplus"):
            result[fmt] = target
            rows = fer_rows if fmt == "ferplus" else fer_rows[:n_fer2013]
            if fmt == "fer2013" and len(fer_rows) > n_fer2013:  # a Counter keeps a += 0 as a zero entry
                result.skipped[fmt]["contempt_not_in_7_class_dataset"] += len(fer_rows) - n_fer2013
            vote_rng = np.random.default_rng([seed, ALL_FORMATS.index("ferplus")])
            votes = [_ferplus_votes(vote_rng, int(s.label)) for _, s in fer_rows]  # same votes for both formats
            fer_lines, new_lines = ["emotion,pixels,Usage"], ["Usage,Image name," + ",".join(FERPLUS_VOTE_COLUMNS)]
            for i, (split, s) in enumerate(rows):
                gray = _gray48(_rgb(s.image, s.name))
                emotion = (_CANONICAL_TO_FER2013[int(s.label)] if s.label != CONTEMPT
                           else _runner_up_fer2013(votes[i]))
                fer_lines.append(f"{emotion},{' '.join(map(str, gray.ravel().tolist()))},{SPLIT_TO_USAGE[split]}")
                if fmt == "ferplus":
                    new_lines.append(f"{SPLIT_TO_USAGE[split]},{fer_name(i)}," + ",".join(map(str, votes[i])))
                    _save(gray, target / FERPLUS_IMAGE_DIRS[split] / fer_name(i))
            (target / "fer2013.csv").write_text("\n".join(fer_lines) + "\n")
            if fmt == "ferplus":
                (target / "fer2013new.csv").write_text("\n".join(new_lines) + "\n")
                for d in FERPLUS_IMAGE_DIRS.values():
                    (target / d).mkdir(exist_ok=True)
            result.counts[fmt] = {sp: sum(1 for r_sp, _ in rows if r_sp == sp) for sp in SPLITS}

        elif fmt == "imagefolder":
            result[fmt] = target
            for split in SPLITS:
                (target / split).mkdir(exist_ok=True)
                for s in ordered[split]:
                    _save(_rgb(s.image, s.name), target / split / EXPRESSIONS[int(s.label)] / f"{s.name}.png")
            result.counts[fmt] = {sp: len(ordered[sp]) for sp in SPLITS}

        elif fmt in SIDECARS:
            def file_names(s: ExportSample) -> list[str]:
                names = [f"{s.name}.png"]
                if "rafdb" in formats and s.name in raf_names:
                    names.append(f"{Path(raf_names[s.name][0]).stem}_aligned.jpg")
                if ("ferplus" in formats or "fer2013" in formats) and s.name in fer_index:
                    if "ferplus" in formats or fer_index[s.name] < n_fer2013:
                        names.append(fer_name(fer_index[s.name]))
                return names

            all_samples = [s for sp in SPLITS for s in ordered[sp]]
            if fmt == "openface":
                path = target / OPENFACE_CSV
                _write_openface(path, all_samples, file_names, vocab, fmt_rng)
                result.counts[fmt] = {"rows_success": sum(len(file_names(s)) for s in all_samples
                                                          if s.aus is not None)}
            else:
                path = target / CAPTIONS_JSONL
                lines = [json.dumps({"file": n, "caption": s.caption})
                         for s in all_samples if s.caption for n in file_names(s)]
                path.write_text("\n".join(lines) + ("\n" if lines else ""))
                result.counts[fmt] = {"lines": len(lines)}
            result[fmt] = path

        skipped = result.skipped[fmt]
        if skipped:
            warnings.warn(f"export_fer_dataset: {fmt}: skipped {dict(skipped)}", stacklevel=2)

    summary = {"seed": seed, "vocab": list(vocab.aus),
               "formats": {f: {"path": str(result[f]), "counts": result.counts[f], "skipped": dict(result.skipped[f])}
                           for f in formats}}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "export_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result


def _write_openface(path: Path, samples: Sequence[ExportSample], file_names, vocab: AUVocabulary, rng) -> None:
    """OpenFace-style csv: ``", "``-separated, leading-space headers, one row per image file name."""
    aus = sorted(vocab.aus)  # OpenFace orders AU columns by number
    header = ["file", "frame", "face_id", "timestamp", "confidence", "success",
              *(f"AU{a:02d}_r" for a in aus), *(f"AU{a:02d}_c" for a in aus)]
    lines = [", ".join(header)]
    frame = 0
    for s in samples:
        for name in file_names(s):
            frame += 1
            if s.aus is None:  # what OpenFace writes when it finds no face: success 0, zeros
                conf, success, r = float(rng.uniform(0.0, 0.1)), 0, [0.0] * len(aus)
            else:
                conf, success = float(rng.uniform(0.97, 0.99)), 1
                r = [float(s.aus[vocab.index(a)]) for a in aus]
            r_text = ["nan" if np.isnan(v) else f"{v:.3f}" for v in r]
            c_text = ["nan" if np.isnan(v) else f"{float(v >= 1.0):.2f}" for v in r]
            lines.append(", ".join([name, str(frame), "0", f"{(frame - 1) * 0.033:.3f}", f"{conf:.2f}", str(success),
                                    *r_text, *c_text]))
    path.write_text("\n".join(lines) + "\n")

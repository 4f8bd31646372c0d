"""The synthetic-face store: HF ``datasets`` shards + an atomically written ``manifest.json``.

A synthetic set is a folder::

    manifest.json            {"format": "synfer-synthetic/1", "shards": [{"name", "count"}], "count", "meta"}
    shards/<name>/           one ``Dataset.save_to_disk`` folder per shard (Arrow, memory-mapped on load)
    README.md                dataset card (stage=synthesize; face_storage.py): ``datasets.load_dataset(<folder>,
                             split="train", streaming=True)`` reads the shards in place

Columns: ``image`` (PNG unless ``synthesis.storage`` says otherwise, face_storage.py), ``sample_id``, ``seed``,
``target_label``, ``target_aus``, ``au_mask``, ``caption``, ``guidance`` (json of the sampling settings). The
relabel stage writes no faces: its set is a labels table joined by ``sample_id`` to the synthesized set it
references (label_table.py), which ``load_synthetic`` and ``verify_synthetic`` resolve; the joined rows gain
``probs/<voter>``, ``final_label``, ``soft_label``, ``is_soft``, ``confidence`` and ``kept``. Rows are never
deleted: a dropped sample has ``kept = false``. (A relabelled set written with its faces by earlier versions is an
image set with those columns and still loads.)

Writers (one per rank, possibly on several nodes) append shards under an inter-process lock on the manifest;
``check_shards`` repairs a set after a kill (damaged or unlisted shards go, to be redone). stage=synthesize keeps
its config fingerprint, the plan size and ``complete`` in ``meta``; readers warn about an incomplete set.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from datamodules.errors import DataError, DataFileNotFound
from datamodules.transforms import check_color_mode, eval_transform, gray_tensor, to_color_mode

MANIFEST = "manifest.json"
FORMAT = "synfer-synthetic/1"
REQUIRED_COLUMNS = ("image", "sample_id", "target_label", "target_aus", "au_mask", "caption")
PROVENANCE_COLUMNS = ("layout_source", "guidance", "seed")  # where a face came from; no reader's label depends on it
VOTE_LABELS = ("soft", "hard")  # what a student learns from a relabelled face (mix.vote_labels)


def to_pil(images: torch.Tensor, color_mode: str = "rgb") -> list[Image.Image]:
    """(N,3,H,W) floats in [0,1] -> PIL images (what the store keeps, PNG-encoded): RGB, or for ``gray`` mode L
    images of the luma (a generator trained on gray faces drifts into tinted ones)."""
    images = images.detach().clamp(0, 1)
    if check_color_mode(color_mode, "color_mode") == "gray":
        images = gray_tensor(images)[:, :1]
    array = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in array]


def read_manifest(directory: str | Path) -> dict:
    """The manifest of an image set (``synfer-synthetic/1``) or of a relabelled labels-only set
    (``synfer-labels/1``, datamodules/label_table.py); anything else is a DataError naming the file."""
    from datamodules.label_table import LABELS_FORMAT, check_labels_manifest

    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DataFileNotFound(f"not a synthetic set (no {MANIFEST}): {directory}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"corrupt {path}: {err}") from err
    if isinstance(manifest, dict) and manifest.get("format") == LABELS_FORMAT:
        check_labels_manifest(manifest, path)
        return manifest
    if (not isinstance(manifest, dict) or manifest.get("format") != FORMAT
            or not isinstance(manifest.get("shards"), list)
            or not all(isinstance(s, dict) and isinstance(s.get("name"), str) and isinstance(s.get("count"), int)
                       for s in manifest["shards"])):
        raise DataError(f"{path} is not a {FORMAT} manifest")
    return manifest


def is_label_set(manifest: dict) -> bool:
    return manifest.get("format") != FORMAT


def read_image_manifest(directory: str | Path) -> dict:
    """The manifest of a set that holds its faces (shards); a labels-only set here is a DataError."""
    manifest = read_manifest(directory)
    if is_label_set(manifest):
        raise DataError(f"{Path(directory) / MANIFEST} is a relabelled set (labels only, its faces are in "
                        f"{[s['path'] for s in manifest['sources']]}); a synthesized set is needed here")
    return manifest


def repair_hint(manifest: Optional[dict]) -> str:
    """How to get an intact copy of a set, by the stage that wrote it (its manifest's ``meta``)."""
    meta = (manifest or {}).get("meta", {})
    if "fingerprint" in meta:
        return "rerun stage=synthesize with the same config: it verifies the set and redoes the damaged shards"
    if "voters" in meta or is_label_set(manifest or {"format": FORMAT}):
        return "rerun stage=relabel (it writes the relabelled set again)"
    return "rerun the stage that wrote this set (stage=synthesize redoes damaged shards of its sets)"


def open_shard(directory: str | Path, shard: dict, manifest: Optional[dict] = None):
    """One listed shard, memory-mapped (its Arrow metadata is read, no image is decoded). A missing, unreadable
    (e.g. truncated) or short shard is a DataError naming the shard's files and the fix."""
    from datasets import load_from_disk

    path = Path(directory) / "shards" / shard["name"]
    hint = repair_hint(manifest)
    if not path.is_dir():
        raise DataFileNotFound(f"shard listed in {Path(directory) / MANIFEST} is missing: {path}; {hint}")
    try:
        part = load_from_disk(str(path))
    except (OSError, ValueError, KeyError, TypeError) as err:  # pyarrow's own errors name no file
        files = ", ".join(str(f) for f in sorted(path.glob("*.arrow"))) or f"{path} (no .arrow file)"
        raise DataError(f"synthetic shard {files} cannot be read ({type(err).__name__}: {err}); {hint}") from err
    if len(part) != shard["count"]:
        raise DataError(f"shard {path} has {len(part)} rows, the manifest says {shard['count']}; {hint}")
    return part


def verify_synthetic(directory: str | Path) -> dict:
    """A set is intact when its manifest parses and every listed shard is there, readable and holds the listed
    number of rows (checked without decoding images); a relabelled set's labels table must be readable, its
    faces' set there, unchanged and intact, and every id must join. Returns the manifest; DataError /
    DataFileNotFound naming the file otherwise."""
    manifest = read_manifest(directory)
    if is_label_set(manifest):
        from datamodules.label_table import verify_label_set

        return verify_label_set(directory, manifest)
    for shard in manifest["shards"]:
        open_shard(directory, shard, manifest)
    return manifest


def _write_manifest(directory: Path, manifest: dict) -> None:
    manifest["count"] = sum(s["count"] for s in manifest["shards"])
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, directory / MANIFEST)


@contextlib.contextmanager
def _quiet_datasets():
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def manifest_lock(directory: str | Path):
    """An inter-process lock on a set's manifest: ranks (and nodes on a shared file system) append shards to it."""
    from filelock import FileLock

    Path(directory).mkdir(parents=True, exist_ok=True)
    return FileLock(str(Path(directory) / (MANIFEST + ".lock")))


def write_shard(directory: str | Path, name: str, rows: dict[str, Sequence[Any]], meta: Optional[dict] = None,
                features=None, replace: bool = False) -> Path:
    """Write one shard (tmp folder + rename) and then record it in the manifest; a kill leaves either the old
    manifest or the new one, never a manifest pointing at a half-written shard. ``replace`` redoes a listed shard."""
    from datasets import Dataset

    directory = Path(directory)
    missing = [c for c in REQUIRED_COLUMNS if c not in rows]
    if missing:
        raise ValueError(f"synthetic shard {name!r} lacks columns {missing}")
    lengths = {k: len(v) for k, v in rows.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"synthetic shard {name!r}: columns differ in length {lengths}")
    final = directory / "shards" / name
    tmp = directory / "shards" / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_datasets():  # one "Saving the dataset" bar per shard would bury the synthesis progress bar
        Dataset.from_dict(dict(rows), features=features).save_to_disk(str(tmp))
    with manifest_lock(directory):
        manifest = (read_image_manifest(directory) if (directory / MANIFEST).is_file()
                    else {"format": FORMAT, "shards": []})
        listed = any(s["name"] == name for s in manifest["shards"])
        if listed and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"shard {name!r} already exists in {directory}")
        manifest["shards"] = [s for s in manifest["shards"] if s["name"] != name]
        if meta:
            manifest["meta"] = {**manifest.get("meta", {}), **meta}
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        manifest["shards"].append({"name": name, "count": next(iter(lengths.values()))})
        _write_manifest(directory, manifest)
    return final


def check_shards(directory: str | Path) -> tuple[list[str], list[str]]:
    """Make a set consistent after a kill: listed shards that are missing, unreadable or short are unlisted (to be
    redone), half-written ``.tmp`` folders and shard folders the manifest does not list are removed.
    Returns (good shard names, dropped shard names)."""
    directory = Path(directory)
    with manifest_lock(directory):
        manifest = read_image_manifest(directory)
        good, dropped = [], []
        for shard in manifest["shards"]:
            try:
                open_shard(directory, shard)
                good.append(shard)
            except DataError:
                dropped.append(shard)
        listed = {s["name"] for s in good}
        for path in sorted((directory / "shards").glob("*")) if (directory / "shards").is_dir() else []:
            if path.name not in listed:
                shutil.rmtree(path, ignore_errors=True)
        if dropped:
            manifest["shards"] = good
            _write_manifest(directory, manifest)
    return [s["name"] for s in good], [s["name"] for s in dropped]


def update_manifest(directory: str | Path, sort_shards: bool = False, **meta: Any) -> dict:
    """Merge ``meta`` into the manifest (and order the shards by name); returns the new manifest."""
    directory = Path(directory)
    with manifest_lock(directory):
        manifest = read_image_manifest(directory)
        manifest["meta"] = {**manifest.get("meta", {}), **meta}
        if sort_shards:
            manifest["shards"] = sorted(manifest["shards"], key=lambda s: s["name"])
        _write_manifest(directory, manifest)
    return manifest


def write_dataset(directory: str | Path, dataset, name: str = "shard-00000", meta: Optional[dict] = None) -> Path:
    """A whole ``datasets.Dataset`` as a one-shard synthetic set (replacing what is there)."""
    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    tmp = directory / "shards" / f".{name}.tmp"
    with _quiet_datasets():
        dataset.save_to_disk(str(tmp))
    os.replace(tmp, directory / "shards" / name)
    _write_manifest(directory, {"format": FORMAT, "shards": [{"name": name, "count": len(dataset)}],
                                "meta": meta or {}})
    return directory


def load_synthetic(directories: str | Path | Sequence[str | Path], allow_incomplete: bool = False):
    """One ``datasets.Dataset`` over the shards listed in the manifests of one or several synthetic sets; shard
    counts are checked against the manifest (a truncated shard is an error naming it). A relabelled set (labels
    table) is its source set's faces joined with its labels by ``sample_id`` (label_table.py). A set whose
    synthesis has not finished is read with a warning (``allow_incomplete``: silently)."""
    from datasets import concatenate_datasets

    if isinstance(directories, (str, Path)):
        directories = [directories]
    parts = []
    for directory in directories:
        manifest = read_manifest(directory)
        if is_label_set(manifest):
            from datamodules.label_table import load_label_set

            parts.append(load_label_set(directory, manifest, allow_incomplete))
            continue
        if manifest.get("meta", {}).get("complete") is False and not allow_incomplete:
            warnings.warn(f"synthetic set {directory} is incomplete ({manifest.get('count', 0)} of "
                          f"{manifest['meta'].get('plan_size', '?')} samples): its stage=synthesize run has not "
                          "finished; rerun the same command to complete it")
        for shard in manifest["shards"]:
            parts.append(open_shard(directory, shard, manifest))
    if not parts:
        raise DataError(f"no shards in {list(map(str, directories))}")
    dataset = concatenate_datasets(common_columns(parts, directories)) if len(parts) > 1 else parts[0]
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise DataError(f"synthetic set {list(map(str, directories))} lacks columns {missing}")
    return dataset


def common_columns(parts: list, directories: Sequence[str | Path]) -> list:
    """Shards of several sets, reduced to the columns they share when only provenance differs (one set made with
    layout initialisation records ``layout_source``); any other difference (e.g. relabelled with unrelabelled sets:
    the labels students read would differ per set) is a DataError naming the sets."""
    names = [set(p.column_names) for p in parts]
    shared = set.intersection(*names)
    differing = set.union(*names) - shared
    if differing - set(PROVENANCE_COLUMNS):
        raise DataError(f"the synthetic sets {list(map(str, directories))} have different columns "
                        f"{sorted(differing - set(PROVENANCE_COLUMNS))}: mix sets of one kind (all relabelled or none)")
    return [p.remove_columns(sorted(set(p.column_names) - shared)) for p in parts] if differing else parts


class SyntheticFERDataset(torch.utils.data.Dataset):
    """A synthetic set as standard FER samples (the FERBatch dict): the relabelled ``final_label`` /
    ``soft_label`` when present (``use_relabel``), else the conditioned ``target_label``; ``kept_only`` hides the
    samples the vote dropped. ``soft_labels``: None = a ``soft_label`` exactly when relabelled, True = always
    (one-hot for conditioned labels), False = never (a batch needs the same keys in every item). ``color_mode``:
    the faces are converted to it (a gray student gets gray faces from an RGB generator too). ``vote_labels``:
    ``soft`` = the vote's soft_label, ``hard`` = the one-hot of its final_label even where the vote was soft.
    ``weight``: every item carries it as its loss weight (None: no ``weight`` key)."""

    def __init__(self, dataset, image_size: int, num_classes: int, use_relabel: bool = True,
                 kept_only: bool = True, transform=None, soft_labels: Optional[bool] = None,
                 color_mode: str = "rgb", vote_labels: str = "soft", weight: Optional[float] = None):
        if vote_labels not in VOTE_LABELS:
            raise ValueError(f"mix.vote_labels must be one of {', '.join(VOTE_LABELS)}, got {vote_labels!r}")
        self.relabelled = use_relabel and "final_label" in dataset.column_names
        self.vote_soft, self.weight = vote_labels == "soft", weight
        if kept_only and "kept" in dataset.column_names:
            keep = np.flatnonzero(np.asarray(dataset["kept"], dtype=bool))
            dataset = dataset.select(keep)
        self.dataset = dataset
        self.num_classes = num_classes
        self.color_mode = check_color_mode(color_mode, "color_mode")
        self.transform = transform or eval_transform(image_size, self.color_mode)
        self.soft_labels = self.relabelled if soft_labels is None else bool(soft_labels)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[int(index)]
        label = int(row["final_label"] if self.relabelled else row["target_label"])
        if not 0 <= label < self.num_classes:
            raise ValueError(f"synthetic sample {row['sample_id']} has label {label} outside [0, {self.num_classes})")
        item = {"image": self.transform(to_color_mode(row["image"], self.color_mode)), "label": torch.tensor(label),
                "aus": torch.tensor(row["target_aus"], dtype=torch.float32),
                "au_mask": torch.tensor(row["au_mask"], dtype=torch.bool),
                "caption": row["caption"], "sample_id": row["sample_id"]}
        if self.weight is not None:
            item["weight"] = torch.tensor(float(self.weight))
        if self.soft_labels:
            if self.relabelled and self.vote_soft:  # one-hot where the voters agreed
                item["soft_label"] = torch.tensor(row["soft_label"], dtype=torch.float32)
            else:
                item["soft_label"] = torch.nn.functional.one_hot(torch.tensor(label), self.num_classes).float()
        return item

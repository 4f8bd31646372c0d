"""A relabelled set without a copy of the faces: a ``labels.parquet`` table (one row per face, joined by
``sample_id``) plus references to the synthesized set(s) the faces live in::

    manifest.json   {"format": "synfer-labels/1", "labels": "labels.parquet", "count",
                     "sources": [{"path" (relative to this folder), "absolute", "identity", "count"}], "meta"}
    labels.parquet  sample_id, probs/<voter>, final_label, soft_label, is_soft, confidence, voters_agree, kept
    README.md       dataset card

A source is found by its relative path first (a run folder moved or reused as a whole keeps working), then by
its absolute one. It must still be the set that was voted on (its ``identity``: the synthesis fingerprint, else a
digest of its manifest) and every id must join; otherwise a DataError names the files, never a silent mix of one
set's faces with another's labels.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

from datamodules.errors import DataError, DataFileNotFound

LABELS_FORMAT = "synfer-labels/1"
LABELS_FILE = "labels.parquet"
RERUN = "rerun stage=relabel to vote on the set as it is now"


def set_identity(directory: str | Path, manifest: dict) -> str:
    """What an image set is: its synthesis fingerprint (covers config and generator; a redone shard is
    byte-identical), else its shards, meta and the sizes of its Arrow files (a set rewritten with other faces, e.g.
    a retrained generator's evaluation faces, differs in them)."""
    meta = manifest.get("meta", {})
    if meta.get("fingerprint"):
        return f"fingerprint:{meta['fingerprint']}"
    shards = Path(directory) / "shards"
    sizes = {s["name"]: sorted(f.stat().st_size for f in (shards / s["name"]).glob("*.arrow"))
             for s in manifest["shards"]}
    body = {"shards": sorted((s["name"], s["count"], sizes[s["name"]]) for s in manifest["shards"]), "meta": meta}
    return "manifest:" + hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_labels_manifest(manifest: dict, path: Path) -> None:
    sources = manifest.get("sources")
    if (not isinstance(manifest.get("labels"), str) or not isinstance(manifest.get("count"), int)
            or not isinstance(sources, list) or not sources
            or not all(isinstance(s, dict) and {"path", "absolute", "identity", "count"} <= set(s) for s in sources)):
        raise DataError(f"{path} is not a {LABELS_FORMAT} manifest (needs labels, count and sources)")


def write_label_set(directory: str | Path, sources: Sequence[str | Path], labels, meta: dict,
                    card: Optional[str] = None) -> Path:
    """``labels``: a ``datasets.Dataset`` with ``sample_id`` in the order of the sources' rows. Replaces what is in
    ``directory``; the manifest is written last, so a kill leaves no manifest pointing at half a table."""
    from datamodules.synthetic import MANIFEST, read_image_manifest

    directory = Path(directory)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    entries = []
    for source in map(Path, sources):
        manifest = read_image_manifest(source)
        entries.append({"path": os.path.relpath(source.resolve(), directory.resolve()),
                        "absolute": str(source.resolve()), "identity": set_identity(source, manifest),
                        "count": manifest["count"]})
    if len(labels) != sum(e["count"] for e in entries):
        raise ValueError(f"{len(labels)} labels for {sum(e['count'] for e in entries)} faces in {list(sources)}")
    from datamodules.synthetic import _quiet_datasets

    tmp = directory / (LABELS_FILE + ".tmp")
    with _quiet_datasets():
        labels.to_parquet(str(tmp))
    os.replace(tmp, directory / LABELS_FILE)
    manifest = {"format": LABELS_FORMAT, "labels": LABELS_FILE, "count": len(labels), "sources": entries,
                "meta": meta}
    if card is not None:
        from datamodules.face_storage import labels_card

        (directory / "README.md").write_text(labels_card(manifest, card))
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, directory / MANIFEST)
    return directory


def resolve_sources(directory: Path, manifest: dict) -> list[Path]:
    """The referenced image sets, each checked to be the set that was voted on (intact shards included)."""
    from datamodules.synthetic import MANIFEST, read_image_manifest, verify_synthetic

    found = []
    for entry in manifest["sources"]:
        candidates = [(directory / entry["path"]).resolve(), Path(entry["absolute"])]
        seen = []
        for path in dict.fromkeys(candidates):
            if not (path / MANIFEST).is_file():
                seen.append(f"{path} (missing)")
                continue
            identity = set_identity(path, read_image_manifest(path))
            if identity != entry["identity"]:
                try:  # a damaged shard changes a set's identity too: name the damage then
                    verify_synthetic(path)
                    why = f"another set: {identity}, voted on {entry['identity']}"
                except DataError as err:
                    why = f"damaged: {err}"
                seen.append(f"{path} ({why})")
                continue
            found.append(path)
            break
        else:
            raise DataFileNotFound(f"relabelled set {directory / MANIFEST}: its faces are in a synthesized set that is "
                                   f"gone or was remade: {'; '.join(seen)}. Move the set back, or {RERUN}")
    for path in found:
        verify_synthetic(path)
    return found


def read_labels(directory: Path, manifest: dict, columns: Optional[list[str]] = None):
    """The labels table as an in-memory Arrow table (small: no images), its row count checked."""
    import pyarrow.parquet as pq

    path = directory / manifest["labels"]
    if not path.is_file():
        raise DataFileNotFound(f"labels table listed in {directory / 'manifest.json'} is missing: {path}; {RERUN}")
    try:
        table = pq.read_table(path, columns=columns)
    except (OSError, ValueError) as err:
        raise DataError(f"labels table {path} cannot be read ({type(err).__name__}: {err}); {RERUN}") from err
    if table.num_rows != manifest["count"]:
        raise DataError(f"labels table {path} has {table.num_rows} rows, the manifest says {manifest['count']}; "
                        f"{RERUN}")
    if "sample_id" not in table.column_names:
        raise DataError(f"labels table {path} has no sample_id column; {RERUN}")
    return table


def arrow_ids(dataset):
    """The ``sample_id`` column as Arrow (a ``datasets`` Column turned into a list costs ~20 s per million rows)."""
    return dataset.with_format("arrow")["sample_id"]


def join_order(face_ids, label_ids, where: str) -> Optional[list[int]]:
    """None when the labels are in the faces' order; else the label row of each face. Ids that do not join are a
    DataError (``where`` names the files). Ids: Arrow arrays."""
    if face_ids.equals(label_ids):
        return None
    face_ids, label_ids = face_ids.to_pylist(), label_ids.to_pylist()
    position = {sid: i for i, sid in enumerate(label_ids)}
    unlabelled = [sid for sid in face_ids if sid not in position]
    extra = set(label_ids) - set(face_ids)
    if unlabelled or extra or len(position) != len(label_ids) or len(face_ids) != len(label_ids):
        raise DataError(f"{where}: the ids do not join ({len(unlabelled)} face(s) without a label, e.g. "
                        f"{unlabelled[:3]}; {len(extra)} label(s) without a face, e.g. {sorted(extra)[:3]}; "
                        f"{len(label_ids) - len(position)} duplicate label id(s)); {RERUN}")
    return [position[sid] for sid in face_ids]


def _where(directory: Path, manifest: dict, sources: list[Path]) -> str:
    return f"labels {directory / manifest['labels']} vs faces in {[str(p) for p in sources]}"


def verify_label_set(directory: str | Path, manifest: dict) -> dict:
    """Sources there, unchanged and intact; the table readable with its row count; every id joins. No image is
    decoded."""
    from datamodules.synthetic import load_synthetic

    directory = Path(directory)
    sources = resolve_sources(directory, manifest)
    table = read_labels(directory, manifest, ["sample_id"])
    faces = load_synthetic(sources, allow_incomplete=True)
    join_order(arrow_ids(faces), table.column("sample_id"), _where(directory, manifest, sources))
    return manifest


def load_label_set(directory: str | Path, manifest: dict, allow_incomplete: bool = False):
    """The referenced faces with the labels table's columns beside them (one ``datasets.Dataset``, faces still
    memory-mapped from their set)."""
    from datasets import Dataset, concatenate_datasets
    from datasets.table import InMemoryTable

    from datamodules.synthetic import load_synthetic

    directory = Path(directory)
    sources = resolve_sources(directory, manifest)
    faces = load_synthetic(sources, allow_incomplete=allow_incomplete)
    labels = Dataset(InMemoryTable(read_labels(directory, manifest)))
    clash = sorted(set(faces.column_names) & set(labels.column_names) - {"sample_id"})
    if clash:
        raise DataError(f"{_where(directory, manifest, sources)}: the faces' set already has label columns {clash} "
                        "(relabel a synthesized set, not a relabelled one)")
    order = join_order(arrow_ids(faces), arrow_ids(labels), _where(directory, manifest, sources))
    if order is not None:
        labels = labels.select(order)
    return concatenate_datasets([faces, labels.remove_columns("sample_id").flatten_indices()], axis=1)

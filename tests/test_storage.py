"""Storage at scale: a relabelled set is a labels table joined to its synthesized set (no copy of the faces), the
join fails loudly when it cannot hold, faces are stored at the configured size and format, and the sets open with
plain ``datasets`` calls."""
from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.errors import DataError, DataFileNotFound
from datamodules.face_storage import StorageConfig, StorageConfigError, encode_faces, storage_config
from datamodules.label_table import LABELS_FILE, write_label_set
from datamodules.synthetic import (MANIFEST, load_synthetic, read_manifest, verify_synthetic, write_dataset,
                                   write_shard)
from synthetic_fixtures import write_toy_synthetic_set


def _labels(ids: list[str], offset: int = 0):
    """A vote-shaped labels table; final_label = (row + offset) % 7 so a wrong join shows."""
    from datasets import Dataset

    n = len(ids)
    return Dataset.from_dict({"sample_id": ids, "probs/teacher": [[1.0 / 7] * 7] * n,
                              "final_label": [(i + offset) % 7 for i in range(n)],
                              "soft_label": [[1.0 / 7] * 7] * n, "is_soft": [i % 2 == 0 for i in range(n)],
                              "confidence": [0.5] * n, "voters_agree": [True] * n,
                              "kept": [i % 3 != 0 for i in range(n)]})


@pytest.fixture
def labelled(tmp_path):
    """run/synthesize/dataset (faces) + run/relabel/dataset (labels only), as the stages lay them out."""
    faces = tmp_path / "run" / "synthesize" / "dataset"
    ids = write_toy_synthetic_set(faces, n=12, shards=2)
    labels = tmp_path / "run" / "relabel" / "dataset"
    write_label_set(labels, [faces], _labels(ids), {"voters": ["teacher"]}, card="# Synthetic data card\n\nx\n")
    return faces, labels, ids


def _image_bytes(dataset) -> list[bytes]:
    from datasets import Image as ImageFeature

    return [c["bytes"] for c in dataset.cast_column("image", ImageFeature(decode=False))["image"]]


def test_the_relabelled_set_holds_no_faces_and_joins_by_sample_id(labelled):
    faces, labels, ids = labelled
    assert sorted(p.name for p in labels.iterdir()) == ["README.md", LABELS_FILE, MANIFEST]
    source = read_manifest(labels)["sources"][0]
    assert source["path"] == "../../synthesize/dataset" and source["count"] == 12
    joined = load_synthetic(labels)
    assert joined["sample_id"] == ids
    assert _image_bytes(joined) == _image_bytes(load_synthetic(faces))
    assert joined["final_label"] == [i % 7 for i in range(12)] and joined["kept"][:3] == [False, True, True]
    assert verify_synthetic(labels)["format"] == "synfer-labels/1"
    size = lambda d: sum(p.stat().st_size for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert size(labels) < size(faces) / 2


def test_labels_stored_in_another_order_still_join_row_by_row(tmp_path):
    faces = tmp_path / "faces"
    ids = write_toy_synthetic_set(faces, n=8, shards=1)
    table = _labels(ids).select(list(reversed(range(8))))
    write_label_set(tmp_path / "labels", [faces], table, {"voters": ["teacher"]})
    joined = load_synthetic(tmp_path / "labels")
    assert joined["sample_id"] == ids and joined["final_label"] == [i % 7 for i in range(8)]


def test_a_run_folder_moved_as_a_whole_still_loads(labelled, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.move(str(tmp_path / "run"), str(moved))
    assert len(load_synthetic(moved / "relabel" / "dataset")) == 12


def _move_source(faces, labels, tmp_path):
    shutil.move(str(faces), str(tmp_path / "moved"))


def _remake_source(faces, labels, tmp_path):  # another config's set with the same ids: must not take these labels
    shutil.rmtree(faces)
    write_toy_synthetic_set(faces, n=12, shards=2)
    from datamodules.synthetic import update_manifest

    update_manifest(faces, fingerprint="another-config")


def _rewrite_faces(faces, labels, tmp_path):  # same ids, count and meta, other faces (e.g. a retrained generator's)
    from datasets import load_from_disk

    for shard in read_manifest(faces)["shards"]:
        rows = load_from_disk(str(faces / "shards" / shard["name"])).remove_columns("image").to_dict()
        rows["image"] = encode_faces(torch.zeros(len(rows["sample_id"]), 3, 8, 8))
        write_shard(faces, shard["name"], rows, replace=True)


def _drop_a_label(faces, labels, tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(labels / LABELS_FILE)
    ids = table.column("sample_id").to_pylist()
    ids[3] = "syn-nowhere"
    pq.write_table(table.set_column(0, "sample_id", __import__("pyarrow").array(ids)), labels / LABELS_FILE)


def _delete_the_table(faces, labels, tmp_path):
    (labels / LABELS_FILE).unlink()


def _truncate_the_table(faces, labels, tmp_path):
    data = (labels / LABELS_FILE).read_bytes()
    (labels / LABELS_FILE).write_bytes(data[: len(data) // 2])


def _damage_a_face_shard(faces, labels, tmp_path):
    arrow = sorted((faces / "shards").rglob("*.arrow"))[0]
    arrow.write_bytes(arrow.read_bytes()[:100])


@pytest.mark.parametrize("damage, error, names", [
    (_move_source, DataFileNotFound, "synthesize/dataset (missing)"),
    (_remake_source, DataFileNotFound, "another set"),
    (_rewrite_faces, DataFileNotFound, "another set"),
    (_drop_a_label, DataError, LABELS_FILE),
    (_delete_the_table, DataFileNotFound, LABELS_FILE),
    (_truncate_the_table, DataError, LABELS_FILE),
    (_damage_a_face_shard, DataError, ".arrow"),
])
def test_a_join_that_cannot_hold_is_a_data_error_naming_the_files(labelled, tmp_path, damage, error, names):
    faces, labels, _ = labelled
    damage(faces, labels, tmp_path)
    for read in (load_synthetic, verify_synthetic):
        with pytest.raises(error, match=names.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
            read(labels)


def test_a_relabelled_set_written_with_its_faces_still_loads(tmp_path):
    """Sets written before labels tables: one image set carrying the label columns."""
    from datasets import concatenate_datasets

    faces = tmp_path / "faces"
    ids = write_toy_synthetic_set(faces, n=6, shards=1)
    old = concatenate_datasets([load_synthetic(faces), _labels(ids).remove_columns("sample_id")], axis=1)
    write_dataset(tmp_path / "old", old, meta={"voters": ["teacher"]})
    loaded = load_synthetic(tmp_path / "old")
    assert loaded["final_label"] == [i % 7 for i in range(6)] and verify_synthetic(tmp_path / "old")


def test_a_labels_only_set_cannot_take_shards_or_be_voted_on_again(labelled):
    from datamodules.synthetic import read_image_manifest

    _, labels, _ = labelled
    with pytest.raises(DataError, match="relabelled set"):
        read_image_manifest(labels)
    with pytest.raises(DataError, match="relabelled set"):
        write_shard(labels, "shard-x", {c: [] for c in ("image", "sample_id", "target_label", "target_aus",
                                                         "au_mask", "caption")})


def test_the_sets_open_with_plain_datasets_calls(labelled):
    """The README front matter points load_dataset at the files: arrow shards for faces, parquet for labels."""
    from datasets import load_dataset

    from datamodules.face_storage import synthetic_card

    faces, labels, ids = labelled
    manifest = read_manifest(faces)
    (faces / "README.md").write_text(synthetic_card(manifest, ["neutral"], {"generator": "g"}))
    streamed = load_dataset(str(faces), split="train", streaming=True)
    assert [r["sample_id"] for r in streamed] == ids
    table = load_dataset(str(labels), "labels", split="train", streaming=True)
    assert [r["sample_id"] for r in table] == ids
    card = (labels / "README.md").read_text()
    assert "../../synthesize/dataset" in card and "## Data card" in card


# ---------------------------------------------------------------------- stored resolution and format
def _faces(n=2, size=32):
    torch.manual_seed(0)
    return torch.rand(n, 3, size, size)


@pytest.mark.parametrize("storage, pil_format, size", [
    (StorageConfig(), "PNG", 32),
    (StorageConfig(image_size=16), "PNG", 16),
    (StorageConfig(format="jpeg", quality=80), "JPEG", 32),
    (StorageConfig(image_size=24, format="webp", quality=80), "WEBP", 24),
])
def test_faces_are_encoded_at_the_configured_size_and_format(storage, pil_format, size):
    cells = encode_faces(_faces(), "rgb", storage)
    images = [Image.open(io.BytesIO(c["bytes"])) for c in cells]
    assert [(i.format, i.size, i.mode) for i in images] == [(pil_format, (size, size), "RGB")] * 2
    assert encode_faces(_faces(), "rgb", storage) == cells  # deterministic


def test_png_is_lossless_and_lower_jpeg_quality_is_smaller():
    faces = _faces(1)
    decoded = np.asarray(Image.open(io.BytesIO(encode_faces(faces)[0]["bytes"])))
    assert np.array_equal(decoded, (faces[0] * 255).round().byte().permute(1, 2, 0).numpy())
    low, high = (len(encode_faces(faces, "rgb", StorageConfig(format="jpeg", quality=q))[0]["bytes"])
                 for q in (30, 95))
    assert low < high


@pytest.mark.parametrize("values, field", [
    ({"format": "gif"}, "format"), ({"quality": 0}, "quality"), ({"quality": 101}, "quality"),
    ({"image_size": 4}, "image_size"), ({"image_size": 64.0}, "image_size"), ({"size": 64}, "size"),
])
def test_bad_storage_settings_name_their_field(values, field):
    with pytest.raises(StorageConfigError) as err:
        storage_config(values)
    assert err.value.field == field


def test_the_dataset_card_records_counts_provenance_and_storage(tmp_path):
    from datamodules.face_storage import synthetic_card

    manifest = {"count": 3, "meta": {"class_counts": [2, 1], "fingerprint": "abc", "complete": True,
                                     "storage": StorageConfig(64, "jpeg", 90).settings(512)}}
    card = synthetic_card(manifest, ["neutral", "happy"], {"generator": "/g", "sample": {"steps": 2}})
    assert "| neutral | 2 |" in card and "| happy | 1 |" in card and "jpeg 64 px, quality 90" in card
    assert "`/g`" in card and "abc" in card

"""Bad input found when images are loaded: AffectNet face boxes outside the image, corrupt or vanished image files.
Each is left out (never a black face, never another record in its place), counted, and warned about once."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from bad_data_helpers import SIZES, copy, corrupt_test_images, read_warned, set_box, toy_export
from datamodules.batch import RecordDataset, collate_fer, load_record_image
from datamodules.formats import read_split
from datamodules.real import RealFERDataModule


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return toy_export(tmp_path_factory.mktemp("export"))


# ------------------------------------------------------------------ AffectNet face boxes
BOX_CASES = [  # (id, box edit from (x, y, w, h), read-time skip?)
    ("zero-width", lambda x, y, w, h: (x, y, 0, h), True),
    ("negative-height", lambda x, y, w, h: (x, y, w, -5), True),
    ("wholly-left", lambda x, y, w, h: (-1000, y, w, h), True),
    ("wholly-above", lambda x, y, w, h: (x, -1000, w, h), True),
    ("wholly-right", lambda x, y, w, h: (500, y, w, h), False),  # needs the image size: found at load time
    ("wholly-below", lambda x, y, w, h: (x, 500, w, h), False),
]


@pytest.mark.parametrize("case,edit,at_read", BOX_CASES, ids=[c[0] for c in BOX_CASES])
def test_bad_face_box_is_counted_never_a_black_face(export, tmp_path, case, edit, at_read):
    root = copy(export, "affectnet", tmp_path)
    n = len(read_split("affectnet", root, "train").records)
    set_box(root, 3, edit)
    if at_read:
        result, msg = read_warned("affectnet", root, "train")
        assert result.skipped == {"bad_face_box": 1} and len(result.records) == n - 1
        assert "face box" in msg and "training.csv:3" in msg
        return
    result = read_split("affectnet", root, "train")
    bad = next(i for i, r in enumerate(result.records) if r.meta["line"] == 3)
    ds = RecordDataset(result.records, lambda im: torch.zeros(3, 4, 4), num_aus=12, num_classes=8,
                       name="affectnet train")
    batch = collate_fer([ds[i] for i in range(len(ds))])
    assert result.records[bad].sample_id not in batch["sample_id"] and len(batch["sample_id"]) == n - 1
    with pytest.warns(UserWarning, match="no pixels inside"):
        ds.warn_new_failures()
    assert ds.unreadable() == {"bad_face_box": 1}


def test_face_box_partly_outside_is_clipped_to_the_image(export, tmp_path):
    root = copy(export, "affectnet", tmp_path)
    set_box(root, 3, lambda x, y, w, h: (-7, y, x + w + 7, h))  # reaches 7 px past the left edge
    rec = next(r for r in read_split("affectnet", root, "train").records if r.meta["line"] == 3)
    x, y, w, h = rec.crop
    face = np.asarray(load_record_image(rec))
    assert face.shape[:2] == (h, w - 7)  # clipped, not padded with black
    with Image.open(rec.image) as full:
        assert np.array_equal(face, np.asarray(full.convert("RGB"))[y:y + h, : w - 7])


# ------------------------------------------------------------------ unreadable images at load time
@pytest.mark.parametrize("num_workers", [0, 1])
def test_unreadable_images_are_left_out_counted_and_warned_once(export, tmp_path, num_workers):
    root = corrupt_test_images(export, tmp_path, 2)
    dm = RealFERDataModule(format="imagefolder", root=str(root), image_size=32, batch_size=4, augment={},
                           num_workers=num_workers)
    dm.setup()
    n = len(dm.records["test"])
    loader = dm.test_dataloader()
    for epoch in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            served = [s for batch in loader for s in batch["sample_id"]]
        msgs = [str(w.message) for w in caught if "unreadable" in str(w.message)]
        assert len(msgs) == (1 if epoch == 0 else 0), msgs  # one warning with the count, none for known ones
        if epoch == 0:
            assert "2 unreadable image(s)" in msgs[0]
        assert len(served) == len(set(served)) == n - 2  # left out, nothing served twice in their place
    summary = dm.summary()
    assert summary["skipped"] == {"test/corrupt_image": 2}  # distinct records, not once per epoch
    assert summary["test_size"] == n - 2 and sum(summary["test_class_counts"]) == n - 2


def test_a_batch_of_only_unreadable_images_is_empty_not_filled(export, tmp_path):
    root = corrupt_test_images(export, tmp_path, 1)
    dm = RealFERDataModule(format="imagefolder", root=str(root), image_size=32, batch_size=1, augment={})
    dm.setup()
    with pytest.warns(UserWarning, match="unreadable"):
        batches = list(dm.test_dataloader())
    sizes = [b["image"].shape[0] for b in batches]
    assert sizes.count(0) == 1 and sizes.count(1) == len(batches) - 1
    empty = batches[sizes.index(0)]
    assert empty["image"].shape == (0, 3, 32, 32) and empty["label"].shape == (0,) and empty["sample_id"] == []


def test_verify_images_counts_bad_face_boxes_up_front(export, tmp_path):
    root = copy(export, "affectnet", tmp_path)
    set_box(root, 3, lambda x, y, w, h: (500, y, w, h))
    dm = RealFERDataModule(format="affectnet", root=str(root), image_size=32, augment={}, verify_images=True)
    with pytest.warns(UserWarning, match="bad_face_box"):
        dm.setup()
    assert dm.summary()["skipped"] == {"train/bad_face_box": 1}


@pytest.mark.slow
def test_unreadable_images_reach_metrics_json_through_the_teacher_stage(export, tmp_path, tiny_cfg):
    """Lightning, DataLoader workers and the classifier stage: the decode-time counts land in metrics.json."""
    import json

    from lightning_modules.stages.classifier_stage import run_classifier_stage

    root = corrupt_test_images(export, tmp_path, 2)
    next((root / "train").rglob("*.png")).write_bytes(b"\x89PNG truncated")
    n_test = len(read_split("imagefolder", root, "test").records)
    cfg = tiny_cfg("stage=teacher", "data=imagefolder", f"data.root={root}", "data.protocol=8",
                   "data.num_workers=1", "data.augment.random_erasing=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_classifier_stage(cfg, "teacher")
    metrics = json.loads((tmp_path / "run" / "teacher" / "metrics.json").read_text())
    assert metrics["data/skipped/test/corrupt_image"] == 2 and metrics["data/skipped/train/corrupt_image"] == 1
    assert metrics["data/test_size"] == n_test - 2 and metrics["data/train_size"] == SIZES["train"] - 1

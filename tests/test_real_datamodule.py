"""The toy faces exported in every public format flow through RealFERDataModule and the CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, TINY
from datamodules.real import RealFERDataModule

SIZES = {"train": 40, "val": 12, "test": 24}


@pytest.fixture(scope="module")
def toy_export(tmp_path_factory):
    from datamodules.toyfaces import ToyFacesConfig
    from datamodules.toyfaces_export import export_toyfaces

    out = tmp_path_factory.mktemp("toy_export")
    result = export_toyfaces(ToyFacesConfig(image_size=48, seed=3), SIZES, out)
    return result


def _dm(fmt, root, **kw):
    dm = RealFERDataModule(format=fmt, root=str(root), image_size=32, batch_size=8, augment={}, **kw)
    dm.setup()
    return dm


@pytest.mark.parametrize("fmt", ["affectnet", "affectnet_npy", "rafdb", "fer2013", "ferplus", "imagefolder"])
def test_every_format_loads_through_the_datamodule(toy_export, fmt):
    protocol = 7 if fmt in ("rafdb", "fer2013") else 8
    dm = _dm(fmt, toy_export[fmt], protocol=protocol, openface=str(toy_export["openface"]),
             captions=str(toy_export["captions"]))
    counts = toy_export.counts[fmt]
    if fmt in ("affectnet", "affectnet_npy", "rafdb"):  # no usable val split: carved from train
        assert len(dm.records["train"]) + len(dm.records["val"]) == counts["train"]
        assert len(dm.records["val"]) == round(0.1 * counts["train"])
    else:
        assert len(dm.records["train"]) == counts["train"] and len(dm.records["val"]) == counts["val"]
    # the test split is read exactly as exported
    assert len(dm.records["test"]) == counts["test"]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert float(batch["image"].min()) >= -1 and float(batch["image"].max()) <= 1
    assert batch["label"].dtype == torch.long and int(batch["label"].max()) < protocol
    assert batch["aus"].shape == (8, 12) and batch["au_mask"].all(), "OpenFace AUs did not join"
    assert all(c for c in batch["caption"]), "captions did not join"
    assert len(set(batch["sample_id"])) == 8


def test_seven_class_protocol_drops_contempt_and_counts_it(toy_export):
    dm8 = _dm("imagefolder", toy_export["imagefolder"], protocol=8)
    dm7 = _dm("imagefolder", toy_export["imagefolder"], protocol=7)
    n_contempt = sum(r.label == 7 for r in dm8.records["test"])
    assert n_contempt > 0, "fixture has no contempt face: the test would prove nothing"
    assert len(dm7.records["test"]) == len(dm8.records["test"]) - n_contempt
    assert dm7.skipped["test/outside_7_class_protocol"] == n_contempt


def test_ferplus_distribution_gives_soft_labels(toy_export):
    dm = _dm("ferplus", toy_export["ferplus"], protocol=8, soft_labels=True,
             format_options={"label_mode": "distribution"})
    batch = next(iter(dm.test_dataloader()))
    assert batch["soft_label"].shape == (8, 8)
    assert torch.allclose(batch["soft_label"].sum(1), torch.ones(8))
    assert (batch["soft_label"].max(1).values < 1).any()  # votes are spread, not one-hot


def test_train_limit_and_carved_val_are_disjoint(toy_export):
    dm = _dm("rafdb", toy_export["rafdb"], protocol=7, train_limit=10)
    assert len(dm.records["train"]) == 10
    train_ids = {r.sample_id for r in dm.records["train"]}
    assert not train_ids & {r.sample_id for r in dm.records["val"]}


def test_missing_root_and_sidecar_are_named_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        RealFERDataModule(format="fer2013", root=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="data.root must be set"):
        RealFERDataModule(format="fer2013", root=None)
    with pytest.raises(FileNotFoundError, match="data.openface"):
        RealFERDataModule(format="toy", openface=str(tmp_path / "aus.csv"))


def test_corrupt_image_is_skipped_with_one_warning(toy_export, tmp_path):
    import shutil

    root = tmp_path / "imagefolder"
    shutil.copytree(toy_export["imagefolder"], root)
    bad = sorted((root / "test").rglob("*.png"))[:2]
    for path in bad:
        path.write_bytes(b"not a png")
    dm = _dm("imagefolder", root, protocol=8, eval_batch_size=64)
    with pytest.warns(UserWarning, match="unreadable image") as record:
        batches = list(dm.test_dataloader())
    assert len([w for w in record if "unreadable image" in str(w.message)]) == 1
    assert len(dm.datasets["test"].corrupt) == 2
    served = [s for b in batches for s in b["sample_id"]]
    assert len(served) == len(set(served)) == len(dm.records["test"]) - 2  # left out, not replaced
    summary = dm.summary()
    assert summary["skipped"]["test/corrupt_image"] == 2 and summary["test_size"] == len(dm.records["test"]) - 2


@pytest.mark.slow
def test_cli_trains_a_teacher_on_an_exported_public_format(toy_export, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "train.py", "stage=teacher", "data=fer2013", f"data.root={toy_export['fer2013']}",
           *[o for o in TINY if not o.startswith("data.toy")], "data.num_workers=0", f"output_root={tmp_path}",
           "experiment_name=fer"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "fer" / "teacher" / "metrics.json").read_text())
    assert metrics["data/format"] == "fer2013" and metrics["data/test_size"] == toy_export.counts["fer2013"]["test"]


def test_cli_config_error_exits_2_naming_the_key(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "train.py", "stage=teacher", "teacher.model.backbone=not_a_net", "logger=csv",
           f"output_root={tmp_path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "teacher.model.backbone" in proc.stderr

"""`stage=relabel` and the synthetic store: voters predict every face once, the vote is stored, nothing is lost."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY
from datamodules.synthetic import MANIFEST, SyntheticFERDataset, load_synthetic, read_manifest, write_shard
from lightning_modules.run.runtime import ConfigError
from synthetic_fixtures import write_toy_synthetic_set

N_FACES = 40  # write_toy_synthetic_set's default


@pytest.fixture(scope="module")
def voters(tmp_path_factory):
    """Two tiny timm teachers trained for one epoch with different seeds (they will disagree on some faces)."""
    from conftest import compose
    from lightning_modules.stages.classifier_stage import run_classifier_stage

    paths = []
    for seed in (0, 1):
        run = tmp_path_factory.mktemp(f"voter{seed}")
        cfg = compose([*TINY, f"seed={seed}"], run / "run")
        run_classifier_stage(cfg, "teacher")
        paths.append(run / "run" / "teacher" / "teacher.ckpt")
    return paths


@pytest.fixture
def synthetic_set(tmp_path):
    directory = tmp_path / "synthetic"
    return directory, write_toy_synthetic_set(directory)


def _relabel_overrides(synthetic_dir, voters, threshold=0.0):  # 1-epoch voters are near-uniform
    return [f"relabel.input={synthetic_dir}", f"relabel.voters.feranno.checkpoint={voters[0]}",
            f"relabel.voters.teacher.checkpoint={voters[1]}", f"relabel.threshold={threshold}",
            "relabel.batch_size=16"]


# ---------------------------------------------------------------------- the store
def test_store_roundtrip_and_reader(synthetic_set):
    directory, ids = synthetic_set
    manifest = read_manifest(directory)
    assert manifest["count"] == N_FACES and [s["count"] for s in manifest["shards"]] == [20, 20]
    dataset = load_synthetic(directory)
    assert list(dataset["sample_id"]) == ids
    reader = SyntheticFERDataset(dataset, image_size=32, num_classes=8)
    item = reader[3]
    assert item["image"].shape == (3, 32, 32) and -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["label"] == dataset[3]["target_label"] and item["aus"].shape == (12,)
    assert "soft_label" not in item


def test_store_errors(synthetic_set, tmp_path):
    directory, _ = synthetic_set
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_synthetic(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="already exists"):
        write_toy_synthetic_set(directory, n=4, shards=1)
    with pytest.raises(ValueError, match="lacks columns"):
        write_shard(tmp_path / "bad", "s0", {"image": [], "sample_id": []})
    (directory / MANIFEST).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_synthetic(directory)


def test_truncated_or_missing_shard_is_detected(synthetic_set):
    directory, _ = synthetic_set
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["shards"][0]["count"] = 21
    (directory / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest says 21"):
        load_synthetic(directory)
    manifest["shards"][0]["name"] = "gone"
    (directory / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_synthetic(directory)


# ---------------------------------------------------------------------- the stage
def test_relabel_stage_writes_votes_and_data_card(tiny_cfg, voters, synthetic_set):
    from lightning_modules.paradigms.teacher import load_fer_classifier
    from lightning_modules.stages.relabel_stage import run_relabel_stage

    directory, ids = synthetic_set
    cfg = tiny_cfg(*_relabel_overrides(directory, voters))
    metrics = run_relabel_stage(cfg)
    out = Path(cfg.paths.run_dir) / "relabel"
    relabelled = load_synthetic(out / "dataset")
    assert list(relabelled["sample_id"]) == ids                       # every face, once, in order
    for column in ("probs/feranno", "probs/teacher", "final_label", "soft_label", "is_soft", "kept"):
        assert column in relabelled.column_names
    # the stored probabilities are the voters' own predictions on the stored images
    voter = load_fer_classifier(voters[1])
    reader = SyntheticFERDataset(relabelled, 32, 8, use_relabel=False, kept_only=False)
    batch = torch.stack([reader[i]["image"] for i in range(4)])
    with torch.no_grad():
        expected = voter(batch)["logits"].softmax(-1)
    assert torch.allclose(torch.tensor(relabelled["probs/teacher"][:4]), expected, atol=1e-5)
    card = json.loads((out / "data_card.json").read_text())
    assert card["total"] == N_FACES and card["kept"] + card["dropped"] == N_FACES
    assert sum(row["before"] for row in card["per_class"]) == N_FACES
    assert "condition" in (out / "data_card.md").read_text().lower()
    assert card["kept"] > 0
    assert metrics["data_card"]["total"] == N_FACES
    # the conditioned label voted (the default), with weight 1 next to the two teachers' 1 each: the stored labels
    # are that vote on the stored probabilities, and the card counts every face under exactly one rule
    from lightning_modules.labeling.voting import ensemble_vote

    assert card["condition_voter"] == {"enabled": True, "weight": 1.0}
    cond = torch.tensor(relabelled["target_label"])
    probs = torch.stack([torch.tensor(relabelled["probs/feranno"]), torch.tensor(relabelled["probs/teacher"])])
    vote = ensemble_vote(probs, 0.0, condition=cond, condition_weight=1.0)
    assert relabelled["final_label"] == vote.final_label.tolist()
    assert relabelled["voters_agree"] == vote.voters_agree.tolist()
    assert torch.allclose(torch.tensor(relabelled["soft_label"]), vote.soft_label.float(), atol=1e-6)
    teachers_on_cond = (probs.argmax(-1) == cond).all(0)
    assert card["hard"] == int(teachers_on_cond.sum()) and card["hard"] + card["soft"] + card["dropped"] == N_FACES
    assert card["hard_share"] == pytest.approx(card["hard"] / N_FACES)
    assert [r["hard"] + r["soft"] + r["dropped"] for r in card["per_class"]] == [r["before"] for r in card["per_class"]]
    assert read_manifest(out / "dataset")["meta"]["condition_voter"] == {"enabled": True, "weight": 1.0}
    assert "| all voters agree: hard label |" in (out / "data_card.md").read_text()
    # no copy of the faces: a labels table + a reference to the input set, the data card as the set's README.md
    assert sorted(p.name for p in (out / "dataset").iterdir()) == ["README.md", "labels.parquet", MANIFEST]
    assert read_manifest(out / "dataset")["sources"][0]["absolute"] == str(directory.resolve())
    assert "| all voters agree: hard label |" in (out / "dataset" / "README.md").read_text()
    # the reader serves kept faces only, with the relabelled (soft) labels
    kept = SyntheticFERDataset(relabelled, 32, 8)
    assert len(kept) == card["kept"]
    if len(kept):
        assert "soft_label" in kept[0] and kept[0]["soft_label"].sum() == pytest.approx(1.0, abs=1e-5)


def test_relabel_threshold_one_drops_but_keeps_every_row(tiny_cfg, voters, synthetic_set):
    from lightning_modules.stages.relabel_stage import run_relabel_stage

    directory, _ = synthetic_set
    cfg = tiny_cfg(*_relabel_overrides(directory, voters, threshold=1.0))
    run_relabel_stage(cfg)
    relabelled = load_synthetic(Path(cfg.paths.run_dir) / "relabel" / "dataset")
    assert len(relabelled) == N_FACES and not any(relabelled["kept"])


@pytest.mark.parametrize("weight", [0.0, "off"])
def test_relabel_without_the_condition_voter_is_the_teachers_vote(tiny_cfg, voters, synthetic_set, weight):
    from lightning_modules.labeling.voting import ensemble_vote
    from lightning_modules.stages.relabel_stage import card_metrics, run_relabel_stage

    directory, _ = synthetic_set
    switch = "relabel.condition_voter.enabled=false" if weight == "off" else f"relabel.condition_voter.weight={weight}"
    cfg = tiny_cfg(*_relabel_overrides(directory, voters), switch)
    card = run_relabel_stage(cfg)["data_card"]
    relabelled = load_synthetic(Path(cfg.paths.run_dir) / "relabel" / "dataset")
    probs = torch.stack([torch.tensor(relabelled["probs/feranno"]), torch.tensor(relabelled["probs/teacher"])])
    teachers = ensemble_vote(probs, 0.0)
    assert relabelled["final_label"] == teachers.final_label.tolist()
    assert card["hard"] == int(teachers.voters_agree.sum())
    assert card["condition_voter"] == ({"enabled": False, "weight": None} if weight == "off"
                                       else {"enabled": True, "weight": 0.0})
    logged = card_metrics(card)
    assert logged["relabel/hard"] == card["hard"] and logged["relabel/dropped_share"] == card["dropped_share"]
    row = card["per_class"][0]
    assert logged[f"relabel/per_class/{row['class']}/soft"] == row["soft"]


def test_a_conditioned_label_outside_the_voters_classes_is_a_data_error(tiny_cfg, voters, synthetic_set, tmp_path):
    from datamodules.errors import DataError
    from datamodules.synthetic import write_dataset
    from lightning_modules.stages.relabel_stage import run_relabel_stage

    directory, _ = synthetic_set
    bad = load_synthetic(directory).map(lambda row, i: {"target_label": 9 if i == 3 else row["target_label"]},
                                        with_indices=True)
    write_dataset(tmp_path / "bad", bad)
    cfg = tiny_cfg(*_relabel_overrides(tmp_path / "bad", voters))
    with pytest.raises(DataError, match=r"relabel\.input .*bad.*1 face\(s\) have a target_label outside .*row 3: 9"):
        run_relabel_stage(cfg)
    assert not (Path(cfg.paths.run_dir) / "relabel" / "dataset").exists()


@pytest.mark.parametrize("override, key", [
    ("relabel.condition_voter.weight=-1", "relabel.condition_voter.weight"),
    ("relabel.condition_voter.weight=.nan", "relabel.condition_voter.weight"),
    ("relabel.condition_voter.weight=heavy", "relabel.condition_voter.weight"),
    ("relabel.condition_voter.enabled=sometimes", "relabel.condition_voter.enabled"),
    ("~relabel.condition_voter", "relabel.condition_voter"),
    ("relabel.input=/nowhere", "relabel.input"),
    ("relabel.voters.teacher.checkpoint=/nowhere.ckpt", "relabel.voters.teacher.checkpoint"),
    ("relabel.threshold=1.5", "relabel.threshold"),
    ("relabel.voters.teacher.weight=-1", "relabel.voters.teacher.weight"),
])
def test_relabel_config_errors(tiny_cfg, voters, synthetic_set, override, key):
    from lightning_modules.stages.relabel_stage import run_relabel_stage

    directory, _ = synthetic_set
    cfg = tiny_cfg(*_relabel_overrides(directory, voters), override)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_relabel_stage(cfg)


def _truncate_shard(directory: Path) -> Path:
    arrow = next((directory / "shards" / "shard-00001").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-64])
    return arrow


def test_a_truncated_shard_is_a_data_error_naming_its_file(synthetic_set):
    """pyarrow's own error names no file; the store's names the shard and the fix."""
    from datamodules.errors import DataError
    from datamodules.synthetic import verify_synthetic

    directory, _ = synthetic_set
    arrow = _truncate_shard(directory)
    for read in (load_synthetic, verify_synthetic):
        with pytest.raises(DataError, match=rf"synthetic shard {re.escape(str(arrow))} cannot be read .*rerun"):
            read(directory)


def test_a_failing_relabel_rerun_keeps_the_finished_run(tiny_cfg, voters, synthetic_set):
    from datamodules.errors import DataError
    from lightning_modules.stages.relabel_stage import run_relabel_stage

    directory, _ = synthetic_set
    cfg = tiny_cfg(*_relabel_overrides(directory, voters))
    run_relabel_stage(cfg)
    out = Path(cfg.paths.run_dir) / "relabel"

    def snapshot() -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    before = snapshot()
    assert {"stage_done.json", "metrics.json", "data_card.json", "dataset/manifest.json"} <= set(before)
    with pytest.raises(ConfigError, match="trainer"):
        run_relabel_stage(tiny_cfg(*_relabel_overrides(directory, voters), "trainer.devices=0"))
    assert snapshot() == before
    arrow = _truncate_shard(directory)           # its input damaged: refused before anything is cleared
    with pytest.raises(DataError, match=re.escape(str(arrow))):
        run_relabel_stage(cfg)
    assert snapshot() == before


@pytest.mark.slow
@pytest.mark.ddp
def test_relabel_under_two_process_ddp_covers_every_id_once(tmp_path, voters, synthetic_set):
    directory, ids = synthetic_set
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", "stage=relabel", "trainer=ddp_cpu", *TINY, *_relabel_overrides(directory, voters),
           f"output_root={tmp_path}", "experiment_name=ddp"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "ddp" / "relabel"
    assert json.loads((out / "metrics.json").read_text())["world_size"] == 2
    parts = [torch.load(out / "predictions" / f"rank{r}.pt")["sample_id"] for r in (0, 1)]
    assert parts[0] and parts[1] and not set(parts[0]) & set(parts[1])   # both ranks worked, on distinct faces
    relabelled = load_synthetic(out / "dataset")
    assert list(relabelled["sample_id"]) == ids


def test_merge_predictions_orders_by_id_and_rejects_duplicates_and_gaps(tmp_path):
    from lightning_modules.stages.relabel_stage import merge_predictions

    probs = torch.softmax(torch.randn(2, 4, 3), -1)  # 2 voters, 4 faces
    ids = ["a", "b", "c", "d"]

    def write(parts):
        for rank, (names, cols) in enumerate(parts):
            torch.save({"sample_id": names, "probs": probs[:, cols]}, tmp_path / f"rank{rank}.pt")

    write([(["c", "a"], [2, 0]), (["b", "d"], [1, 3])])  # interleaved, as a distributed sampler splits
    assert torch.equal(merge_predictions(tmp_path, 2, ids), probs)
    write([(["c", "a"], [2, 0]), (["a", "d"], [0, 3])])
    with pytest.raises(RuntimeError, match="more than once"):
        merge_predictions(tmp_path, 2, ids)
    write([(["c", "a"], [2, 0]), (["d"], [3])])
    with pytest.raises(RuntimeError, match="not predicted"):
        merge_predictions(tmp_path, 2, ids)


def test_voters_with_different_class_counts_are_a_config_error(tiny_cfg, voters, synthetic_set, tmp_path):
    from lightning_modules.paradigms.student import FERStudent
    from lightning_modules.stages.relabel_stage import run_relabel_stage

    four = FERStudent(backbone="resnet18", num_classes=4, channels_last=False)
    ckpt = {"state_dict": four.state_dict(), "hyper_parameters": dict(four.hparams),
            "fer_classifier_class": "lightning_modules.paradigms.student.FERStudent",
            "pytorch-lightning_version": "2.6.0"}
    torch.save(ckpt, tmp_path / "four.ckpt")
    directory, _ = synthetic_set
    cfg = tiny_cfg(*_relabel_overrides(directory, voters), f"relabel.voters.teacher.checkpoint={tmp_path / 'four.ckpt'}")
    with pytest.raises(ConfigError, match="number of classes"):
        run_relabel_stage(cfg)


def test_relabelled_samples_are_logged_as_a_wandb_table(tiny_cfg, voters, synthetic_set):
    """DESIGN §4 logging: a table of synthetic faces with their conditioned and final labels (offline wandb run)."""
    from lightning_modules.stages.relabel_stage import run_relabel_stage

    directory, _ = synthetic_set
    cfg = tiny_cfg(*_relabel_overrides(directory, voters), "logger=default", "relabel.log_samples=5")
    run_relabel_stage(cfg)
    run = next((Path(cfg.paths.run_dir) / "relabel" / "wandb").glob("offline-run-*"))
    tables = list(run.glob("files/media/table/relabel/samples*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["image", "sample_id", "conditioned", "final", "confidence", "soft", "kept"]
    assert len(table["data"]) == 5 and table["data"][0][1] == "syn-0-0"

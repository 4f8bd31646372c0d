"""`stage=synthesize`: plan -> sharded synthetic set; resumable after a kill, identical on 1 or 2 processes,
protected against mixing configs in one folder."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO, TINY
from datamodules.synthetic import MANIFEST, load_synthetic, read_manifest
from lightning_modules.run.runtime import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory) -> Path:
    """An untrained tiny generator saved as a pipeline folder, as stage=generator leaves it."""
    import hydra

    from conftest import compose

    directory = tmp_path_factory.mktemp("generator") / "pipeline"
    cfg = compose(TINY, directory.parent)
    torch.manual_seed(0)
    model = hydra.utils.instantiate(cfg.generator.model, num_classes=8, _convert_="all")
    model.save_generator(directory)
    return directory


@pytest.fixture
def guide_ckpt(untrained_teacher_ckpt):
    return untrained_teacher_ckpt


def _overrides(generator_dir, size=20, chunk=8, batch=4, steps=2):
    return [f"synthesis.generator_path={generator_dir}", f"synthesis.plan.size={size}", "synthesis.plan.scale=null",
            f"synthesis.chunk_size={chunk}", f"synthesis.batch_size={batch}", f"synthesis.sample.steps={steps}",
            "synthesis.progress=false"]


def _image_bytes(directory: Path) -> list[tuple[str, bytes]]:
    dataset = load_synthetic(directory).cast_column("image", __import__("datasets").Image(decode=False))
    return list(zip(dataset["sample_id"], (img["bytes"] for img in dataset["image"])))


def test_synthesize_writes_the_plan_as_shards_and_skips_when_done(tiny_cfg, generator_dir, caplog):
    from lightning_modules.stages.synthesize_stage import checked_plan, run_synthesize_stage

    cfg = tiny_cfg(*_overrides(generator_dir))
    metrics = run_synthesize_stage(cfg)
    out = Path(cfg.paths.run_dir) / "synthesize" / "dataset"
    manifest = read_manifest(out)
    assert [(s["name"], s["count"]) for s in manifest["shards"]] == [
        ("chunk-000000", 8), ("chunk-000001", 8), ("chunk-000002", 4)]
    assert manifest["meta"]["complete"] is True and manifest["count"] == 20
    dataset = load_synthetic(out)
    plan = checked_plan(cfg)[0]  # the plan with the generator's caption builder (its captions.json)
    rows = plan.rows(range(20))
    assert list(dataset["sample_id"]) == rows["sample_id"]
    assert list(dataset["target_label"]) == rows["target_label"] and list(dataset["caption"]) == rows["caption"]
    assert all(c.startswith("a close-up photo of a person with ") for c in rows["caption"])  # toy data: toy captions
    assert list(dataset["seed"]) == [1_000_000 + i for i in range(20)]
    assert dataset[0]["image"].size == (32, 32)
    assert metrics["images"] == 20 and metrics["generated_now"] == 20 and metrics["images_per_second"] > 0
    assert sum(metrics["class_counts"]) == 20
    # the same command again: nothing is regenerated
    stamp = (out / MANIFEST).stat().st_mtime_ns
    with caplog.at_level("INFO", logger="lightning_modules.stages.synthesize_stage"):
        again = run_synthesize_stage(cfg)
    assert "already holds all 20 samples" in caplog.text
    assert (out / MANIFEST).stat().st_mtime_ns == stamp and again["images"] == 20
    # force=true (as in stage=pipeline force=true) makes the set again, with the same bytes
    before = _image_bytes(out)
    forced = run_synthesize_stage(tiny_cfg(*_overrides(generator_dir), "force=true"))
    assert forced["generated_now"] == 20 and "skipped" not in forced and _image_bytes(out) == before


def test_damaged_missing_and_half_written_shards_are_redone(tiny_cfg, generator_dir):
    from lightning_modules.stages.synthesize_stage import run_synthesize_stage

    cfg = tiny_cfg(*_overrides(generator_dir))
    run_synthesize_stage(cfg)
    out = Path(cfg.paths.run_dir) / "synthesize" / "dataset"
    reference = _image_bytes(out)
    shards = out / "shards"
    import shutil

    shutil.rmtree(shards / "chunk-000001")                              # listed but gone
    arrow = next((shards / "chunk-000002").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])                         # listed but truncated
    (shards / ".chunk-000000.tmp").mkdir()                              # a kill during a write
    (Path(cfg.paths.run_dir) / "synthesize" / "stage_done.json").unlink()
    metrics = run_synthesize_stage(cfg)
    assert metrics["generated_now"] == 12                               # chunks 1 and 2 only
    assert _image_bytes(out) == reference
    assert not (shards / ".chunk-000000.tmp").exists()


def _truncate_shard(out: Path) -> None:
    arrow = next((out / "shards" / "chunk-000001").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-64])


def _delete_manifest(out: Path) -> None:
    (out / MANIFEST).unlink()


@pytest.mark.parametrize("damage, redone", [(_truncate_shard, 8), (_delete_manifest, 0)])
def test_a_finished_set_damaged_afterwards_is_not_called_complete(tiny_cfg, generator_dir, caplog, damage, redone):
    """The done marker says finished, the files say otherwise: the files win. A truncated shard is made again; a
    deleted manifest is rebuilt from the intact shards (nothing regenerated)."""
    from datamodules.synthetic import verify_synthetic
    from lightning_modules.stages.synthesize_stage import run_synthesize_stage

    cfg = tiny_cfg(*_overrides(generator_dir))
    run_synthesize_stage(cfg)
    out = Path(cfg.paths.run_dir) / "synthesize" / "dataset"
    reference = _image_bytes(out)
    damage(out)
    with caplog.at_level("INFO", logger="lightning_modules.stages.synthesize_stage"):
        metrics = run_synthesize_stage(cfg)
    assert "already holds" not in caplog.text and "skipped" not in metrics
    assert "damaged" in caplog.text or "lost its manifest.json" in caplog.text
    assert metrics["generated_now"] == redone
    assert verify_synthetic(out)["meta"]["complete"] is True and _image_bytes(out) == reference


def test_another_config_in_the_same_folder_is_an_error_unless_overwrite(tiny_cfg, generator_dir):
    from lightning_modules.stages.synthesize_stage import run_synthesize_stage

    run_synthesize_stage(tiny_cfg(*_overrides(generator_dir, size=8)))
    with pytest.raises(ConfigError, match=r"synthesis\.overwrite"):
        run_synthesize_stage(tiny_cfg(*_overrides(generator_dir, size=8, steps=3)))
    metrics = run_synthesize_stage(tiny_cfg(*_overrides(generator_dir, size=8, steps=3), "synthesis.overwrite=true"))
    assert metrics["generated_now"] == 8
    # settings that change no byte (progress, workers) do not count as another config
    assert run_synthesize_stage(tiny_cfg(*_overrides(generator_dir, size=8, steps=3), "synthesis.progress=true",
                                         "synthesis.overwrite=false"))["images"] == 8


@pytest.mark.parametrize("bad", [["synthesis.overwrite=true", "synthesis.sample.steps=3", "trainer.devices=0"],
                                 ["synthesis.overwrite=true", "synthesis.sample.sampler=nope"],
                                 ["force=true", "trainer.devices=0"]])
def test_a_failing_rerun_keeps_the_finished_set(tiny_cfg, generator_dir, bad):
    """overwrite=true / force=true replace a set only once the new run has built its sampler and Trainer."""
    from lightning_modules.stages.synthesize_stage import run_synthesize_stage

    run_synthesize_stage(tiny_cfg(*_overrides(generator_dir, size=8)))
    out = Path(tiny_cfg().paths.run_dir) / "synthesize"
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(ConfigError, match=r"trainer|synthesis\.sample\.sampler"):
        run_synthesize_stage(tiny_cfg(*_overrides(generator_dir, size=8), *bad))
    assert {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_plan_scale_and_fill_rare_follow_the_real_train_set(tiny_cfg, generator_dir):
    """scale x len(real train) faces; fill_rare gives the rare real classes the most synthetic faces."""
    import numpy as np

    from lightning_modules.stages.synthesize_stage import real_stats, run_synthesize_stage

    cfg = tiny_cfg(*_overrides(generator_dir), "synthesis.plan.size=null", "synthesis.plan.scale=0.25",
                   "synthesis.plan.class_distribution=fill_rare", "synthesis.chunk_size=16")
    real = real_stats(cfg)
    metrics = run_synthesize_stage(cfg)
    assert real.num_train == 96 and metrics["images"] == 24
    synthetic = np.asarray(metrics["class_counts"] + [0] * (8 - len(metrics["class_counts"])))
    rarest, commonest = int(np.argmin(real.class_counts)), int(np.argmax(real.class_counts))
    assert synthetic[rarest] > synthetic[commonest] == 0
    assert (real.class_counts + synthetic).std() < real.class_counts.std()


def test_synthetic_sets_read_back_as_fer_batches(tiny_cfg, generator_dir):
    """Two synthesized sets through the reader: one dataset, the standard batch dict, conditioned labels."""
    from torch.utils.data import DataLoader

    from datamodules.synthetic import SyntheticFERDataset
    from lightning_modules.stages.synthesize_stage import run_synthesize_stage

    dirs = []
    for name, prefix in (("a", "syn-a-"), ("b", "syn-b-")):
        cfg = tiny_cfg(*_overrides(generator_dir, size=6, chunk=4), f"synthesis.plan.id_prefix={prefix}",
                       "synthesis.overwrite=true")
        run_synthesize_stage(cfg)
        target = Path(cfg.paths.run_dir).parent / name
        (Path(cfg.paths.run_dir) / "synthesize" / "dataset").rename(target)
        dirs.append(target)
    dataset = SyntheticFERDataset(load_synthetic(dirs), image_size=48, num_classes=8)
    assert len(dataset) == 12
    batch = next(iter(DataLoader(dataset, batch_size=12)))
    assert batch["image"].shape == (12, 3, 48, 48) and -1 <= batch["image"].min() < batch["image"].max() <= 1
    assert batch["aus"].shape == (12, 12) and batch["au_mask"].dtype == torch.bool
    assert batch["sample_id"][0] == "syn-a-00000000" and batch["sample_id"][6] == "syn-b-00000000"
    assert batch["label"].tolist() == load_synthetic(dirs)["target_label"] and "soft_label" not in batch


@pytest.mark.parametrize("override, key", [
    ("synthesis.generator_path=/nowhere", "synthesis.generator_path"),
    ("synthesis.chunk_size=0", "synthesis.chunk_size"),
    ("synthesis.batch_size=0", "synthesis.batch_size"),
    ("synthesis.plan.class_distribution=sideways", "synthesis.plan"),
    ("synthesis.plan.size=-3", "synthesis.plan"),
    ("synthesis.sample.sampler=euler", "synthesis.sample.sampler"),
    ("synthesis.guidance.embedding_scale=1.0", "synthesis.guidance.classifier"),
    ("synthesis.guidance.window=[0.9,0.1]", "synthesis.guidance"),
    ("synthesis.storage.format=gif", "synthesis.storage.format"),
    ("synthesis.storage.quality=0", "synthesis.storage.quality"),
    ("synthesis.storage.image_size=4", "synthesis.storage.image_size"),
])
def test_config_errors_name_the_key(tiny_cfg, generator_dir, override, key):
    from lightning_modules.stages.synthesize_stage import run_synthesize_stage

    cfg = tiny_cfg(*_overrides(generator_dir), override, "synthesis.guidance.classifier=/nowhere.ckpt")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_synthesize_stage(cfg)


def test_faces_are_stored_at_the_configured_size_and_format_with_a_dataset_card(tiny_cfg, generator_dir):
    """The default storage keeps the fingerprint of sets made before the option; another storage is another set."""
    from lightning_modules.stages.synthesize_stage import checked_plan, run_synthesize_stage

    default = tiny_cfg(*_overrides(generator_dir, size=6, chunk=6))
    cfg = tiny_cfg(*_overrides(generator_dir, size=6, chunk=6), "synthesis.storage.image_size=16",
                   "synthesis.storage.format=jpeg", "synthesis.storage.quality=70")
    legacy = default.copy()
    with __import__("omegaconf").open_dict(legacy):
        del legacy.synthesis["storage"]
    assert checked_plan(legacy)[2] == checked_plan(default)[2] != checked_plan(cfg)[2]
    run_synthesize_stage(cfg)
    out = Path(cfg.paths.run_dir) / "synthesize" / "dataset"
    meta = read_manifest(out)["meta"]
    assert meta["storage"] == {"format": "jpeg", "quality": 70, "image_size": 16, "generator_image_size": 32}
    assert meta["image_size"] == 16
    images = [Image.open(io.BytesIO(b)) for _, b in _image_bytes(out)]
    assert {(i.format, i.size) for i in images} == {("JPEG", (16, 16))}
    card = (out / "README.md").read_text()
    assert "jpeg 16 px, quality 70" in card and str(generator_dir) in card and "| neutral |" in card


def test_au_vocabulary_must_match_the_generator(tiny_cfg, generator_dir):
    from lightning_modules.stages.synthesize_stage import run_synthesize_stage

    with pytest.raises(ConfigError, match=r"data\.aus"):
        run_synthesize_stage(tiny_cfg(*_overrides(generator_dir), "data.aus=[1,2,4]"))


def test_semantic_guidance_reaches_the_sampler(tiny_cfg, generator_dir, guide_ckpt):
    """Guided synthesis differs from plain synthesis of the same plan and records its settings per face."""
    from lightning_modules.stages.synthesize_stage import run_synthesize_stage

    plain = tiny_cfg(*_overrides(generator_dir, size=4, chunk=4))
    run_synthesize_stage(plain)
    out = Path(plain.paths.run_dir) / "synthesize" / "dataset"
    unguided = _image_bytes(out)
    run_synthesize_stage(tiny_cfg(*_overrides(generator_dir, size=4, chunk=4), "synthesis.overwrite=true",
                                  f"synthesis.guidance.classifier={guide_ckpt}",
                                  "synthesis.guidance.embedding_scale=5.0", "synthesis.guidance.window=[0.0,1.0]"))
    guided = _image_bytes(out)
    assert json.loads(load_synthetic(out)[0]["guidance"])["guidance"]["embedding_scale"] == 5.0
    assert [k for k, _ in guided] == [k for k, _ in unguided] and guided != unguided


# ---------------------------------------------------------------------- processes: kill, resume, DDP
def _cli(generator_dir, output_root, name, *extra, size=48):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", "stage=synthesize", *TINY, *_overrides(generator_dir, size=size, chunk=4,
                                                                               batch=2, steps=6),
           f"output_root={output_root}", f"experiment_name={name}", *extra]
    return cmd, env


@pytest.fixture(scope="module")
def uninterrupted(generator_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_ref")
    cmd, env = _cli(generator_dir, root, "ref")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _image_bytes(root / "ref" / "synthesize" / "dataset")


@pytest.mark.slow
def test_sigkill_then_rerun_gives_the_uninterrupted_set(generator_dir, uninterrupted, tmp_path):
    cmd, env = _cli(generator_dir, tmp_path, "killed")
    manifest = tmp_path / "killed" / "synthesize" / "dataset" / MANIFEST
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:   # kill as soon as the first chunk is on disk
        if manifest.is_file() and read_manifest(manifest.parent)["count"] >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = read_manifest(manifest.parent)["count"]
    assert 0 < written < 48 and read_manifest(manifest.parent)["meta"]["complete"] is False
    rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout + rerun.stderr
    metrics = json.loads((tmp_path / "killed" / "synthesize" / "metrics.json").read_text())
    assert metrics["generated_now"] == 48 - written
    assert _image_bytes(manifest.parent) == uninterrupted


@pytest.mark.slow
@pytest.mark.ddp
def test_two_processes_give_the_same_set_as_one(generator_dir, uninterrupted, tmp_path):
    cmd, env = _cli(generator_dir, tmp_path, "ddp", "trainer=ddp_cpu")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "ddp" / "synthesize"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["images_per_second_per_device/rank0"] > 0 and metrics["images_per_second_per_device/rank1"] > 0
    assert _image_bytes(out / "dataset") == uninterrupted

"""Two real CPU processes (gloo DDP) through the CLI, in a subprocess (plain ddp inside pytest would re-run pytest)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO, TINY, compose
from lightning_modules.paradigms.metrics import confusion_matrix_metric
from lightning_modules.paradigms.teacher import load_fer_classifier
from lightning_modules.stages.classifier_stage import build_datamodule


@pytest.mark.slow
@pytest.mark.ddp
def test_teacher_trains_under_two_process_ddp(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", "stage=teacher", "trainer=ddp_cpu", *TINY, f"output_root={tmp_path}",
           "experiment_name=ddp"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "ddp" / "teacher"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    # 96 train faces, batch 32: one process would take 3 batches per epoch; each of 2 ranks takes half the data
    assert metrics["train_batches_per_epoch"] == 2
    # the test numbers cover both ranks' halves of the 48 test faces (synced), not rank 0's 24
    matrix = torch.load(out / "confusion_matrix.pt")
    assert int(matrix.sum()) == 48
    assert metrics["test/acc"] == pytest.approx(float(matrix.trace() / matrix.sum()))
    # ... and the saved checkpoint, run over the whole test split in this one process, gives the same matrix
    model = load_fer_classifier(out / "teacher.ckpt")
    data = build_datamodule(compose(TINY, tmp_path / "single"))
    data.setup("test")
    recomputed = confusion_matrix_metric(data.num_classes)
    with torch.no_grad():
        for batch in data.test_dataloader():
            recomputed.update(model(batch["image"])["logits"].argmax(dim=1), batch["label"])
    assert torch.equal(recomputed.compute(), matrix)


@pytest.mark.slow
@pytest.mark.ddp
def test_generator_trains_under_two_process_ddp(tmp_path):
    """Grids and the pipeline export run on rank 0 only while rank 1 waits; the final validation is synced."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", "stage=generator", "trainer=ddp_cpu", *TINY, "generator.grids.every_n_steps=1",
           "generator.eval.enabled=false", f"output_root={tmp_path}", "experiment_name=ddp"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "ddp" / "generator"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2 and metrics["val_loss"] > 0
    assert (out / "pipeline" / "au_adapter.safetensors").is_file()
    assert (out / "grids" / "expressions_step000001.png").is_file()


@pytest.mark.slow
def test_hydra_multirun_gives_each_job_its_own_run_and_wandb_run(tmp_path):
    """Two sweep jobs in one process: separate run folders, the swept value in each config, two wandb runs."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"}
    tiny = [o for o in TINY if not o.startswith("logger=")]
    cmd = [sys.executable, "train.py", "--multirun", "stage=student", "logger=default", *tiny,
           "student.model.lr=0.001,0.003", f"output_root={tmp_path}", "experiment_name=sweep"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((tmp_path / "sweep" / "multirun").glob("*/[0-9]*"))
    assert [j.name for j in jobs] == ["0", "1"]
    lrs = [yaml.safe_load((j / "student" / "config.yaml").read_text())["student"]["model"]["lr"] for j in jobs]
    assert lrs == [0.001, 0.003]
    for job in jobs:
        assert (job / "student" / "metrics.json").is_file()
        assert len(list((job / "student" / "wandb").glob("offline-run-*"))) == 1


@pytest.mark.slow
@pytest.mark.ddp
def test_mixed_student_trains_under_two_process_ddp(tmp_path):
    """mix.mode=ratio under DDP: the datamodule deals its own batches; each of 2 ranks takes half an epoch."""
    from synthetic_fixtures import write_toy_synthetic_set

    synthetic = tmp_path / "synthetic"
    write_toy_synthetic_set(synthetic, n=96, shards=2)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", "stage=student", "trainer=ddp_cpu", *TINY, f"output_root={tmp_path}",
           "experiment_name=ddp", "mix.mode=ratio", "mix.ratio=0.25", "mix.scale=0.5", f"mix.synthetic={synthetic}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "student" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["data/mix/synthetic_size"] == 48
    # 96 real faces, 24 real per batch of 32: 4 batches per epoch on one process, 2 on each of 2 ranks
    assert metrics["train_batches_per_epoch"] == 2

"""Stages end to end on tiny toy data: outputs, metrics, pipeline skip/resume, report."""
import json
from pathlib import Path

import pytest
import torch

import train
from conftest import TINY, compose
from lightning_modules.paradigms.teacher import load_teacher
from lightning_modules.run.runtime import ConfigError
from lightning_modules.stages.classifier_stage import run_classifier_stage


def test_teacher_stage_writes_its_artifacts(tiny_cfg, tmp_path):
    cfg = tiny_cfg("stage=teacher", "logger=default")  # CSV + wandb offline
    metrics = train.run_stage(cfg)
    out = tmp_path / "run" / "teacher"
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run not written"
    for name in ("config.yaml", "metrics.json", "teacher.ckpt", "confusion_matrix.png", "stage_done.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert "test/macro_f1" in saved and "test/mean_class_acc" in saved
    assert saved["data/train_size"] == 96 and saved["data/test_size"] == 48
    assert all(not isinstance(v, dict) for v in saved.values())  # flat
    assert (out / "csv" / "metrics.csv").is_file()
    assert metrics["test/acc"] == saved["test/acc"]
    # the artifact is the best checkpoint's weights without the training state (resume reads last.ckpt)
    artifact = torch.load(out / "teacher.ckpt", map_location="cpu", weights_only=False)
    best = torch.load(next((out / "checkpoints").glob("best-*.ckpt")), map_location="cpu", weights_only=False)
    assert "optimizer_states" in best and "optimizer_states" not in artifact
    assert artifact["state_dict"].keys() == best["state_dict"].keys()
    assert all(torch.equal(artifact["state_dict"][k], best["state_dict"][k]) for k in best["state_dict"])
    assert (out / "teacher.ckpt").stat().st_size < 0.6 * (out / "checkpoints" / "last.ckpt").stat().st_size
    # the teacher reloads from its artifact and has an AU head of the vocabulary's size
    teacher = load_teacher(out / "teacher.ckpt")
    with torch.no_grad():
        pred = teacher(torch.zeros(2, 3, 32, 32))
    assert pred["logits"].shape == (2, 8) and pred["aus"].shape == (2, 12)
    assert float(pred["aus"].min()) >= 0 and float(pred["aus"].max()) <= 5
    # the reported numbers are the saved teacher's on the real test split: recomputed from the checkpoint
    from lightning_modules.stages.classifier_stage import build_datamodule

    datamodule = build_datamodule(cfg)
    datamodule.setup("test")
    teacher.eval()
    with torch.no_grad():
        batches = list(datamodule.test_dataloader())
        predicted = torch.cat([teacher(b["image"])["logits"].argmax(-1) for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert len(labels) == 48 and saved["test/acc"] == pytest.approx((predicted == labels).float().mean().item(),
                                                                     abs=1e-6)
    matrix = torch.load(out / "confusion_matrix.pt")
    assert int(matrix.sum()) == 48 and torch.equal(matrix.diagonal(), torch.bincount(labels[predicted == labels],
                                                                                      minlength=8))


def test_student_stage_seven_class_protocol(tiny_cfg, tmp_path):
    cfg = tiny_cfg("stage=student", "data.protocol=7")
    metrics = train.run_stage(cfg)
    assert len(metrics["data"]["train_class_counts"]) == 7
    assert not (tmp_path / "run" / "student" / "teacher.ckpt").exists()
    assert (tmp_path / "run" / "student" / "student.ckpt").is_file()


PIPELINE = ("stage=pipeline", "pipeline.feranno.max_epochs=1", "relabel.threshold=0")  # 1-epoch voters: keep all
STEPS = ("teacher", "generator", "synthesize", "synth_eval", "feranno", "relabel", "student", "student_mix")


@pytest.mark.slow
def test_pipeline_skips_finished_stages_and_reports(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*PIPELINE)
    first = train.run_stage(cfg)
    assert all(first[s] == "ran" for s in STEPS), first
    run = tmp_path / "run"
    assert (run / "feranno" / "feranno.ckpt").is_file() and (run / "relabel" / "dataset" / "manifest.json").is_file()
    report = run / "report"
    text = (report / "results.md").read_text()
    assert "| teacher |" in text and "| student |" in text and "| student_mix |" in text and "toyfaces_grid.png" in text
    assert "## Synthesis" in text and "## Relabeling" in text and "## Synthetic set judged" in text
    judged = json.loads((run / "synth_eval" / "metrics.json").read_text())
    assert judged["num_samples"] == 96 and judged["judge"] == str(run / "teacher" / "teacher.ckpt")
    assert "| generator |" in text and (report / "generator_expressions_final.png").is_file()
    assert (report / "toyfaces_grid.png").is_file() and (report / "confusion_student.png").is_file()
    merged = json.loads((report / "metrics.json").read_text())
    assert "teacher/test/acc" in merged and "student/test/acc" in merged
    assert merged["student_mix/data/mix/synthetic_size"] == 96 and merged["synthesize/images"] == 96
    # another run folder reuses the finished steps of this one that have its config and inputs (an ablation row)
    row = tmp_path / "row"
    reused = train.run_stage(compose([*TINY, *PIPELINE, f"pipeline.reuse={run}", "relabel.enabled=false",
                                      "experiment_name=no_relabel"], row))
    assert [s for s in STEPS if reused.get(s) != "reused"] == ["feranno", "relabel", "student_mix"], reused
    assert reused["student_mix"] == "ran" and "feranno" not in reused and not (row / "relabel").exists()
    assert json.loads((row / "teacher" / "stage_done.json").read_text())["reused_from"] == str(run / "teacher")
    assert "experiment_name: no_relabel" in (row / "teacher" / "config.yaml").read_text()
    assert (row / "synthesize" / "dataset" / "manifest.json").is_file()
    assert json.loads((row / "student_mix" / "metrics.json").read_text())["data/mix/synthetic_size"] == 96
    with pytest.raises(ConfigError, match=r"pipeline\.reuse"):
        train.run_stage(compose([*TINY, *PIPELINE, f"pipeline.reuse={tmp_path / 'nowhere'}"], row))
    for bad in ("0", "soon"):
        with pytest.raises(ConfigError, match=r"pipeline\.reuse_wait_seconds"):
            train.run_stage(compose([*TINY, *PIPELINE, f"pipeline.reuse={run}", f"pipeline.reuse_wait_seconds={bad}"],
                                    row))
    # a killed pipeline resumes: finished stages with the same config are skipped...
    ckpt_mtime = (run / "teacher" / "teacher.ckpt").stat().st_mtime
    second = train.run_stage(tiny_cfg(*PIPELINE))
    assert all(second[s] == "skipped" for s in STEPS), second
    assert (run / "teacher" / "teacher.ckpt").stat().st_mtime == ckpt_mtime
    # ...and a changed student config reruns only the students
    third = train.run_stage(tiny_cfg(*PIPELINE, "student.model.lr=0.01"))
    assert [s for s in STEPS if third[s] == "ran"] == ["student", "student_mix"]
    # ...and other synthetic faces rerun what reads them (relabel, the mixed student) and the real-only student:
    # the largest train set sets every student's optimizer-step budget (96 + 96 faces: 6 steps, 96 + 48: 5)
    fourth = train.run_stage(tiny_cfg(*PIPELINE, "student.model.lr=0.01", "synthesis.plan.scale=0.5",
                                      "synthesis.overwrite=true", "mix.scale=0.5"))
    assert [s for s in STEPS if fourth[s] == "ran"] == ["synthesize", "synth_eval", "relabel", "student",
                                                        "student_mix"]
    assert [json.loads((run / s / "metrics.json").read_text())["optimizer_steps"] for s in STEPS[-2:]] == [5, 5]


def test_pipeline_config_errors(tiny_cfg):
    import pytest

    with pytest.raises(ConfigError, match=r"pipeline\.stages"):
        train.run_stage(tiny_cfg("stage=pipeline", "pipeline.stages=[teacher,paint]"))
    with pytest.raises(ConfigError, match=r"pipeline\.students"):
        train.run_stage(tiny_cfg("stage=pipeline", "pipeline.stages=[students]", "pipeline.students=null"))
    with pytest.raises(ConfigError, match=r"pipeline\.reuse_wait_seconds"):  # checked with reuse off too
        train.run_stage(tiny_cfg("stage=pipeline", "pipeline.reuse_wait_seconds=-5"))
    # a student's bad mix stops the pipeline before its first step (the teacher) runs
    with pytest.raises(ConfigError, match=r"mix\.ratio"):
        train.run_stage(tiny_cfg("stage=pipeline", "pipeline.stages=[teacher,students]",
                                 "+pipeline.students.typo={mode: real_only, ratio: 1.5}"))
    assert not (Path(tiny_cfg().paths.run_dir) / "teacher").exists()


def test_pipeline_does_not_skip_a_finished_step_whose_set_was_damaged(tmp_path, caplog):
    from lightning_modules.stages.pipeline import outputs_intact
    from synthetic_fixtures import write_toy_synthetic_set

    write_toy_synthetic_set(tmp_path / "synthesize" / "dataset", n=8, shards=2)
    assert outputs_intact("synthesize", tmp_path / "synthesize")
    arrow = next((tmp_path / "synthesize" / "dataset" / "shards" / "shard-00001").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:-64])
    assert not outputs_intact("synthesize", tmp_path / "synthesize")
    assert str(arrow) in caplog.text and "running it again" in caplog.text
    assert outputs_intact("teacher", tmp_path / "teacher")  # no set to verify


def test_report_without_runs_is_a_clear_error(tiny_cfg):
    import pytest

    with pytest.raises(FileNotFoundError, match="metrics.json"):
        train.run_stage(tiny_cfg("stage=report"))


def test_student_on_real_plus_relabelled_synthetic_faces(tiny_cfg, tmp_path):
    """mix.mode=concat: the synthetic set joins the train set (soft labels and all), test stays on real faces."""
    import numpy as np
    from datasets import Dataset

    from datamodules.synthetic import load_synthetic, write_dataset
    from synthetic_fixtures import write_toy_synthetic_set

    raw = tmp_path / "raw"
    write_toy_synthetic_set(raw, n=48, shards=1)
    data = load_synthetic(raw)
    soft = np.full((48, 8), 1 / 8, dtype=np.float32)
    relabelled = data.add_column("final_label", data["target_label"]).add_column("soft_label", soft.tolist())
    relabelled = relabelled.add_column("is_soft", [True] * 48).add_column("kept", [i % 2 == 0 for i in range(48)])
    write_dataset(tmp_path / "run" / "relabel" / "dataset", relabelled)   # where mix.synthetic=null looks
    run_classifier_stage(tiny_cfg("stage=student", "mix.mode=concat", "mix.scale=0.25"), "student")
    metrics = json.loads((tmp_path / "run" / "student" / "metrics.json").read_text())
    assert metrics["data/mix/synthetic_size"] == 24 and metrics["data/mix/soft_labels"] == 24
    assert metrics["data/test_size"] == 48                                   # real test faces only
    with pytest.raises(ConfigError, match=r"mix\.scale"):                   # only 24 faces were kept
        run_classifier_stage(tiny_cfg("stage=student", "mix.mode=concat", "mix.scale=0.5"), "student")
    with pytest.raises(ConfigError, match=r"mix\.synthetic"):
        run_classifier_stage(tiny_cfg("stage=student", "mix.mode=concat", "relabel.enabled=false"), "student")


def test_reuse_links_on_rank_zero_only_and_other_ranks_wait(tmp_path, monkeypatch):
    """Under DDP every rank runs the pipeline: rank 0 links the finished stage, the others wait for its marker."""
    from lightning.pytorch.utilities import rank_zero_only
    from omegaconf import OmegaConf

    from lightning_modules.run import runtime
    from lightning_modules.stages.pipeline import reuse_stage

    source, target = tmp_path / "full" / "teacher", tmp_path / "row" / "teacher"
    source.mkdir(parents=True)
    (source / "teacher.ckpt").write_bytes(b"weights")
    runtime.mark_done(source, "abc")
    cfg = OmegaConf.create({"experiment_name": "row"})
    assert not reuse_stage(source, target, "other-digest", cfg)  # finished with another config: not reused
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    with pytest.raises(TimeoutError, match="rank 0 did not link"):
        reuse_stage(source, target, "abc", cfg, wait_seconds=0.1)
    assert not target.exists()  # rank 1 never writes
    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)
    assert reuse_stage(source, target, "abc", cfg)
    assert (target / "teacher.ckpt").read_bytes() == b"weights" and runtime.is_done(target, "abc")
    assert (target / "teacher.ckpt").stat().st_mtime_ns == (source / "teacher.ckpt").stat().st_mtime_ns
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    assert reuse_stage(source, target, "abc", cfg, wait_seconds=0.1)  # the marker is there: rank 1 goes on


def _own_bytes(folder, others):
    """Bytes of the files under ``folder`` that share no inode with a file under ``others`` (what the disk pays)."""
    shared = {(p.stat().st_dev, p.stat().st_ino) for p in others.rglob("*") if p.is_file()}
    return sum(p.stat().st_size for p in folder.rglob("*")
               if p.is_file() and not p.is_symlink() and (p.stat().st_dev, p.stat().st_ino) not in shared)


def test_reuse_links_heavy_files_and_keeps_fingerprints(tmp_path):
    """A reused stage costs only its small files: weights and shards are hard links (a later step's fingerprint of
    them is the other run's), config.yaml and the done marker are this run's own, and a rerun that rewrites a small
    file or replaces a large one never reaches the other run."""
    import os

    from omegaconf import OmegaConf

    from lightning_modules.run import runtime
    from lightning_modules.stages.pipeline import LINK_MIN_BYTES, reuse_stage

    source, target = tmp_path / "full" / "generator", tmp_path / "row" / "generator"
    heavy = {"pipeline/unet/diffusion_pytorch_model.safetensors": 3, "checkpoints/last.ckpt": 2}
    for name, mib in heavy.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(os.urandom(mib * LINK_MIN_BYTES))
    (source / "pipeline" / "model_index.json").write_text("{}")
    (source / "grids").mkdir()
    (source / "grids" / "expressions_final.png").write_bytes(b"png")
    (source / "config.yaml").write_text("experiment_name: full\n")
    (source / "wandb").mkdir()
    (source / "wandb" / "run.wandb").write_bytes(b"log")
    runtime.mark_done(source, "abc")
    (target / "checkpoints").mkdir(parents=True)
    (target / "checkpoints" / "partial.ckpt").write_bytes(b"killed run")  # a partial stage here is replaced
    assert reuse_stage(source, target, "abc", OmegaConf.create({"experiment_name": "row"}))

    total = sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    own = _own_bytes(target, source)
    assert own < 4096 and total > 5 * LINK_MIN_BYTES, (own, total)
    for name in heavy:
        assert os.path.samefile(target / name, source / name)
    assert not (target / "grids" / "expressions_final.png").samefile(source / "grids" / "expressions_final.png")
    assert not (target / "wandb").exists() and not (target / "checkpoints" / "partial.ckpt").exists()
    assert "experiment_name: row" in (target / "config.yaml").read_text()
    assert "experiment_name: full" in (source / "config.yaml").read_text() and runtime.is_done(source, "abc")
    assert runtime.path_fingerprint(target / "pipeline") == runtime.path_fingerprint(source / "pipeline")
    assert runtime.path_fingerprint(target / "checkpoints") == runtime.path_fingerprint(source / "checkpoints")
    # this run's rerun rewrites a grid in place and replaces a checkpoint: the other run keeps its own
    (target / "grids" / "expressions_final.png").write_bytes(b"new grid")
    tmp = target / "checkpoints" / "last.ckpt.tmp"
    tmp.write_bytes(b"new weights")
    os.replace(tmp, target / "checkpoints" / "last.ckpt")
    assert (source / "grids" / "expressions_final.png").read_bytes() == b"png"
    assert (source / "checkpoints" / "last.ckpt").stat().st_size == 2 * LINK_MIN_BYTES


def test_reuse_across_file_systems_symlinks_with_one_warning(tmp_path, monkeypatch, caplog):
    """Without hard links (another file system) large files become symlinks; fingerprints still match."""
    import errno
    import os

    from omegaconf import OmegaConf

    from lightning_modules.run import runtime
    from lightning_modules.stages import pipeline
    from lightning_modules.stages.pipeline import LINK_MIN_BYTES, reuse_stage

    def no_hard_links(src, dst, **kwargs):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    source, target = tmp_path / "full" / "teacher", tmp_path / "row" / "teacher"
    (source / "checkpoints").mkdir(parents=True)
    (source / "teacher.ckpt").write_bytes(os.urandom(LINK_MIN_BYTES))
    (source / "checkpoints" / "last.ckpt").write_bytes(os.urandom(LINK_MIN_BYTES))
    runtime.mark_done(source, "abc")
    monkeypatch.setattr(pipeline.os, "link", no_hard_links)
    with caplog.at_level("WARNING", logger=pipeline.log.name):
        assert reuse_stage(source, target, "abc", OmegaConf.create({"experiment_name": "row"}))
    assert (target / "teacher.ckpt").is_symlink() and (target / "checkpoints" / "last.ckpt").is_symlink()
    assert _own_bytes(target, source) < 4096
    assert runtime.path_fingerprint(target / "teacher.ckpt") == runtime.path_fingerprint(source / "teacher.ckpt")
    warnings = [r for r in caplog.records if "symlinks" in r.getMessage()]
    assert len(warnings) == 1 and "2 files" in warnings[0].getMessage(), caplog.text


def test_a_finished_run_is_skipped_only_with_its_digest_and_metrics_and_without_force(tmp_path):
    from omegaconf import OmegaConf

    from lightning_modules.run import runtime

    cfg, forced = OmegaConf.create({}), OmegaConf.create({"force": True})
    runtime.mark_done(tmp_path, "abc")
    assert not runtime.finished_earlier(cfg, "ssl", tmp_path, "abc")  # no metrics.json: the run did not finish
    (tmp_path / "metrics.json").write_text("{}")
    assert runtime.finished_earlier(cfg, "ssl", tmp_path, "abc")
    assert not runtime.finished_earlier(cfg, "ssl", tmp_path, "other config")
    assert not runtime.finished_earlier(forced, "ssl", tmp_path, "abc")


def test_log_scalars_sends_numbers_only_with_their_prefix():
    class Recorder:
        def __init__(self):
            self.logged, self.saved = [], 0

        def log_metrics(self, metrics, step=None):
            self.logged.append((metrics, step))

        def save(self):
            self.saved += 1

    from lightning_modules.run import runtime

    a, b = Recorder(), Recorder()
    runtime.log_scalars([a, b], {"acc": 0.5, "n": 3, "ok": True, "name": "x", "none": None}, prefix="eval", step=7)
    assert a.logged == b.logged == [({"eval/acc": 0.5, "eval/n": 3}, 7)] and a.saved == b.saved == 1

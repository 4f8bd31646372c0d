"""A rerun never destroys a finished run before it has validated its config, read its data and built its model and
Trainer; a rerun that does start drops the old artifact with the old numbers; a killed classifier resumes."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest

from conftest import EpochProbe, KillAtEpoch, with_trainer_callbacks
from datamodules.errors import DataError
from lightning_modules.run import runtime
from lightning_modules.run.runtime import ConfigError
from lightning_modules.stages.classifier_stage import run_classifier_stage

pytestmark = pytest.mark.usefixtures("single_thread")


def finished_stage(out: Path, name: str) -> dict[str, bytes]:
    """A finished classifier stage folder as a real run leaves it (written directly: training it is slow)."""
    files = {"metrics.json": json.dumps({"test/acc": 0.875}).encode(),
             "stage_done.json": json.dumps({"config_hash": "finished-run"}).encode(),
             "config.yaml": b"seed: 0\n", f"{name}.ckpt": b"best weights", "confusion_matrix.png": b"png",
             "resume_state.json": json.dumps({"config_hash": "finished-run"}).encode(),
             "checkpoints/best-epoch=00.ckpt": b"best weights", "checkpoints/last.ckpt": b"last weights",
             "csv/metrics.csv": b"epoch,val/acc\n0,0.875\n"}
    for rel, data in files.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    return snapshot(out)


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _fer2013_without_csv(tmp_path: Path) -> list[str]:
    (tmp_path / "fer_root").mkdir()
    return ["data=fer2013", f"data.root={tmp_path / 'fer_root'}"]  # the folder exists, its label file does not


BAD_RERUNS = {  # id -> (overrides, the error it must end in, what the error names)
    "missing data.root": (lambda t: ["data=fer2013", f"data.root={t / 'nowhere'}"], (ConfigError, DataError),
                          "data"),
    "data.root without its file": (_fer2013_without_csv, (ConfigError, DataError, FileNotFoundError), "fer"),
    "trainer.devices=0": (lambda t: ["trainer.devices=0"], ConfigError, "trainer"),
    "unknown backbone": (lambda t: ["teacher.model.backbone=resnet_nope"], ConfigError, "teacher.model.backbone"),
    "unknown model key": (lambda t: ["+teacher.model.bogus=1"], ConfigError, "teacher.model"),
    "max_epochs=0": (lambda t: ["teacher.max_epochs=0"], ConfigError, "teacher.max_epochs"),
    "wandb mode typo, wandb off": (lambda t: ["logger.wandb.enabled=false", "logger.wandb.mode=ofline"], ConfigError,
                                   "logger.wandb.mode"),
}


@pytest.mark.parametrize("case", list(BAD_RERUNS), ids=list(BAD_RERUNS))
def test_a_failing_teacher_rerun_keeps_the_finished_run(tiny_cfg, tmp_path, case):
    overrides, error, named = BAD_RERUNS[case]
    out = tmp_path / "run" / "teacher"
    before = finished_stage(out, "teacher")
    with pytest.raises(error, match=named):
        run_classifier_stage(tiny_cfg("stage=teacher", *overrides(tmp_path)), "teacher")
    assert snapshot(out) == before


@pytest.mark.parametrize("overrides, key", [
    (["mix.mode=foo"], "mix.mode"),                       # was reported as a missing synthetic set
    (["mix.ratio=1.5"], "mix.ratio"),                     # real_only ignores the ratio, the typo still counts
    (["mix.scale=-1"], "mix.scale"),
    (["mix.mode=concat", "mix.synthetic=/nowhere/set"], "mix.synthetic"),
    (["trainer.devices=0"], "trainer"),
])
def test_a_failing_student_rerun_keeps_the_finished_run(tiny_cfg, tmp_path, overrides, key):
    out = tmp_path / "run" / "student"
    before = finished_stage(out, "student")
    with pytest.raises(ConfigError) as err:
        run_classifier_stage(tiny_cfg("stage=student", *overrides), "student")
    assert err.value.key == key and snapshot(out) == before


@pytest.mark.parametrize("overrides, error, named", [
    (["data=fer2013", "data.root=/nowhere/fer"], (ConfigError, DataError), "data"),
    (["trainer.devices=0"], ConfigError, "trainer"),
    (["+generator.model.bogus=1"], ConfigError, "generator.model"),
    (["generator.eval.enabled=false", "generator.eval.per_class=0"], ConfigError, "generator.eval.per_class"),
])
def test_a_failing_generator_rerun_keeps_the_finished_generator(tiny_cfg, tmp_path, overrides, error, named):
    from lightning_modules.stages.generator_stage import run_generator_stage

    out = tmp_path / "run" / "generator"
    finished_stage(out, "unused")
    (out / "pipeline").mkdir()
    (out / "pipeline" / "model_index.json").write_text("{}")
    (out / "grids").mkdir()
    (out / "grids" / "expressions_final.png").write_bytes(b"png")
    before = snapshot(out)
    with pytest.raises(error, match=named):
        run_generator_stage(tiny_cfg("stage=generator", *overrides))
    assert snapshot(out) == before


def test_a_rerun_that_starts_drops_the_old_numbers_and_the_old_model(tiny_cfg, tmp_path, monkeypatch):
    """Once the new run starts, the old teacher.ckpt goes with the old metrics: no later stage can load a model
    whose numbers were deleted."""
    out = tmp_path / "run" / "teacher"
    finished_stage(out, "teacher")

    def killed(*args, **kwargs):
        raise RuntimeError("killed")

    monkeypatch.setattr(L.Trainer, "fit", killed)
    with pytest.raises(RuntimeError, match="killed"):
        run_classifier_stage(tiny_cfg("stage=teacher"), "teacher")
    left = set(snapshot(out))
    assert {"teacher.ckpt", "metrics.json", "stage_done.json", "confusion_matrix.png"}.isdisjoint(left)
    assert not any(name.startswith(("checkpoints/", "csv/")) for name in left)
    assert "max_epochs: 1" in (out / "config.yaml").read_text()  # the new run's config


# ---------------------------------------------------------------------------------------------- resume


def test_a_killed_teacher_resumes_at_the_next_epoch(tiny_cfg, tmp_path, monkeypatch, caplog):
    out = tmp_path / "run" / "teacher"
    cfg = tiny_cfg("stage=teacher", "teacher.max_epochs=2")
    with_trainer_callbacks(monkeypatch, KillAtEpoch(1))
    with caplog.at_level("INFO", logger="lightning_modules.run.runtime"), pytest.raises(RuntimeError, match="killed"):
        run_classifier_stage(cfg, "teacher")
    assert "teacher: starting from scratch (no checkpoint of an earlier run)" in caplog.text
    assert (out / "checkpoints" / "last.ckpt").is_file() and not (out / "stage_done.json").exists()

    caplog.clear()
    probe = EpochProbe()
    with_trainer_callbacks(monkeypatch, probe)
    with caplog.at_level("INFO", logger="lightning_modules.run.runtime"):
        metrics = run_classifier_stage(cfg, "teacher")
    last = out / "checkpoints" / "last.ckpt"
    assert f"teacher: resuming from {last} (epoch 0, step 3)" in caplog.text  # 96 faces / batch 32 = 3 steps
    assert probe.epochs == [1]                                   # only the epoch the kill cost is trained
    assert metrics["resumed_from"] == str(last) and metrics["epochs"] == 2
    assert runtime.is_done(out, json.loads((out / "resume_state.json").read_text())["config_hash"])
    assert (out / "teacher.ckpt").is_file() and (out / "csv" / "metrics.csv").is_file()
    assert (out / "csv" / "metrics.part1.csv").is_file()     # the killed part's log is kept


@pytest.mark.parametrize("rerun, why", [
    (["teacher.model.lr=0.01"], "the config changed since"),
    (["teacher.max_epochs=3"], "the config changed since"),  # the LR schedule spans max_epochs: not resumable
    (["force=true"], "resuming is off"),
])
def test_a_killed_teacher_starts_over_and_says_why(tiny_cfg, tmp_path, monkeypatch, caplog, rerun, why):
    out = tmp_path / "run" / "teacher"
    with_trainer_callbacks(monkeypatch, KillAtEpoch(1))
    with pytest.raises(RuntimeError, match="killed"):
        run_classifier_stage(tiny_cfg("stage=teacher", "teacher.max_epochs=2"), "teacher")
    assert (out / "checkpoints" / "last.ckpt").is_file()
    with_trainer_callbacks(monkeypatch, KillAtEpoch(0))  # the log line is all this test needs
    with caplog.at_level("INFO", logger="lightning_modules.run.runtime"), pytest.raises(RuntimeError, match="killed"):
        run_classifier_stage(tiny_cfg("stage=teacher", "teacher.max_epochs=2", *rerun), "teacher")
    assert f"teacher: starting from scratch ({why}" in caplog.text
    assert not (out / "checkpoints" / "last.ckpt").exists()  # the old run's checkpoints went with it

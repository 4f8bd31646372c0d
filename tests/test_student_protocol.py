"""Fair student comparisons: one optimizer-step budget for students of different train set sizes, early stopping on
the real validation set, seeds, and the protocol each student records for the report."""
import csv
import json
import statistics

import pytest
import torch

import train
from lightning_modules.paradigms.student import Protocol, check_seeds, student_group
from lightning_modules.run.runtime import ConfigError
from lightning_modules.stages.classifier_stage import check_classifier_config, run_classifier_stage


# ------------------------------------------------------------------ config errors name the key
@pytest.fixture(scope="module")
def base_cfg(tmp_path_factory):
    """Composed once (composing is the slow part); each case changes one key of a copy."""
    from conftest import TINY, compose

    return compose([*TINY, "stage=pipeline", "pipeline.stages=[teacher,students]"],
                   tmp_path_factory.mktemp("protocol") / "run")


def _with(cfg, key, value):
    from omegaconf import OmegaConf, open_dict

    out = cfg.copy()
    with open_dict(out):
        OmegaConf.update(out, key, value, merge=False)
    return out


@pytest.mark.parametrize("key, value", [
    ("student.max_steps", 0), ("student.max_steps", -5), ("student.max_steps", 2.5), ("student.max_steps", "many"),
    ("student.max_steps", True), ("student.early_stopping_patience", 0), ("student.val_every_n_steps", -1),
    ("student.seed", 1.5), ("student.max_epochs", 0),
])
def test_bad_student_protocol_is_a_config_error(base_cfg, key, value):
    with pytest.raises(ConfigError, match=rf"`{key}`"):
        check_classifier_config(_with(base_cfg, key, value), "student")


@pytest.mark.parametrize("key, value", [
    ("pipeline.student_seeds", []), ("pipeline.student_seeds", ["a", "b"]), ("pipeline.student_seeds", [0, 0]),
    ("pipeline.student_seeds", [0, 1.5]), ("pipeline.student_seeds", [True]), ("pipeline.student_seeds", 3),
    ("pipeline.equal_student_steps", "maybe"),
    ("student.max_steps", 0),  # a bad budget stops the pipeline before its first step too
])
def test_bad_pipeline_student_settings_stop_before_any_step(base_cfg, key, value):
    from pathlib import Path

    from lightning_modules.stages.pipeline import run_pipeline

    cfg = _with(base_cfg, key, value)
    with pytest.raises(ConfigError, match=rf"`{key}`"):
        run_pipeline(cfg)
    assert not (Path(cfg.paths.run_dir) / "teacher").exists()


# ------------------------------------------------------------------ pure pieces
def test_protocol_maps_to_trainer_arguments():
    from lightning.pytorch.callbacks import EarlyStopping

    epochs, overrides, callbacks = Protocol(15, None, None, None, 0).trainer_args()
    assert (epochs, overrides, callbacks) == (15, {}, [])
    epochs, overrides, callbacks = Protocol(15, 700, 3, 50, 0).trainer_args(accumulate=2)
    assert epochs == -1 and overrides == {"max_steps": 700, "check_val_every_n_epoch": None,
                                          "val_check_interval": 100}
    assert len(callbacks) == 1 and isinstance(callbacks[0], EarlyStopping)
    assert callbacks[0].monitor == "val/acc" and callbacks[0].patience == 3 and callbacks[0].mode == "max"
    assert Protocol(15, None, 3, None, 0).planned_steps(8) == 120
    assert Protocol(15, 700, 3, None, 0).planned_steps(8) == 700


@pytest.mark.parametrize("name, seed, group", [
    ("student_mix_seed2", 2, "student_mix"), ("student_seed0", 0, "student"), ("student", 0, "student"),
    ("student_seed1", 0, "student_seed1"), ("_seed3", 3, "_seed3"),
])
def test_student_group(name, seed, group):
    assert student_group(name, seed) == group


def test_check_seeds():
    assert check_seeds(None, "k") is None and check_seeds([2, 0, 1], "k") == [2, 0, 1]


# ------------------------------------------------------------------ end to end
def _metrics(run, name):
    return json.loads((run / name / "metrics.json").read_text())


def _last_step(run, name):
    """The optimizer steps the Trainer took, from its own last checkpoint."""
    return torch.load(run / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["global_step"]


@pytest.mark.slow
def test_pipeline_students_get_equal_steps_and_seeds(tiny_cfg, tmp_path, single_thread):
    """Real only (96 faces, 3 batches of 32) and real + 1x synthetic (192 faces, 6 batches) at student.max_epochs=1:
    both train the mixed student's 6 optimizer steps; two seeds each, averaged in the report."""
    from synthetic_fixtures import write_toy_synthetic_set

    write_toy_synthetic_set(tmp_path / "syn", n=96, shards=1)
    overrides = ("stage=pipeline", "pipeline.stages=[students]", f"mix.synthetic={tmp_path / 'syn'}",
                 "pipeline.students={student: {mode: real_only}, student_mix: {mode: concat, scale: 1.0}}",
                 "pipeline.student_seeds=[0,1]")
    result = train.run_stage(tiny_cfg(*overrides))
    names = ["student_seed0", "student_seed1", "student_mix_seed0", "student_mix_seed1"]
    assert [result[n] for n in names] == ["ran"] * 4
    run = tmp_path / "run"
    for name in names:
        m = _metrics(run, name)
        mixed = "mix" in name
        assert m["optimizer_steps"] == _last_step(run, name) == 6 and m["max_steps"] == 6
        assert m["epochs"] == (1.0 if mixed else 2.0) and m["train_set_size"] == (192 if mixed else 96)
        assert m["seed"] == int(name[-1]) and m["student_group"] == ("student_mix" if mixed else "student")
        assert not m["stopped_early"] and m["early_stopping_patience"] is None
    # seeds are distinct runs: other initial weights, so other trained weights
    weights = [torch.load(run / n / f"{n}.ckpt", map_location="cpu", weights_only=False)["state_dict"]
               for n in ("student_seed0", "student_seed1")]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0] if weights[0][k].is_floating_point())
    text = (run / "report" / "results.md").read_text()
    accs = [_metrics(run, n)["test/acc"] for n in names[:2]]
    cell = f"{statistics.fmean(accs):.4f} ± {statistics.stdev(accs):.4f} (n=2)"
    assert f"| student | real_only | 96 | 0, 1 | {cell} |" in text
    assert ("Protocol: every student 6 optimizer steps, batch size 32 (equal steps); step budget (student.max_steps); "
            "no early stopping;") in text and "seeds 0, 1 (n = 2 per student)" in text and "did NOT" not in text
    # the budget is derived the same way on a rerun: every student is done, nothing trains again
    again = train.run_stage(tiny_cfg(*overrides))
    assert [again[n] for n in names] == ["skipped"] * 4


@pytest.mark.slow
def test_early_stopping_on_real_val_acc_tests_the_best_checkpoint(tiny_cfg, tmp_path, single_thread):
    cfg = tiny_cfg("stage=student", "student.max_steps=30", "student.val_every_n_steps=1",
                   "student.early_stopping_patience=1", "student.model.lr=0.02")
    run_classifier_stage(cfg, "student")
    m = _metrics(tmp_path / "run", "student")
    assert m["stopped_early"] and m["optimizer_steps"] < 30
    with open(tmp_path / "run" / "student" / "csv" / "metrics.csv") as f:
        val = [float(r["val/acc"]) for r in csv.DictReader(f) if r.get("val/acc")]
    # one validation per step; training stopped one validation after the last improvement (patience 1)
    assert len(val) == m["optimizer_steps"] and val.index(max(val)) == len(val) - 2
    assert m["best_val_acc"] == pytest.approx(max(val))

"""The judge of the generator's evaluation: a teacher that did not guide (``generator.eval.judge=separate``, trained
by the pipeline with another seed), the guiding classifier itself (``guide``) or a named checkpoint; the metrics name
it and say whether it also guided."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import train
from conftest import TINY, compose
from lightning_modules.generator.evaluation import Judge, judge_record, resolve_judge
from lightning_modules.run.runtime import ConfigError


@pytest.mark.parametrize("value, mode, checkpoint", [
    ("separate", "separate", "/run/judge/judge.ckpt"),
    ("guide", "guide", "/run/teacher/teacher.ckpt"),
    ("/elsewhere/strong.ckpt", "path", "/elsewhere/strong.ckpt"),
    (" separate ", "separate", "/run/judge/judge.ckpt"),
])
def test_resolve_judge(value, mode, checkpoint):
    judge = resolve_judge(value, "/run", "/run/teacher/teacher.ckpt")
    assert (judge.mode, str(judge.checkpoint)) == (mode, checkpoint)


def test_resolve_judge_rejects_an_empty_value():
    with pytest.raises(ValueError, match="separate.*guide.*checkpoint path"):
        resolve_judge("  ", "/run", "/run/teacher/teacher.ckpt")


def test_judge_record_says_whether_the_judge_guided(tmp_path):
    guide = tmp_path / "teacher.ckpt"
    guide.write_bytes(b"guiding weights")
    other = tmp_path / "judge.ckpt"
    other.write_bytes(b"other weights!!")
    copy = tmp_path / "copy.ckpt"
    shutil.copy(guide, copy)
    # (judge, SG on) -> (is the guide, also guided)
    table = [(Judge("separate", other, guide), True, False, False),
             (Judge("guide", guide, guide), True, True, True),
             (Judge("guide", guide, guide), False, True, False),       # SG off: nothing guided
             (Judge("path", copy, guide), True, True, True),           # a copy of the guide is the guide
             (Judge("path", guide, guide), True, True, True),
             (Judge("path", other, guide), True, False, False)]
    for judge, guided, is_guide, also in table:
        record = judge_record(judge, guided)
        assert record == {"judge": str(judge.checkpoint), "judge_mode": judge.mode, "judge_is_guide": is_guide,
                          "judge_also_guided": also}, (judge, guided)


# ---------------------------------------------------------------------- the pipeline's judge step
def _labels(cfg):
    from lightning_modules.stages.pipeline import _plan

    return [label for label, _ in _plan(cfg)]


@pytest.mark.parametrize("overrides, has_judge", [
    (["generator.eval.judge=separate"], True),
    (["generator.eval.judge=guide"], False),
    (["generator.eval.judge=separate", "generator.eval.enabled=false", "synth_eval.judge=guide"], False),  # nothing
    (["generator.eval.judge=separate", "generator.eval.enabled=false"], True),    # the synthetic set is judged
    (["generator.eval.judge=guide", "synth_eval.judge=separate"], True),
    (["generator.eval.judge=separate", "pipeline.stages=[teacher,generator,synthesize]"], True),
    (["generator.eval.judge=guide", "synth_eval.judge=separate", "pipeline.stages=[teacher,synthesize]"], False),
    (["generator.eval.judge=separate", "pipeline.stages=[teacher,students]"], False),
    (["generator.eval.judge=separate", "pipeline.stages=[teacher,judge]"], True),  # listed: trained on its own
    # a student that keeps only the faces the separate judge confirms needs it, nothing else does
    (["generator.eval.judge=guide", "synth_eval.judge=guide", "pipeline.stages=[teacher,students]",
      "+pipeline.students.student_judged={mode: concat, min_judge_confidence: 0.5}"], True),
    (["generator.eval.judge=guide", "synth_eval.judge=guide", "pipeline.stages=[teacher,students]",
      "+pipeline.students.student_judged={mode: concat, min_judge_confidence: 0.5, judge: guide}"], False),
    (["generator.eval.judge=guide", "synth_eval.judge=guide", "pipeline.stages=[teacher,students]",
      "mix.min_judge_confidence=0.5", "mix.mode=concat"], True),  # the experiment's mix, via student_mix
])
def test_the_pipeline_trains_a_judge_only_when_it_is_separate(tmp_path, overrides, has_judge):
    labels = _labels(compose([*TINY, "stage=pipeline", *overrides], tmp_path / "run"))
    assert ("judge" in labels) == has_judge
    if has_judge:
        assert labels.index("judge") == labels.index("teacher") + 1
        assert "generator" not in labels or labels.index("judge") < labels.index("generator")


def test_the_judge_is_the_teacher_with_another_seed(tmp_path):
    from lightning_modules.stages import classifier_stage
    from lightning_modules.stages.pipeline import _plan, judge_config

    cfg = compose([*TINY, "stage=pipeline", "generator.eval.judge=separate", "seed=4"], tmp_path / "run")
    judge = judge_config(cfg)
    assert (judge.teacher.name, judge.teacher.seed) == ("judge", 5) and cfg.teacher.name == "teacher"
    out_dir, digest, _, step_cfg = dict(_plan(cfg))["judge"]()
    assert out_dir == tmp_path / "run" / "judge" and digest != classifier_stage.done_digest(cfg, "teacher")
    assert step_cfg.teacher.model == cfg.teacher.model and step_cfg.data == cfg.data
    chosen = compose([*TINY, "stage=pipeline", "generator.eval.judge=separate", "generator.eval.judge_seed=11"],
                     tmp_path / "run")
    assert judge_config(chosen).teacher.seed == 11


@pytest.mark.parametrize("overrides, key", [
    (["generator.eval.judge=separate", "generator.eval.judge_seed=0"], "generator.eval.judge_seed"),  # = teacher's
    (["generator.eval.judge=separate", "generator.eval.judge_seed=soon"], "generator.eval.judge_seed"),
    (["generator.eval.judge=guide", "pipeline.stages=[teacher,judge]"], "pipeline.stages"),
])
def test_bad_judge_settings_stop_the_pipeline_naming_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _labels(compose([*TINY, "stage=pipeline", *overrides], tmp_path / "run"))


@pytest.mark.parametrize("value", ["/nowhere/judge.ckpt", "''"])
def test_a_missing_named_judge_stops_the_generator_before_training(tiny_cfg, value):
    cfg = tiny_cfg("stage=generator", f"generator.eval.judge={value}")
    with pytest.raises(ConfigError, match=r"generator\.eval\.judge"):
        train.run_stage(cfg)
    assert not (Path(cfg.paths.run_dir) / "generator").exists()


@pytest.mark.slow
def test_generator_metrics_name_their_judge(tmp_path):
    """The pipeline trains teacher and judge, the judge scores the SG faces; guide and a named copy re-evaluate."""
    run = tmp_path / "run"
    sg = ["generator.guidance.embedding_scale=1.0", "generator.eval.compare_unguided=false"]
    base = [*TINY, "stage=pipeline", "pipeline.stages=[teacher,generator]", *sg]
    results = train.run_stage(compose([*base, "generator.eval.judge=separate"], run))
    assert results["teacher"] == results["judge"] == results["generator"] == "ran"
    judge_ckpt = run / "judge" / "judge.ckpt"
    assert judge_ckpt.is_file() and json.loads((run / "judge" / "metrics.json").read_text())["seed"] == 1
    metrics = json.loads((run / "generator" / "metrics.json").read_text())
    assert metrics["eval/judge"] == str(judge_ckpt) and metrics["eval/judge_mode"] == "separate"
    assert metrics["eval/judge_is_guide"] is False and metrics["eval/judge_also_guided"] is False
    separate_acc = metrics["eval/fer_acc"]
    # the guide as judge (the generator resumes at max_steps and only re-evaluates): said so in the metrics
    guide = train.run_stage(compose([*TINY, "stage=generator", *sg, "generator.eval.judge=guide"], run))["eval"]
    assert guide["judge"] == str(run / "teacher" / "teacher.ckpt")
    assert guide["judge_is_guide"] is True and guide["judge_also_guided"] is True
    copy = tmp_path / "teacher_copy.ckpt"
    shutil.copy(run / "teacher" / "teacher.ckpt", copy)
    named = train.run_stage(compose([*TINY, "stage=generator", *sg, f"generator.eval.judge={copy}"], run))["eval"]
    assert named["judge_mode"] == "path" and named["judge_also_guided"] is True  # a copy of the guide is the guide
    assert named["fer_acc"] == guide["fer_acc"]   # same faces, same weights: the same score
    assert {separate_acc, guide["fer_acc"]} <= {i / 16 for i in range(17)}  # whole faces of 16


@pytest.mark.parametrize("overrides, refused", [
    (["stage=student", "student.name=judge"], True),      # the judge's folder
    (["stage=student", "student.name=synth_eval"], True),
    (["stage=teacher", "teacher.name=judge"], False),     # the judge is a teacher: the pipeline names it so
])
def test_students_cannot_take_the_judges_folder(tmp_path, overrides, refused):
    from lightning_modules.stages.classifier_stage import check_classifier_config

    cfg = compose([*TINY, *overrides], tmp_path / "run")
    role = overrides[0].split("=")[1]
    if refused:
        with pytest.raises(ConfigError) as err:
            check_classifier_config(cfg, role)
        assert err.value.key == f"{role}.name"
    else:
        check_classifier_config(cfg, role)

"""Low-data protocol: the generator may learn from more faces than the labelled ``data.train_limit`` subset (the
others with label -1 and a generic caption), teachers and students see only the labelled subset, and the
self-training baseline pseudo-labels the very same unlabelled faces into a set the student's mix reads."""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch

from datamodules.labels import UNKNOWN_LABEL
from datamodules.real import RealFERDataModule
from datamodules.unlabelled import check_disjoint, pick_unlabelled
from lightning_modules.run.runtime import ConfigError
from lightning_modules.stages.classifier_stage import build_datamodule, build_student_datamodule
from lightning_modules.stages.generator_stage import build_generator_datamodule, check_generator_config

pytestmark = pytest.mark.usefixtures("single_thread")
N_TRAIN, LABELLED = 96, 40   # TINY's data.toy.n_train
GENERIC = "a close-up photo of a face"
TOY = ["data.num_workers=0", f"data.train_limit={LABELLED}"]


def ids(records) -> set[str]:
    return {r.sample_id for r in records}


@pytest.fixture
def lowdata(tiny_cfg):
    """A toy run whose generator learns from every train face, teachers and students from 40."""
    return tiny_cfg(*TOY, "generator.data.train_limit=null")


def test_teacher_and_student_see_the_labelled_subset_the_generator_more(lowdata):
    teacher = build_datamodule(lowdata)
    teacher.setup("fit")
    student = build_student_datamodule(lowdata)  # mix.mode=real_only
    generator = build_generator_datamodule(lowdata)
    generator.setup("fit")
    labelled = teacher.records["train"]
    assert len(labelled) == LABELLED and all(r.label >= 0 for r in labelled)
    assert student.num_real == len(student.train_dataset) == LABELLED
    assert ids(student.real.records["train"]) == ids(labelled)
    train = generator.records["train"]
    assert len(train) == len(generator.datasets["train"]) == N_TRAIN
    assert ids(train[:LABELLED]) == ids(labelled) and all(r.label >= 0 for r in train[:LABELLED])
    unlabelled = train[LABELLED:]
    assert all(r.label == UNKNOWN_LABEL and r.soft_label is None and r.caption == GENERIC for r in unlabelled)
    assert ids(unlabelled).isdisjoint(ids(generator.records["val"]) | ids(generator.records["test"]))
    assert generator.summary()["train_labelled"] == LABELLED
    assert generator.summary()["train_unlabelled"] == N_TRAIN - LABELLED
    batch = next(iter(generator.train_dataloader()))
    assert (batch["label"] == UNKNOWN_LABEL).any()  # they reach training, as the null class / generic caption


def test_a_numeric_limit_adds_a_seeded_part_of_the_other_faces(tiny_cfg):
    def unlabelled(limit):
        dm = build_generator_datamodule(tiny_cfg(*TOY, f"generator.data.train_limit={limit}"))
        dm.setup("fit")
        return [r.sample_id for r in dm.records["train"] if r.label == UNKNOWN_LABEL]

    some, more = unlabelled(50), unlabelled(70)
    assert len(some) == 10 and len(more) == 30 and set(some) <= set(more)
    assert unlabelled(50) == some
    assert unlabelled(LABELLED) == []  # the default: the generator learns from the labelled subset only
    default = build_generator_datamodule(tiny_cfg(*TOY))
    default.setup("fit")
    assert len(default.records["train"]) == LABELLED


def test_without_expression_labels_the_generator_learns_faces_only(tiny_cfg):
    """The cumulative ablation's base model: no train or val face carries a label, expression caption or AUs; the
    test split keeps its labels (the evaluation asks for expressions); teachers are untouched."""
    dm = build_generator_datamodule(tiny_cfg(*TOY, "generator.data.train_limit=null",
                                             "generator.data.expression_labels=false"))
    dm.setup("fit")
    for split in ("train", "val"):
        assert all(r.label == UNKNOWN_LABEL and r.caption == GENERIC and r.aus is None for r in dm.records[split])
    assert len(dm.records["train"]) == N_TRAIN and all(r.label >= 0 for r in dm.records["test"])
    batch = next(iter(dm.train_dataloader()))
    assert (batch["label"] == UNKNOWN_LABEL).all() and not batch["au_mask"].any()
    assert set(batch["caption"]) == {GENERIC}
    teacher = build_datamodule(tiny_cfg(*TOY, "generator.data.expression_labels=false"))
    teacher.setup("fit")
    assert all(r.label >= 0 and r.aus is not None for r in teacher.records["train"])
    with pytest.raises(ConfigError) as err:
        check_generator_config(tiny_cfg(*TOY, "generator.data.expression_labels=sometimes"))
    assert err.value.key == "generator.data.expression_labels"


@pytest.mark.slow
def test_a_base_model_trains_and_its_grids_still_ask_for_expressions(tiny_cfg, tmp_path, untrained_teacher_ckpt):
    """The base row of the cumulative ablation through the generator stage: the val faces it validates on carry no
    labels, yet the sample grids request one face per expression (they failed with "no labelled records")."""
    from lightning_modules.stages.generator_stage import run_generator_stage

    base = tiny_cfg("stage=generator", *TOY, "generator.data.expression_labels=false",
                    f"generator.eval.judge={untrained_teacher_ckpt}")
    dm = build_generator_datamodule(base)
    dm.setup("fit")
    labelled = build_generator_datamodule(tiny_cfg(*TOY))
    labelled.setup("fit")
    assert all(r.label == UNKNOWN_LABEL for r in dm.records["val"])
    assert [r.label for r in dm.grid_records] == [r.label for r in labelled.records["val"]]
    metrics = run_generator_stage(base)
    assert list((tmp_path / "run" / "generator" / "grids").glob("expressions_*.png")), "no expression grid drawn"
    assert "fer_acc" in metrics["eval"]  # the evaluation asks the base model for expressions too


@pytest.mark.parametrize("overrides, message", [
    (["generator.data.train_limit=20"], "smaller than data.train_limit=40"),
    (["generator.data.train_limit=-5"], "must be a number of faces >= 1 or null"),
    (["generator.data.train_limit=0"], "must be a number of faces >= 1 or null"),
    (["generator.data.train_limit=true"], "must be a number of faces >= 1 or null"),
    (["generator.data.train_limit=many"], "must be a number of faces >= 1 or null"),
    (["data.train_limit=null", "generator.data.train_limit=50"], "fewer faces than the labelled set"),
])
def test_bad_generator_limits_name_the_key(tiny_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_generator_config(tiny_cfg(*TOY, *overrides))
    assert err.value.key == "generator.data.train_limit"


def test_teachers_and_students_cannot_be_given_unlabelled_faces(tiny_cfg):
    with pytest.raises(TypeError):
        RealFERDataModule(format="toy", unlabelled=None)
    with pytest.raises(ConfigError) as err:
        build_datamodule(tiny_cfg(*TOY, "+data.unlabelled=null"))
    assert err.value.key == "data"


def test_pick_is_seeded_and_overlap_is_a_bug():
    pool = list(range(20))
    assert pick_unlabelled(pool, 5, 0) == pick_unlabelled(pool, 5, 0) != pick_unlabelled(pool, 5, 1)
    assert pick_unlabelled(pool, None, 0) == pick_unlabelled(pool, 50, 0) == pool
    with pytest.raises(ValueError, match=">= 0"):
        pick_unlabelled(pool, -1, 0)
    dm = RealFERDataModule(format="toy", toy={"n_train": 30, "n_val": 8, "n_test": 8, "image_size": 32},
                           image_size=32, train_limit=10)
    dm.setup("fit")
    assert len(dm.outside_subset) == 20 and ids(dm.outside_subset).isdisjoint(ids(dm.records["train"]))
    check_disjoint(dm.outside_subset, dm.records)
    twin = dataclasses.replace(dm.records["test"][3])
    with pytest.raises(RuntimeError, match="also in the labelled test split"):
        check_disjoint([*dm.outside_subset, twin], dm.records)


@pytest.fixture
def teacher_ckpt(untrained_teacher_ckpt):
    return untrained_teacher_ckpt


def test_pseudolabel_needs_faces_outside_the_subset(tiny_cfg, teacher_ckpt):
    from lightning_modules.stages.pseudolabel_stage import check_pseudolabel_config

    voter = f"pseudolabel.voters.teacher.checkpoint={teacher_ckpt}"
    with pytest.raises(ConfigError, match="nothing to pseudo-label") as err:
        check_pseudolabel_config(tiny_cfg(*TOY, voter))
    assert err.value.key == "generator.data.train_limit"
    with pytest.raises(ConfigError) as err:
        check_pseudolabel_config(tiny_cfg(*TOY, "generator.data.train_limit=null", "pseudolabel.threshold=2"))
    assert err.value.key == "pseudolabel.voters.teacher.checkpoint"  # checked first: the run's teacher is missing
    with pytest.raises(ConfigError) as err:
        check_pseudolabel_config(tiny_cfg(*TOY, "generator.data.train_limit=null", voter, "pseudolabel.threshold=2"))
    assert err.value.key == "pseudolabel.threshold"


@pytest.mark.slow
def test_pseudolabelled_set_holds_the_generators_unlabelled_faces_only(tiny_cfg, teacher_ckpt):
    """stage=pseudolabel writes the unlabelled faces (gray here) with the voters' labels in the synthetic-store
    format; the mix reads it; no labelled train, val or test face is in it."""
    import train
    from datamodules.synthetic import load_synthetic, read_manifest
    from lightning_modules.stages.pipeline import student_configs

    cfg = tiny_cfg("stage=pseudolabel", *TOY, "generator.data.train_limit=null", "data.color_mode=gray",
                   f"pseudolabel.voters.teacher.checkpoint={teacher_ckpt}", "pseudolabel.chunk_size=25",
                   "pseudolabel.threshold=0.0", "+pipeline.students.student_selftrain={mode: concat, scale: null, "
                   "synthetic: ${paths.run_dir}/pseudolabel/dataset}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = train.run_stage(cfg)
    card = metrics["data_card"]
    assert card["faces"] == card["written"] == card["kept"] == N_TRAIN - LABELLED and card["unreadable"] == 0
    assert isinstance(card["accuracy_vs_dataset_labels"], float)
    dataset_dir = cfg.paths.run_dir + "/pseudolabel/dataset"
    manifest = read_manifest(dataset_dir)
    assert len(manifest["shards"]) == 3 and manifest["meta"]["complete"] is True
    assert manifest["meta"]["source"] == "pseudolabel" and manifest["meta"]["color_mode"] == "gray"
    stored = load_synthetic(dataset_dir)
    assert all(img.mode == "L" for img in stored["image"])
    assert all(c == GENERIC for c in stored["caption"])
    assert list(stored["target_label"]) == list(stored["final_label"])

    generator = build_generator_datamodule(cfg)
    generator.setup("fit")
    assert set(stored["sample_id"]) == {r.sample_id for r in generator.records["train"] if r.label == UNKNOWN_LABEL}
    teacher = build_datamodule(cfg)
    teacher.setup("fit")
    seen = ids(teacher.records["train"]) | ids(teacher.records["val"]) | ids(teacher.records["test"])
    assert seen.isdisjoint(stored["sample_id"])

    student = build_student_datamodule(student_configs(cfg)["student_selftrain"])
    assert student.num_real == LABELLED and student.num_synthetic == N_TRAIN - LABELLED
    batch = next(iter(student.train_dataloader()))
    assert batch["image"].shape[1] == 3 and torch.equal(batch["image"][:, 0], batch["image"][:, 2])
    assert train.run_stage(cfg)["data_card"] == card  # rerun: same faces, same labels


def test_the_pipeline_runs_pseudolabel_before_the_students(tiny_cfg, teacher_ckpt):
    from lightning_modules.stages.pipeline import _plan

    cfg = tiny_cfg(*TOY, "generator.data.train_limit=null", "pipeline.stages=[teacher,pseudolabel,students]",
                   f"pseudolabel.voters.teacher.checkpoint={teacher_ckpt}",
                   "+pipeline.students.student_selftrain={mode: concat, scale: null, "
                   "synthetic: ${paths.run_dir}/pseudolabel/dataset}")
    labels = [label for label, _ in _plan(cfg)]
    assert labels == ["teacher", "pseudolabel", "student", "student_mix", "student_selftrain"]
    out_dir, digest, _, _ = dict(_plan(cfg))["pseudolabel"]()
    assert out_dir.name == "pseudolabel" and digest


@pytest.mark.slow
def test_unreadable_unlabelled_faces_are_counted_and_left_out(tiny_cfg, teacher_ckpt, tmp_path):
    import train
    from datamodules.synthetic import load_synthetic
    from datamodules.toyfaces import ToyFacesConfig
    from datamodules.toyfaces_export import export_toyfaces

    export_toyfaces(ToyFacesConfig(image_size=32, seed=3), {"train": 30, "val": 6, "test": 6}, tmp_path / "export",
                    formats=["ferplus"], sidecars="none")
    cfg = tiny_cfg("stage=pseudolabel", "data=ferplus", f"data.root={tmp_path / 'export' / 'ferplus'}",
                   "data.image_size=32", "data.num_workers=0", "data.train_limit=10",
                   "generator.data.train_limit=null", f"pseudolabel.voters.teacher.checkpoint={teacher_ckpt}",
                   "pseudolabel.threshold=0.0", "data.protocol=8")
    dm = build_datamodule(cfg)
    dm.setup("fit")
    broken = dm.outside_subset[0]
    with open(broken.image, "wb") as f:
        f.write(b"not a png")
    with pytest.warns(UserWarning, match="1 unreadable face"):
        card = train.run_stage(cfg)["data_card"]
    assert card["unreadable"] == 1 and card["written"] == len(dm.outside_subset) - 1
    stored = set(load_synthetic(cfg.paths.run_dir + "/pseudolabel/dataset")["sample_id"])
    assert broken.sample_id not in stored and len(stored) == card["written"]


def test_fer2013_lowdata_compares_synthetic_faces_with_self_training(tmp_path):
    from conftest import compose
    from lightning_modules.stages.pipeline import student_configs

    cfg = compose(["experiment=fer2013_lowdata"], tmp_path)
    assert cfg.data.train_limit == 2871 and cfg.generator.data.train_limit is None
    assert cfg.data.color_mode == "gray"
    stages = list(cfg.pipeline.stages)
    assert stages.index("pseudolabel") < stages.index("students")
    students = student_configs(cfg)
    mix, selftrain = students["student_mix"].mix, students["student_selftrain"].mix
    assert selftrain.synthetic == str(tmp_path / "pseudolabel" / "dataset") and mix.synthetic is None
    same = ("mode", "ratio", "scale", "class_balance", "use_relabel", "kept_only", "synthetic_augment")
    assert {k: mix[k] for k in same} == {k: selftrain[k] for k in same} and mix.mode == "ratio"
    assert list(cfg.pseudolabel.voters) == ["teacher"]  # not FERAnno: it is built on the generator
    from lightning_modules.stages.synthesize_stage import synthesis_guidance

    assert synthesis_guidance(cfg).enabled and cfg.synthesis.guidance.embedding_scale == 1.0  # SG λ = 1, as documented


@pytest.mark.slow
def test_pipeline_self_training_student_end_to_end(tiny_cfg):
    """teacher -> pseudolabel -> students (real only, self-training) -> report, in one run folder."""
    import train

    cfg = tiny_cfg("stage=pipeline", *TOY, "generator.data.train_limit=null",
                   "pipeline.stages=[teacher,pseudolabel,students]", "pseudolabel.threshold=0.0",
                   "~pipeline.students.student_mix", "+pipeline.students.student_selftrain={mode: concat, "
                   "scale: null, synthetic: '${paths.run_dir}/pseudolabel/dataset'}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = train.run_stage(cfg)
    assert [result[s] for s in ("teacher", "pseudolabel", "student", "student_selftrain")] == ["ran"] * 4
    run = Path(cfg.paths.run_dir)
    selftrain = json.loads((run / "student_selftrain" / "metrics.json").read_text())
    real_only = json.loads((run / "student" / "metrics.json").read_text())
    assert real_only["data/train_size"] == selftrain["data/train_size"] == LABELLED
    assert selftrain["data/mix/synthetic_size"] == N_TRAIN - LABELLED


@pytest.mark.parametrize("overrides, expected", [
    ([], {"mode": "concat", "scale": None}),                            # real_only experiment: every kept face
    (["experiment=affectnet8_scale"], {"mode": "concat", "scale": 1.0}),  # the experiment's own mix
    (["mix.mode=ratio", "mix.ratio=0.25", "mix.scale=2.0"], {"mode": "ratio", "scale": 2.0, "ratio": 0.25}),
])
def test_the_experiments_mix_reaches_the_pipelines_mixed_student(tmp_path, overrides, expected):
    from conftest import compose
    from lightning_modules.stages.pipeline import student_configs

    mix = student_configs(compose(overrides, tmp_path))["student_mix"].mix
    assert {k: mix[k] for k in expected} == expected
    plain = student_configs(compose(overrides, tmp_path))["student"].mix
    assert plain.mode == "real_only"


@pytest.mark.parametrize("entry", ["'the experiment'", "3"])
def test_a_student_entry_is_mix_settings_or_experiment(tmp_path, entry):
    from conftest import compose
    from lightning_modules.stages.pipeline import student_configs

    with pytest.raises(ConfigError, match=r"pipeline\.students\.student_mix"):
        student_configs(compose([f"pipeline.students.student_mix={entry}"], tmp_path))

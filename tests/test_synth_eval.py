"""`stage=synth_eval`: a judge scores a synthetic set against its conditions (FER-Acc, AU r, FID/KID vs real)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from datamodules.errors import DataFileNotFound
from datamodules.synthetic import load_synthetic
from lightning_modules.run.runtime import ConfigError
from lightning_modules.stages.synth_eval_stage import evaluate_set, pick, synthetic_conditions
from synthetic_fixtures import write_toy_synthetic_set

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def judge(untrained_teacher_ckpt):
    from lightning_modules.paradigms.teacher import load_teacher

    return load_teacher(untrained_teacher_ckpt)


def test_pick_is_a_seeded_subset():
    assert pick(10, None, 0).tolist() == list(range(10)) == pick(10, 50, 0).tolist()
    a, b, c = pick(100, 20, 1), pick(100, 20, 1), pick(100, 20, 2)
    assert len(set(a.tolist())) == 20 and a.tolist() == sorted(a.tolist())
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_fer_acc_is_the_judges_agreement_with_the_conditioned_labels(tmp_path, judge):
    write_toy_synthetic_set(tmp_path / "set", n=24)
    dataset = load_synthetic(tmp_path / "set")
    images, conds = synthetic_conditions(dataset[:], seed=0)
    with torch.no_grad():
        predicted = judge(torch.nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
                          * 2 - 1)["logits"].argmax(-1)
        metrics = evaluate_set(dataset, judge, 32, list(range(12)), real=images, max_faces=None, seed=0)
    assert metrics["num_samples"] == 24
    assert metrics["fer_acc"] == pytest.approx((predicted == conds.labels).float().mean().item())
    assert "au_pearson_mean" in metrics  # the toy set carries AU targets
    assert metrics["fid"] == pytest.approx(0.0, abs=1e-3)  # the set against itself
    with torch.no_grad():  # real faces without labels: coverage still measured, no real within-class spread
        unlabelled = evaluate_set(dataset, judge, 32, list(range(12)), real=images, max_faces=None, seed=0,
                                  quality_k=2)
    assert unlabelled["quality/real/recall"] is not None and unlabelled["quality/spread_ratio"] is None


def test_fid_grows_against_other_faces(tmp_path, judge):
    write_toy_synthetic_set(tmp_path / "set", n=24)
    dataset = load_synthetic(tmp_path / "set")
    images, _ = synthetic_conditions(dataset[:], seed=0)
    with torch.no_grad():
        noise = evaluate_set(dataset, judge, 32, list(range(12)), real=torch.rand(24, 3, 16, 16,
                             generator=torch.Generator().manual_seed(0)), max_faces=None, seed=0)
    assert noise["fid"] > 0.1 and noise["kid_mean"] > 0


def _stage_cfg(tiny_cfg, tmp_path, judge, n, *overrides):
    """stage=synth_eval over an ``n``-face toy set, judged by ``judge``, synthesized with SG (λ = 1)."""
    write_toy_synthetic_set(tmp_path / "set", n=n)
    return tiny_cfg("stage=synth_eval", f"synth_eval.input={tmp_path / 'set'}", f"synth_eval.judge={judge}",
                    "synthesis.guidance.embedding_scale=1.0", *overrides)


def test_stage_writes_metrics_names_its_judge_and_skips_when_done(tiny_cfg, tmp_path, untrained_teacher_ckpt):
    cfg = _stage_cfg(tiny_cfg, tmp_path, untrained_teacher_ckpt, 16, "synth_eval.max_faces=12",
                     f"synthesis.guidance.classifier={untrained_teacher_ckpt}")
    metrics = train.run_stage(cfg)
    saved = json.loads((Path(cfg.paths.run_dir) / "synth_eval" / "metrics.json").read_text())
    assert saved["num_samples"] == metrics["num_samples"] == 12 and saved["set_size"] == 16
    assert saved["judge"] == str(untrained_teacher_ckpt) and saved["judge_also_guided"] is True
    assert "fid" in saved and saved["real_split"] == "test"
    # coverage at equal numbers: 12 synthetic faces against halves of the tiny test split
    m = saved["quality/faces_per_set"]
    assert 3 < m <= 12 and {"quality/synthetic/precision", "quality/real/recall", "quality/real/fid",
                            "quality/spread_ratio", "quality/synthetic/au_spread"} <= set(saved)
    assert train.run_stage(cfg) == {"skipped": True}


def test_only_rank_zero_scores_the_set(tiny_cfg, tmp_path, untrained_teacher_ckpt, monkeypatch):
    """Under DDP every process runs the step; the others neither score nor write (the pipeline's barrier waits)."""
    from lightning.pytorch.utilities import rank_zero_only

    cfg = _stage_cfg(tiny_cfg, tmp_path, untrained_teacher_ckpt, 8, "synth_eval.fid=false")
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert train.run_stage(cfg) == {"scored_on_rank_zero": True}
    assert not (Path(cfg.paths.run_dir) / "synth_eval" / "metrics.json").exists()
    monkeypatch.setattr(rank_zero_only, "rank", 0)
    assert train.run_stage(cfg)["num_samples"] == 8


def test_a_judge_that_did_not_guide_is_named_so(tiny_cfg, tmp_path, untrained_teacher_ckpt):
    cfg = _stage_cfg(tiny_cfg, tmp_path, untrained_teacher_ckpt, 8, "synth_eval.fid=false",
                     f"synthesis.guidance.classifier={tmp_path / 'other.ckpt'}")
    metrics = train.run_stage(cfg)
    assert metrics["judge_also_guided"] is False and "fid" not in metrics and metrics["real_split"] is None


@pytest.mark.parametrize("override, error, key", [
    ("synth_eval.max_faces=1", ConfigError, "synth_eval.max_faces"),
    ("synth_eval.real_split=holdout", ConfigError, "synth_eval.real_split"),
    ("synth_eval.batch_size=0", ConfigError, "synth_eval.batch_size"),
    ("synth_eval.quality_k=0", ConfigError, "synth_eval.quality_k"),
    ("synth_eval.quality=maybe", ConfigError, "synth_eval.quality"),
    ("synth_eval.judge=/nowhere/judge.ckpt", ConfigError, "synth_eval.judge"),
    ("synth_eval.input=/nowhere/set", DataFileNotFound, "/nowhere/set"),
])
def test_bad_settings_name_the_key(tiny_cfg, tmp_path, untrained_teacher_ckpt, override, error, key):
    cfg = _stage_cfg(tiny_cfg, tmp_path, untrained_teacher_ckpt, 8, override)
    with pytest.raises(error, match=key):
        train.run_stage(cfg)


def test_vote_quality_counts_kept_faces_and_whom_the_judge_sides_with():
    from lightning_modules.stages.synth_eval_stage import vote_quality

    conditioned = torch.tensor([0, 0, 1, 1, 1, 2])
    final = torch.tensor([0, 1, 1, 0, 1, 2])       # faces 1 and 3 relabelled
    kept = torch.tensor([True, True, True, True, False, True])  # face 4 dropped: it never counts
    judge = torch.tensor([0, 1, 2, 1, 1, 0])
    soft = torch.nn.functional.one_hot(final, 3).float()
    soft[0] = torch.tensor([0.5, 0.25, 0.25])
    q = vote_quality(judge, conditioned, final, kept, soft, ["neutral", "happy", "sad"])
    assert q["vote/kept"] == pytest.approx(5 / 6)
    assert q["vote/judge_agrees"] == pytest.approx(2 / 5)  # faces 0 and 1
    assert q["vote/keeps_condition"] == pytest.approx(3 / 5)
    assert q["vote/changed/judge_agrees_vote"] == pytest.approx(1 / 2)  # face 1 yes, face 3 no
    assert q["vote/changed/judge_agrees_condition"] == pytest.approx(1 / 2)  # face 3
    assert q["vote/soft_mass_on_judge"] == pytest.approx((0.5 + 1 + 0 + 0 + 0) / 5)
    assert q["vote/judge_agrees/neutral"] == pytest.approx(1.0)
    assert q["vote/judge_agrees/happy"] == pytest.approx(0.0)  # face 2 (face 4 dropped)
    assert q["vote/judge_agrees/sad"] == pytest.approx(0.0)


def test_vote_quality_of_groups_without_faces_is_none():
    from lightning_modules.stages.synth_eval_stage import vote_quality

    labels = torch.tensor([0, 1])
    q = vote_quality(labels, labels, labels, torch.tensor([True, True]))
    assert q["vote/changed/judge_agrees_vote"] is None and q["vote/judge_agrees"] == 1.0
    assert "vote/soft_mass_on_judge" not in q
    assert vote_quality(labels, labels, labels, torch.tensor([False, False]))["vote/judge_agrees"] is None


def test_a_relabelled_set_gets_the_votes_quality_and_a_plain_one_does_not(tmp_path, judge):
    write_toy_synthetic_set(tmp_path / "set", n=12)
    dataset = load_synthetic(tmp_path / "set")
    with torch.no_grad():
        plain = evaluate_set(dataset, judge, 32, list(range(12)), real=None, max_faces=None, seed=0)
    assert not any(k.startswith("vote/") for k in plain)
    conditioned = torch.tensor(dataset["target_label"])
    final = (conditioned + torch.arange(12) % 2) % 8  # every other face relabelled
    relabelled = (dataset.add_column("final_label", final.tolist()).add_column("kept", [True] * 12)
                  .add_column("soft_label", torch.nn.functional.one_hot(final, 8).float().tolist()))
    with torch.no_grad():
        voted = evaluate_set(relabelled, judge, 32, list(range(12)), real=None, max_faces=8, seed=0)
    assert voted["fer_acc"] == pytest.approx(evaluate_set(dataset, judge, 32, list(range(12)), real=None,
                                                          max_faces=8, seed=0)["fer_acc"])
    assert voted["vote/keeps_condition"] == pytest.approx(
        (final == conditioned)[torch.from_numpy(pick(12, 8, 0))].float().mean().item())
    assert voted["vote/soft_mass_on_judge"] == pytest.approx(voted["vote/judge_agrees"])  # hard labels


# ------------------------------------------------------------------------------------------------ coverage
def _labelled_faces(n=24):
    from synthetic_fixtures import toy_faces
    import torchvision.transforms.v2.functional as TF

    records = toy_faces(n)
    images = torch.stack([TF.to_dtype(TF.to_image(r.image), torch.float32, scale=True) for r in records])
    return images, torch.tensor([r.label for r in records])


def test_coverage_of_real_faces_against_real_faces_and_of_a_collapsed_set(judge):
    from lightning_modules.stages.synth_eval_stage import coverage_metrics

    real, labels = _labelled_faces(24)
    with torch.no_grad():
        same = coverage_metrics(judge, 32, real, labels, real, labels, seed=0, k=2)
        collapsed = coverage_metrics(judge, 32, real[:1].repeat(24, 1, 1, 1), labels, real, labels, seed=0, k=2)
    assert same["quality/faces_per_set"] == 12 and same["quality/k"] == 2
    for key in ("precision", "recall", "fid", "spread", "au_spread"):
        assert same[f"quality/synthetic/{key}"] is not None and same[f"quality/real/{key}"] is not None
    # one face drawn for every condition: no within-class variety, a single point covering (almost) no real face
    assert collapsed["quality/synthetic/spread"] == 0 and collapsed["quality/spread_ratio"] == 0
    assert collapsed["quality/synthetic/au_spread"] == pytest.approx(0, abs=1e-6)
    assert collapsed["quality/synthetic/recall"] <= 1 / 12 < collapsed["quality/real/recall"]
    assert collapsed["quality/synthetic/fid"] > collapsed["quality/real/fid"]


def test_coverage_with_too_few_faces_is_skipped_with_its_reason(judge, caplog):
    from lightning_modules.stages.synth_eval_stage import coverage_metrics

    real, labels = _labelled_faces(6)
    with torch.no_grad(), caplog.at_level("WARNING"):
        out = coverage_metrics(judge, 32, real, labels, real, labels, seed=0, k=3)
    assert list(out) == ["quality/skipped"] and "quality_k=3" in out["quality/skipped"]
    assert "skipped" in caplog.text

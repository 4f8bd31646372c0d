"""Student recipes as mix switches: vote_labels (soft | hard), synthetic_loss_weight, mode=pretrain
(pretrain_fraction) and the judge-confidence filter (min_judge_confidence, judge)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from datamodules.mix import MixedFERDataModule, check_mix
from datamodules.samplers import PretrainBatchSampler
from test_mix import DETERMINISTIC, K, N_REAL, epoch_batches, make_real, one_hot, write_set


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    n = 60
    targets = [i % K for i in range(n)]
    final = [(t + 1) % K if i % 7 == 0 else t for i, t in enumerate(targets)]
    # soft rows (3k): mass 0.6 on the final label, 0.4 on the next class
    soft = [[0.6 * (c == f) + 0.4 * (c == (f + 1) % K) for c in range(K)] if i % 3 == 0 else one_hot(f)
            for i, f in enumerate(final)]
    relabel = {"final_label": final, "soft_label": soft, "is_soft": [i % 3 == 0 for i in range(n)],
               "confidence": [0.9] * n, "kept": [i % 5 != 0 for i in range(n)]}
    return {"relabelled": (root / "relabelled", write_set(root / "relabelled", targets, relabel), relabel),
            "plain": (root / "plain", write_set(root / "plain", [i % K for i in range(120)]))}


def mixed(synthetic, **kw) -> MixedFERDataModule:
    dm = MixedFERDataModule(make_real(augment=DETERMINISTIC), synthetic=str(synthetic), **kw)
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------------------------------------- vote_labels
def test_hard_vote_labels_train_on_the_final_label_even_where_the_vote_was_soft(sets):
    from lightning_modules.paradigms.classifier import FERClassifier

    directory, ids, relabel = sets["relabelled"]
    final = dict(zip(ids, relabel["final_label"]))
    soft = mixed(directory, mode="concat", scale=0.5)
    hard = mixed(directory, mode="concat", scale=0.5, vote_labels="hard")
    assert soft.num_soft > 0 and hard.num_soft == 0
    assert hard.summary()["mix"]["vote_labels"] == "hard" and soft.summary()["mix"]["vote_labels"] == "soft"
    model = FERClassifier(backbone="resnet18", num_classes=K)
    hard_targets, soft_targets = {}, {}
    for dm, out in ((hard, hard_targets), (soft, soft_targets)):
        for batch in epoch_batches(dm):
            for sid, row in zip(batch["sample_id"], model._targets(batch)):
                out[sid] = row
    syn = [s for s in hard_targets if s in final]
    assert len(syn) == 24
    for sid in syn:  # hard: one-hot final labels; soft: the stored distribution
        assert hard_targets[sid].tolist() == one_hot(final[sid])
        assert torch.allclose(soft_targets[sid], torch.tensor(relabel["soft_label"][ids.index(sid)]))
    assert any(hard_targets[s].tolist() != soft_targets[s].tolist() for s in syn)  # the switch changed targets


def test_hard_vote_labels_are_one_hot_rows_where_items_carry_soft_labels(sets):
    """Items that carry the soft_label key (soft_labels=True: e.g. the real data has soft labels) still get one-hot
    rows of the final label under hard."""
    from datamodules.synthetic import SyntheticFERDataset, load_synthetic

    directory, ids, relabel = sets["relabelled"]
    data = load_synthetic(str(directory))
    ds = SyntheticFERDataset(data, 32, K, soft_labels=True, vote_labels="hard")
    for i in (3, 6, 9):  # kept soft rows of the vote
        item = ds[[j for j in range(60) if relabel["kept"][j]].index(i)]
        assert item["soft_label"].tolist() == one_hot(relabel["final_label"][i]) and int(item["label"]) == \
            relabel["final_label"][i]
    with pytest.raises(ValueError, match=r"^mix\.vote_labels must be one of soft, hard"):
        SyntheticFERDataset(data, 32, K, vote_labels="argmax")


# ---------------------------------------------------------------------------------------------- loss weight
def test_synthetic_loss_weight_reaches_every_item_and_the_training_loss(sets):
    from lightning_modules.paradigms.classifier import FERClassifier
    from lightning_modules.paradigms.losses import hard_to_soft

    directory, ids = sets["plain"]
    dm = mixed(directory, mode="ratio", ratio=0.5, scale=1.0, synthetic_loss_weight=0.25)
    assert dm.summary()["mix"]["synthetic_loss_weight"] == 0.25
    batch = epoch_batches(dm)[0]
    is_syn = torch.tensor([s in ids for s in batch["sample_id"]])
    assert is_syn.sum() == 4 and batch["weight"].tolist() == [0.25 if s else 1.0 for s in is_syn]
    torch.manual_seed(0)
    model = FERClassifier(backbone="resnet18", num_classes=K, channels_last=False).eval()
    with torch.no_grad():
        out = model(batch["image"])
        per_row = -(hard_to_soft(batch["label"], K) * out["logits"].log_softmax(1)).sum(1)
        expected = (per_row * batch["weight"]).mean()
        assert torch.allclose(model._loss(batch, out, weighted=True)["cls"], expected)
        # validation / test: unweighted (their real-only batches carry no weight anyway)
        assert torch.allclose(model._loss(batch, out)["cls"], per_row.mean())
        assert not torch.allclose(expected, per_row.mean())


@pytest.mark.parametrize("kw", [{}, {"synthetic_loss_weight": 1.0}, {"mode": "real_only"}])
def test_default_weight_adds_no_weight_key(sets, kw):
    """Weight 1 is today's loss exactly: the items carry no weight (batches stay as they were)."""
    dm = mixed(sets["plain"][0], **{"mode": "concat", "scale": 1.0, **kw})
    assert "weight" not in epoch_batches(dm)[0]


def test_zero_weight_is_a_control_in_concat_and_refused_where_nothing_else_trains(sets):
    dm = mixed(sets["plain"][0], mode="concat", scale=1.0, synthetic_loss_weight=0.0)
    weights = torch.cat([b["weight"] for b in epoch_batches(dm)])
    assert (weights == 0).sum() == N_REAL and (weights == 1).sum() == N_REAL
    for mode in ("synthetic_only", "pretrain"):
        with pytest.raises(ValueError, match=rf"^mix\.synthetic_loss_weight=0 leaves every sample of mix\.mode={mode}"):
            MixedFERDataModule(make_real(), str(sets["plain"][0]), mode=mode, synthetic_loss_weight=0)


# ---------------------------------------------------------------------------------------------- pretrain
def _phases(sampler, epochs, num_real):
    """Per epoch: for each batch, True when all its indices are synthetic (asserts no batch mixes sources)."""
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        phases = []
        for batch in sampler:
            syn = [i >= num_real for i in batch]
            assert all(syn) or not any(syn)
            phases.append(syn[0])
        out.append(phases)
    return out


@pytest.mark.parametrize("accumulate, switch", [(1, 7), (1, 3), (2, 4), (3, 5)])
def test_pretrain_phase_switches_at_the_optimizer_step_across_epochs(accumulate, switch):
    # 20 real + 30 synthetic, batch 8: an epoch = ceil(50 / 8) = 7 batches
    sampler = PretrainBatchSampler(20, 30, 8, switch_step=switch, seed=3, accumulate=accumulate)
    assert len(sampler) == 7
    steps_per_epoch = math.ceil(7 / accumulate)  # Lightning steps on the last partial window too
    for epoch, phases in enumerate(_phases(sampler, 4, 20)):
        steps = [epoch * steps_per_epoch + b // accumulate for b in range(7)]
        assert phases == [s < switch for s in steps]
        assert all(len(batch) == 8 for batch in sampler)


def test_pretrain_sampler_rank_split_determinism_and_epoch_limit():
    one = PretrainBatchSampler(20, 30, 4, switch_step=9, seed=1)
    ranks = [PretrainBatchSampler(20, 30, 4, switch_step=9, seed=1, rank=r, world_size=2) for r in (0, 1)]
    assert len(one) == 13 and [len(r) for r in ranks] == [7, 7]  # 13 global batches padded to 14
    for epoch in range(3):
        for r in ranks:
            r.set_epoch(epoch)
        batches = [list(r) for r in ranks]
        for b in range(7):  # both ranks take the optimizer step b together: same phase
            step = epoch * 7 + b
            assert (batches[0][b][0] >= 20) == (batches[1][b][0] >= 20) == (step < 9)
        if epoch == 0:  # all synthetic: global batch g = 2 b + r; the ranks split one stream (a permutation first)
            flat = [i for b in range(7) for r in (0, 1) for i in batches[r][b]]
            assert sorted(flat[:30]) == list(range(20, 50))
        assert batches[0] != batches[1]
    # same seed + epoch: same batches; another epoch or seed: another order
    a, b = PretrainBatchSampler(20, 30, 4, 9, seed=1), PretrainBatchSampler(20, 30, 4, 9, seed=1)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b) and list(a) != list(PretrainBatchSampler(20, 30, 4, 9, seed=2))
    # limit_train_batches: Lightning draws 5 of the 13 batches per epoch, so epoch 1 starts at step 5
    limited = PretrainBatchSampler(20, 30, 4, switch_step=7, epoch_batches=5)
    assert _phases(limited, 2, 20)[1][:5] == [True, True, False, False, False]


def test_pretrain_synthetic_phase_covers_the_synthetic_faces_evenly():
    sampler = PretrainBatchSampler(16, 24, 8, switch_step=100)  # all synthetic: 40 faces -> 5 batches
    drawn = [i for batch in sampler for i in batch]
    assert sorted(drawn) == sorted(list(range(16, 40)) + drawn[24:])  # one full permutation first, then cycling
    assert len(set(drawn[:24])) == 24


def test_pretrain_budget_from_max_steps_or_epochs_and_errors(sets):
    dm = mixed(sets["plain"][0], mode="pretrain", scale=1.0, pretrain_fraction=0.25)
    with pytest.raises(ValueError, match=r"mix\.mode=pretrain needs the student's step budget"):
        dm.train_dataloader()
    dm.configure_steps(max_steps=40, max_epochs=1)
    assert dm.steps == {"total": 40, "switch": 10}
    dm.configure_steps(max_steps=None, max_epochs=3, accumulate=2)  # 96 faces / 8 = 12 batches = 6 steps an epoch
    assert dm.steps == {"total": 18, "switch": 4} and len(dm.train_dataloader()) == 12
    summary = dm.summary()["mix"]
    assert (summary["pretrain_fraction"], summary["pretrain_switch_step"], summary["pretrain_total_steps"]) == \
        (0.25, 4, 18)
    with pytest.raises(ValueError, match=r"^mix\.pretrain_fraction=0\.25 of the student's 1 optimizer steps leaves no "
                                         r"synthetic step"):
        dm.configure_steps(max_steps=1, max_epochs=1)


def test_pretrain_under_a_trainer_switches_at_the_step(sets):
    """A real fit with gradient accumulation over two epochs: the optimizer steps before the switch saw only
    synthetic faces, the rest only real ones."""
    import lightning as L

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[tuple[int, bool]] = []

        def training_step(self, batch, _):
            syn = [s.startswith("syn-") for s in batch["sample_id"]]
            assert all(syn) or not any(syn)
            self.seen.append((self.global_step, syn[0]))
            return (self.w * batch["image"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = mixed(sets["plain"][0], mode="pretrain", scale=1.0, pretrain_fraction=0.6)
    dm.configure_steps(max_steps=None, max_epochs=2, accumulate=5)  # 12 batches = 3 steps an epoch (5, 5, 2)
    assert dm.steps == {"total": 6, "switch": 4}
    model = Recorder()
    L.Trainer(max_epochs=2, accumulate_grad_batches=5, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
              limit_val_batches=0, accelerator="cpu", devices=1).fit(model, datamodule=dm)
    assert len(model.seen) == 24
    assert [syn for _, syn in model.seen] == [True] * 12 + [True] * 5 + [False] * 7  # step 3 = batches 12..16
    assert all(syn == (step < 4) for step, syn in model.seen)


# ---------------------------------------------------------------------------------------------- judge filter
def test_judge_filter_keeps_confident_faces_before_scale_and_caches(sets, untrained_teacher_ckpt, tmp_path,
                                                                    monkeypatch):
    from lightning_modules.paradigms import judge_filter

    directory, ids, relabel = sets["relabelled"]
    kept = [i for i in range(60) if relabel["kept"][i]]
    from datamodules.synthetic import load_synthetic

    rows = load_synthetic(str(directory)).select(kept)
    probs = judge_filter.score(rows, untrained_teacher_ckpt, 32)
    labels = judge_filter.training_labels(rows, True, "soft")
    assert list(labels) == [int(np.argmax(relabel["soft_label"][i])) for i in kept]
    label_prob = probs[torch.arange(len(kept)), torch.as_tensor(labels)].numpy()
    threshold = float(np.sort(label_prob)[len(kept) // 3])  # keeps two thirds of the 48 usable faces
    confident_ids = [ids[i] for i, p in zip(kept, label_prob) if p >= threshold]
    cache = tmp_path / "student" / "judge_scores"
    dm = mixed(directory, mode="concat", scale=0.25, min_judge_confidence=threshold,
               judge=str(untrained_teacher_ckpt), score_cache=str(cache))  # 12 of the confident faces
    used = [s for b in epoch_batches(dm) for s in b["sample_id"] if s in ids]
    assert sorted(used) == sorted(confident_ids[:12])
    summary = dm.summary()["mix"]
    assert summary["judge_kept"] == len(confident_ids) and summary["judge_scored"] == 48
    assert sum(summary["judge_kept_per_class"]) == len(confident_ids) and summary["min_judge_confidence"] == threshold
    assert len(list(cache.glob("*.pt"))) == 1 and not list(directory.rglob("*.pt"))  # never in the set's folder
    # the cached scores are reused: no second scoring
    monkeypatch.setattr(judge_filter, "score", lambda *a, **k: pytest.fail("scored twice"))
    again = mixed(directory, mode="concat", scale=0.25, min_judge_confidence=threshold,
                  judge=str(untrained_teacher_ckpt), score_cache=str(cache))
    assert again.summary()["mix"]["judge_kept"] == len(confident_ids)
    # too few left for mix.scale: the error names the key and the counts
    with pytest.raises(ValueError, match=rf"^mix\.min_judge_confidence={threshold} keeps {len(confident_ids)} of 48 "
                                         r"usable synthetic faces.*mix\.scale=1\.0 needs 48"):
        mixed(directory, mode="concat", scale=1.0, min_judge_confidence=threshold, judge=str(untrained_teacher_ckpt),
              score_cache=str(cache))


def test_judge_filter_uses_the_label_the_student_learns(sets, untrained_teacher_ckpt):
    """use_relabel=false: the conditioned label is judged; vote_labels=hard: the final label."""
    from datamodules.synthetic import load_synthetic
    from lightning_modules.paradigms.judge_filter import training_labels

    directory, ids, relabel = sets["relabelled"]
    rows = load_synthetic(str(directory))
    assert list(training_labels(rows, False, "soft")) == [i % K for i in range(60)]
    assert list(training_labels(rows, True, "hard")) == relabel["final_label"]


def test_judge_errors_name_the_key(sets, untrained_teacher_ckpt, tmp_path):
    directory = sets["plain"][0]
    with pytest.raises(ValueError, match=rf"^mix\.judge={tmp_path}/none\.ckpt: no judge checkpoint at "):
        mixed(directory, mode="concat", min_judge_confidence=0.5, judge=str(tmp_path / "none.ckpt"))
    with pytest.raises(ValueError, match=r"^mix\.min_judge_confidence=0\.999 keeps 0 of 120"):
        mixed(directory, mode="concat", scale=None, min_judge_confidence=0.999, judge=str(untrained_teacher_ckpt))


def test_judge_of_another_class_count_is_refused(sets, tmp_path):
    from lightning_modules.paradigms.teacher import FERTeacher

    teacher = FERTeacher(backbone="resnet18", num_classes=7, num_aus=12, channels_last=False)
    path = tmp_path / "seven.ckpt"
    torch.save({"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams),
                "pytorch-lightning_version": "2.6.0"}, path)
    with pytest.raises(ValueError, match=r"^mix\.judge: .*seven\.ckpt predicts 7 classes, the student's data has 8"):
        mixed(sets["plain"][0], mode="concat", min_judge_confidence=0.5, judge=str(path))


# ---------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("kwargs, message", [
    ({"vote_labels": "argmax"}, r"^mix\.vote_labels must be one of soft, hard, got 'argmax'"),
    ({"synthetic_loss_weight": -0.5}, r"^mix\.synthetic_loss_weight must be a number >= 0"),
    ({"synthetic_loss_weight": "half"}, r"^mix\.synthetic_loss_weight must be a number >= 0"),
    ({"synthetic_loss_weight": float("nan")}, r"^mix\.synthetic_loss_weight must be a number >= 0"),
    ({"mode": "synthetic_only", "synthetic": "x", "synthetic_loss_weight": 0}, r"^mix\.synthetic_loss_weight=0"),
    ({"pretrain_fraction": 0}, r"^mix\.pretrain_fraction must be in \(0, 1\)"),
    ({"pretrain_fraction": 1.0}, r"^mix\.pretrain_fraction must be in \(0, 1\)"),
    ({"pretrain_fraction": True}, r"^mix\.pretrain_fraction must be in \(0, 1\)"),
    ({"mode": "pretrain", "synthetic": "x", "scale": 0}, r"^mix\.scale must be > 0 for mix\.mode=pretrain"),
    ({"mode": "pretrain"}, r"^mix\.synthetic must name"),
    ({"min_judge_confidence": 1.0}, r"^mix\.min_judge_confidence must be in \(0, 1\) or null"),
    ({"min_judge_confidence": 0}, r"^mix\.min_judge_confidence must be in \(0, 1\) or null"),
    ({"min_judge_confidence": "high"}, r"^mix\.min_judge_confidence must be in \(0, 1\) or null"),
    ({"judge": ""}, r"^mix\.judge must be separate, guide or a checkpoint path"),
    ({"judge": 3}, r"^mix\.judge must be separate, guide or a checkpoint path"),
])
def test_bad_recipe_values_name_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_mix(**kwargs)


# ---------------------------------------------------------------------------------------------- from the config
@pytest.mark.parametrize("entry, key", [
    ("{mode: concat, vote_labels: hardest}", "mix.vote_labels"),
    ("{mode: pretrain, pretrain_fraction: 1.5}", "mix.pretrain_fraction"),
    ("{mode: synthetic_only, synthetic_loss_weight: 0}", "mix.synthetic_loss_weight"),
    ("{mode: concat, min_judge_confidence: 2}", "mix.min_judge_confidence"),
])
def test_pipeline_student_entries_check_the_recipe_keys(tiny_cfg, entry, key):
    """A ``pipeline.students`` entry's recipe keys merge over ``mix`` and are checked like the student's own."""
    from lightning_modules.run.runtime import ConfigError
    from lightning_modules.stages.classifier_stage import check_mix_config
    from lightning_modules.stages.pipeline import student_configs

    cfg = tiny_cfg("stage=pipeline", "pipeline.stages=[students]", "mix.synthetic=/nowhere",
                   f"pipeline.students={{student: {{mode: real_only}}, student_mix: {entry}}}")
    students = student_configs(cfg)
    check_mix_config(students["student"])
    with pytest.raises(ConfigError, match=rf"`{key}`"):
        check_mix_config(students["student_mix"])


def test_missing_judge_is_a_config_error_naming_mix_judge_and_the_path(tiny_cfg, tmp_path):
    from synthetic_fixtures import write_toy_synthetic_set

    from lightning_modules.run.runtime import ConfigError
    from lightning_modules.stages.classifier_stage import build_student_datamodule

    write_toy_synthetic_set(tmp_path / "syn", n=8, shards=1)
    for judge, path in (("separate", tmp_path / "run" / "judge" / "judge.ckpt"), (str(tmp_path / "j.ckpt"),
                                                                                   tmp_path / "j.ckpt")):
        cfg = tiny_cfg("stage=student", "mix.mode=concat", f"mix.synthetic={tmp_path / 'syn'}",
                       "mix.min_judge_confidence=0.5", f"mix.judge={judge}")
        with pytest.raises(ConfigError, match=rf"`mix\.judge`.*no judge checkpoint at {path}"):
            build_student_datamodule(cfg)


def _student_metrics(run, name="student"):
    import json

    return json.loads((run / name / "metrics.json").read_text())


@pytest.mark.slow
def test_pretrain_student_end_to_end(tiny_cfg, tmp_path, single_thread):
    from synthetic_fixtures import write_toy_synthetic_set

    from lightning_modules.stages.classifier_stage import run_classifier_stage

    write_toy_synthetic_set(tmp_path / "syn", n=96, shards=1)
    cfg = tiny_cfg("stage=student", "mix.mode=pretrain", f"mix.synthetic={tmp_path / 'syn'}", "mix.scale=1.0",
                   "mix.pretrain_fraction=0.25", "student.max_steps=8", "+trainer.accumulate_grad_batches=2",
                   "student.early_stopping_patience=1", "student.val_every_n_steps=1")
    run_classifier_stage(cfg, "student")
    m = _student_metrics(tmp_path / "run")
    mix = {k[len("data/mix/"):]: v for k, v in m.items() if k.startswith("data/mix/")}  # metrics.json is flat
    # early stopping (patience 1) may end the run, but not before two validations of the real phase
    assert 4 <= m["optimizer_steps"] <= 8 and (mix["mode"], mix["pretrain_fraction"]) == ("pretrain", 0.25)
    assert (mix["pretrain_switch_step"], mix["pretrain_total_steps"]) == (2, 8)
    assert m["train_batches_per_epoch"] == 6 and m["train_set_size"] == 192  # an epoch = one pass over both


@pytest.mark.slow
def test_weighted_hard_judge_filtered_student_end_to_end(tiny_cfg, tmp_path, single_thread, untrained_teacher_ckpt):
    from synthetic_fixtures import write_toy_synthetic_set

    from lightning_modules.stages.classifier_stage import run_classifier_stage

    write_toy_synthetic_set(tmp_path / "syn", n=96, shards=1)
    cfg = tiny_cfg("stage=student", "mix.mode=ratio", f"mix.synthetic={tmp_path / 'syn'}", "mix.scale=0.25",
                   "mix.synthetic_loss_weight=0.5", "mix.vote_labels=hard", "mix.min_judge_confidence=0.05",
                   f"mix.judge={untrained_teacher_ckpt}", "student.max_steps=2")
    run_classifier_stage(cfg, "student")
    m = _student_metrics(tmp_path / "run")
    mix = {k[len("data/mix/"):]: v for k, v in m.items() if k.startswith("data/mix/")}  # metrics.json is flat
    assert m["optimizer_steps"] == 2 and mix["synthetic_loss_weight"] == 0.5 and mix["vote_labels"] == "hard"
    assert mix["min_judge_confidence"] == 0.05 and mix["judge"] == str(untrained_teacher_ckpt)
    assert 24 <= mix["judge_kept"] <= mix["judge_scored"] == 96 and mix["synthetic_size"] == 24
    assert len(list((tmp_path / "run" / "student" / "judge_scores").glob("*.pt"))) == 1
    assert not list((tmp_path / "syn").rglob("*.pt"))


@pytest.mark.parametrize("with_callback, last_step", [(False, 2), (True, 7)])
def test_early_stopping_counts_the_real_phase_only(sets, with_callback, last_step):
    """val/acc only falls, patience 1, validation every step, switch at step 5: plain early stopping ends the run in
    the synthetic phase (step 2); with the pretrain callback it cannot, and starts afresh at the switch (first real
    validation after step 6 sets the best, the next one stops: step 7)."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping

    from lightning_modules.paradigms.student import pretrain_phase_callback

    class Falling(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, _):
            return (self.w * batch["image"].mean()).sum()

        def validation_step(self, batch, _):
            self.log("val/acc", -float(self.global_step))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = mixed(sets["plain"][0], mode="pretrain", scale=1.0)
    dm.configure_steps(max_steps=10, max_epochs=1)
    assert dm.steps["switch"] == 5
    callbacks = [EarlyStopping(monitor="val/acc", mode="max", patience=1)]
    callbacks += [pretrain_phase_callback()] if with_callback else []
    trainer = L.Trainer(max_steps=10, val_check_interval=1, check_val_every_n_epoch=None, limit_val_batches=1,
                        callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, accelerator="cpu", devices=1)
    trainer.fit(Falling(), datamodule=dm)
    assert trainer.global_step == last_step


def test_pretrain_class_balance_weighs_each_source_on_its_own(sets):
    dm = mixed(sets["plain"][0], mode="pretrain", scale=1.0, class_balance=True)
    dm.configure_steps(max_steps=40, max_epochs=1)
    sampler = dm.train_sampler()
    assert isinstance(sampler, PretrainBatchSampler)
    assert len(sampler.real_weights) == N_REAL and len(sampler.synthetic_weights) == N_REAL
    # the draws follow the weights: all synthetic mass on one face -> every synthetic batch is that face
    one = PretrainBatchSampler(8, 16, 4, switch_step=3, synthetic_weights=torch.eye(16, dtype=torch.double)[5])
    batches = list(one)
    assert all(batch == [8 + 5] * 4 for batch in batches[:3]) and all(max(batch) < 8 for batch in batches[3:])


def test_default_recipe_keys_keep_a_finished_students_digest(tiny_cfg, tmp_path):
    """Students trained before the recipe keys existed stay done; a changed recipe is another run."""
    from omegaconf import open_dict

    from lightning_modules.stages.classifier_stage import done_digest

    cfg = tiny_cfg("stage=student", "mix.mode=concat", f"mix.synthetic={tmp_path / 'syn'}")
    before = cfg.copy()
    with open_dict(before):
        for key in ("vote_labels", "synthetic_loss_weight", "pretrain_fraction", "min_judge_confidence", "judge"):
            before.mix.pop(key)
    assert done_digest(cfg, "student") == done_digest(before, "student")
    for key, value in (("vote_labels", "hard"), ("synthetic_loss_weight", 0.5), ("pretrain_fraction", 0.3),
                       ("min_judge_confidence", 0.5)):
        other = cfg.copy()
        other.mix[key] = value
        assert done_digest(other, "student") != done_digest(cfg, "student"), key

"""Two-phase generator training: phase 1 trains the UNet, text encoder and class embedding with the AU branch off,
phase 2 the AU adapter alone; the schedule's config errors; an exact resume across the phase boundary."""
import json

import pytest
import torch

import train
from tests.conftest import TINY, compose
from lightning_modules.generator.conditioning import au_attention_scale
from lightning_modules.generator.module import FERGenerator
from lightning_modules.generator.phases import PhaseSchedule, adapter_ids, resolve_schedule
from lightning_modules.run.runtime import ConfigError

TWO = ["generator.training.schedule=two_phase", "generator.eval.enabled=false", "generator.grids.every_n_steps=0",
       "generator.val_every_n_epochs=100", "generator.checkpoint_every_n_steps=1", "generator.model.ema_decay=0.9",
       "generator.model.warmup_steps=0"]


@pytest.mark.parametrize("training, max_steps, phases", [
    ({}, 10, (5, 5)),
    ({"phase1_fraction": 0.3}, 10, (3, 7)),
    ({"phase1_steps": 4}, 10, (4, 6)),
    ({"phase2_steps": 4}, 10, (6, 4)),
    ({"phase1_steps": 1, "phase2_steps": 9}, 10, (1, 9)),
])
def test_phase_steps_resolve(training, max_steps, phases):
    schedule = resolve_schedule({"schedule": "two_phase", **training}, max_steps, -1, 1e-3)
    assert (schedule.phase1_steps, schedule.phase2_steps) == phases
    assert schedule.phase1_lr == schedule.phase2_lr == 1e-3  # null: generator.model.lr
    assert [schedule.phase_at(s) for s in (0, phases[0] - 1, phases[0], max_steps - 1)] == [1, 1, 2, 2]
    assert resolve_schedule({"phase1_steps": 0}, 10, 3, 1e-3) == PhaseSchedule()  # one_phase ignores the rest


@pytest.mark.parametrize("overrides, key", [
    ("generator.training.schedule=three_phase", "generator.training.schedule"),
    ("generator.training.phase1_steps=0", "generator.training.phase1_steps"),
    ("generator.training.phase2_steps=-1", "generator.training.phase2_steps"),
    ("generator.training.phase1_steps=1 generator.training.phase2_steps=5", "generator.training.phase2_steps"),
    ("generator.training.phase1_steps=2", "generator.training.phase1_steps"),  # max_steps=2: no phase 2 left
    ("generator.training.phase1_fraction=1.0", "generator.training.phase1_fraction"),
    ("generator.training.phase1_fraction=0.1", "generator.training.phase1_fraction"),  # 0 of 2 steps
    ("generator.training.phase2_lr=0", "generator.training.phase2_lr"),
    ("generator.max_epochs=3", "generator.max_epochs"),
    ("generator.model.au_adapter=false", "generator.training.schedule"),
    ("data.au_source=none", "generator.training.schedule"),
])
def test_phase_config_errors_name_their_key(tiny_cfg, overrides, key):
    with pytest.raises(ConfigError) as err:
        train.run_stage(tiny_cfg("stage=generator", *TWO, *overrides.split()))
    assert err.value.key == key


def _adapter_names(model) -> set[str]:
    au = adapter_ids(model)
    return {n for n, p in model.named_parameters() if id(p) in au}


@pytest.mark.slow
def test_phase1_trains_captions_and_phase2_the_au_adapter_alone(tiny_cfg, tmp_path, monkeypatch, single_thread):
    before, after, grads, scales, shadows, models = [], [], [], [], [], []
    start = FERGenerator.on_train_batch_start

    def on_start(self, batch, batch_idx):
        start(self, batch, batch_idx)  # switches the phase first
        models.append(self)
        before.append({n: p.detach().clone() for n, p in self.named_parameters()})
        grads.append({n: p.requires_grad for n, p in self.named_parameters()})
        scales.append(au_attention_scale(self.au_processors))

    def on_end(self, outputs, batch, batch_idx):
        after.append({n: p.detach().clone() for n, p in self.named_parameters()})
        shadows.append([s.clone() for s in self.ema.shadow_params])

    monkeypatch.setattr(FERGenerator, "on_train_batch_start", on_start)
    monkeypatch.setattr(FERGenerator, "on_train_batch_end", on_end, raising=False)
    metrics = train.run_stage(tiny_cfg("stage=generator", *TWO, "generator.max_steps=4",
                                       "generator.training.phase1_steps=2", "generator.model.label_conditioning=true"))
    assert metrics["steps"] == 4 and len(before) == len(after) == 4
    model = models[0]
    adapter = _adapter_names(model)
    trained = set(model._trainable_names)
    first = trained - adapter
    assert adapter and any(n.startswith("unet.class_embedding") for n in first)
    assert any(n.startswith("text_encoder.") for n in first)

    def changed(a, b, names):
        return {n for n in names if not torch.equal(a[n], b[n])}

    # phase 1: captions only; the AU adapter is frozen and its attention branch off
    assert not changed(before[0], after[1], adapter)
    assert changed(before[0], after[1], first) == first
    assert all(not grads[k][n] for k in (0, 1) for n in adapter) and all(grads[0][n] for n in first)
    assert scales[:2] == [0.0, 0.0] and scales[2:] == [1.0, 1.0]
    # the boundary: the phase-1 parts take their EMA weights (the UNet that sampling uses)
    names = model._trainable_names
    for i, n in enumerate(names):
        if n in first:
            assert torch.equal(before[2][n], shadows[1][i]), n
    # phase 2: the AU adapter alone; UNet, text encoder and class embedding keep their weights
    assert not changed(before[2], after[3], set(before[2]) - adapter)
    assert changed(before[2], after[3], adapter) == adapter
    assert all(grads[k][n] for k in (2, 3) for n in adapter) and not any(grads[2][n] for n in first)
    # the schedule is recorded with the pipeline and in the metrics; the saved AU branch is on
    pipeline = tmp_path / "run" / "generator" / "pipeline"
    recorded = json.loads((pipeline / "training_data.json").read_text())["training_schedule"]
    assert recorded == {"schedule": "two_phase", "phase1_steps": 2, "phase2_steps": 2, "phase1_lr": 1e-3,
                        "phase2_lr": 1e-3}
    assert metrics["training_data"]["training_schedule"] == recorded
    assert json.loads((pipeline / "au_adapter.json").read_text())["au_attn_scale"] == 1.0


@pytest.mark.slow
def test_run_killed_in_phase2_resumes_to_the_uninterrupted_weights(tiny_cfg, tmp_path, monkeypatch, single_thread):
    # 32 faces in batches of 16: 2 steps an epoch; phase 1 = epoch 1, phase 2 = epochs 2-3, killed after epoch 2
    args = ["stage=generator", *TWO, "data.toy.n_train=32", "generator.max_steps=6",
            "generator.training.phase1_steps=2"]
    whole = train.run_stage(compose([*TINY, *args], tmp_path / "whole"))
    assert whole["steps"] == 6

    class Killed(Exception):
        pass

    def kill(self, outputs, batch, batch_idx):  # after the step's checkpoint (callbacks run first)
        if self.global_step == 4:
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(FERGenerator, "on_train_batch_end", kill, raising=False)
        with pytest.raises(Killed):
            train.run_stage(tiny_cfg(*args))
    resumed = train.run_stage(tiny_cfg(*args))
    assert resumed["resumed_from"].endswith("last.ckpt") and resumed["steps"] == 6
    a = torch.load(tmp_path / "whole" / "generator" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "run" / "generator" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name
    for x, y in zip(a["ema"]["shadow_params"], b["ema"]["shadow_params"]):
        assert torch.equal(x, y)


def test_lora_phases_split_lora_and_class_embedding_from_the_au_adapter(tmp_path, single_thread):
    from lightning_modules.generator.phases import apply_phase, phase_groups
    from tests.tiny_sd import save_tiny_sd

    schedule = {"schedule": "two_phase", "phase1_steps": 1, "phase2_steps": 1, "phase1_lr": 1e-4, "phase2_lr": 1e-3}
    model = FERGenerator(backbone="pretrained", pretrained_path=str(save_tiny_sd(tmp_path / "sd")), image_size=32,
                         finetune="lora", lora_rank=2, au_hidden_dim=16, label_conditioning=True, ema_decay=None,
                         training_schedule=schedule)
    names = {id(p): n for n, p in model.named_parameters()}
    first, adapter = (sorted(names[id(p)] for p in group) for group in phase_groups(model))
    # phase 1: the LoRA layers and the class embedding only (the pretrained UNet and text encoder stay frozen)
    assert first and all("lora_" in n or n.startswith("unet.class_embedding") for n in first)
    assert any(n.startswith("unet.class_embedding") for n in first)
    assert adapter and all(n.startswith(("au_encoder.", "au_processors.")) or "_ip." in n for n in adapter)
    trainable = lambda: {n for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    apply_phase(model, 2)
    assert trainable() == set(adapter) and au_attention_scale(model.au_processors) == 1.0
    apply_phase(model, 1)
    assert trainable() == set(first) and au_attention_scale(model.au_processors) == 0.0
    # the optimizer: one group per phase with its own peak lr
    from lightning_modules.generator.phases import PhaseSchedule, two_phase_optimizer

    opt = two_phase_optimizer(model, PhaseSchedule.from_dict(schedule))
    sched = opt["lr_scheduler"]["scheduler"]
    assert [len(g["params"]) for g in opt["optimizer"].param_groups] == [len(first), len(adapter)]
    assert [g["lr"] for g in opt["optimizer"].param_groups] == [1e-4, 0.0]  # step 0: phase 1
    opt["optimizer"].step()  # no gradients: changes nothing, keeps the scheduler's call order
    sched.step()
    assert [g["lr"] for g in opt["optimizer"].param_groups] == [0.0, 1e-3]  # step 1: phase 2

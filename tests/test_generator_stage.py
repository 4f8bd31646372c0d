"""`stage=generator` end to end on tiny toy data and a tiny Stable Diffusion folder: training, grids, saving as a
diffusers pipeline + AU adapter, reloading, resuming, evaluation with the teacher, config errors."""
import json
import math

import pytest
import torch

import train
from lightning_modules.generator.base_ref import BASE_MODEL
from lightning_modules.generator.pipeline import LORA_WEIGHTS, SynFERPipeline
from lightning_modules.guidance.sampling import ClassifierGuide
from lightning_modules.guidance.semantic import guidance_window
from lightning_modules.run.runtime import ConfigError
from tests.tiny_sd import save_tiny_sd

# On top of conftest.TINY (2 steps, 16-image batches, 2-step sampling, tiny grids and evaluation).
GEN = ["generator.val_every_n_epochs=1", "generator.checkpoint_every_n_steps=1", "generator.model.ema_decay=0.9"]


def _sample(pipe, aus):
    return pipe(["a close-up photo of a person"] * len(aus), aus=aus, seeds=[1] * len(aus), num_inference_steps=2,
                text_scale=2.0, au_scale=2.0, progress=False).images


@pytest.mark.slow
def test_generator_stage_trains_saves_reloads_and_evaluates(tiny_cfg, tmp_path, monkeypatch):
    guide_calls = []  # batch size of each semantic-guidance classifier call
    guide_forward = ClassifierGuide.forward
    monkeypatch.setattr(ClassifierGuide, "forward",
                        lambda self, images: guide_calls.append(len(images)) or guide_forward(self, images))
    train.run_stage(tiny_cfg("stage=teacher"))  # the evaluation's judge
    metrics = train.run_stage(tiny_cfg("stage=generator", *GEN, "generator.grids.every_n_steps=1"))
    out = tmp_path / "run" / "generator"
    assert metrics["steps"] == 2 and metrics["resumed_from"] == ""
    for name in ("config.yaml", "metrics.json", "stage_done.json", "checkpoints/last.ckpt",
                 "grids/expressions_step000001.png", "grids/expressions_final.png", "grids/au_sweep_final.png",
                 "grids/eval_samples.png", "pipeline/model_index.json", "pipeline/au_adapter.safetensors",
                 "pipeline/au_adapter.json", "pipeline/unet/config.json", "pipeline/tokenizer/tokenizer_config.json"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["eval/num_samples"] == 16 and guide_calls == []  # no guidance configured: the guide never runs
    # FER-Acc counts whole faces (2 per expression) and is the mean of the per-expression accuracies
    assert saved["eval/fer_acc"] * 16 == pytest.approx(round(saved["eval/fer_acc"] * 16))
    per_class = [v for k, v in saved.items() if k.startswith("eval/fer_acc/")]
    assert len(per_class) == 8 and saved["eval/fer_acc"] == pytest.approx(sum(per_class) / 8)
    assert saved["eval/au_pearson_count"] >= 1 and -1.0 <= saved["eval/au_pearson_mean"] <= 1.0
    assert "eval/reference/fer_acc" in saved and saved["val_loss"] > 0
    # the saved folder is a complete sampler on its own: AUs move the image, the same seed repeats it
    pipe = SynFERPipeline.from_pretrained(out / "pipeline")
    assert pipe.has_au_adapter and pipe.au_names == [1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26]
    aus = torch.zeros(2, 12)
    aus[1, 6] = 5.0  # AU12
    images = _sample(pipe, aus)
    assert images.shape == (2, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    assert not torch.allclose(images[0], images[1])
    assert torch.equal(images, _sample(pipe, aus))
    # the evaluated faces are a synthetic set (the relabel stage's default input)
    from datamodules.synthetic import load_synthetic

    eval_set = load_synthetic(out / "eval_set")
    assert len(eval_set) == 16 and sorted(set(eval_set["target_label"])) == list(range(8))
    assert saved["eval/fid"] >= 0 and 0 <= saved["eval/au_acc"] <= 1
    # semantic guidance changes only the evaluation: the rerun resumes at max_steps, samples with and without SG
    guided = train.run_stage(tiny_cfg("stage=generator", *GEN, "generator.guidance.embedding_scale=1.0",
                                      "generator.guidance.au_scale=1.0"))
    assert guided["resumed_from"].endswith("last.ckpt") and guided["steps"] == 2
    ev = guided["eval"]
    assert ev["unguided/fer_acc"] == pytest.approx(saved["eval/fer_acc"])  # same seeds, no SG: the same faces
    # the classifier guided once per batch at each in-window step (one of 2), and only in the guided pass
    assert guide_calls == [16] * sum(guidance_window(2, 0.6, 1.0))
    assert ev["fid"] != ev["unguided/fid"]  # same seeds and conditions: only guidance changed the faces
    assert math.isfinite(ev["guidance_time_ratio"]) and ev["guidance_time_ratio"] > 0


@pytest.mark.slow
def test_generator_resumes_from_its_last_checkpoint(tiny_cfg, tmp_path):
    args = [*GEN, "generator.eval.enabled=false"]
    first = train.run_stage(tiny_cfg("stage=generator", *args))
    assert first["steps"] == 2
    # raising max_steps continues the same run instead of starting over
    second = train.run_stage(tiny_cfg("stage=generator", *args, "generator.max_steps=4"))
    assert second["resumed_from"].endswith("last.ckpt") and second["steps"] == 4
    ckpt = torch.load(tmp_path / "run" / "generator" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4 and "ema" in ckpt
    # a changed evaluation (e.g. another judge teacher) re-evaluates without training more
    again = train.run_stage(tiny_cfg("stage=generator", *args, "generator.max_steps=4", "generator.eval.per_class=3"))
    assert again["resumed_from"].endswith("last.ckpt") and again["steps"] == 4
    # a change to the model starts over (and resume=false always does)
    third = train.run_stage(tiny_cfg("stage=generator", *args, "generator.max_steps=4", "generator.model.lr=1e-4"))
    assert third["resumed_from"] == "" and third["steps"] == 4


@pytest.mark.slow
def test_text_only_generator_without_au_adapter(tiny_cfg, tmp_path):
    metrics = train.run_stage(tiny_cfg("stage=generator", *GEN, "generator.model.au_adapter=false",
                                       "generator.eval.enabled=false"))
    out = tmp_path / "run" / "generator" / "pipeline"
    assert metrics["steps"] == 2 and (out / "model_index.json").is_file()
    assert not (out / "au_adapter.safetensors").exists()
    pipe = SynFERPipeline.from_pretrained(out)
    assert not pipe.has_au_adapter
    images = pipe(["a photo of a face"], seeds=[0], num_inference_steps=2, progress=False).images
    assert images.shape == (1, 3, 32, 32)


@pytest.mark.slow
def test_generator_eval_without_teacher_is_skipped_with_a_warning(tiny_cfg, tmp_path):
    with pytest.warns(UserWarning, match="no teacher checkpoint"):
        metrics = train.run_stage(tiny_cfg("stage=generator", *GEN, "generator.max_steps=1"))
    assert "skipped" in metrics["eval"]


@pytest.mark.slow
@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_stable_diffusion_folder_backbone(tiny_cfg, tmp_path, finetune):
    sd = save_tiny_sd(tmp_path / "sd")
    metrics = train.run_stage(tiny_cfg(
        "stage=generator", "generator=sd", f"generator.model.pretrained_path={sd}", "generator.model.image_size=32",
        f"generator.model.finetune={finetune}", "generator.model.lora_rank=4", "generator.model.au_hidden_dim=32",
        "generator.model.frozen_dtype=null", "generator.model.gradient_checkpointing=true", *GEN,
        "generator.eval.enabled=false"))
    out = tmp_path / "run" / "generator" / "pipeline"
    assert metrics["steps"] == 2
    assert (out / LORA_WEIGHTS).is_file() == (finetune == "lora")
    # a LoRA keeps the base frozen: its folder refers to the base instead of copying UNet, VAE and text encoder
    assert (out / BASE_MODEL).is_file() == (finetune == "lora") == (not (out / "vae").exists())
    pipe = SynFERPipeline.from_pretrained(out)
    images = _sample(pipe, torch.zeros(1, 12))
    assert images.shape == (1, 3, 32, 32)
    if finetune == "full":  # plain diffusers loads the folder; full fine-tuning changed the base weights
        from diffusers import StableDiffusionPipeline, UNet2DConditionModel

        StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
        base = UNet2DConditionModel.from_pretrained(sd / "unet").state_dict()
        saved = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
        assert not all(torch.equal(base[k], saved[k]) for k in base)


@pytest.mark.parametrize("override, key", [
    ("generator.model.backbone=pretrained", "generator.model.pretrained_path"),
    ("generator.model.backbone=unet9000", "generator.model.backbone"),
    ("generator.max_steps=-1", "generator.max_steps"),
    ("generator.model.sample.sampler=euler", "generator.model"),
    ("generator.model.text_dropout=1.5", "generator.model"),
    ("generator.grids.seeds=0", "generator.grids.seeds"),
    ("generator.guidance.window=[0.9,0.2]", "generator.guidance"),
    ("generator.model.au_adapter=false generator.guidance.au_scale=1", "generator.guidance.au_scale"),
    ("generator.guidance.embedding_scale=1.0", "generator.guidance.classifier"),  # no teacher trained here
])
def test_generator_config_errors_name_their_key(tiny_cfg, override, key):
    with pytest.raises(ConfigError) as err:
        train.run_stage(tiny_cfg("stage=generator", *GEN, *override.split()))
    assert err.value.key == key


def test_missing_stable_diffusion_folder_is_a_config_error(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="folder not found"):
        train.run_stage(tiny_cfg("stage=generator", "generator=sd",
                                 f"generator.model.pretrained_path={tmp_path / 'nope'}"))

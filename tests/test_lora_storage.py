"""A LoRA generator over a Stable Diffusion folder saves its LoRA, AU adapter and a reference to the base folder (not
a copy of UNet, VAE and text encoder) and reloads to the same images; other generators save everything."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lightning_modules.labeling import feranno

from lightning_modules.generator import pipeline as generator_pipeline
from lightning_modules.generator.base_ref import BASE_MODEL, UNET_EXTRA
from lightning_modules.generator.module import FERGenerator
from lightning_modules.generator.pipeline import LORA_WEIGHTS, SynFERPipeline
from lightning_modules.run.runtime import ConfigError
from tests.tiny_sd import save_tiny_sd

CAPTIONS = ["a happy face", "a sad face"]
AUS = torch.tensor([[1.0, 0.0, 0.5, 0.0, 1.0], [0.0, 1.0, 0.0, 0.5, 0.0]])
HEAVY = ("unet", "vae", "text_encoder")


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def sd(tmp_path_factory) -> Path:
    return save_tiny_sd(tmp_path_factory.mktemp("base") / "sd")


def _lora_generator(base: Path, label_conditioning: bool = True, frozen_dtype=None) -> FERGenerator:
    torch.manual_seed(0)
    gen = FERGenerator(backbone="pretrained", pretrained_path=str(base), image_size=32, finetune="lora", lora_rank=2,
                       lora_alpha=4, aus=[1, 2, 4, 6, 12], au_hidden_dim=16, label_conditioning=label_conditioning,
                       num_classes=4, ema_decay=None, frozen_dtype=frozen_dtype,
                       sample=dict(steps=2, text_scale=2.0, au_scale=2.0))
    with torch.no_grad():  # a "trained" LoRA and class embedding: both must reach the reloaded images
        for name, p in gen.unet.named_parameters():
            if "lora_B" in name or "class_embedding" in name:
                p.normal_(0, 0.2)
    return gen


def _sample(pipe_or_gen, classes, autocast: bool = False) -> torch.Tensor:
    """Seeded images; ``autocast``: bf16 frozen parts run under autocast, as in training and synthesis."""
    if autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _sample(pipe_or_gen, classes).float()
    if isinstance(pipe_or_gen, FERGenerator):
        return pipe_or_gen.sample(CAPTIONS, aus=AUS, seeds=[3, 4], class_labels=classes)
    return pipe_or_gen(CAPTIONS, aus=AUS, seeds=[3, 4], class_labels=classes, num_inference_steps=2,
                       text_scale=2.0, au_scale=2.0, progress=False).images


@pytest.mark.parametrize("label_conditioning, frozen_dtype", [(True, None), (False, "bf16")])
def test_lora_saves_a_base_reference_and_reloads_the_same_images_as_a_full_save(sd, tmp_path, monkeypatch,
                                                                                label_conditioning, frozen_dtype):
    gen = _lora_generator(sd, label_conditioning, frozen_dtype)
    classes = torch.tensor([0, 3]) if label_conditioning else None
    before = _sample(gen, classes, autocast=frozen_dtype is not None)
    gen.save_generator(tmp_path / "lora")
    saved = tmp_path / "lora"
    names = {p.name for p in saved.iterdir()}
    assert not names & set(HEAVY) and {BASE_MODEL, LORA_WEIGHTS, "model_index.json", "scheduler",
                                       "au_adapter.safetensors", "captions.json"} <= names, names
    assert (UNET_EXTRA in names) == label_conditioning  # the class embedding is not in the base UNet
    reference = json.loads((saved / BASE_MODEL).read_text())
    assert reference["path"] == str(sd.resolve()) and reference["unet_config"] == (
        {"num_class_embeds": 5} if label_conditioning else {})
    with monkeypatch.context() as m:  # the same generator saved the old way: everything in the folder
        m.setattr(generator_pipeline, "frozen_base", lambda pipe: None)
        gen.save_generator(tmp_path / "full")
    assert all((tmp_path / "full" / part).is_dir() for part in HEAVY)
    # what FERAnno's config checks read from a generator folder is the same either way
    assert feranno.num_up_blocks(saved) == feranno.num_up_blocks(tmp_path / "full") == 2
    assert feranno.num_train_timesteps(saved) == feranno.num_train_timesteps(tmp_path / "full") == 1000
    assert _bytes(saved) * 10 < _bytes(tmp_path / "full")
    reloaded = []
    with monkeypatch.context() as m:  # a folder saved in one layout, then the other: the last save decides
        shutil.copytree(saved, tmp_path / "again")
        m.setattr(generator_pipeline, "frozen_base", lambda pipe: None)
        gen.save_generator(tmp_path / "again")
        assert not (tmp_path / "again" / BASE_MODEL).exists() and not (tmp_path / "again" / UNET_EXTRA).exists()
    gen.save_generator(tmp_path / "again")
    assert (tmp_path / "again" / BASE_MODEL).is_file() and not any((tmp_path / "again" / p).exists() for p in HEAVY)
    for folder in (saved, tmp_path / "full"):
        pipe = SynFERPipeline.from_pretrained(folder)
        assert pipe.vae.dtype == torch.float32  # bf16-rounded weights, held as diffusers loads a full save
        assert pipe.text_encoder.dtype == (torch.bfloat16 if frozen_dtype else torch.float32)
        reloaded.append(_sample(pipe, classes, autocast=frozen_dtype is not None))
    assert torch.equal(reloaded[0], reloaded[1])  # the reference gives what the full copy gave
    assert torch.allclose(reloaded[0], before, atol=1e-5)


def test_moved_missing_or_different_base_is_a_clear_error(sd, tmp_path):
    base = tmp_path / "sd"
    shutil.copytree(sd, base)
    gen = _lora_generator(base)
    before = _sample(gen, torch.tensor([1, 2]))
    gen.save_generator(tmp_path / "lora")
    ref_file = tmp_path / "lora" / BASE_MODEL
    moved = tmp_path / "elsewhere" / "sd"
    moved.parent.mkdir()
    base.rename(moved)
    with pytest.raises(ConfigError, match="does not exist") as err:
        SynFERPipeline.from_pretrained(tmp_path / "lora")
    assert str(base) in str(err.value) and f"{ref_file}:path" in str(err.value)
    # the new location written into the reference: the same generator
    reference = json.loads(ref_file.read_text())
    ref_file.write_text(json.dumps({**reference, "path": str(moved)}))
    assert torch.allclose(_sample(SynFERPipeline.from_pretrained(tmp_path / "lora"), torch.tensor([1, 2])), before,
                          atol=1e-5)
    shutil.rmtree(moved / "vae")
    with pytest.raises(ConfigError, match=r"lacks vae/"):
        SynFERPipeline.from_pretrained(tmp_path / "lora")
    shutil.rmtree(moved)
    save_tiny_sd(moved, seed=1)  # same architecture, names and sizes, other weights (SD 1.4 vs 1.5)
    with pytest.raises(ConfigError, match=r"is not the one .* trained on: \d+ files differ \(.*safetensors"):
        SynFERPipeline.from_pretrained(tmp_path / "lora")


@pytest.mark.parametrize("backbone, finetune", [("pretrained", "full"), ("tiny", "lora"), ("tiny", "full")])
def test_full_fine_tunes_and_from_scratch_generators_save_everything(sd, tmp_path, backbone, finetune):
    torch.manual_seed(0)
    gen = FERGenerator(backbone=backbone, pretrained_path=str(sd), image_size=32, finetune=finetune, lora_rank=2,
                       aus=[1, 2, 4, 6, 12], au_hidden_dim=16, ema_decay=None, frozen_dtype=None,
                       unet=dict(block_out_channels=[16, 32], norm_num_groups=8,
                                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                                 up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"]) if backbone == "tiny" else None,
                       text_encoder=dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32)
                       if backbone == "tiny" else None,
                       sample=dict(steps=2))
    before = gen.sample(CAPTIONS, aus=AUS, seeds=[3, 4])
    gen.save_generator(tmp_path / "pipe")
    assert not (tmp_path / "pipe" / BASE_MODEL).exists()
    assert (tmp_path / "pipe" / "unet").is_dir() and (tmp_path / "pipe" / "text_encoder").is_dir()
    assert (tmp_path / "pipe" / LORA_WEIGHTS).is_file() == (finetune == "lora")
    pipe = SynFERPipeline.from_pretrained(tmp_path / "pipe")
    after = pipe(CAPTIONS, aus=AUS, seeds=[3, 4], num_inference_steps=2, text_scale=2.0, au_scale=2.0,
                 progress=False).images
    assert torch.allclose(after, before, atol=1e-5)

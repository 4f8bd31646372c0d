"""SynFERPipeline (lightning_modules/generator/pipeline.py) on tiny random Stable Diffusion components.

The key property: with the AU branch and guidance off it reproduces diffusers' ``StableDiffusionPipeline``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_modules.generator.conditioning import AUEncoder, install_au_attention
from lightning_modules.generator.pipeline import LORA_WEIGHTS, SynFERPipeline, make_sampler

CAPTIONS = ["a smiling face", "an angry face", "a surprised face", "a sad face"]
SEEDS = [3, 1, 4, 1]
NUM_AUS = 5
STEPS = 3
MAX_LEN = 16


pytestmark = pytest.mark.usefixtures("single_thread")


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _text_encoder_and_tokenizer():
    from transformers import CLIPTextConfig, CLIPTextModel

    from lightning_modules.generator.clip_tokenizer import offline_clip_tokenizer

    tok = offline_clip_tokenizer(model_max_length=MAX_LEN)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, max_position_embeddings=MAX_LEN,
                                        vocab_size=tok.vocab_size, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    return text, tok


def _unet(channels: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=2, sample_size=16,
                                in_channels=channels, out_channels=channels, cross_attention_dim=32,
                                norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion folder, saved by diffusers itself."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    torch.manual_seed(0)
    unet = _unet(4)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        latent_channels=4, norm_num_groups=32)
    text, tok = _text_encoder_and_tokenizer()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    directory = tmp_path_factory.mktemp("tiny_sd")
    pipe.save_pretrained(directory)
    return directory


def _sd(sd_dir, scheduler=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd_dir), safety_checker=None, requires_safety_checker=False)
    if scheduler is not None:
        pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _synfer(directory) -> SynFERPipeline:
    pipe = SynFERPipeline.from_pretrained(str(directory))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_images(pipe, captions, seeds, guidance_scale=1.0, negative_prompt=None):
    if isinstance(negative_prompt, str):  # diffusers wants the same type as the prompt
        negative_prompt = [negative_prompt] * len(captions)
    return pipe(list(captions), generator=[torch.Generator().manual_seed(s) for s in seeds],
                num_inference_steps=STEPS, guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                output_type="pt", height=32, width=32).images


def _run(pipe, captions=CAPTIONS, seeds=SEEDS, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("progress", False)
    return pipe(list(captions), seeds=list(seeds), **kw).images


def _add_au_adapter(pipe: SynFERPipeline, seed: int = 0, au_attn_scale: float = 1.0):
    torch.manual_seed(seed)
    enc = AUEncoder(NUM_AUS, token_dim=32, num_tokens=2, hidden_dim=16)
    procs = install_au_attention(pipe.unet, num_tokens=2, au_attn_scale=au_attn_scale)
    with torch.no_grad():  # move K/V_au away from K/V_text so the adapter has a visible effect
        for p in procs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    pipe.set_au_adapter(enc, procs, aus=[1, 2, 4, 6, 12])
    return enc, procs


def _au_inputs(n: int = len(CAPTIONS)):
    g = torch.Generator().manual_seed(0)
    aus = torch.rand(n, NUM_AUS, generator=g) * 5
    mask = torch.ones(n, NUM_AUS, dtype=torch.bool)
    mask[:, -1] = False
    return aus, mask


# ---------------------------------------------------------------------- equality with diffusers
def test_matches_stable_diffusion_without_guidance(sd_dir):
    pipe = _synfer(sd_dir)
    assert not pipe.has_au_adapter and pipe.vae is not None
    assert pipe.config.image_size == 32
    out = pipe(CAPTIONS, seeds=SEEDS, num_inference_steps=STEPS, text_scale=1.0, progress=False)
    assert out.seeds == SEEDS
    ref = _diffusers_images(_sd(sd_dir), CAPTIONS, SEEDS)
    assert out.images.shape == ref.shape == (4, 3, 32, 32)
    assert torch.allclose(out.images, ref, atol=1e-5)


def test_matches_stable_diffusion_with_cfg_and_negative_prompt(sd_dir):
    pipe = _synfer(sd_dir)
    out = _run(pipe, text_scale=3.0, negative_prompt="blurry")
    ref = _diffusers_images(_sd(sd_dir), CAPTIONS, SEEDS, guidance_scale=3.0, negative_prompt="blurry")
    assert torch.allclose(out, ref, atol=1e-5)
    # guidance does change the image
    assert not torch.allclose(out, _run(pipe, text_scale=1.0), atol=1e-3)


def test_matches_stable_diffusion_with_dpmpp(sd_dir):
    pipe = _synfer(sd_dir)
    sd = _sd(sd_dir)
    sd.scheduler = make_sampler("dpmpp", sd.scheduler.config)
    out = _run(pipe, sampler="dpmpp")
    ref = _diffusers_images(sd, CAPTIONS, SEEDS)
    assert torch.allclose(out, ref, atol=1e-5)
    # DPM-Solver++ is a different sampler than the DDIM default
    ddim = _diffusers_images(_sd(sd_dir), CAPTIONS, SEEDS)
    assert not torch.allclose(ref, ddim, atol=1e-4)


def test_au_adapter_with_zero_attention_scale_matches_stable_diffusion(sd_dir):
    pipe = _synfer(sd_dir)
    _add_au_adapter(pipe, au_attn_scale=1.0)
    assert pipe.has_au_adapter
    out = _run(pipe, au_attn_scale=0.0)
    ref = _diffusers_images(_sd(sd_dir), CAPTIONS, SEEDS)
    assert torch.allclose(out, ref, atol=1e-5)
    # the trained scale is restored after the call, and the adapter is active again
    assert all(p.scale == [1.0] for p in pipe.au_processors.values())
    aus, mask = _au_inputs()
    assert not torch.allclose(_run(pipe, aus=aus, au_mask=mask), ref, atol=1e-4)


def test_au_mask_is_used(sd_dir):
    pipe = _synfer(sd_dir)
    _add_au_adapter(pipe)
    aus, mask = _au_inputs(2)  # last AU unknown
    kw = dict(captions=CAPTIONS[:2], seeds=[0, 1], au_scale=2.0)
    ref = _run(pipe, aus=aus, au_mask=mask, **kw)
    other = aus.clone()
    other[:, -1] = 5.0 - other[:, -1]
    # the value of an unknown AU does not matter ...
    assert torch.allclose(_run(pipe, aus=other, au_mask=mask, **kw), ref, atol=1e-5)
    # ... but without the mask it is known and does
    assert not torch.allclose(_run(pipe, aus=other, **kw), ref, atol=1e-4)
    # and the AU values themselves change the image
    assert not torch.allclose(_run(pipe, aus=5.0 - aus, au_mask=mask, **kw), ref, atol=1e-4)


# ---------------------------------------------------------------------- seeds and batching
def test_seeds_determine_images(sd_dir):
    pipe = _synfer(sd_dir)
    a = _run(pipe, captions=CAPTIONS[:2], seeds=[5, 6])
    b = _run(pipe, captions=CAPTIONS[:2], seeds=[5, 6])
    assert torch.equal(a, b)
    c = _run(pipe, captions=CAPTIONS[:2], seeds=[7, 8])
    for i in range(2):
        assert not torch.allclose(a[i], c[i], atol=1e-3)
    # same caption + same seed => same image, wherever in the batch
    same = _run(pipe, captions=[CAPTIONS[0]] * 2, seeds=[9, 9])
    assert torch.allclose(same[0], same[1], atol=1e-5)
    # default seeds are 0..N-1
    default = pipe(CAPTIONS[:2], num_inference_steps=STEPS, progress=False)
    assert default.seeds == [0, 1]
    assert torch.allclose(default.images, _run(pipe, captions=CAPTIONS[:2], seeds=[0, 1]), atol=1e-6)


def test_image_independent_of_batch(sd_dir):
    pipe = _synfer(sd_dir)
    _add_au_adapter(pipe)
    aus, mask = _au_inputs()
    kw = dict(aus=aus, au_mask=mask, text_scale=2.0, au_scale=3.0)
    one = _run(pipe, batch_size=1, **kw)
    four = _run(pipe, batch_size=4, **kw)
    three = _run(pipe, batch_size=3, **kw)  # uneven last batch
    assert one.shape == (4, 3, 32, 32)
    assert torch.allclose(one, four, atol=1e-5)
    assert torch.allclose(three, four, atol=1e-5)
    single = _run(pipe, captions=CAPTIONS[2:3], seeds=SEEDS[2:3], aus=aus[2:3], au_mask=mask[2:3],
                  text_scale=2.0, au_scale=3.0)
    assert torch.allclose(single[0], four[2], atol=1e-5)


def test_output_types(sd_dir):
    pipe = _synfer(sd_dir)
    pt = _run(pipe, captions=CAPTIONS[:2], seeds=[0, 1])
    assert pt.dtype == torch.float32 and pt.min() >= 0 and pt.max() <= 1
    np_out = _run(pipe, captions=CAPTIONS[:2], seeds=[0, 1], output_type="np")
    assert np_out.shape == (2, 32, 32, 3)
    assert abs(torch.from_numpy(np_out).permute(0, 3, 1, 2) - pt).max() < 1e-6
    pil = _run(pipe, captions=CAPTIONS[:2], seeds=[0, 1], output_type="pil")
    assert len(pil) == 2 and pil[0].size == (32, 32)


# ---------------------------------------------------------------------- errors
def test_call_errors(sd_dir):
    pipe = _synfer(sd_dir)
    with pytest.raises(ValueError, match="got 3 seeds for 2 captions"):
        pipe(CAPTIONS[:2], seeds=[0, 1, 2], num_inference_steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="no captions"):
        pipe([], num_inference_steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="no AU adapter"):
        pipe(CAPTIONS[:2], aus=torch.zeros(2, NUM_AUS), num_inference_steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="output_type"):
        pipe(CAPTIONS[:2], output_type="latent", num_inference_steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="negative prompts"):
        pipe(CAPTIONS[:2], negative_prompt=["x"] * 3, text_scale=2.0, num_inference_steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="guidance scales"):
        pipe(CAPTIONS[:2], text_scale=-1.0, num_inference_steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(CAPTIONS[:2], num_inference_steps=0, progress=False)
    _add_au_adapter(pipe)
    with pytest.raises(ValueError, match=rf"aus must have shape \(2, {NUM_AUS}\)"):
        pipe(CAPTIONS[:2], aus=torch.zeros(2, NUM_AUS + 1), num_inference_steps=STEPS, progress=False)
    with pytest.raises(ValueError, match=rf"aus must have shape \(2, {NUM_AUS}\)"):
        pipe(CAPTIONS[:2], aus=torch.zeros(3, NUM_AUS), num_inference_steps=STEPS, progress=False)
    with pytest.raises(ValueError, match="au_mask shape"):
        pipe(CAPTIONS[:2], aus=torch.zeros(2, NUM_AUS), au_mask=torch.ones(2, NUM_AUS - 1, dtype=torch.bool),
             num_inference_steps=STEPS, progress=False)


def test_settings_object_and_keywords_give_the_same_faces(sd_dir):
    from lightning_modules.generator.sample_settings import SamplingSettings

    pipe = _synfer(sd_dir)
    settings = SamplingSettings(num_inference_steps=STEPS, text_scale=2.0, negative_prompt="x", progress=False)
    by_object = pipe(CAPTIONS[:2], seeds=[0, 1], settings=settings).images
    by_keywords = pipe(CAPTIONS[:2], seeds=[0, 1], num_inference_steps=STEPS, text_scale=2.0, negative_prompt="x",
                       progress=False).images
    assert torch.equal(by_object, by_keywords)
    # a keyword replaces that one field of the settings object
    other = pipe(CAPTIONS[:2], seeds=[0, 1], settings=settings, text_scale=1.0).images
    assert not torch.equal(other, by_object)
    assert torch.equal(other, pipe(CAPTIONS[:2], seeds=[0, 1], num_inference_steps=STEPS, negative_prompt="x",
                                   progress=False).images)
    with pytest.raises(TypeError, match=r"unknown sampling option\(s\) \['num_steps'\]"):
        pipe(CAPTIONS[:2], settings=settings, num_steps=3)


@pytest.mark.parametrize("field, value, message", [
    ("num_inference_steps", 0, "num_inference_steps must be >= 1"),
    ("text_scale", -0.5, "guidance scales must be >= 0"),
    ("label_scale", -1.0, "label_scale must be >= 0"),
    ("init_strength", 1.5, r"init_strength must be in \[0, 1\]"),
    ("batch_size", 0, "batch_size must be >= 1"),
    ("output_type", "latent", "output_type must be pt, pil or np"),
])
def test_sampling_settings_refuse_out_of_range_values(field, value, message):
    from lightning_modules.generator.sample_settings import SamplingSettings

    with pytest.raises(ValueError, match=message):
        SamplingSettings.of(**{field: value})
    assert SamplingSettings.of(text_scale=3.0).label_cfg_scale == 3.0  # the label follows the text scale
    assert SamplingSettings.of(text_scale=3.0, label_scale=1.0).label_cfg_scale == 1.0


def test_face_batches_slice_every_condition_alike():
    from lightning_modules.generator.sample_settings import FaceBatch

    faces = FaceBatch([f"c{i}" for i in range(5)], [""] * 5, list(range(5)), aus=torch.arange(10.).view(5, 2),
                      labels=torch.arange(5))
    parts = faces.batches(2)
    assert [len(p) for p in parts] == [2, 2, 1]
    assert parts[2].captions == ["c4"] and parts[2].seeds == [4] and parts[2].aus.tolist() == [[8.0, 9.0]]
    assert parts[1].labels.tolist() == [2, 3] and parts[1].au_mask is None and parts[1].init_images is None


def test_make_sampler(sd_dir):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    config = _scheduler().config
    assert isinstance(make_sampler("ddim", config), DDIMScheduler)
    dpm = make_sampler("dpmpp", config)
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    assert dpm.config.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        make_sampler("euler", config)


def test_from_pretrained_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        SynFERPipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        SynFERPipeline.from_pretrained(tmp_path / "does_not_exist")


# ---------------------------------------------------------------------- save / reload
def test_save_reload_with_au_adapter(sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = _synfer(sd_dir)
    _add_au_adapter(pipe, au_attn_scale=0.8)
    aus, mask = _au_inputs()
    kw = dict(aus=aus, au_mask=mask, text_scale=2.0, au_scale=3.0, negative_prompt="blurry")
    calls = []
    orig_forward = pipe.unet.forward

    def counting_forward(*a, **k):
        calls.append(a[0].shape[0])
        return orig_forward(*a, **k)

    pipe.unet.forward = counting_forward
    ref = _run(pipe, **kw)
    # null, text and full pass at each step, batched into one UNet call of 3N samples
    assert calls == [3 * len(aus)] * STEPS
    del pipe.unet.forward

    pipe.save_pretrained(tmp_path / "synfer")
    names = {p.name for p in (tmp_path / "synfer").iterdir()}
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler",
            "au_adapter.safetensors", "au_adapter.json"} <= names
    assert LORA_WEIGHTS not in names
    # the processors are back on the live pipeline after saving
    assert _run(pipe, **kw).sub(ref).abs().max() < 1e-6

    loaded = _synfer(tmp_path / "synfer")
    assert loaded.has_au_adapter and loaded.au_names == [1, 2, 4, 6, 12]
    assert all(p.scale == [0.8] for p in loaded.au_processors.values())
    out = _run(loaded, **kw)
    assert torch.allclose(out, ref, atol=1e-5)

    # the folder is a plain diffusers SD folder too (AU files ignored): it reproduces the base model
    sd = StableDiffusionPipeline.from_pretrained(str(tmp_path / "synfer"), safety_checker=None,
                                                 requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    base = _diffusers_images(sd, CAPTIONS, SEEDS)
    assert torch.allclose(base, _diffusers_images(_sd(sd_dir), CAPTIONS, SEEDS), atol=1e-5)
    assert torch.allclose(_run(loaded, au_attn_scale=0.0), base, atol=1e-5)


@pytest.mark.parametrize("alpha", [4, 8])  # alpha != rank must survive the save (adapter metadata)
def test_lora_save_reload(sd_dir, tmp_path, alpha):
    from peft import LoraConfig

    pipe = _synfer(sd_dir)
    base = _run(pipe)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=alpha, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        lora_b = [p for n, p in pipe.unet.named_parameters() if "lora_B" in n]
        assert lora_b
        for p in lora_b:
            p.add_(0.1)
    with_lora = _run(pipe)
    assert not torch.allclose(with_lora, base, atol=1e-4)

    pipe.save_pretrained(tmp_path / "lora")
    assert (tmp_path / "lora" / LORA_WEIGHTS).is_file()
    # the saved UNet is the base model (no LoRA keys inside)
    from safetensors.torch import load_file

    unet_files = list((tmp_path / "lora" / "unet").glob("*.safetensors"))
    assert unet_files
    assert not any("lora" in k for f in unet_files for k in load_file(str(f)))
    # saving leaves the live pipeline unchanged
    assert torch.allclose(_run(pipe), with_lora, atol=1e-6)

    reloaded = _synfer(tmp_path / "lora")
    assert torch.allclose(_run(reloaded), with_lora, atol=1e-5)
    # without the LoRA file the folder gives the base model
    (tmp_path / "lora" / LORA_WEIGHTS).unlink()
    assert torch.allclose(_run(_synfer(tmp_path / "lora")), base, atol=1e-5)


# ---------------------------------------------------------------------- pixel space
@pytest.fixture(scope="module")
def pixel_pipe():
    torch.manual_seed(1)
    text, tok = _text_encoder_and_tokenizer()
    pipe = SynFERPipeline(unet=_unet(3), scheduler=_scheduler(), text_encoder=text, tokenizer=tok, vae=None,
                          image_size=16)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pixel_space_sampling(pixel_pipe):
    assert pixel_pipe.vae is None and pixel_pipe.vae_scale_factor == 1
    out = _run(pixel_pipe, captions=CAPTIONS[:3], seeds=[0, 1, 2], text_scale=2.0)
    assert out.shape == (3, 3, 16, 16)
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.std() > 0


def test_pixel_space_save_reload(pixel_pipe, tmp_path):
    _add_au_adapter(pixel_pipe)
    try:
        aus, mask = _au_inputs(2)
        ref = _run(pixel_pipe, captions=CAPTIONS[:2], seeds=[0, 1], aus=aus, au_mask=mask, au_scale=2.0)
        pixel_pipe.save_pretrained(tmp_path / "pixel")
    finally:
        from lightning_modules.generator.conditioning import plain_attention_processors

        pixel_pipe.unet.set_attn_processor(plain_attention_processors(pixel_pipe.unet))
        pixel_pipe.set_au_adapter(None, None)
    index = json.loads((tmp_path / "pixel" / "model_index.json").read_text())
    assert index["image_size"] == 16
    assert not (tmp_path / "pixel" / "vae").exists()
    loaded = _synfer(tmp_path / "pixel")
    assert loaded.vae is None and loaded.config.image_size == 16 and loaded.has_au_adapter
    out = _run(loaded, captions=CAPTIONS[:2], seeds=[0, 1], aus=aus, au_mask=mask, au_scale=2.0)
    assert out.shape == (2, 3, 16, 16)
    assert torch.allclose(out, ref, atol=1e-5)

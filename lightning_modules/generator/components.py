"""Build the generator's diffusers/transformers parts: a tiny pixel-space model from config, or Stable Diffusion
from a local directory (SD 1.5 / 2.1 layout). One return type, so the LightningModule has one code path."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch.nn as nn
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel

BACKBONES = ("tiny", "pretrained")
SAMPLERS = ("ddim", "dpmpp")


def make_sampler(name: str, config) -> object:
    """A sampling scheduler built from a (training) scheduler config: DDIM or DPM-Solver++ (2nd order)."""
    if name == "ddim":
        return DDIMScheduler.from_config(config, steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    if name == "dpmpp":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                       steps_offset=1)
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


SD_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# The CPU default: attention only at the 8x8 level (self-attention at 16x16 halves the throughput: measured
# 57 vs 32 img/s per train step at batch 32, 32 px, 2 cores).
TINY_UNET: dict[str, Any] = dict(
    block_out_channels=(32, 64, 64), layers_per_block=1, attention_head_dim=8, norm_num_groups=8,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)
TINY_TEXT: dict[str, Any] = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, max_length=32)


@dataclass
class GeneratorParts:
    unet: UNet2DConditionModel
    text_encoder: nn.Module
    tokenizer: Any
    noise_scheduler: DDPMScheduler
    vae: Optional[AutoencoderKL]
    image_size: int

    @property
    def text_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)


def build_tiny(image_size: int, unet: Optional[dict] = None, text_encoder: Optional[dict] = None,
               noise_scheduler: Optional[dict] = None) -> GeneratorParts:
    """Pixel-space UNet + small CLIP text transformer trained from scratch (offline CLIP tokenizer)."""
    from lightning_modules.generator.conditioning import tiny_text_encoder

    text_cfg = {**TINY_TEXT, **(text_encoder or {})}
    text_cfg.pop("train", None)
    encoder, tokenizer = tiny_text_encoder(**text_cfg)
    unet_cfg = {**TINY_UNET, **(unet or {})}
    unet_cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in unet_cfg.items()}
    levels = len(unet_cfg["block_out_channels"])
    if image_size % (2 ** (levels - 1)):
        raise ValueError(f"generator.model.image_size={image_size} must be divisible by {2 ** (levels - 1)} "
                         f"(the UNet downsamples {levels - 1} times)")
    try:
        model = UNet2DConditionModel(sample_size=image_size, in_channels=3, out_channels=3,
                                     cross_attention_dim=text_cfg["hidden_size"], **unet_cfg)
    except (TypeError, ValueError) as err:
        raise ValueError(f"generator.model.unet: {err}") from err
    scheduler = DDPMScheduler(**{**dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                        prediction_type="epsilon", clip_sample=False), **(noise_scheduler or {})})
    return GeneratorParts(model, encoder, tokenizer, scheduler, None, image_size)


def load_pretrained(path: str, image_size: Optional[int] = None, noise_scheduler: Optional[dict] = None
                    ) -> GeneratorParts:
    """Stable Diffusion components from a local directory; nothing is downloaded."""
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"generator.model.pretrained_path does not exist: {root} (weights are never "
                                f"downloaded; point it at a local Stable Diffusion folder)")
    missing = [s for s in SD_SUBFOLDERS if not (root / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"generator.model.pretrained_path={root} is not a Stable Diffusion folder: "
                                f"missing {', '.join(m + '/' for m in missing)}")
    unet = UNet2DConditionModel.from_pretrained(root / "unet")
    vae = AutoencoderKL.from_pretrained(root / "vae")
    text = CLIPTextModel.from_pretrained(root / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    scheduler = DDPMScheduler.from_pretrained(root / "scheduler", **(noise_scheduler or {}))
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    native = int(unet.config.sample_size) * factor
    return GeneratorParts(unet, text, tokenizer, scheduler, vae, int(image_size or native))


CLASS_EMBEDDING_INITS = ("auto", "zeros", "normal")


def add_class_embedding(unet: UNet2DConditionModel, num_embeds: int, init: str = "zeros") -> nn.Embedding:
    """Give ``unet`` a class-label embedding added to its time embedding (diffusers' ``num_class_embeds`` with
    ``class_embed_type=None``): ``num_embeds`` rows, the last one the null class of condition dropout / CFG.

    ``zeros``: a pretrained UNet starts out exactly as it was and the label only enters as it is learned.
    ``normal``: N(0, 1) rows, torch's and diffusers' own default, on the scale of the time embedding: a UNet
    trained from scratch hears the label from its first step (from zero, a short CPU run left the rows ~30x smaller
    than the time embedding and the label changed nothing). The UNet config records ``num_class_embeds`` so the
    saved folder reloads with the embedding.
    """
    if num_embeds < 2:
        raise ValueError(f"a class embedding needs >= 1 class + the null class, got {num_embeds} rows")
    if init not in ("zeros", "normal"):
        raise ValueError(f"class embedding init must be zeros or normal, got {init!r}")
    if unet.class_embedding is not None:
        raise ValueError("the UNet already has a class embedding "
                         f"(class_embed_type={unet.config.class_embed_type!r}, "
                         f"num_class_embeds={unet.config.num_class_embeds})")
    weight = unet.time_embedding.linear_2.weight
    embedding = nn.Embedding(num_embeds, weight.shape[0]).to(device=weight.device, dtype=weight.dtype)
    if init == "zeros":
        nn.init.zeros_(embedding.weight)
    else:
        nn.init.normal_(embedding.weight)
    unet.class_embedding = embedding
    unet.register_to_config(num_class_embeds=int(num_embeds), class_embed_type=None)
    return embedding


def null_class_id(unet) -> Optional[int]:
    """The null (dropped / unconditional) class id of a label-conditioned UNet, None without a class embedding."""
    n = getattr(unet.config, "num_class_embeds", None)
    if n is None or getattr(unet.config, "class_embed_type", None) is not None:
        return None
    return int(n) - 1


def lora_state_dict(unet) -> Optional[dict]:
    """The UNet's LoRA weights in diffusers naming (None without a LoRA), as ``save_lora_weights`` takes them."""
    if not getattr(unet, "peft_config", None):
        return None
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def base_unet_without_lora(unet):
    """A copy of a LoRA-carrying UNet without its LoRA layers (the frozen base weights)."""
    base = type(unet).from_config(unet.config)
    state = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items()
             if "lora_" not in k and ".processor." not in k}
    base.load_state_dict(state)
    return base.to(dtype=unet.dtype)

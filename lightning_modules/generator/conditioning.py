"""Conditioning for the generator: the AU encoder, the decoupled AU cross-attention, the text encoders.

The AU branch is IP-Adapter's decoupled cross-attention (diffusers' ``IPAdapterAttnProcessor2_0``):
``out = Attn(Q, K_text, V_text) + au_attn_scale * Attn(Q, K_au, V_au)``, with ``K_au/V_au`` initialised from the
layer's text projections. The AU encoder maps (AU values, known-mask) to K tokens of the text width, so the AU
tokens enter every cross-attention layer of the UNet. Unknown AUs are masked at the encoder input (value and mask
both 0), which is also the "null AU" condition used for condition dropout and classifier-free guidance.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0

from datamodules.labels import AU_MAX_INTENSITY

AU_ADAPTER_WEIGHTS = "au_adapter.safetensors"
AU_ADAPTER_CONFIG = "au_adapter.json"


class AUEncoder(nn.Module):
    """AU vector (N, A) on the 0..5 scale + known-mask (N, A) -> K tokens (N, K, D)."""

    def __init__(self, num_aus: int, token_dim: int, num_tokens: int = 4, hidden_dim: int = 256):
        super().__init__()
        if num_aus < 1 or num_tokens < 1 or token_dim < 1 or hidden_dim < 1:
            raise ValueError(f"AUEncoder sizes must be >= 1, got num_aus={num_aus} num_tokens={num_tokens} "
                             f"token_dim={token_dim} hidden_dim={hidden_dim}")
        self.num_aus, self.token_dim, self.num_tokens, self.hidden_dim = num_aus, token_dim, num_tokens, hidden_dim
        self.mlp = nn.Sequential(nn.Linear(2 * num_aus, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, num_tokens * token_dim))
        self.norm = nn.LayerNorm(token_dim)

    @property
    def config(self) -> dict:
        return dict(num_aus=self.num_aus, token_dim=self.token_dim, num_tokens=self.num_tokens,
                    hidden_dim=self.hidden_dim)

    def forward(self, aus: torch.Tensor, au_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if aus.ndim != 2 or aus.shape[1] != self.num_aus:
            raise ValueError(f"expected AUs of shape (N, {self.num_aus}), got {tuple(aus.shape)}")
        mask = torch.ones_like(aus) if au_mask is None else au_mask.to(aus.dtype)
        x = torch.cat([aus / AU_MAX_INTENSITY * mask, mask], dim=1)
        return self.norm(self.mlp(x).view(-1, self.num_tokens, self.token_dim))


def null_aus(n: int, num_aus: int, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The dropped / unconditional AU condition: every AU unknown."""
    return (torch.zeros(n, num_aus, device=device, dtype=dtype),
            torch.zeros(n, num_aus, device=device, dtype=torch.bool))


def drop_conditions(aus: torch.Tensor, au_mask: torch.Tensor, captions: list[str], text_dropout: float,
                    au_dropout: float, generator: Optional[torch.Generator] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Condition dropout for classifier-free guidance: text and AUs are dropped independently."""
    n = aus.shape[0]
    drop_text = torch.rand(n, generator=generator) < text_dropout
    drop_au = (torch.rand(n, generator=generator) < au_dropout).to(aus.device)
    captions = ["" if d else c for c, d in zip(captions, drop_text.tolist())]
    keep = (~drop_au).unsqueeze(1)
    return aus * keep, au_mask & keep, captions


def class_conditions(labels: torch.Tensor, null_class: int, dropout: float = 0.0,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Class ids for the UNet's class embedding: unknown labels (< 0) and a ``dropout`` fraction become the null
    class (condition dropout for the label's own classifier-free guidance, drawn apart from text and AUs)."""
    labels = labels.long()
    if (labels >= null_class).any():
        raise ValueError(f"class labels must be < {null_class} (the null class), got max {int(labels.max())}")
    classes = torch.where(labels < 0, torch.full_like(labels, null_class), labels)
    if dropout > 0:
        drop = (torch.rand(labels.shape[0], generator=generator) < dropout).to(labels.device)
        classes = torch.where(drop, torch.full_like(classes, null_class), classes)
    return classes


def augment_aus(aus: torch.Tensor, au_mask: torch.Tensor, noise_std: float,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """AU noise augmentation: Gaussian jitter on known AUs, clipped to the 0..5 scale (detector noise robustness)."""
    if noise_std <= 0:
        return aus
    noise = torch.randn(aus.shape, generator=generator).to(aus) * noise_std
    return torch.where(au_mask, (aus + noise).clamp(0.0, AU_MAX_INTENSITY), aus)


# ---------------------------------------------------------------------- decoupled AU attention
def cross_attention_layers(unet) -> dict[str, nn.Module]:
    """Processor name -> Attention module for every cross-attention layer (``attn2``) of a UNet."""
    layers = {}
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_k"):
            layers[f"{name}.processor"] = module
    return layers


def install_au_attention(unet, num_tokens: int, au_attn_scale: float = 1.0) -> nn.ModuleDict:
    """Replace every cross-attention processor by a decoupled text + AU processor; K/V_au start as copies of K/V_text.

    Returns the AU processors (a ModuleDict keyed by processor name, '.' replaced) so they can be trained, saved and
    loaded as one unit.
    """
    processors = {}
    au_modules = {}
    for name, proc in unet.attn_processors.items():
        processors[name] = proc
    for name, attn in cross_attention_layers(unet).items():
        hidden, cross = attn.to_k.out_features, attn.to_k.in_features
        proc = IPAdapterAttnProcessor2_0(hidden_size=hidden, cross_attention_dim=cross, num_tokens=(num_tokens,),
                                         scale=au_attn_scale)
        proc.to_k_ip[0].weight.data.copy_(attn.to_k.weight.data)
        proc.to_v_ip[0].weight.data.copy_(attn.to_v.weight.data)
        proc.to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)
        processors[name] = proc
        au_modules[name.replace(".", "__")] = proc
    if not au_modules:
        raise ValueError("the UNet has no cross-attention layers (attn2) to carry the AU tokens")
    unet.set_attn_processor(processors)
    return nn.ModuleDict(au_modules)


def au_attention_scale(au_processors: nn.ModuleDict) -> float:
    """The current weight of the AU attention branch (the same in every layer)."""
    return float(next(iter(au_processors.values())).scale[0])


def set_au_attention_scale(au_processors: nn.ModuleDict, scale: float) -> None:
    for proc in au_processors.values():
        proc.scale = [float(scale)]


def plain_attention_processors(unet) -> dict[str, nn.Module]:
    """The current processors with the AU ones swapped for plain attention (used while saving the UNet)."""
    return {name: AttnProcessor2_0() if isinstance(p, IPAdapterAttnProcessor2_0) else p
            for name, p in unet.attn_processors.items()}


def save_au_adapter(directory: str | Path, au_encoder: AUEncoder, au_processors: nn.ModuleDict, aus: list[int],
                    au_attn_scale: float, trained_on_aus: Optional[bool] = None) -> None:
    """``au_adapter.safetensors`` (encoder + K/V_au of every layer) and ``au_adapter.json`` (sizes, AU list, and
    ``trained_on_aus``: whether training ever showed the branch a known AU; null = not recorded)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"au_encoder.{k}": v.detach().cpu().contiguous() for k, v in au_encoder.state_dict().items()}
    state.update({f"au_attention.{k}": v.detach().cpu().contiguous() for k, v in au_processors.state_dict().items()})
    save_file(state, str(directory / AU_ADAPTER_WEIGHTS))
    config = {**au_encoder.config, "aus": list(aus), "au_attn_scale": au_attn_scale,
              "trained_on_aus": trained_on_aus}
    (directory / AU_ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))


def load_au_adapter(directory: str | Path, unet) -> tuple[AUEncoder, nn.ModuleDict, dict]:
    """Install the AU attention on ``unet`` and load encoder + processors from ``directory``."""
    from safetensors.torch import load_file

    directory = Path(directory)
    weights, cfg_path = directory / AU_ADAPTER_WEIGHTS, directory / AU_ADAPTER_CONFIG
    for path in (weights, cfg_path):
        if not path.is_file():
            raise FileNotFoundError(f"AU adapter file missing: {path}")
    config = json.loads(cfg_path.read_text())
    encoder = AUEncoder(config["num_aus"], config["token_dim"], config["num_tokens"], config["hidden_dim"])
    processors = install_au_attention(unet, config["num_tokens"], config.get("au_attn_scale", 1.0))
    state = load_file(str(weights))
    enc_state = {k[len("au_encoder."):]: v for k, v in state.items() if k.startswith("au_encoder.")}
    proc_state = {k[len("au_attention."):]: v for k, v in state.items() if k.startswith("au_attention.")}
    encoder.load_state_dict(enc_state)
    try:
        processors.load_state_dict(proc_state)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not fit this UNet's cross-attention layers: {err}") from err
    dtype = next(unet.parameters()).dtype
    return encoder.to(device=unet.device, dtype=dtype), processors, config


# ---------------------------------------------------------------------- text encoders
def tiny_text_encoder(hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, intermediate_size: int = 128,
                      max_length: int = 32):
    """A small CLIP text transformer (transformers ``CLIPTextModel``) for training from scratch, with the offline
    CLIP tokenizer (same BPE ids as OpenAI CLIP)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from lightning_modules.generator.clip_tokenizer import offline_clip_tokenizer

    tokenizer = offline_clip_tokenizer(model_max_length=max_length)
    config = CLIPTextConfig(hidden_size=hidden_size, intermediate_size=intermediate_size,
                            num_hidden_layers=num_layers, num_attention_heads=num_heads,
                            max_position_embeddings=max_length, vocab_size=tokenizer.vocab_size,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return CLIPTextModel(config), tokenizer


def encode_text(text_encoder, tokenizer, captions: list[str], device=None) -> torch.Tensor:
    """Token embeddings (N, L, D) exactly as ``StableDiffusionPipeline.encode_prompt`` computes them."""
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    device = device or text_encoder.device
    mask = None
    if getattr(text_encoder.config, "use_attention_mask", False):
        mask = (ids != tokenizer.pad_token_id).to(device)
    return text_encoder(ids.to(device), attention_mask=mask)[0]

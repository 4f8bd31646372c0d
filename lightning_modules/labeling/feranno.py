"""FERAnno: the pseudo-label teacher that classifies from the generator's own UNet (SynFER §3.4).

An image (in [-1, 1], any size) is resized to the generator's resolution (and encoded by its frozen VAE in latent
mode), brought to a small timestep ``t`` (default 1) — by ``scheduler.add_noise`` (``noise="add"``: random noise in
training, a fixed-seed noise map in eval/predict) or by one deterministic DDIM inversion step with the UNet's own ε
at t=0 (``noise="invert"``) — and run once through the frozen UNet with a fixed caption (and null AU tokens when the
pipeline has an AU adapter). Two branches read that pass (``branches``):

- ``features``: forward hooks on the chosen ``unet.up_blocks`` collect the multi-scale decoder features; each is
  average-pooled to ``pool_size``², flattened, standardised (BatchNorm) and projected to one ``fusion_dim`` token
  per scale;
- ``attention``: probes on the text cross-attention layers (``attn2``) record the attention probabilities between
  image positions and caption tokens; one token per caption token (its maps in every layer, pooled the same way).

``fusion`` joins the tokens: ``bidirectional`` cross-attention between the two branches (the paper's design),
``concat`` of each branch's mean token, or ``self`` (a transformer encoder over a CLS token and all tokens); then
LayerNorm + Linear (+ optional AU head). ``branches=[features], fusion=self, timestep=25`` is the earlier
single-branch FERAnno (its checkpoints load as such).

Only the branch projections, the fusion and the heads train. The UNet / VAE are frozen, kept in eval mode, run
under ``torch.no_grad`` and are not written to checkpoints: ``generator_path`` is reloaded when a checkpoint is
loaded.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_modules.generator.components import null_class_id
from lightning_modules.guidance.semantic import ddim_inversion_step
from lightning_modules.labeling.feranno_branches import (AttentionTap, AttentionTokens, BidirectionalFusion,
                                                         FeatureNorm, FeatureTap, caption_token_ids, check_design)
from lightning_modules.paradigms.classifier import FERClassifierBase

NOISE_MODES = ("add", "invert")
FROZEN_PREFIX = "diffusion."  # state-dict prefix of the frozen generator parts (dropped from checkpoints)
KEY = "teacher.model"         # config node named in errors
PAPER_DESIGN = dict(timestep=1, branches=("features", "attention"), fusion="bidirectional")
SINGLE_BRANCH = dict(branches=["features"], fusion="self")  # what checkpoints without ``branches`` were trained as


def check_generator_path(generator_path: Optional[str | Path], key: str = f"{KEY}.generator_path") -> Path:
    """The pipeline directory, or a FileNotFoundError naming the config key."""
    if not generator_path:
        raise FileNotFoundError(f"{key} is not set: point it at the generator's pipeline directory "
                                f"(<run>/generator/pipeline, written by stage=generator)")
    path = Path(generator_path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{key}={path} is not a generator pipeline directory (no model_index.json); "
                                f"run stage=generator first or point it at an existing <run>/generator/pipeline")
    return path


def num_train_timesteps(generator_path: str | Path) -> int:
    """The pipeline scheduler's training horizon, read from ``scheduler/scheduler_config.json`` (1000 if absent)."""
    config = Path(generator_path) / "scheduler" / "scheduler_config.json"
    if not config.is_file():
        return 1000
    return int(json.loads(config.read_text()).get("num_train_timesteps", 1000))


def num_up_blocks(generator_path: str | Path) -> Optional[int]:
    """How many decoder blocks the pipeline's UNet has (from its UNet config; None if unreadable)."""
    from lightning_modules.generator.base_ref import unet_config

    try:
        return len(unet_config(generator_path)["up_block_types"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_timestep(timestep: int, horizon: int, key: str = f"{KEY}.timestep") -> None:
    if int(timestep) != timestep or not 0 < int(timestep) < horizon:
        raise ValueError(f"{key} must be an integer with 0 < t < {horizon} (the scheduler's num_train_timesteps), "
                         f"got {timestep}")


class FERAnnoTeacher(FERClassifierBase):
    def __init__(
        self,
        generator_path: Optional[str] = None,
        timestep: int = PAPER_DESIGN["timestep"],
        noise: str = "add",
        noise_seed: int = 0,
        caption: str = "a photo of a face",
        branches: Sequence[str] = PAPER_DESIGN["branches"],
        fusion: str = PAPER_DESIGN["fusion"],
        feature_blocks: Optional[Sequence[int]] = None,
        attention_layers: Optional[Sequence[str]] = None,
        pool_size: int = 4,
        fusion_dim: int = 128,
        fusion_heads: int = 4,
        fusion_layers: int = 1,
        dropout: float = 0.1,
        num_classes: int = 8,
        num_aus: int = 12,
        au_head: bool = False,
        au_loss_weight: float = 0.5,
        label_smoothing: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_fraction: float = 0.05,
        class_names: Optional[Sequence[str]] = None,
    ):
        super().__init__(num_classes, class_names)
        self.save_hyperparameters()
        path = check_generator_path(generator_path)
        self.branches, self.fusion_mode = check_design(branches, fusion, attention_layers, KEY)
        if noise not in NOISE_MODES:
            raise ValueError(f"{KEY}.noise must be one of {NOISE_MODES}, got {noise!r}")
        if pool_size < 1:
            raise ValueError(f"{KEY}.pool_size must be >= 1, got {pool_size}")
        if fusion_dim < 1 or fusion_heads < 1 or fusion_dim % fusion_heads:
            raise ValueError(f"{KEY}.fusion_dim ({fusion_dim}) must be a positive multiple of "
                             f"{KEY}.fusion_heads ({fusion_heads})")
        if fusion_layers < 1:
            raise ValueError(f"{KEY}.fusion_layers must be >= 1, got {fusion_layers}")
        if not 0 <= dropout < 1:
            raise ValueError(f"{KEY}.dropout must be in [0, 1), got {dropout}")
        check_timestep(timestep, num_train_timesteps(path))  # before the (slow) pipeline load
        pipe = _load_pipeline(path)
        check_timestep(timestep, int(pipe.scheduler.config.num_train_timesteps))

        # ---- frozen generator parts (not trained, not checkpointed)
        unet, vae = pipe.unet, pipe.vae
        parts = {"unet": unet} if vae is None else {"unet": unet, "vae": vae}
        self.diffusion = nn.ModuleDict(parts).requires_grad_(False).eval()
        self.noise_scheduler = pipe.scheduler
        self.image_size = int(pipe.config.image_size)
        self.prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        self.register_buffer("alphas_cumprod", pipe.scheduler.alphas_cumprod.float().clone(), persistent=False)
        size = self.image_size // pipe.vae_scale_factor
        gen = torch.Generator().manual_seed(int(noise_seed))
        self.register_buffer("eval_noise", torch.randn(1, unet.config.in_channels, size, size, generator=gen),
                             persistent=False)
        with torch.no_grad():  # the fixed condition: caption embedding (+ null AU tokens), computed once
            self.register_buffer("caption_states", pipe.encode_captions([caption]).to(unet.dtype), persistent=False)
            au_tokens = pipe.encode_aus(*_null_aus(pipe)).to(unet.dtype) if pipe.has_au_adapter else None
        self.register_buffer("null_au_tokens", au_tokens, persistent=False)
        token_ids = caption_token_ids(pipe.tokenizer, caption)
        del pipe  # the text encoder is not needed any more

        # ---- features branch: one token per hooked decoder block (scale)
        self.tap, self.feature_blocks, self.feature_channels = None, [], []
        if "features" in self.branches:
            n_blocks = len(unet.up_blocks)
            blocks = list(range(n_blocks)) if feature_blocks is None else [int(b) for b in feature_blocks]
            if not blocks or len(set(blocks)) != len(blocks) or any(not 0 <= b < n_blocks for b in blocks):
                raise ValueError(f"{KEY}.feature_blocks must be distinct indices of the UNet's {n_blocks} up_blocks "
                                 f"(0..{n_blocks - 1}), got {feature_blocks}")
            self.feature_blocks = blocks
            self.tap = FeatureTap({b: unet.up_blocks[b] for b in blocks})
            channels = list(reversed(unet.config.block_out_channels))
            self.feature_channels = [int(channels[b]) for b in blocks]
            flat = [c * pool_size * pool_size for c in self.feature_channels]
            self.proj = nn.ModuleList([nn.Sequential(FeatureNorm(d), nn.Linear(d, fusion_dim)) for d in flat])
            self.scale_embed = nn.Parameter(torch.zeros(1, len(blocks), fusion_dim))
            nn.init.trunc_normal_(self.scale_embed, std=0.02)

        # ---- attention branch: one token per caption token
        self.attention_tap = None
        if "attention" in self.branches:
            self.attention_tap = AttentionTap(unet, attention_layers, f"{KEY}.attention_layers")
            self.attention_tokens = AttentionTokens(token_ids, len(self.attention_tap.names), pool_size, fusion_dim)

        # ---- trainable fusion + heads
        if self.fusion_mode == "self":  # attention over [CLS] + every token
            self.cls_token = nn.Parameter(torch.zeros(1, 1, fusion_dim))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            layer = nn.TransformerEncoderLayer(fusion_dim, fusion_heads, dim_feedforward=2 * fusion_dim,
                                               dropout=dropout, activation="gelu", batch_first=True, norm_first=True)
            self.fusion = nn.TransformerEncoder(layer, num_layers=fusion_layers, enable_nested_tensor=False)
            width = fusion_dim
        elif self.fusion_mode == "bidirectional":
            self.fusion = BidirectionalFusion(fusion_dim, fusion_heads, fusion_layers, dropout)
            width = 2 * fusion_dim
        else:  # concat: each branch's mean token
            self.fusion = None
            width = fusion_dim * len(self.branches)
        self.norm = nn.LayerNorm(width)
        self.classifier = nn.Linear(width, num_classes)
        self.au_head = nn.Linear(width, num_aus) if au_head else None

    @property
    def display_name(self) -> str:
        return f"FERAnno t={self.hparams.timestep} {'+'.join(self.branches)} ({self.fusion_mode})"

    @property
    def unet(self) -> nn.Module:
        return self.diffusion["unet"]

    @property
    def vae(self) -> Optional[nn.Module]:
        return self.diffusion["vae"] if "vae" in self.diffusion else None

    # ------------------------------------------------------------------ frozen generator
    def train(self, mode: bool = True) -> "FERAnnoTeacher":
        super().train(mode)
        self.diffusion.eval()  # frozen parts never switch to training behaviour (dropout, norms)
        return self

    def _taps(self) -> list:
        return [tap for tap in (self.tap, self.attention_tap) if tap is not None]

    def remove_hooks(self) -> None:
        """Detach the feature hooks and attention probes from the UNet (the module can no longer classify)."""
        for tap in self._taps():
            tap.remove()

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (any size) -> the UNet's clean input x0 (pixels, or VAE latents × scaling_factor)."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(image.shape)}")
        if image.shape[-2:] != (self.image_size, self.image_size):
            image = F.interpolate(image.float(), size=(self.image_size, self.image_size), mode="bilinear",
                                  align_corners=False, antialias=True)
        dtype = self.unet.dtype
        if self.vae is None:
            return image.to(dtype)
        latents = self.vae.encode(image.to(self.vae.dtype)).latent_dist.mode()
        return (latents * self.vae.config.scaling_factor).to(dtype)

    def _conditions(self, n: int):
        text = self.caption_states.expand(n, -1, -1)
        if self.null_au_tokens is None:
            return text
        return text, [self.null_au_tokens.expand(n, -1, -1)]

    def noisy_input(self, x0: torch.Tensor, states) -> torch.Tensor:
        """x0 brought to the feature timestep: add_noise (random in training, fixed in eval) or one DDIM inversion
        step with the UNet's own ε at t=0."""
        n, t = x0.shape[0], int(self.hparams.timestep)
        steps = torch.full((n,), t, device=x0.device, dtype=torch.long)
        if self.hparams.noise == "add":
            noise = torch.randn_like(x0) if self.training else self.eval_noise.to(x0).expand_as(x0)
            return self.noise_scheduler.add_noise(x0, noise, steps)
        zero = torch.zeros_like(steps)
        out = self.unet(x0, zero, encoder_hidden_states=states, class_labels=self._null_classes(n, x0.device),
                        return_dict=False)[0]
        for tap in self._taps():
            tap.clear()
        return ddim_inversion_step(x0, out, self.alphas_cumprod[0], self.alphas_cumprod[t],
                                   self.prediction_type).to(x0.dtype)

    def _null_classes(self, n: int, device) -> Optional[torch.Tensor]:
        """A label-conditioned generator's UNet needs class labels: the null class, so the features that classify
        the expression are never told the answer."""
        null = null_class_id(self.unet)
        return None if null is None else torch.full((n,), null, device=device, dtype=torch.long)

    @torch.no_grad()
    def read_unet(self, image: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """One UNet pass at ``timestep``; per enabled branch: ``features`` (one (N, C_i, H_i, W_i) map per hooked
        up-block, in ``feature_blocks`` order) and ``attention`` (one (N, H·W, L) text attention map per probed
        layer), float32."""
        if not all(tap.active for tap in self._taps()):
            raise RuntimeError("the UNet feature hooks were removed (remove_hooks); rebuild the FERAnnoTeacher")
        x0 = self.encode(image)
        states = self._conditions(x0.shape[0])
        x_t = self.noisy_input(x0, states)
        steps = torch.full((x0.shape[0],), int(self.hparams.timestep), device=x0.device, dtype=torch.long)
        for tap in self._taps():
            tap.clear()
        self.unet(x_t, steps, encoder_hidden_states=states, class_labels=self._null_classes(x0.shape[0], x0.device),
                  return_dict=False)
        out = {}
        if self.tap is not None:
            out["features"] = [f.float() for f in self.tap.collect()]
        if self.attention_tap is not None:
            out["attention"] = [m.float() for m in self.attention_tap.collect()]
        return out

    def unet_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        if self.tap is None:
            raise RuntimeError(f"the features branch is off ({KEY}.branches={self.branches})")
        return self.read_unet(image)["features"]

    def attention_maps(self, image: torch.Tensor) -> list[torch.Tensor]:
        if self.attention_tap is None:
            raise RuntimeError(f"the attention branch is off ({KEY}.branches={self.branches})")
        return self.read_unet(image)["attention"]

    # ------------------------------------------------------------------ forward
    def branch_tokens(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, tokens, fusion_dim) per enabled branch: one token per scale / per caption token."""
        read = self.read_unet(image)
        tokens = {}
        if "features" in read:
            pool = self.hparams.pool_size
            scale = [proj(F.adaptive_avg_pool2d(m, pool).flatten(1)) for proj, m in zip(self.proj, read["features"])]
            tokens["features"] = torch.stack(scale, dim=1) + self.scale_embed
        if "attention" in read:
            tokens["attention"] = self.attention_tokens(read["attention"])
        return tokens

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        """Fused embedding (N, width) after the head's LayerNorm."""
        tokens = self.branch_tokens(image)
        parts = [tokens[b] for b in self.branches]
        if self.fusion_mode == "self":
            x = torch.cat([self.cls_token.expand(parts[0].shape[0], -1, -1), *parts], dim=1)
            fused = self.fusion(x)[:, 0]
        elif self.fusion_mode == "bidirectional":
            fused = self.fusion(tokens["features"], tokens["attention"])
        else:
            fused = torch.cat([p.mean(1) for p in parts], dim=1)
        return self.norm(fused)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.forward_features(image)
        out = {"logits": self.classifier(features), "features": features}
        if self.au_head is not None:
            out["aus"] = self.predict_aus(features)
        return out

    # ------------------------------------------------------------------ checkpoints: head only
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(FROZEN_PREFIX)]:
            del state[key]

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """A checkpoint without a ``branches`` hyperparameter predates the two-branch design: it loads as the
        single-branch FERAnno it was trained as (features, self-attention fusion)."""
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False).get("hyper_parameters", {})
        if "branches" not in saved:
            kwargs = {**SINGLE_BRANCH, **kwargs}
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Head weights from the checkpoint, frozen parts from ``generator_path`` (already loaded by __init__)."""
        state = checkpoint.get("state_dict")
        if state is None:
            raise ValueError("not a Lightning checkpoint: no state_dict")
        own = self.state_dict()
        missing = [k for k in own if not k.startswith(FROZEN_PREFIX) and k not in state]
        if missing:
            raise ValueError(f"FERAnno checkpoint lacks head weights {missing[:6]}{' ...' if len(missing) > 6 else ''} "
                           f"({len(missing)} keys): not a FERAnnoTeacher checkpoint, or a different fusion/head size")
        for key, value in own.items():
            if key.startswith(FROZEN_PREFIX):
                state.setdefault(key, value)


def _load_pipeline(path: Path):
    from lightning_modules.generator.pipeline import SynFERPipeline

    pipe = SynFERPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _null_aus(pipe):
    from lightning_modules.generator.conditioning import null_aus

    return null_aus(1, pipe.au_encoder.num_aus)

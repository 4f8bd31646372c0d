"""The SynFER generator: a text + AU (+ class label) conditioned diffusion model as a LightningModule.

Fit = ε-prediction (or v) MSE on real faces with their captions (a face without one gets the caption builder's,
``captions``: datamodules/caption_builder.py) and AU vectors; text and AUs are dropped
independently for classifier-free guidance and the AUs are jittered. With ``label_conditioning`` the expression
label also enters as a class embedding added to the time embedding (its own dropout to a null class and its own
CFG scale ``sample.label_scale``): a from-scratch text encoder learns the expression word slowly at CPU scale,
while a class embedding carries it from the first steps, so faces without AUs still get their expression.

Faces without AUs (a dataset without an OpenFace sidecar, or the unknown part of a partial one) train the AU
branch with masked AUs (value and mask 0), which is exactly the null AU condition of AU dropout and CFG. The AU
branch is kept rather than switched off by the data: the model's architecture (and config hash) does not depend
on which faces carry AUs, a partially annotated dataset uses the same path, and sampling with masked AUs asks
the AU branch only for the condition it was trained on. ``au_adapter=false`` is the cheaper equivalent when a
dataset is known to have no AUs at all. Sampling goes through ``SynFERPipeline``
(built on the module's own parts, EMA weights when enabled), which is also what the synthesis stage and the saved
pipeline directory use.

``training_schedule`` (lightning_modules/generator/phases.py): ``one_phase`` trains every part together;
``two_phase`` fine-tunes on captions first (AU branch off) and then trains the AU adapter alone.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from datamodules.caption_builder import CaptionBuilder, save_settings
from datamodules.labels import DISFA_AUS, AUVocabulary, parse_au_list
from lightning_modules.generator.components import (BACKBONES, CLASS_EMBEDDING_INITS, SAMPLERS, add_class_embedding,
                                                    build_tiny, load_pretrained, make_sampler, null_class_id)
from lightning_modules.generator.conditioning import (AUEncoder, augment_aus, class_conditions, drop_conditions,
                                                      encode_text, install_au_attention)
from lightning_modules.generator.phases import (PhaseSchedule, PhaseTracker, rng_state, set_rng_state,
                                                two_phase_optimizer)
from lightning_modules.generator.pipeline import SynFERPipeline

FINETUNE_MODES = ("full", "lora")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class FERGenerator(L.LightningModule):
    def __init__(
        self,
        backbone: str = "tiny",
        pretrained_path: Optional[str] = None,
        image_size: Optional[int] = 32,
        aus: Optional[Sequence[int]] = DISFA_AUS,
        unet: Optional[dict] = None,
        text_encoder: Optional[dict] = None,
        noise_scheduler: Optional[dict] = None,
        au_adapter: bool = True,
        au_tokens: int = 4,
        au_hidden_dim: int = 256,
        au_attn_scale: float = 1.0,
        au_noise_std: float = 0.1,
        text_dropout: float = 0.1,
        au_dropout: float = 0.1,
        label_conditioning: bool = False,
        label_dropout: float = 0.1,
        label_embedding_init: str = "auto",
        captions: Optional[dict] = None,
        train_text_encoder: bool = True,
        finetune: str = "full",
        lora_rank: int = 8,
        lora_alpha: Optional[int] = None,
        gradient_checkpointing: bool = False,
        ema_decay: Optional[float] = 0.999,
        lr: float = 5e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        lr_schedule: str = "cosine",
        frozen_dtype: Optional[str] = None,
        sample: Optional[dict] = None,
        num_classes: int = 8,
        class_names: Optional[Sequence[str]] = None,
        training_schedule: Optional[dict] = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        _check_args(backbone, pretrained_path, finetune, lora_rank, text_dropout, au_dropout, au_noise_std, lr,
                    ema_decay, frozen_dtype)
        if not 0 <= label_dropout < 1:
            raise ValueError(f"generator.model.label_dropout must be in [0, 1), got {label_dropout}")
        if label_conditioning and num_classes < 1:
            raise ValueError(f"generator.model.label_conditioning needs num_classes >= 1, got {num_classes}")
        if label_embedding_init not in CLASS_EMBEDDING_INITS:
            raise ValueError(f"generator.model.label_embedding_init must be one of {CLASS_EMBEDDING_INITS}, "
                             f"got {label_embedding_init!r}")
        self.vocab: AUVocabulary = parse_au_list(aus)
        # captions of faces without one; grids, evaluation and (through captions.json) synthesis use it too
        self.captioner = CaptionBuilder.from_config(captions, self.vocab.aus, "generator.model.captions")
        if backbone == "tiny":
            parts = build_tiny(int(image_size or 32), unet, text_encoder, noise_scheduler)
        else:
            parts = load_pretrained(pretrained_path, image_size, noise_scheduler)
        self.unet, self.text_encoder, self.vae = parts.unet, parts.text_encoder, parts.vae
        self.tokenizer, self.noise_scheduler, self.image_size = parts.tokenizer, parts.noise_scheduler, parts.image_size
        if label_conditioning:  # created after the other parts: the label-free model's init stays as it was
            init = label_embedding_init if label_embedding_init != "auto" else (
                "normal" if backbone == "tiny" else "zeros")  # from scratch vs a pretrained UNet kept as it was
            add_class_embedding(self.unet, num_classes + 1, init)
        self.null_class = null_class_id(self.unet) if label_conditioning else None
        self.au_encoder: Optional[AUEncoder] = None
        self.au_processors = None
        if au_adapter:  # off = the text-only generator of the paper's ablation (AUs reach it only via captions)
            self.au_encoder = AUEncoder(len(self.vocab), parts.text_dim, au_tokens, au_hidden_dim)
            self.au_processors = install_au_attention(self.unet, au_tokens, au_attn_scale)
        self._set_trainable()
        # every part trained in some phase, by name: the phases switch requires_grad, this set stays (EMA, optimizer)
        self._trainable_names = [n for n, p in self.named_parameters() if p.requires_grad]
        self.phases = PhaseTracker(PhaseSchedule.from_dict(training_schedule))
        if self.phases.schedule.two_phase and self.au_encoder is None:
            raise ValueError("a two_phase schedule trains the AU adapter in phase 2: it needs au_adapter=true")
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.sample_settings = {**dict(sampler="ddim", steps=25, text_scale=2.0, au_scale=2.0), **(sample or {})}
        if not label_conditioning:  # only a label-conditioned pipeline takes a label scale
            self.sample_settings.pop("label_scale", None)
        elif (self.sample_settings.get("label_scale") or 0) < 0:
            raise ValueError(f"generator.model.sample.label_scale must be >= 0 or null, "
                             f"got {self.sample_settings['label_scale']}")
        if self.sample_settings["sampler"] not in SAMPLERS:
            raise ValueError(f"generator.model.sample.sampler must be one of {SAMPLERS}, "
                             f"got {self.sample_settings['sampler']!r}")
        self.ema = None
        self._pending_ema_state: Optional[dict] = None
        # training faces seen, and those with at least one known AU (not recorded: an older checkpoint). The AU
        # count stays a tensor on the batch's device: an int() per step would stall a GPU every step.
        self._faces_recorded = True
        self._faces = 0
        self._faces_with_aus = torch.zeros((), dtype=torch.long)

    # ------------------------------------------------------------------ parameters
    def _set_trainable(self) -> None:
        hp = self.hparams
        if self.vae is not None:
            self.vae.requires_grad_(False).eval()
        train_text = hp.train_text_encoder and hp.backbone == "tiny"
        self.text_encoder.requires_grad_(train_text)
        if hp.frozen_dtype:
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[hp.frozen_dtype]
            if self.vae is not None:
                self.vae.to(dtype)
            if not train_text:
                self.text_encoder.to(dtype)
        if hp.finetune == "lora":
            from peft import LoraConfig

            self.unet.requires_grad_(False)
            self.unet.add_adapter(LoraConfig(r=hp.lora_rank, lora_alpha=hp.lora_alpha or hp.lora_rank,
                                             init_lora_weights="gaussian", target_modules=LORA_TARGETS))
        else:
            self.unet.requires_grad_(True)
        if self.unet.class_embedding is not None:  # new in a LoRA fine-tune too: trained in full
            self.unet.class_embedding.requires_grad_(True)
        if self.au_encoder is not None:
            self.au_processors.requires_grad_(True)
            self.au_encoder.requires_grad_(True)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """Every parameter trained in some phase (whether or not the current phase trains it)."""
        params = dict(self.named_parameters())
        return [params[name] for name in self._trainable_names]

    # ------------------------------------------------------------------ conditions
    def captions_for(self, batch: dict) -> list[str]:
        """Batch captions; a face without one gets the caption builder's, from its label and known AUs."""
        captions = list(batch.get("caption") or [""] * batch["image"].shape[0])
        missing = [i for i, caption in enumerate(captions) if not caption]
        if not missing:
            return captions
        # one copy per batch (normally none: on_before_batch_transfer fills captions while the batch is on the CPU)
        labels = batch["label"].cpu().tolist()
        aus = batch["aus"].cpu().tolist() if "aus" in batch else None
        mask = batch["au_mask"].cpu().tolist() if "au_mask" in batch else None
        rng = np.random.default_rng([self.global_step, self.global_rank]) if self.captioner.draws else None
        for i in missing:
            captions[i] = self.captioner.caption(int(labels[i]), aus[i] if aus else None, mask[i] if mask else None,
                                                 rng)
        return captions

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # on the CPU, before the move: building captions never waits for AUs copied back from an accelerator
        if isinstance(batch, dict) and "image" in batch:
            batch["caption"] = self.captions_for(batch)
        return batch

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return images
        latents = self.vae.encode(images.to(self.vae.dtype)).latent_dist.sample()
        return (latents * self.vae.config.scaling_factor).float()

    def diffusion_loss(self, batch: dict, train: bool = True, generator: Optional[torch.Generator] = None
                       ) -> torch.Tensor:
        hp = self.hparams
        latents = self.encode_images(batch["image"])
        n = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=generator)
        t = t.to(latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        aus, mask = batch["aus"].float(), batch["au_mask"].bool()
        captions = self.captions_for(batch)
        if train:
            aus = augment_aus(aus, mask, hp.au_noise_std, generator)
            aus, mask, captions = drop_conditions(aus, mask, captions, hp.text_dropout, hp.au_dropout, generator)
        text = encode_text(self.text_encoder, self.tokenizer, captions, latents.device).to(latents.dtype)
        states = text if self.au_encoder is None else (text, [self.au_encoder(aus, mask)])
        classes = None
        if self.null_class is not None:
            classes = class_conditions(batch["label"].to(latents.device), self.null_class,
                                       hp.label_dropout if train else 0.0, generator)
        pred = self.unet(noisy, t, encoder_hidden_states=states, class_labels=classes, return_dict=False)[0]
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        return F.mse_loss(pred.float(), target.float())

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        if batch["image"].shape[0] == 0:  # every face of the batch failed to load (counted by the datamodule)
            return None
        loss = self.diffusion_loss(batch, train=True)
        if self._faces_recorded:
            self._faces += int(batch["image"].shape[0])  # a shape, no device sync
            mask = batch["au_mask"]
            self._faces_with_aus = self._faces_with_aus.to(mask.device) + mask.any(dim=1).sum()
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        # Fixed noise and timesteps per batch so the validation loss is comparable across epochs.
        gen = torch.Generator().manual_seed(1000 + batch_idx)
        loss = self.diffusion_loss(batch, train=False, generator=gen)
        self.log("val/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0], sync_dist=True)

    def on_fit_start(self) -> None:
        if self.hparams.ema_decay and self.ema is None:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.trainable_parameters(), decay=self.hparams.ema_decay, use_ema_warmup=True,
                                power=3 / 4)
            if self._pending_ema_state is not None:
                self.ema.load_state_dict(self._pending_ema_state)
                self._pending_ema_state = None
            self.ema.to(self.device)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.phases.on_batch_start(self, self.global_step, batch_idx % self.trainer.accumulate_grad_batches == 0)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # here, not at batch end: once per optimizer step, and before the step's checkpoint is written
        if self.ema is not None:
            self.ema.step(self.trainable_parameters())

    def on_train_end(self) -> None:
        self.phases.finish(self)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()
        checkpoint["faces_seen"] = self.faces_seen
        checkpoint["rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        seen = checkpoint.get("faces_seen")
        self._faces_recorded = seen is not None
        self._faces = int(seen["faces"]) if seen else 0
        self._faces_with_aus = torch.tensor(int(seen["with_aus"]) if seen else 0)
        if "rng" in checkpoint and self._trainer is not None and self.trainer.state.fn == "fit":
            set_rng_state(checkpoint["rng"])  # a resumed fit draws what the uninterrupted one would have
        if "ema" in checkpoint:
            if self.ema is not None:
                self.ema.load_state_dict(checkpoint["ema"])
            else:
                self._pending_ema_state = checkpoint["ema"]

    def configure_optimizers(self):
        from diffusers.optimization import get_scheduler

        hp = self.hparams
        if self.phases.schedule.two_phase:
            return two_phase_optimizer(self, self.phases.schedule)
        opt = torch.optim.AdamW(self.trainable_parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = int(self._trainer.estimated_stepping_batches) if self._trainer is not None else 1000
        sched = get_scheduler(hp.lr_schedule, opt, num_warmup_steps=min(hp.warmup_steps, max(total - 1, 0)),
                              num_training_steps=max(total, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ sampling / saving
    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Swap the EMA weights in (sampling, saving); the training weights come back afterwards."""
        if self.ema is None:
            yield
            return
        params = self.trainable_parameters()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)

    def pipeline(self, sampler: Optional[str] = None) -> SynFERPipeline:
        """A sampling pipeline over this module's parts (shared, not copied)."""
        scheduler = make_sampler(sampler or self.sample_settings["sampler"], self.noise_scheduler.config)
        pipe = SynFERPipeline(unet=self.unet, scheduler=scheduler, text_encoder=self.text_encoder,
                              tokenizer=self.tokenizer, vae=self.vae, image_size=self.image_size)
        pipe.set_au_adapter(self.au_encoder, self.au_processors, self.vocab.aus, self.trained_on_aus)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def faces_seen(self) -> Optional[dict[str, int]]:
        """Training faces seen and those with at least one known AU; None when not recorded (older checkpoint)."""
        if not self._faces_recorded:
            return None
        return {"faces": self._faces, "with_aus": int(self._faces_with_aus)}

    @property
    def trained_on_aus(self) -> Optional[bool]:
        """Whether training showed the AU branch any known AU (None: no training recorded)."""
        if not self.faces_seen or not self.faces_seen["faces"]:
            return None
        return self.faces_seen["with_aus"] > 0

    @torch.no_grad()
    def sample(self, captions: Sequence[str], aus: Optional[torch.Tensor] = None,
               au_mask: Optional[torch.Tensor] = None, seeds: Optional[Sequence[int]] = None,
               class_labels: Optional[torch.Tensor] = None, **overrides) -> torch.Tensor:
        """Images (N,3,H,W) in [0,1] with the module's sampling settings (EMA weights when enabled).

        ``class_labels`` (N,) is the intended expression, the class condition of a label-conditioned generator
        (ignored without one, like AUs for a text-only generator); unknown labels (< 0) sample the null class.
        """
        settings = {**self.sample_settings, **overrides}
        if self.au_encoder is None:  # text-only generator (ablation): the AU request reaches it only via captions
            aus = au_mask = None
        if self.null_class is None:
            class_labels = None
            settings.pop("label_scale", None)
        elif class_labels is not None:
            class_labels = class_conditions(torch.as_tensor(class_labels), self.null_class)
        was_training = self.training
        self.eval()
        try:
            with self.ema_weights():
                pipe = self.pipeline(settings.pop("sampler"))
                return pipe(captions, aus=aus, au_mask=au_mask, seeds=seeds, class_labels=class_labels,
                            num_inference_steps=settings.pop("steps"), progress=False, **settings).images
        finally:
            self.train(was_training)

    def save_generator(self, directory) -> None:
        """The diffusers pipeline directory + AU adapter (+ LoRA), EMA weights when enabled, and the caption
        builder's settings (``captions.json``: synthesis captions its faces the way training did)."""
        with self.ema_weights():
            self.pipeline().save_pretrained(directory)
        save_settings(directory, self.captioner, self.trained_on_aus)


def _check_args(backbone, pretrained_path, finetune, lora_rank, text_dropout, au_dropout, au_noise_std, lr,
                ema_decay, frozen_dtype) -> None:
    if backbone not in BACKBONES:
        raise ValueError(f"generator.model.backbone must be one of {BACKBONES}, got {backbone!r}")
    if backbone == "pretrained" and not pretrained_path:
        raise ValueError("generator.model.pretrained_path must point at a local Stable Diffusion folder "
                         "when generator.model.backbone=pretrained")
    if finetune not in FINETUNE_MODES:
        raise ValueError(f"generator.model.finetune must be one of {FINETUNE_MODES}, got {finetune!r}")
    if finetune == "lora" and lora_rank < 1:
        raise ValueError(f"generator.model.lora_rank must be >= 1, got {lora_rank}")
    for key, p in (("text_dropout", text_dropout), ("au_dropout", au_dropout)):
        if not 0 <= p < 1:
            raise ValueError(f"generator.model.{key} must be in [0, 1), got {p}")
    if au_noise_std < 0:
        raise ValueError(f"generator.model.au_noise_std must be >= 0, got {au_noise_std}")
    if lr <= 0:
        raise ValueError(f"generator.model.lr must be > 0, got {lr}")
    if ema_decay is not None and not 0 < ema_decay < 1:
        raise ValueError(f"generator.model.ema_decay must be in (0, 1) or null, got {ema_decay}")
    if frozen_dtype not in (None, "bf16", "fp16"):
        raise ValueError(f"generator.model.frozen_dtype must be null, bf16 or fp16, got {frozen_dtype!r}")

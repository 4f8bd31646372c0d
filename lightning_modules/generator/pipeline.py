"""The SynFER sampler as a diffusers pipeline: text + AU (+ class label) conditioned, per-sample seeds, separate
CFG scales.

``SynFERPipeline`` holds the Stable Diffusion components (``vae`` optional: without it the UNet works in pixel
space) plus the AU adapter (``au_encoder`` + decoupled AU attention processors). Its denoising loop follows
``StableDiffusionPipeline`` step for step (same noise draw, scheduler calls and decoding), so with the AU adapter
off and guidance off it reproduces diffusers' output exactly (tests/test_generator_pipeline.py checks this).

Saved as a diffusers pipeline directory (``model_index.json``, ``unet/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``, ``vae/`` in latent mode) + ``au_adapter.safetensors``/``au_adapter.json`` + LoRA weights
(``pytorch_lora_weights.safetensors``) when the UNet carries a LoRA. A latent-mode directory also loads with
``StableDiffusionPipeline.from_pretrained`` (without the AU branch). A LoRA over a frozen Stable Diffusion folder
keeps no UNet, VAE or text encoder of its own: ``base_model.json`` names that folder (``base_ref.py``).

A label-conditioned UNet (``num_class_embeds`` = classes + 1, the last id the null class) takes the intended
expression as ``class_labels``; the class embedding is part of the UNet's own weights and config, so it needs
nothing beyond the diffusers layout to save and load. Its guidance nests outside text and AUs::

    eps = eps(∅) + label_scale·(eps(c) - eps(∅)) + text_scale·(eps(c,text) - eps(c)) + au_scale·(eps(c,text,AU) - eps(c,text))

With ``label_scale == text_scale`` (the default) label and text are guided jointly and no extra UNet pass is run;
``label_scale = 1`` leaves the label as a plain condition (text guided against the same label, no label term).
"""
from __future__ import annotations

import inspect
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor

from lightning_modules.generator.base_ref import (BASE_MODEL, BASE_PARTS, UNET_EXTRA, frozen_base,
                                                  load_from_base_reference, save_with_base_reference)
from lightning_modules.generator.components import base_unet_without_lora, lora_state_dict, make_sampler, null_class_id
from lightning_modules.generator.conditioning import (AU_ADAPTER_WEIGHTS, AUEncoder, au_attention_scale, encode_text,
                                                      load_au_adapter, null_aus, plain_attention_processors,
                                                      save_au_adapter, set_au_attention_scale)
from lightning_modules.generator.sample_settings import FaceBatch, SamplingSettings, negative_prompts
from lightning_modules.guidance.sampling import guidance_gradients, invert_to, text_of, with_text
from lightning_modules.guidance.semantic import (GuidancePlan, classifier_guided_noise, combine_guidance,
                                                 embedding_guidance_step)

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass
class SynFEROutput:
    images: torch.Tensor | list          # (N,3,H,W) float in [0,1] ("pt"), or PIL images ("pil")
    seeds: list[int]


def seed_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample: the same seed gives the same noise on any device and in any batch."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


class SynFERPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["vae"]

    def __init__(self, unet, scheduler, text_encoder, tokenizer, vae=None, image_size: Optional[int] = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
                              vae=vae)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        if image_size is None:
            image_size = int(unet.config.sample_size) * self.vae_scale_factor
        self.register_to_config(image_size=int(image_size))
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.au_encoder: Optional[AUEncoder] = None
        self.au_processors: Optional[nn.ModuleDict] = None
        self.au_names: list[int] = []
        self.au_trained: Optional[bool] = None  # False: the AU branch only ever saw unknown AUs (data without AUs)

    # ------------------------------------------------------------------ AU adapter
    def set_au_adapter(self, au_encoder: Optional[AUEncoder], au_processors: Optional[nn.ModuleDict],
                       aus: Sequence[int] = (), trained_on_aus: Optional[bool] = None) -> None:
        self.au_encoder, self.au_processors, self.au_names = au_encoder, au_processors, list(aus)
        self.au_trained = trained_on_aus

    @property
    def has_au_adapter(self) -> bool:
        return self.au_encoder is not None and self.au_processors is not None

    @property
    def null_class(self) -> Optional[int]:
        """The null class id of a label-conditioned UNet (None: the UNet takes no class label)."""
        return null_class_id(self.unet)

    def load_au_adapter(self, directory: str | Path) -> None:
        encoder, processors, config = load_au_adapter(directory, self.unet)
        self.set_au_adapter(encoder, processors, config.get("aus", []), config.get("trained_on_aus"))

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """The diffusers layout + AU adapter + LoRA; the UNet is saved without AU processors and LoRA layers so the
        folder stays loadable by plain diffusers. A LoRA over a frozen Stable Diffusion folder saves no UNet, VAE
        or text encoder, only a reference to that folder (``base_ref.py``)."""
        save_directory = Path(save_directory)
        unet = self.unet
        lora_state = lora_state_dict(unet)
        base = frozen_base(self) if lora_state is not None else None
        # an earlier save into this folder in the other layout must not decide how it loads
        for stale in ((BASE_PARTS if base is not None else ()) + (BASE_MODEL, UNET_EXTRA)):
            if (save_directory / stale).is_dir():
                shutil.rmtree(save_directory / stale)
            elif (save_directory / stale).is_file():
                (save_directory / stale).unlink()
        if base is not None:
            save_with_base_reference(self, save_directory, base)
        else:
            processors = unet.attn_processors
            try:
                unet.set_attn_processor(plain_attention_processors(unet))
                if lora_state is not None:
                    self.register_modules(unet=base_unet_without_lora(unet))
                super().save_pretrained(save_directory, **kwargs)
            finally:
                self.register_modules(unet=unet)
                unet.set_attn_processor(processors)
        if lora_state is not None:
            adapter = unet.active_adapters()[0] if hasattr(unet, "active_adapters") else "default"
            # the metadata carries lora_alpha: without it diffusers reloads with alpha = rank
            self.save_lora_weights(save_directory, unet_lora_layers=lora_state,
                                   unet_lora_adapter_metadata=unet.peft_config[adapter].to_dict())
        if self.has_au_adapter:
            save_au_adapter(save_directory, self.au_encoder, self.au_processors, self.au_names,
                            au_attention_scale(self.au_processors), self.au_trained)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "SynFERPipeline":
        path = Path(pretrained_model_name_or_path)
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"not a diffusers pipeline directory (no model_index.json): {path}")
        if (path / BASE_MODEL).is_file():
            if kwargs:
                raise TypeError(f"{path} is a LoRA over a base model folder: loading options {sorted(kwargs)} "
                                f"are not supported")
            pipe = load_from_base_reference(cls, path)
        else:
            pipe = super().from_pretrained(str(path), **kwargs)
        if (path / LORA_WEIGHTS).is_file():
            pipe.load_lora_weights(str(path))
        if (path / AU_ADAPTER_WEIGHTS).is_file():
            pipe.load_au_adapter(path)
        return pipe

    # ------------------------------------------------------------------ conditions
    def encode_captions(self, captions: list[str]) -> torch.Tensor:
        return encode_text(self.text_encoder, self.tokenizer, captions, self._execution_device)

    def encode_aus(self, aus: torch.Tensor, au_mask: Optional[torch.Tensor]) -> torch.Tensor:
        device = self._execution_device
        dtype = self.unet.dtype
        aus = aus.to(device=device, dtype=dtype)
        au_mask = torch.ones_like(aus, dtype=torch.bool) if au_mask is None else au_mask.to(device).bool()
        return self.au_encoder(aus, au_mask)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        captions: Sequence[str],
        aus: Optional[torch.Tensor] = None,
        au_mask: Optional[torch.Tensor] = None,
        seeds: Optional[Sequence[int]] = None,
        labels: Optional[torch.Tensor] = None,
        class_labels: Optional[torch.Tensor] = None,
        init_images: Optional[torch.Tensor] = None,
        guide: Optional[nn.Module] = None,
        step_callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None,
        settings: Optional[SamplingSettings] = None,
        **options,
    ) -> SynFEROutput:
        """Images for ``captions`` (+ ``aus``, ``au_mask``): one seed per sample (default 0..N-1).

        How they are sampled is ``settings`` (a ``SamplingSettings``), with any of its fields also accepted as a
        keyword (``num_inference_steps=25, text_scale=2.0, ...``), replacing the value in ``settings``.
        Per face: ``labels`` are the target expressions semantic guidance steers toward with the frozen FER
        classifier ``guide`` (on [0,1] images, e.g. ``ClassifierGuide``); ``init_images`` (N,3,H,W in [0,1]) the
        layout sources (with ``init_strength``); ``class_labels`` (N,) in ``0 .. null_class`` (the null id = no
        label) the class condition of a label-conditioned UNet (default: the null class; see the module doc).
        """
        settings = SamplingSettings.of(settings, **options)
        faces = self._check_faces(captions, aus, au_mask, seeds, settings)
        guidance = settings.guidance
        faces.labels = self._check_guidance(guidance, guide, labels, faces.aus is not None, len(faces))
        faces.classes = self._check_classes(class_labels, len(faces))
        faces.init_images = self._check_init(init_images, settings.init_strength, len(faces))
        base_scheduler = self.scheduler
        if settings.sampler is not None:  # for this call only; the pipeline keeps (and saves) its own scheduler
            self.scheduler = make_sampler(settings.sampler, self.scheduler.config)
        plan = GuidancePlan(float(settings.text_scale), float(settings.au_scale), faces.aus is not None)
        previous_scale = None
        if self.has_au_adapter and settings.au_attn_scale is not None:
            previous_scale = au_attention_scale(self.au_processors)
            set_au_attention_scale(self.au_processors, settings.au_attn_scale)
        progress = settings.progress and len(faces) <= settings.batch_size
        try:
            image = torch.cat([self._sample_batch(batch, settings, plan, guide, progress, step_callback)
                               for batch in faces.batches(settings.batch_size)])
        finally:
            self.scheduler = base_scheduler
            if previous_scale is not None:
                set_au_attention_scale(self.au_processors, previous_scale)
        if settings.output_type == "pil":
            return SynFEROutput(self.image_processor.numpy_to_pil(self.image_processor.pt_to_numpy(image)),
                                faces.seeds)
        if settings.output_type == "np":
            return SynFEROutput(self.image_processor.pt_to_numpy(image), faces.seeds)
        return SynFEROutput(image, faces.seeds)

    def _check_faces(self, captions, aus, au_mask, seeds, settings: SamplingSettings) -> FaceBatch:
        captions = list(captions)
        n = len(captions)
        if n == 0:
            raise ValueError("no captions given")
        seeds = list(range(n)) if seeds is None else [int(s) for s in seeds]
        if len(seeds) != n:
            raise ValueError(f"got {len(seeds)} seeds for {n} captions")
        if aus is not None:
            if not self.has_au_adapter:
                raise ValueError("AUs were given but this pipeline has no AU adapter")
            aus = torch.as_tensor(aus, dtype=torch.float32)
            if aus.shape != (n, self.au_encoder.num_aus):
                raise ValueError(f"aus must have shape ({n}, {self.au_encoder.num_aus}), got {tuple(aus.shape)}")
            if au_mask is not None:
                au_mask = torch.as_tensor(au_mask, dtype=torch.bool)
                if au_mask.shape != aus.shape:
                    raise ValueError(f"au_mask shape {tuple(au_mask.shape)} differs from aus {tuple(aus.shape)}")
        else:
            au_mask = None
        return FaceBatch(captions, negative_prompts(settings.negative_prompt, n), seeds, aus, au_mask)

    def _check_classes(self, class_labels, n: int) -> Optional[torch.Tensor]:
        null = self.null_class
        if null is None:
            if class_labels is not None:
                raise ValueError("class_labels were given but this pipeline's UNet has no class embedding")
            return None
        if class_labels is None:
            return torch.full((n,), null, dtype=torch.long)
        classes = torch.as_tensor(class_labels, dtype=torch.long)
        if classes.shape != (n,):
            raise ValueError(f"class_labels must have shape ({n},), got {tuple(classes.shape)}")
        if len(classes) and (classes.min() < 0 or classes.max() > null):
            raise ValueError(f"class_labels must be in [0, {null}] ({null} = no label), got "
                             f"[{int(classes.min())}, {int(classes.max())}]")
        return classes

    def _conditions(self, captions, negatives, aus, au_mask, passes: Sequence[str]) -> dict[str, object]:
        """Encoder states for each pass: a text tensor, or (text, [AU tokens]) with the AU branch; the label pass
        has the null pass's states (its class id is what differs)."""
        n = len(captions)
        text = self.encode_captions(list(captions))
        null_text = self.encode_captions(list(negatives)) if "null" in passes else None
        if not self.has_au_adapter:
            return {"text": text, "null": null_text, "label": null_text}
        null_tokens = self.encode_aus(*null_aus(n, self.au_encoder.num_aus))
        states = {"text": (text, [null_tokens]), "null": (null_text, [null_tokens])}
        states["label"] = states["null"]
        if aus is not None:
            states["full"] = (text, [self.encode_aus(aus, au_mask)])
        return states

    def _check_guidance(self, guidance, guide, labels, use_aus: bool, n: int) -> Optional[torch.Tensor]:
        if guidance is None:
            return None
        if guide is None:
            raise ValueError("semantic guidance needs a guidance classifier (guide=...)")
        if guidance.embedding_scale > 0 or guidance.classifier_scale > 0:
            if labels is None:
                raise ValueError("semantic guidance toward an expression needs target labels (labels=...)")
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.shape != (n,):
                raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
        if guidance.au_scale > 0 and not use_aus:
            raise ValueError("AU guidance (au_scale > 0) needs the requested AUs (aus=...)")
        if guidance.latent_enabled and self.scheduler.config.prediction_type != "epsilon":
            raise ValueError("classifier/AU guidance on x_t needs an epsilon-prediction model; use embedding_scale")
        return labels

    def _check_init(self, init_images, init_strength: float, n: int) -> Optional[torch.Tensor]:
        if init_images is None or init_strength == 0.0:
            return None
        init_images = torch.as_tensor(init_images, dtype=torch.float32)
        if init_images.ndim != 4 or len(init_images) != n or init_images.shape[1] != 3:
            raise ValueError(f"init_images must have shape ({n}, 3, H, W), got {tuple(init_images.shape)}")
        if init_images.min() < 0 or init_images.max() > 1:
            raise ValueError("init_images must be in [0, 1]")
        return init_images

    def _sample_batch(self, faces: FaceBatch, settings: SamplingSettings, plan: GuidancePlan, guide, progress: bool,
                      step_callback) -> torch.Tensor:
        guidance, label_scale = settings.guidance, settings.label_cfg_scale
        captions, aus, au_mask, labels, classes = faces.captions, faces.aus, faces.au_mask, faces.labels, faces.classes
        device = self._execution_device
        passes = list(plan.passes)
        # the label term needs eps(∅) and eps(c); none when scales agree or no sample has a label
        label_term = classes is not None and label_scale != plan.text_scale and bool((classes != self.null_class).any())
        if label_term:
            passes += [p for p in ("null", "label") if p not in passes]
        states = self._conditions(captions, faces.negatives, aus, au_mask, passes)
        pass_classes = None
        if classes is not None:
            classes = classes.to(device)
            null = torch.full_like(classes, self.null_class)
            pass_classes = {p: null if p == "null" else classes for p in passes}
        self.scheduler.set_timesteps(settings.num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        size = self.config.image_size // self.vae_scale_factor
        shape = (len(captions), self.unet.config.in_channels, size, size)
        generators = seed_generators(faces.seeds)  # also drive stochastic samplers, as StableDiffusionPipeline does
        latents = randn_tensor(shape, generator=generators, device=device, dtype=self.unet.dtype)
        latents = latents * self.scheduler.init_noise_sigma
        first = 0
        if faces.init_images is not None:  # layout initialisation: the last k steps start from the inverted face
            first = len(timesteps) - max(1, int(round(settings.init_strength * len(timesteps))))
            latents = invert_to(self, faces.init_images, timesteps[first:], self._null_state(len(captions)),
                                None if classes is None else torch.full_like(classes, self.null_class))
        extra = _step_kwargs(self.scheduler, generators, settings.eta)
        joined = _join_states([states[p] for p in passes])
        joined_classes = None if pass_classes is None else torch.cat([pass_classes[p] for p in passes])
        active = guidance.active_steps(len(timesteps)) if guidance is not None else [False] * len(timesteps)
        guided_pass = "full" if aus is not None else "text"
        steps = list(enumerate(timesteps))[first:]
        for i, t in (self.progress_bar(steps) if progress else steps):
            latent_grad = None
            if active[i]:
                text_grad, latent_grad = guidance_gradients(self, latents, t, states[guided_pass], guidance, guide,
                                                            labels, aus, au_mask, classes)
                if text_grad is not None:  # c_text <- c_text - λ ∇/‖∇‖, kept for the following steps
                    text = embedding_guidance_step(text_of(states["text"]), text_grad, guidance.embedding_scale,
                                                   guidance.per_token)
                    for key in ("text", "full"):
                        if key in states:
                            states[key] = with_text(states[key], text)
                    joined = _join_states([states[p] for p in passes])
            model_input = self.scheduler.scale_model_input(latents, t)
            # all guidance passes in one UNet call (as StableDiffusionPipeline batches its CFG passes)
            batched = torch.cat([model_input] * len(passes))
            out = self.unet(batched, t, encoder_hidden_states=joined, class_labels=joined_classes,
                            return_dict=False)[0]
            eps = dict(zip(passes, out.chunk(len(passes))))
            noise_pred = combine_guidance(plan, eps)
            if label_term:
                noise_pred = label_guided_noise(noise_pred, eps["label"], eps["null"], label_scale, plan.text_scale)
            if latent_grad is not None:
                noise_pred = classifier_guided_noise(noise_pred, latent_grad,
                                                     self.scheduler.alphas_cumprod[int(t)].to(device))
            latents = self.scheduler.step(noise_pred, t, latents, **extra, return_dict=False)[0]
            if step_callback is not None:
                step_callback(i, t, latents)
        return self.decode(latents)

    def _null_state(self, n: int):
        """The unconditional state (empty caption, no AUs): the condition of the layout inversion."""
        text = self.encode_captions([""] * n)
        if not self.has_au_adapter:
            return text
        return (text, [self.encode_aus(*null_aus(n, self.au_encoder.num_aus))])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (or pixels) -> images in [0,1], as StableDiffusionPipeline post-processes them."""
        if self.vae is not None:
            latents = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(latents, output_type="pt", do_denormalize=[True] * len(latents))


def label_guided_noise(guided: torch.Tensor, eps_label: torch.Tensor, eps_null: torch.Tensor, label_scale: float,
                       text_scale: float) -> torch.Tensor:
    """Add the label's own guidance to the text/AU-guided prediction whose conditional passes carry the label.

    ``guided`` = eps(∅) + text_scale·(eps(c,text) - eps(∅)) [+ AU term]; adding
    (label_scale - text_scale)·(eps(c) - eps(∅)) gives the nested form of the module doc.
    """
    return guided + (label_scale - text_scale) * (eps_label - eps_null)


def _join_states(states: list) -> object:
    """Concatenate per-pass encoder states along the batch: text tensors, or (text, [AU tokens]) tuples."""
    if len(states) == 1:
        return states[0]
    if isinstance(states[0], tuple):
        return (torch.cat([s[0] for s in states]), [torch.cat([s[1][0] for s in states])])
    return torch.cat(states)


def _step_kwargs(scheduler, generators, eta: float) -> dict:
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generators
    return kwargs

"""The sampler hooks of semantic guidance and layout initialisation (SynFER §3.3), used by SynFERPipeline.

The math lives in ``semantic.py`` (pure functions); this file wires it to a pipeline's UNet, scheduler and decoder
and to a frozen FER classifier (``ClassifierGuide``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_modules.guidance.semantic import (SemanticGuidance, au_guidance_loss, ddim_inversion_step,
                                                 expression_loss, predict_x0)


class ClassifierGuide(nn.Module):
    """A frozen FER classifier (teacher) as the guidance scorer: images in [0,1] at the generator's resolution ->
    the classifier's outputs (``logits``, ``aus``) at its own input size and [-1,1] range; differentiable."""

    def __init__(self, classifier: nn.Module, image_size: int):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.image_size = int(image_size)

    def train(self, mode: bool = True) -> "ClassifierGuide":  # stays frozen in eval mode (dropout, norm stats)
        return super().train(False)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        return self.classifier(images * 2 - 1)


def text_of(state) -> torch.Tensor:
    """The text part of an encoder state: a tensor, or (text, [AU tokens]) with the AU branch."""
    return state[0] if isinstance(state, tuple) else state


def with_text(state, text: torch.Tensor):
    return (text, state[1]) if isinstance(state, tuple) else text


def decode_differentiable(pipe, x0: torch.Tensor) -> torch.Tensor:
    """x̂0 (latent or pixel) -> image in ~[0,1] without clamping, so the gradient reaches every pixel."""
    if pipe.vae is not None:
        x0 = pipe.vae.decode(x0.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return x0.float() / 2 + 0.5


def guidance_gradients(pipe, latents: torch.Tensor, t, state, guidance: SemanticGuidance, guide: nn.Module,
                       labels: Optional[torch.Tensor], aus: Optional[torch.Tensor],
                       au_mask: Optional[torch.Tensor], class_labels: Optional[torch.Tensor] = None
                       ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One conditional UNet pass with gradients: (∇_c L_expr for the text embedding or None,
    ∇_x (classifier_scale·L_expr + au_scale·L_AU) for x_t or None). ``class_labels``: the class condition of a
    label-conditioned UNet (None without one)."""
    with torch.enable_grad():
        text = text_of(state).detach().requires_grad_(guidance.embedding_scale > 0)
        x = latents.detach().requires_grad_(guidance.latent_enabled)
        out = pipe.unet(pipe.scheduler.scale_model_input(x, t), t, encoder_hidden_states=with_text(state, text),
                        class_labels=class_labels, return_dict=False)[0]
        alpha_bar = pipe.scheduler.alphas_cumprod[int(t)].to(x.device)
        x0 = predict_x0(x, out, alpha_bar, pipe.scheduler.config.prediction_type)
        scores = guide(decode_differentiable(pipe, x0))
        text_grad = latent_grad = None
        ce = expression_loss(scores["logits"], labels) if labels is not None else None
        if guidance.embedding_scale > 0:
            text_grad = torch.autograd.grad(ce, text, retain_graph=guidance.latent_enabled)[0]
        if guidance.latent_enabled:
            loss = x.new_zeros(())
            if guidance.classifier_scale > 0:
                loss = loss + guidance.classifier_scale * ce
            if guidance.au_scale > 0:
                if "aus" not in scores:
                    raise ValueError("AU guidance needs a guidance classifier with an AU head")
                loss = loss + guidance.au_scale * au_guidance_loss(scores["aus"].float(), aus.to(x.device),
                                                                   None if au_mask is None else au_mask.to(x.device))
            latent_grad = torch.autograd.grad(loss, x)[0]
    return text_grad, latent_grad


def encode_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images in [0,1] -> the sampler's space at the pipeline's resolution (VAE latent mean in latent mode)."""
    device, dtype = pipe._execution_device, pipe.unet.dtype
    size = pipe.config.image_size
    images = images.to(device=device, dtype=torch.float32)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    x = images * 2 - 1
    if pipe.vae is not None:
        x = pipe.vae.encode(x.to(pipe.vae.dtype)).latent_dist.mean * pipe.vae.config.scaling_factor
    return x.to(dtype)


@torch.no_grad()
def invert_to(pipe, images: torch.Tensor, timesteps: torch.Tensor, state,
              class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """DDIM inversion of ``images`` up the sampler's own grid to ``timesteps[0]`` (``timesteps`` descending, as the
    sampler will run them): the layout-preserving starting point for sampling the remaining steps.
    ``class_labels``: the class condition of a label-conditioned UNet (the null class), None without one."""
    x = encode_images(pipe, images)
    alphas = pipe.scheduler.alphas_cumprod.to(x.device)
    alpha_from, t_from = torch.tensor(1.0, device=x.device), 0   # the clean image
    for t in reversed(timesteps.tolist()):
        eps = pipe.unet(x, t_from, encoder_hidden_states=state, class_labels=class_labels, return_dict=False)[0]
        x = ddim_inversion_step(x, eps, alpha_from, alphas[int(t)], pipe.scheduler.config.prediction_type)
        alpha_from, t_from = alphas[int(t)], int(t)
    return x

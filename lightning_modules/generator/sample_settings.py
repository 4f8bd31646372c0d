"""What one call of the SynFER sampler needs, in two small records: ``SamplingSettings`` (how every face of the call
is sampled) and ``FaceBatch`` (each face's own conditions, checked and sliced into UNet batches)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch

from lightning_modules.guidance.semantic import SemanticGuidance

OUTPUT_TYPES = ("pt", "pil", "np")


@dataclass(frozen=True)
class SamplingSettings:
    """Sampler settings shared by every face of a call.

    ``text_scale``/``au_scale`` are the classifier-free guidance scales of the text and the AU condition (1 = off);
    ``label_scale`` that of the class label of a label-conditioned UNet (None = ``text_scale``); ``au_attn_scale``
    weights the AU attention branch (None = the trained value; 0 = adapter off); ``negative_prompt`` (one string or
    one per face) replaces the empty caption of the unconditional pass; ``sampler`` (ddim, dpmpp, ...) replaces the
    pipeline's scheduler for this call only. ``semantic_guidance`` (None or all scales 0 = plain sampling) steers
    the late steps with the call's ``guide`` classifier; ``init_strength`` in (0, 1] with ``init_images`` is layout
    initialisation: sampling starts from the DDIM inversion of those faces at that fraction of the trajectory.
    """
    num_inference_steps: int = 25
    text_scale: float = 1.0
    au_scale: float = 1.0
    label_scale: Optional[float] = None
    au_attn_scale: Optional[float] = None
    negative_prompt: Optional[str | Sequence[str]] = None
    sampler: Optional[str] = None
    eta: float = 0.0
    semantic_guidance: Optional[SemanticGuidance] = None
    init_strength: float = 0.0
    batch_size: int = 64
    output_type: str = "pt"
    progress: bool = True

    def __post_init__(self):
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.text_scale < 0 or self.au_scale < 0:
            raise ValueError(f"guidance scales must be >= 0, got text_scale={self.text_scale} "
                             f"au_scale={self.au_scale}")
        if self.label_scale is not None and self.label_scale < 0:
            raise ValueError(f"label_scale must be >= 0, got {self.label_scale}")
        if not 0.0 <= self.init_strength <= 1.0:
            raise ValueError(f"init_strength must be in [0, 1], got {self.init_strength}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be pt, pil or np, got {self.output_type!r}")

    @classmethod
    def of(cls, settings: Optional["SamplingSettings"] = None, **options) -> "SamplingSettings":
        """``settings`` (default: the defaults above) with keyword ``options`` replaced; an unknown option is a
        TypeError naming it, as a misspelt keyword argument would be."""
        unknown = sorted(set(options) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown sampling option(s) {unknown}")
        return replace(settings or cls(), **options)

    @property
    def guidance(self) -> Optional[SemanticGuidance]:
        """The semantic guidance when it is on (some scale > 0), else None."""
        g = self.semantic_guidance
        return g if g is not None and g.enabled else None

    @property
    def label_cfg_scale(self) -> float:
        return float(self.text_scale if self.label_scale is None else self.label_scale)


@dataclass
class FaceBatch:
    """Each face's conditions, aligned: captions and negative captions, seeds, and optionally the requested AUs
    (+ known mask), SG target labels, layout source images and class ids of a label-conditioned UNet."""
    captions: list[str]
    negatives: list[str]
    seeds: list[int]
    aus: Optional[torch.Tensor] = None
    au_mask: Optional[torch.Tensor] = None
    labels: Optional[torch.Tensor] = None
    init_images: Optional[torch.Tensor] = None
    classes: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, part: slice) -> "FaceBatch":
        return FaceBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[part]
                            for f in fields(self)})

    def batches(self, size: int) -> list["FaceBatch"]:
        return [self[start:start + size] for start in range(0, len(self), size)]


def negative_prompts(negative_prompt, n: int) -> list[str]:
    if negative_prompt is None:
        return [""] * n
    if isinstance(negative_prompt, str):
        return [negative_prompt] * n
    negatives = list(negative_prompt)
    if len(negatives) != n:
        raise ValueError(f"got {len(negatives)} negative prompts for {n} captions")
    return negatives

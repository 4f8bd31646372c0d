"""Zero-shot expression recognition with open_clip: the model, its image transforms, contrastive fine-tuning on
image-caption pairs and the zero-shot classifier built from prompt templates.

The architecture is either a named open_clip one (its built-in config, e.g. ``ViT-B-32``) or, the CPU default, a
config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``: the fields of open_clip's ``CLIPVisionCfg`` /
``CLIPTextCfg``) built as ``open_clip.CLIP``; its weights are random or come from a local checkpoint file. Nothing
is downloaded: a pretrained *tag* (``openai``, ``laion2b_...``) is refused, and so are configs whose towers need a
Hugging Face text model or tokenizer, and SigLIP models (a sigmoid loss, not the InfoNCE trained here).

Tokenizer: open_clip's own (``get_tokenizer`` of a named architecture, else ``SimpleTokenizer``) at the model's
context length, not the suite's transformers ``CLIPTokenizer`` built from the same vocabulary: it is what open_clip's
checkpoints were trained with (incl. per-architecture tokenizer options), it pads with 0 and ends with the
end-of-text id that the text tower's argmax pooling reads, and its output is the (N, context) tensor ``encode_text``
takes, truncated to the model's context length.

Zero-shot: the standard open_clip recipe (``open_clip.build_zero_shot_classifier``): for every class, each template
filled with the class word, embedded, L2-normalised, averaged over templates and normalised again; a face's class is
the argmax of cosine similarity to these class embeddings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from datamodules.transforms import check_color_mode


# ------------------------------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ClipSpec:
    """What builds the model: a named open_clip architecture (+ local weights) or a config dict (random init)."""
    name: Optional[str] = None
    pretrained: Optional[str] = None
    config: Optional[dict] = None


def unsupported_parts(name: Optional[str], model_cfg: dict) -> list[str]:
    """Why open_clip could not build ``model_cfg`` offline for contrastive (softmax) training: a Hugging Face text
    model or tokenizer (downloaded), or a SigLIP model (sigmoid loss, logit bias, its own downloaded tokenizer)."""
    text, vision = model_cfg.get("text_cfg", {}) or {}, model_cfg.get("vision_cfg", {}) or {}
    parts = [f"text_cfg.{k} (a Hugging Face download)" for k in ("hf_model_name", "hf_tokenizer_name") if text.get(k)]
    parts += [f"vision_cfg.{k} (a download)" for k in ("timm_model_pretrained",) if vision.get(k)]
    if model_cfg.get("init_logit_bias") is not None or (name and "siglip" in name.lower()):
        parts.append("a SigLIP model (trained with a sigmoid loss, not CLIP's softmax InfoNCE)")
    return parts


def model_config(spec: ClipSpec) -> dict:
    """The architecture config dict of ``spec`` (a copy)."""
    import copy

    import open_clip

    if spec.name is None:
        return copy.deepcopy(dict(spec.config or {}))
    found = open_clip.get_model_config(spec.name)
    if found is None:
        raise ValueError(f"unknown open_clip model {spec.name!r}")
    return found


def create_clip(spec: ClipSpec) -> torch.nn.Module:
    """The architecture of ``spec`` on the CPU, fp32, random weights (``load_local_weights`` loads a file)."""
    import open_clip

    if spec.name is None:
        cfg = model_config(spec)
        return open_clip.CLIP(embed_dim=int(cfg.pop("embed_dim")), vision_cfg=cfg.pop("vision_cfg"),
                              text_cfg=cfg.pop("text_cfg"), **cfg)
    return open_clip.create_model(spec.name, pretrained=None, pretrained_image=False, pretrained_text=False)


def load_local_weights(model: torch.nn.Module, path: str) -> None:
    """A local open_clip checkpoint into ``model`` (strict: every key of the architecture), the way open_clip's
    ``create_model(pretrained=<file>)`` loads it (a ``state_dict`` entry, DDP's ``module.`` prefix, resized position
    embeddings)."""
    from open_clip.factory import load_checkpoint

    load_checkpoint(model, path, strict=True)


def preprocess(model: torch.nn.Module) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
    """(input size, mean, std) the model's images are normalised with: its own preprocess config (set from its
    pretrained tag / config), else CLIP's (OpenAI) statistics at the vision tower's size."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg.get("size") or model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return int(size), tuple(cfg.get("mean") or OPENAI_DATASET_MEAN), tuple(cfg.get("std") or OPENAI_DATASET_STD)


def clip_tokenizer(spec: ClipSpec, model: torch.nn.Module):
    """open_clip's tokenizer of the architecture (a SimpleTokenizer at its context length and tokenizer options)."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    if spec.name is not None:
        return open_clip.get_tokenizer(spec.name)
    kwargs = (model_config(spec).get("text_cfg") or {}).get("tokenizer_kwargs") or {}
    return SimpleTokenizer(context_length=int(model.context_length), **kwargs)


def image_transform(size: int, mean: Sequence[float], std: Sequence[float], color_mode: str = "rgb",
                    train: bool = False, crop_scale: tuple[float, float] = (0.9, 1.0), hflip: bool = True):
    """PIL face -> (3, size, size) float normalised with the model's statistics. Train: open_clip's random resized
    crop (+ horizontal flip); eval: resize + centre crop."""
    steps: list = [v2.Grayscale(num_output_channels=3)] if check_color_mode(color_mode) == "gray" else \
        [v2.RGB()]
    if train:
        steps.append(v2.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True))
        if hflip:
            steps.append(v2.RandomHorizontalFlip())
    else:
        steps += [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


# -------------------------------------------------------------------------------------------------- zero-shot
def prompt_texts(templates: Sequence[str], class_words: Sequence[str]) -> list[str]:
    """Every prompt in the order the classifier embeds them: class by class, each template filled with its word."""
    return [template.format(word) for word in class_words for template in templates]


def zeroshot_weights(model, tokenizer: Callable, templates: Sequence[str], class_words: Sequence[str],
                     device: torch.device) -> torch.Tensor:
    """(embed dim, classes): per class the normalised mean of its normalised prompt embeddings."""
    from open_clip import build_zero_shot_classifier

    if not templates or not class_words:
        raise ValueError("zero-shot needs at least one template and one class")
    return build_zero_shot_classifier(model, tokenizer, list(class_words), list(templates),
                                      num_classes_per_batch=None, device=device)


@torch.no_grad()
def zeroshot_scores(model, weights: torch.Tensor, loader, num_classes: int, device: torch.device) -> dict[str, Any]:
    """Accuracy, mean-class accuracy and macro-F1 of argmax cosine similarity over ``loader``'s faces (unknown
    labels, -1, are ignored; ``classification_metrics``' definitions, computed without syncing: this runs in one
    process while the other ranks of a DDP run train or have left); ``faces``: how many were scored."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    preds, labels = [], []
    was_training = model.training
    model.eval()
    try:
        for batch in loader:
            if len(batch["label"]) == 0:
                continue
            logits = model.encode_image(batch["image"].to(device), normalize=True) @ weights.to(device)
            preds.append(logits.argmax(dim=1).cpu())
            labels.append(batch["label"].cpu())
    finally:
        model.train(was_training)
    faces = sum(int((y >= 0).sum()) for y in labels)
    if faces == 0:
        raise ValueError("no labelled face to score zero-shot")
    p, y, common = torch.cat(preds), torch.cat(labels), dict(num_classes=num_classes, ignore_index=-1)
    return {"acc": float(multiclass_accuracy(p, y, average="micro", **common)),
            "mean_class_acc": float(multiclass_accuracy(p, y, average="macro", **common)),
            "macro_f1": float(multiclass_f1_score(p, y, average="macro", **common)), "faces": faces}


# --------------------------------------------------------------------------------------------- fine-tuning
def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """open_clip's split: no weight decay on gains, biases, norms, embeddings' 1-d parameters and the logit scale."""
    def exclude(name: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": weight_decay}]


class ClipFineTune(L.LightningModule):
    """An open_clip model trained with its symmetric InfoNCE (``open_clip.ClipLoss``) on (face, caption) batches;
    AdamW (open_clip's weight-decay split) with linear warmup and cosine decay over the planned steps. Under DDP the
    features of every rank are gathered (Lightning ``all_gather`` with gradients, like stage=ssl) and each rank
    computes the loss over the global batch, so every face meets every rank's captions as negatives."""

    def __init__(self, name: Optional[str] = None, config: Optional[dict] = None, lr: float = 5e-4,
                 weight_decay: float = 0.1, warmup_fraction: float = 0.1):
        super().__init__()
        self.save_hyperparameters()  # the architecture only: a saved model loads without its starting weights file
        spec = ClipSpec(name=name, config=config)
        self.model = create_clip(spec)
        self.tokenizer = clip_tokenizer(spec, self.model)
        from open_clip import ClipLoss

        self.loss = ClipLoss()  # over already gathered features: world_size 1 here
        self.last_global_batch: Optional[int] = None

    def _gather(self, features: torch.Tensor) -> torch.Tensor:
        """(n, 2, d) local (image, text) features -> every rank's rows, with gradients back to their rank; ranks may
        hold different n (unreadable faces are dropped per rank): padded, then cut."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world == 1:
            return features
        sizes = self.all_gather(torch.tensor([features.shape[0]], device=features.device)).flatten().tolist()
        padded = F.pad(features, (0, 0, 0, 0, 0, max(sizes) - features.shape[0]))
        gathered = self.all_gather(padded, sync_grads=True)
        return torch.cat([gathered[r, :n] for r, n in enumerate(sizes)])

    def training_step(self, batch: dict, batch_idx: int) -> Optional[torch.Tensor]:
        images, captions = batch["image"], batch["caption"]
        n = len(captions)
        if n == 0:
            if self.trainer.world_size > 1:
                from datamodules.errors import DataError

                raise DataError("every face of a train batch failed to load on this rank (see the unreadable-image "
                                "warning); DDP cannot skip a step on one rank only")
            return None
        tokens = self.tokenizer(list(captions)).to(images.device)
        image_features = self.model.encode_image(images, normalize=True)
        text_features = self.model.encode_text(tokens, normalize=True)
        every = self._gather(torch.stack([image_features, text_features], dim=1))
        loss = self.loss(every[:, 0], every[:, 1], self.model.logit_scale.exp())
        self.last_global_batch = int(every.shape[0])
        self.log("train/loss", loss, prog_bar=True, batch_size=n)
        self.log("train/logit_scale", self.model.logit_scale.exp().detach(), batch_size=n)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        with torch.no_grad():  # open_clip's clamp: a temperature below 1/100 destabilises training
            self.model.logit_scale.clamp_(0, math.log(100))

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(weight_decay_groups(self.model, self.hparams.weight_decay), lr=self.hparams.lr,
                                      betas=(0.9, 0.98), eps=1e-6)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=max(1, int(self.trainer.estimated_stepping_batches)),
            pct_start=self.hparams.warmup_fraction, anneal_strategy="cos")
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

"""Does the generator do what it is asked? A FER teacher scores generated faces against their conditions.

- FER-Acc: the teacher's argmax equals the intended expression.
- AU fidelity: per-AU Pearson r between the requested AU intensities and the teacher's AU head; the mean over
  AUs whose requested values vary (an AU that is constant in the condition set has no r and is counted apart).
- Reference: the same numbers on the real faces behind the conditions, passed through the generator's
  resolution, so a gap is the generator's and not the teacher's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics.functional import pearson_corrcoef
from tqdm.auto import tqdm

from datamodules.batch import FERRecord, load_record_image
from datamodules.labels import EXPRESSIONS


@dataclass
class EvalConditions:
    labels: torch.Tensor            # (N,) intended expression
    aus: torch.Tensor               # (N, A) requested intensities
    au_mask: torch.Tensor           # (N, A) bool
    captions: list[str]
    seeds: list[int]
    references: Optional[torch.Tensor] = None  # (N, 3, H, W) in [0,1]: the real faces behind the conditions

    def __len__(self) -> int:
        return len(self.captions)


def toy_eval_conditions(toy_config, per_class: int, num_classes: int, aus: Sequence[int],
                        intensity_range: tuple[float, float], seed: int) -> EvalConditions:
    """Class-balanced prototype conditions (strong expressions, no label noise) from the toy renderer; the rendered
    faces are the references."""
    from dataclasses import replace

    from datamodules.real import toy_records
    from datamodules.toyfaces import sample_labels

    config = replace(toy_config, seed=seed, intensity_range=tuple(intensity_range), label_noise=0.0,
                     imbalance_power=0.0, num_classes=num_classes)
    wanted: dict[int, list[int]] = {c: [] for c in range(num_classes)}
    i = 0
    while any(len(v) < per_class for v in wanted.values()):
        label = sample_labels(config, "test", i)[1]
        if len(wanted[label]) < per_class:
            wanted[label].append(i)
        i += 1
    records = []
    for c in range(num_classes):
        for index in wanted[c]:
            records.extend(toy_records(config, "test", 1, aus, progress=False, start=index))
    return records_to_conditions(records, seed)


def records_eval_conditions(records: Sequence[FERRecord], per_class: int, num_classes: int, seed: int
                            ) -> EvalConditions:
    """Class-balanced conditions from labelled real records (test split), e.g. for a public dataset."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        pool = [r for r in records if r.label == c and r.aus is not None]
        if pool:
            chosen += [pool[i] for i in rng.permutation(len(pool))[:per_class]]
    if not chosen:
        raise ValueError("no labelled records with AUs to build evaluation conditions from")
    return records_to_conditions(chosen, seed)


def records_to_conditions(records: Sequence[FERRecord], seed: int) -> EvalConditions:
    import torchvision.transforms.v2.functional as TF

    refs = [TF.to_dtype(TF.to_image(load_record_image(r)), torch.float32, scale=True) for r in records]
    size = refs[0].shape[-1]
    refs = torch.stack([TF.resize(x, [size, size], antialias=True) for x in refs])
    return EvalConditions(
        labels=torch.tensor([r.label for r in records]),
        aus=torch.tensor(np.stack([r.aus for r in records]), dtype=torch.float32),
        au_mask=torch.tensor(np.stack([r.au_mask if r.au_mask is not None else np.ones(len(r.aus), bool)
                                       for r in records])),
        captions=[r.caption for r in records], seeds=[seed + i for i in range(len(records))], references=refs)


@torch.no_grad()
def teacher_scores(teacher, images: torch.Tensor, image_size: int, batch_size: int = 256
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities (N,K), AU predictions (N,A)) of ``teacher`` on images in [0,1] at any size."""
    probs, aus = [], []
    device = next(teacher.parameters()).device
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        out = teacher(x * 2 - 1)
        probs.append(out["logits"].softmax(-1).cpu())
        if "aus" not in out:
            raise ValueError("the teacher has no AU head (teacher.model.au_head=false): AU fidelity needs one")
        aus.append(out["aus"].float().cpu())
    return torch.cat(probs), torch.cat(aus)


def fidelity_metrics(probs: torch.Tensor, pred_aus: torch.Tensor, conds: EvalConditions, au_names: Sequence[int]
                     ) -> dict[str, float]:
    """FER-Acc (overall + per class) and per-AU Pearson r / MAE against the requested conditions."""
    labels = conds.labels
    correct = probs.argmax(-1) == labels
    out: dict[str, float] = {"fer_acc": correct.float().mean().item()}
    for c in labels.unique().tolist():
        name = EXPRESSIONS[c] if c < len(EXPRESSIONS) else str(c)
        out[f"fer_acc/{name}"] = correct[labels == c].float().mean().item()
    rs = []
    for j, au in enumerate(au_names):
        known = conds.au_mask[:, j]
        target, pred = conds.aus[known, j], pred_aus[known, j]
        if known.sum() < 3 or target.std() < 1e-6:
            out[f"au_pearson/AU{au}"] = None
            continue
        r = pearson_corrcoef(pred, target).item()
        r = 0.0 if math.isnan(r) else r  # constant predictions: no detected control
        out[f"au_pearson/AU{au}"] = r
        out[f"au_mae/AU{au}"] = (pred - target).abs().mean().item()
        rs.append(r)
    out["au_pearson_mean"] = float(np.mean(rs)) if rs else None
    out["au_pearson_count"] = len(rs)
    return out


def evaluate_generator(generator, teacher, conds: EvalConditions, teacher_image_size: int,
                       batch_size: int = 64, progress: bool = True) -> tuple[dict[str, float], torch.Tensor]:
    """Generate one face per condition, score generated and reference faces; returns (metrics, images)."""
    images = []
    chunks = range(0, len(conds), batch_size)
    for start in tqdm(chunks, desc="generator eval", disable=not progress):
        sl = slice(start, start + batch_size)
        images.append(generator.sample(conds.captions[sl], conds.aus[sl], conds.au_mask[sl], conds.seeds[sl]))
    images = torch.cat(images)
    au_names = list(generator.vocab.aus)
    metrics = fidelity_metrics(*teacher_scores(teacher, images, teacher_image_size), conds, au_names)
    metrics["num_samples"] = len(conds)
    if conds.references is not None:
        size = images.shape[-1]
        refs = F.interpolate(conds.references, size=(size, size), mode="bilinear", antialias=True)
        ref = fidelity_metrics(*teacher_scores(teacher, refs, teacher_image_size), conds, au_names)
        metrics.update({f"reference/{k}": v for k, v in ref.items()})
    return metrics, images

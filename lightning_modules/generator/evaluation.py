"""Does the generator do what it is asked? A FER teacher scores generated faces against their conditions.

- FER-Acc: the teacher's argmax equals the intended expression.
- AU fidelity: per-AU Pearson r between the requested AU intensities and the teacher's AU head; the mean over
  AUs whose requested values vary (an AU that is constant in the condition set has no r and is counted apart).
- AU-Acc: requested vs detected AU activation (intensity >= ``au_active_threshold``), over known AUs.
- FID / KID (torchmetrics) between generated and real faces in the teacher's penultimate feature space (no
  Inception download; comparable between runs judged by the same teacher, not with published FIDs).
- Reference: the same numbers on the real faces behind the conditions, passed through the generator's
  resolution, so a gap is the generator's and not the teacher's.

The judge (the scoring teacher) should not be the classifier that guided sampling: semantic guidance pushes faces
towards what that one classifier calls the target, so it overrates guided faces. ``resolve_judge`` picks it
(``separate``: a teacher trained apart, ``guide``: the guiding classifier, or a checkpoint) and ``judge_record``
names it in the metrics, with whether it also guided.

A condition's caption is its record's, or, for a face without one, the generator's caption builder's (as in
training).

Data without AU labels (no OpenFace sidecar): the conditions carry every AU as unknown, the faces are generated
without an AU request, FER-Acc and FID/KID are reported as usual and the AU metrics are replaced by
``au_metrics_skipped: "no AU labels in the data"`` (nothing to compare the teacher's AU head with).
"""
from __future__ import annotations

import filecmp
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torch.nn as nn
from torchmetrics.functional import pearson_corrcoef
from torchmetrics.functional.classification import binary_accuracy
from tqdm.auto import tqdm

from datamodules.batch import LOAD_ERRORS, FERRecord, load_record_image
from datamodules.caption_builder import CaptionBuilder, caption_records
from datamodules.labels import EXPRESSIONS

AU_METRICS_SKIPPED = "no AU labels in the data"
JUDGE = "judge"  # the separate judge's output folder and checkpoint name: <run>/judge/judge.ckpt
JUDGE_MODES = ("separate", "guide")  # or a checkpoint path


@dataclass(frozen=True)
class Judge:
    mode: str           # separate | guide | path
    checkpoint: Path
    guide: Path         # the classifier that guides semantic guidance

    @property
    def is_guide(self) -> bool:
        """The judge is the guiding classifier: the same file, or one with the same bytes."""
        if self.mode == "guide":
            return True
        if not (self.checkpoint.is_file() and self.guide.is_file()):
            return False
        return (self.checkpoint.resolve() == self.guide.resolve()
                or filecmp.cmp(self.checkpoint, self.guide, shallow=False))


def resolve_judge(judge: str, run_dir, guide) -> Judge:
    """``judge``: ``separate`` (``<run_dir>/judge/judge.ckpt``), ``guide`` (the guiding classifier ``guide``) or a
    teacher checkpoint path."""
    judge = str(judge).strip()
    if not judge:
        raise ValueError(f"the judge must be one of {JUDGE_MODES} or a checkpoint path, got an empty value")
    if judge == "separate":
        return Judge("separate", Path(run_dir) / JUDGE / f"{JUDGE}.ckpt", Path(str(guide)))
    if judge == "guide":
        return Judge("guide", Path(str(guide)), Path(str(guide)))
    return Judge("path", Path(judge), Path(str(guide)))


def judge_record(judge: Judge, guided: bool) -> dict:
    """What the metrics say about their judge: its checkpoint, how it was chosen, whether it is the guiding
    classifier and whether it guided the faces it scored (``guided``: semantic guidance was on)."""
    is_guide = judge.is_guide
    return {"judge": str(judge.checkpoint), "judge_mode": judge.mode, "judge_is_guide": is_guide,
            "judge_also_guided": bool(is_guide and guided)}


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

    @property
    def has_aus(self) -> bool:
        """Whether any condition requests a known AU (data with AU labels)."""
        return bool(self.au_mask.numel()) and bool(self.au_mask.any())


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


def records_eval_conditions(records: Sequence[FERRecord], per_class: int, num_classes: int, seed: int,
                            num_aus: Optional[int] = None, captioner: Optional[CaptionBuilder] = None
                            ) -> EvalConditions:
    """Class-balanced conditions from labelled real records (test split), e.g. for a public dataset.

    When some records carry AUs only those are drawn (the AU metrics need them); when none does (no OpenFace
    sidecar) every labelled record may be drawn and the conditions carry ``num_aus`` unknown AUs. A record without
    a caption gets ``captioner``'s (the generator's builder).
    """
    labelled = [r for r in records if 0 <= r.label < num_classes]
    with_aus = any(r.aus is not None for r in labelled)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        pool = [r for r in labelled if r.label == c and (r.aus is not None or not with_aus)]
        if pool:
            chosen += [pool[i] for i in rng.permutation(len(pool))[:per_class]]
    if not chosen:
        raise ValueError(f"no labelled records (classes 0..{num_classes - 1}) to build evaluation conditions from")
    return records_to_conditions(chosen, seed, num_aus, captioner)


def reference_faces(records: Sequence[FERRecord]) -> tuple[torch.Tensor, list[FERRecord]]:
    """(the loadable faces of ``records`` in [0,1] at the first one's size, those records); an unreadable face (or
    a face box outside its image) cannot be a reference: skipped, counted in one warning."""
    import torchvision.transforms.v2.functional as TF

    refs, kept = [], []
    for r in records:
        try:
            refs.append(TF.to_dtype(TF.to_image(load_record_image(r)), torch.float32, scale=True))
            kept.append(r)
        except LOAD_ERRORS:
            continue
    if len(kept) < len(records):
        warnings.warn(f"evaluation: skipped {len(records) - len(kept)} of {len(records)} reference face(s) that "
                      "could not be loaded", stacklevel=3)
    if not kept:
        raise ValueError("no loadable reference faces")
    size = refs[0].shape[-1]
    return torch.stack([TF.resize(x, [size, size], antialias=True) for x in refs]), kept


def records_to_conditions(records: Sequence[FERRecord], seed: int, num_aus: Optional[int] = None,
                          captioner: Optional[CaptionBuilder] = None) -> EvalConditions:
    """Conditions + reference faces of ``records``; a record without AUs gets ``num_aus`` unknown AUs (default:
    the width of the records that have AUs, 0 when none has), one without a caption ``captioner``'s."""
    refs, records = reference_faces(records)
    widths = {len(r.aus) for r in records if r.aus is not None}
    if len(widths) > 1 or (widths and num_aus is not None and widths != {num_aus}):
        raise ValueError(f"evaluation conditions: records carry {sorted(widths)} AUs, expected "
                         f"{num_aus if num_aus is not None else 'one width'}")
    width = widths.pop() if widths else int(num_aus or 0)
    aus = np.zeros((len(records), width), np.float32)
    mask = np.zeros((len(records), width), bool)
    for i, r in enumerate(records):
        if r.aus is not None:
            aus[i] = r.aus
            mask[i] = r.au_mask if r.au_mask is not None else True
    return EvalConditions(
        labels=torch.tensor([r.label for r in records]),
        aus=torch.from_numpy(aus), au_mask=torch.from_numpy(mask),
        captions=caption_records(records, captioner, seed), seeds=[seed + i for i in range(len(records))],
        references=refs)


@torch.no_grad()
def teacher_scores(teacher, images: torch.Tensor, image_size: int, batch_size: int = 256, need_aus: bool = True
                   ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(probabilities (N,K), AU predictions (N,A)) of ``teacher`` on images in [0,1] at any size; the AU
    predictions are None when not needed and the teacher has no AU head."""
    probs, aus = [], []
    device = next(teacher.parameters()).device
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].to(device)
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        out = teacher(x * 2 - 1)
        probs.append(out["logits"].softmax(-1).cpu())
        if "aus" not in out:
            if need_aus:
                raise ValueError("the teacher has no AU head (teacher.model.au_head=false): AU fidelity needs one")
            continue
        aus.append(out["aus"].float().cpu())
    return torch.cat(probs), (torch.cat(aus) if aus else None)


def fidelity_metrics(probs: torch.Tensor, pred_aus: Optional[torch.Tensor], conds: EvalConditions,
                     au_names: Sequence[int], au_active_threshold: float = 1.0) -> dict[str, float]:
    """FER-Acc (overall + per class), per-AU Pearson r / MAE and AU-Acc against the requested conditions; the AU
    metrics become ``au_metrics_skipped`` (the reason) when no condition has a known AU."""
    labels = conds.labels
    correct = probs.argmax(-1) == labels
    out: dict[str, float] = {"fer_acc": correct.float().mean().item()}
    for c in labels.unique().tolist():
        name = EXPRESSIONS[c] if c < len(EXPRESSIONS) else str(c)
        out[f"fer_acc/{name}"] = correct[labels == c].float().mean().item()
    if not conds.has_aus:
        out["au_metrics_skipped"] = AU_METRICS_SKIPPED
        return out
    if pred_aus is None:
        raise ValueError("the teacher has no AU head (teacher.model.au_head=false): AU fidelity needs one")
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
    known = conds.au_mask
    if known.any():
        out["au_acc"] = binary_accuracy((pred_aus[known] >= au_active_threshold).int(),
                                        (conds.aus[known] >= au_active_threshold).int()).item()
    return out


class TeacherFeatures(nn.Module):
    """The teacher's pooled penultimate features of images in [0,1]: the feature space of FID/KID."""

    def __init__(self, teacher, image_size: int):
        super().__init__()
        self.teacher = teacher
        self.image_size = int(image_size)
        self.num_features = int(teacher.model.num_features) if hasattr(teacher, "model") else None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                          align_corners=False)
        return self.teacher.forward_features(x * 2 - 1).double()


def distribution_metrics(features: TeacherFeatures, generated: torch.Tensor, real: torch.Tensor,
                         batch_size: int = 256) -> dict[str, float]:
    """FID and KID (mean, std) of generated vs real images (both in [0,1]) in ``features``' space."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(generated), len(real))
    if n < 2:
        raise ValueError(f"FID/KID need at least 2 generated and 2 real images, got {len(generated)}/{len(real)}")
    # every caller passes all the faces: no gather across DDP ranks (rank 0 evaluates alone while the others wait)
    fid = FrechetInceptionDistance(feature=features, normalize=True, reset_real_features=True, sync_on_compute=False)
    kid = KernelInceptionDistance(feature=features, normalize=True, subset_size=min(50, n), sync_on_compute=False)
    for metric in (fid, kid):
        for start in range(0, len(real), batch_size):
            metric.update(real[start:start + batch_size], real=True)
        for start in range(0, len(generated), batch_size):
            metric.update(generated[start:start + batch_size], real=False)
    kid_mean, kid_std = kid.compute()
    return {"fid": fid.compute().item(), "kid_mean": kid_mean.item(), "kid_std": kid_std.item()}


def generate(generator, conds: EvalConditions, batch_size: int = 64, progress: bool = True, desc: str = "generate",
             **sample_kwargs) -> tuple[torch.Tensor, float]:
    """One face per condition with the generator's sampling settings (+ overrides); (images, seconds)."""
    images = []
    start_time = time.perf_counter()
    for start in tqdm(range(0, len(conds), batch_size), desc=desc, disable=not progress):
        sl = slice(start, start + batch_size)
        kwargs = dict(sample_kwargs)
        if kwargs.get("semantic_guidance") is not None:
            kwargs["labels"] = conds.labels[sl]
        # no AU request the data never had: the AU branch gets the null condition it was trained on
        aus, mask = (conds.aus[sl], conds.au_mask[sl]) if conds.has_aus else (None, None)
        images.append(generator.sample(conds.captions[sl], aus, mask, conds.seeds[sl],
                                       class_labels=conds.labels[sl], **kwargs))
    return torch.cat(images), time.perf_counter() - start_time


def score_images(teacher, images: torch.Tensor, conds: EvalConditions, au_names: Sequence[int],
                 teacher_image_size: int, au_active_threshold: float = 1.0) -> dict[str, float]:
    """Fidelity metrics of ``images`` + FID/KID against the reference faces when the conditions have them."""
    metrics = fidelity_metrics(*teacher_scores(teacher, images, teacher_image_size, need_aus=conds.has_aus), conds,
                               au_names, au_active_threshold)
    metrics["num_samples"] = len(conds)
    if conds.references is not None and hasattr(teacher, "forward_features"):
        metrics.update(distribution_metrics(TeacherFeatures(teacher, teacher_image_size), images,
                                            conds.references))
    return metrics


def evaluate_generator(generator, teacher, conds: EvalConditions, teacher_image_size: int,
                       batch_size: int = 64, progress: bool = True, au_active_threshold: float = 1.0,
                       guidance=None, guide: Optional[nn.Module] = None, compare_unguided: bool = True
                       ) -> tuple[dict[str, float], torch.Tensor]:
    """Generate one face per condition, score generated and reference faces; returns (metrics, images).

    With semantic guidance (``guidance`` enabled + ``guide``) the headline numbers are the guided ones; with
    ``compare_unguided`` the same conditions and seeds are also sampled without it (``unguided/*``) and the time
    ratio guided / unguided is reported as ``guidance_time_ratio``.
    """
    au_names = list(generator.vocab.aus)
    guided = guidance is not None and guidance.enabled
    images, seconds = generate(generator, conds, batch_size, progress, "generator eval" + (" (SG)" if guided else ""),
                               **({"semantic_guidance": guidance, "guide": guide} if guided else {}))
    metrics = score_images(teacher, images, conds, au_names, teacher_image_size, au_active_threshold)
    metrics["sample_seconds"] = seconds
    if guided and compare_unguided:
        plain, plain_seconds = generate(generator, conds, batch_size, progress, "generator eval (no SG)")
        unguided = score_images(teacher, plain, conds, au_names, teacher_image_size, au_active_threshold)
        metrics.update({f"unguided/{k}": v for k, v in unguided.items()})
        metrics["unguided/sample_seconds"] = plain_seconds
        metrics["guidance_time_ratio"] = seconds / plain_seconds
    if conds.references is not None:
        size = images.shape[-1]
        refs = F.interpolate(conds.references, size=(size, size), mode="bilinear", antialias=True)
        ref = fidelity_metrics(*teacher_scores(teacher, refs, teacher_image_size, need_aus=conds.has_aus), conds,
                               au_names, au_active_threshold)
        metrics.update({f"reference/{k}": v for k, v in ref.items()})
    return metrics, images

"""Judge-confidence filter of a student's synthetic faces (``mix.min_judge_confidence`` / ``mix.judge``).

A judge (a trained FER classifier checkpoint) scores every usable synthetic face once; a face stays when the judge
gives its training label (the label the student would learn) at least the threshold. The judge sees the faces as
``stage=synth_eval`` shows them to it (same loader, same scoring), in the student's colour mode. Scores are cached
per set + judge in a folder of the student's own (``<student dir>/judge_scores``), never in the synthetic set's
folder, which other runs may share (hard links).
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

log = logging.getLogger(__name__)
SCORE_BATCH = 256  # faces decoded and scored at a time (memory stays bounded for large sets)


def resolve_judge_checkpoint(judge: str, run_dir: str | Path, guide: str | Path) -> Path:
    """``mix.judge`` (separate | guide | a checkpoint path) as a checkpoint of this run; a missing file is a
    ValueError naming the key and the path (the stage turns it into a config error)."""
    from lightning_modules.generator.evaluation import resolve_judge

    try:
        chosen = resolve_judge(str(judge), run_dir, guide)
    except ValueError as err:
        raise ValueError(f"mix.judge: {err}") from err
    if not chosen.checkpoint.is_file():
        hint = {"separate": "train it: stage=teacher teacher.name=judge teacher.seed=1",
                "guide": "the guiding classifier synthesis.guidance.classifier"}
        hint = hint.get(chosen.mode, "a teacher checkpoint")
        raise ValueError(f"mix.judge={judge}: no judge checkpoint at {chosen.checkpoint} ({hint})")
    return chosen.checkpoint


def training_labels(rows, use_relabel: bool, vote_labels: str) -> np.ndarray:
    """The label a student learns from each row: the vote's final_label (with ``vote_labels=soft``, a soft row's
    label is its soft_label's argmax) on a relabelled set with ``use_relabel``, else the conditioned target_label."""
    cols = rows.column_names
    if not (use_relabel and "final_label" in cols):
        return np.asarray(rows["target_label"], dtype=np.int64)
    labels = np.asarray(rows["final_label"], dtype=np.int64)
    if vote_labels == "soft" and "is_soft" in cols and len(rows):
        soft = np.asarray(rows["is_soft"], dtype=bool)
        if soft.any():
            labels = labels.copy()
            labels[soft] = np.asarray(rows.select(np.flatnonzero(soft))["soft_label"]).argmax(axis=1)
    return labels


def cache_key(sets: Sequence[str | Path], checkpoint: Path, image_size: int, color_mode: str) -> str:
    """Names what the scores depend on: the sets' manifests, the judge's checkpoint and how faces are shown."""
    from lightning_modules.run.runtime import path_fingerprint

    parts = [path_fingerprint(Path(s) / "manifest.json") for s in sets]
    parts += [path_fingerprint(checkpoint), str(Path(checkpoint).resolve()), str(image_size), color_mode]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def score(rows, checkpoint: Path, image_size: int, color_mode: str = "rgb", num_classes: Optional[int] = None
          ) -> torch.Tensor:
    """The judge's class probabilities (N, K) for every row of a synthetic ``datasets.Dataset``; a judge of another
    class count than ``num_classes`` is a ValueError naming mix.judge."""
    from lightning_modules.generator.evaluation import teacher_scores
    from lightning_modules.paradigms.teacher import load_fer_classifier
    from lightning_modules.stages.synth_eval_stage import synthetic_conditions
    from datamodules.transforms import gray_tensor

    judge = load_fer_classifier(checkpoint, map_location="cuda" if torch.cuda.is_available() else "cpu")
    if num_classes is not None and int(judge.hparams.num_classes) != num_classes:
        raise ValueError(f"mix.judge: {checkpoint} predicts {judge.hparams.num_classes} classes, the student's data "
                         f"has {num_classes}")
    probs = []
    with torch.no_grad():
        for start in range(0, len(rows), SCORE_BATCH):
            images, _ = synthetic_conditions(rows.select(range(start, min(len(rows), start + SCORE_BATCH)))[:], 0)
            if color_mode == "gray":
                images = gray_tensor(images)
            probs.append(teacher_scores(judge, images, image_size, SCORE_BATCH, need_aus=False)[0])
    return torch.cat(probs) if probs else torch.zeros(0, int(judge.hparams.num_classes))


def cached_scores(rows, checkpoint: Path, sets: Sequence[str | Path], image_size: int, color_mode: str,
                  cache_dir: Optional[str | Path], num_classes: Optional[int] = None) -> np.ndarray:
    """``score`` of ``rows``, read from / written to ``cache_dir`` (None: no cache). A cache entry is reused only
    for the same sample ids in the same order."""
    ids = list(rows["sample_id"])
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{cache_key(sets, checkpoint, image_size, color_mode)}.pt"
        if path.is_file():
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("sample_id") == ids and (num_classes is None or cached["probs"].shape[1] == num_classes):
                log.info("mix: judge scores of %d synthetic faces read from %s", len(ids), path)
                return cached["probs"].numpy()
    probs = score(rows, checkpoint, image_size, color_mode, num_classes)
    if path is not None:  # every DDP rank may write the same scores: a whole file replaces a whole file
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"sample_id": ids, "probs": probs, "checkpoint": str(checkpoint)}, tmp)
        os.replace(tmp, path)
    return probs.numpy()


def confident(probs: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean mask: the judge's probability for each row's label is >= ``threshold``."""
    if probs.shape[0] != labels.shape[0]:
        raise ValueError(f"{probs.shape[0]} judge scores for {labels.shape[0]} labels")
    return probs[np.arange(len(labels)), labels] >= threshold

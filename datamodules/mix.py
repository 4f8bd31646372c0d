"""MixedFERDataModule: a FER student's train set = real train set + synthetic set(s); val/test = real data only.

Modes: ``real_only``; ``synthetic_only``; ``concat`` (one shuffled union); ``ratio`` (every batch holds exactly
``round(ratio × batch_size)`` synthetic faces, drawn by a batch sampler, nothing copied); ``pretrain`` (the first
``pretrain_fraction`` of the student's optimizer steps see only synthetic faces, the rest only real ones: one fit,
one optimizer). The synthetic part is the first ``round(scale × len(real train))`` (kept, and with
``min_judge_confidence`` judge-confirmed) rows: plans are class-interleaved, so a prefix is balanced and the 1x set
is a prefix of the 5x set. ``vote_labels`` picks soft or hard vote labels, ``synthetic_loss_weight`` weighs
synthetic faces in the loss (each train item then carries a ``weight``).

The datamodule shards its own train data across ranks (datamodules/samplers.py: pure index
logic, reshuffled per epoch from ``seed + epoch``), so the Trainer must run with ``use_distributed_sampler=False``.
Like torch's ``DistributedSampler``, an epoch is padded by wrapping around so every rank gets the same number of
batches (a few samples are then seen twice in that epoch).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

from datamodules.errors import DataError
from datamodules.batch import FERDataLoader, collate_fer
from datamodules.real import RealFERDataModule
from datamodules.samplers import MixedBatchSampler, PretrainBatchSampler, ShardedSampler
from datamodules.synthetic import SyntheticFERDataset
from datamodules.transforms import AugmentConfig, train_transform

log = logging.getLogger(__name__)
MODES = ("real_only", "synthetic_only", "concat", "ratio", "pretrain")
MIX_KEYS = ("mode", "synthetic", "scale", "ratio", "class_balance", "use_relabel", "kept_only",
            "synthetic_augment", "seed", "vote_labels", "synthetic_loss_weight", "pretrain_fraction",
            "min_judge_confidence", "judge")


def log_color_conversion(directories: Sequence[str], color_mode: str) -> None:
    """One line per synthetic set stored in another colour mode than the real data's (its faces are converted)."""
    from datamodules.synthetic import read_manifest

    for directory in directories:
        stored = read_manifest(directory).get("meta", {}).get("color_mode", "rgb")
        if stored != color_mode:
            log.info("mix: synthetic faces of %s are stored %s; the student gets them %s like the real faces",
                     directory, stored, color_mode)


def augment_config(values: dict) -> AugmentConfig:
    try:
        return AugmentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except (TypeError, ValueError) as err:
        raise ValueError(f"mix.synthetic_augment: {err}") from err


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_mix(**mix: Any) -> None:
    """Every ``mix`` key, whatever the mode (a value the mode ignores is still a typo to report); ValueError
    messages start with the key (``mix.ratio must ...``)."""
    unknown = sorted(set(mix) - set(MIX_KEYS))
    if unknown:
        raise ValueError(f"mix.{unknown[0]} is not a mix setting (known: {', '.join(MIX_KEYS)})")
    mode, scale, ratio = mix.get("mode", "real_only"), mix.get("scale", 1.0), mix.get("ratio", 0.5)
    if mode not in MODES:
        raise ValueError(f"mix.mode must be one of {', '.join(MODES)}, got {mode!r}")
    if scale is not None and (not _number(scale) or scale < 0):
        raise ValueError(f"mix.scale must be a number >= 0 (synthetic size = scale × real train size) or null, "
                         f"got {scale!r}")
    if not _number(ratio) or not 0 < ratio < 1:
        raise ValueError(f"mix.ratio must be in (0, 1), got {ratio!r} (ratio 1 is mix.mode=synthetic_only, ratio 0 "
                         "is mix.mode=real_only; the value is checked in every mode)")
    for key in ("class_balance", "use_relabel", "kept_only"):
        if not isinstance(mix.get(key, False), bool):
            raise ValueError(f"mix.{key} must be true or false, got {mix[key]!r}")
    if not isinstance(mix.get("seed", 0), int) or isinstance(mix.get("seed", 0), bool):
        raise ValueError(f"mix.seed must be an integer, got {mix['seed']!r}")
    synthetic = mix.get("synthetic")
    if synthetic is not None and not (isinstance(synthetic, (str, os.PathLike)) or (
            isinstance(synthetic, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in synthetic))):
        raise ValueError(f"mix.synthetic must be a folder, a list of folders or null, got {synthetic!r}")
    augment = mix.get("synthetic_augment")
    if augment is not None:
        if not isinstance(augment, dict):
            raise ValueError(f"mix.synthetic_augment must be a mapping of augmentation settings or null, "
                             f"got {augment!r}")
        augment_config(augment)
    if mode in ("synthetic_only", "ratio", "pretrain") and scale == 0:
        raise ValueError(f"mix.scale must be > 0 for mix.mode={mode} (it sets the synthetic set size)")
    if mode != "real_only" and not synthetic:
        raise ValueError(f"mix.synthetic must name synthetic set folder(s) for mix.mode={mode}")
    check_recipe(mode, **{k: mix[k] for k in RECIPE_DEFAULTS if k in mix})


# The recipe switches and their defaults (today's behaviour: soft vote labels, unweighted, no filter).
RECIPE_DEFAULTS = {"vote_labels": "soft", "synthetic_loss_weight": 1.0, "pretrain_fraction": 0.5,
                   "min_judge_confidence": None, "judge": "separate"}


def check_recipe(mode: str, **recipe: Any) -> None:
    """The recipe keys (checked in every mode, like the others)."""
    from datamodules.synthetic import VOTE_LABELS

    recipe = {**RECIPE_DEFAULTS, **recipe}
    if recipe["vote_labels"] not in VOTE_LABELS:
        raise ValueError(f"mix.vote_labels must be one of {', '.join(VOTE_LABELS)}, got {recipe['vote_labels']!r}")
    weight = recipe["synthetic_loss_weight"]
    if not _number(weight) or weight < 0:
        raise ValueError(f"mix.synthetic_loss_weight must be a number >= 0 (real faces weigh 1), got {weight!r}")
    if weight == 0 and mode in ("synthetic_only", "pretrain"):
        # concat/ratio may use 0 (a control: the same batches, synthetic faces not learned from); here the
        # synthetic faces are all there is (in the synthetic phase), so nothing would be learned at all
        raise ValueError(f"mix.synthetic_loss_weight=0 leaves every sample of mix.mode={mode} "
                         f"{'(in its synthetic phase) ' if mode == 'pretrain' else ''}weightless; use a weight > 0")
    fraction = recipe["pretrain_fraction"]
    if not _number(fraction) or not 0 < fraction < 1:
        raise ValueError(f"mix.pretrain_fraction must be in (0, 1) (the share of optimizer steps on synthetic faces "
                         f"before real ones), got {fraction!r}")
    threshold = recipe["min_judge_confidence"]
    if threshold is not None and (not _number(threshold) or not 0 < threshold < 1):
        raise ValueError(f"mix.min_judge_confidence must be in (0, 1) or null (no filter), got {threshold!r}")
    judge = recipe["judge"]
    if not isinstance(judge, (str, os.PathLike)) or not str(judge).strip():
        raise ValueError(f"mix.judge must be separate, guide or a checkpoint path, got {judge!r}")


class MixedFERDataModule(L.LightningDataModule):
    """The ``mix`` keys, plus what the stage resolves: ``judge_checkpoint`` (``judge`` as a file; None = ``judge``
    is itself a path) and ``score_cache`` (the student's folder for cached judge scores; None = no cache).
    ``mode=pretrain`` needs ``configure_steps`` (the student's step budget) before its train loader."""

    def __init__(self, real: RealFERDataModule, synthetic: str | Sequence[str] | None = None,
                 mode: str = "real_only", scale: Optional[float] = 1.0, ratio: float = 0.5, class_balance: bool = False,
                 use_relabel: bool = True, kept_only: bool = True, synthetic_augment: Optional[dict] = None,
                 seed: int = 0, vote_labels: str = "soft", synthetic_loss_weight: float = 1.0,
                 pretrain_fraction: float = 0.5, min_judge_confidence: Optional[float] = None,
                 judge: str = "separate", judge_checkpoint: Optional[str] = None, score_cache: Optional[str] = None):
        super().__init__()
        check_mix(mode=mode, synthetic=synthetic, scale=scale, ratio=ratio, class_balance=class_balance,
                  use_relabel=use_relabel, kept_only=kept_only, synthetic_augment=synthetic_augment, seed=seed,
                  vote_labels=vote_labels, synthetic_loss_weight=synthetic_loss_weight,
                  pretrain_fraction=pretrain_fraction, min_judge_confidence=min_judge_confidence, judge=judge)
        self.vote_labels, self.synthetic_loss_weight = vote_labels, float(synthetic_loss_weight)
        self.pretrain_fraction, self.min_judge_confidence = float(pretrain_fraction), min_judge_confidence
        self.judge, self.judge_checkpoint, self.score_cache = str(judge), judge_checkpoint, score_cache
        self.judge_kept: Optional[dict[str, Any]] = None  # filter counts for the summary
        self.budget: Optional[dict[str, Any]] = None  # pretrain: the student's step budget (configure_steps)
        self.steps: Optional[dict[str, int]] = None  # pretrain: total / switch optimizer steps
        self.synthetic_augment = (real.augment if synthetic_augment is None
                                  else augment_config(synthetic_augment))
        # scale None = every (kept) face of the set, e.g. the pipeline's mixed student after a vote dropped some
        self.real, self.mode, self.ratio = real, mode, float(ratio)
        self.scale = None if scale is None else float(scale)
        self.synthetic = [synthetic] if isinstance(synthetic, str) else list(synthetic or [])
        self.class_balance, self.use_relabel, self.kept_only, self.seed = class_balance, use_relabel, kept_only, seed
        for name in ("num_classes", "class_names", "vocab", "image_size", "batch_size", "eval_batch_size",
                     "num_workers"):
            setattr(self, name, getattr(real, name))
        self.train_dataset: Optional[ConcatDataset] = None
        self.num_real = self.num_synthetic = self.num_soft = 0
        self.train_labels = np.zeros(0, dtype=np.int64)  # per train index: hard label or soft-label argmax
        self.synthetic_labels = np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ building
    def _load_synthetic(self, n: Optional[int]):
        """The first ``n`` (kept; None = all) rows -> (rows, their labels, how many carry a soft label)."""
        from datamodules.synthetic import load_synthetic

        try:
            data = load_synthetic(self.synthetic)
        except (FileNotFoundError, ValueError) as err:  # a damaged shard stays a DataError (it names the file)
            kind = DataError if isinstance(err, DataError) else ValueError
            raise kind(f"mix.synthetic: cannot read {self.synthetic}: {err}") from err
        cols = data.column_names
        usable = (np.flatnonzero(np.asarray(data["kept"], dtype=bool)) if self.kept_only and "kept" in cols
                  else np.arange(len(data)))
        if n is None and len(usable) == 0:
            raise ValueError(f"mix.synthetic: {self.synthetic} has no kept faces (the vote dropped all of them: lower "
                             "the threshold of the stage that wrote it, relabel.threshold or pseudolabel.threshold, "
                             "or set mix.kept_only=false)")
        if self.min_judge_confidence is not None:
            usable = self._judge_filter(data, usable, n)
        n = len(usable) if n is None else n
        if len(usable) < n:
            raise ValueError(f"mix.scale={self.scale} needs {n} synthetic rows (scale × {self.num_real} real train "
                             f"faces) but mix.synthetic {self.synthetic} has only {len(usable)}"
                             f"{' kept' if self.kept_only and 'kept' in cols else ''} rows")
        rows = data.select(usable[:n])
        relabelled = self.use_relabel and "final_label" in cols
        labels = np.asarray(rows["final_label" if relabelled else "target_label"], dtype=np.int64)
        soft_used = relabelled and "is_soft" in cols and self.vote_labels == "soft"
        num_soft = int(np.sum(rows["is_soft"])) if soft_used else 0
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if len(bad) or (relabelled and n and len(rows[0]["soft_label"]) != self.num_classes):
            where = f"row {rows[int(bad[0])]['sample_id']} (and {len(bad) - 1} more) has a label" if len(bad) \
                else "the soft labels are"
            raise ValueError(f"mix.synthetic: {where} outside the {self.num_classes}-class protocol of the real data")
        if n and len(rows[0]["target_aus"]) != len(self.vocab):
            raise ValueError(f"mix.synthetic: AU vectors do not match the real data's {len(self.vocab)} AUs")
        return rows, labels, num_soft

    def _judge_filter(self, data, usable: np.ndarray, n: Optional[int]) -> np.ndarray:
        """The usable rows whose training label the judge gives >= ``min_judge_confidence`` (order kept)."""
        from lightning_modules.paradigms import judge_filter

        checkpoint = Path(self.judge_checkpoint or self.judge)
        if self.judge_checkpoint is None and self.judge in ("separate", "guide"):
            raise ValueError(f"mix.judge={self.judge} names a run's judge; pass its checkpoint (judge_checkpoint)")
        if not checkpoint.is_file():
            raise ValueError(f"mix.judge={self.judge}: no judge checkpoint at {checkpoint}")
        rows = data.select(usable)
        labels = judge_filter.training_labels(rows, self.use_relabel, self.vote_labels)
        probs = judge_filter.cached_scores(rows, checkpoint, self.synthetic, self.image_size, self.real.color_mode,
                                           self.score_cache, self.num_classes)
        keep = judge_filter.confident(probs, labels, float(self.min_judge_confidence))
        per_class = np.bincount(labels[keep], minlength=self.num_classes).tolist()
        self.judge_kept = {"judge_checkpoint": str(checkpoint), "judge_scored": int(len(usable)),
                           "judge_kept": int(keep.sum()), "judge_kept_per_class": per_class}
        log.info("mix: judge %s kept %d of %d synthetic faces (mix.min_judge_confidence=%g); per class: %s",
                 checkpoint, keep.sum(), len(usable), self.min_judge_confidence,
                 dict(zip(self.class_names, per_class)))
        if (n is not None and keep.sum() < n) or not keep.any():
            need = f"mix.scale={self.scale} needs {n}" if n is not None else "the student needs at least one"
            raise ValueError(f"mix.min_judge_confidence={self.min_judge_confidence} keeps {int(keep.sum())} of "
                             f"{len(usable)} usable synthetic faces of {self.synthetic} (judge {checkpoint}); {need}: "
                             "lower the threshold or mix.scale")
        return usable[keep]

    def setup(self, stage: Optional[str] = None) -> None:
        self.real.setup(stage)
        if self.train_dataset is not None or stage not in (None, "fit"):
            return  # val/test/predict only need the real data
        real = self.real
        records = real.records["train"]
        self.num_real = len(records)
        n_syn = None if self.scale is None else int(round(self.scale * self.num_real))
        n_syn = 0 if self.mode == "real_only" else n_syn
        syn = self._load_synthetic(n_syn) if self.mode != "real_only" else None
        if syn is not None:
            n_syn = len(syn[1])
        self.num_soft = syn[2] if syn is not None else 0
        with_soft = real.soft_labels or self.num_soft > 0  # one key set for every item, or batches would not collate
        real_ds = real.datasets["train"]
        if with_soft and not real.soft_labels:
            # same records and shared load-failure flags, so unreadable faces still reach the data summary
            real_ds = real_ds.variant(transform=train_transform(self.image_size, real.augment, real.color_mode,
                                                                 real.train_resample_size),
                                      with_soft_labels=True)
        # Weights only where they change something: all-ones would change nothing but the float rounding.
        weighted = n_syn is not None and n_syn > 0 and self.synthetic_loss_weight != 1.0
        if weighted:
            real_ds = real_ds.variant(weight=1.0)
        real_labels = np.array([r.label if r.label >= 0 or r.soft_label is None else int(np.argmax(r.soft_label))
                                for r in records])
        parts, labels = [], []
        if self.mode != "synthetic_only":
            parts.append(real_ds)
            labels.append(real_labels)
        else:
            self.num_real = 0
        self.num_synthetic = n_syn
        if n_syn:
            rows, syn_labels, _ = syn
            log_color_conversion(self.synthetic, real.color_mode)
            parts.append(SyntheticFERDataset(rows, self.image_size, self.num_classes, self.use_relabel,
                                             kept_only=False, soft_labels=with_soft, color_mode=real.color_mode,
                                             transform=train_transform(self.image_size, self.synthetic_augment,
                                                                       real.color_mode),
                                             vote_labels=self.vote_labels,
                                             weight=self.synthetic_loss_weight if weighted else None))
            labels.append(syn_labels)
            self.synthetic_labels = syn_labels
        self.train_dataset = ConcatDataset(parts)  # real indices first, then synthetic
        self.train_labels = np.concatenate(labels)

    def configure_steps(self, max_steps: Optional[int], max_epochs: int, accumulate: int = 1,
                        limit_train_batches: Optional[int | float] = None) -> None:
        """The student's optimizer-step budget (mode=pretrain switches at ``pretrain_fraction`` of it):
        ``max_steps``, or with none ``max_epochs`` epochs of this train set (as ``trainer.limit_train_batches``
        shortens them). Checked now; the split is recomputed for the Trainer's world size when the loader is made."""
        if self.mode != "pretrain":
            return
        if self.train_dataset is None:
            raise RuntimeError("MixedFERDataModule.setup('fit') has not run")
        self.budget = dict(max_steps=max_steps, max_epochs=int(max_epochs), accumulate=max(1, int(accumulate)),
                           limit=limit_train_batches)
        self._step_plan(self._rank()[1])

    def _step_plan(self, world: int) -> tuple[int, int, int]:
        """(total optimizer steps, switch step, batches per epoch Lightning draws) for ``world`` ranks."""
        if self.budget is None:
            raise ValueError("mix.mode=pretrain needs the student's step budget (configure_steps: student.max_steps, "
                             "or student.max_epochs)")
        b = self.budget
        batches = len(PretrainBatchSampler(self.num_real, self.num_synthetic, self.batch_size, 0, world_size=world))
        limit = b["limit"]
        if isinstance(limit, int) and not isinstance(limit, bool):
            batches = min(batches, limit)
        elif isinstance(limit, float):
            batches = int(batches * limit)
        total = b["max_steps"] if b["max_steps"] is not None else b["max_epochs"] * math.ceil(batches / b["accumulate"])
        switch = int(round(self.pretrain_fraction * total))
        if not 0 < switch < total:
            raise ValueError(f"mix.pretrain_fraction={self.pretrain_fraction} of the student's {total} optimizer "
                             f"steps leaves no {'synthetic' if switch <= 0 else 'real'} step (student.max_steps / "
                             "student.max_epochs set the budget)")
        self.steps = {"total": int(total), "switch": switch}
        return int(total), switch, batches

    def is_synthetic(self, index: int) -> bool:
        """Whether a train index is a synthetic face (they follow the real ones)."""
        return index >= self.num_real

    def summary(self) -> dict[str, Any]:
        out = self.real.summary()
        num_real = len(self.real.records.get("train", [])) or 1
        scale = self.scale if self.scale is not None else round(self.num_synthetic / num_real, 4)
        out["mix"] = {"mode": self.mode, "scale": scale, "ratio": self.ratio if self.mode == "ratio" else None,
                      "class_balance": self.class_balance, "synthetic": self.synthetic,
                      "synthetic_size": self.num_synthetic, "soft_labels": self.num_soft,
                      "synthetic_class_counts": np.bincount(self.synthetic_labels,
                                                            minlength=self.num_classes).tolist(),
                      "vote_labels": self.vote_labels, "synthetic_loss_weight": self.synthetic_loss_weight,
                      "pretrain_fraction": self.pretrain_fraction if self.mode == "pretrain" else None,
                      "pretrain_switch_step": (self.steps or {}).get("switch"),
                      "pretrain_total_steps": (self.steps or {}).get("total"),
                      "min_judge_confidence": self.min_judge_confidence,
                      "judge": self.judge if self.min_judge_confidence is not None else None,
                      **(self.judge_kept or {"judge_kept": None})}
        return out

    # ------------------------------------------------------------------ loaders
    def _rank(self) -> tuple[int, int]:
        if self.trainer is not None:
            return int(self.trainer.global_rank), int(self.trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    @staticmethod
    def _balance_weights(labels: np.ndarray) -> torch.Tensor:
        """1 / (count of the sample's class): every class present gets the same probability mass."""
        _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
        return torch.as_tensor(1.0 / counts[inverse], dtype=torch.double)

    def train_sampler(self):
        """The train loader's sampler (``ShardedSampler``) or batch sampler (``MixedBatchSampler``, mode=ratio;
        ``PretrainBatchSampler``, mode=pretrain)."""
        if self.train_dataset is None:
            raise RuntimeError("MixedFERDataModule.setup('fit') has not run")
        rank, world = self._rank()
        if self.mode in ("ratio", "pretrain"):
            # Each source is balanced on its own: the fixed composition would undo union-wide weights.
            weights = ((self._balance_weights(self.train_labels[:self.num_real]),
                        self._balance_weights(self.train_labels[self.num_real:])) if self.class_balance
                       else (None, None))
            if self.mode == "pretrain":
                _, switch, batches = self._step_plan(world)
                return PretrainBatchSampler(self.num_real, self.num_synthetic, self.batch_size, switch, self.seed,
                                            rank, world, self.budget["accumulate"], batches, *weights)
            return MixedBatchSampler(self.num_real, self.num_synthetic, self.batch_size, self.ratio, self.seed, rank,
                                     world, *weights)
        weights = self._balance_weights(self.train_labels) if self.class_balance else None
        return ShardedSampler(len(self.train_dataset), self.seed, rank, world, weights)

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler()
        common = dict(num_workers=self.num_workers, collate_fn=collate_fer, persistent_workers=self.num_workers > 0)
        if isinstance(sampler, (MixedBatchSampler, PretrainBatchSampler)):
            return FERDataLoader(self.train_dataset, batch_sampler=sampler, **common)
        return FERDataLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler, **common)

    def _eval_loader(self, split: str) -> DataLoader:
        dataset = self.real.datasets[split]
        rank, world = self._rank()
        sampler = DistributedSampler(dataset, world, rank, shuffle=False) if world > 1 else None
        return FERDataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, shuffle=False,
                          num_workers=self.num_workers, collate_fn=collate_fer,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

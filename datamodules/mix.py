"""MixedFERDataModule: a FER student's train set = real train set + synthetic set(s); val/test = real data only.

Modes: ``real_only``; ``synthetic_only``; ``concat`` (one shuffled union); ``ratio`` (every batch holds exactly
``round(ratio × batch_size)`` synthetic faces, drawn by a batch sampler, nothing copied). The synthetic part is the
first ``round(scale × len(real train))`` (kept) rows: plans are class-interleaved, so a prefix is balanced and the
1x set is a prefix of the 5x set.

The datamodule shards its own train data across ranks (``ShardedSampler``, ``MixedBatchSampler``: pure index
logic, reshuffled per epoch from ``seed + epoch``), so the Trainer must run with ``use_distributed_sampler=False``.
Like torch's ``DistributedSampler``, an epoch is padded by wrapping around so every rank gets the same number of
batches (a few samples are then seen twice in that epoch).
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler

from datamodules.errors import DataError
from datamodules.batch import FERDataLoader, collate_fer
from datamodules.real import RealFERDataModule
from datamodules.synthetic import SyntheticFERDataset
from datamodules.transforms import AugmentConfig, train_transform

log = logging.getLogger(__name__)
MODES = ("real_only", "synthetic_only", "concat", "ratio")
MIX_KEYS = ("mode", "synthetic", "scale", "ratio", "class_balance", "use_relabel", "kept_only",
            "synthetic_augment", "seed")


def _stream(n: int, length: int, gen: torch.Generator, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``length`` indices in [0, n): weighted draws with replacement, else fresh permutations back to back."""
    if weights is not None:
        return torch.multinomial(weights, length, replacement=True, generator=gen)
    parts = [torch.randperm(n, generator=gen) for _ in range(math.ceil(length / n))]
    return torch.cat(parts)[:length] if parts else torch.zeros(0, dtype=torch.long)


class ShardedSampler(torch.utils.data.Sampler[int]):
    """Per-epoch shuffle (or class-weighted draw) of ``n`` indices, padded by wrap-around to a multiple of
    ``world_size``; rank r takes positions r, r + world_size, ... (disjoint, together the whole epoch)."""

    def __init__(self, n: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 weights: Optional[torch.Tensor] = None, num_samples: Optional[int] = None):
        if n < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardedSampler needs n >= 1 and 0 <= rank < world_size, got {n}, {rank}, {world_size}")
        self.n, self.seed, self.rank, self.world_size, self.weights = n, seed, rank, world_size, weights
        self.total = num_samples or n
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return math.ceil(self.total / self.world_size)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)  # same on every rank: they split one order
        order = _stream(self.n, self.total, gen, self.weights)
        padded = len(self) * self.world_size
        order = torch.cat([order] * math.ceil(padded / self.total))[:padded]  # wrap around
        return iter(order[self.rank::self.world_size].tolist())


class MixedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of ``batch_size - n_syn`` real indices [0, num_real) and ``n_syn`` synthetic indices
    [num_real, num_real + num_synthetic), each source from its own per-epoch stream (cycling when it runs out).
    An epoch = one pass over the real set: ``ceil(num_real / real_per_batch)`` global batches (padded to a multiple
    of ``world_size`` by continuing the streams); rank r takes global batches r, r + world_size, ..."""

    def __init__(self, num_real: int, num_synthetic: int, batch_size: int, ratio: float, seed: int = 0,
                 rank: int = 0, world_size: int = 1, real_weights: Optional[torch.Tensor] = None,
                 synthetic_weights: Optional[torch.Tensor] = None):
        self.n_syn = int(round(ratio * batch_size))
        self.n_real = batch_size - self.n_syn
        if not (0 < self.n_syn < batch_size):
            raise ValueError(f"mix.ratio={ratio} gives {self.n_syn} synthetic of {batch_size} per batch; a batch needs "
                             "both sources (use mix.mode=real_only or synthetic_only, or a bigger batch size)")
        if num_real < 1 or num_synthetic < 1 or not 0 <= rank < world_size:
            raise ValueError(f"MixedBatchSampler: bad sizes/rank {num_real}, {num_synthetic}, {rank}/{world_size}")
        self.num_real, self.num_synthetic, self.seed = num_real, num_synthetic, seed
        self.rank, self.world_size = rank, world_size
        self.real_weights, self.synthetic_weights = real_weights, synthetic_weights
        self.global_batches = math.ceil(math.ceil(num_real / self.n_real) / world_size) * world_size
        self.epoch = 0
        self.sampler = self  # Lightning calls set_epoch only on loader.sampler / loader.batch_sampler.sampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.global_batches // self.world_size

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        real = _stream(self.num_real, self.global_batches * self.n_real, gen, self.real_weights)
        syn = _stream(self.num_synthetic, self.global_batches * self.n_syn, gen, self.synthetic_weights)
        real, syn = real.view(-1, self.n_real), syn.view(-1, self.n_syn) + self.num_real
        for b in range(self.rank, self.global_batches, self.world_size):
            yield real[b].tolist() + syn[b].tolist()


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
    if mode in ("synthetic_only", "ratio") and scale == 0:
        raise ValueError(f"mix.scale must be > 0 for mix.mode={mode} (it sets the synthetic set size)")
    if mode != "real_only" and not synthetic:
        raise ValueError(f"mix.synthetic must name synthetic set folder(s) for mix.mode={mode}")


class MixedFERDataModule(L.LightningDataModule):
    def __init__(self, real: RealFERDataModule, synthetic: str | Sequence[str] | None = None,
                 mode: str = "real_only", scale: Optional[float] = 1.0, ratio: float = 0.5, class_balance: bool = False,
                 use_relabel: bool = True, kept_only: bool = True, synthetic_augment: Optional[dict] = None,
                 seed: int = 0):
        super().__init__()
        check_mix(mode=mode, synthetic=synthetic, scale=scale, ratio=ratio, class_balance=class_balance,
                  use_relabel=use_relabel, kept_only=kept_only, synthetic_augment=synthetic_augment, seed=seed)
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
        n = len(usable) if n is None else n
        if len(usable) < n:
            raise ValueError(f"mix.scale={self.scale} needs {n} synthetic rows (scale × {self.num_real} real train "
                             f"faces) but mix.synthetic {self.synthetic} has only {len(usable)}"
                             f"{' kept' if self.kept_only and 'kept' in cols else ''} rows")
        rows = data.select(usable[:n])
        relabelled = self.use_relabel and "final_label" in cols
        labels = np.asarray(rows["final_label" if relabelled else "target_label"], dtype=np.int64)
        num_soft = int(np.sum(rows["is_soft"])) if relabelled and "is_soft" in cols else 0
        bad = np.flatnonzero((labels < 0) | (labels >= self.num_classes))
        if len(bad) or (relabelled and n and len(rows[0]["soft_label"]) != self.num_classes):
            where = f"row {rows[int(bad[0])]['sample_id']} (and {len(bad) - 1} more) has a label" if len(bad) \
                else "the soft labels are"
            raise ValueError(f"mix.synthetic: {where} outside the {self.num_classes}-class protocol of the real data")
        if n and len(rows[0]["target_aus"]) != len(self.vocab):
            raise ValueError(f"mix.synthetic: AU vectors do not match the real data's {len(self.vocab)} AUs")
        return rows, labels, num_soft

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
            real_ds = real_ds.variant(transform=train_transform(self.image_size, real.augment, real.color_mode),
                                      with_soft_labels=True)
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
                                                                       real.color_mode)))
            labels.append(syn_labels)
            self.synthetic_labels = syn_labels
        self.train_dataset = ConcatDataset(parts)  # real indices first, then synthetic
        self.train_labels = np.concatenate(labels)

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
                                                            minlength=self.num_classes).tolist()}
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
        """The train loader's sampler (``ShardedSampler``) or batch sampler (``MixedBatchSampler``, mode=ratio)."""
        if self.train_dataset is None:
            raise RuntimeError("MixedFERDataModule.setup('fit') has not run")
        rank, world = self._rank()
        if self.mode == "ratio":
            # Each source is balanced on its own: the fixed composition would undo union-wide weights.
            weights = ((self._balance_weights(self.train_labels[:self.num_real]),
                        self._balance_weights(self.train_labels[self.num_real:])) if self.class_balance
                       else (None, None))
            return MixedBatchSampler(self.num_real, self.num_synthetic, self.batch_size, self.ratio, self.seed, rank,
                                     world, *weights)
        weights = self._balance_weights(self.train_labels) if self.class_balance else None
        return ShardedSampler(len(self.train_dataset), self.seed, rank, world, weights)

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler()
        common = dict(num_workers=self.num_workers, collate_fn=collate_fer, persistent_workers=self.num_workers > 0)
        if isinstance(sampler, MixedBatchSampler):
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

"""Low-data protocols: the train faces outside the labelled ``data.train_limit`` subset, without their labels.

A generator may learn faces from more images than the labelled subset (as Stable Diffusion's pretraining brings
in faces the labelled set lacks): ``GeneratorFERDataModule`` adds such faces to its train split with label -1, no
soft label and the generic caption "a close-up photo of a face" (a caption sidecar's text is replaced: it may
name the expression). AUs stay: they come from a detector, not from the labels. The self-training baseline
pseudo-labels the very same faces (``unlabelled_faces``). Teachers and students are built on
``RealFERDataModule``, whose loaders never serve these faces; only this subclass adds them.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from datamodules.batch import FERRecord, RecordDataset
from datamodules.caption_builder import CaptionBuilder
from datamodules.labels import UNKNOWN_LABEL
from datamodules.real import RealFERDataModule
from datamodules.transforms import train_transform


def pick_unlabelled(pool: Sequence[FERRecord], n: Optional[int], seed: int) -> list[FERRecord]:
    """``n`` faces of ``pool`` (None: all), a seeded draw kept in file order: a larger ``n`` adds faces to a
    smaller one's, so runs with more unlabelled faces extend those with fewer."""
    if n is not None and n < 0:
        raise ValueError(f"the number of unlabelled faces must be >= 0 or null, got {n}")
    if n is None or n >= len(pool):
        return list(pool)
    order = np.random.default_rng([int(seed), 1]).permutation(len(pool))[:n]
    return [pool[i] for i in np.sort(order)]


# The caption builder's caption of a face with no label and no AU cue: "a close-up photo of a face".
UNLABELLED_CAPTION = CaptionBuilder(family="expression").caption(UNKNOWN_LABEL)


def as_unlabelled(record: FERRecord) -> FERRecord:
    """A copy of ``record`` without anything that carries its expression (label, soft label, caption); its AUs
    stay (a detector's output, and the AU branch's input)."""
    # the one caption of such faces, without AU cue words either: they would spell the expression out
    return dataclasses.replace(record, label=UNKNOWN_LABEL, soft_label=None, caption=UNLABELLED_CAPTION,
                               meta={"unlabelled": True})


def check_disjoint(unlabelled: Sequence[FERRecord], records: dict[str, list[FERRecord]]) -> None:
    """An unlabelled face that is also a labelled train, val or test face (same id or same image file) is a bug:
    RuntimeError naming it."""
    ids = {r.sample_id for r in unlabelled}
    files = {r.image for r in unlabelled if isinstance(r.image, str)}
    for split, recs in records.items():
        shared = [r.sample_id for r in recs if r.sample_id in ids or (isinstance(r.image, str) and r.image in files)]
        if shared:
            raise RuntimeError(f"{len(shared)} unlabelled face(s) are also in the labelled {split} split, "
                               f"e.g. {shared[0]}")


def unlabelled_faces(datamodule: RealFERDataModule, n: Optional[int]) -> list[FERRecord]:
    """After ``setup``: ``n`` (None: all) train faces outside the labelled subset, as ``as_unlabelled`` copies.
    The same config gives the same faces to the generator and to the self-training baseline."""
    if not datamodule.records:
        raise RuntimeError("unlabelled_faces needs a datamodule after setup()")
    faces = [as_unlabelled(r) for r in pick_unlabelled(datamodule.outside_subset, n, datamodule.seed)]
    check_disjoint(faces, datamodule.records)
    return faces


def without_expression(record: FERRecord) -> FERRecord:
    """``as_unlabelled`` and without AUs either: a face that tells the generator nothing about its expression."""
    return dataclasses.replace(as_unlabelled(record), aus=None, au_mask=None)


class GeneratorFERDataModule(RealFERDataModule):
    """The generator's data: the labelled train subset + ``unlabelled`` faces from outside it (0: none, None:
    all; ``generator.data.train_limit`` - ``data.train_limit``); val and test as the real data's.

    ``expression_labels=False`` (the cumulative ablation's base model): every train and val face reaches the generator
    without label, expression caption or AUs, so it learns faces but not expressions (the test split keeps its
    labels: the evaluation still asks for expressions, and ``grid_records`` keeps the labelled val faces whose
    conditions the sample grids request)."""

    def __init__(self, unlabelled: Optional[int] = 0, expression_labels: bool = True, **kwargs):
        super().__init__(**kwargs)
        if unlabelled is not None and (isinstance(unlabelled, bool) or not isinstance(unlabelled, int)
                                       or unlabelled < 0):
            raise ValueError(f"generator.data.train_limit: bad number of unlabelled faces {unlabelled!r}")
        if not isinstance(expression_labels, bool):
            raise ValueError(f"generator.data.expression_labels must be true or false, got {expression_labels!r}")
        self.unlabelled = unlabelled
        self.expression_labels = expression_labels
        self.num_labelled = self.num_unlabelled = 0
        self.grid_records: list = []  # the labelled val faces whose conditions the sample grids ask for

    def setup(self, stage: Optional[str] = None) -> None:
        if self.datasets:
            return
        super().setup(stage)
        labelled = self.records["train"]
        extra = unlabelled_faces(self, self.unlabelled) if self.unlabelled != 0 else []
        self.num_labelled, self.num_unlabelled = len(labelled), len(extra)
        self.grid_records = list(self.records["val"])  # a base model's grids still ask for expressions
        if not self.expression_labels:
            labelled, extra = [without_expression(r) for r in labelled], [without_expression(r) for r in extra]
            self.records["val"] = [without_expression(r) for r in self.records["val"]]
            self.datasets["val"] = RecordDataset(
                self.records["val"], self.datasets["val"].transform, num_aus=len(self.vocab),
                num_classes=self.num_classes, with_soft_labels=self.soft_labels, name=f"{self.format} val (no labels)")
        if extra or not self.expression_labels:
            self.records["train"] = labelled + extra
            self.datasets["train"] = RecordDataset(
                self.records["train"], train_transform(self.image_size, self.augment, self.color_mode,
                                                        self.train_resample_size),
                num_aus=len(self.vocab), num_classes=self.num_classes, with_soft_labels=self.soft_labels,
                name=f"{self.format} train" + (" (+ unlabelled)" if extra else "")
                + ("" if self.expression_labels else " (no expression labels)"))

    def summary(self) -> dict:
        return {**super().summary(), "train_labelled": self.num_labelled, "train_unlabelled": self.num_unlabelled}

"""Sample grids while the generator trains: rows = expressions x columns = seeds, and an AU sweep (one AU from
0 to 5 per row, same seed and caption), written as PNG and logged to wandb. Data without AU labels gets the
expression grid only (its rows request no AUs) and no AU sweep. A face without a caption is captioned by the
generator's caption builder, as in training."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from lightning.pytorch.callbacks import Callback

from datamodules.batch import FERRecord
from datamodules.caption_builder import CaptionBuilder, caption_records
from datamodules.labels import EXPRESSIONS
from lightning_modules.generator.grids import save_labelled_grid

log = logging.getLogger(__name__)


@dataclass
class GridConditions:
    """One condition per expression row, and the base condition of the AU sweep (None: no AU labels, no sweep)."""

    names: list[str]
    captions: list[str]
    aus: torch.Tensor          # (R, A); a row without AUs has them all unknown (mask False)
    au_mask: torch.Tensor      # (R, A)
    sweep_caption: str
    sweep_aus: Optional[torch.Tensor]    # (A,)
    sweep_mask: Optional[torch.Tensor]   # (A,)
    labels: Optional[list[int]] = None   # the class of each row (the class condition of a label generator)
    sweep_label: Optional[int] = None    # the class of the sweep's face

    @property
    def has_aus(self) -> bool:
        return bool(self.au_mask.numel()) and bool(self.au_mask.any())


def grid_conditions(records: Sequence[FERRecord], num_classes: int, num_aus: int,
                    captioner: Optional[CaptionBuilder] = None) -> GridConditions:
    """The first record of each class (preferring one with AUs) with its AUs and caption (``captioner``'s, the
    generator's builder, when it has none); the AU sweep starts from a neutral face with AUs (any face with AUs if
    the neutral one has none) and is None without AU labels."""
    rows: dict[int, FERRecord] = {}
    for rec in records:
        if 0 <= rec.label < num_classes and (rec.label not in rows or
                                             (rows[rec.label].aus is None and rec.aus is not None)):
            rows[rec.label] = rec
    if not rows:
        raise ValueError(f"no labelled records (classes 0..{num_classes - 1}) to draw sample grids from")
    order = sorted(rows)
    aus = torch.zeros(len(order), num_aus)
    mask = torch.zeros(len(order), num_aus, dtype=torch.bool)
    for i, c in enumerate(order):
        if rows[c].aus is not None:
            aus[i] = torch.as_tensor(rows[c].aus, dtype=torch.float32)
            mask[i] = torch.as_tensor(rows[c].au_mask).bool() if rows[c].au_mask is not None else True
    with_aus = [c for c in order if rows[c].aus is not None]
    base = (rows[0] if 0 in with_aus else rows[with_aus[0]]) if with_aus else rows.get(0, rows[order[0]])
    sweep = order.index(base.label)
    captions = caption_records([rows[c] for c in order], captioner)
    return GridConditions(
        names=[EXPRESSIONS[c] for c in order], captions=captions, aus=aus, au_mask=mask,
        sweep_caption=captions[sweep], sweep_aus=aus[sweep].clone() if with_aus else None,
        sweep_mask=mask[sweep].clone() if with_aus else None, labels=order,
        sweep_label=int(base.label))


def render_grids(generator, conds: GridConditions, out_dir: Path, tag: str, seeds: int,
                 au_levels: Sequence[float]) -> dict[str, Path]:
    """Write expressions_<tag>.png and au_sweep_<tag>.png; returns their paths."""
    rows = len(conds.names)
    captions = [c for c in conds.captions for _ in range(seeds)]
    aus, mask = ((conds.aus.repeat_interleave(seeds, 0), conds.au_mask.repeat_interleave(seeds, 0))
                 if conds.has_aus else (None, None))
    classes = None if conds.labels is None else torch.tensor(conds.labels).repeat_interleave(seeds)
    images = generator.sample(captions, aus, mask, seeds=list(range(seeds)) * rows, class_labels=classes)
    paths = {"expressions": save_labelled_grid(images, conds.names, out_dir / f"expressions_{tag}.png",
                                               col_names=[f"seed {s}" for s in range(seeds)])}
    if conds.sweep_aus is None:
        log.info("sample grids: no AU sweep (no AU labels in the data)")
        return paths
    au_names = list(generator.vocab.aus)
    levels = [float(v) for v in au_levels]
    aus = conds.sweep_aus.repeat(len(au_names) * len(levels), 1)
    mask = conds.sweep_mask.repeat(len(au_names) * len(levels), 1)
    for i in range(len(au_names)):
        for j, v in enumerate(levels):
            aus[i * len(levels) + j, i] = v
            mask[i * len(levels) + j, i] = True
    sweep_classes = None if conds.sweep_label is None else torch.full((len(aus),), conds.sweep_label)
    images = generator.sample([conds.sweep_caption] * len(aus), aus, mask, seeds=[0] * len(aus),
                              class_labels=sweep_classes)
    paths["au_sweep"] = save_labelled_grid(images, [f"AU{a}" for a in au_names], out_dir / f"au_sweep_{tag}.png",
                                           col_names=[f"{v:g}" for v in levels])
    return paths


class GeneratorSampleGrids(Callback):
    """Every ``every_n_steps`` optimizer steps (0 = never during training) and at the end of training."""

    def __init__(self, conds: GridConditions, out_dir: Path, every_n_steps: int = 500, seeds: int = 6,
                 au_levels: Sequence[float] = (0, 1, 2, 3, 4, 5)):
        if every_n_steps < 0 or seeds < 1 or not au_levels:
            raise ValueError(f"grids: every_n_steps must be >= 0, seeds >= 1 and au_levels non-empty "
                             f"(got {every_n_steps}, {seeds}, {list(au_levels)})")
        self.conds, self.out_dir = conds, Path(out_dir)
        self.every_n_steps, self.seeds, self.au_levels = every_n_steps, seeds, list(au_levels)
        self.last_paths: dict[str, Path] = {}

    def _render(self, trainer, pl_module, tag: str) -> None:
        if not trainer.is_global_zero:
            return
        self.last_paths = render_grids(pl_module, self.conds, self.out_dir, tag, self.seeds, self.au_levels)
        from lightning.pytorch.loggers import WandbLogger

        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                for key, path in self.last_paths.items():
                    lg.log_image(key=f"samples/{key}", images=[str(path)], step=trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and \
                (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self._render(trainer, pl_module, f"step{step:06d}")

    def on_train_end(self, trainer, pl_module) -> None:
        self._render(trainer, pl_module, "final")

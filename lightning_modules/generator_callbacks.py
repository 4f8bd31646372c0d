"""Sample grids while the generator trains: rows = expressions x columns = seeds, and an AU sweep (one AU from
0 to 5 per row, same seed and caption), written as PNG and logged to wandb."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from lightning.pytorch.callbacks import Callback

from datamodules.batch import FERRecord
from datamodules.labels import EXPRESSIONS
from lightning_modules.grids import save_labelled_grid


@dataclass
class GridConditions:
    """One condition per expression row, and the base condition of the AU sweep."""

    names: list[str]
    captions: list[str]
    aus: torch.Tensor          # (R, A)
    au_mask: torch.Tensor      # (R, A)
    sweep_caption: str
    sweep_aus: torch.Tensor    # (A,)
    sweep_mask: torch.Tensor   # (A,)


def grid_conditions(records: Sequence[FERRecord], num_classes: int, num_aus: int) -> GridConditions:
    """The first record of each class (with its AUs and caption); the sweep starts from a neutral face."""
    rows: dict[int, FERRecord] = {}
    for rec in records:
        if 0 <= rec.label < num_classes and rec.label not in rows and rec.aus is not None:
            rows[rec.label] = rec
    if not rows:
        raise ValueError("no labelled records with AUs to draw sample grids from")
    order = sorted(rows)
    ones = torch.ones(num_aus, dtype=torch.bool)
    masks = [torch.as_tensor(rows[c].au_mask) if rows[c].au_mask is not None else ones for c in order]
    base = rows.get(0, rows[order[0]])
    return GridConditions(
        names=[EXPRESSIONS[c] for c in order], captions=[rows[c].caption for c in order],
        aus=torch.stack([torch.as_tensor(rows[c].aus, dtype=torch.float32) for c in order]),
        au_mask=torch.stack(masks).bool(), sweep_caption=base.caption,
        sweep_aus=torch.as_tensor(base.aus, dtype=torch.float32),
        sweep_mask=torch.as_tensor(base.au_mask if base.au_mask is not None else ones).bool())


def render_grids(generator, conds: GridConditions, out_dir: Path, tag: str, seeds: int,
                 au_levels: Sequence[float]) -> dict[str, Path]:
    """Write expressions_<tag>.png and au_sweep_<tag>.png; returns their paths."""
    rows = len(conds.names)
    captions = [c for c in conds.captions for _ in range(seeds)]
    images = generator.sample(captions, conds.aus.repeat_interleave(seeds, 0),
                              conds.au_mask.repeat_interleave(seeds, 0), seeds=list(range(seeds)) * rows)
    paths = {"expressions": save_labelled_grid(images, conds.names, out_dir / f"expressions_{tag}.png",
                                               col_names=[f"seed {s}" for s in range(seeds)])}
    au_names = list(generator.vocab.aus)
    levels = [float(v) for v in au_levels]
    aus = conds.sweep_aus.repeat(len(au_names) * len(levels), 1)
    mask = conds.sweep_mask.repeat(len(au_names) * len(levels), 1)
    for i in range(len(au_names)):
        for j, v in enumerate(levels):
            aus[i * len(levels) + j, i] = v
            mask[i * len(levels) + j, i] = True
    images = generator.sample([conds.sweep_caption] * len(aus), aus, mask, seeds=[0] * len(aus))
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

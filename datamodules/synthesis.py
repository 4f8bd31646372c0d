"""The synthesis stage's input: a condition plan cut into fixed chunks and batches.

A chunk (``chunk_size`` consecutive plan rows) becomes one shard of the synthetic set. Chunks -- never single
samples -- are dealt to ranks, and a chunk is always cut into the same batches, so every face is generated in the
same batch with the same neighbours whatever the number of processes: 1 or N processes give byte-identical sets.
Chunks already listed in the set's manifest are skipped, which is how a killed run resumes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
from torch.utils.data import DataLoader, Dataset


def chunk_name(chunk: int) -> str:
    return f"chunk-{chunk:06d}"


@dataclass(frozen=True)
class PlanBatch:
    chunk: int
    start: int            # plan indices [start, stop)
    stop: int
    last_in_chunk: bool


def chunk_batches(plan_size: int, chunk_size: int, batch_size: int, chunks: list[int]) -> list[PlanBatch]:
    """The fixed batches of the given chunks, in order."""
    batches = []
    for chunk in chunks:
        lo, hi = chunk * chunk_size, min((chunk + 1) * chunk_size, plan_size)
        for start in range(lo, hi, batch_size):
            stop = min(start + batch_size, hi)
            batches.append(PlanBatch(chunk, start, stop, stop == hi))
    return batches


def num_chunks(plan_size: int, chunk_size: int) -> int:
    return -(-plan_size // chunk_size)


def pending_chunks(plan_size: int, chunk_size: int, done: set[str]) -> list[int]:
    return [c for c in range(num_chunks(plan_size, chunk_size)) if chunk_name(c) not in done]


def rank_chunks(pending: list[int], rank: int, world_size: int) -> list[int]:
    """Round-robin deal of the pending chunks: ranks get equal work (to within one chunk)."""
    return pending[rank::world_size]


class PlanBatches(Dataset):
    """One item = one whole batch of plan rows (the DataLoader runs with ``batch_size=None``)."""

    def __init__(self, plan, batches: list[PlanBatch]):
        self.plan, self.batches = plan, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, Any]:
        b = self.batches[index]
        item = {"chunk": b.chunk, "last_in_chunk": b.last_in_chunk, **self.plan.rows(range(b.start, b.stop))}
        if getattr(self.plan, "layout", None) is not None:  # layout initialisation: the rows' real faces, decoded here
            item["init_images"] = self.plan.layout.images(range(b.start, b.stop))
        return item


class SynthesisDataModule(L.LightningDataModule):
    """Predict-only datamodule over a condition plan; each rank gets its share of the chunks not yet written to
    ``output_dir``. Needs ``use_distributed_sampler=False`` on the Trainer (the deal is explicit)."""

    def __init__(self, plan, output_dir: str | Path, chunk_size: int, batch_size: int, num_workers: int = 0):
        super().__init__()
        if chunk_size < 1 or batch_size < 1:
            raise ValueError(f"chunk_size and batch_size must be >= 1, got {chunk_size}, {batch_size}")
        self.plan, self.output_dir = plan, Path(output_dir)
        self.chunk_size, self.batch_size, self.num_workers = int(chunk_size), int(batch_size), int(num_workers)
        self.batches: Optional[list[PlanBatch]] = None

    def done_chunks(self) -> set[str]:
        from datamodules.synthetic import MANIFEST, read_manifest

        if not (self.output_dir / MANIFEST).is_file():
            return set()
        return {s["name"] for s in read_manifest(self.output_dir)["shards"]}

    def setup(self, stage: str) -> None:
        pending = pending_chunks(len(self.plan), self.chunk_size, self.done_chunks())
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        if trainer is not None:  # every rank has read the manifest before any rank writes a shard
            trainer.strategy.barrier("synthesis-plan")
        self.batches = chunk_batches(len(self.plan), self.chunk_size, self.batch_size,
                                     rank_chunks(pending, rank, world))

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(PlanBatches(self.plan, self.batches), batch_size=None, shuffle=False,
                          num_workers=self.num_workers)

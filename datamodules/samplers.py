"""The student's train samplers: pure index logic, reshuffled per epoch from ``seed + epoch`` and split across ranks
(each rank takes every ``world_size``-th sample or batch of one shared order). ``ShardedSampler`` shuffles (or draws
class-weighted) one set; ``MixedBatchSampler`` builds batches with a fixed share of synthetic faces;
``PretrainBatchSampler`` gives synthetic batches until an optimizer step, then real ones."""
from __future__ import annotations

import logging
import math
from typing import Optional

import torch

log = logging.getLogger("datamodules.mix")  # the mix datamodule's log lines, wherever its samplers live


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


class _RankBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of one per-epoch order of ``global_batches`` global batches; rank r takes r, r + world_size, ..."""
    global_batches: int
    world_size: int

    def _start(self) -> None:
        self.epoch = 0
        self.sampler = self  # Lightning calls set_epoch only on loader.sampler / loader.batch_sampler.sampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.global_batches // self.world_size


class MixedBatchSampler(_RankBatchSampler):
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
        self._start()

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        real = _stream(self.num_real, self.global_batches * self.n_real, gen, self.real_weights)
        syn = _stream(self.num_synthetic, self.global_batches * self.n_syn, gen, self.synthetic_weights)
        real, syn = real.view(-1, self.n_real), syn.view(-1, self.n_syn) + self.num_real
        for b in range(self.rank, self.global_batches, self.world_size):
            yield real[b].tolist() + syn[b].tolist()


class PretrainBatchSampler(_RankBatchSampler):
    """Whole batches of synthetic indices [num_real, num_real + num_synthetic) while the optimizer step is below
    ``switch_step``, then whole batches of real indices [0, num_real); each source from its own per-epoch stream.

    An epoch has as many batches as one pass over real + synthetic (padded to a multiple of ``world_size``; rank r
    takes global batches r, r + world_size, ...), so it does not depend on the budget. The optimizer step of a
    rank's batch b in epoch e is ``e × ceil(epoch_batches / accumulate) + b // accumulate`` (Lightning steps on an
    epoch's last partial window too); ``epoch_batches`` = the batches Lightning draws per epoch (fewer than
    ``len`` under ``limit_train_batches``). Every rank switches at the same step."""

    def __init__(self, num_real: int, num_synthetic: int, batch_size: int, switch_step: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, accumulate: int = 1, epoch_batches: Optional[int] = None,
                 real_weights: Optional[torch.Tensor] = None, synthetic_weights: Optional[torch.Tensor] = None):
        if num_real < 1 or num_synthetic < 1 or batch_size < 1 or accumulate < 1 or not 0 <= rank < world_size:
            raise ValueError(f"PretrainBatchSampler: bad sizes/rank {num_real}, {num_synthetic}, {batch_size}, "
                             f"{accumulate}, {rank}/{world_size}")
        self.num_real, self.num_synthetic, self.batch_size, self.switch_step = num_real, num_synthetic, batch_size, \
            int(switch_step)
        self.seed, self.rank, self.world_size, self.accumulate = seed, rank, world_size, accumulate
        self.real_weights, self.synthetic_weights = real_weights, synthetic_weights
        union = math.ceil((num_real + num_synthetic) / batch_size)
        self.global_batches = math.ceil(union / world_size) * world_size
        self.epoch_batches = min(len(self), epoch_batches or len(self))
        self._start()

    def step_of(self, b: int) -> int:
        """The optimizer step that rank-local batch ``b`` of the current epoch feeds."""
        return self.epoch * math.ceil(self.epoch_batches / self.accumulate) + b // self.accumulate

    def is_synthetic_batch(self, b: int) -> bool:
        return self.step_of(b) < self.switch_step

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)  # same on every rank: they split one order
        phase = [self.is_synthetic_batch(b) for b in range(len(self))]
        n_syn = sum(phase) * self.world_size  # global batches of each source this epoch
        streams = {}
        for synthetic, n, weights, offset, count in ((True, n_syn, self.synthetic_weights, self.num_real,
                                                      self.num_synthetic),
                                                     (False, len(self) * self.world_size - n_syn, self.real_weights,
                                                      0, self.num_real)):
            draws = _stream(count, n * self.batch_size, gen, weights) if n else torch.zeros(0, dtype=torch.long)
            streams[synthetic] = draws.view(-1, self.batch_size) + offset
        seen = {True: 0, False: 0}
        for b, synthetic in enumerate(phase):
            if not synthetic and self.rank == 0 and self.step_of(b) == self.switch_step and b % self.accumulate == 0:
                log.info("mix: pretrain: synthetic faces until optimizer step %d, real faces from here on",
                         self.switch_step)
            yield streams[synthetic][seen[synthetic] * self.world_size + self.rank].tolist()
            seen[synthetic] += 1

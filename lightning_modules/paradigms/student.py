"""FER students: the classifier trained on real, synthetic or mixed data and tested on real data only; and the
training protocol that makes students comparable (a step budget, early stopping on the real validation set, seeds)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from lightning_modules.paradigms.classifier import FERClassifier
from lightning_modules.run.runtime import require

MONITOR = "val/acc"  # the metric the best checkpoint and early stopping follow (real validation set)


class FERStudent(FERClassifier):
    """Students carry no AU head by default: they are judged on expression accuracy alone."""

    def __init__(self, *args, au_head: bool = False, **kwargs):
        super().__init__(*args, au_head=au_head, **kwargs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _positive_or_null(node: DictConfig, role: str, key: str, meaning: str) -> Optional[int]:
    value = node.get(key)
    require(value is None or (_is_int(value) and value >= 1), f"{role}.{key}",
            f"must be an integer >= 1 ({meaning}) or null, got {value!r}")
    return value


@dataclass(frozen=True)
class Protocol:
    """How long and how one classifier trains: ``max_steps`` optimizer steps (None: ``max_epochs`` epochs over its
    own train set), early stopping after ``patience`` validations without a better ``val/acc`` (None: off),
    validation every ``val_every_n_steps`` optimizer steps (None: once per epoch), and its seed."""
    max_epochs: int
    max_steps: Optional[int]
    patience: Optional[int]
    val_every_n_steps: Optional[int]
    seed: int

    def trainer_args(self, accumulate: int = 1) -> tuple[int, dict[str, Any], list]:
        """(max_epochs, Trainer overrides, extra callbacks) for ``trainer_setup.build_trainer``."""
        from lightning.pytorch.callbacks import EarlyStopping

        overrides: dict[str, Any] = {}
        max_epochs = self.max_epochs
        if self.max_steps is not None:  # the budget alone ends training; epochs follow from the set size
            max_epochs, overrides["max_steps"] = -1, self.max_steps
        if self.val_every_n_steps is not None:  # counted in batches across epoch boundaries
            overrides.update(check_val_every_n_epoch=None, val_check_interval=self.val_every_n_steps * accumulate)
        callbacks = [EarlyStopping(monitor=MONITOR, mode="max", patience=self.patience)] if self.patience else []
        return max_epochs, overrides, callbacks

    def planned_steps(self, steps_per_epoch: int) -> int:
        return self.max_steps if self.max_steps is not None else self.max_epochs * steps_per_epoch


def read_protocol(cfg: DictConfig, role: str) -> Protocol:
    """``<role>.max_epochs / max_steps / early_stopping_patience / val_every_n_steps / seed``, checked (ConfigError
    naming the key). ``seed`` null or absent: the run's ``seed``."""
    node = cfg[role]
    epochs = node.get("max_epochs")
    require(_is_int(epochs) and epochs >= 1, f"{role}.max_epochs", f"must be an integer >= 1, got {epochs!r}")
    max_steps = _positive_or_null(node, role, "max_steps", "the optimizer-step budget; null = max_epochs epochs")
    patience = _positive_or_null(node, role, "early_stopping_patience",
                                 "validations without a better val/acc before training stops; null = off")
    val_every = _positive_or_null(node, role, "val_every_n_steps", "optimizer steps between validations; null = "
                                  "once per epoch")
    seed = node.get("seed")
    seed = cfg.seed if seed is None else seed
    require(_is_int(seed), f"{role}.seed", f"must be an integer, got {seed!r}")
    return Protocol(int(epochs), max_steps, patience, val_every, int(seed))


def check_seeds(value: Any, key: str) -> Optional[list[int]]:
    """A list of distinct integer seeds (at least one), or None."""
    if value is None:
        return None
    items = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
    ok = isinstance(items, (list, tuple)) and len(items) > 0 and all(_is_int(s) for s in items)
    require(ok and len(set(items)) == len(items), key,
            f"must be a non-empty list of distinct integer seeds (e.g. [0, 1, 2]) or null, got {value!r}")
    return [int(s) for s in items]


def seed_suffix(seed: int) -> str:
    return f"_seed{seed}"


def student_group(name: str, seed: int) -> str:
    """The student a seeded run belongs to: ``student_mix_seed2`` (seed 2) -> ``student_mix``."""
    suffix = seed_suffix(seed)
    return name[:-len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else name


def optimizer_steps_per_epoch(train_batches: int, accumulate: int = 1) -> int:
    """Lightning steps the optimizer on the last, partial accumulation window of an epoch too."""
    return math.ceil(train_batches / max(1, accumulate))


def pretrain_phase_callback():
    """A callback for ``mix.mode=pretrain`` students with early stopping: the synthetic phase cannot stop the run
    (the Trainer's ``min_steps`` reaches one past the switch step: a stop signalled in the synthetic phase would
    otherwise fire as soon as the switch is reached) and early stopping starts afresh at the switch (its wait count
    and best score reset, the signal cleared), so patience counts validations of the real phase only. The switch
    step comes from the datamodule (``steps["switch"]``, known once the train loader exists)."""
    import torch
    from lightning.pytorch.callbacks import Callback, EarlyStopping

    class RealPhaseEarlyStopping(Callback):
        def __init__(self):
            self.switch: Optional[int] = None
            self.reset_done = False

        def on_train_start(self, trainer, pl_module) -> None:
            self.switch = int(trainer.datamodule.steps["switch"])
            loop = trainer.fit_loop.epoch_loop
            loop.min_steps = max(loop.min_steps or 0, self.switch + 1)
            self.reset_done = trainer.global_step >= self.switch  # resumed in the real phase: state is restored

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.reset_done or trainer.global_step < self.switch:
                return
            for callback in trainer.callbacks:
                if isinstance(callback, EarlyStopping):
                    callback.wait_count = 0
                    inf = torch.tensor(torch.inf)
                    callback.best_score = inf if callback.monitor_op == torch.lt else -inf
            trainer.should_stop = False
            self.reset_done = True

    return RealPhaseEarlyStopping()

"""A stage's loggers (CSV, wandb with its lineage) and its Lightning Trainer (checkpoints, LR monitor), from the
``logger`` and ``trainer`` config groups."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from lightning_modules.run.runtime import ConfigError, is_rank_zero, require


def build_loggers(cfg: DictConfig, out_dir: Path, stage: str) -> list[Logger]:
    """CSV and/or wandb loggers of stage ``stage`` (its output folder's name). The wandb run continues the stage's
    previous run when that was cut off under the same config (``lineage.wandb_run_id``); ``finish_loggers`` records
    the stage's artifacts (``logger.wandb.artifacts``)."""
    from lightning_modules.run.lineage import StageWandbLogger, wandb_run_id

    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(out_dir), name="csv", version=""))
    wb = cfg.logger.wandb
    require(wb.mode in ("offline", "online", "disabled"), "logger.wandb.mode",
            f"must be offline|online|disabled, got {wb.mode}")
    artifacts = wb.get("artifacts", True)
    require(isinstance(artifacts, bool), "logger.wandb.artifacts", f"must be true or false, got {artifacts!r}")
    if wb.enabled and wb.mode != "disabled":
        run_id = wandb_run_id(cfg, out_dir) if is_rank_zero() else None  # only rank 0 has a wandb run
        loggers.append(StageWandbLogger(
            cfg, stage, Path(out_dir), artifacts, id=run_id, resume="allow",
            save_dir=str(out_dir), project=wb.project, entity=wb.entity, group=wb.group,
            name=_run_name(cfg, stage), job_type=stage, tags=list(wb.tags), offline=wb.mode == "offline",
            config=OmegaConf.to_container(cfg, resolve=True)))
    return loggers


def _run_name(cfg: DictConfig, stage: str) -> str:
    """``<experiment>/<stage>``, plus the job's overrides in a Hydra multirun so sweep runs are told apart."""
    name = f"{cfg.experiment_name}/{stage}"
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN and hc.job.override_dirname:
            name += f"[{hc.job.override_dirname}]"
    except ValueError:  # not inside a Hydra app (tests, notebooks)
        pass
    return name


def finish_loggers(loggers: list[Logger]) -> None:
    """Record the stage's wandb lineage (inputs used; outputs logged unless the stage is failing: call it from the
    ``finally`` after the outputs are written), then close the wandb run so the next run in this process (Hydra
    multirun, pipeline) starts a fresh one; a failing stage's run ends with exit code 1."""
    import sys

    from lightning_modules.run.lineage import StageWandbLogger

    wandb_loggers = [lg for lg in loggers if isinstance(lg, WandbLogger)]
    if not wandb_loggers:
        return
    failed = sys.exc_info()[1] is not None
    for lg in wandb_loggers:
        if isinstance(lg, StageWandbLogger) and not failed and is_rank_zero():
            lg.record_lineage()
    import wandb

    wandb.finish(exit_code=1 if failed else None)


def build_trainer(cfg: DictConfig, out_dir: Path, stage: str, max_epochs: int, monitor: Optional[str] = "val/acc",
                  extra_callbacks: Optional[list[Callback]] = None, monitor_mode: str = "max",
                  checkpoint_every_n_steps: Optional[int] = None, **trainer_overrides: Any
                  ) -> tuple[L.Trainer, list[Logger]]:
    """The stage's Trainer from ``cfg.trainer`` (+ overrides): loggers, checkpoints in ``<out>/checkpoints`` (best by
    ``monitor``, or the latest every ``checkpoint_every_n_steps`` when ``monitor`` is None), LR monitor. With a
    ``monitor``, ``checkpoint_every_n_steps`` also refreshes ``last.ckpt`` between validations (for resuming; the
    best checkpoint is still chosen at validations only)."""
    trainer_args = {**OmegaConf.to_container(cfg.trainer, resolve=True), **trainer_overrides}
    max_steps = int(trainer_args.pop("max_steps", -1) or -1)
    require(max_epochs >= 1 or max_steps >= 1, f"{stage}.max_epochs",
            f"must be >= 1 (or set {stage}.max_steps), got {max_epochs}")
    loggers = build_loggers(cfg, out_dir, stage)
    callbacks: list[Callback] = list(extra_callbacks or [])
    if monitor:
        # both write last.ckpt: no version counter, or the second writer would make last-v1.ckpt
        callbacks.append(ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), monitor=monitor, mode=monitor_mode,
                                         save_last=True, filename="best-{epoch:02d}", enable_version_counter=False))
        if checkpoint_every_n_steps:  # after the best one: trainer.checkpoint_callback stays the best one
            callbacks.append(ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), save_top_k=0, save_last=True,
                                             every_n_train_steps=checkpoint_every_n_steps,
                                             enable_version_counter=False))
    else:
        callbacks.append(ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), save_last=True,
                                         every_n_train_steps=checkpoint_every_n_steps, filename="step-{step:06d}"))
    if loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step" if max_steps >= 1 else "epoch"))
    trainer = make_trainer(default_root_dir=str(out_dir), max_epochs=max_epochs, max_steps=max_steps,
                           logger=loggers or False, callbacks=callbacks, **trainer_args)
    return trainer, loggers


def make_trainer(**kwargs: Any) -> L.Trainer:
    """``L.Trainer(**kwargs)``; an argument Lightning rejects (``trainer.devices=0``, an unknown key) is a
    ConfigError naming the ``trainer`` group."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return L.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, TypeError) as err:
        raise ConfigError("trainer", str(err)) from err

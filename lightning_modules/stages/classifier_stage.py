"""`stage=teacher` and `stage=student`: fit a timm FER classifier on the configured data, test on real data."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig

from lightning_modules import runtime
from lightning_modules.runtime import require

# Config subtrees a classifier stage depends on: a change in any of them invalidates its outputs.
HASH_KEYS = {"teacher": ["data", "teacher", "trainer", "seed"], "student": ["data", "student", "trainer", "seed"]}


def check_classifier_config(cfg: DictConfig, role: str) -> None:
    """Fail before any work, naming the key."""
    import timm

    model = cfg[role].model
    require(timm.is_model(model.backbone), f"{role}.model.backbone", f"unknown timm model {model.backbone!r}")
    if model.pretrained:
        require(Path(model.pretrained).is_file(), f"{role}.model.pretrained",
                f"local weights file not found: {model.pretrained} (weights are never downloaded)")
    require(model.lr > 0, f"{role}.model.lr", f"must be > 0, got {model.lr}")
    require(0 <= model.label_smoothing < 1, f"{role}.model.label_smoothing",
            f"must be in [0, 1), got {model.label_smoothing}")
    require(0 <= model.drop_rate < 1, f"{role}.model.drop_rate", f"must be in [0, 1), got {model.drop_rate}")
    require(0 <= model.warmup_fraction < 1, f"{role}.model.warmup_fraction",
            f"must be in [0, 1), got {model.warmup_fraction}")
    require(int(cfg[role].max_epochs) >= 1, f"{role}.max_epochs", f"must be >= 1, got {cfg[role].max_epochs}")


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    try:
        return hydra.utils.instantiate(cfg.data, _convert_="all")
    except hydra.errors.InstantiationException as err:  # unwrap to the datamodule's own message
        raise runtime.ConfigError("data", str(err.__cause__ or err)) from err


def run_classifier_stage(cfg: DictConfig, role: str) -> dict:
    """Fit + test; writes config.yaml, checkpoints, <role>.ckpt (best), metrics.json, confusion_matrix.png."""
    check_classifier_config(cfg, role)
    datamodule = build_datamodule(cfg)
    out_dir = runtime.stage_dir(cfg, role)
    runtime.clear_stage(out_dir)  # a rerun must not be mistaken for done, nor pick up stale checkpoints
    runtime.save_resolved_config(cfg, out_dir)
    L.seed_everything(int(cfg.seed), workers=True)
    model = hydra.utils.instantiate(cfg[role].model, num_classes=datamodule.num_classes,
                                    num_aus=len(datamodule.vocab), class_names=datamodule.class_names,
                                    _convert_="all")
    trainer, loggers = runtime.build_trainer(cfg, out_dir, role, int(cfg[role].max_epochs))
    start = time.time()
    try:
        trainer.fit(model, datamodule=datamodule)
        fit_s = time.time() - start
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        test = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    finally:
        runtime.finish_loggers(loggers)
    metrics = {}
    if trainer.is_global_zero:
        if best:
            shutil.copyfile(best, out_dir / f"{role}.ckpt")
        metrics = {**(test[0] if test else {}), "fit_seconds": fit_s, "epochs": trainer.current_epoch,
                   "best_val_acc": trainer.checkpoint_callback.best_model_score if best else None,
                   "checkpoint": str(out_dir / f"{role}.ckpt") if best else None,
                   "data": datamodule.summary(), "world_size": trainer.world_size,
                   "train_batches_per_epoch": trainer.num_training_batches}
        runtime.write_metrics(out_dir, metrics)
        runtime.mark_done(out_dir, runtime.config_hash(cfg, HASH_KEYS[role]))
    return metrics

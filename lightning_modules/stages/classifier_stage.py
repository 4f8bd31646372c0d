"""`stage=teacher` and `stage=student`: fit a FER classifier (timm backbone, or FERAnno on the generator's UNet
features) on the configured data, test on real data; outputs go to `<run_dir>/<role>.name/` (default `<role>/`)."""
from __future__ import annotations

import math
import re
import time
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.errors import DataError
from lightning_modules.paradigms.student import (optimizer_steps_per_epoch, pretrain_phase_callback, read_protocol,
                                                 student_group)
from lightning_modules.run import runtime, trainer_setup
from lightning_modules.run.runtime import require

# Config subtrees a classifier stage depends on: a change in any of them invalidates its outputs.
HASH_KEYS = {"teacher": ["data", "teacher", "trainer", "seed"],
             "student": ["data", "student", "mix", "trainer", "seed"]}


# (au_detector is not here: it is the teacher that stage annotate_aus trains)
RESERVED_NAMES = ("generator", "synthesize", "synth_eval", "relabel", "report", "pipeline", "multirun", "annotate_aus",
                  "pseudolabel")


# How often a run is saved and whether it resumes do not change what it trains: not part of its hash.
RESUME_IGNORED = ("checkpoint_every_n_steps", "resume")


def done_digest(cfg: DictConfig, role: str) -> str:
    """Config (+ for a student on synthetic faces: the synthetic sets' manifests, + for FERAnno: its generator)."""
    inputs = []
    if any(key in cfg[role] for key in RESUME_IGNORED):
        cfg = cfg.copy()
        with open_dict(cfg):
            for key in RESUME_IGNORED:
                cfg[role].pop(key, None)
    if role == "student" and cfg.mix.mode != "real_only":
        inputs += [Path(p) / "manifest.json" for p in synthetic_sets(cfg)]
        if cfg.mix.get("min_judge_confidence") is not None:  # a retrained judge filters other faces
            inputs.append(judge_path(cfg))
        cfg = _without_default_recipe(cfg)
    elif role == "student":  # a real-only student does not depend on the other mix settings
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.mix = {"mode": "real_only"}
    if is_feranno(cfg[role].model):
        inputs.append(Path(str(cfg[role].model.generator_path)))
    return runtime.inputs_hash(cfg, HASH_KEYS[role], inputs)


def _without_default_recipe(cfg: DictConfig) -> DictConfig:
    """The config without the recipe keys (mix.vote_labels, ...) that hold their defaults: a student trained
    before those keys existed trained exactly that recipe, so its finished run stays done."""
    from datamodules.mix import RECIPE_DEFAULTS

    defaults = [k for k, v in RECIPE_DEFAULTS.items() if k in cfg.mix and cfg.mix[k] == v]
    if not defaults:
        return cfg
    cfg = cfg.copy()
    with open_dict(cfg):
        for key in defaults:
            cfg.mix.pop(key)
    return cfg


def output_name(cfg: DictConfig, role: str) -> str:
    """The stage's output folder (and checkpoint) name: ``<role>.name``, default the role itself."""
    name = OmegaConf.select(cfg, f"{role}.name", default=None) or role
    return str(name)


def is_feranno(model: DictConfig) -> bool:
    return "generator_path" in model


def check_classifier_config(cfg: DictConfig, role: str) -> None:
    """Fail before any work, naming the key."""
    model = cfg[role].model
    name = output_name(cfg, role)
    other = "student" if role == "teacher" else "teacher"
    require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None, f"{role}.name",
            f"must be a plain folder name (letters, digits, _ . -), got {name!r}")
    require(name not in RESERVED_NAMES and name != other and not (role == "student" and name == "judge"),
            f"{role}.name", f"{name!r} is another stage's output folder; pick a different name")  # judge: a teacher
    if is_feranno(model):
        _check_feranno(model, role)
    else:
        _check_timm(model, role)
    require(model.lr > 0, f"{role}.model.lr", f"must be > 0, got {model.lr}")
    require(0 <= model.label_smoothing < 1, f"{role}.model.label_smoothing",
            f"must be in [0, 1), got {model.label_smoothing}")
    require(0 <= model.warmup_fraction < 1, f"{role}.model.warmup_fraction",
            f"must be in [0, 1), got {model.warmup_fraction}")
    read_protocol(cfg, role)  # max_epochs, max_steps, early stopping, validation interval, seed
    every = cfg[role].get("checkpoint_every_n_steps")
    require(every is None or (isinstance(every, int) and not isinstance(every, bool) and every >= 1),
            f"{role}.checkpoint_every_n_steps", f"must be an integer >= 1 or null (only at validations), got {every!r}")
    require(isinstance(cfg[role].get("resume", True), bool), f"{role}.resume",
            f"must be true or false, got {cfg[role].get('resume')!r}")
    if role == "student":
        check_mix_config(cfg)


def _check_timm(model: DictConfig, role: str) -> None:
    import timm

    require(timm.is_model(model.backbone), f"{role}.model.backbone", f"unknown timm model {model.backbone!r}")
    if model.pretrained:
        require(Path(model.pretrained).is_file(), f"{role}.model.pretrained",
                f"local weights file not found: {model.pretrained} (weights are never downloaded)")
    require(0 <= model.drop_rate < 1, f"{role}.model.drop_rate", f"must be in [0, 1), got {model.drop_rate}")


def _check_feranno(model: DictConfig, role: str) -> None:
    from lightning_modules.labeling import feranno

    key = f"{role}.model"
    try:
        path = feranno.check_generator_path(model.generator_path, f"{key}.generator_path")
    except FileNotFoundError as err:
        raise runtime.ConfigError(f"{key}.generator_path", str(err)) from err
    try:
        t = model.get("timestep", feranno.PAPER_DESIGN["timestep"])
        feranno.check_timestep(t, feranno.num_train_timesteps(path), f"{key}.timestep")
    except ValueError as err:
        raise runtime.ConfigError(f"{key}.timestep", str(err)) from err
    feranno.check_design(model.get("branches", feranno.PAPER_DESIGN["branches"]),
                         model.get("fusion", feranno.PAPER_DESIGN["fusion"]), model.get("attention_layers"), key)
    noise = model.get("noise", "add")
    require(noise in feranno.NOISE_MODES, f"{key}.noise", f"must be one of {feranno.NOISE_MODES}, got {noise!r}")
    require(int(model.get("pool_size", 4)) >= 1, f"{key}.pool_size", f"must be >= 1, got {model.get('pool_size')}")
    dim, heads = int(model.get("fusion_dim", 128)), int(model.get("fusion_heads", 4))
    require(dim >= 1 and heads >= 1 and dim % heads == 0, f"{key}.fusion_dim",
            f"must be a positive multiple of fusion_heads ({heads}), got {dim}")
    require(0 <= model.get("dropout", 0.0) < 1, f"{key}.dropout", f"must be in [0, 1), got {model.get('dropout')}")
    blocks = model.get("feature_blocks")
    if blocks is not None:
        n_up = feranno.num_up_blocks(path)
        ok = len(blocks) > 0 and len(set(blocks)) == len(blocks) and all(isinstance(b, int) for b in blocks)
        require(ok and (n_up is None or all(0 <= b < n_up for b in blocks)), f"{key}.feature_blocks",
                f"must be distinct indices of the UNet's up_blocks (0..{'?' if n_up is None else n_up - 1}) or "
                f"null for all, got {list(blocks)}")


def build_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    try:
        return hydra.utils.instantiate(cfg.data, _convert_="all")
    except hydra.errors.InstantiationException as err:  # unwrap to the datamodule's own message
        raise runtime.ConfigError("data", str(err.__cause__ or err)) from err


def synthetic_sets(cfg: DictConfig) -> list[str]:
    """``mix.synthetic``, or the run's relabelled set (its synthesized set when relabeling is off)."""
    chosen = cfg.mix.synthetic
    if chosen is None:
        stage = "relabel" if cfg.relabel.enabled else "synthesize"
        return [str(Path(cfg.paths.run_dir) / stage / "dataset")]
    return [str(chosen)] if isinstance(chosen, str) else [str(p) for p in chosen]


def mix_error(err: ValueError) -> runtime.ConfigError:
    """mix.py's messages start with the key, e.g. "mix.ratio must be ..."."""
    return runtime.ConfigError(re.split(r"[ :=]", str(err), maxsplit=1)[0], str(err))


def check_mix_config(cfg: DictConfig) -> None:
    """Every ``mix`` key, in every mode, before any data is read."""
    from datamodules.mix import check_mix

    mix = OmegaConf.to_container(cfg.mix, resolve=True)
    if mix.get("mode") != "real_only" and mix.get("synthetic") is None:
        mix["synthetic"] = synthetic_sets(cfg)
    try:
        check_mix(**mix)
    except ValueError as err:
        raise mix_error(err) from err


def judge_path(cfg: DictConfig) -> Path:
    """``mix.judge`` as a checkpoint path of this run (separate: <run>/judge/judge.ckpt, guide: the guiding
    classifier), whether or not it exists yet."""
    from lightning_modules.generator.evaluation import resolve_judge

    try:
        return resolve_judge(str(cfg.mix.get("judge", "separate")), cfg.paths.run_dir,
                             cfg.synthesis.guidance.classifier).checkpoint
    except ValueError as err:
        raise runtime.ConfigError("mix.judge", str(err)) from err


def _limit_batches(cfg: DictConfig, batches: int) -> int:
    """The train batches Lightning draws per epoch under ``trainer.limit_train_batches``."""
    limit = OmegaConf.select(cfg, "trainer.limit_train_batches", default=None)
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(batches, limit)
    if isinstance(limit, float):
        return int(batches * limit)
    return batches


def build_student_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The real datamodule inside a MixedFERDataModule (real only, synthetic only, concat, ratio or pretrain per
    ``mix``), set up for fit: the real splits and the synthetic rows are read (and the synthetic sets verified, the
    judge filter applied) here; mode=pretrain gets the student's step budget (``student.max_steps``, or
    ``student.max_epochs`` epochs of its train set)."""
    from datamodules.mix import MixedFERDataModule
    from datamodules.synthetic import verify_synthetic
    from lightning_modules.paradigms.judge_filter import resolve_judge_checkpoint

    mix = OmegaConf.to_container(cfg.mix, resolve=True)  # checked by check_classifier_config
    mix["synthetic"] = synthetic_sets(cfg) if mix["mode"] != "real_only" else None
    if mix.get("min_judge_confidence") is not None and mix["mode"] != "real_only":
        try:  # judge scores are cached in the student's own folder (a synthetic set may be shared)
            mix["judge_checkpoint"] = str(resolve_judge_checkpoint(mix.get("judge", "separate"), cfg.paths.run_dir,
                                                                   cfg.synthesis.guidance.classifier))
        except ValueError as err:
            raise mix_error(err) from err
        mix["score_cache"] = str(Path(cfg.paths.run_dir) / output_name(cfg, "student") / "judge_scores")
    if mix["mode"] != "real_only":  # a missing or damaged set must stop the run now, not after the real data is read
        for path in mix["synthetic"]:
            require((Path(path) / "manifest.json").is_file(), "mix.synthetic",
                    f"no synthetic set at {path} (run stage=synthesize, and stage=relabel unless relabel.enabled="
                    "false)")
            verify_synthetic(path)
    real = build_datamodule(cfg)
    try:
        datamodule = MixedFERDataModule(real, **mix)
        datamodule.setup("fit")  # too few synthetic faces for mix.scale etc. are config errors, before any training
        protocol = read_protocol(cfg, "student")
        datamodule.configure_steps(protocol.max_steps, protocol.max_epochs, _accumulate(cfg),
                                   OmegaConf.select(cfg, "trainer.limit_train_batches", default=None))
    except TypeError as err:
        raise runtime.ConfigError("mix", str(err)) from err
    except ValueError as err:
        if str(err).startswith("mix.") and not isinstance(err, DataError):
            raise mix_error(err) from err
        raise
    return datamodule


def build_classifier(cfg: DictConfig, role: str, datamodule) -> L.LightningModule:
    try:
        return hydra.utils.instantiate(cfg[role].model, num_classes=datamodule.num_classes,
                                       num_aus=len(datamodule.vocab), class_names=datamodule.class_names,
                                       _convert_="all")
    except hydra.errors.InstantiationException as err:  # e.g. an unknown key: the model's own message
        if isinstance(err.__cause__, runtime.ConfigError):  # the model named the exact key
            raise err.__cause__ from None
        raise runtime.ConfigError(f"{role}.model", str(err.__cause__ or err)) from err


def run_classifier_stage(cfg: DictConfig, role: str) -> dict:
    """Fit + test; writes config.yaml, checkpoints, <name>.ckpt (best), metrics.json, confusion_matrix.png into
    ``<run_dir>/<name>/`` (``name`` = ``<role>.name``, default the role: teacher/, student/).

    Config, data (every split read), model and Trainer are built before anything of an earlier run is touched, so
    a rerun that fails on any of them keeps the finished run. An unfinished run with the same config (killed,
    preempted) resumes from the newest of ``checkpoints/last.ckpt`` (written at every validation and every
    ``<role>.checkpoint_every_n_steps``) and SLURM's ``hpc_ckpt_*.ckpt``; ``<role>.resume=false`` or ``force=true``
    starts over. The stage folder is locked for this process while it runs."""
    with runtime.stage_locks():
        return _run_classifier_stage(cfg, role)


def _run_classifier_stage(cfg: DictConfig, role: str) -> dict:
    from lightning_modules.run.exact_resume import ExactResume

    check_classifier_config(cfg, role)
    name = output_name(cfg, role)
    out_dir = runtime.stage_dir(cfg, name)  # locked now: a second run of this folder stops before reading data
    if role == "student":
        datamodule = build_student_datamodule(cfg)  # reads real + synthetic train data
    else:
        datamodule = build_datamodule(cfg)
        datamodule.setup("fit")  # every split: a bad label file stops the run here
    protocol = read_protocol(cfg, role)
    L.seed_everything(protocol.seed, workers=True)
    model = build_classifier(cfg, role, datamodule)
    # the mixed datamodule deals its own per-rank samples (ratio batches would not survive Lightning's sampler)
    extra = {"use_distributed_sampler": False} if role == "student" else {}
    accumulate = _accumulate(cfg)
    max_epochs, overrides, callbacks = protocol.trainer_args(accumulate)
    if role == "student" and protocol.patience and datamodule.mode == "pretrain":
        callbacks.append(pretrain_phase_callback())  # the synthetic phase cannot end the run early
    trainer, loggers = trainer_setup.build_trainer(cfg, out_dir, name, max_epochs,
                                             extra_callbacks=[*callbacks, ExactResume()],
                                             checkpoint_every_n_steps=cfg[role].get("checkpoint_every_n_steps"),
                                             **extra, **overrides)
    digest = done_digest(cfg, role)
    # The digest keeps max_epochs / max_steps: the one-cycle LR schedule spans the planned steps, so a checkpoint of
    # another length is not a point on this run's trajectory.
    resume, why = runtime.resume_checkpoint(out_dir, digest,
                                            enabled=cfg[role].get("resume", True) and not cfg.get("force", False))
    if resume is not None and runtime.is_done(out_dir, digest):
        resume, why = None, "the earlier run with this config had finished; training again"
    artifacts = (f"{name}.ckpt", "confusion_matrix.png", "confusion_matrix.pt")
    runtime.clear_stage(out_dir, artifacts, keep_checkpoints=resume is not None)
    runtime.start_resumable(out_dir, digest)
    runtime.save_resolved_config(cfg, out_dir)
    runtime.log_start(name, resume, why)
    start = time.time()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
        fit_s = time.time() - start
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        test = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        if best and trainer.is_global_zero:  # before finish_loggers, which logs it as a wandb artifact
            runtime.export_weights(Path(best), out_dir / f"{name}.ckpt")
    finally:
        trainer_setup.finish_loggers(loggers)
    metrics = {}
    if trainer.is_global_zero:
        metrics = {**(test[0] if test else {}), "fit_seconds": fit_s,
                   "best_val_acc": trainer.checkpoint_callback.best_model_score if best else None,
                   "checkpoint": str(out_dir / f"{name}.ckpt") if best else None,
                   "resumed_from": str(resume or ""),
                   "data": datamodule.summary(), "world_size": trainer.world_size,
                   **protocol_metrics(trainer, datamodule, protocol, accumulate),
                   **({"student_group": student_group(name, protocol.seed)} if role == "student" else {})}
        runtime.write_metrics(out_dir, metrics)
        runtime.mark_done(out_dir, digest)
    return metrics


def _accumulate(cfg: DictConfig) -> int:
    return int(OmegaConf.select(cfg, "trainer.accumulate_grad_batches", default=None) or 1)


def protocol_metrics(trainer: L.Trainer, datamodule, protocol, accumulate: int) -> dict:
    """What the report needs to show that students trained alike: optimizer steps taken (per rank), the passes
    over the train set they amount to, the train set size (real + synthetic), the budget, early stopping, seed."""
    steps = int(trainer.global_step)
    batches = trainer.num_training_batches  # inf when no epoch was set up
    per_epoch = optimizer_steps_per_epoch(int(batches), accumulate) if math.isfinite(batches) else 0
    train_set = getattr(datamodule, "train_dataset", None)
    size = len(train_set) if train_set is not None else datamodule.summary().get("train_size")
    return {"optimizer_steps": steps, "epochs": round(steps / per_epoch, 2) if per_epoch else None,
            "train_batches_per_epoch": trainer.num_training_batches, "train_set_size": size,
            "max_steps": protocol.max_steps, "max_epochs": protocol.max_epochs,
            "early_stopping_patience": protocol.patience, "val_every_n_steps": protocol.val_every_n_steps,
            "stopped_early": bool(protocol.patience) and 0 < steps < protocol.planned_steps(per_epoch),
            "seed": protocol.seed}


def steps_per_epoch(cfg: DictConfig) -> int:
    """Optimizer steps in one epoch of this student's train set (per rank): reads the real and synthetic data."""
    datamodule = build_student_datamodule(cfg)
    batches = _limit_batches(cfg, len(datamodule.train_dataloader()))
    return optimizer_steps_per_epoch(batches, _accumulate(cfg))

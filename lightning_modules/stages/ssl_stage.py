"""`stage=ssl`: self-supervised pretraining (SimCLR) on the faces ``mix`` selects, then linear probing on real data.

Pretraining reads the student's train set (``mix.mode`` real_only | synthetic_only | concat, ``mix.scale``; the
labels are not used) through the same mixed datamodule, with every face served as two augmented views
(``ssl.augment``). It trains ``ssl.max_steps`` optimizer steps whatever the source, so sources compare at equal
compute. The probe then fits one linear layer on frozen features of the real labelled train split and scores the real
val and test splits; with ``ssl.probe.baseline_random`` the untrained backbone (the pretraining's initial weights)
is probed the same way. Outputs in ``<run>/<ssl.name>/``: config.yaml, checkpoints/, ssl.ckpt (the final weights),
metrics.json (``probe/pretrained/<split>/<metric>``, ``probe/random_init/...``, negatives per anchor, data summary).

``mix.mode=ratio`` is not supported: it fixes how many synthetic faces every batch holds, which for a contrastive
loss also fixes which faces serve as each other's negatives; the sources are compared as real, synthetic and their
union (concat).

A finished run with the same config (and the same synthetic sets) is skipped. An unfinished one resumes from
``checkpoints/last.ckpt``; a run that changed only ``ssl.probe`` resumes the finished pretraining at its last step
(no training) and probes again. The probe runs on rank 0 only (the whole val/test splits there); other ranks end
after pretraining."""
from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_modules.run import runtime, trainer_setup
from lightning_modules.run.runtime import ConfigError, require

log = logging.getLogger(__name__)

HASH_KEYS = ["data", "ssl", "mix", "trainer", "seed"]
RESUME_IGNORED = ("checkpoint_every_n_steps", "resume")  # how often it saves does not change what it trains
RESERVED_NAMES = ("teacher", "student", "generator", "synthesize", "synth_eval", "relabel", "report", "pipeline",
                  "multirun", "annotate_aus", "pseudolabel", "judge")
WEIGHTS = "ssl.ckpt"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def batch_size(cfg: DictConfig) -> tuple[int, str]:
    """Faces per rank and step, and the key that set it (``ssl.batch_size``, null = ``data.batch_size``)."""
    if cfg.ssl.get("batch_size") is not None:
        return cfg.ssl.batch_size, "ssl.batch_size"
    return cfg.data.batch_size, "data.batch_size"


def _key_of(err: ValueError, default: str) -> str:
    match = re.match(r"(ssl\.[\w.]+)", str(err))
    return match.group(1) if match else default


def view_augment(cfg: DictConfig):
    from lightning_modules.paradigms.ssl import ViewAugment

    values = OmegaConf.to_container(cfg.ssl.augment, resolve=True)
    try:
        return ViewAugment(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except TypeError as err:  # an unknown key
        raise ConfigError("ssl.augment", str(err)) from err
    except ValueError as err:
        raise ConfigError(_key_of(err, "ssl.augment"), str(err)) from err


def probe_settings(cfg: DictConfig):
    from lightning_modules.paradigms.ssl_probe import ProbeSettings

    values = {k: v for k, v in OmegaConf.to_container(cfg.ssl.probe, resolve=True).items() if k != "baseline_random"}
    try:
        return ProbeSettings(**values)
    except TypeError as err:
        raise ConfigError("ssl.probe", str(err)) from err
    except ValueError as err:
        raise ConfigError(_key_of(err, "ssl.probe"), str(err)) from err


def check_ssl_config(cfg: DictConfig) -> None:
    """Every ``ssl`` key and the ``mix`` settings, before any data is read; ConfigError naming the key."""
    import timm

    from lightning_modules.paradigms.ssl import METHODS
    from lightning_modules.stages.classifier_stage import check_mix_config

    s = cfg.ssl
    require(s.method in METHODS, "ssl.method", f"unknown method {s.method!r}; choose one of {', '.join(METHODS)}")
    name = str(s.name)
    require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None and name not in RESERVED_NAMES,
            "ssl.name", f"must be a plain folder name that no other stage writes, got {name!r}")
    require(timm.is_model(s.backbone), "ssl.backbone", f"unknown timm model {s.backbone!r}")
    if s.pretrained:
        require(Path(s.pretrained).is_file(), "ssl.pretrained",
                f"local weights file not found: {s.pretrained} (weights are never downloaded)")
    require(_is_number(s.temperature) and s.temperature > 0, "ssl.temperature", f"must be > 0, got {s.temperature!r}")
    for key in ("projection_hidden_dim", "projection_dim", "max_steps"):
        require(_is_int(s[key]) and s[key] >= 1, f"ssl.{key}", f"must be an integer >= 1, got {s[key]!r}")
    require(_is_number(s.lr) and s.lr > 0, "ssl.lr", f"must be > 0, got {s.lr!r}")
    require(_is_number(s.weight_decay) and s.weight_decay >= 0, "ssl.weight_decay",
            f"must be >= 0, got {s.weight_decay!r}")
    require(_is_number(s.warmup_fraction) and 0 <= s.warmup_fraction < 1, "ssl.warmup_fraction",
            f"must be in [0, 1), got {s.warmup_fraction!r}")
    size, key = batch_size(cfg)
    require(_is_int(size) and size >= 2, key,
            f"must be an integer >= 2 for stage=ssl (a contrastive loss needs negatives in the batch), got {size!r}")
    # Steps, never epoch ends: Lightning resumes a checkpoint written at a train epoch's end (there is no validation
    # here) by training one extra batch of the next epoch's order, so such a resume would not be step-exact.
    every = s.get("checkpoint_every_n_steps")
    require(_is_int(every) and every >= 1, "ssl.checkpoint_every_n_steps",
            f"must be an integer >= 1 (checkpoints are written every that many steps), got {every!r}")
    require(isinstance(s.get("resume", True), bool), "ssl.resume", f"must be true or false, got {s.get('resume')!r}")
    require(_is_int(s.seed), "ssl.seed", f"must be an integer, got {s.seed!r}")
    view_augment(cfg)
    probe_settings(cfg)
    baseline = s.probe.get("baseline_random", True)
    require(isinstance(baseline, bool), "ssl.probe.baseline_random", f"must be true or false, got {baseline!r}")
    require(cfg.mix.mode != "ratio", "mix.mode",
            "ratio is not supported by stage=ssl (a fixed synthetic share per batch would also fix which faces are "
            "each other's negatives); use real_only, synthetic_only or concat")
    require(not cfg.mix.get("class_balance", False), "mix.class_balance",
            "draws faces by their labels; stage=ssl pretrains without labels (set it to false)")
    check_mix_config(cfg)


def digests(cfg: DictConfig) -> tuple[str, str]:
    """(resume key: what pretraining depends on, done key: + the probe settings). Both include the synthetic sets'
    manifests when pretraining reads them."""
    from lightning_modules.stages.classifier_stage import synthetic_sets

    cfg = copy.deepcopy(cfg)
    inputs = []
    with open_dict(cfg):
        for key in RESUME_IGNORED:
            cfg.ssl.pop(key, None)
        if cfg.mix.mode == "real_only":  # the other mix settings do not change a real-only run
            cfg.mix = {"mode": "real_only", "seed": cfg.mix.seed}
        else:
            inputs = [Path(p) / "manifest.json" for p in synthetic_sets(cfg)]
        done = runtime.inputs_hash(cfg, HASH_KEYS, inputs)
        cfg.ssl.pop("probe")
        return runtime.inputs_hash(cfg, HASH_KEYS, inputs), done


def with_transform(dataset, transform):
    """The same faces (and shared unreadable-image flags) served through ``transform``."""
    from datamodules.batch import RecordDataset
    from datamodules.synthetic import SyntheticFERDataset

    if isinstance(dataset, RecordDataset):
        return dataset.variant(transform=transform)
    if isinstance(dataset, SyntheticFERDataset):
        out = copy.copy(dataset)
        out.transform = transform
        return out
    raise TypeError(f"stage=ssl cannot set the transform of a {type(dataset).__name__}")


def build_ssl_datamodule(cfg: DictConfig):
    """The student's mixed datamodule (set up for fit) with every train face served as two views, ``ssl``'s batch
    size; its real splits stay as they are (the probe reads them)."""
    from torch.utils.data import ConcatDataset

    from lightning_modules.paradigms.ssl import TwoViews, view_transform
    from lightning_modules.stages.classifier_stage import build_student_datamodule

    datamodule = build_student_datamodule(cfg)
    datamodule.batch_size = batch_size(cfg)[0]
    views = TwoViews(view_transform(datamodule.image_size, view_augment(cfg), datamodule.real.color_mode))
    datamodule.train_dataset = ConcatDataset([with_transform(d, views) for d in datamodule.train_dataset.datasets])
    return datamodule


def build_model(cfg: DictConfig):
    from lightning_modules.paradigms.ssl import SimCLR

    s = cfg.ssl
    return SimCLR(backbone=s.backbone, pretrained=s.pretrained, channels_last=s.channels_last,
                  projection_hidden_dim=s.projection_hidden_dim, projection_dim=s.projection_dim,
                  temperature=float(s.temperature), lr=float(s.lr), weight_decay=float(s.weight_decay),
                  warmup_fraction=float(s.warmup_fraction))


def untrained_backbone(cfg: DictConfig, model):
    """The probe's baseline: the backbone as pretraining starts (a copy, made before any step), or, when that start
    is a local weights file (``ssl.pretrained``), the same architecture randomly initialised from ``ssl.seed``."""
    import torch

    from lightning_modules.paradigms.classifier import create_backbone

    if not cfg.ssl.pretrained:
        return copy.deepcopy(model.backbone)
    with torch.random.fork_rng():
        torch.manual_seed(int(cfg.ssl.seed))
        backbone = create_backbone(cfg.ssl.backbone, num_classes=0)
    return backbone.to(memory_format=torch.channels_last) if cfg.ssl.channels_last else backbone


def probe_loaders(datamodule) -> dict:
    """The real train (without augmentation), val and test splits, whole (the probe runs in one process)."""
    from datamodules.batch import FERDataLoader, collate_fer
    from datamodules.transforms import eval_transform

    real = datamodule.real
    sets = {"train": real.datasets["train"].variant(transform=eval_transform(real.image_size, real.color_mode)),
            "val": real.datasets["val"], "test": real.datasets["test"]}
    return {split: FERDataLoader(ds, batch_size=real.eval_batch_size, shuffle=False, num_workers=real.num_workers,
                                 collate_fn=collate_fer) for split, ds in sets.items()}


def run_probes(cfg: DictConfig, model, initial, datamodule, device) -> dict[str, Any]:
    """{"pretrained": {...}, "random_init": {...}} (the latter when ``initial`` is given)."""
    import torch

    from lightning_modules.paradigms.ssl_probe import linear_probe

    loaders = probe_loaders(datamodule)
    channels_last = bool(cfg.ssl.channels_last)

    def encoder(backbone):
        backbone = backbone.to(device).eval()
        return lambda x: backbone(x.contiguous(memory_format=torch.channels_last) if channels_last else x)

    settings, seed = probe_settings(cfg), int(cfg.ssl.seed)
    out = {"pretrained": linear_probe(encoder(model.backbone), loaders, datamodule.num_classes, settings, seed,
                                      device)}
    if initial is not None:
        out["random_init"] = linear_probe(encoder(initial), loaders, datamodule.num_classes, settings, seed, device)
    for which, result in out.items():
        log.info("ssl probe (%s backbone): val acc %.4f, test acc %.4f, test macro-F1 %.4f", which,
                 result["val"]["acc"], result["test"]["acc"], result["test"]["macro_f1"])
    return out


def run_ssl_stage(cfg: DictConfig) -> dict:
    """Pretrain + probe (see the module doc). The stage folder is locked for this process while it runs."""
    with runtime.stage_locks():
        return _run_ssl_stage(cfg)


def _run_ssl_stage(cfg: DictConfig) -> dict:
    from lightning_modules.run.exact_resume import ExactResume, fit_and_export, prepare_resumable_fit

    check_ssl_config(cfg)
    name, force = str(cfg.ssl.name), bool(cfg.get("force", False))
    out_dir = runtime.stage_dir(cfg, name)
    resume_digest, digest = digests(cfg)
    if runtime.finished_earlier(cfg, name, out_dir, digest):
        return {"skipped": True}
    datamodule = build_ssl_datamodule(cfg)  # reads the real and synthetic train data
    L.seed_everything(int(cfg.ssl.seed), workers=True)
    model = build_model(cfg)
    initial = untrained_backbone(cfg, model) if cfg.ssl.probe.get("baseline_random", True) else None
    trainer, loggers = trainer_setup.build_trainer(
        cfg, out_dir, name, max_epochs=-1, monitor=None, extra_callbacks=[ExactResume()],
        checkpoint_every_n_steps=int(cfg.ssl.checkpoint_every_n_steps), max_steps=int(cfg.ssl.max_steps),
        use_distributed_sampler=False,  # the mixed datamodule deals each rank its own faces
        limit_val_batches=0, num_sanity_val_steps=0)  # nothing to validate: the probe scores the backbone
    resume, why = prepare_resumable_fit(cfg, out_dir, resume_digest, WEIGHTS,
                                        cfg.ssl.get("resume", True) and not force)
    runtime.log_start(name, resume, why)
    metrics: dict[str, Any] = {}
    try:
        fit_s = fit_and_export(trainer, model, out_dir, WEIGHTS, resume, datamodule=datamodule)
        if trainer.is_global_zero:  # the final step is last.ckpt: a probe-only rerun trains nothing
            probes = run_probes(cfg, model, initial, datamodule, trainer.strategy.root_device)
            metrics = {"probe": probes, "method": cfg.ssl.method, "backbone": cfg.ssl.backbone,
                       "negatives_per_anchor": model.last_negatives,
                       "global_batch_size": batch_size(cfg)[0] * trainer.world_size,
                       "optimizer_steps": int(trainer.global_step), "max_steps": int(cfg.ssl.max_steps),
                       "train_set_size": len(datamodule.train_dataset), "fit_seconds": fit_s,
                       "checkpoint": str(out_dir / WEIGHTS), "resumed_from": str(resume or ""),
                       "world_size": trainer.world_size, "seed": int(cfg.ssl.seed), "data": datamodule.summary()}
            runtime.log_scalars(loggers, runtime.flatten("probe", probes, {}), step=int(trainer.global_step))
    finally:
        trainer_setup.finish_loggers(loggers)
    runtime.record_stage(trainer, out_dir, metrics, digest)
    return metrics

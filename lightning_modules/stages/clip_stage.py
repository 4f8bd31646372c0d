"""`stage=clip`: zero-shot expression recognition with open_clip, before and after contrastive fine-tuning on
(face, caption) pairs.

The model (``clip.model``: a named open_clip architecture or a config dict, with random weights or a local
checkpoint) is first scored zero-shot on the real val and test faces: per class the configured prompt templates
(``clip.prompts.templates``) filled with the class word (``clip.prompts.class_words`` over the names of
``data.protocol``), averaged text embeddings, argmax cosine similarity. It is then fine-tuned for ``clip.max_steps``
optimizer steps on the pairs ``clip.train_on`` selects: the synthetic set's kept faces with its ``caption`` column
(``synthetic``), real train faces captioned from their labels by the suite's caption builder (``real``), or both, and
scored again. Outputs in ``<run>/<clip.name>/``: config.yaml, checkpoints/, clip.ckpt (the fine-tuned weights),
metrics.json (``zeroshot/before/<split>/<metric>``, ``zeroshot/after/...``, the prompts, the data sizes).

A finished run with the same config (and the same synthetic sets) is skipped; an unfinished one resumes from
``checkpoints/last.ckpt``; a rerun that changed only ``clip.prompts`` resumes the finished fine-tuning at its last
step (no training) and scores again. Zero-shot scoring runs on rank 0 only (the whole val/test splits there); the
"before" scores are taken before the first step, from the model as built (a resumed run rebuilds it the same way)."""
from __future__ import annotations

import copy
import dataclasses
import logging
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.errors import DataError
from lightning_modules.run import runtime, trainer_setup
from lightning_modules.run.runtime import ConfigError, require

log = logging.getLogger(__name__)

HASH_KEYS = ["data", "clip", "trainer", "seed"]
DEFAULT_SET_KEYS = ["mix", "relabel"]  # where clip.synthetic=null finds its set
RESUME_IGNORED = ("checkpoint_every_n_steps", "resume")
TRAIN_ON = ("synthetic", "real", "both")
WEIGHTS = "clip.ckpt"
RESERVED_NAMES = ("teacher", "student", "generator", "synthesize", "synth_eval", "relabel", "report", "pipeline",
                  "multirun", "annotate_aus", "pseudolabel", "judge", "ssl", "fewshot")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def batch_size(cfg: DictConfig) -> tuple[int, str]:
    if cfg.clip.get("batch_size") is not None:
        return cfg.clip.batch_size, "clip.batch_size"
    return cfg.data.batch_size, "data.batch_size"


def model_spec(cfg: DictConfig):
    """The ``ClipSpec`` of ``clip.model``, checked: a known name and an existing local file, or a config dict
    open_clip builds offline."""
    import open_clip

    from lightning_modules.paradigms.clip import ClipSpec, model_config, unsupported_parts

    m = cfg.clip.model
    name, pretrained = m.get("name"), m.get("pretrained")
    if pretrained is not None:
        require(Path(str(pretrained)).is_file(), "clip.model.pretrained",
                f"local weights file not found: {pretrained} (weights are never downloaded, pretrained tags such as "
                f"'openai' included)")
        pretrained = str(pretrained)
    if name is None:
        config = OmegaConf.to_container(m.config, resolve=True) if m.get("config") is not None else None
        require(isinstance(config, dict) and {"embed_dim", "vision_cfg", "text_cfg"} <= set(config),
                "clip.model.config", "must be a dict with embed_dim, vision_cfg and text_cfg (open_clip CLIP fields)")
        spec = ClipSpec(pretrained=pretrained, config=config)
    else:
        require(isinstance(name, str) and name in open_clip.list_models(), "clip.model.name",
                f"unknown open_clip model {name!r} (a built-in architecture, e.g. ViT-B-32)")
        spec = ClipSpec(name=name, pretrained=pretrained)
    where = "clip.model.config" if name is None else "clip.model.name"
    parts = unsupported_parts(name, model_config(spec))
    require(not parts, where, f"not supported offline by stage=clip: {'; '.join(parts)}")
    return spec


def start_weights(model, spec) -> None:
    """``spec.pretrained`` into ``model``; a file that is not an open_clip checkpoint of this architecture is a
    ConfigError naming the key and the file."""
    import pickle
    import zipfile

    from lightning_modules.paradigms.clip import load_local_weights

    arch = spec.name or "clip.model.config"
    try:
        load_local_weights(model, spec.pretrained)
    except (RuntimeError, KeyError, ValueError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as err:
        raise ConfigError("clip.model.pretrained", f"{spec.pretrained} is not an open_clip checkpoint of {arch}: "
                          f"{str(err).splitlines()[0][:300]}") from err
    log.info("clip: started from the local weights %s", spec.pretrained)


def prompts(cfg: DictConfig) -> tuple[list[str], list[str]]:
    """(templates, class words in class-id order), checked."""
    from datamodules.labels import class_names

    p = cfg.clip.prompts
    templates = OmegaConf.to_container(p.templates, resolve=True) if p.get("templates") is not None else None
    require(isinstance(templates, list) and len(templates) > 0, "clip.prompts.templates",
            f"must be a non-empty list of prompt templates with {{}} for the class word, got {templates!r}")
    for i, template in enumerate(templates):
        key = f"clip.prompts.templates[{i}]"
        require(isinstance(template, str) and "{}" in template, key,
                f"must be a string with {{}} where the class word goes, got {template!r}")
        try:
            template.format("x")
        except (IndexError, KeyError, ValueError) as err:
            raise ConfigError(key, f"{template!r} has braces other than one {{}} ({err})") from err
    names = list(class_names(int(cfg.data.protocol)))
    words = OmegaConf.to_container(p.class_words, resolve=True) if p.get("class_words") is not None else {}
    require(isinstance(words, dict), "clip.prompts.class_words", f"must be a mapping class name -> word, got {words!r}")
    for name, word in words.items():
        require(name in names or name == "contempt", f"clip.prompts.class_words.{name}",
                f"not a class name; the classes are {names}")
        require(isinstance(word, str) and word.strip() != "", f"clip.prompts.class_words.{name}",
                f"must be a non-empty word, got {word!r}")
    return templates, [words.get(name, name) for name in names]


def real_caption_builder(cfg: DictConfig):
    from datamodules.caption_builder import CaptionBuilder

    values = OmegaConf.to_container(cfg.clip.real_captions, resolve=True) or {}
    try:
        return CaptionBuilder.from_config(values, tuple(cfg.data.aus), "clip.real_captions")
    except ValueError as err:
        match = re.match(r"(clip\.real_captions[\w.\[\]]*)", str(err))
        raise ConfigError(match.group(1) if match else "clip.real_captions", str(err)) from err


def check_clip_config(cfg: DictConfig) -> None:
    """Every ``clip`` key, before any data is read; ConfigError naming the key."""
    c = cfg.clip
    name = str(c.name)
    require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name) is not None and name not in RESERVED_NAMES,
            "clip.name", f"must be a plain folder name that no other stage writes, got {name!r}")
    model_spec(cfg)
    prompts(cfg)
    require(c.train_on in TRAIN_ON, "clip.train_on", f"must be one of {', '.join(TRAIN_ON)}, got {c.train_on!r}")
    if c.train_on != "synthetic":
        real_caption_builder(cfg)
    require(c.scale is None or (_is_number(c.scale) and c.scale > 0), "clip.scale",
            f"must be a number > 0 (synthetic faces = scale x real train faces) or null (all), got {c.scale!r}")
    for key in ("max_steps", "checkpoint_every_n_steps"):
        require(_is_int(c[key]) and c[key] >= 1, f"clip.{key}", f"must be an integer >= 1, got {c[key]!r}")
    require(_is_number(c.lr) and c.lr > 0, "clip.lr", f"must be > 0, got {c.lr!r}")
    require(_is_number(c.weight_decay) and c.weight_decay >= 0, "clip.weight_decay",
            f"must be >= 0, got {c.weight_decay!r}")
    require(_is_number(c.warmup_fraction) and 0 <= c.warmup_fraction < 1, "clip.warmup_fraction",
            f"must be in [0, 1), got {c.warmup_fraction!r}")
    size, key = batch_size(cfg)
    require(_is_int(size) and size >= 2, key,
            f"must be an integer >= 2 for stage=clip (a contrastive loss needs negatives in the batch), got {size!r}")
    lo, hi = list(c.augment.crop_scale)
    require(0 < lo <= hi <= 1, "clip.augment.crop_scale", f"must satisfy 0 < lo <= hi <= 1, got {[lo, hi]}")
    require(isinstance(c.augment.hflip, bool), "clip.augment.hflip", f"must be true or false, got {c.augment.hflip!r}")
    require(isinstance(c.get("resume", True), bool), "clip.resume", f"must be true or false, got {c.get('resume')!r}")
    require(_is_int(c.seed), "clip.seed", f"must be an integer, got {c.seed!r}")


def synthetic_sets(cfg: DictConfig) -> list[str]:
    """``clip.synthetic``, else the student's default (``mix.synthetic``, the run's relabelled/synthesized set)."""
    from lightning_modules.stages.classifier_stage import synthetic_sets as student_sets

    chosen = cfg.clip.synthetic
    if chosen is None:
        return student_sets(cfg)
    return [str(chosen)] if isinstance(chosen, str) else [str(p) for p in chosen]


def digests(cfg: DictConfig) -> tuple[str, str]:
    """(resume key: what fine-tuning depends on, done key: + the prompts). Both include the synthetic sets'
    manifests when the fine-tuning reads them."""
    cfg = copy.deepcopy(cfg)
    reads_synthetic = cfg.clip.train_on != "real"
    inputs = [Path(p) / "manifest.json" for p in synthetic_sets(cfg)] if reads_synthetic else []
    keys = HASH_KEYS + (DEFAULT_SET_KEYS if reads_synthetic and cfg.clip.synthetic is None else [])
    with open_dict(cfg):
        for key in RESUME_IGNORED:
            cfg.clip.pop(key, None)
        if not reads_synthetic:
            cfg.clip.pop("scale")
            cfg.clip.pop("synthetic")
        done = runtime.inputs_hash(cfg, keys, inputs)
        cfg.clip.pop("prompts")
        return runtime.inputs_hash(cfg, keys, inputs), done


# ------------------------------------------------------------------------------------------------------ data
def synthetic_pairs(cfg: DictConfig, num_real: int, transform, num_classes: int):
    """The synthetic set's kept faces with a caption, the first ``clip.scale`` x ``num_real`` of them."""
    from datamodules.synthetic import SyntheticFERDataset, load_synthetic

    sets = synthetic_sets(cfg)
    for directory in sets:
        if not (Path(directory) / "manifest.json").is_file():
            raise DataError(f"clip: synthetic set {directory} not found (no manifest.json); run stage=synthesize "
                            "(or the pipeline) first, or set clip.synthetic / clip.train_on=real")
    data = load_synthetic(sets)  # a set without a caption column is a DataError naming it
    keep = np.asarray(data["kept"], dtype=bool) if "kept" in data.column_names else np.ones(len(data), bool)
    captioned = np.array([isinstance(c, str) and c.strip() != "" for c in data["caption"]])
    if not (keep & captioned).any():
        raise DataError(f"clip: synthetic set(s) {sets} hold no kept face with a caption (empty `caption` column); "
                        "fine-tuning needs (face, caption) pairs")
    missing = int((keep & ~captioned).sum())
    if missing:
        warnings.warn(f"clip: {missing} kept synthetic face(s) of {sets} have an empty caption and are left out")
    rows = np.flatnonzero(keep & captioned)
    if cfg.clip.scale is not None:
        need = int(round(float(cfg.clip.scale) * num_real))
        if need > len(rows):
            raise DataError(f"clip.scale={cfg.clip.scale} needs {need} captioned synthetic faces (scale x {num_real} "
                            f"real train faces); {sets} hold {len(rows)}")
        rows = rows[:max(1, need)]
    return SyntheticFERDataset(data.select(rows), int(cfg.data.image_size), num_classes, kept_only=False,
                               transform=transform, soft_labels=False, color_mode=str(cfg.data.color_mode))


def real_pairs(cfg: DictConfig, real, transform):
    """The real train faces, each captioned from its label and known AUs (its own caption is not used)."""
    from datamodules.batch import RecordDataset

    builder, rng = real_caption_builder(cfg), np.random.default_rng(int(cfg.clip.seed))
    train = real.datasets["train"]
    records = [dataclasses.replace(r, caption=builder.caption(int(r.label), r.aus, r.au_mask, rng))
               for r in train.records]
    return RecordDataset(records, transform, train.num_aus, train.num_classes, name=f"{train.name} captioned")


def build_data(cfg: DictConfig, image_size: int, mean, std):
    """(real datamodule set up, train pair dataset, eval transform)."""
    from torch.utils.data import ConcatDataset

    from lightning_modules.paradigms.clip import image_transform
    from lightning_modules.stages.classifier_stage import build_datamodule

    real = build_datamodule(cfg)
    real.setup("fit")
    color, aug = str(cfg.data.color_mode), cfg.clip.augment
    train_tf = image_transform(image_size, mean, std, color, train=True, crop_scale=tuple(aug.crop_scale),
                               hflip=bool(aug.hflip))
    parts = []
    if cfg.clip.train_on in ("synthetic", "both"):
        parts.append(synthetic_pairs(cfg, len(real.datasets["train"]), train_tf, real.num_classes))
    if cfg.clip.train_on in ("real", "both"):
        parts.append(real_pairs(cfg, real, train_tf))
    return real, ConcatDataset(parts), image_transform(image_size, mean, std, color)


def eval_loaders(real, transform) -> dict:
    from datamodules.batch import FERDataLoader, collate_fer

    return {split: FERDataLoader(real.datasets[split].variant(transform=transform), batch_size=real.eval_batch_size,
                                 shuffle=False, num_workers=real.num_workers, collate_fn=collate_fer)
            for split in ("val", "test")}


def zeroshot(model, tokenizer, templates, words, loaders, num_classes: int, device, which: str) -> dict:
    from lightning_modules.paradigms.clip import zeroshot_scores, zeroshot_weights

    model = model.to(device)
    weights = zeroshot_weights(model, tokenizer, templates, words, device)
    out = {split: zeroshot_scores(model, weights, loader, num_classes, device) for split, loader in loaders.items()}
    log.info("clip zero-shot (%s fine-tuning): val acc %.4f, test acc %.4f, test macro-F1 %.4f", which,
             out["val"]["acc"], out["test"]["acc"], out["test"]["macro_f1"])
    return out


# ------------------------------------------------------------------------------------------------------- run
def run_clip_stage(cfg: DictConfig) -> dict:
    """Zero-shot, fine-tune, zero-shot (see the module doc). The stage folder is locked while it runs."""
    with runtime.stage_locks():
        return _run_clip_stage(cfg)


def _run_clip_stage(cfg: DictConfig) -> dict:
    from datamodules.batch import FERDataLoader, collate_fer
    from lightning_modules.paradigms.clip import ClipFineTune, preprocess
    from lightning_modules.run.exact_resume import ExactResume, fit_and_export, prepare_resumable_fit

    check_clip_config(cfg)
    name, force = str(cfg.clip.name), bool(cfg.get("force", False))
    out_dir = runtime.stage_dir(cfg, name)
    resume_digest, digest = digests(cfg)
    if runtime.finished_earlier(cfg, name, out_dir, digest):
        return {"skipped": True}
    templates, words = prompts(cfg)
    spec = model_spec(cfg)
    L.seed_everything(int(cfg.clip.seed), workers=True)
    c = cfg.clip
    model = ClipFineTune(spec.name, spec.config, lr=float(c.lr), weight_decay=float(c.weight_decay),
                         warmup_fraction=float(c.warmup_fraction))
    if spec.pretrained:
        start_weights(model.model, spec)
    size, mean, std = preprocess(model.model)
    real, pairs, eval_tf = build_data(cfg, size, mean, std)
    per_rank, key = batch_size(cfg)
    train_loader = FERDataLoader(pairs, batch_size=per_rank, shuffle=True, drop_last=True,
                                 num_workers=real.num_workers, collate_fn=collate_fer)
    trainer, loggers = trainer_setup.build_trainer(
        cfg, out_dir, name, max_epochs=-1, monitor=None, extra_callbacks=[ExactResume()],
        checkpoint_every_n_steps=int(c.checkpoint_every_n_steps), max_steps=int(c.max_steps),
        limit_val_batches=0, num_sanity_val_steps=0)
    require(len(pairs) >= per_rank * trainer.world_size, key,
            f"{per_rank} pairs per rank x {trainer.world_size} rank(s) is more than the {len(pairs)} training pairs "
            f"(clip.train_on={c.train_on}): not one full step; lower it")
    resume, why = prepare_resumable_fit(cfg, out_dir, resume_digest, WEIGHTS, c.get("resume", True) and not force)
    loaders = eval_loaders(real, eval_tf)
    before = zeroshot(model.model, model.tokenizer, templates, words, loaders, real.num_classes,
                      trainer.strategy.root_device, "before") if trainer.is_global_zero else None
    runtime.log_start(name, resume, why)
    metrics: dict[str, Any] = {}
    try:
        fit_s = fit_and_export(trainer, model, out_dir, WEIGHTS, resume, train_dataloaders=train_loader)
        if trainer.is_global_zero:
            after = zeroshot(model.model, model.tokenizer, templates, words, loaders, real.num_classes,
                             trainer.strategy.root_device, "after")
            scores = {"before": before, "after": after}
            sizes = [len(d) for d in pairs.datasets]
            metrics = {"zeroshot": scores, "train_on": str(c.train_on), "prompts": {
                           "templates": list(templates), "class_words": list(words)},
                       "model": spec.name or "config", "pretrained": spec.pretrained or "",
                       "train_pairs": len(pairs),
                       "synthetic_pairs": sizes[0] if c.train_on != "real" else 0,
                       "real_pairs": sizes[-1] if c.train_on != "synthetic" else 0,
                       "scale": None if c.scale is None else float(c.scale),
                       "global_batch_size": model.last_global_batch, "optimizer_steps": int(trainer.global_step),
                       "max_steps": int(c.max_steps), "fit_seconds": fit_s, "checkpoint": str(out_dir / WEIGHTS),
                       "resumed_from": str(resume or ""), "world_size": trainer.world_size, "seed": int(c.seed),
                       "data": real.summary()}
            runtime.log_scalars(loggers, runtime.flatten("zeroshot", scores, {}), step=int(trainer.global_step))
    finally:
        trainer_setup.finish_loggers(loggers)
    runtime.record_stage(trainer, out_dir, metrics, digest)
    return metrics

"""`stage=generator`: fit the text + AU conditioned diffusion model on the real faces, save it as a diffusers
pipeline directory (+ AU adapter), draw sample grids, and score generated faces with the teacher.

Low-data runs: ``generator.data.train_limit`` lets the generator learn from train faces outside the labelled
``data.train_limit`` subset too (without their labels, datamodules/unlabelled.py). What it learned from (faces,
colour mode, native and model sizes) is logged and saved with the pipeline (``training_data.json``)."""
from __future__ import annotations

import json
import logging
import time
import warnings
from pathlib import Path
from typing import Optional

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_modules.guidance.settings import load_guide, semantic_guidance
from lightning_modules.run import runtime, trainer_setup
from lightning_modules.run.runtime import ConfigError, require

log = logging.getLogger(__name__)
HASH_KEYS = ["data", "generator", "trainer", "seed"]
# Written into the saved pipeline folder: what the generator learned from (colour mode, sizes, faces).
TRAINING_DATA = "training_data.json"
# Settings that do not change the training trajectory: raising max_steps continues a finished or killed run.
RESUME_IGNORED = ("max_steps", "max_epochs", "eval", "grids", "guidance", "resume", "checkpoint_every_n_steps")


def check_generator_config(cfg: DictConfig) -> None:
    """Fail before any work, naming the key."""
    gen = cfg.generator
    model = gen.model
    require(model.backbone in ("tiny", "pretrained"), "generator.model.backbone",
            f"must be tiny or pretrained, got {model.backbone!r}")
    if model.backbone == "pretrained":
        path = OmegaConf.select(cfg, "generator.model.pretrained_path", throw_on_missing=False)
        require(path not in (None, "???"), "generator.model.pretrained_path",
                "must point at a local Stable Diffusion folder (nothing is downloaded)")
        require(Path(path).is_dir(), "generator.model.pretrained_path", f"folder not found: {path}")
    labels = OmegaConf.select(cfg, "generator.data.expression_labels", default=True)
    require(isinstance(labels, bool), "generator.data.expression_labels", f"must be true or false, got {labels!r}")
    require(model.image_size is not None and 8 <= int(model.image_size) <= 2048, "generator.model.image_size",
            f"must be in [8, 2048], got {model.image_size}")
    require(int(gen.batch_size) >= 1, "generator.batch_size", f"must be >= 1, got {gen.batch_size}")
    unlabelled_count(cfg)
    require(int(gen.max_steps) >= 1 or int(gen.max_epochs) >= 1, "generator.max_steps",
            f"set generator.max_steps or generator.max_epochs >= 1 (got {gen.max_steps}, {gen.max_epochs})")
    require(int(gen.val_every_n_epochs) >= 1, "generator.val_every_n_epochs",
            f"must be >= 1, got {gen.val_every_n_epochs}")
    require(int(gen.checkpoint_every_n_steps) >= 1, "generator.checkpoint_every_n_steps",
            f"must be >= 1, got {gen.checkpoint_every_n_steps}")
    require(int(gen.grids.every_n_steps) >= 0, "generator.grids.every_n_steps",
            f"must be >= 0, got {gen.grids.every_n_steps}")
    require(int(gen.grids.seeds) >= 1, "generator.grids.seeds", f"must be >= 1, got {gen.grids.seeds}")
    # checked whether or not the evaluation is on: a typo must not wait for the run that turns it on
    require(int(gen.eval.per_class) >= 1, "generator.eval.per_class", f"must be >= 1, got {gen.eval.per_class}")
    span = list(gen.eval.intensity_range)
    require(len(span) == 2 and 0 < span[0] <= span[1], "generator.eval.intensity_range",
            f"must be [lo, hi] with 0 < lo <= hi, got {span}")
    if gen.eval.enabled:
        eval_judge(cfg)
    guidance = semantic_guidance(gen.guidance)
    require(not (guidance.au_scale > 0 and not model.au_adapter), "generator.guidance.au_scale",
            "AU guidance needs the AU adapter (generator.model.au_adapter=true)")
    if guidance.enabled:
        require(Path(str(gen.guidance.classifier)).is_file(), "generator.guidance.classifier",
                f"guidance classifier checkpoint not found: {gen.guidance.classifier} (run stage=teacher first)")
    if training_schedule(cfg).two_phase:
        require(bool(model.au_adapter), "generator.training.schedule",
                "two_phase trains the AU adapter alone in phase 2; generator.model.au_adapter=false has none "
                "(use one_phase)")
        # a config error rather than a skipped phase: the run would end as a phase-1 run under a two_phase name
        require(OmegaConf.select(cfg, "data.au_source", default=None) != "none", "generator.training.schedule",
                "two_phase trains the AU adapter on the faces' AUs in phase 2; data.au_source=none has none "
                "(use one_phase)")


def training_schedule(cfg: DictConfig):
    """The generator's PhaseSchedule (``generator.training``; absent in older configs: one phase)."""
    from lightning_modules.generator.phases import resolve_schedule

    training = OmegaConf.select(cfg, "generator.training", default=None)
    return resolve_schedule(OmegaConf.to_container(training, resolve=True) if training is not None else None,
                            int(cfg.generator.max_steps), int(cfg.generator.max_epochs),
                            float(cfg.generator.model.lr))


def eval_judge(cfg: DictConfig):
    """The teacher that scores the evaluation (``generator.eval.judge``); a named checkpoint must exist."""
    from lightning_modules.generator.evaluation import resolve_judge

    try:
        judge = resolve_judge(cfg.generator.eval.judge, cfg.paths.run_dir, cfg.generator.guidance.classifier)
    except ValueError as err:
        raise ConfigError("generator.eval.judge", str(err)) from err
    require(judge.mode != "path" or judge.checkpoint.is_file(), "generator.eval.judge",
            f"no teacher checkpoint at {judge.checkpoint} (separate | guide | a checkpoint path)")
    return judge


def unlabelled_count(cfg: DictConfig) -> Optional[int]:
    """How many train faces outside the labelled ``data.train_limit`` subset the generator learns from (label -1,
    generic caption): 0, n, or None for all of them; from ``generator.data.train_limit`` (absent: the subset)."""
    labelled = OmegaConf.select(cfg, "data.train_limit", default=None)
    total = OmegaConf.select(cfg, "generator.data.train_limit", default=labelled)
    key = "generator.data.train_limit"
    require(total is None or (isinstance(total, int) and not isinstance(total, bool) and total >= 1), key,
            f"must be a number of faces >= 1 or null (every train face), got {total!r}")
    if labelled is None:
        require(total is None, key, f"is {total}, fewer faces than the labelled set (data.train_limit=null: every "
                                    "train face is labelled); leave it null")
        return 0
    if total is None:
        return None
    require(total >= labelled, key, f"is {total}, smaller than data.train_limit={labelled}: the generator sees "
                                    "the labelled subset and possibly more, never fewer faces")
    return total - labelled


def build_generator_datamodule(cfg: DictConfig) -> L.LightningDataModule:
    """The real data at the generator's size and augmentation, plus the unlabelled faces it may learn from."""
    gen = cfg.generator
    try:
        return hydra.utils.instantiate(cfg.data, _target_="datamodules.unlabelled.GeneratorFERDataModule",
                                       unlabelled=unlabelled_count(cfg), image_size=int(gen.model.image_size),
                                       expression_labels=OmegaConf.select(gen, "data.expression_labels", default=True),
                                       batch_size=int(gen.batch_size),
                                       augment=OmegaConf.to_container(gen.augment, resolve=True), _convert_="all")
    except hydra.errors.InstantiationException as err:
        raise ConfigError("data", str(err.__cause__ or err)) from err


def build_generator(cfg: DictConfig, datamodule) -> L.LightningModule:
    try:
        return hydra.utils.instantiate(cfg.generator.model, num_classes=datamodule.num_classes,
                                       class_names=datamodule.class_names,
                                       training_schedule=training_schedule(cfg).as_dict(), _convert_="all")
    except hydra.errors.InstantiationException as err:
        raise ConfigError("generator.model", str(err.__cause__ or err)) from err


def resume_hash(cfg: DictConfig) -> str:
    trimmed = OmegaConf.masked_copy(cfg, ["data", "generator", "trainer", "seed"])
    for key in RESUME_IGNORED:
        trimmed.generator.pop(key, None)
    schedule = training_schedule(cfg)
    if schedule.two_phase:  # its phases follow max_steps: a new max_steps moves the boundary, the run starts over
        trimmed.generator.training = schedule.as_dict()
    return runtime.config_hash(trimmed, ["data", "generator", "trainer", "seed"])


def run_generator_stage(cfg: DictConfig) -> dict:
    """Config, data, model and Trainer are built before anything of an earlier run is touched (a rerun that fails
    on any of them keeps the finished generator); a killed or extended run with the same trajectory settings
    resumes from ``checkpoints/last.ckpt`` (``generator.resume``)."""
    from lightning_modules.generator.callbacks import GeneratorSampleGrids, grid_conditions

    check_generator_config(cfg)
    gen = cfg.generator
    out_dir = runtime.stage_dir(cfg, "generator")
    digest = runtime.config_hash(cfg, HASH_KEYS)
    datamodule = build_generator_datamodule(cfg)
    L.seed_everything(int(cfg.seed), workers=True)
    model = build_generator(cfg, datamodule)
    datamodule.setup("fit")
    faces = training_data(cfg, datamodule)
    schedule = training_schedule(cfg)
    faces["training_schedule"] = schedule.as_dict()  # saved with the pipeline and in metrics
    phase_args = {}
    if schedule.two_phase and OmegaConf.select(cfg, "trainer.strategy", default=None) == "ddp":
        # the phases switch requires_grad mid-run: DDP must not wait for the gradients of the frozen part
        phase_args["strategy"] = "ddp_find_unused_parameters_true"
        log.info("generator: two_phase under DDP uses strategy=ddp_find_unused_parameters_true")
    grids = GeneratorSampleGrids(grid_conditions(datamodule.grid_records, datamodule.num_classes,
                                                 len(datamodule.vocab), model.captioner),
                                 out_dir / "grids", int(gen.grids.every_n_steps), int(gen.grids.seeds),
                                 list(gen.grids.au_levels))
    trainer, loggers = trainer_setup.build_trainer(
        cfg, out_dir, "generator", int(gen.max_epochs), monitor=None, extra_callbacks=[grids],
        checkpoint_every_n_steps=int(gen.checkpoint_every_n_steps), max_steps=int(gen.max_steps),
        check_val_every_n_epoch=int(gen.val_every_n_epochs), **phase_args)
    resume, why = runtime.resume_checkpoint(out_dir, resume_hash(cfg), enabled=bool(gen.resume))
    # a resumed run makes a new pipeline too: the old one must not outlive its deleted metrics
    runtime.clear_stage(out_dir, ["pipeline", "eval_set"] + (["grids"] if resume is None else []),
                        keep_checkpoints=resume is not None)
    runtime.start_resumable(out_dir, resume_hash(cfg))
    runtime.save_resolved_config(cfg, out_dir)
    runtime.log_start("generator", resume, why)
    start = time.time()
    metrics: dict = {}
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
        fit_s = time.time() - start
        final_val = trainer.validate(model, datamodule=datamodule, verbose=False)  # all ranks: DDP syncs it
        if trainer.is_global_zero:
            model.save_generator(out_dir / "pipeline")
            runtime.write_json_atomic(out_dir / "pipeline" / TRAINING_DATA, faces)
            metrics = {"fit_seconds": fit_s, "steps": trainer.global_step, "resumed_from": str(resume or ""),
                       "pipeline": str(out_dir / "pipeline"), "world_size": trainer.world_size,
                       "val_loss": final_val[0].get("val/loss") if final_val else None,
                       "train_loss": _logged(trainer, "train/loss"),
                       "grids": {k: str(v) for k, v in grids.last_paths.items()},
                       "data": datamodule.summary(), "training_data": faces}
            if gen.eval.enabled:
                metrics["eval"] = evaluate_with_teacher(cfg, model, datamodule, out_dir, loggers)
    finally:
        trainer_setup.finish_loggers(loggers)
    runtime.record_stage(trainer, out_dir, metrics, digest)
    return metrics


def training_data(cfg: DictConfig, datamodule) -> dict:
    """What the generator learns from, logged once: faces (labelled / unlabelled), colour mode, the faces' native
    size against the generator's and the students' sizes. Saved with the pipeline (``TRAINING_DATA``) so synthesis
    stores its faces in the same colour mode."""
    from datamodules.real import native_size

    native = list(native_size(datamodule) or ("?", "?"))
    info = {"format": datamodule.format, "color_mode": datamodule.color_mode, "native_size": native,
            "generator_image_size": int(cfg.generator.model.image_size), "data_image_size": int(cfg.data.image_size),
            "labelled_faces": datamodule.num_labelled, "unlabelled_faces": datamodule.num_unlabelled}
    log.info("generator: %d labelled + %d unlabelled train faces (label -1, generic caption; teachers and students "
             "see only the %d labelled)", info["labelled_faces"], info["unlabelled_faces"], info["labelled_faces"])
    log.info("generator: %s faces of native size %sx%s, trained at %dx%d (generator.model.image_size); students "
             "read faces at %dx%d (data.image_size)", info["color_mode"], *native,
             *(2 * [info["generator_image_size"]]), *(2 * [info["data_image_size"]]))
    return info


def read_training_data(pipeline_dir) -> dict:
    """The ``TRAINING_DATA`` record of a saved generator ({} for one saved before it existed)."""
    path = Path(pipeline_dir) / TRAINING_DATA
    return json.loads(path.read_text()) if path.is_file() else {}


class ColorModeSampler:
    """The generator as its faces reach students: ``sample`` returns them in the training data's colour mode
    (gray: luma in all channels), so the evaluation judges what synthesis stores."""

    def __init__(self, model, color_mode: str):
        self._model, self._gray = model, color_mode == "gray"

    def sample(self, *args, **kwargs):
        from datamodules.transforms import gray_tensor

        images = self._model.sample(*args, **kwargs)
        return gray_tensor(images) if self._gray else images

    def __getattr__(self, name):
        return getattr(self._model, name)


def _logged(trainer, key: str):
    value = trainer.callback_metrics.get(key)
    return float(value) if value is not None else None


def evaluate_with_teacher(cfg: DictConfig, model, datamodule, out_dir: Path, loggers) -> dict:
    """FER-Acc and AU Pearson r of generated faces (toy: prototype conditions; else: test-split conditions)."""
    from datamodules.labels import EXPRESSIONS
    from lightning_modules.generator.evaluation import (evaluate_generator, judge_record, records_eval_conditions,
                                                        toy_eval_conditions)
    from lightning_modules.generator.grids import save_labelled_grid
    from lightning_modules.paradigms.teacher import load_teacher

    ev = cfg.generator.eval
    judge = eval_judge(cfg)
    if not judge.checkpoint.is_file():
        how = {"separate": "stage=pipeline trains it; or stage=teacher teacher.name=judge teacher.seed=<another seed>",
               "guide": "run stage=teacher first"}.get(judge.mode, "")
        warnings.warn(f"generator evaluation skipped: no teacher checkpoint to judge with at {judge.checkpoint} "
                      f"(generator.eval.judge={judge.mode}; {how})")
        return {"skipped": f"no judge at {judge.checkpoint}"}
    teacher = load_teacher(judge.checkpoint, map_location=model.device)
    if teacher.hparams.num_aus != len(model.vocab):
        raise ConfigError("generator.eval.judge", f"the judge predicts {teacher.hparams.num_aus} AUs, the generator "
                                                  f"uses {len(model.vocab)} (data.aus must match)")
    per_class, seed = int(ev.per_class), int(ev.seed)
    if datamodule.format == "toy":
        conds = toy_eval_conditions(datamodule.toy_config, per_class, datamodule.num_classes, datamodule.vocab.aus,
                                    tuple(ev.intensity_range), seed)
    else:
        conds = records_eval_conditions(datamodule.records["test"], per_class, datamodule.num_classes, seed,
                                        num_aus=len(datamodule.vocab), captioner=model.captioner)
    guidance = semantic_guidance(cfg.generator.guidance)
    guide = (load_guide(str(cfg.generator.guidance.classifier), int(cfg.data.image_size), model.device)
             if guidance.enabled else None)
    with torch.no_grad():
        sampler = ColorModeSampler(model, datamodule.color_mode)  # judged as students will get the faces
        metrics, images = evaluate_generator(sampler, teacher, conds, int(cfg.data.image_size),
                                             au_active_threshold=float(ev.au_active_threshold),
                                             guidance=guidance, guide=guide,
                                             compare_unguided=bool(ev.compare_unguided))
    metrics.update(judge_record(judge, guidance.enabled))
    if ev.save_samples:
        metrics["eval_set"] = str(save_eval_set(out_dir / "eval_set", images, conds, cfg, datamodule.color_mode))
    # a real test set may hold fewer than per_class faces of a rare class (or none): the grid takes as many columns
    # as the rarest drawn class fills
    names = sorted({int(x) for x in conds.labels.tolist()})
    cols = min(8, *[int((conds.labels == c).sum()) for c in names])
    pick = [i for c in names for i in (conds.labels == c).nonzero().flatten().tolist()[:cols]]
    save_labelled_grid(images[pick], [EXPRESSIONS[c] for c in names], out_dir / "grids" / "eval_samples.png")
    for lg in loggers:
        if hasattr(lg, "log_metrics"):
            lg.log_metrics({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    return metrics


def save_eval_set(directory: Path, images, conds, cfg: DictConfig, color_mode: str = "rgb") -> Path:
    """The evaluated faces with their conditions as a synthetic set (input for stage=relabel)."""
    from datasets import Dataset

    from datamodules.synthetic import to_pil, write_dataset

    guidance = json.dumps(OmegaConf.to_container(cfg.generator.guidance, resolve=True), sort_keys=True)
    rows = {"image": to_pil(images, color_mode), "sample_id": [f"eval-{i:06d}" for i in range(len(conds))],
            "seed": list(conds.seeds), "target_label": conds.labels.tolist(), "target_aus": conds.aus.tolist(),
            "au_mask": conds.au_mask.tolist(), "caption": list(conds.captions), "guidance": [guidance] * len(conds)}
    return write_dataset(directory, Dataset.from_dict(rows), meta={"source": "generator eval", "color_mode": color_mode,
                                                                  "experiment": str(cfg.experiment_name)})

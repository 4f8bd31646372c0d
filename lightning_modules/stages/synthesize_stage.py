"""`stage=synthesize`: ``trainer.predict`` of the trained generator over a condition plan (datamodules/plans.py),
with semantic guidance and layout initialisation (``synthesis.layout_init``: each face starts from the DDIM inversion
of a real train face) as configured, streamed into a sharded synthetic set (HF datasets + manifest).

Resumable and deterministic: chunks already in the manifest are skipped, a shard damaged by a kill is redone, and
every face has its own seed and a fixed batch, so the set does not depend on how many processes made it. The
set's config fingerprint lives in its manifest: another config in the same folder is an error unless
``synthesis.overwrite=true``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lightning_modules.run import runtime, trainer_setup
from lightning_modules.run.runtime import ConfigError, require
from lightning_modules.synthesis.output_set import finalize, prepare_output, set_damage

# Settings that do not change a single byte of the set: they may differ between a run and its resume.
NOT_FINGERPRINTED = ("overwrite", "num_workers", "progress")
log = logging.getLogger(__name__)


def plan_config(cfg: DictConfig):
    from datamodules.plans import PlanConfig

    values = OmegaConf.to_container(cfg.synthesis.plan, resolve=True)
    try:
        return PlanConfig(**{k: tuple(v) if isinstance(v, list) and k != "class_distribution" else v
                             for k, v in values.items()})
    except (TypeError, ValueError) as err:
        raise ConfigError("synthesis.plan", str(err)) from err


def plan_captioner(cfg: DictConfig, plan=None):
    """The generator's caption builder, from ``captions.json`` in its pipeline folder: the captions its training
    faces without a caption got. ``plan`` (its PlanConfig) only decides whether to warn that a generator trained
    on the captions of ``data.captions`` is asked with the builder's instead."""
    from datamodules.caption_builder import load_settings
    from datamodules.labels import parse_au_list

    try:
        builder = load_settings(Path(str(cfg.synthesis.generator_path)), parse_au_list(cfg.data.aus).aus,
                                "synthesis.generator_path")
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError("synthesis.generator_path", str(err)) from err
    if plan is not None and plan.captions == "template" and plan.templates is None and cfg.data.get("captions"):
        log.warning("synthesize: the generator trained on the captions of data.captions (%s), but plan captions come "
                    "from its caption builder (family %s), which only captioned faces without one; set "
                    "synthesis.plan.templates to imitate those captions, or synthesis.plan.captions=jsonl",
                    cfg.data.captions, builder.family)
    return builder


def layout_config(cfg: DictConfig):
    """``synthesis.layout_init`` checked (absent = off); a bad value is a ConfigError naming its key."""
    from datamodules.layout_sources import LayoutConfig, LayoutConfigError

    values = OmegaConf.to_container(cfg.synthesis.get("layout_init") or OmegaConf.create({}), resolve=True)
    try:
        return LayoutConfig(**values)
    except LayoutConfigError as err:
        raise ConfigError(f"synthesis.layout_init.{err.field}", str(err)) from err
    except TypeError as err:  # an unknown key
        raise ConfigError("synthesis.layout_init", str(err)) from err


def needs_real_data(plan, layout=None) -> bool:
    return (plan.scale is not None or plan.au_source == "real_stats" or (layout is not None and layout.enabled)
            or (isinstance(plan.class_distribution, str) and plan.class_distribution in ("real", "fill_rare")))


def check_synthesis_config(cfg: DictConfig) -> None:
    syn = cfg.synthesis
    path = Path(str(syn.generator_path))
    require((path / "model_index.json").is_file(), "synthesis.generator_path",
            f"no trained generator pipeline at {path} (run stage=generator first)")
    require(int(syn.chunk_size) >= 1, "synthesis.chunk_size", f"must be >= 1, got {syn.chunk_size}")
    require(int(syn.batch_size) >= 1, "synthesis.batch_size", f"must be >= 1, got {syn.batch_size}")
    require(int(syn.num_workers) >= 0, "synthesis.num_workers", f"must be >= 0, got {syn.num_workers}")
    check_sample_settings(cfg)
    plan_config(cfg)
    layout_config(cfg)
    storage_settings(cfg)
    guidance = synthesis_guidance(cfg)
    if guidance.enabled:
        require(Path(str(syn.guidance.classifier)).is_file(), "synthesis.guidance.classifier",
                f"guidance classifier checkpoint not found: {syn.guidance.classifier} (run stage=teacher first)")


def storage_settings(cfg: DictConfig):
    """``synthesis.storage`` checked (absent = PNG at the generator's size); a bad value names its key."""
    from datamodules.face_storage import StorageConfigError, storage_config

    values = OmegaConf.select(cfg, "synthesis.storage")
    values = OmegaConf.to_container(values, resolve=True) if values is not None else None
    if values is not None and not isinstance(values, dict):
        raise ConfigError("synthesis.storage", f"must be a mapping (image_size, format, quality), got {values!r}")
    try:
        return storage_config(values)
    except StorageConfigError as err:
        raise ConfigError(f"synthesis.storage.{err.field}", str(err)) from err


def synthesis_guidance(cfg: DictConfig):
    from lightning_modules.guidance.settings import semantic_guidance

    return semantic_guidance(cfg.synthesis.guidance, "synthesis.guidance")


def real_train(cfg: DictConfig, layout=None):
    """The real datamodule, set up: its ``records["train"]`` is the labelled train subset (``data.train_limit``).
    With layout initialisation on, an unreadable or empty real train set names that switch too."""
    from datamodules.errors import DataError
    from lightning_modules.stages.classifier_stage import build_datamodule

    datamodule = build_datamodule(cfg)
    try:
        datamodule.setup("fit")
    except DataError as err:
        if layout is None or not layout.enabled:
            raise
        raise type(err)(f"synthesis.layout_init.enabled=true draws its source faces from the real train set "
                        f"(data.*), which cannot be read: {err}") from err
    return datamodule


def real_stats(cfg: DictConfig, datamodule=None):
    """Class counts and per-class AU statistics of the real train split (for scale / real / fill_rare plans)."""
    from datamodules.plans import RealStats

    datamodule = datamodule if datamodule is not None else real_train(cfg)
    train = datamodule.records["train"]
    num_aus = len(datamodule.vocab)
    labels = np.array([r.label for r in train])
    aus = np.stack([r.aus if r.aus is not None else np.zeros(num_aus, np.float32) for r in train])
    mask = np.stack([r.au_mask if r.au_mask is not None else np.full(num_aus, r.aus is not None) for r in train])
    return RealStats.from_arrays(labels, aus, mask, datamodule.num_classes)


def synthesis_fingerprint(cfg: DictConfig, plan, plan_size: int, captioner) -> str:
    """``captioner``: the plan's caption builder; its settings are the captions, whatever set them."""
    syn = runtime.location_free(OmegaConf.to_container(cfg.synthesis, resolve=True), runtime.run_dir_of(cfg))
    for key in NOT_FINGERPRINTED:
        syn.pop(key, None)
    layout = layout_config(cfg)
    if not layout.enabled:  # settings of a switched-off step change no byte (and sets made before it keep theirs)
        syn.pop("layout_init", None)
    if storage_settings(cfg).is_default:  # PNG at the generator's size: the bytes of sets made before the option
        syn.pop("storage", None)
    parts = {"synthesis": syn, "plan_size": plan_size,
             "captions": {**captioner.settings(), "name_aus": captioner.name_aus},
             "generator": runtime.path_fingerprint(Path(str(cfg.synthesis.generator_path)))}
    if synthesis_guidance(cfg).enabled:
        parts["guide"] = runtime.path_fingerprint(Path(str(cfg.synthesis.guidance.classifier)))
    if needs_real_data(plan, layout):  # layout sources are real faces too
        parts["data"] = OmegaConf.to_container(cfg.data, resolve=True)
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def checked_plan(cfg: DictConfig):
    """The checked config's condition plan, its size and the set's fingerprint."""
    from datamodules.labels import num_classes as protocol_classes
    from datamodules.labels import parse_au_list
    from datamodules.plans import build_plan, plan_size

    check_synthesis_config(cfg)
    plan_cfg, layout = plan_config(cfg), layout_config(cfg)
    vocab = parse_au_list(cfg.data.aus)
    captioner = plan_captioner(cfg, plan_cfg)
    datamodule = real_train(cfg, layout) if needs_real_data(plan_cfg, layout) else None
    real = real_stats(cfg, datamodule) if needs_real_data(plan_cfg) else None
    try:
        size = plan_size(plan_cfg, real)
        plan = build_plan(plan_cfg, protocol_classes(int(cfg.data.protocol)), vocab, real, captioner=captioner)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError("synthesis.plan", str(err)) from err
    if layout.enabled:
        attach_layout_sources(plan, layout, datamodule)
    return plan, size, synthesis_fingerprint(cfg, plan_cfg, size, plan.captioner)


def attach_layout_sources(plan, layout, datamodule) -> None:
    """Give every plan row its source face. Sources come from the labelled train subset (``data.train_limit``)
    only, for ``any`` as for ``per_class`` (which needs the labels): in a low-data run the faces outside the subset
    are withheld from teachers and students, so a synthetic set must not bring their layouts in either, and
    switching ``source`` then changes the pairing, never the pool. Val and test faces are never sources."""
    from datamodules.layout_sources import LayoutConfigError, LayoutSources

    try:
        plan.attach_layout(LayoutSources(layout, plan.labels, datamodule.records["train"]))
    except LayoutConfigError as err:
        raise ConfigError(f"synthesis.layout_init.{err.field}", str(err)) from err


def run_synthesize_stage(cfg: DictConfig, checked: Optional[tuple] = None) -> dict:
    """``checked``: this config's ``checked_plan`` when the caller already has it (the pipeline keys on its
    fingerprint), so the plan (and the real-data statistics it may read) is built once."""
    from datamodules.labels import parse_au_list
    from datamodules.synthesis import SynthesisDataModule

    plan, size, fingerprint = checked if checked is not None else checked_plan(cfg)
    syn = cfg.synthesis
    out_dir = runtime.stage_dir(cfg, "synthesize")
    dataset_dir = out_dir / "dataset"
    vocab = parse_au_list(cfg.data.aus)
    force = bool(cfg.get("force", False))
    ours = runtime.is_done(out_dir, fingerprint)
    if not force and ours and (out_dir / "metrics.json").is_file():
        damage = set_damage(dataset_dir)
        if damage is None:
            log.info("synthesize: %s already holds all %d samples of this config", dataset_dir, size)
            return {**json.loads((out_dir / "metrics.json").read_text()), "skipped": True}
        log.warning("synthesize: the finished set in %s is damaged, making the damaged part again: %s",
                    dataset_dir, damage)

    # Everything that can fail on a bad config is built before an earlier set or its metrics are touched.
    pipe, guidance, guide = load_synthesizer(cfg, vocab)
    layout = plan.layout
    module = _synthesis_module(pipe, cfg, guidance, guide, None if layout is None else layout.config.strength)
    if layout is not None:  # sources are inverted by this generator: its resolution, the colours it learned
        layout.at_resolution(int(pipe.config.image_size), module.color_mode)
    datamodule = SynthesisDataModule(plan, dataset_dir, int(syn.chunk_size), int(syn.batch_size),
                                     int(syn.num_workers))
    writer = _writer(cfg, dataset_dir, out_dir, guidance, len(vocab), size, layout)
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args.pop("max_steps", None)
    trainer_args.update(use_distributed_sampler=False, enable_progress_bar=False,
                        inference_mode=not guidance.enabled)  # SG differentiates through the sampler
    loggers = trainer_setup.build_loggers(cfg, out_dir, "synthesize")
    trainer = trainer_setup.make_trainer(default_root_dir=str(out_dir), logger=loggers or False, callbacks=[writer],
                                   **trainer_args)

    finished, dropped = 0, []
    if runtime.is_rank_zero():
        if force:  # force=true: make the set again from scratch
            shutil.rmtree(dataset_dir, ignore_errors=True)
        finished, dropped = prepare_output(dataset_dir, fingerprint, bool(syn.overwrite), size, int(syn.chunk_size),
                                           ours=ours and not force)
        runtime.clear_stage(out_dir, ["stats"])
        runtime.save_resolved_config(cfg, out_dir)
        if finished:
            log.info("synthesize: resuming, %d of %d samples already written%s", finished, size,
                     f"; redoing damaged shards {dropped}" if dropped else "")
    writer.total_images = size - finished
    # whole-batch items (batch_size=None): the writer takes its indices from the batch, not from Lightning
    warnings.filterwarnings("ignore", "Couldn't infer the batch indices", UserWarning)
    metrics: dict = {}
    start = time.time()
    try:
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            metrics = finalize(dataset_dir, out_dir, plan, size, time.time() - start, trainer.world_size,
                               card_settings(cfg))
            for lg in loggers:
                lg.log_metrics({f"synthesize/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    finally:
        trainer_setup.finish_loggers(loggers)
    runtime.record_stage(trainer, out_dir, metrics, fingerprint)
    return metrics


def load_synthesizer(cfg: DictConfig, vocab):
    """The trained pipeline from ``synthesis.generator_path`` + the guidance settings and guide."""
    from lightning_modules.generator.pipeline import SynFERPipeline
    from lightning_modules.guidance.settings import load_guide

    syn = cfg.synthesis
    pipe = SynFERPipeline.from_pretrained(str(syn.generator_path))
    if pipe.has_au_adapter and list(pipe.au_names) != list(vocab.aus):
        raise ConfigError("data.aus", f"the generator was trained on AUs {pipe.au_names}, the config lists "
                                      f"{list(vocab.aus)}")
    guidance = synthesis_guidance(cfg)
    if guidance.au_scale > 0 and not pipe.has_au_adapter:
        raise ConfigError("synthesis.guidance.au_scale", "AU guidance needs a generator with the AU adapter")
    guide = load_guide(str(syn.guidance.classifier), int(cfg.data.image_size)) if guidance.enabled else None
    return pipe, guidance, guide


def check_sample_settings(cfg: DictConfig) -> None:
    from lightning_modules.generator.components import SAMPLERS

    sample = OmegaConf.to_container(cfg.synthesis.sample, resolve=True)
    require(sample.get("sampler", "ddim") in SAMPLERS, "synthesis.sample.sampler",
            f"must be one of {SAMPLERS}, got {sample.get('sampler')!r}")
    require(int(sample.get("steps", 25)) >= 1, "synthesis.sample.steps", f"must be >= 1, got {sample.get('steps')}")


def _synthesis_module(pipe, cfg: DictConfig, guidance, guide, layout_strength=None):
    from lightning_modules.synthesis.writer import SynthesisModule

    check_sample_settings(cfg)
    return SynthesisModule(pipe, OmegaConf.to_container(cfg.synthesis.sample, resolve=True), guidance, guide,
                           layout_strength)


def _writer(cfg: DictConfig, dataset_dir: Path, out_dir: Path, guidance, num_aus: int, remaining: int, layout=None):
    """Each row's ``guidance`` cell: the sampling, guidance and (when on) layout settings it was made with."""
    from lightning_modules.synthesis.writer import ShardWriter

    settings = {"guidance": OmegaConf.to_container(cfg.synthesis.guidance, resolve=True) if guidance.enabled
                else None, "sample": OmegaConf.to_container(cfg.synthesis.sample, resolve=True)}
    if layout is not None:
        settings["layout_init"] = layout.config.settings()
    return ShardWriter(dataset_dir, out_dir / "stats", json.dumps(settings, sort_keys=True), num_aus, remaining,
                       progress=bool(cfg.synthesis.progress), layout=layout is not None, storage=storage_settings(cfg))


def card_settings(cfg: DictConfig) -> dict:
    """What the set's README.md names besides its manifest: generator, sampling, guidance, class names."""
    from datamodules.labels import class_names

    return {"generator": str(cfg.synthesis.generator_path),
            "sample": OmegaConf.to_container(cfg.synthesis.sample, resolve=True),
            "guidance": OmegaConf.to_container(cfg.synthesis.guidance, resolve=True)
            if synthesis_guidance(cfg).enabled else None,
            "class_names": list(class_names(int(cfg.data.protocol)))}

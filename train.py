"""Single entry point: `python train.py stage=<name> experiment=<name> [overrides]`.

Stages: teacher, generator, synthesize, synth_eval, relabel, student, pipeline, report, annotate_aus, pseudolabel,
ssl, fewshot, clip.

The run returns the stage's monitored metric as a float (``MONITORED``), so a Hydra sweeper (e.g. Optuna) can
optimise it; stages without one return None."""
from __future__ import annotations

import os
import sys

# Offline by default: nothing is downloaded at run time (users opt in to online wandb via logger.wandb.mode).
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")

import json
import logging
from pathlib import Path
from typing import Optional

import hydra
from omegaconf import DictConfig

from lightning_modules.run import distributed, preflight  # distributed: the sweep_id resolver of hydra.sweep.dir
from lightning_modules.run.runtime import ConfigError

log = logging.getLogger("train")


def _classifier(role: str):
    def run(cfg: DictConfig):
        from lightning_modules.stages.classifier_stage import run_classifier_stage

        return run_classifier_stage(cfg, role)

    return run


def _generator(cfg: DictConfig):
    from lightning_modules.stages.generator_stage import run_generator_stage

    return run_generator_stage(cfg)


def _synthesize(cfg: DictConfig):
    from lightning_modules.stages.synthesize_stage import run_synthesize_stage

    return run_synthesize_stage(cfg)


def _relabel(cfg: DictConfig):
    from lightning_modules.stages.relabel_stage import run_relabel_stage

    return run_relabel_stage(cfg)


def _pseudolabel(cfg: DictConfig):
    from lightning_modules.stages.pseudolabel_stage import run_pseudolabel_stage

    return run_pseudolabel_stage(cfg)


def _annotate(cfg: DictConfig):
    from lightning_modules.stages.annotate_stage import run_annotate_stage

    return run_annotate_stage(cfg)


def _synth_eval(cfg: DictConfig):
    from lightning_modules.stages.synth_eval_stage import run_synth_eval_stage

    return run_synth_eval_stage(cfg)


def _fewshot(cfg: DictConfig):
    from lightning_modules.stages.fewshot_stage import run_fewshot_stage

    return run_fewshot_stage(cfg)


def _ssl(cfg: DictConfig):
    from lightning_modules.stages.ssl_stage import run_ssl_stage

    return run_ssl_stage(cfg)


def _clip(cfg: DictConfig):
    from lightning_modules.stages.clip_stage import run_clip_stage

    return run_clip_stage(cfg)


def _pipeline(cfg: DictConfig):
    from lightning_modules.stages.pipeline import run_pipeline

    return run_pipeline(cfg)


def _report(cfg: DictConfig):
    from lightning_modules.stages.report import run_report

    return run_report(cfg)


STAGES = {"teacher": _classifier("teacher"), "generator": _generator, "synthesize": _synthesize,
          "synth_eval": _synth_eval, "relabel": _relabel, "annotate_aus": _annotate,
          "pseudolabel": _pseudolabel, "ssl": _ssl, "fewshot": _fewshot, "clip": _clip,
          "student": _classifier("student"), "pipeline": _pipeline, "report": _report}


def run_stage(cfg: DictConfig):
    if cfg.stage not in STAGES:
        raise ConfigError("stage", f"unknown stage {cfg.stage!r}; choose one of {', '.join(STAGES)}")
    preflight.check_trainer(cfg)  # before the stage reads data or touches its outputs
    cfg = preflight.resolve_au_source(cfg)
    return STAGES[cfg.stage](cfg)


def run_reporting_errors(cfg: DictConfig):
    """User errors (ConfigError, DataError, an unset `???` key, also wrapped) -> one line on stderr, exit 2;
    anything else is a bug: full traceback, exit 1. Caught here: Hydra would print its own trimmed traceback."""
    try:
        return run_stage(cfg)
    except Exception as err:  # noqa: BLE001 - every exception is reported, by kind
        sys.exit(preflight.report(err))
    finally:
        _close_process_group()


def _folder(role: str):
    def name(cfg: DictConfig) -> str:
        from lightning_modules.stages.classifier_stage import output_name

        return output_name(cfg, role)

    return name


# stage -> (metrics.json key, its folder in the run, direction): what the run returns for a sweeper to optimise.
# The pipeline returns its monitored student's best_val_acc (``pipeline.monitor``), maximise.
MONITORED = {
    "teacher": ("best_val_acc", _folder("teacher"), "maximize"),
    "student": ("best_val_acc", _folder("student"), "maximize"),
    "generator": ("val_loss", lambda cfg: "generator", "minimize"),
    "synth_eval": ("fer_acc", lambda cfg: "synth_eval", "maximize"),
    "ssl": ("probe/pretrained/val/acc", lambda cfg: str(cfg.ssl.name), "maximize"),  # the linear probe on real val
    "clip": ("zeroshot/after/val/acc", lambda cfg: str(cfg.clip.name), "maximize"),
}


def monitored_metric(cfg: DictConfig, result: Optional[dict]) -> Optional[float]:
    """The stage's monitored value (``MONITORED``) from what it returned, or from its metrics.json when it skipped
    a finished run; None for stages without one and on ranks other than 0 (they return no metrics)."""
    from lightning_modules.run import runtime

    if not runtime.is_rank_zero():
        return None
    if cfg.stage == "pipeline":
        from lightning_modules.stages.pipeline import monitored_value

        return monitored_value(cfg)
    if cfg.stage not in MONITORED:
        return None
    key, folder, direction = MONITORED[cfg.stage]
    result = runtime.flatten("", result or {}, {})  # nested like metrics.json's keys ("probe/pretrained/val/acc")
    if key not in result and result.get("skipped"):
        path = Path(cfg.paths.run_dir) / folder(cfg) / "metrics.json"
        result = json.loads(path.read_text()) if path.is_file() else {}
    value = result.get(key)
    if value is None:
        return None
    log.info("%s: returning %s = %.6g (a sweeper should %s it)", cfg.stage, key, float(value), direction)
    return float(value)


@hydra.main(version_base="1.3", config_path="experiments", config_name="config")
def main(cfg: DictConfig) -> Optional[float]:
    distributed.log_on_rank_zero_only()  # after Hydra set up logging: one job log, not one per rank
    with distributed.sweep_job():  # a multirun job: its DDP children run this job, not a sweep of their own
        result = run_reporting_errors(cfg)
    return monitored_metric(cfg, result)


def _close_process_group() -> None:
    """Lightning leaves the DDP process group open; a gloo group alive at interpreter exit can abort the process
    ("terminate called without an active exception") after all outputs were written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.argv = distributed.child_argv(sys.argv)  # another rank of a multirun job: that one job, not the sweep
    main()

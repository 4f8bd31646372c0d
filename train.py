"""Single entry point: `python train.py stage=<name> experiment=<name> [overrides]`.

Stages: teacher, generator, synthesize, relabel, student, pipeline, report, annotate_aus, pseudolabel."""
from __future__ import annotations

import os
import sys

# Offline by default: nothing is downloaded at run time (users opt in to online wandb via logger.wandb.mode).
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")

import hydra
from omegaconf import DictConfig

from lightning_modules import preflight
from lightning_modules.runtime import ConfigError


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


def _pipeline(cfg: DictConfig):
    from lightning_modules.stages.pipeline import run_pipeline

    return run_pipeline(cfg)


def _report(cfg: DictConfig):
    from lightning_modules.stages.report import run_report

    return run_report(cfg)


STAGES = {"teacher": _classifier("teacher"), "generator": _generator, "synthesize": _synthesize,
          "synth_eval": _synth_eval, "relabel": _relabel, "annotate_aus": _annotate,
          "pseudolabel": _pseudolabel,
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


@hydra.main(version_base="1.3", config_path="experiments", config_name="config")
def main(cfg: DictConfig):
    return run_reporting_errors(cfg)


def _close_process_group() -> None:
    """Lightning leaves the DDP process group open; a gloo group alive at interpreter exit can abort the process
    ("terminate called without an active exception") after all outputs were written."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

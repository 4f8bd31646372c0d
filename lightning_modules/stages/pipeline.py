"""`stage=pipeline`: run the stages in order inside one run folder, skipping any whose outputs exist for the
same config hash (so a killed pipeline resumes where it stopped)."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from lightning_modules import runtime
from lightning_modules.stages import classifier_stage, generator_stage
from lightning_modules.stages.report import run_report

log = logging.getLogger(__name__)

# Grows with the later stages: synthesize -> relabel sit between generator and student.
PIPELINE_STAGES = ("teacher", "generator", "student")
# stage -> (runner, config subtrees whose change invalidates its outputs)
def _classifier(role: str):
    return (lambda cfg: classifier_stage.run_classifier_stage(cfg, role)), classifier_stage.HASH_KEYS[role]


RUNNERS = {"teacher": _classifier("teacher"), "student": _classifier("student"),
           "generator": (generator_stage.run_generator_stage, generator_stage.HASH_KEYS)}


def run_pipeline(cfg: DictConfig) -> dict:
    results = {}
    for stage in PIPELINE_STAGES:
        out_dir = Path(cfg.paths.run_dir) / stage
        run, hash_keys = RUNNERS[stage]
        digest = runtime.config_hash(cfg, hash_keys)
        if not cfg.force and runtime.is_done(out_dir, digest):
            log.info("pipeline: %s is done for config %s, skipping (force=true reruns it)", stage, digest)
            results[stage] = "skipped"
            continue
        run(cfg)
        results[stage] = "ran"
    report = run_report(cfg)
    print(f"\nReport: {Path(report['report_dir']) / 'results.md'}")
    return {**results, **report}

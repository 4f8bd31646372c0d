"""`stage=pipeline`: run the stages in order inside one run folder, skipping any whose outputs exist for the
same config hash (so a killed pipeline resumes where it stopped)."""
from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from lightning_modules import runtime
from lightning_modules.stages.classifier_stage import HASH_KEYS, run_classifier_stage
from lightning_modules.stages.report import run_report

log = logging.getLogger(__name__)

# Grows with the later stages: generator -> synthesize -> relabel sit between teacher and student.
PIPELINE_STAGES = ("teacher", "student")


def run_pipeline(cfg: DictConfig) -> dict:
    results = {}
    for stage in PIPELINE_STAGES:
        out_dir = Path(cfg.paths.run_dir) / stage
        digest = runtime.config_hash(cfg, HASH_KEYS[stage])
        if not cfg.force and runtime.is_done(out_dir, digest):
            log.info("pipeline: %s is done for config %s, skipping (force=true reruns it)", stage, digest)
            results[stage] = "skipped"
            continue
        run_classifier_stage(cfg, stage)
        results[stage] = "ran"
    report = run_report(cfg)
    print(f"\nReport: {Path(report['report_dir']) / 'results.md'}")
    return {**results, **report}

"""`stage=pipeline`: teacher -> generator -> synthesize -> FERAnno -> relabel -> students -> report inside one run
folder, handing artifacts over by path. A stage whose outputs exist for the same config and the same inputs is
skipped, so a killed pipeline resumes where it stopped (``force=true`` reruns everything).

``pipeline.stages`` picks the steps; ``pipeline.students`` names one student run per entry, each with its own
``mix`` settings (e.g. real only and real + synthetic), written to ``<run>/<name>/``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_modules import runtime
from lightning_modules.runtime import require
from lightning_modules.stages import classifier_stage, generator_stage, relabel_stage
from lightning_modules.stages.report import run_report

log = logging.getLogger(__name__)

STEPS = ("teacher", "generator", "synthesize", "feranno", "relabel", "students")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "experiments"


def feranno_config(cfg: DictConfig) -> DictConfig:
    """The run's config with ``teacher`` replaced by the FERAnno teacher config (``pipeline.feranno``)."""
    spec = cfg.pipeline.feranno
    path = CONFIG_DIR / "teacher" / f"{spec.config}.yaml"
    require(path.is_file(), "pipeline.feranno.config", f"no teacher config {path}")
    out = cfg.copy()
    with open_dict(out):
        out.teacher = OmegaConf.load(path)
        if spec.get("max_epochs") is not None:
            out.teacher.max_epochs = int(spec.max_epochs)
    return out


def student_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """One config per ``pipeline.students`` entry: ``student.name`` = the entry's name, ``mix`` merged over."""
    students = cfg.pipeline.students or {}
    require(len(students) > 0, "pipeline.students", "name at least one student run (e.g. student: {mode: real_only})")
    out = {}
    for name, mix in students.items():
        one = cfg.copy()
        with open_dict(one):
            one.student.name = str(name)
            one.mix = OmegaConf.merge(cfg.mix, mix or {})
        out[str(name)] = one
    return out


def _classifier(cfg: DictConfig, role: str) -> tuple[Path, str, Callable]:
    out = Path(cfg.paths.run_dir) / classifier_stage.output_name(cfg, role)
    return out, classifier_stage.done_digest(cfg, role), lambda: classifier_stage.run_classifier_stage(cfg, role)


def _plan(cfg: DictConfig) -> list[tuple[str, Callable[[], tuple[Path, Optional[str], Callable]]]]:
    """(label, step) in order; a step yields (output folder, digest, runner); digest None = the stage decides
    itself whether it has work (synthesis resumes chunk by chunk). Built lazily: a step's digest reads the outputs
    of the steps before it."""
    from lightning_modules.stages.synthesize_stage import run_synthesize_stage

    wanted = list(cfg.pipeline.stages)
    unknown = [s for s in wanted if s not in STEPS]
    require(not unknown, "pipeline.stages", f"unknown steps {unknown}; choose from {list(STEPS)}")
    run_dir = Path(cfg.paths.run_dir)
    relabel_on = bool(cfg.relabel.enabled)
    steps = []
    if "teacher" in wanted:
        steps.append(("teacher", lambda: _classifier(cfg, "teacher")))
    if "generator" in wanted:
        steps.append(("generator", lambda: (run_dir / "generator", runtime.config_hash(cfg, generator_stage.HASH_KEYS),
                                            lambda: generator_stage.run_generator_stage(cfg))))
    if "synthesize" in wanted:  # resumes or skips by itself (its fingerprint includes the generator's files)
        steps.append(("synthesize", lambda: (run_dir / "synthesize", None, lambda: run_synthesize_stage(cfg))))
    if "feranno" in wanted and relabel_on:
        steps.append(("feranno", lambda: _classifier(feranno_config(cfg), "teacher")))
    if "relabel" in wanted and relabel_on:
        steps.append(("relabel", lambda: (run_dir / "relabel", relabel_stage.done_digest(cfg),
                                          lambda: relabel_stage.run_relabel_stage(cfg))))
    if "students" in wanted:
        for name, one in student_configs(cfg).items():
            steps.append((name, lambda one=one: _classifier(one, "student")))
    return steps


def run_pipeline(cfg: DictConfig) -> dict:
    results = {}
    for label, step in _plan(cfg):
        out_dir, digest, run = step()
        if digest is not None and not cfg.force and runtime.is_done(out_dir, digest):
            log.info("pipeline: %s is done for config %s, skipping (force=true reruns it)", label, digest)
            results[label] = "skipped"
            continue
        metrics = run() or {}
        results[label] = "skipped" if metrics.get("skipped") else "ran"
    report = run_report(cfg)
    print(f"\nReport: {Path(report['report_dir']) / 'results.md'}")
    return {**results, **report}


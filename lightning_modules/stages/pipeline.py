"""`stage=pipeline`: teacher -> (judge) -> generator -> synthesize -> synth_eval -> FERAnno -> relabel -> students
-> report inside one run folder, handing artifacts over by path. The judge is a second teacher (another seed) that
scores the generator's faces and the synthetic set when ``generator.eval.judge=separate``, so the classifier that
guides sampling does not judge it. A stage whose outputs exist for the same config and the same inputs is skipped, so
a killed pipeline resumes where it stopped (``force=true`` reruns everything).

``pipeline.stages`` picks the steps; ``pipeline.students`` names one student run per entry, each with its own
``mix`` settings (e.g. real only and real + synthetic), written to ``<run>/<name>/`` (``<name>_seed<k>/`` per seed
with ``pipeline.student_seeds``); they all train the same number of optimizer steps (``pipeline.equal_student_steps``).
``pipeline.reuse`` names another run folder: a step it finished with the same config and inputs is linked from there
(hard links: almost no extra disk) instead of rerun (the rows of an ablation share the teacher, the generator, ...;
hashes do not depend on where a run folder is).
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_modules.paradigms.student import check_seeds, read_protocol, seed_suffix
from lightning_modules.run import distributed, runtime
from lightning_modules.run.runtime import require
from lightning_modules.stages import (classifier_stage, generator_stage, pseudolabel_stage, relabel_stage,
                                     synth_eval_stage)
from lightning_modules.stages.report import run_report

log = logging.getLogger(__name__)

STEPS = ("annotate_aus", "teacher", "judge", "generator", "synthesize", "synth_eval", "feranno", "relabel",
         "pseudolabel", "students")
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


def judge_config(cfg: DictConfig) -> DictConfig:
    """The run's config with the teacher renamed ``judge`` and trained with ``generator.eval.judge_seed`` (default:
    the teacher's seed + 1): a teacher as good as the guiding one that never guided."""
    from lightning_modules.generator.evaluation import JUDGE
    from lightning_modules.paradigms.student import read_protocol

    teacher_seed = read_protocol(cfg, "teacher").seed
    seed = OmegaConf.select(cfg, "generator.eval.judge_seed", default=None)
    key = "generator.eval.judge_seed"
    require(seed is None or (isinstance(seed, int) and not isinstance(seed, bool)), key,
            f"must be an integer or null (the teacher's seed + 1), got {seed!r}")
    seed = teacher_seed + 1 if seed is None else seed
    require(seed != teacher_seed, key, f"is the teacher's seed ({teacher_seed}): the judge would be the guiding "
                                       "teacher again (generator.eval.judge=guide says so openly)")
    out = cfg.copy()
    with open_dict(out):
        out.teacher.name = JUDGE
        out.teacher.seed = seed
    return out


def _students_filter_by_separate_judge(cfg: DictConfig) -> bool:
    """Whether a student keeps only the synthetic faces the separate judge confirms (``min_judge_confidence``)."""
    entries = [OmegaConf.merge(cfg.mix, e) if isinstance(e, DictConfig) else cfg.mix
               for e in (cfg.pipeline.students or {}).values()]
    return any(m.get("min_judge_confidence") is not None and str(m.get("judge", "separate")) == "separate"
               and m.get("mode") != "real_only" for m in entries)


def _judge_step(cfg: DictConfig, wanted: list) -> bool:
    """Whether the plan trains the judge: ``generator.eval.judge=separate`` and a generator evaluation to judge,
    ``synth_eval.judge=separate`` and a synthetic set to judge, or a student filtering its synthetic faces by the
    separate judge (or ``judge`` listed in ``pipeline.stages``)."""
    mode = str(OmegaConf.select(cfg, "generator.eval.judge", default="guide"))
    set_mode = str(OmegaConf.select(cfg, "synth_eval.judge", default="guide"))
    students = "students" in wanted and _students_filter_by_separate_judge(cfg)
    listed = "judge" in wanted
    require(not listed or "separate" in (mode, set_mode) or students, "pipeline.stages",
            f"the judge step trains the separate judge, but generator.eval.judge={mode}, synth_eval.judge="
            f"{set_mode} and no student filters by it; drop it or set separate")
    return listed or students or (mode == "separate" and "generator" in wanted and bool(cfg.generator.eval.enabled)) \
        or (set_mode == "separate" and "synth_eval" in wanted)


def student_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """One config per ``pipeline.students`` entry and seed: ``student.name`` = the entry's name, ``mix`` merged
    over. With two or more ``pipeline.student_seeds`` each entry runs once per seed k as ``<name>_seed<k>`` with
    ``student.seed`` = k (the report averages them); null or one seed: one run named ``<name>``."""
    students = cfg.pipeline.students or {}
    require(len(students) > 0, "pipeline.students", "name at least one student run (e.g. student: {mode: real_only})")
    seeds = check_seeds(OmegaConf.select(cfg, "pipeline.student_seeds", default=None), "pipeline.student_seeds")
    out = {}
    for name, mix in students.items():
        mix = student_mix(cfg.mix, mix, f"pipeline.students.{name}")
        for seed in seeds or [None]:
            one = cfg.copy()
            with open_dict(one):
                one.mix = mix
                one.student.name = str(name) + (seed_suffix(seed) if len(seeds or []) > 1 else "")
                if seed is not None:
                    one.student.seed = seed
            out[str(one.student.name)] = one
    return out


EXPERIMENT_MIX = "experiment"


def student_mix(experiment_mix: DictConfig, entry, key: str) -> DictConfig:
    """A ``pipeline.students`` entry's mix: its settings merged over the experiment's ``mix``. The entry
    ``experiment`` (the default ``student_mix``) is the experiment's ``mix`` as it stands, so a ratio or scale the
    experiment sets reaches the pipeline's mixed student; where that mix is ``real_only`` (the plain student's
    default) it becomes every kept synthetic face of the run added to the real ones (concat, scale null)."""
    if isinstance(entry, str):
        require(entry == EXPERIMENT_MIX, key, f"must be mix settings (e.g. {{mode: concat}}) or "
                                              f"{EXPERIMENT_MIX!r} (the experiment's mix), got {entry!r}")
        if experiment_mix.mode != "real_only":
            return experiment_mix.copy()
        log.info("%s: the experiment's mix is real_only; this student adds every kept synthetic face (concat)", key)
        return OmegaConf.merge(experiment_mix, {"mode": "concat", "scale": None})
    require(entry is None or isinstance(entry, DictConfig), key,
            f"must be mix settings (e.g. {{mode: concat}}) or {EXPERIMENT_MIX!r}, got {entry!r}")
    return OmegaConf.merge(experiment_mix, entry or {})


def _equal_steps(cfg: DictConfig) -> bool:
    equal = OmegaConf.select(cfg, "pipeline.equal_student_steps", default=True)
    require(isinstance(equal, bool), "pipeline.equal_student_steps", f"must be true or false, got {equal!r}")
    return equal


def equal_step_budget(students: dict[str, DictConfig]) -> Optional[int]:
    """``pipeline.equal_student_steps`` (default true) with ``student.max_steps`` null: every student gets the
    optimizer steps of the largest one's ``student.max_epochs`` epochs, so real + synthetic cannot win by training
    longer. None: each student trains its own ``max_epochs`` (or the ``max_steps`` it was given)."""
    given = any(one.student.get("max_steps") is not None for one in students.values())
    if given or not _equal_steps(next(iter(students.values()))):
        return None
    sizes = {}
    for name, one in students.items():  # seeds share a train set: count each distinct one once
        key = OmegaConf.to_yaml(one.mix) + OmegaConf.to_yaml(one.data)
        if key not in sizes:
            sizes[key] = (name, int(one.student.max_epochs) * classifier_stage.steps_per_epoch(one))
    name, budget = max(sizes.values(), key=lambda item: item[1])
    log.info("pipeline: every student trains %d optimizer steps (student.max_epochs of %s, the largest train set)",
             budget, name)
    return budget


def _students(cfg: DictConfig) -> list[tuple[str, Callable[[], Step]]]:
    """The students step: one step per student run; the shared step budget is computed (it reads every student's
    train data) when the first of them is due, after the steps that make the synthetic sets."""
    students = student_configs(cfg)
    for one in students.values():  # a bad student mix stops the pipeline before its first step
        classifier_stage.check_mix_config(one)
        read_protocol(one, "student")
    _equal_steps(cfg)
    budget: dict[str, Optional[int]] = {}

    def step(name: str) -> Step:
        if not budget:
            budget["steps"] = equal_step_budget(students)
        one = students[name]
        if budget["steps"] is not None:
            with open_dict(one):
                one.student.max_steps = budget["steps"]
        return _classifier(one, "student")

    return [(name, lambda name=name: step(name)) for name in students]


Step = tuple[Path, str, Callable[[], dict], DictConfig]  # output folder, done digest, runner, the step's config


def _classifier(cfg: DictConfig, role: str) -> Step:
    out = Path(cfg.paths.run_dir) / classifier_stage.output_name(cfg, role)
    return out, classifier_stage.done_digest(cfg, role), lambda: classifier_stage.run_classifier_stage(cfg, role), cfg


def _plan(cfg: DictConfig) -> list[tuple[str, Callable[[], Step]]]:
    """(label, step) in order. Built lazily: a step's digest reads the outputs of the steps before it."""
    from lightning_modules.stages.synthesize_stage import checked_plan, run_synthesize_stage

    wanted = list(cfg.pipeline.stages)
    unknown = [s for s in wanted if s not in STEPS]
    require(not unknown, "pipeline.stages", f"unknown steps {unknown}; choose from {list(STEPS)}")
    run_dir = Path(cfg.paths.run_dir)
    relabel_on = bool(cfg.relabel.enabled)
    steps = []
    annotate = OmegaConf.select(cfg, "data.au_source") == "annotate"  # resolved by train.py
    require(annotate or "annotate_aus" not in wanted, "pipeline.stages",
            "annotate_aus runs when data.au_source=annotate (then always first); drop it or set the AU source")
    if annotate:  # the later steps read its csv (data.openface)
        from lightning_modules.stages import annotate_stage

        steps.append(("annotate_aus", lambda: (run_dir / annotate_stage.STAGE, annotate_stage.annotation_digest(cfg),
                                               lambda: annotate_stage.run_annotate_stage(cfg), cfg)))
    if "teacher" in wanted:
        steps.append(("teacher", lambda: _classifier(cfg, "teacher")))
    if _judge_step(cfg, wanted):
        judge = judge_config(cfg)  # a bad judge seed stops the pipeline before its first step
        steps.append(("judge", lambda: _classifier(judge, "teacher")))
    if "generator" in wanted:
        steps.append(("generator", lambda: (run_dir / "generator", runtime.config_hash(cfg, generator_stage.HASH_KEYS),
                                            lambda: generator_stage.run_generator_stage(cfg), cfg)))
    if "synthesize" in wanted:  # an unfinished set resumes chunk by chunk (its fingerprint covers the generator)
        def synthesize_step() -> Step:
            checked = checked_plan(cfg)  # plan, size, fingerprint: built once, used as the key and by the run
            return run_dir / "synthesize", checked[2], lambda: run_synthesize_stage(cfg, checked), cfg

        steps.append(("synthesize", synthesize_step))
    if "synth_eval" in wanted:  # scores the synthesized set, before relabeling
        steps.append(("synth_eval", lambda: synth_eval_stage.step(cfg)))
    if "feranno" in wanted and relabel_on:
        steps.append(("feranno", lambda: _classifier(feranno_config(cfg), "teacher")))
    if "relabel" in wanted and relabel_on:
        steps.append(("relabel", lambda: (run_dir / "relabel", relabel_stage.done_digest(cfg),
                                          lambda: relabel_stage.run_relabel_stage(cfg), cfg)))
    if "pseudolabel" in wanted:  # the self-training baseline's set
        steps.append(("pseudolabel", lambda: pseudolabel_stage.step(cfg)))
    if "students" in wanted:
        steps += _students(cfg)
    return steps


def outputs_intact(label: str, out_dir: Path) -> bool:
    """A finished step's synthetic set (synthesize/, relabel/) must still verify before the step counts as done:
    one damaged afterwards is made again (synthesize redoes only the damaged shards)."""
    from datamodules.errors import DataError
    from datamodules.synthetic import verify_synthetic

    if label == "annotate_aus":  # the later steps read its csv (only this config's is kept): a deleted one is redone
        return any(out_dir.glob("openface_aus.*.csv"))
    if label not in ("synthesize", "relabel", "pseudolabel"):
        return True
    try:
        verify_synthetic(out_dir / "dataset")
    except DataError as err:
        log.warning("pipeline: %s finished but its set is damaged, running it again: %s", label, err)
        return False
    return True


# Files at least this large are linked to the other run's (hard links, else symlinks): checkpoints, weights,
# dataset shards, which the stages only ever replace (write elsewhere, rename). Smaller files are copied: some
# (grids, confusion matrices, cards) are rewritten in place by a rerun, which would reach through a link.
LINK_MIN_BYTES = 1 << 20
# Written by this run itself: never linked, never copied.
OWN_FILES = ("wandb", "config.yaml", runtime.DONE_MARKER)


def _link_or_copy(src: str, dst: str, symlinked: list) -> str:
    """Hard-link ``src`` at ``dst`` (same inode: no extra bytes, same size and mtime, survives the other run's
    deletion); across file systems a symlink to it; below ``LINK_MIN_BYTES`` a copy with the same times."""
    if os.path.getsize(src) < LINK_MIN_BYTES:
        return shutil.copy2(src, dst)
    try:
        os.link(src, dst)  # follows a symlink in the other run: links the file it points at
    except OSError:  # another file system, or one without hard links
        os.symlink(os.path.realpath(src), dst)
        symlinked.append(dst)
    return dst


def reuse_stage(source: Path, out_dir: Path, digest: str, step_cfg: DictConfig, wait_seconds: float = 1800) -> bool:
    """Link ``source`` (the same stage of another run folder) into ``out_dir`` when it finished with ``digest``:
    folders are made here, large files are hard links (symlinks across file systems), small ones copies, so a
    reused step costs almost no disk. Links and copies keep the files' names, sizes and times, so the
    fingerprints of later steps match the other folder's. The config.yaml and done marker are this run's own (the
    report names rows by the config); wandb runs stay with the run that logged them. Under DDP every process runs
    the pipeline: rank 0 links, the others wait for its done marker."""
    if source.resolve() == out_dir.resolve() or not runtime.is_done(source, digest):
        return False
    if not runtime.is_rank_zero():
        deadline = time.monotonic() + wait_seconds
        while not runtime.is_done(out_dir, digest):
            if time.monotonic() > deadline:
                raise TimeoutError(f"pipeline.reuse: rank 0 did not link {source} into {out_dir} in {wait_seconds} s")
            time.sleep(1.0)
        return True
    # a partial stage of this folder (or a link left by an older layout): the finished one replaces it
    if out_dir.is_symlink():
        out_dir.unlink()
    shutil.rmtree(out_dir, ignore_errors=True)
    symlinked: list[str] = []
    shutil.copytree(source, out_dir, ignore=lambda d, names: [n for n in names if n in OWN_FILES and Path(d) == source],
                    copy_function=lambda src, dst: _link_or_copy(src, dst, symlinked))
    if symlinked:
        log.warning("pipeline.reuse: %d files of %s are symlinks (no hard links into %s): keep that run folder",
                    len(symlinked), source, out_dir)
    runtime.save_resolved_config(step_cfg, out_dir)
    runtime.mark_done(out_dir, digest, reused_from=str(source))
    return True


def _seconds(cfg: DictConfig, key: str, default: float) -> float:
    value = OmegaConf.select(cfg, key, default=default)
    require(isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0, key,
            f"must be a number of seconds > 0, got {value!r}")
    return float(value)


def run_pipeline(cfg: DictConfig) -> dict:
    """Every process of a DDP run goes through the steps together: no step starts on any rank before the one before
    it finished on all of them, rank 0's saving and evaluation included (``pipeline.barrier_timeout_seconds``)."""
    reuse = OmegaConf.select(cfg, "pipeline.reuse", default=None)
    wait = _seconds(cfg, "pipeline.reuse_wait_seconds", 1800)  # checked also without reuse
    barrier_s = _seconds(cfg, "pipeline.barrier_timeout_seconds", 7200)
    monitored_student(cfg)  # a bad name stops the pipeline before its first step
    if reuse is not None:
        require(Path(str(reuse)).is_dir(), "pipeline.reuse", f"no run folder {reuse}")
    results = {}
    for label, step in _plan(cfg):
        out_dir, digest, run, step_cfg = step()
        ran_here = False
        source = Path(str(reuse)) / out_dir.name if reuse is not None else None
        if not cfg.force and runtime.is_done(out_dir, digest) and outputs_intact(label, out_dir):
            log.info("pipeline: %s is done for config %s, skipping (force=true reruns it)", label, digest)
            results[label] = "skipped"
        # a finished source whose set was damaged afterwards is not copied
        elif (source is not None and not cfg.force
              and (not runtime.is_done(source, digest) or outputs_intact(label, source))
              and reuse_stage(source, out_dir, digest, step_cfg, wait)):
            log.info("pipeline: %s reused from %s (same config and inputs)", label, source)
            results[label] = "reused"
        else:
            metrics = run() or {}
            results[label] = "skipped" if metrics.get("skipped") else "ran"
            ran_here = results[label] == "ran"
        distributed.after_step(label, lambda out_dir=out_dir, digest=digest: runtime.is_done(out_dir, digest),
                               ran_here, barrier_s)
    report = {}
    if runtime.is_rank_zero():  # one writer for results.md and its plots
        report = run_report(cfg)
        log.info("Report: %s", Path(report["report_dir"]) / "results.md")
    if distributed.distributed_ready():
        distributed.barrier("the report", barrier_s)
    return {**results, **report}


def monitored_student(cfg: DictConfig) -> list[str]:
    """The student runs whose validation accuracy the pipeline reports to a sweeper (``pipeline.monitor``, null =
    the last of ``pipeline.students``): one run, or one per ``pipeline.student_seeds`` seed."""
    names = [str(n) for n in (cfg.pipeline.students or {})]
    monitor = OmegaConf.select(cfg, "pipeline.monitor", default=None)
    if not names or "students" not in cfg.pipeline.stages:
        require(monitor is None, "pipeline.monitor", "names a student, but the pipeline trains none")
        return []
    monitor = names[-1] if monitor is None else str(monitor)
    require(monitor in names, "pipeline.monitor", f"{monitor!r} is not one of pipeline.students {names}")
    seeds = check_seeds(OmegaConf.select(cfg, "pipeline.student_seeds", default=None), "pipeline.student_seeds")
    return [monitor + seed_suffix(s) for s in seeds] if len(seeds or []) > 1 else [monitor]


def monitored_value(cfg: DictConfig) -> Optional[float]:
    """The monitored student's best validation accuracy (the mean over its seeds) from its metrics.json; None
    when the pipeline trains no student or a run has no value."""
    import json

    values = []
    for name in monitored_student(cfg):
        path = Path(cfg.paths.run_dir) / name / "metrics.json"
        value = json.loads(path.read_text()).get("best_val_acc") if path.is_file() else None
        if value is None:
            return None
        values.append(float(value))
    return sum(values) / len(values) if values else None

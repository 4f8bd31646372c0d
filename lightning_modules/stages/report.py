"""`stage=report`: collect every stage's metrics.json of the run folder (and of the sweep folders in
``report.dirs``) into ``<run>/report/``: results.md (classifier, scaling, ablation, generator, synthesis and relabel
tables), scaling.png / ablation.png, a per-expression grid of the synthetic faces, the copied confusion matrices and
generator grids, and one flat metrics.json (``<stage>/<metric>``, ``scaling/...``, ``ablation/...``).

File discovery lives here; the tables and plots are pure functions in lightning_modules/report_plots.py."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf

from lightning_modules import runtime
from lightning_modules.report_plots import (JobResult, StudentRecord, ablation_markdown, ablation_metrics,
                                            ablation_rows, classifier_notes, fmt, is_ablation, natural_key,
                                            plot_ablation, plot_scaling, save_synthetic_samples, scaling_markdown,
                                            scaling_metrics, scaling_table, switches_of)
from lightning_modules.report_students import (PROTOCOL_COLUMNS, group_of, group_students, protocol_of, run_protocol,
                                               select, students_markdown)

HEADLINE = ("test/acc", "test/mean_class_acc", "test/macro_f1", "test/au_mae", "best_val_acc", "fit_seconds",
            "data/train_size")
GENERATOR_HEADLINE = ("eval/fer_acc", "eval/unguided/fer_acc", "eval/au_pearson_mean", "eval/fid",
                      "eval/reference/fer_acc", "eval/reference/au_pearson_mean", "eval/judge_mode",
                      "eval/judge_also_guided", "val_loss", "steps", "fit_seconds")
GENERATOR_OPTIONAL = ("eval/unguided/fer_acc", "eval/fid")  # columns shown only when some generator has them
SYNTHESIS_HEADLINE = ("images", "generated_now", "seconds", "images_per_second", "world_size")
SYNTH_EVAL_HEADLINE = ("fer_acc", "au_pearson_mean", "fid", "kid_mean", "num_samples", "judge_also_guided")
RELABEL_HEADLINE = ("data_card/total", "data_card/kept", "data_card/hard_share", "data_card/soft_share",
                    "data_card/dropped_share", "data_card/voter_agreement_rate",
                    "data_card/agreement_with_condition_kept")
GENERATOR_GRIDS = ("expressions_final.png", "au_sweep_final.png", "eval_samples.png")
# Stages in pipeline order first, anything else after, alphabetically.
STAGE_ORDER = ("teacher", "judge", "generator", "synthesize", "synth_eval", "feranno", "relabel", "student")


def collect_metrics(run_dir: Path) -> dict[str, dict]:
    """stage name -> its metrics.json, for every stage folder of ``run_dir`` (the report's own excluded)."""
    found = {}

    def order(path: Path) -> tuple:  # a seeded student (student_seed1) sorts with its student
        name = path.parent.name
        base = group_of(name, None)
        return (STAGE_ORDER.index(base) if base in STAGE_ORDER else len(STAGE_ORDER), base, natural_key(name))

    paths = sorted(run_dir.glob("*/metrics.json"), key=order)
    for path in paths:
        if path.parent.name == "report":
            continue
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"corrupt metrics file {path}: {err}") from err
    return found


def read_config(stage_dir: Path) -> Optional[dict]:
    """A stage folder's resolved config.yaml as a dict; None when it is missing or unreadable."""
    path = stage_dir / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return config if isinstance(config, dict) else None


def _student_record(job: str, stage: str, metrics: dict, config: Optional[dict]) -> Optional[StudentRecord]:
    """A stage folder as a student run, or None when it is not one (no ``test/acc``; a teacher: no data/mix keys and
    its config names another student)."""
    if "test/acc" not in metrics:
        return None
    config = config or {}
    mode = metrics.get("data/mix/mode")
    if mode is None:
        named = select(config, "student.name")
        if named != stage and not (named is None and stage.startswith("student")):
            return None
        mode = select(config, "mix.mode")
    scale = metrics.get("data/mix/scale", select(config, "mix.scale"))
    scale = 0.0 if mode == "real_only" else (float(scale) if scale is not None else None)
    return StudentRecord(job, stage, mode, scale, metrics.get("test/acc"), metrics.get("test/mean_class_acc"),
                         metrics.get("test/macro_f1"), config.get("experiment_name"), switches_of(config),
                         run_protocol(metrics, config, stage))


def read_job(job_dir: Path, name: str, missing_config: Optional[list[Path]] = None) -> JobResult:
    """A run folder: its stages' metrics (a corrupt metrics.json is an error naming it), the first readable stage
    config.yaml as the job's config, and its students. Student folders without a readable config.yaml are appended
    to ``missing_config`` (their mix settings then come from the metrics' data/mix/* keys)."""
    metrics = collect_metrics(job_dir)
    configs = {stage: read_config(job_dir / stage) for stage in metrics}
    students = []
    for stage, m in metrics.items():
        if "test/acc" in m and configs[stage] is None and missing_config is not None:
            missing_config.append(job_dir / stage / "config.yaml")
        record = _student_record(name, stage, m, configs[stage])
        if record is not None:
            students.append(record)
    config = next((c for c in configs.values() if c is not None), {})
    return JobResult(name, metrics, config, students)


def find_jobs(root: Path) -> list[Path]:
    """Every run folder under ``root`` (``root`` included): a folder with ``<stage>/metrics.json`` children."""
    if not root.is_dir():
        raise FileNotFoundError(f"report.dirs: no folder {root}")
    jobs = {p.parent.parent for p in root.rglob("metrics.json") if p.parent.name != "report" and p.parent != root}
    return sorted(jobs, key=lambda j: natural_key(str(j.relative_to(root))))


def collect_jobs(run_dir: Path, dirs: Sequence[Path]) -> tuple[JobResult, list[list[JobResult]]]:
    """The run folder as a job, and the jobs found under each of ``dirs`` (the run folder itself left out; job names
    relative to their folder). Warns once about student folders without a readable config.yaml."""
    missing: list[Path] = []
    run_job = read_job(run_dir, run_dir.name, missing)
    seen = {run_dir.resolve()}
    groups = []
    for root in dirs:
        group = []
        for job_dir in find_jobs(root):
            if job_dir.resolve() in seen:
                continue
            seen.add(job_dir.resolve())
            name = str(job_dir.relative_to(root)) if job_dir != root else root.name
            group.append(read_job(job_dir, name, missing))
        groups.append(group)
    if missing:
        warnings.warn(f"report: {len(missing)} student folder(s) without a readable config.yaml (first: {missing[0]});"
                      " their mix mode/scale come from metrics.json (data/mix/*), their ablation switches are unknown")
    return run_job, groups


def baseline_runs(cfg: DictConfig, run_job: JobResult) -> Optional[list[StudentRecord]]:
    """The real-only student(s) of the scaling table: ``report.baseline`` (a metrics.json, its stage folder or a run
    folder), else the run folder's real-only students (every seed), else None (the table then takes the real-only
    students it finds)."""
    given = OmegaConf.select(cfg, "report.baseline", default=None)
    if given is None:
        real = [r for r in run_job.students if r.mode == "real_only" and r.acc is not None]
        return real or None
    path = Path(str(given))
    if path.is_dir():
        path = next((p for p in (path / "metrics.json", path / "student" / "metrics.json") if p.is_file()), path)
    runtime.require(path.is_file(), "report.baseline", f"no metrics.json at {given}")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"corrupt metrics file {path}: {err}") from err
    runtime.require(metrics.get("test/acc") is not None, "report.baseline", f"{path} has no test/acc")
    config = read_config(path.parent)
    return [StudentRecord("baseline", path.parent.name, "real_only", 0.0, float(metrics["test/acc"]),
                          protocol=run_protocol(metrics, config, path.parent.name))]


def _table(rows: dict[str, dict], columns: Sequence[str]) -> list[str]:
    lines = ["| stage | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for stage, m in rows.items():
        lines.append(f"| {stage} | " + " | ".join(fmt(m.get(k)) for k in columns) + " |")
    return lines + [""]


def render_results_md(metrics: dict[str, dict], images: list[str], title: str,
                      sections: Sequence[str] = (), samples: Sequence[str] = (),
                      configs: Optional[dict[str, Optional[dict]]] = None, note: Optional[str] = None) -> str:
    """results.md of one run folder's ``metrics``; ``sections`` (markdown lines: scaling, ablation) follow the
    classifier table, ``samples`` (markdown lines) the data card; ``images`` are linked at the end. ``configs``
    (stage -> resolved config) give each classifier's protocol (batch size); ``note`` is a banner under the title."""
    generators = {s: m for s, m in metrics.items() if s == "generator"}
    protocols = {s: run_protocol(m, (configs or {}).get(s), s) for s, m in metrics.items() if "test/acc" in m}
    classifiers = {s: {**m, **protocol_of(m, (configs or {}).get(s), s)} for s, m in metrics.items() if "test/acc" in m}
    lines = [f"# {title}", ""]
    if note:
        lines += [f"> **{note.strip()}**", ""]
    if classifiers:
        lines += ["## FER classifiers (tested on real data)", "", *_table(classifiers, (*HEADLINE, *PROTOCOL_COLUMNS)),
                  *classifier_notes(classifiers)]
        mixed = {s: m for s, m in classifiers.items() if m.get("data/mix/mode") not in (None, "real_only")}
        if mixed:
            lines += ["Students on synthetic faces:", "", *_table(mixed, ("data/mix/mode", "data/mix/scale",
                                                                          "data/mix/synthetic_size",
                                                                          "data/mix/soft_labels"))]
        groups = group_students(classifiers, protocols)
        if groups:
            lines += students_markdown(groups)
    lines += list(sections)
    if generators:
        columns = [c for c in GENERATOR_HEADLINE
                   if c not in GENERATOR_OPTIONAL or any(m.get(c) is not None for m in generators.values())]
        lines += ["## Generator (teacher's FER accuracy, AU Pearson r and FID on generated faces; reference = the "
                  "real faces behind the same conditions; unguided = sampled without semantic guidance)", "",
                  *_table(generators, columns)]
        for stage, m in generators.items():  # data without AU labels: say so instead of a row of dashes
            if m.get("eval/au_metrics_skipped"):
                lines += [f"No AU conditioning for `{stage}`: AU metrics skipped ({m['eval/au_metrics_skipped']}).", ""]
    if "synthesize" in metrics:
        lines += ["## Synthesis", "", *_table({"synthesize": metrics["synthesize"]}, SYNTHESIS_HEADLINE)]
    if "synth_eval" in metrics:
        m = metrics["synth_eval"]
        guided = (", which also guided the synthesis: FER-Acc overrates guided faces" if m.get("judge_also_guided")
                  else "")
        lines += [f"## Synthetic set judged (FER-Acc against the conditioned labels, FID/KID against real "
                  f"{m.get('real_split') or '–'} faces; judge `{m.get('judge')}`{guided})", "",
                  *_table({"synth_eval": m}, SYNTH_EVAL_HEADLINE)]
    if "relabel" in metrics:
        lines += ["## Relabeling (ensemble vote; data card in relabel/data_card.md)", "",
                  *_table({"relabel": metrics["relabel"]}, RELABEL_HEADLINE)]
    for stage, m in metrics.items():
        skipped = {k: v for k, v in m.items() if k.startswith("data/skipped/")}
        if skipped:
            lines.append(f"- {stage}: skipped samples {skipped}")
    lines += list(samples)
    if images:
        lines += ["", "## Figures"]
    for image in images:
        lines += ["", f"![{Path(image).stem}]({image})"]
    return "\n".join(lines) + "\n"


def _synthetic_samples(run_dir: Path, out_dir: Path, per_class: int) -> list[str]:
    """synthetic_samples.png from the run's relabelled set (else its synthesized set) + its markdown; an unreadable
    set is skipped with a warning (the numbers still get reported)."""
    from datamodules.labels import EXPRESSIONS
    from datamodules.synthetic import MANIFEST, load_synthetic

    source = next((d for d in (run_dir / "relabel" / "dataset", run_dir / "synthesize" / "dataset")
                   if (d / MANIFEST).is_file()), None)
    if source is None:
        return []
    try:
        dataset = load_synthetic(source)
        save_synthetic_samples(dataset, per_class, out_dir / "synthetic_samples.png", EXPRESSIONS)
    except (OSError, ValueError) as err:
        warnings.warn(f"report: no synthetic sample grid from {source}: {err}")
        return []
    label = "vote label (final_label; dropped faces left out)" if "final_label" in dataset.column_names \
        else "conditioned label (target_label)"
    count = f"{len(dataset)} faces" + (f", {sum(dataset['kept'])} kept" if "kept" in dataset.column_names else "")
    return ["", f"## Synthetic samples ({source.parent.name}/{source.name}, {count}; rows by {label})", "",
            "![synthetic_samples](synthetic_samples.png)", ""]


def run_report(cfg: DictConfig) -> dict:
    run_dir = Path(cfg.paths.run_dir)
    dirs = [Path(str(d)) for d in (OmegaConf.select(cfg, "report.dirs", default=None) or [])]
    per_class = OmegaConf.select(cfg, "report.grid_per_class", default=8)
    runtime.require(isinstance(per_class, int) and per_class >= 1, "report.grid_per_class",
                    f"must be an integer >= 1, got {per_class!r}")
    run_job, groups = collect_jobs(run_dir, dirs)
    metrics = run_job.metrics
    if not metrics and not any(groups):
        raise FileNotFoundError(f"no */metrics.json under {run_dir}" + (f" or {list(map(str, dirs))}" if dirs else "")
                                + ": run a stage first (e.g. stage=teacher)")
    out_dir = runtime.stage_dir(cfg, "report")
    images, sections, extra = [], [], {}
    # scaling: the run folder + sweep folders of one experiment; ablation: folders whose jobs ran several experiments
    scaling_jobs = [run_job, *[j for g in groups if not is_ablation(g) for j in g]]
    ablation_jobs = [j for g in groups if is_ablation(g) for j in g]
    table = scaling_table([r for j in scaling_jobs for r in j.students], baseline_runs(cfg, run_job))
    if table.n_cells >= 2:
        plot_scaling(table, out_dir / "scaling.png")
        sections += scaling_markdown(table, "scaling.png")
        extra.update(scaling_metrics(table))
    if ablation_jobs:
        rows = ablation_rows(ablation_jobs)
        sections += ablation_markdown(rows, "ablation.png" if any(r.mixed for r in rows) else None)
        if any(r.mixed for r in rows):
            plot_ablation(rows, out_dir / "ablation.png")
        extra.update(ablation_metrics(rows))
    samples = _synthetic_samples(run_dir, out_dir, per_class)
    for stage in metrics:
        matrix = run_dir / stage / "confusion_matrix.png"
        if matrix.is_file():
            shutil.copyfile(matrix, out_dir / f"confusion_{stage}.png")
            images.append(f"confusion_{stage}.png")
    for name in GENERATOR_GRIDS:
        grid = run_dir / "generator" / "grids" / name
        if "generator" in metrics and grid.is_file():
            shutil.copyfile(grid, out_dir / f"generator_{name}")
            images.append(f"generator_{name}")
    if cfg.data.format == "toy":
        from datamodules.real import parse_toy_options
        from datamodules.toyfaces import save_sample_grid

        _, toy_config = parse_toy_options(OmegaConf.to_container(cfg.data.toy, resolve=True))
        save_sample_grid(toy_config, out_dir / "toyfaces_grid.png")
        images.append("toyfaces_grid.png")
    note = OmegaConf.select(cfg, "report.note", default=None)
    runtime.require(note is None or isinstance(note, str), "report.note", f"must be a string or null, got {note!r}")
    configs = {stage: read_config(run_dir / stage) for stage in metrics}
    text = render_results_md(metrics, images, f"SynFER results: {cfg.experiment_name}", sections, samples,
                             configs, note)
    (out_dir / "results.md").write_text(text)
    runtime.write_metrics(out_dir, {**metrics, **extra})  # flattened to "<stage>/<metric>" keys
    return {"report_dir": str(out_dir), "stages": list(metrics), "jobs": 1 + sum(map(len, groups))}

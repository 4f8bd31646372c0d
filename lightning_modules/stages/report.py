"""`stage=report`: collect every stage's metrics.json of the run folder (and of the sweep folders in
``report.dirs``) into ``<run>/report/``: results.md (classifier, scaling, ablation, generator, synthesis and relabel
tables), scaling.png / ablation.png, a per-expression grid of the synthetic faces, the copied confusion matrices and
generator grids, and one flat metrics.json (``<stage>/<metric>``, ``scaling/...``, ``ablation/...``). Students of
recipes beyond plain real / concat / synthetic-only scaling get the "does it help?" recipe table (``recipes/...``),
also logged to wandb as a table when the logger has wandb on.

File discovery lives here; the tables and plots are pure functions in lightning_modules/report/ (plots, ablation,
recipes, ...)."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf

from lightning_modules.report.ablation import (ablation_markdown, ablation_metrics, ablation_rows, is_ablation,
                                               plot_ablation, switches_of)
from lightning_modules.report.plots import (SELF_TRAINING, JobResult, StudentRecord, classifier_notes, fmt, natural_key,
                                            plot_scaling, save_synthetic_samples, scaling_markdown, scaling_metrics,
                                            scaling_table)
from lightning_modules.report.clip import clip_markdown, clip_metrics, clip_run
from lightning_modules.report.fewshot import fewshot_markdown, fewshot_metrics, fewshot_run
from lightning_modules.report.recipes import (REAL_ONLY, WANDB_COLUMNS, RecipeRun, is_real_only, needs_recipe_table,
                                              recipe_of, recipe_table, recipes_markdown, recipes_metrics,
                                              recipes_wandb_rows)
from lightning_modules.report.ssl import ssl_markdown, ssl_metrics, ssl_run
from lightning_modules.report.students import (PROTOCOL_COLUMNS, group_of, group_students, protocol_of, run_protocol,
                                               select, students_markdown)
from lightning_modules.run import runtime, trainer_setup

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
                         run_protocol(metrics, config, stage), extra_faces_of(metrics.get("data/mix/synthetic")),
                         select(config, "data.train_resample_size"))


def extra_faces_of(sets) -> str:
    """SELF_TRAINING when every set a student mixed in is a pseudo-label set of real faces (its manifest says
    ``meta.source: pseudolabel``), else "synthetic" (also when a set is gone: it then cannot be told apart)."""
    from datamodules.errors import DataError
    from datamodules.synthetic import read_manifest

    sets = [sets] if isinstance(sets, str) else list(sets or [])
    sources = []
    for path in sets:
        try:
            sources.append(read_manifest(Path(path)).get("meta", {}).get("source"))
        except (DataError, OSError, ValueError):  # a moved or deleted set: unknown
            sources.append(None)
    return SELF_TRAINING if sources and all(s == "pseudolabel" for s in sources) else "synthetic"


def recipe_run(record: StudentRecord, config: Optional[dict], config_path: Path) -> Optional[RecipeRun]:
    """A student as a run of the recipe table (its recipe from its config; without one, from its mix mode alone);
    None without a test accuracy or a known mix mode. Pseudo-label students are a recipe of their own
    (``<recipe>/self-training``). A mix value no student could have trained with is an error naming the file."""
    if record.acc is None or record.mode is None:
        return None
    try:
        recipe = recipe_of(config if config is not None else {"mix": {"mode": record.mode}})
    except ValueError as err:
        raise ValueError(f"{config_path}: {err}") from err
    if record.extra_faces == SELF_TRAINING and not is_real_only(recipe):
        recipe = f"{recipe}/{SELF_TRAINING}"
    mean_class = None if record.mean_class_acc is None else float(record.mean_class_acc)
    return RecipeRun(f"{record.job}/{record.stage}", recipe, record.scale, float(record.acc), record.protocol,
                     record.experiment, mean_class)


def read_job(job_dir: Path, name: str, missing_config: Optional[list[Path]] = None,
             recipes: Optional[list[RecipeRun]] = None) -> JobResult:
    """A run folder: its stages' metrics (a corrupt metrics.json is an error naming it), the first readable stage
    config.yaml as the job's config, and its students (also appended to ``recipes`` as recipe runs). Student folders
    without a readable config.yaml are appended to ``missing_config`` (their mix settings then come from the
    metrics' data/mix/* keys)."""
    metrics = collect_metrics(job_dir)
    configs = {stage: read_config(job_dir / stage) for stage in metrics}
    students = []
    for stage, m in metrics.items():
        if "test/acc" in m and configs[stage] is None and missing_config is not None:
            missing_config.append(job_dir / stage / "config.yaml")
        record = _student_record(name, stage, m, configs[stage])
        if record is not None:
            students.append(record)
            if recipes is not None:
                run = recipe_run(record, configs[stage], job_dir / stage / "config.yaml")
                recipes += [run] if run is not None else []
    config = next((c for c in configs.values() if c is not None), {})
    return JobResult(name, metrics, config, students)


def find_jobs(root: Path) -> list[Path]:
    """Every run folder under ``root`` (``root`` included): a folder with ``<stage>/metrics.json`` children."""
    if not root.is_dir():
        raise FileNotFoundError(f"report.dirs: no folder {root}")
    jobs = {p.parent.parent for p in root.rglob("metrics.json") if p.parent.name != "report" and p.parent != root}
    return sorted(jobs, key=lambda j: natural_key(str(j.relative_to(root))))


def collect_jobs(run_dir: Path, dirs: Sequence[Path], recipes: Optional[list[RecipeRun]] = None
                 ) -> tuple[JobResult, list[list[JobResult]]]:
    """The run folder as a job, and the jobs found under each of ``dirs`` (the run folder itself left out; job names
    relative to their folder). ``recipes`` receives the students of the run folder and of every folder that is not an
    ablation (those ran other experiments). Warns once about student folders without a readable config.yaml."""
    missing: list[Path] = []
    run_job = read_job(run_dir, run_dir.name, missing, recipes)
    seen = {run_dir.resolve()}
    groups = []
    for root in dirs:
        group, runs = [], []
        for job_dir in find_jobs(root):
            if job_dir.resolve() in seen:
                continue
            seen.add(job_dir.resolve())
            name = str(job_dir.relative_to(root)) if job_dir != root else root.name
            group.append(read_job(job_dir, name, missing, runs))
        groups.append(group)
        if recipes is not None and not is_ablation(group):
            recipes += runs
    if missing:
        warnings.warn(f"report: {len(missing)} student folder(s) without a readable config.yaml (first: {missing[0]});"
                      " their mix mode/scale come from metrics.json (data/mix/*), their ablation switches are unknown"
                      " and their recipe is named from the mix mode alone")
    return run_job, groups


def baseline_runs(cfg: DictConfig, run_job: JobResult) -> Optional[list[StudentRecord]]:
    """The real-only student(s) of the scaling table: ``report.baseline`` (a metrics.json, its stage folder or a run
    folder), else the run folder's real-only students (every seed), else None (the table then takes the real-only
    students it finds)."""
    given = OmegaConf.select(cfg, "report.baseline", default=None)
    if given is None:
        real = [r for r in run_job.students if r.mode == "real_only" and r.acc is not None and r.train_resample is None]
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
                          metrics.get("test/mean_class_acc"), protocol=run_protocol(metrics, config, path.parent.name))]


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


def paradigm_tables(jobs: Sequence[JobResult]) -> tuple[list[str], dict]:
    """The self-supervised (``stage=ssl``), few-shot (``stage=fewshot``) and zero-shot (``stage=clip``) tables of
    every job that ran them, and their flat metrics; stages are recognised by their metrics, whatever their folder is
    called."""
    ssl_runs, fewshot_runs, clip_runs = [], [], []
    for job in jobs:
        for stage, m in job.metrics.items():
            name = job.name if len(jobs) == 1 else f"{job.name}/{stage}"
            ssl_runs += [r for r in [ssl_run(name, m)] if r is not None]
            fewshot_runs += [r for r in [fewshot_run(name, m)] if r is not None]
            clip_runs += [r for r in [clip_run(name, m)] if r is not None]
    return ssl_markdown(ssl_runs) + fewshot_markdown(fewshot_runs) + clip_markdown(clip_runs), {
        **ssl_metrics(ssl_runs), **fewshot_metrics(fewshot_runs), **clip_metrics(clip_runs)}


def log_to_wandb(cfg: DictConfig, out_dir: Path, tables: dict[str, tuple[list[str], list[list]]],
                 metrics: dict[str, float]) -> None:
    """The report's tables (name -> columns, rows) and flat metrics as one wandb run of stage ``report``, when the
    config's logger has wandb on (a config without a logger node logs nothing)."""
    from lightning.pytorch.loggers import WandbLogger

    if not OmegaConf.select(cfg, "logger.wandb.enabled", default=False):
        return
    loggers = [lg for lg in trainer_setup.build_loggers(cfg, out_dir, "report") if isinstance(lg, WandbLogger)]
    try:
        for lg in loggers:
            for name, (columns, rows) in tables.items():
                lg.log_table(name, columns=columns, data=rows)
            lg.log_metrics(metrics)
    finally:
        trainer_setup.finish_loggers(loggers)


def run_report(cfg: DictConfig) -> dict:
    run_dir = Path(cfg.paths.run_dir)
    dirs = [Path(str(d)) for d in (OmegaConf.select(cfg, "report.dirs", default=None) or [])]
    per_class = OmegaConf.select(cfg, "report.grid_per_class", default=8)
    runtime.require(isinstance(per_class, int) and per_class >= 1, "report.grid_per_class",
                    f"must be an integer >= 1, got {per_class!r}")
    recipe_runs: list[RecipeRun] = []
    run_job, groups = collect_jobs(run_dir, dirs, recipe_runs)
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
    wandb_tables, wandb_metrics = {}, {}
    if needs_recipe_table([r.recipe.split("/")[0] for r in recipe_runs]):
        baseline = baseline_runs(cfg, run_job)
        recipes = recipe_table(recipe_runs, None if baseline is None else
                               [RecipeRun(f"{r.job}/{r.stage}", REAL_ONLY, 0.0, r.acc, r.protocol, r.experiment,
                                          r.mean_class_acc) for r in baseline])
        sections += recipes_markdown(recipes)
        wandb_metrics = recipes_metrics(recipes)
        extra.update(wandb_metrics)
        wandb_tables["report/recipes"] = (WANDB_COLUMNS, recipes_wandb_rows(recipes))
    paradigm_sections, paradigm_metrics = paradigm_tables([run_job, *[j for g in groups for j in g]])
    sections += paradigm_sections
    extra.update(paradigm_metrics)
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
    if wandb_tables:
        log_to_wandb(cfg, out_dir, wandb_tables, wandb_metrics)
    return {"report_dir": str(out_dir), "stages": list(metrics), "jobs": 1 + sum(map(len, groups))}

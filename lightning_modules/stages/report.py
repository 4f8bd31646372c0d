"""`stage=report`: collect every stage's metrics.json in a run folder into results.md + one metrics.json,
copy confusion matrices next to it and render the toy sample grid."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from omegaconf import DictConfig

from lightning_modules import runtime

HEADLINE = ("test/acc", "test/mean_class_acc", "test/macro_f1", "test/au_mae", "best_val_acc", "fit_seconds",
            "data/train_size")
GENERATOR_HEADLINE = ("eval/fer_acc", "eval/au_pearson_mean", "eval/reference/fer_acc",
                      "eval/reference/au_pearson_mean", "val_loss", "steps", "fit_seconds")
GENERATOR_GRIDS = ("expressions_final.png", "au_sweep_final.png", "eval_samples.png")
# Stages in pipeline order first, anything else after, alphabetically.
STAGE_ORDER = ("teacher", "generator", "synthesize", "feranno", "relabel", "student")


def collect_metrics(run_dir: Path) -> dict[str, dict]:
    """stage name -> its metrics.json, for every stage folder of ``run_dir`` (the report's own excluded)."""
    found = {}
    paths = sorted(run_dir.glob("*/metrics.json"), key=lambda p: (
        STAGE_ORDER.index(p.parent.name) if p.parent.name in STAGE_ORDER else len(STAGE_ORDER), p.parent.name))
    for path in paths:
        if path.parent.name == "report":
            continue
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"corrupt metrics file {path}: {err}") from err
    return found


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return "–" if value is None else str(value)


def _table(rows: dict[str, dict], columns: tuple[str, ...]) -> list[str]:
    lines = ["| stage | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for stage, m in rows.items():
        lines.append(f"| {stage} | " + " | ".join(_fmt(m.get(k)) for k in columns) + " |")
    return lines + [""]


SYNTHESIS_HEADLINE = ("images", "generated_now", "seconds", "images_per_second", "world_size")
RELABEL_HEADLINE = ("data_card/total", "data_card/kept", "data_card/soft", "data_card/voter_agreement_rate",
                    "data_card/agreement_with_condition_kept")


def render_results_md(metrics: dict[str, dict], images: list[str], title: str) -> str:
    generators = {s: m for s, m in metrics.items() if s == "generator"}
    classifiers = {s: m for s, m in metrics.items() if "test/acc" in m}
    lines = [f"# {title}", ""]
    if classifiers:
        lines += ["## FER classifiers (tested on real data)", "", *_table(classifiers, HEADLINE)]
        mixed = {s: m for s, m in classifiers.items() if m.get("data/mix/mode") not in (None, "real_only")}
        if mixed:
            lines += ["Students on synthetic faces:", "", *_table(mixed, ("data/mix/mode", "data/mix/scale",
                                                                          "data/mix/synthetic_size",
                                                                          "data/mix/soft_labels"))]
    if generators:
        lines += ["## Generator (teacher's FER accuracy and AU Pearson r on generated faces; reference = the real "
                  "faces behind the same conditions)", "", *_table(generators, GENERATOR_HEADLINE)]
    if "synthesize" in metrics:
        lines += ["## Synthesis", "", *_table({"synthesize": metrics["synthesize"]}, SYNTHESIS_HEADLINE)]
    if "relabel" in metrics:
        lines += ["## Relabeling (ensemble vote; data card in relabel/data_card.md)", "",
                  *_table({"relabel": metrics["relabel"]}, RELABEL_HEADLINE)]
    for stage, m in metrics.items():
        skipped = {k: v for k, v in m.items() if k.startswith("data/skipped/")}
        if skipped:
            lines.append(f"- {stage}: skipped samples {skipped}")
    for image in images:
        lines += ["", f"![{Path(image).stem}]({image})"]
    return "\n".join(lines) + "\n"


def run_report(cfg: DictConfig) -> dict:
    run_dir = Path(cfg.paths.run_dir)
    out_dir = runtime.stage_dir(cfg, "report")
    metrics = collect_metrics(run_dir)
    if not metrics:
        raise FileNotFoundError(f"no */metrics.json under {run_dir}: run a stage first (e.g. stage=teacher)")
    images = []
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
        from omegaconf import OmegaConf

        from datamodules.real import parse_toy_options
        from datamodules.toyfaces import save_sample_grid

        _, toy_config = parse_toy_options(OmegaConf.to_container(cfg.data.toy, resolve=True))
        save_sample_grid(toy_config, out_dir / "toyfaces_grid.png")
        images.append("toyfaces_grid.png")
    (out_dir / "results.md").write_text(render_results_md(metrics, images, f"SynFER results: {cfg.experiment_name}"))
    runtime.write_metrics(out_dir, metrics)  # flattened to "<stage>/<metric>" keys
    return {"report_dir": str(out_dir), "stages": list(metrics)}

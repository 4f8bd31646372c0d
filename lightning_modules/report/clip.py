"""The zero-shot table of the report: open_clip zero-shot accuracy on the real test faces before and after
contrastive fine-tuning (``stage=clip``) on synthetic, real-captioned or both kinds of pairs, per source and scale,
mean ± std over seeds, and the gain of the fine-tuning. Pure functions over the flat metrics.json files the stage
writes; ``stage=report`` feeds them."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from lightning_modules.report.students import mean_std

ZEROSHOT = "zeroshot/{which}/test/{metric}"
SOURCES = {"synthetic": "synthetic captions", "real": "real, captioned from labels", "both": "real + synthetic"}


@dataclass(frozen=True)
class ClipRun:
    job: str
    train_on: str
    scale: Optional[float]  # None: every synthetic face (or no synthetic face)
    seed: Optional[int]
    steps: Optional[int]
    model: str
    before: dict[str, Optional[float]]  # test acc, mean_class_acc, macro_f1
    after: dict[str, Optional[float]]

    @property
    def source(self) -> str:
        name = SOURCES.get(self.train_on, self.train_on)
        return name if self.scale is None or self.train_on == "real" else f"{name} ×{self.scale:g}"

    @property
    def delta(self) -> Optional[float]:
        if self.before.get("acc") is None or self.after.get("acc") is None:
            return None
        return self.after["acc"] - self.before["acc"]


def clip_run(job: str, metrics: dict) -> Optional[ClipRun]:
    """One ``stage=clip`` metrics.json (flat keys) as a table run; None for another stage's metrics."""
    if ZEROSHOT.format(which="after", metric="acc") not in metrics:
        return None

    def scores(which: str) -> dict[str, Optional[float]]:
        return {m: metrics.get(ZEROSHOT.format(which=which, metric=m)) for m in ("acc", "mean_class_acc", "macro_f1")}

    scale = metrics.get("scale")
    return ClipRun(job, metrics.get("train_on", "synthetic"), None if scale is None else float(scale),
                   metrics.get("seed"), metrics.get("optimizer_steps"), metrics.get("model", "?"), scores("before"),
                   scores("after"))


def group_runs(runs: Sequence[ClipRun]) -> list[tuple[str, list[ClipRun]]]:
    """(source label, its runs over seeds): synthetic, real, both, each by scale."""
    groups: dict[str, list[ClipRun]] = {}
    for run in runs:
        groups.setdefault(run.source, []).append(run)
    order = list(SOURCES)

    def key(item: tuple[str, list[ClipRun]]) -> tuple:
        run = item[1][0]
        return (order.index(run.train_on) if run.train_on in order else len(order), run.scale or 0.0)

    return sorted(groups.items(), key=key)


def _values(runs: Sequence[ClipRun], which: str, metric: str) -> list[float]:
    return [getattr(r, which)[metric] for r in runs if getattr(r, which).get(metric) is not None]


def clip_markdown(runs: Sequence[ClipRun]) -> list[str]:
    """The table with its protocol line; [] without runs. Δ = after − before test accuracy, in points (mean over
    the seeds)."""
    if not runs:
        return []
    lines = ["## Zero-shot (open_clip, prompt templates, real test faces)", "",
             "| fine-tuned on | zero-shot acc before | after | Δ (points) | mean-class acc after | macro-F1 after |",
             "|---|---|---|---|---|---|"]
    for label, rs in group_runs(runs):
        deltas = [r.delta for r in rs if r.delta is not None]
        delta = f"{100 * statistics.fmean(deltas):+.2f}" if deltas else "–"
        lines.append(f"| {label} | {mean_std(_values(rs, 'before', 'acc'))} | {mean_std(_values(rs, 'after', 'acc'))} "
                     f"| {delta} | {mean_std(_values(rs, 'after', 'mean_class_acc'), False)} "
                     f"| {mean_std(_values(rs, 'after', 'macro_f1'), False)} |")
    steps = sorted({r.steps for r in runs if r.steps is not None})
    models = sorted({r.model for r in runs})
    lines += ["", f"Model: {', '.join(models)} (\"config\" = the random-init architecture of clip.model.config); "
                  f"fine-tuning: {', '.join(map(str, steps)) or '?'} optimizer steps."]
    if len(steps) > 1:
        lines.append("**Warning:** the rows were fine-tuned for different numbers of steps; they do not compare at "
                     "equal compute.")
    return lines + [""]


def clip_metrics(runs: Sequence[ClipRun]) -> dict[str, Any]:
    """``clip/<source>/zeroshot_test_acc_{before,after}`` (means over seeds) for the report's metrics.json/wandb."""
    out: dict[str, Any] = {}
    for label, rs in group_runs(runs):
        for which in ("before", "after"):
            accs = _values(rs, which, "acc")
            if accs:
                out[f"clip/{label}/zeroshot_test_acc_{which}"] = statistics.fmean(accs)
    return out

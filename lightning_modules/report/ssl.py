"""The self-supervised table of the report: linear-probe accuracy of backbones pretrained (SimCLR, ``stage=ssl``) on
real, synthetic or both faces, per source and scale, mean ± std over seeds, with the untrained-backbone baseline
and the difference to real-only pretraining. Pure functions over the flat metrics.json files the stage writes;
``stage=report`` feeds them."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from lightning_modules.report.students import mean_std

PROBE = "probe/{which}/test/{metric}"
SOURCES = {"real_only": "real only", "synthetic_only": "synthetic only", "concat": "real + synthetic"}


@dataclass(frozen=True)
class SSLRun:
    job: str
    mode: str
    scale: Optional[float]  # None for real-only pretraining
    seed: Optional[int]
    steps: Optional[int]
    global_batch: Optional[int]
    pretrained: dict[str, Optional[float]]   # test acc, mean_class_acc, macro_f1
    random_init: dict[str, Optional[float]]  # empty without the baseline

    @property
    def source(self) -> str:
        name = SOURCES.get(self.mode, self.mode)
        return name if self.scale is None else f"{name} ×{self.scale:g}"


def is_ssl_metrics(metrics: dict) -> bool:
    return PROBE.format(which="pretrained", metric="acc") in metrics


def ssl_run(job: str, metrics: dict) -> Optional[SSLRun]:
    """One ``stage=ssl`` metrics.json (flat keys) as a table run; None for another stage's metrics."""
    if not is_ssl_metrics(metrics):
        return None
    mode = metrics.get("data/mix/mode") or "real_only"
    scale = metrics.get("data/mix/scale") if mode != "real_only" else None

    def probe(which: str) -> dict[str, Optional[float]]:
        found = {m: metrics.get(PROBE.format(which=which, metric=m)) for m in ("acc", "mean_class_acc", "macro_f1")}
        return found if any(v is not None for v in found.values()) else {}

    return SSLRun(job, mode, None if scale is None else float(scale), metrics.get("seed"),
                  metrics.get("optimizer_steps"), metrics.get("global_batch_size"), probe("pretrained"),
                  probe("random_init"))


def _order(source_runs: tuple[str, list[SSLRun]]) -> tuple:
    run = source_runs[1][0]
    return (list(SOURCES).index(run.mode) if run.mode in SOURCES else len(SOURCES), run.scale or 0.0)


def group_runs(runs: Sequence[SSLRun]) -> list[tuple[str, list[SSLRun]]]:
    """(source label, its runs over seeds), real only first, then synthetic only and real + synthetic by scale."""
    groups: dict[str, list[SSLRun]] = {}
    for run in runs:
        groups.setdefault(run.source, []).append(run)
    return sorted(groups.items(), key=_order)


def _values(runs: Sequence[SSLRun], which: str, metric: str) -> list[float]:
    return [getattr(r, which)[metric] for r in runs if getattr(r, which).get(metric) is not None]


def ssl_markdown(runs: Sequence[SSLRun]) -> list[str]:
    """The table with its protocol line; [] without runs. Δ = difference of the mean probe test accuracy to
    real-only pretraining, in points."""
    if not runs:
        return []
    groups = group_runs(runs)
    real = next((rs for label, rs in groups if rs[0].mode == "real_only"), None)
    real_accs = _values(real, "pretrained", "acc") if real else []
    real_mean = statistics.fmean(real_accs) if real_accs else None
    lines = ["## Self-supervised pretraining (SimCLR, linear probe on the real data)", "",
             "| pretrained on | probe test acc | mean-class acc | macro-F1 | untrained backbone acc | Δ vs real only |",
             "|---|---|---|---|---|---|"]
    for label, rs in groups:
        accs = _values(rs, "pretrained", "acc")
        delta = "–" if real_mean is None or not accs or rs is real else \
            f"{100 * (statistics.fmean(accs) - real_mean):+.2f}"
        lines.append(f"| {label} | {mean_std(accs)} | {mean_std(_values(rs, 'pretrained', 'mean_class_acc'), False)} "
                     f"| {mean_std(_values(rs, 'pretrained', 'macro_f1'), False)} "
                     f"| {mean_std(_values(rs, 'random_init', 'acc'), False)} | {delta} |")
    steps = sorted({r.steps for r in runs if r.steps is not None})
    batches = sorted({r.global_batch for r in runs if r.global_batch is not None})
    lines += ["", f"Pretraining: {', '.join(map(str, steps)) or '?'} optimizer steps, global batch "
                  f"{', '.join(map(str, batches)) or '?'} (negatives per anchor = 2 × batch − 2)."]
    if len(steps) > 1:
        lines.append("**Warning:** the rows were pretrained for different numbers of steps; they do not compare at "
                     "equal compute.")
    if real is None:
        lines.append("No real-only pretraining among these runs: Δ is not shown.")
    return lines + [""]


def ssl_metrics(runs: Sequence[SSLRun]) -> dict[str, Any]:
    """``ssl/<source>/probe_test_acc`` (mean over seeds) for the report's metrics.json and wandb."""
    out: dict[str, Any] = {}
    for label, rs in group_runs(runs):
        accs = _values(rs, "pretrained", "acc")
        if accs:
            out[f"ssl/{label}/probe_test_acc"] = statistics.fmean(accs)
    return out

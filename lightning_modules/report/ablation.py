"""The ablation table behind ``stage=report``: one row per job (its experiment's switches, its students' test
accuracies, the generator's FER-Acc, the vote's agreement, the synthetic set as stage synth_eval judged it), its flat
metrics and bar plot. Pure functions over the records of ``plots``."""
from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from lightning_modules.report.plots import (JobResult, StudentRecord, fmt, fmt_switch, mean_cell, new_figure,
                                            save_figure)
from lightning_modules.report.students import protocol_lines, select

# Ablation switches: column title -> config keys, first present wins (synthesis may override the generator's SG λ).
SWITCHES = {"expression fine-tune": ("generator.data.expression_labels",),
            "AU adapter": ("generator.model.au_adapter",),
            "SG λ": ("synthesis.guidance.embedding_scale", "generator.guidance.embedding_scale"),
            "SG per token": ("synthesis.guidance.per_token", "generator.guidance.per_token"),
            "layout init": ("synthesis.layout_init.enabled",),
            "relabel": ("relabel.enabled",)}
VARIED_ONLY = {"SG per token"}  # a column only when rows differ (a detail of SG, the same in most sweeps)
# The synthetic set as a judge sees it (stage synth_eval): the cumulative ablation's columns, in the paper's shape.
SET_COLUMNS = {"set FER-Acc": "fer_acc", "set AU r": "au_pearson_mean", "set FID": "fid", "set KID": "kid_mean"}


def switches_of(config: dict) -> dict[str, Any]:
    """The ablation switches (SWITCHES) present in a resolved config."""
    out = {}
    for title, keys in SWITCHES.items():
        value = next((v for v in (select(config, k) for k in keys) if v is not None), None)
        if value is not None:
            out[title] = value
    return out


def is_ablation(jobs: Sequence[JobResult]) -> bool:
    """A folder of jobs is an ablation sweep when they ran at least two different experiments."""
    return len({j.experiment for j in jobs if j.experiment}) >= 2


# ------------------------------------------------------------------------------------------------ ablation
@dataclass
class AblationRow:
    """One ablation job: its switches, each student's test accuracies (one per seed), the generator's FER-Acc and how
    often the relabel vote agrees with the synthesis condition (what synthesis SG moves, when the generator is
    shared)."""
    name: str
    job: str
    switches: dict[str, Any]
    runs: dict[str, list[StudentRecord]]  # student (its seeds grouped) -> runs
    mixed: Optional[str]               # the student the bar chart shows (trained with synthetic faces if any)
    generator_fer_acc: Optional[float]
    vote_agreement: Optional[float] = None
    synthetic_set: dict[str, Any] = field(default_factory=dict)  # synth_eval's metrics of the row's synthetic set

    @property
    def students(self) -> dict[str, Optional[float]]:
        """Student -> mean test accuracy over its seeds."""
        return {s: statistics.fmean(r.acc for r in runs) if runs else None for s, runs in self.runs.items()}

    @property
    def real_only(self) -> list[float]:
        """Test accuracies of its real-only students (every seed)."""
        return [r.acc for runs in self.runs.values() for r in runs if r.mode == "real_only"]


def ablation_rows(jobs: Sequence[JobResult]) -> list[AblationRow]:
    """One row per job, named by its experiment (with the job when two jobs share one)."""
    names = [j.experiment or j.name for j in jobs]
    rows = []
    for job, name in zip(jobs, names):
        switches = switches_of(job.config)
        if "relabel" not in switches and "relabel" in job.metrics:
            switches["relabel"] = True
        runs: dict[str, list[StudentRecord]] = {}
        for s in job.students:
            if s.acc is not None:
                runs.setdefault(s.group, []).append(s)
        mixed = next((g for g, rs in runs.items() if rs[0].mode not in (None, "real_only")), next(iter(runs), None))
        rows.append(AblationRow(name if names.count(name) == 1 else f"{name} ({job.name})", job.name, switches,
                                runs, mixed, job.metrics.get("generator", {}).get("eval/fer_acc"),
                                job.metrics.get("relabel", {}).get("data_card/agreement_with_condition_all"),
                                job.metrics.get("synth_eval", {})))
    return rows


def ablation_markdown(rows: Sequence[AblationRow], image: Optional[str] = "ablation.png") -> list[str]:
    """Columns: the switches, every student's test accuracy (mean ± std over seeds, n), the generator's FER-Acc, the
    vote/condition agreement (the last two only when some row has them); then the students' protocol line."""
    switches = [t for t in SWITCHES if any(t in r.switches for r in rows)
                and (t not in VARIED_ONLY or len({r.switches.get(t) for r in rows}) > 1)]
    students = list(dict.fromkeys(s for r in rows for s in r.runs))
    fer = any(r.generator_fer_acc is not None for r in rows)
    vote = any(r.vote_agreement is not None for r in rows)
    sets = [c for c, key in SET_COLUMNS.items() if any(r.synthetic_set.get(key) is not None for r in rows)]
    columns = ["experiment", "job", *switches, *[f"{s} acc" for s in students], *(["generator FER-Acc"] if fer else []),
               *(["vote = condition"] if vote else []), *sets]
    lines = ["## Ablation (one row per job; student accuracy on the real test set"
             + ("; set = the row's synthetic set scored by stage synth_eval" if sets else "") + ")", "",
             "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for r in rows:
        cells = [r.name, r.job, *[fmt_switch(r.switches.get(t)) for t in switches],
                 *[mean_cell(r.runs.get(s)) for s in students], *([fmt(r.generator_fer_acc)] if fer else []),
                 *([fmt(r.vote_agreement)] if vote else []), *[fmt(r.synthetic_set.get(SET_COLUMNS[c])) for c in sets]]
        lines.append("| " + " | ".join(cells) + " |")
    judges = {}  # one entry per judge file: rows reusing a run's judge hold hard links to the same file
    for r in rows:
        if r.synthetic_set.get("judge"):
            judge = str(r.synthetic_set["judge"])
            judges.setdefault(_file_identity(judge), (judge, bool(r.synthetic_set.get("judge_also_guided"))))
    judges = set(judges.values())
    if judges:
        lines += ["", "Synthetic sets judged by " + "; ".join(
            f"`{judge}`" + (" (it also guided SG: FER-Acc overrates guided faces)" if guided else " (did not guide)")
            for judge, guided in sorted(judges)) + "."]
    runs = [(f"{r.name}/{s.stage}", s.protocol) for r in rows for group in r.runs.values() for s in group]
    if runs:
        lines += ["", *protocol_lines(runs, [len(g) for r in rows for g in r.runs.values()], "cell")]
    lines += [""]
    if image:
        lines += [f"![ablation]({image})", ""]
    return lines


def _file_identity(path: str):
    """The file behind ``path`` (device, inode) when it exists, else the path: hard links count once."""
    try:
        stat = os.stat(path)
    except OSError:
        return path
    return stat.st_dev, stat.st_ino


def ablation_metrics(rows: Sequence[AblationRow]) -> dict[str, Any]:
    """Flat ``ablation/<row>/<student>`` -> mean test accuracy over seeds, ``ablation/<row>/generator/fer_acc`` and
    ``ablation/<row>/relabel/agreement_with_condition``."""
    out: dict[str, Any] = {}
    for r in rows:
        out.update({f"ablation/{r.name}/{s}": acc for s, acc in r.students.items()})
        if r.generator_fer_acc is not None:
            out[f"ablation/{r.name}/generator/fer_acc"] = r.generator_fer_acc
        if r.vote_agreement is not None:
            out[f"ablation/{r.name}/relabel/agreement_with_condition"] = r.vote_agreement
        out.update({f"ablation/{r.name}/synth_eval/{key}": r.synthetic_set[key] for key in SET_COLUMNS.values()
                    if r.synthetic_set.get(key) is not None})
    return out


def plot_ablation(rows: Sequence[AblationRow], path: str | Path) -> Path:
    """Bar per row: the mixed student's mean test accuracy (± std over seeds; else any student's); the real-only
    students' mean dashed."""
    shown = [r for r in rows if r.mixed is not None]
    fig = new_figure(max(4.0, 1.3 * len(shown) + 1), 4)
    ax = fig.add_subplot()
    values = [r.students[r.mixed] for r in shown]
    spread = [statistics.stdev(a) if len(a) > 1 else 0.0 for a in ([x.acc for x in r.runs[r.mixed]] for r in shown)]
    bars = ax.bar(range(len(shown)), values, yerr=spread, capsize=3, color="tab:blue")
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(shown)), [f"{r.name}\n({r.mixed})" for r in shown], rotation=20, ha="right", fontsize=8)
    real = [acc for r in rows for acc in r.real_only]
    if real:
        ax.axhline(statistics.fmean(real), color="gray", linestyle="--", label="real-only students (mean)")
        ax.legend(fontsize=8)
    ax.set_ylabel("test accuracy (real test set)")
    ax.set_ylim(0, min(1.0, max([v + e for v, e in zip(values, spread)] + real + [0.0]) * 1.15 + 0.02))
    return save_figure(fig, path)

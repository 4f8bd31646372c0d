"""The few-shot table of the report: one row per ``stage=fewshot`` run (its backbone), one column per K-shot and
method, each cell the mean episode accuracy ± its 95 % interval. Pure functions over the flat metrics.json files the
stage writes; ``stage=report`` feeds them."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

CELL = re.compile(r"^(\d+)shot/([a-z_]+)/acc$")
METHOD_NAMES = {"prototype": "prototype", "linear_probe": "linear probe"}


@dataclass(frozen=True)
class FewShotRun:
    job: str
    backbone: str
    n_way: Optional[int]
    episodes: Optional[int]
    cells: dict[tuple[int, str], tuple[float, Optional[float]]]  # (K, method) -> (mean acc, 95 % half-width)

    @property
    def name(self) -> str:
        """The backbone as a reader knows it: random, or the checkpoint's stage folder (student_mix, ssl, ...)."""
        path = Path(self.backbone)
        return self.backbone if path.suffix != ".ckpt" else path.parent.name


def fewshot_run(job: str, metrics: dict) -> Optional[FewShotRun]:
    """One ``stage=fewshot`` metrics.json (flat keys) as a table row; None for another stage's metrics."""
    cells = {}
    for key, value in metrics.items():
        match = CELL.match(key)
        if match and isinstance(value, (int, float)):
            k, method = int(match.group(1)), match.group(2)
            cells[(k, method)] = (float(value), metrics.get(f"{k}shot/{method}/ci95"))
    if not cells or "backbone" not in metrics:
        return None
    return FewShotRun(job, str(metrics["backbone"]), metrics.get("n_way"), metrics.get("num_episodes"), cells)


def _cell(value: Optional[tuple[float, Optional[float]]]) -> str:
    if value is None:
        return "–"
    acc, ci = value
    return f"{100 * acc:.1f}" + ("" if ci is None else f" ± {100 * ci:.1f}")


def fewshot_markdown(runs: Sequence[FewShotRun]) -> list[str]:
    """Rows = backbones (job), columns = K-shot × method, cells = accuracy % ± 95 % interval; [] without runs."""
    if not runs:
        return []
    columns = sorted({c for r in runs for c in r.cells}, key=lambda c: (c[0], c[1]))
    header = [f"{k}-shot {METHOD_NAMES.get(m, m)}" for k, m in columns]
    lines = ["## Few-shot recognition (frozen backbone, episodes on real faces; accuracy % ± 95 % interval)", "",
             "| backbone | job | " + " | ".join(header) + " |", "|---" * (len(header) + 2) + "|"]
    names = [r.name for r in runs]
    for r in runs:  # two checkpoints from same-named stage folders (e.g. ssl of two runs): their paths tell them apart
        name = r.name if names.count(r.name) == 1 else "/".join(Path(r.backbone).parts[-4:-1])
        lines.append(f"| {name} | {r.job} | " + " | ".join(_cell(r.cells.get(c)) for c in columns) + " |")
    ways = sorted({r.n_way for r in runs if r.n_way is not None})
    episodes = sorted({r.episodes for r in runs if r.episodes is not None})
    lines += ["", f"{', '.join(map(str, ways)) or '?'}-way episodes, {', '.join(map(str, episodes)) or '?'} per K "
                  "(the same seeded episodes for every backbone of one seed)."]
    if len(ways) > 1 or len(episodes) > 1:
        lines.append("**Warning:** the rows used different episode settings; compare within equal ones only.")
    return lines + [""]


def fewshot_metrics(runs: Sequence[FewShotRun]) -> dict[str, Any]:
    """``fewshot/<backbone>/<K>shot/<method>`` -> mean accuracy, for the report's metrics.json."""
    return {f"fewshot/{r.name}/{k}shot/{m}": acc for r in runs for (k, m), (acc, _) in r.cells.items()}

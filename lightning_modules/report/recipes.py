"""The "does it help?" table: FER students grouped by recipe (how synthetic faces enter their training, named from the
``mix`` keys of their saved config) and synthetic scale; cells = mean ± sample std of the real test accuracy over
seeds (n) and the difference to the real-only students; the students' protocol line with the unequal-steps warning;
flat metrics and wandb table rows. Pure functions; ``stage=report`` finds the runs."""
from __future__ import annotations

import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Optional, Sequence

from lightning_modules.report.students import RunProtocol, mean_std, protocol_lines, select

REAL_ONLY = "real_only"
NO_SYNTHETIC = 0.0  # the scale of real-only runs: the table's "none" column, recipes/real_only/0 in the metrics
SYNTHETIC_ONLY = "synthetic_only"
ACC, MEAN_CLASS_ACC = "acc", "mean_class_acc"  # the two tables' metrics (RecipeRun.value)
METRIC_TITLES = {ACC: "test accuracy", MEAN_CLASS_ACC: "mean-class test accuracy"}
# Recipes the plain scaling table already shows: a study of only these needs no recipe table.
PLAIN = (REAL_ONLY, "concat", SYNTHETIC_ONLY)
# mix defaults of runs that predate a key: an older config reads as the recipe it trained.
DEFAULTS: dict[str, Any] = {"mode": REAL_ONLY, "use_relabel": True, "vote_labels": "soft",
                            "synthetic_loss_weight": 1.0, "ratio": 0.5, "pretrain_fraction": 0.5,
                            "min_judge_confidence": None, "judge": "separate", "class_balance": False,
                            "kept_only": True, "synthetic_augment": None}
# The value each recipe file uses for its switch; any other value is written into the name (ratio0.3).
CANONICAL = {"ratio": 0.5, "pretrain": 0.5, "weighted": 0.5, "judge_filtered": 0.3}
# Table order and what each recipe file trains (the legend under the table).
DESCRIPTIONS = {
    REAL_ONLY: "the real train set alone",
    "concat": "real + synthetic faces in one shuffled union, vote soft labels",
    "conditioned": "concat with the conditioned labels (no vote)",
    "hard_labels": "concat with the vote's hard labels only",
    "ratio_weighted": "half real, half synthetic faces in every batch, synthetic loss weight 0.5",
    "pretrain": "synthetic faces for the first half of the steps, then real faces",
    "judge_filtered": "concat with the synthetic faces the judge gives their label p >= 0.3",
    SYNTHETIC_ONLY: "synthetic faces alone, vote soft labels",
}
LABELS = {REAL_ONLY: "real only", SYNTHETIC_ONLY: "synthetic only"}


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"mix.{key} must be a number, got {value!r}")
    return float(value)


def _valued(name: str, key: str, value: Any) -> str:
    value = _number(key, value)
    return name if value == CANONICAL[name] else f"{name}{value:g}"


def _judge_suffix(judge: Any, experiment: Optional[str]) -> str:
    """How a judge-filtered recipe names its judge: nothing for the experiment's separate judge (``separate``, or
    its ``<experiment>/judge/judge.ckpt`` as the recipes sweep passes it), ``_by_guide`` for the guiding classifier
    (it favours the faces it guided), else ``_by_<its run folder>`` (``<run>/judge/judge.ckpt``) or
    ``_by_<file stem>``: a judge trained on other data (e.g. a strong judge) is another recipe."""
    if judge == "separate":
        return ""
    if judge == "guide":
        return "_by_guide"
    path = PurePath(str(judge))
    run = path.parent.parent.name if path.parent.name == "judge" else ""
    if run and (experiment is None or run == experiment):
        return ""
    return f"_by_{run or path.stem}"


def recipe_of(config: Optional[dict]) -> str:
    """The recipe of a student from its resolved config (``mix.*``; missing keys read as today's defaults): the
    recipe file's name for the recipes of experiments/recipe/, else the parts joined by ``_`` (``pretrain0.3``,
    ``ratio_weighted_judge_filtered``). Real-only students are ``real_only`` whatever their other mix keys.
    ValueError (naming the key) for a value no student could have trained with."""
    mix = (config or {}).get("mix") or {}
    if not isinstance(mix, dict):
        raise ValueError(f"mix must be a mapping, got {mix!r}")
    get = (lambda key: DEFAULTS[key] if mix.get(key) is None else mix[key])  # null: the default (or "no filter")
    mode = get("mode")
    resample = select(config or {}, "data.train_resample_size")
    # real faces shrunk before training (the resolution diagnosis): another student than the plain recipe's
    suffix = "" if resample is None else f"_train{resample}px"
    if mode == REAL_ONLY:
        return REAL_ONLY + suffix
    parts = []
    if mode == "ratio":
        parts.append(_valued("ratio", "ratio", get("ratio")))
    elif mode == "pretrain":
        parts.append(_valued("pretrain", "pretrain_fraction", get("pretrain_fraction")))
    elif mode != "concat":
        parts.append(str(mode))
    if not get("use_relabel"):
        parts.append("conditioned")
    elif get("vote_labels") != "soft":
        parts.append(f"{get('vote_labels')}_labels")
    if _number("synthetic_loss_weight", get("synthetic_loss_weight")) != 1.0:
        parts.append(_valued("weighted", "synthetic_loss_weight", get("synthetic_loss_weight")))
    if get("min_judge_confidence") is not None:
        parts.append(_valued("judge_filtered", "min_judge_confidence", get("min_judge_confidence"))
                     + _judge_suffix(get("judge"), (config or {}).get("experiment_name")))
    if get("class_balance"):
        parts.append("class_balanced")
    if not get("kept_only"):
        parts.append("with_dropped")
    if get("synthetic_augment") is not None:
        parts.append("synthetic_augment")
    return ("_".join(parts) or "concat") + suffix


def describe(recipe: str) -> Optional[str]:
    """The legend entry of a recipe: its file's description, or for a judge-filtered recipe with another threshold or
    judge or a recipe on shrunk real faces, the same built from its name (``judge_filtered0.5_by_strong_judge``,
    ``real_only_train32px``); None for other composed names."""
    if recipe in DESCRIPTIONS:
        return DESCRIPTIONS[recipe]
    resampled = re.fullmatch(r"(.+)_train(\d+)px", recipe)
    if resampled and describe(resampled.group(1)):
        return f"{describe(resampled.group(1))}, real train faces shrunk to {resampled.group(2)} px first"
    found = re.fullmatch(r"judge_filtered(\d*\.?\d+)?(?:_by_(.+))?", recipe)
    if not found:
        return None
    threshold, judge = found.group(1) or f"{CANONICAL['judge_filtered']:g}", found.group(2)
    by = "the guiding classifier" if judge == "guide" else (f"the judge {judge}" if judge else "the judge")
    return f"concat with the synthetic faces {by} gives their label p >= {threshold}"


def needs_recipe_table(recipes: Sequence[str]) -> bool:
    """True when some student's recipe is more than the plain real / concat / synthetic-only scaling."""
    return any(r not in PLAIN for r in recipes)


@dataclass(frozen=True)
class RecipeRun:
    """One student run: where it is (``job/stage``), its recipe, synthetic scale (None: every kept face) and test
    accuracy, its training protocol, its experiment."""
    label: str
    recipe: str
    scale: Optional[float]
    acc: float
    protocol: RunProtocol = field(default_factory=RunProtocol)
    experiment: Optional[str] = None
    mean_class_acc: Optional[float] = None  # every class weighs the same: the test set's class mix taken out

    def value(self, metric: str) -> float:
        return self.acc if metric == ACC else self.mean_class_acc


Row = tuple[Optional[str], str]  # (experiment when the table holds several, recipe)


@dataclass
class RecipeTable:
    baseline: list[RecipeRun]
    rows: dict[Row, dict[Optional[float], list[RecipeRun]]]
    multi_experiment: bool
    duplicates: list[str]  # runs left out: a run of the same recipe, scale, seed and experiment came first

    @property
    def scales(self) -> list[Optional[float]]:
        found = {s for cells in self.rows.values() for s in cells if s != NO_SYNTHETIC}
        return sorted(s for s in found if s is not None) + ([None] if None in found else [])

    @property
    def baseline_mean(self) -> Optional[float]:
        return self.baseline_mean_of(ACC)

    def baseline_mean_of(self, metric: str) -> Optional[float]:
        return statistics.fmean(r.value(metric) for r in self.baseline) if self.baseline else None

    @property
    def has_mean_class_acc(self) -> bool:
        return all(r.mean_class_acc is not None for r in self.runs())

    def label(self, row: Row) -> str:
        experiment, recipe = row
        name = LABELS.get(recipe, recipe)
        return f"{experiment}: {name}" if self.multi_experiment else name

    def runs(self) -> list[RecipeRun]:
        return [*self.baseline, *(r for cells in self.rows.values() for runs in cells.values() for r in runs)]


def _order(recipe: str) -> tuple:
    """Real only first, synthetic only (and its variants) last, the recipe files in file order, others by name."""
    known = list(DESCRIPTIONS)
    if is_real_only(recipe):
        return (0, 0, recipe)
    if recipe.startswith(SYNTHETIC_ONLY):
        return (2, recipe != SYNTHETIC_ONLY, recipe)
    return (1, known.index(recipe) if recipe in known else len(known), recipe)


def is_real_only(recipe: str) -> bool:
    """Real only or a variant of it (``real_only_train32px``): no synthetic faces, so no scale."""
    return recipe == REAL_ONLY or recipe.startswith(REAL_ONLY + "_")


def recipe_table(runs: Sequence[RecipeRun], baseline: Optional[Sequence[RecipeRun]] = None) -> RecipeTable:
    """Runs grouped by (experiment, recipe) and scale; ``baseline`` None: the real-only runs among ``runs``. A run
    repeating the recipe, scale, seed and experiment of an earlier one (e.g. a sweep repeating the pipeline's
    student) is left out and listed in ``duplicates``, so n counts distinct seeds."""
    seen: set = set()
    kept, duplicates = [], []
    for r in runs:
        key = (r.experiment, r.recipe, None if is_real_only(r.recipe) else r.scale, r.protocol.seed)
        if r.protocol.seed is not None and key in seen:
            duplicates.append(r.label)
            continue
        seen.add(key)
        kept.append(r)
    if baseline is None:
        baseline = [r for r in kept if r.recipe == REAL_ONLY]
    others = [r for r in kept if r.recipe != REAL_ONLY]
    multi = len({r.experiment for r in others}) > 1
    rows: dict[Row, dict[Optional[float], list[RecipeRun]]] = {}
    for r in sorted(others, key=lambda r: (str(r.experiment) if multi else "", _order(r.recipe))):
        scale = NO_SYNTHETIC if is_real_only(r.recipe) else r.scale  # a real-only variant: the "none" column
        rows.setdefault((r.experiment if multi else None, r.recipe), {}).setdefault(scale, []).append(r)
    return RecipeTable(list(baseline), rows, multi, duplicates)


def fmt_scale(scale: Optional[float]) -> str:
    return "all" if scale is None else f"{float(scale):g}"


def _column(scale: Optional[float]) -> str:
    return "every kept face" if scale is None else f"{float(scale):g}x"


def _stats(runs: Sequence[RecipeRun], metric: str = ACC) -> tuple[float, Optional[float]]:
    values = [r.value(metric) for r in runs]
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def delta_points(runs: Sequence[RecipeRun], table: RecipeTable, metric: str = ACC) -> Optional[float]:
    """Mean ``metric`` of ``runs`` minus the real-only students', in points (None without real-only runs)."""
    base = table.baseline_mean_of(metric)
    return None if base is None or not runs else 100 * (_stats(runs, metric)[0] - base)


def _cell(runs: Optional[Sequence[RecipeRun]], table: RecipeTable, metric: str = ACC) -> str:
    if not runs:
        return "–"
    delta = delta_points(runs, table, metric)
    return mean_std([r.value(metric) for r in runs]) + ("" if delta is None else f", Δ {delta:+.1f}")


def _best_line(table: RecipeTable, metric: str = ACC) -> list[str]:
    """The best cell against real only, and whether the gap exceeds both seed spreads added."""
    cells = [(row, s, runs) for row, c in table.rows.items() for s, runs in c.items() if s != NO_SYNTHETIC]
    if table.baseline_mean is None or not cells:
        return []
    row, scale, runs = max(cells, key=lambda c: _stats(c[2], metric)[0])
    delta = delta_points(runs, table, metric)
    spread, base_spread = _stats(runs, metric)[1], _stats(table.baseline, metric)[1]
    if spread is None or base_spread is None:
        verdict = "one run on a side: the seed spread is not measured"
    else:
        beyond = abs(delta) > 100 * (spread + base_spread)
        verdict = (f"seed spread ± {100 * spread:.1f} and ± {100 * base_spread:.1f} points: "
                   f"{'beyond' if beyond else 'within'} the two spreads added")
    what = "" if metric == ACC else f" ({METRIC_TITLES[metric]})"
    return [f"Best cell{what}: {table.label(row)} at {_column(scale)}, {delta:+.1f} points over real only "
            f"({verdict}).", ""]


def _metric_rows(table: RecipeTable, metric: str) -> list[str]:
    scales = table.scales
    lines = ["| recipe \\ synthetic faces | none | " + " | ".join(_column(s) for s in scales) + " |",
             "|---" * (len(scales) + 2) + "|"]
    if table.baseline:
        lines.append(f"| {LABELS[REAL_ONLY]} | {mean_std([r.value(metric) for r in table.baseline])} | "
                     + " | ".join("–" for _ in scales) + " |")
    for row, cells in table.rows.items():
        lines.append(f"| {table.label(row)} | {_cell(cells.get(NO_SYNTHETIC), table, metric)} | "
                     + " | ".join(_cell(cells.get(s), table, metric) for s in scales) + " |")
    return lines + [""]


def recipes_markdown(table: RecipeTable) -> list[str]:
    """Rows = real only, each recipe, synthetic only; columns = synthetic scale (× the real train set); cells = mean
    ± std (n) of the real test accuracy and Δ (points) to real only, whose one value stands in its own column (no
    synthetic faces: the scale does not apply). Then the legend, the best cell, the same table by mean-class
    accuracy (when every run has one) and the protocol line."""
    lines = ["## Does it help? Recipes (student test accuracy on real data; mean ± sample std over seeds, n; "
             "Δ = points over real only)", "", *_metric_rows(table, ACC)]
    if table.multi_experiment and table.baseline:
        lines += ["Several experiments: every Δ is to the one real-only row (their real-only students pooled).", ""]
    if not table.baseline:
        lines += ["No real-only student found: no differences (train one: `stage=student +recipe=real_only`, or "
                  "give report.baseline).", ""]
    recipes = [REAL_ONLY] * bool(table.baseline) + [recipe for _, recipe in table.rows]
    legend = [f"{r} = {describe(r)}" for r in dict.fromkeys(recipes) if describe(r)]
    if legend:
        lines += ["Recipes: " + "; ".join(legend) + ".", ""]
    lines += _best_line(table)
    if table.has_mean_class_acc:  # a test set whose class mix the synthetic faces lack: accuracy alone misleads
        lines += ["The same students by mean-class test accuracy (every expression weighs the same, so a student "
                  "is not rewarded for following the test set's class mix; the synthetic faces' class mix is the "
                  "plan's `synthesis.plan.class_distribution`):", "", *_metric_rows(table, MEAN_CLASS_ACC),
                  *_best_line(table, MEAN_CLASS_ACC)]
    counts = [len(table.baseline)] * bool(table.baseline) + [len(runs) for c in table.rows.values()
                                                             for runs in c.values()]
    labelled = [(f"{LABELS.get(r.recipe, r.recipe)}" + ("" if is_real_only(r.recipe) else f" ×{fmt_scale(r.scale)}")
                 + f" ({r.label})", r.protocol) for r in table.runs()]
    # the warning names the first runs: the odd budgets first, so it shows which cells trained differently
    budgets = Counter(p.budget for _, p in labelled)
    labelled.sort(key=lambda run: budgets[run[1].budget])
    lines += protocol_lines(labelled, counts, "cell")
    if table.duplicates:
        lines += ["", f"Left out {len(table.duplicates)} run(s) repeating the recipe, scale and seed of a run "
                      f"already in the table (first: {table.duplicates[0]})."]
    return lines + [""]


def _prefix(table: RecipeTable, row: Row) -> str:
    experiment, recipe = row
    return f"recipes/{experiment}/{recipe}" if table.multi_experiment else f"recipes/{recipe}"


def recipes_metrics(table: RecipeTable) -> dict[str, float]:
    """Flat ``recipes/[<experiment>/]<recipe>/<scale>`` -> mean test accuracy; real only as ``recipes/real_only/0``."""
    out = {} if table.baseline_mean is None else {f"recipes/{REAL_ONLY}/0": table.baseline_mean}
    for row, cells in table.rows.items():
        out.update({f"{_prefix(table, row)}/{fmt_scale(s)}": _stats(runs)[0] for s, runs in cells.items()})
    if table.has_mean_class_acc:
        if table.baseline:
            out[f"recipes/{REAL_ONLY}/0/{MEAN_CLASS_ACC}"] = table.baseline_mean_of(MEAN_CLASS_ACC)
        for row, cells in table.rows.items():
            out.update({f"{_prefix(table, row)}/{fmt_scale(s)}/{MEAN_CLASS_ACC}": _stats(runs, MEAN_CLASS_ACC)[0]
                        for s, runs in cells.items()})
    return out


WANDB_COLUMNS = ["experiment", "recipe", "scale", "mean_acc", "std_acc", "n", "delta_points", "min_steps", "max_steps"]


def recipes_wandb_rows(table: RecipeTable) -> list[list[Any]]:
    """One row per cell (WANDB_COLUMNS; real only at scale 0, no delta); the fewest and most optimizer steps of the
    cell's runs (None when not recorded)."""
    def row(experiment, recipe, scale, runs):
        mean, std = _stats(runs)
        steps = sorted({r.protocol.steps for r in runs if r.protocol.steps is not None})
        delta = None if recipe == REAL_ONLY else delta_points(runs, table)
        low, high = (steps[0], steps[-1]) if steps else (None, None)
        return [experiment, recipe, scale, mean, std, len(runs), delta, low, high]

    rows = [row(None, REAL_ONLY, 0.0, table.baseline)] if table.baseline else []
    for (experiment, recipe), cells in table.rows.items():
        rows += [row(experiment, recipe, s, runs) for s, runs in cells.items()]
    return rows

"""How the students of one report table were trained, and whether they can be compared: each run's protocol
(optimizer steps, epochs, train set size, step budget, early stopping, seed), students grouped over their seeds
(mean ± sample std, n), and the protocol line every student table carries, with a warning when the students of a
table did not get the same number of optimizer steps. Pure functions; ``stage=report`` feeds them."""
from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from typing import Any, Optional, Sequence

PROTOCOL_COLUMNS = ("seeds", "epochs", "optimizer steps", "batch size")


def select(config: dict, dotted: str) -> Any:
    """``config["a"]["b"]`` for ``"a.b"``; None when any part is missing."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@dataclass(frozen=True)
class RunProtocol:
    """One classifier run's training, from its metrics.json (+ config.yaml); None where the run did not record it
    (runs written before the suite recorded optimizer steps give them as epochs x batches per epoch)."""
    steps: Optional[int] = None
    epochs: Optional[float] = None
    train_size: Optional[int] = None
    max_steps: Optional[int] = None
    patience: Optional[int] = None
    stopped_early: bool = False
    seed: Optional[int] = None
    batch_size: Optional[int] = None
    group: Optional[str] = None
    planned: Optional[int] = None  # the steps the run was allowed (early stopping may end it sooner)

    @property
    def budget(self) -> Optional[int]:
        """What must be equal between students: the planned steps under early stopping, else the steps taken."""
        return self.planned if self.patience and self.planned is not None else self.steps


def run_protocol(metrics: dict, config: Optional[dict], stage: str) -> RunProtocol:
    config = config or {}
    steps = metrics.get("optimizer_steps")
    epochs, per_epoch = metrics.get("epochs"), metrics.get("train_batches_per_epoch")
    accumulate = int(select(config, "trainer.accumulate_grad_batches") or 1)
    if steps is None and epochs is not None and per_epoch is not None:
        steps = int(epochs) * int(per_epoch) // accumulate
    planned = metrics.get("max_steps")
    if planned is None and metrics.get("max_epochs") is not None and per_epoch is not None:
        planned = int(metrics["max_epochs"]) * -(-int(per_epoch) // accumulate)
    train_size = metrics.get("train_set_size")
    if train_size is None and metrics.get("data/train_size") is not None:
        train_size = int(metrics["data/train_size"]) + int(metrics.get("data/mix/synthetic_size") or 0)
        if metrics.get("data/mix/mode") == "synthetic_only":
            train_size = int(metrics.get("data/mix/synthetic_size") or 0)
    seed = metrics.get("seed", select(config, "student.seed") if select(config, "student.name") == stage else None)
    seed = seed if seed is not None else config.get("seed")
    return RunProtocol(steps, epochs, train_size, metrics.get("max_steps"), metrics.get("early_stopping_patience"),
                       bool(metrics.get("stopped_early")), seed, select(config, "data.batch_size"),
                       metrics.get("student_group") or group_of(stage, seed), planned)


def group_of(stage: str, seed: Optional[int]) -> str:
    """``student_mix_seed2`` -> ``student_mix`` (a seeded pipeline student written before runs recorded their group)."""
    if seed is not None and stage.endswith(f"_seed{seed}") and len(stage) > len(f"_seed{seed}"):
        return stage[:-len(f"_seed{seed}")]
    return re.sub(r"_seed\d+$", "", stage) if re.search(r".+_seed\d+$", stage) else stage


def protocol_of(metrics: dict, config: Optional[dict], stage: str = "") -> dict[str, Any]:
    """The per-run columns of the classifier table: one seed (a stage folder is one run), epochs (passes over the
    run's train set), optimizer steps (per rank) and batch size; None where unknown."""
    p = run_protocol(metrics, config, stage)
    epochs = f"{p.epochs:g}" if isinstance(p.epochs, float) else p.epochs
    return {"seeds": 1, "epochs": epochs, "optimizer steps": p.steps, "batch size": p.batch_size}


# ------------------------------------------------------------------------------------------------ seeds
def mean_std(values: Sequence[float], show_n: bool = True) -> str:
    """``0.6123 ± 0.0210 (n=3)`` (sample std); one value: ``0.6123 (n=1)``; none: a dash."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    n = f" (n={len(values)})" if show_n else ""
    if len(values) == 1:
        return f"{values[0]:.4f}{n}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}{n}"


def _range(values: Sequence[Any]) -> str:
    known = sorted({v for v in values if v is not None})
    if not known:
        return "–"
    show = [f"{v:g}" if isinstance(v, float) else str(v) for v in (known[0], known[-1])]
    return show[0] if len(known) == 1 else f"{show[0]}–{show[1]}"


@dataclass
class StudentGroup:
    """The runs of one student (its seeds) in one table."""
    name: str
    mode: Optional[str]
    runs: list[tuple[dict, RunProtocol]]  # (metrics, protocol) per seed

    def values(self, key: str) -> list[float]:
        return [m[key] for m, _ in self.runs if m.get(key) is not None]


def group_students(rows: dict[str, dict], protocols: dict[str, RunProtocol]) -> list[StudentGroup]:
    """Student stages (``data/mix/mode`` present) grouped by their student (``student_group``), in first-seen order."""
    groups: dict[str, StudentGroup] = {}
    for stage, m in rows.items():
        if m.get("data/mix/mode") is None:
            continue
        p = protocols[stage]
        group = groups.setdefault(p.group or stage, StudentGroup(p.group or stage, m.get("data/mix/mode"), []))
        group.runs.append((m, p))
    return list(groups.values())


STUDENT_COLUMNS = ("test/acc", "test/mean_class_acc", "test/macro_f1")


def students_markdown(groups: Sequence[StudentGroup]) -> list[str]:
    """One row per student: mix, train set size, seeds, mean ± std of the test metrics over seeds (n), steps, epochs;
    then the protocol line (and the unequal-steps warning)."""
    lines = ["## Students (real test set; mean ± sample std over seeds, n = runs)", "",
             "| student | mix | train set | seeds | " + " | ".join(STUDENT_COLUMNS) + " | optimizer steps | epochs |",
             "|---" * (len(STUDENT_COLUMNS) + 6) + "|"]
    for g in groups:
        ps = [p for _, p in g.runs]
        mix = g.mode if g.mode in (None, "real_only") else f"{g.mode} ×{_range(g.values('data/mix/scale'))}"
        seeds = ", ".join(str(p.seed) for p in ps if p.seed is not None) or "–"
        lines.append(f"| {g.name} | {mix or '–'} | {_range([p.train_size for p in ps])} | {seeds} | "
                     + " | ".join(mean_std(g.values(k)) for k in STUDENT_COLUMNS)
                     + f" | {_range([p.steps for p in ps])} | {_range([p.epochs for p in ps])} |")
    labelled = [(f"{g.name}" + (f" (seed {p.seed})" if len(g.runs) > 1 else ""), p) for g in groups for _, p in g.runs]
    return lines + [""] + differences(groups) + protocol_lines(labelled, [len(g.runs) for g in groups]) + [""]


def differences(groups: Sequence[StudentGroup]) -> list[str]:
    """Each student's mean test accuracy minus the real-only student's, with both seed spreads beside it."""
    base = next((g for g in groups if g.mode == "real_only" and g.values("test/acc")), None)
    if base is None:
        return []
    ref = base.values("test/acc")

    def spread(values: list[float]) -> str:
        return f"± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else "one run"

    lines = []
    for g in groups:
        accs = g.values("test/acc")
        if g is base or not accs:
            continue
        delta = 100 * (statistics.fmean(accs) - statistics.fmean(ref))
        lines.append(f"- {g.name} − {base.name}: {delta:+.1f} points of test accuracy (means over n = {len(accs)} "
                     f"and {len(ref)} runs; seed spread {spread(accs)} and {spread(ref)} points).")
    return lines + [""] if lines else []


def protocol_lines(runs: Sequence[tuple[str, RunProtocol]], counts: Sequence[int], unit: str = "student"
                   ) -> list[str]:
    """The protocol of one table's students: optimizer steps per student, step budget, early stopping, seeds and
    ``counts`` (runs per ``unit``: a student, a table cell); a warning when their step budgets differ (the
    comparison then mixes training length with data)."""
    if not runs:
        return []
    protocols = [p for _, p in runs]
    budgets = {label: p.budget for label, p in runs}
    known = {b for b in budgets.values() if b is not None}
    batches = {p.batch_size for p in protocols if p.batch_size is not None}
    batch = f", batch size {_range(list(batches))}" if batches else ""
    if len(known) == 1 and None not in budgets.values():
        steps = f"every student {known.pop()} optimizer steps{batch} (equal steps)"
    elif not known:
        steps = "optimizer steps not recorded"
    else:
        steps = f"{_range(list(known))} optimizer steps per student{batch}"
    budgeted = [p for p in protocols if p.max_steps is not None]
    budget = ("step budget (student.max_steps)" if len(budgeted) == len(protocols)
              else "epochs over each student's own train set (no step budget)" if not budgeted
              else "a step budget for some students only")
    patience = sorted({p.patience for p in protocols if p.patience})
    if patience:
        stopped = sum(p.stopped_early for p in protocols)
        early = (f"early stopping on the real val/acc (patience {_range(patience)} validations; {stopped} of "
                 f"{len(protocols)} runs stopped before their budget)")
    else:
        early = "no early stopping"
    seeds = sorted({p.seed for p in protocols if p.seed is not None})
    n = _range(list(counts))
    seed_text = (f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (n = {n} per {unit})" if seeds
                 else f"n = {n} per {unit}")
    if n == "1":
        seed_text += "; one run each: seed-to-seed variation not measured"
    lines = [f"Protocol: {steps}; {budget}; {early}; the checkpoint with the best real val/acc is tested; "
             f"{seed_text}."]
    if len(known) > 1:
        shown = ", ".join(f"{label}: {b if b is not None else '?'}" for label, b in list(budgets.items())[:8])
        more = f", … ({len(budgets) - 8} more)" if len(budgets) > 8 else ""
        lines += ["", f"> **Warning: the students of this table did NOT get equal optimizer steps** ({shown}{more}). "
                      "They differ in training length as well as in data: give them one budget (student.max_steps, "
                      "or pipeline.equal_student_steps=true) before reading a difference as the data's."]
    return lines

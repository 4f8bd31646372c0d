"""Pure builders behind ``stage=report``: the run records, the scaling table (markdown + flat metrics) and its plot,
and the per-expression grid of synthetic faces (the ablation table: ``ablation.py``). No file discovery here
(lightning_modules/stages/report.py does that)."""
from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from lightning_modules.report.students import RunProtocol, mean_std, protocol_lines

# Mix modes in table order; concat and ratio both train on real + synthetic faces.
MODE_LABELS = {"real_only": "real only", "synthetic_only": "synthetic only", "concat": "real + synthetic (concat)",
               "ratio": "real + synthetic (ratio)"}
# Students whose extra faces are the teacher's pseudo-labels on unlabelled real faces (the self-training baseline):
# their own rows of the scaling table, never averaged with synthetic faces.
SELF_TRAINING = "self-training"
MODE_LABELS.update({f"{mode}/{SELF_TRAINING}": f"real + pseudo-labelled real ({mode})" for mode in ("concat", "ratio")})
def natural_key(text: str) -> list:
    """Sort key that puts job "2" before job "10"."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def fmt(value) -> str:
    """A table cell: floats to 4 decimals (1 above 10), booleans yes/no, None as a dash."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return "–" if value is None else str(value)


def fmt_switch(value) -> str:
    """A config switch: floats as written (λ = 1, not 1.0000)."""
    return f"{value:g}" if isinstance(value, float) else fmt(value)


def fmt_scale(scale: float) -> str:
    return f"{float(scale):g}"


@dataclass
class StudentRecord:
    """One FER student run (a stage folder with ``test/acc`` and mix settings) of one job."""
    job: str
    stage: str
    mode: Optional[str]
    scale: Optional[float]
    acc: Optional[float]
    mean_class_acc: Optional[float] = None
    macro_f1: Optional[float] = None
    experiment: Optional[str] = None
    switches: dict[str, Any] = field(default_factory=dict)
    protocol: RunProtocol = field(default_factory=RunProtocol)
    extra_faces: str = "synthetic"  # or SELF_TRAINING: what the mix added to the real faces
    train_resample: Optional[int] = None  # data.train_resample_size: real train faces shrunk (a diagnosis run)

    @property
    def group(self) -> str:
        """The student this run is a seed of (``student_mix_seed1`` -> ``student_mix``)."""
        return self.protocol.group or self.stage


@dataclass
class JobResult:
    """A run folder: every stage's metrics, the resolved config ({} when no config.yaml could be read), its students."""
    name: str
    metrics: dict[str, dict]
    config: dict
    students: list[StudentRecord]

    @property
    def experiment(self) -> Optional[str]:
        return self.config.get("experiment_name")


# ------------------------------------------------------------------------------------------------ noise
def binomial_se(acc: float, n: int) -> float:
    """Standard error of an accuracy measured on ``n`` independent test faces."""
    return (acc * (1 - acc) / n) ** 0.5


def classifier_notes(rows: dict[str, dict]) -> list[str]:
    """What the classifier table can and cannot show: seeds per row, the test-set noise floor, and students that
    trained more optimizer steps than the real-only one. ``rows``: stage -> metrics merged with ``protocol_of``."""
    lines = ["What this table shows:", "",
             "- **One seed per row** (each row is one training run). Seed-to-seed variation comes on top of the "
             "test-set noise below; the students table averages each student's seeds (pipeline.student_seeds)."]
    measured = [(m["test/acc"], int(m["data/test_size"])) for m in rows.values()
                if m.get("test/acc") is not None and m.get("data/test_size")]
    if measured:
        n = min(size for _, size in measured)
        se = max(binomial_se(acc, size) for acc, size in measured)
        lines.append(f"- Test-set noise alone: ± {100 * se:.1f} points (one standard error, {n} test faces); a "
                     f"difference between two rows below {100 * 2 * 2 ** 0.5 * se:.1f} points (2 standard errors "
                     f"of a difference) is noise.")
    real = {s: m for s, m in rows.items() if m.get("data/mix/mode") == "real_only"}
    base = next((m for s, m in real.items() if s == "student"), next(iter(real.values()), None))
    for stage, m in rows.items():
        mode = m.get("data/mix/mode")
        if base is None or mode in (None, "real_only") or not m.get("optimizer steps") \
                or not base.get("optimizer steps"):
            continue
        ratio = m["optimizer steps"] / base["optimizer steps"]
        if ratio > 1:
            lines.append(f"- {stage} trained {ratio:.2g}x the optimizer steps of the real-only student "
                         f"({m['optimizer steps']} vs {base['optimizer steps']}, same epochs over a larger set): the "
                         f"two differ in training length as well as in data.")
    return lines + [""]


# ------------------------------------------------------------------------------------------------ scaling
@dataclass
class ScalingTable:
    """Test accuracies per (experiment, mode) row and synthetic scale (one per run: seeds and repeated points);
    ``baseline_runs`` = the real-only students (scale 0)."""
    rows: dict[tuple[Optional[str], str], dict[float, list[StudentRecord]]]
    baseline_runs: list[StudentRecord]
    multi_experiment: bool

    @property
    def baseline(self) -> Optional[float]:
        accs = [r.acc for r in self.baseline_runs]
        return statistics.fmean(accs) if accs else None

    @property
    def scales(self) -> list[float]:
        return sorted({s for cells in self.rows.values() for s in cells})

    @property
    def n_cells(self) -> int:
        return sum(len(cells) for cells in self.rows.values())

    def label(self, key: tuple[Optional[str], str]) -> str:
        experiment, mode = key
        name = MODE_LABELS.get(mode, mode)
        return f"{experiment}: {name}" if self.multi_experiment else name

    def runs(self) -> list[tuple[str, RunProtocol]]:
        """(label, protocol) of every run in the table, for its protocol line."""
        out = [(f"{MODE_LABELS['real_only']} ({r.job}/{r.stage})", r.protocol) for r in self.baseline_runs]
        for key, cells in self.rows.items():
            out += [(f"{self.label(key)} ×{fmt_scale(s)} ({r.job}/{r.stage})", r.protocol)
                    for s, runs in cells.items() for r in runs]
        return out


def scaling_table(records: Sequence[StudentRecord], baseline: Optional[Sequence[StudentRecord]] = None
                  ) -> ScalingTable:
    """Students trained with synthetic faces, grouped by mode and ``mix.scale`` (seeds and repeated points of one
    cell are averaged). ``baseline`` None: the real-only students among ``records``. Students on shrunk real faces
    (``train_resample``) are left out: this table compares synthetic set sizes (the recipes table shows them)."""
    records = [r for r in records if r.train_resample is None]
    synthetic = [r for r in records if r.mode not in (None, "real_only") and r.scale is not None and r.acc is not None]
    if baseline is None:
        baseline = [r for r in records if r.mode == "real_only" and r.acc is not None]
    multi = len({r.experiment for r in synthetic}) > 1
    order = list(MODE_LABELS)
    keyed = sorted(synthetic, key=lambda r: (str(r.experiment) if multi else "",
                                             order.index(r.mode) if r.mode in order else len(order), str(r.mode)))
    rows: dict[tuple[Optional[str], str], dict[float, list[StudentRecord]]] = {}
    for r in keyed:
        mode = r.mode if r.extra_faces != SELF_TRAINING else f"{r.mode}/{SELF_TRAINING}"
        rows.setdefault((r.experiment if multi else None, mode), {}).setdefault(float(r.scale), []).append(r)
    return ScalingTable({k: dict(sorted(v.items())) for k, v in rows.items()}, list(baseline), multi)


def mean_cell(runs: Optional[Sequence[StudentRecord]]) -> str:
    """Mean test accuracy, ± sample std and n when the cell holds several runs (seeds)."""
    accs = [r.acc for r in runs or () if r.acc is not None]
    return mean_std(accs, show_n=len(accs) > 1)


def scaling_markdown(table: ScalingTable, image: Optional[str] = "scaling.png") -> list[str]:
    """Rows = mix modes (and the real-only baseline), columns = synthetic scale (× real train size), cells = mean
    test accuracy on real data (± std over seeds, n); then the students' protocol line."""
    scales = table.scales
    lines = ["## Scaling (student test accuracy on real data vs synthetic set size, × the real train set)", "",
             "| mode \\ scale | 0 | " + " | ".join(fmt_scale(s) for s in scales) + " |",
             "|---" * (len(scales) + 2) + "|"]
    if table.baseline_runs:
        lines.append(f"| {MODE_LABELS['real_only']} | {mean_cell(table.baseline_runs)} | "
                     + " | ".join("–" for _ in scales) + " |")
    for key, cells in table.rows.items():
        lines.append(f"| {table.label(key)} | – | " + " | ".join(mean_cell(cells.get(s)) for s in scales) + " |")
    counts = [len(table.baseline_runs)] * bool(table.baseline_runs) + [len(c) for cells in table.rows.values()
                                                                        for c in cells.values()]
    lines += ["", *protocol_lines(table.runs(), counts, "cell"), ""]
    if image:
        lines += [f"![scaling]({image})", ""]
    return lines


def scaling_metrics(table: ScalingTable) -> dict[str, float]:
    """Flat ``scaling/[<experiment>/]<mode>/<scale>`` -> mean accuracy; the baseline as ``scaling/real_only/0``."""
    out = {} if table.baseline is None else {"scaling/real_only/0": table.baseline}
    for (experiment, mode), cells in table.rows.items():
        prefix = f"scaling/{experiment}/{mode}" if table.multi_experiment else f"scaling/{mode}"
        out.update({f"{prefix}/{fmt_scale(s)}": statistics.fmean(r.acc for r in v) for s, v in cells.items()})
    return out


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_scaling(table: ScalingTable, path: str | Path) -> Path:
    """Test accuracy vs synthetic scale, one line per row, the real-only student as a dashed horizontal line."""
    fig = new_figure(6, 4)
    ax = fig.add_subplot()
    for key, cells in table.rows.items():
        scales = list(cells)
        accs = [[r.acc for r in cells[s]] for s in scales]
        ax.errorbar(scales, [statistics.fmean(a) for a in accs], yerr=[statistics.stdev(a) if len(a) > 1 else 0
                                                                        for a in accs],
                    marker="o", capsize=3, label=table.label(key))
    if table.baseline is not None:
        ax.axhline(table.baseline, color="gray", linestyle="--", label=f"real only ({table.baseline:.3f})")
    ax.set_xlabel("synthetic faces (× real train set)")
    ax.set_ylabel("test accuracy (real test set)")
    ax.set_xticks(table.scales)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ sample grid
def pick_per_class(labels: Sequence[int], per_class: int, kept: Optional[Sequence[bool]] = None
                   ) -> dict[int, list[int]]:
    """Class id -> the first ``per_class`` row indices with that label (kept rows only), for classes present."""
    labels = np.asarray(labels, dtype=np.int64)
    mask = labels >= 0 if kept is None else (labels >= 0) & np.asarray(kept, dtype=bool)
    return {int(c): np.flatnonzero(mask & (labels == c))[:per_class].tolist() for c in np.unique(labels[mask])}


def save_synthetic_samples(dataset, per_class: int, path: str | Path, class_names: Sequence[str],
                           max_size: int = 96) -> Path:
    """A labelled grid of a synthetic set (``datasets.Dataset`` in the store's columns): one row per expression
    (``final_label`` when relabelled, else ``target_label``; dropped faces left out), the first ``per_class`` faces,
    blank cells where a class has fewer."""
    import torch
    from PIL import Image

    from lightning_modules.generator.grids import save_labelled_grid

    if per_class < 1:
        raise ValueError(f"report.grid_per_class must be >= 1, got {per_class}")
    column = "final_label" if "final_label" in dataset.column_names else "target_label"
    kept = dataset["kept"] if "kept" in dataset.column_names else None
    labels = dataset[column]
    picked = pick_per_class(labels, per_class, kept)
    if not picked:
        raise ValueError("the synthetic set has no labelled (kept) faces")
    order = [i for c in sorted(picked) for i in picked[c]]
    faces = dict(zip(order, dataset.select(order)["image"]))
    first = next(iter(faces.values()))
    size = min(max(first.size), max_size)
    blank = torch.ones(3, size, size)
    tiles = []
    for c in sorted(picked):
        for i in picked[c]:
            face = faces[i].convert("RGB").resize((size, size), Image.BILINEAR)
            tiles.append(torch.from_numpy(np.asarray(face).copy()).permute(2, 0, 1).float() / 255)
        tiles += [blank] * (per_class - len(picked[c]))
    ids = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(ids[(ids >= 0) & (np.ones_like(ids, bool) if kept is None else np.asarray(kept, bool))])
    names = [f"{class_names[c] if c < len(class_names) else c} ({counts[c]})" for c in sorted(picked)]
    return save_labelled_grid(torch.stack(tiles), names, path, scale=2 if size <= 48 else 1)

"""Synthesis condition plans: which face to generate for every synthetic sample (stage=synthesize).

A plan is a deterministic table with one row per synthetic sample:

    sample_id     f"{id_prefix}{index:08d}"
    seed          base_seed + index (the generator's per-sample noise seed, so 1 GPU and 8 GPUs agree)
    target_label  canonical expression id
    target_aus    (A,) AU intensities in the vocabulary's order, 0..5
    au_mask       (A,) which target AUs are defined (False = unknown, value 0)
    caption       text prompt
    layout_source sample_id of the real face the row starts from (only with layout initialisation,
                  ``attach_layout``; datamodules/layout_sources.py)

Plans reach 5x AffectNet (~1.4 M rows), so only the label column is precomputed; every other column is computed
on demand by ``ConditionPlan.rows``. Two rules make that safe:

* **Labels** follow a deterministic smooth weighted round robin (``class_sequence``): every prefix of the plan
  follows the target class distribution within one sample per class, and for "balanced", "real" and explicit
  weights the sequence does not depend on the plan length, so the 1x plan is the first part of the 5x plan
  (the 5x run can reuse the 1x images).
* **Row i** (AUs, caption) is drawn from ``np.random.SeedSequence([seed, i])`` only (the seeding of
  ``np.random.default_rng([seed, i])``), split into an AU stream and a caption stream, so a row never depends
  on the plan length, on which other rows are requested, or (for the AUs) on the caption settings.

AUs come from the toy renderer's expression prototypes (``au_source="prototype"``) or from the real train set's
per-class AU statistics (``"real_stats"``). Captions come from the generator's caption builder
(``datamodules/caption_builder.py``, the one that captioned its training faces, with the plan's own templates /
attributes when set) or are JSONL prompts filled by that builder, so a face planned for class c is captioned the
way training captioned class c.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from datamodules.caption_builder import CaptionBuilder, check_placeholders
from datamodules.labels import AU_MAX_INTENSITY, EXPRESSIONS, AUVocabulary
from datamodules.plan_config import DISTRIBUTIONS, PlanConfig, _fail, _is_int, load_prompts
from datamodules.toyfaces import EXPRESSION_PROTOTYPES

__all__ = ["PlanConfig", "RealStats", "ConditionPlan", "plan_size", "class_counts", "class_sequence", "build_plan",
           "load_prompts", "DISTRIBUTIONS"]


# ============================================================================================ real stats
@dataclass(frozen=True, eq=False)  # arrays: identity equality, hashable
class RealStats:
    """What a plan needs from the real train set: its size, class counts and per-class AU statistics."""

    num_train: int
    class_counts: np.ndarray   # (K,) int
    au_mean: np.ndarray        # (K, A)
    au_std: np.ndarray         # (K, A)
    au_known: np.ndarray       # (K, A) bool

    def __post_init__(self) -> None:
        k = len(self.class_counts)
        if not (_is_int(self.num_train) and self.num_train >= 1):
            raise ValueError(f"RealStats.num_train must be an int >= 1, got {self.num_train!r}")
        shapes = {name: np.shape(getattr(self, name)) for name in ("au_mean", "au_std", "au_known")}
        if len(set(shapes.values())) != 1 or len(shapes["au_mean"]) != 2 or shapes["au_mean"][0] != k:
            raise ValueError(f"RealStats AU arrays must all be (num_classes={k}, A), got {shapes}")

    @classmethod
    def from_arrays(cls, labels: Sequence[int] | np.ndarray, aus: np.ndarray, au_mask: np.ndarray,
                    num_classes: int) -> "RealStats":
        """Stats of a labelled set; labels -1 (unknown) count towards the size only."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        aus, au_mask = np.asarray(aus, dtype=np.float64), np.asarray(au_mask, dtype=bool)
        if aus.ndim != 2 or aus.shape != au_mask.shape or len(aus) != len(labels):
            raise ValueError(f"RealStats.from_arrays: labels {labels.shape}, aus {aus.shape} and au_mask "
                             f"{au_mask.shape} must be (N,), (N, A), (N, A)")
        bad = labels[(labels < -1) | (labels >= num_classes)]
        if len(bad):
            raise ValueError(f"RealStats.from_arrays: label {int(bad[0])} outside -1..{num_classes - 1}")
        k, a = num_classes, aus.shape[1]
        mean, std, known = np.zeros((k, a)), np.zeros((k, a)), np.zeros((k, a), dtype=bool)
        for c in range(k):
            # Unknown AUs (mask False) are excluded, not averaged in as zeros.
            x, m = aus[labels == c], au_mask[labels == c]
            n = m.sum(axis=0)
            known[c] = n > 0
            mean[c] = np.where(known[c], (x * m).sum(axis=0) / np.maximum(n, 1), 0.0)
            var = ((x - mean[c]) ** 2 * m).sum(axis=0) / np.maximum(n, 1)
            std[c] = np.sqrt(np.where(known[c], var, 0.0))
        counts = np.bincount(labels[labels >= 0], minlength=k).astype(np.int64)
        return cls(num_train=len(labels), class_counts=counts, au_mean=mean, au_std=std, au_known=known)


# ============================================================================================ sizes and labels
def plan_size(config: PlanConfig, real: Optional[RealStats]) -> int:
    """``size``, or ``round(scale * real.num_train)`` (at least 1)."""
    if config.size is not None:
        return int(config.size)
    if real is None:
        raise ValueError("plan.scale needs the real train set size (RealStats), but none was given; "
                         "set plan.size instead")
    n = round(config.scale * real.num_train)
    if n < 1:
        raise ValueError(f"plan.scale={config.scale} x {real.num_train} real samples rounds to 0 samples")
    return n


def _water_fill(n: int, real_counts: np.ndarray) -> np.ndarray:
    """Integer s_c >= 0, sum n, making real_counts + s as equal as possible (s_c = max(0, L - r_c))."""
    r = np.asarray(real_counts, dtype=np.int64)
    added = lambda level: int(np.maximum(level - r, 0).sum())  # noqa: E731  (monotone in level)
    lo, hi = int(r.min()), int(r.max()) + n
    while lo < hi:  # largest integer level L with added(L) <= n
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if added(mid) <= n else (lo, mid - 1)
    s = np.maximum(lo - r, 0)
    # The rest (< number of classes at level L) lifts classes at level L by one: rarest real class first.
    at_level = [c for c in sorted(range(len(r)), key=lambda c: (r[c], c)) if r[c] + s[c] == lo]
    for c in at_level[: n - int(s.sum())]:
        s[c] += 1
    return s


def _target_weights(n: int, distribution: str | Sequence[float], num_classes: int,
                    real_counts: Optional[np.ndarray]) -> np.ndarray:
    """Class weights for ``class_sequence``; only "fill_rare" depends on ``n`` (it returns exact counts)."""
    if isinstance(distribution, str):
        if distribution == "balanced":
            return np.ones(num_classes)
        if distribution not in DISTRIBUTIONS:
            _fail("class_distribution", f"one of {DISTRIBUTIONS} or a list of class weights", distribution)
        if real_counts is None:
            raise ValueError(f'plan.class_distribution="{distribution}" needs the real train class counts '
                             "(RealStats), but none were given")
        real_counts = np.asarray(real_counts, dtype=np.int64)
        if real_counts.shape != (num_classes,) or real_counts.min() < 0:
            raise ValueError(f"plan.class_distribution={distribution!r}: real class counts must be "
                             f"{num_classes} non-negative ints, got {real_counts.tolist()}")
        if distribution == "fill_rare":
            return _water_fill(n, real_counts).astype(np.float64)
        if real_counts.sum() == 0:
            raise ValueError('plan.class_distribution="real": the real train set has no labelled sample')
        return real_counts.astype(np.float64)
    weights = np.asarray([float(w) for w in distribution], dtype=np.float64)
    if weights.shape != (num_classes,):
        raise ValueError(f"plan.class_distribution must have num_classes={num_classes} weights, "
                         f"got {len(weights)}: {list(distribution)}")
    if not (np.all(np.isfinite(weights)) and np.all(weights >= 0) and weights.sum() > 0):
        raise ValueError(f"plan.class_distribution weights must be non-negative with a positive sum, "
                         f"got {list(distribution)}")
    return weights


def class_sequence(n: int, weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """The first ``n`` labels of a smooth weighted round robin over ``weights``, (n,) int64.

    Tijdeman's chairman-assignment schedule (earliest deadline first): with K classes of positive weight and
    sigma = 1 - 1/(2K-2), class c's next sample is released once ``t * p_c - count_c >= 1 - sigma`` and is due
    when that deficit would pass ``sigma``; step t takes the released class due first (ties: lowest id). This
    keeps every prefix within sigma < 1 of its exact share per class (plain largest-deficit-first drifts past
    1 with many small classes), equal weights give plain round robin, zero-weight classes never appear, and
    nothing depends on n, so the result for n is a prefix of the result for any m > n. Integer weights summing
    to n are met exactly, which is how "fill_rare" counts become a sequence.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"class weights must be non-negative with a positive sum, got {w.tolist()}")
    p = (w / w.sum()).tolist()
    live = [c for c, pc in enumerate(p) if pc > 0]
    sigma = 1.0 - 1.0 / (2 * (len(live) - 1)) if len(live) > 1 else 0.0
    release = 1.0 - sigma - 1e-9  # tolerance: with two classes a deficit can sit exactly on the release line
    counts = [0] * len(p)
    out = np.empty(int(n), dtype=np.int64)
    for t in range(1, int(n) + 1):  # plain Python: K <= 8, ~1.5 s per million labels, once per plan
        best, best_due = live[0], math.inf
        for c in live:
            # Recomputed from integers each step (not accumulated), so equal weights tie exactly.
            if t * p[c] - counts[c] >= release and (due := (counts[c] + sigma) / p[c]) < best_due:
                best, best_due = c, due
        counts[best] += 1
        out[t - 1] = best
    return out


def class_counts(n: int, distribution: str | Sequence[float], num_classes: int,
                 real_counts: Optional[np.ndarray] = None) -> np.ndarray:
    """Exact per-class counts (sum n) of an n-sample plan, (num_classes,) int64.

    "fill_rare" gives the water-filling counts; the other distributions give the counts of ``class_sequence``,
    each the floor or ceil of n x share. (Largest remainder gives the same floor/ceil guarantee but is not
    prefix-stable: by the Alabama paradox a class can lose a sample when n grows, which would break the
    1x-plan-is-a-prefix-of-the-5x-plan rule, so counts and sequence share one apportionment.)
    """
    weights = _target_weights(n, distribution, num_classes, real_counts)
    return np.bincount(class_sequence(n, weights), minlength=num_classes).astype(np.int64)


# ============================================================================================ the plan
class ConditionPlan:
    """A lazily computed plan: labels are stored, every other column is computed per requested row."""

    def __init__(self, config: PlanConfig, labels: np.ndarray, vocab: AUVocabulary, real: Optional[RealStats],
                 prompts: list[dict] | None, captioner: CaptionBuilder) -> None:
        if tuple(captioner.aus) != tuple(vocab.aus):
            raise ValueError(f"the caption builder's AUs {list(captioner.aus)} differ from the plan's "
                             f"{list(vocab.aus)}")
        self.config, self.vocab, self.real, self.captioner = config, vocab, real, captioner
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(EXPRESSIONS)):
            raise ValueError(f"plan labels must be canonical ids 0..{len(EXPRESSIONS) - 1}")
        self._prototypes = self._prototype_table(vocab)
        if config.au_source == "real_stats":
            self._check_real(real)
        self._candidates = self._caption_candidates(prompts)
        self.layout = None  # LayoutSources: the real face each row starts from (layout initialisation)

    def attach_layout(self, sources) -> None:
        """Give every row a layout source (``LayoutSources`` built over this plan's labels)."""
        if len(sources) != len(self):
            raise ValueError(f"layout sources cover {len(sources)} rows, the plan has {len(self)}")
        self.layout = sources

    def __len__(self) -> int:
        return len(self.labels)

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes).astype(np.int64)

    # -------------------------------------------------------------------------------------- setup checks
    @staticmethod
    def _prototype_table(vocab: AUVocabulary) -> np.ndarray:
        """(8, A) prototype intensities; prototype AUs outside the vocabulary are dropped."""
        table = np.zeros((len(EXPRESSIONS), len(vocab)))
        for label, proto in EXPRESSION_PROTOTYPES.items():
            for au, value in proto.items():
                if au in vocab.aus:
                    table[label, vocab.index(au)] = value
        return table

    def _check_real(self, real: Optional[RealStats]) -> None:
        if real is None:
            raise ValueError('plan.au_source="real_stats" needs the real train set AU statistics (RealStats), '
                             "but none were given")
        if real.au_mean.shape[1] != len(self.vocab):
            raise ValueError(f'plan.au_source="real_stats": real AU stats have {real.au_mean.shape[1]} AUs, '
                             f"the vocabulary {len(self.vocab)}")
        if len(self.labels) and self.labels.max() >= len(real.class_counts):
            raise ValueError(f'plan.au_source="real_stats": no real AU stats for class {self.labels.max()}')

    def _caption_candidates(self, prompts: list[dict] | None) -> dict[int, list[str]]:
        """Per plan class, the texts a row may fill: the templates, or the prompts for that class / any class."""
        cfg = self.config
        if cfg.captions == "template":
            return {int(c): list(self.captioner.templates) for c in np.unique(self.labels)}
        if prompts is None:
            raise ValueError('plan.captions="jsonl" needs prompts (plan.prompts), but none were given')
        for p in prompts:
            check_placeholders(p["caption"], self.captioner.placeholders, f"plan.prompts line {p.get('line', '?')}")
        out = {}
        for c in np.unique(self.labels):
            out[int(c)] = [p["caption"] for p in prompts if p["label"] is None or p["label"] == c]
            if not out[int(c)]:
                raise ValueError(f"plan.prompts ({cfg.prompts}) has no prompt for class {EXPRESSIONS[c]!r} "
                                 "(add one with that label or one without a label)")
        return out

    # -------------------------------------------------------------------------------------- rows
    def rows(self, indices: Sequence[int] | range) -> dict[str, list]:
        """Columns of the requested rows, in request order; each row depends on its index only."""
        out: dict[str, list] = {k: [] for k in ("sample_id", "seed", "target_label", "target_aus", "au_mask",
                                                "caption")}
        for i in indices:
            i = int(i)
            if not 0 <= i < len(self):
                raise IndexError(f"plan row {i} out of range for a plan of {len(self)} rows")
            label = int(self.labels[i])
            au_rng, caption_rng = (np.random.default_rng(s) for s in
                                   np.random.SeedSequence([self.config.seed, i]).spawn(2))
            aus, mask = self._target_aus(label, au_rng)
            out["sample_id"].append(f"{self.config.id_prefix}{i:08d}")
            out["seed"].append(self.config.base_seed + i)
            out["target_label"].append(label)
            out["target_aus"].append([float(v) for v in aus])
            out["au_mask"].append([bool(m) for m in mask])
            out["caption"].append(self._caption(label, aus, mask, caption_rng))
        if self.layout is not None:
            out["layout_source"] = self.layout.source_ids(indices)
        return out

    def _target_aus(self, label: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        cfg, a = self.config, len(self.vocab)
        if cfg.au_source == "prototype":
            # A prototype defines every AU (absent = 0), so the whole mask is known; only its AUs get noise.
            proto = self._prototypes[label]
            strength = rng.uniform(*cfg.strength_range)
            noise = cfg.au_jitter_std * rng.standard_normal(a)
            aus = np.where(proto > 0, proto * strength + noise, 0.0)
            mask = np.ones(a, dtype=bool)
        else:
            mask = self.real.au_known[label].astype(bool)
            aus = np.where(mask, self.real.au_mean[label] + self.real.au_std[label] * rng.standard_normal(a), 0.0)
        return np.clip(aus, 0.0, AU_MAX_INTENSITY).astype(np.float32), mask

    def _caption(self, label: int, aus: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> str:
        texts = self._candidates[label]
        return self.captioner.fill(texts[int(rng.integers(len(texts)))], label, aus, mask, rng)


def build_plan(config: PlanConfig, num_classes: int, vocab: AUVocabulary, real: Optional[RealStats] = None, *,
               captioner: CaptionBuilder) -> ConditionPlan:
    """Resolve size, class sequence and prompts, and return the lazy plan. ``captioner``: the generator's caption
    builder (``plan.templates`` / ``plan.attributes`` override its own)."""
    if num_classes not in (7, 8):
        raise ValueError(f"num_classes must be 7 or 8, got {num_classes}")
    n = plan_size(config, real)
    real_counts = None if real is None else real.class_counts
    labels = class_sequence(n, _target_weights(n, config.class_distribution, num_classes, real_counts))
    prompts = load_prompts(config.prompts, num_classes) if config.captions == "jsonl" else None
    return ConditionPlan(config, labels, vocab, real, prompts, config.caption_builder(captioner))

"""Ensemble relabelling of synthetic faces (SynFER §1.4) and the data card that summarises it.

Pure tensor logic: the relabel stage feeds it stacked teacher probabilities and stores the result.
Rule per sample: average the voters' probabilities (weighted); below ``threshold`` confidence the sample is marked
dropped (labels still filled so the store keeps one schema); if every voter's argmax agrees the label is hard
(one-hot), otherwise it is the averaged distribution (soft), with ``final_label`` = its argmax.

The class a face was synthesized for can vote too (``condition``): its one-hot joins the average with
``condition_weight``, so "all agree" then means every teacher's argmax is the conditioned class.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torchmetrics.functional import confusion_matrix

ROW_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class VoteResult:
    final_label: torch.Tensor   # (N,) long
    soft_label: torch.Tensor    # (N,K) float; one-hot where voters agree
    is_soft: torch.Tensor       # (N,) bool
    kept: torch.Tensor          # (N,) bool; False = below the confidence threshold
    confidence: torch.Tensor    # (N,) float, max of the averaged probabilities
    voters_agree: torch.Tensor  # (N,) bool; with a condition voter: every voter's argmax is the conditioned class
    condition_weight: Optional[float] = None  # the condition voter's weight; None = it did not vote

    def __len__(self) -> int:
        return int(self.final_label.shape[0])

    @property
    def num_classes(self) -> int:
        return int(self.soft_label.shape[1])


def _as_float_tensor(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be real numbers, got dtype {t.dtype}")
    # float64 for the arithmetic so the threshold comparison is not at the mercy of float32 rounding.
    return t.detach().to(torch.float64)


def _check_weights(weights: Any, num_voters: int, condition_weight: Optional[float] = None) -> torch.Tensor:
    """Normalised weights of the voters, the condition voter's last when ``condition_weight`` is given."""
    if weights is None:
        w = torch.ones(num_voters, dtype=torch.float64)
    else:
        w = _as_float_tensor(weights, "weights").reshape(-1)
        if w.numel() != num_voters:
            raise ValueError(f"weights has {w.numel()} entries but probs has {num_voters} voters")
        if not torch.isfinite(w).all():
            raise ValueError(f"weights must be finite (no NaN/inf), got {w.tolist()}")
        if (w < 0).any():
            raise ValueError(f"weights must be non-negative, got {w.tolist()}")
    if condition_weight is not None:
        c = float(condition_weight)
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"condition_weight must be a finite number >= 0, got {condition_weight}")
        w = torch.cat([w, torch.tensor([c], dtype=torch.float64)])
    if w.sum() <= 0:
        raise ValueError("weights are all zero: at least one voter needs a positive weight")
    return w / w.sum()


def _check_condition(condition: Any, n: int, k: int) -> torch.Tensor:
    cond = torch.as_tensor(np.asarray(condition)).reshape(-1)
    if cond.dtype == torch.bool or (cond.is_floating_point() and not torch.equal(cond, cond.round())):
        raise ValueError("condition must be integer class ids")
    cond = cond.long()
    if cond.numel() != n:
        raise ValueError(f"condition has {cond.numel()} entries but probs has {n} samples")
    bad = cond[(cond < 0) | (cond >= k)]
    if bad.numel():
        raise ValueError(f"condition label {int(bad[0])} is outside [0, {k}) ({bad.numel()} bad entries)")
    return cond


def ensemble_vote(probs: Any, threshold: float = 0.5, weights: Optional[Any] = None, condition: Optional[Any] = None,
                  condition_weight: float = 1.0) -> VoteResult:
    """Relabel N samples from V voters' probabilities ``probs`` (V,N,K); see the module docstring for the rule.

    ``weights`` (length V, non-negative; default 1 each) weight the average; a zero-weight voter abstains from the
    agreement check too, so weighting a voter out removes it entirely. ``condition`` (N class ids, or None) adds
    the conditioned label as a voter with probability vector = its one-hot and weight ``condition_weight`` on the
    scale of ``weights`` (0: it abstains, as with ``condition=None``). ``confidence == threshold`` is kept.
    """
    raw = torch.as_tensor(probs)
    out_dtype = raw.dtype if raw.is_floating_point() else torch.float32  # results keep the caller's precision
    p = _as_float_tensor(raw, "probs")
    if p.dim() != 3:
        raise ValueError(f"probs must be 3-D (voters, samples, classes), got shape {tuple(p.shape)}")
    num_voters, n, k = p.shape
    if num_voters < 1:
        raise ValueError("probs has no voters (V=0): need at least one voter")
    if k < 2:
        raise ValueError(f"probs needs at least 2 classes, got K={k}")
    if not 0.0 <= float(threshold) <= 1.0:  # also rejects NaN
        raise ValueError(f"threshold must lie in [0, 1], got {threshold}")
    w = _check_weights(weights, num_voters, None if condition is None else condition_weight)
    cond = None if condition is None else _check_condition(condition, n, k)
    if torch.isnan(p).any():
        raise ValueError("probs contains NaN")
    if (p < 0).any():
        raise ValueError(f"probs has negative entries (min {p.min().item():.4g}); pass softmax outputs")
    if n == 0:
        empty = torch.zeros(0, dtype=torch.bool)
        return VoteResult(torch.zeros(0, dtype=torch.long), torch.zeros(0, k, dtype=out_dtype), empty, empty,
                          torch.zeros(0, dtype=out_dtype), empty,
                          None if cond is None else float(condition_weight))
    sums = p.sum(dim=2)
    worst = (sums - 1).abs().max()
    if not torch.isfinite(sums).all() or worst > ROW_SUM_TOLERANCE:
        raise ValueError(f"probability rows must sum to 1 (worst off by {worst.item():.4g}); "
                         "pass softmax outputs, not logits")
    p = p / sums.unsqueeze(-1)  # absorb the tolerated slop so soft labels are exact distributions
    if cond is not None:  # the conditioned label as one more voter, its one-hot as its probabilities
        p = torch.cat([p, torch.nn.functional.one_hot(cond, k).to(torch.float64).unsqueeze(0)])

    mean = torch.einsum("v,vnk->nk", w, p)
    confidence, mean_top = mean.max(dim=1)
    votes = p.argmax(dim=2)[w > 0]                     # (V', N) argmax of voters that count
    agree = (votes == votes[:1]).all(dim=0)
    # Where voters agree their class is also the argmax of the mean (up to ties), so the hard label uses theirs.
    final = torch.where(agree, votes[0], mean_top)
    one_hot = torch.nn.functional.one_hot(final, k).to(torch.float64)
    soft = torch.where(agree.unsqueeze(1), one_hot, mean)
    return VoteResult(final_label=final.long(), soft_label=soft.to(out_dtype), is_soft=~agree,
                      kept=confidence >= float(threshold), confidence=confidence.to(out_dtype),
                      voters_agree=agree, condition_weight=None if cond is None else float(condition_weight))


def _rate(num: int, den: int) -> Optional[float]:
    return None if den == 0 else num / den


def data_card(conditioned_label: Any, result: VoteResult, class_names: Sequence[str]) -> dict:
    """JSON-ready summary of a relabelled synthetic set; rates are fractions in [0,1] (None when undefined)."""
    k = result.num_classes
    names = [str(c) for c in class_names]
    if len(names) != k:
        raise ValueError(f"class_names has {len(names)} names but the vote result has {k} classes")
    cond = torch.as_tensor(np.asarray(conditioned_label)).reshape(-1)
    if cond.is_floating_point() and not torch.equal(cond, cond.round()):
        raise ValueError("conditioned_label must be integer class ids")
    cond = cond.long()
    if cond.numel() != len(result):
        raise ValueError(f"conditioned_label has {cond.numel()} entries but the vote result has {len(result)}")
    bad = cond[(cond < 0) | (cond >= k)]
    if bad.numel():
        raise ValueError(f"conditioned label {int(bad[0])} is outside [0, {k}) ({bad.numel()} bad entries)")

    kept, final = result.kept, result.final_label
    n_kept = int(kept.sum())
    match = final == cond
    before = torch.bincount(cond, minlength=k)
    after = torch.bincount(final[kept], minlength=k)
    # torchmetrics: rows = target (conditioned), cols = preds (final).
    confusion = confusion_matrix(final[kept], cond[kept], task="multiclass", num_classes=k)
    # which rule decided each face: every face falls under exactly one
    rules = {"hard": ~result.is_soft & kept, "soft": result.is_soft & kept, "dropped": ~kept}
    by_class = {rule: torch.bincount(cond[mask], minlength=k) for rule, mask in rules.items()}
    counts = {rule: int(mask.sum()) for rule, mask in rules.items()}
    voting = result.condition_weight is not None
    return {
        "total": len(result),
        "kept": n_kept,
        **counts,
        **{f"{rule}_share": _rate(count, len(result)) for rule, count in counts.items()},
        "condition_voter": {"enabled": voting, "weight": result.condition_weight if voting else None},
        "class_names": names,
        "per_class": [{"id": i, "class": names[i], "before": int(before[i]), "after": int(after[i]),
                       "change": int(after[i] - before[i]),
                       **{rule: int(by_class[rule][i]) for rule in rules}} for i in range(k)],
        "agreement_with_condition_kept": _rate(int((match & kept).sum()), n_kept),
        "agreement_with_condition_all": _rate(int(match.sum()), len(result)),
        "voter_agreement_rate": _rate(int(result.voters_agree.sum()), len(result)),
        "confusion_matrix": confusion.tolist(),
    }


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _signed(x: int) -> str:
    return f"{x:+d}" if x else "0"


def data_card_markdown(card: dict) -> str:
    """Readable markdown page for a :func:`data_card`."""
    total, kept = card["total"], card["kept"]
    names = card["class_names"]
    condition = card["condition_voter"]
    voters = (f"the teachers and the conditioned label (weight {condition['weight']:g})" if condition["enabled"]
              else "the teachers (the conditioned label does not vote)")
    lines = [
        "# Synthetic data card", "",
        f"- Samples: {total} total, {kept} kept ({_pct(_rate(kept, total))}), "
        f"{card['dropped']} dropped ({_pct(_rate(card['dropped'], total))})",
        f"- Kept labels: {card['hard']} hard, {card['soft']} soft ({_pct(_rate(card['soft'], kept))} soft)",
        f"- Final label = conditioned label: {_pct(card['agreement_with_condition_kept'])} of kept, "
        f"{_pct(card['agreement_with_condition_all'])} of all",
        f"- Voters: {voters}; all agree: {_pct(card['voter_agreement_rate'])}", "",
        "## Which rule labelled each face", "",
        "| rule | faces | share |", "|---|---:|---:|",
        f"| all voters agree: hard label | {card['hard']} | {_pct(card['hard_share'])} |",
        f"| voters disagree: soft label (the weighted mean) | {card['soft']} | {_pct(card['soft_share'])} |",
        f"| dropped: mean confidence below the threshold | {card['dropped']} | {_pct(card['dropped_share'])} |", "",
        "## Per class (before = conditioned, after = final label among kept; hard / soft / dropped by conditioned "
        "class)", "",
        "| class | before | after | change | hard | soft | dropped |", "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {c['class']} | {c['before']} | {c['after']} | {_signed(c['change'])} | "
              + " | ".join(f"{c[r]} ({_pct(_rate(c[r], c['before']))})" for r in ("hard", "soft", "dropped")) + " |"
              for c in card["per_class"]]
    lines += ["", "## Confusion (rows = conditioned, columns = final; kept only)", "",
              "| conditioned \\ final | " + " | ".join(names) + " |",
              "|---|" + "---:|" * len(names)]
    lines += [f"| {name} | " + " | ".join(str(v) for v in row) + " |"
              for name, row in zip(names, card["confusion_matrix"])]
    return "\n".join(lines) + "\n"

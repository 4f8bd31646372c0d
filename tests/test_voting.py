"""Ensemble relabel rule (SynFER §1.4) and the synthetic data card."""
import json
import math

import numpy as np
import pytest
import torch

from datamodules.labels import EXPRESSIONS
from lightning_modules.labeling.voting import VoteResult, data_card, data_card_markdown, ensemble_vote


def P(*voters):
    """(V,N,K) float64 tensor from nested lists, one list of rows per voter."""
    return torch.tensor(voters, dtype=torch.float64)


def test_agreement_gives_hard_one_hot_of_agreed_class():
    # Class 1 is a close runner-up for both voters; agreement must still give a clean one-hot of class 0.
    r = ensemble_vote(P([[0.45, 0.40, 0.15]], [[0.50, 0.45, 0.05]]), threshold=0.3)
    assert r.voters_agree.tolist() == [True] and r.is_soft.tolist() == [False] and r.kept.tolist() == [True]
    assert r.final_label.tolist() == [0]
    assert torch.equal(r.soft_label, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    assert r.confidence.item() == pytest.approx(0.475)
    assert r.final_label.dtype == torch.long and len(r) == 1


def test_disagreement_gives_mean_probabilities_as_soft_label():
    a, b = [0.1, 0.2, 0.7], [0.1, 0.5, 0.4]
    r = ensemble_vote(P([a], [b]))
    mean = torch.tensor([[0.1, 0.35, 0.55]], dtype=torch.float64)
    assert r.voters_agree.tolist() == [False] and r.is_soft.tolist() == [True] and r.kept.tolist() == [True]
    assert torch.allclose(r.soft_label, mean)
    assert r.soft_label.sum().item() == pytest.approx(1.0)
    assert r.final_label.tolist() == [2]
    assert r.confidence.item() == pytest.approx(0.55)


def test_low_confidence_is_dropped_but_labels_filled():
    probs = P([[0.4, 0.3, 0.3], [0.3, 0.3, 0.4]], [[0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])
    r = ensemble_vote(probs, threshold=0.5)
    assert r.kept.tolist() == [False, False]
    assert len(r) == 2  # dropped samples stay in the result
    # Sample 0 disagrees -> soft mean; sample 1 agrees -> hard one-hot, even though dropped.
    assert r.is_soft.tolist() == [True, False]
    assert r.final_label.tolist() == [1, 2]
    assert torch.allclose(r.soft_label[0], torch.tensor([0.3, 0.4, 0.3], dtype=torch.float64))
    assert torch.equal(r.soft_label[1], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    assert torch.allclose(r.confidence, torch.tensor([0.4, 0.4], dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_confidence_equal_to_threshold_is_kept(dtype):
    # Mean = [0.5, 0.375, 0.125], exactly representable: confidence is exactly 0.5.
    probs = torch.tensor([[[0.75, 0.25, 0.0]], [[0.25, 0.5, 0.25]]], dtype=dtype)
    assert ensemble_vote(probs, threshold=0.5).kept.tolist() == [True]
    assert ensemble_vote(probs, threshold=0.5 + 1e-6).kept.tolist() == [False]
    r = ensemble_vote(probs, threshold=0.5)
    assert r.soft_label.dtype == dtype and r.confidence.dtype == dtype  # caller's precision is kept


def test_weights_change_the_soft_label():
    probs = P([[0.2, 0.8]], [[0.9, 0.1]])
    equal = ensemble_vote(probs, threshold=0.0)
    assert torch.allclose(equal.soft_label, torch.tensor([[0.55, 0.45]], dtype=torch.float64))
    assert equal.final_label.tolist() == [0]
    weighted = ensemble_vote(probs, threshold=0.0, weights=[3.0, 1.0])
    assert torch.allclose(weighted.soft_label, torch.tensor([[0.375, 0.625]], dtype=torch.float64))
    assert weighted.final_label.tolist() == [1] and weighted.is_soft.tolist() == [True]
    # Only the ratio matters.
    assert torch.allclose(ensemble_vote(probs, weights=torch.tensor([6.0, 2.0])).soft_label, weighted.soft_label)


def test_zero_weight_voter_abstains():
    probs = P([[0.2, 0.8]], [[0.9, 0.1]])
    r = ensemble_vote(probs, threshold=0.5, weights=[1.0, 0.0])
    assert r.voters_agree.tolist() == [True] and r.is_soft.tolist() == [False]
    assert r.final_label.tolist() == [1] and r.confidence.item() == pytest.approx(0.8)


def test_single_voter_always_agrees():
    probs = P([[0.1, 0.9], [0.6, 0.4], [0.3, 0.7]])
    r = ensemble_vote(probs, threshold=0.65)
    assert r.voters_agree.all() and not r.is_soft.any()
    assert r.final_label.tolist() == [1, 0, 1]
    assert r.kept.tolist() == [True, False, True]
    assert torch.equal(r.soft_label, torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))


def test_numpy_input_and_tolerated_row_slop_is_renormalised():
    probs = np.array([[[0.6, 0.4005]], [[0.2, 0.7995]]], dtype=np.float32)  # first row sums to 1.0005
    r = ensemble_vote(probs)
    assert r.is_soft.tolist() == [True]
    assert r.soft_label.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_empty_sample_axis_gives_empty_result():
    r = ensemble_vote(torch.zeros(2, 0, 8))
    assert len(r) == 0 and r.soft_label.shape == (0, 8) and r.kept.shape == (0,)
    card = data_card([], r, EXPRESSIONS)
    assert card["total"] == 0 and card["agreement_with_condition_kept"] is None
    json.dumps(card)
    assert "n/a" in data_card_markdown(card)


GOOD = P([[0.6, 0.4]], [[0.7, 0.3]])


@pytest.mark.parametrize("probs, kwargs, match", [
    (torch.full((4, 2), 0.5), {}, "3-D"),
    (torch.zeros(0, 3, 2), {}, "no voters"),
    (torch.ones(1, 3, 1), {}, "at least 2 classes"),
    (P([[1.2, -0.2]]), {}, "negative"),
    (P([[2.0, -1.0, 0.5]], [[0.2, 0.3, 0.5]]), {}, "negative"),
    (P([[1.5, 0.7]]), {}, "softmax"),
    (P([[0.5, 0.49]]), {}, "sum to 1"),
    (P([[float("nan"), 1.0]]), {}, "NaN"),
    (GOOD, {"threshold": -0.1}, r"threshold must lie in \[0, 1\]"),
    (GOOD, {"threshold": 1.5}, r"threshold must lie in \[0, 1\]"),
    (GOOD, {"threshold": float("nan")}, "threshold"),
    (GOOD, {"weights": [1.0]}, "1 entries but probs has 2 voters"),
    (GOOD, {"weights": [1.0, -1.0]}, "non-negative"),
    (GOOD, {"weights": [0.0, 0.0]}, "all zero"),
    (GOOD, {"weights": [1.0, float("nan")]}, "finite"),
])
def test_invalid_input_is_rejected(probs, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ensemble_vote(probs, **kwargs)


# Hand-computed example, K=3 (neutral, happy, sad), threshold 0.5:
#   s  voter A            voter B            agree  mean               conf  kept  final  cond
#   0  .9 .05 .05         .8 .1 .1           yes    .85 .075 .075      .85   yes   0      0
#   1  .1 .7 .2           .2 .6 .2           yes    .15 .65 .2         .65   yes   1      0
#   2  .1 .2 .7           .1 .5 .4           no     .1 .35 .55         .55   yes   2(s)   2
#   3  .4 .3 .3           .2 .5 .3           no     .3 .4 .3           .4    no    1(s)   1
#   4  .2 .2 .6           .1 .1 .8           yes    .15 .15 .7         .7    yes   2      1
#   5  .3 .3 .4           .3 .3 .4           yes    .3 .3 .4           .4    no    2      2
EXAMPLE = P(
    [[.9, .05, .05], [.1, .7, .2], [.1, .2, .7], [.4, .3, .3], [.2, .2, .6], [.3, .3, .4]],
    [[.8, .1, .1], [.2, .6, .2], [.1, .5, .4], [.2, .5, .3], [.1, .1, .8], [.3, .3, .4]])
COND = [0, 0, 2, 1, 1, 2]
NAMES = EXPRESSIONS[:3]


def test_example_vote():
    r = ensemble_vote(EXAMPLE, threshold=0.5)
    assert r.final_label.tolist() == [0, 1, 2, 1, 2, 2]
    assert r.kept.tolist() == [True, True, True, False, True, False]
    assert r.is_soft.tolist() == [False, False, True, True, False, False]
    assert r.voters_agree.tolist() == [True, True, False, False, True, True]


def test_data_card_counts_rates_and_confusion():
    card = data_card(torch.tensor(COND), ensemble_vote(EXAMPLE, threshold=0.5), NAMES)
    assert (card["total"], card["kept"], card["dropped"], card["soft"], card["hard"]) == (6, 4, 2, 1, 3)
    assert [c["before"] for c in card["per_class"]] == [2, 2, 2]
    assert [c["after"] for c in card["per_class"]] == [1, 1, 2]
    assert [c["change"] for c in card["per_class"]] == [-1, -1, 0]
    assert card["agreement_with_condition_kept"] == pytest.approx(2 / 4)
    assert card["agreement_with_condition_all"] == pytest.approx(4 / 6)
    assert card["voter_agreement_rate"] == pytest.approx(4 / 6)
    # Rows = conditioned, cols = final, kept only (asymmetric, so a transpose would fail).
    assert card["confusion_matrix"] == [[1, 1, 0], [0, 0, 1], [0, 0, 1]]
    # which rule labelled each face, overall and by conditioned class (see the table above)
    assert (card["hard_share"], card["soft_share"], card["dropped_share"]) == pytest.approx((3 / 6, 1 / 6, 2 / 6))
    assert [(c["hard"], c["soft"], c["dropped"]) for c in card["per_class"]] == [(2, 0, 0), (1, 0, 1), (0, 1, 1)]
    assert card["condition_voter"] == {"enabled": False, "weight": None}
    assert json.loads(json.dumps(card)) == card


def test_data_card_markdown_shows_names_and_numbers():
    md = data_card_markdown(data_card(np.array(COND), ensemble_vote(EXAMPLE, threshold=0.5), NAMES))
    for name in NAMES:
        assert name in md
    for text in ("6 total", "4 kept (66.7%)", "2 dropped (33.3%)", "3 hard, 1 soft (25.0% soft)",
                 "50.0% of kept", "66.7% of all",
                 "the teachers (the conditioned label does not vote); all agree: 66.7%",
                 "| all voters agree: hard label | 3 | 50.0% |", "| voters disagree: soft label",
                 "| 1 | 16.7% |", "| dropped: mean confidence below the threshold | 2 | 33.3% |",
                 "| neutral | 2 | 1 | -1 | 2 (100.0%) | 0 (0.0%) | 0 (0.0%) |",
                 "| sad | 2 | 2 | 0 | 0 (0.0%) | 1 (50.0%) | 1 (50.0%) |",
                 "| conditioned \\ final | neutral | happy | sad |", "| happy | 0 | 0 | 1 |"):
        assert text in md, text


def test_data_card_invariants_on_random_8_class_set():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 200, 8, generator=g) * 2, dim=-1)
    cond = torch.randint(0, 8, (200,), generator=g)
    r = ensemble_vote(probs, threshold=0.4)
    card = data_card(cond, r, EXPRESSIONS)
    cm = np.array(card["confusion_matrix"])
    assert cm.sum() == card["kept"] == card["soft"] + card["hard"]
    assert card["hard"] + card["soft"] + card["dropped"] == 200
    assert card["hard_share"] + card["soft_share"] + card["dropped_share"] == pytest.approx(1.0)
    assert [c["hard"] + c["soft"] + c["dropped"] for c in card["per_class"]] == [c["before"] for c in card["per_class"]]
    assert cm.sum(axis=0).tolist() == [c["after"] for c in card["per_class"]]
    assert cm.sum(axis=1).tolist() == torch.bincount(cond[r.kept], minlength=8).tolist()
    assert math.isclose(card["agreement_with_condition_kept"], np.trace(cm) / cm.sum())
    assert torch.allclose(r.soft_label.sum(dim=1), torch.ones(200))
    assert torch.equal(r.final_label, r.soft_label.argmax(dim=1))


@pytest.mark.parametrize("cond, names, match", [
    ([0, 0, 2, 9, 1, 2], NAMES, "conditioned label 9"),
    ([0, 0, 2, -1, 1, 2], NAMES, "conditioned label -1"),
    ([0, 1], NAMES, "2 entries but the vote result has 6"),
    (COND, EXPRESSIONS, "8 names but the vote result has 3 classes"),
])
def test_data_card_rejects_bad_input(cond, names, match):
    with pytest.raises(ValueError, match=match):
        data_card(cond, ensemble_vote(EXAMPLE), names)


def test_vote_result_is_frozen():
    r = ensemble_vote(GOOD)
    assert isinstance(r, VoteResult)
    with pytest.raises(AttributeError):
        r.kept = torch.zeros(1, dtype=torch.bool)


# ---------------------------------------------------------------------- the conditioned label as a voter
# Two teachers, K=3, threshold 0.5. A and B both pick class 0 (A .6 .3 .1, B .5 .4 .1); the face was made for
# `cond`; `weight` is the condition voter's (None: it does not vote). Hand-computed means:
#   agree + cond 0, w 1:    (A+B+e0)/3 = .7 .233 .067       -> hard 0, conf .7
#   agree, cond 1, w 1:     (A+B+e1)/3 = .367 .567 .067     -> soft, final 1 (the condition outvotes), conf .567
#   agree, cond 1, w .5:    (A+B+.5e1)/2.5 = .44 .48 .08     -> soft, final 1, conf .48 < .5: dropped
#   agree, cond 1, w 3:     (A+B+3e1)/5 = .22 .74 .04        -> soft (teachers still disagree with it), final 1
#   agree, cond 1, w 0/off: (A+B)/2 = .55 .35 .1             -> hard 0, conf .55 (the teachers alone)
AGREE = P([[.6, .3, .1]], [[.5, .4, .1]])
# A picks 0, B picks 1: with cond 1 (w 1) (A+B+e1)/3 = .267 .667 .067; cond 0: .6 .333 .067; off: (A+B)/2 =
# .4 .5 .1 (conf = threshold)
SPLIT = P([[.6, .3, .1]], [[.2, .7, .1]])


@pytest.mark.parametrize("probs, cond, weight, final, soft, kept, agree, label, conf", [
    (AGREE, 0, 1.0, 0, False, True, True, [1.0, 0.0, 0.0], 0.7),
    (AGREE, 1, 1.0, 1, True, True, False, [1.1 / 3, 1.7 / 3, 0.2 / 3], 1.7 / 3),
    (AGREE, 1, 0.5, 1, True, False, False, [0.44, 0.48, 0.08], 0.48),
    (AGREE, 1, 3.0, 1, True, True, False, [0.22, 0.74, 0.04], 0.74),
    (AGREE, 1, 0.0, 0, False, True, True, [1.0, 0.0, 0.0], 0.55),       # weight 0: abstains, as off
    (AGREE, 1, None, 0, False, True, True, [1.0, 0.0, 0.0], 0.55),      # off
    (AGREE, 0, None, 0, False, True, True, [1.0, 0.0, 0.0], 0.55),
    (SPLIT, 1, 1.0, 1, True, True, False, [0.8 / 3, 2.0 / 3, 0.2 / 3], 2.0 / 3),
    (SPLIT, 1, None, 1, True, True, False, [0.4, 0.5, 0.1], 0.5),
    (SPLIT, 0, 1.0, 0, True, True, False, [0.6, 1.0 / 3, 0.2 / 3], 0.6),  # the condition sides with A
])
def test_condition_voter_rule(probs, cond, weight, final, soft, kept, agree, label, conf):
    on = weight is not None
    r = ensemble_vote(probs, threshold=0.5, condition=[cond] if on else None, condition_weight=weight if on else 1.0)
    assert r.final_label.tolist() == [final] and r.is_soft.tolist() == [soft]
    assert r.kept.tolist() == [kept] and r.voters_agree.tolist() == [agree]
    assert torch.allclose(r.soft_label, torch.tensor([label], dtype=torch.float64))
    assert r.confidence.item() == pytest.approx(conf)
    assert r.condition_weight == weight


def test_condition_weight_is_on_the_scale_of_the_voter_weights():
    # teachers weighted 2 and 2 with the condition at 2 is the same vote as 1, 1 and 1
    a = ensemble_vote(SPLIT, condition=[1], condition_weight=2.0, weights=[2.0, 2.0])
    b = ensemble_vote(SPLIT, condition=[1], condition_weight=1.0)
    assert torch.allclose(a.soft_label, b.soft_label) and torch.equal(a.kept, b.kept)
    # the teachers' default weight is 1 each: the condition at 2 counts as much as both together
    c = ensemble_vote(SPLIT, condition=[2], condition_weight=2.0)
    assert torch.allclose(c.soft_label, torch.tensor([[0.2, 0.25, 0.55]], dtype=torch.float64))


def test_all_agree_means_every_teacher_picks_the_condition():
    g = torch.Generator().manual_seed(1)
    cond = torch.randint(0, 8, (300,), generator=g)
    # teachers that lean towards the condition: some faces have all three on it, others not
    probs = torch.softmax(torch.randn(3, 300, 8, generator=g) + 2.5 * torch.nn.functional.one_hot(cond, 8), dim=-1)
    r = ensemble_vote(probs, threshold=0.0, condition=cond)
    teachers_pick_cond = (probs.argmax(-1) == cond).all(dim=0)
    assert torch.equal(r.voters_agree, teachers_pick_cond) and 0 < int(teachers_pick_cond.sum()) < 300
    assert torch.equal(r.final_label[r.voters_agree], cond[r.voters_agree])
    card = data_card(cond, r, EXPRESSIONS)
    assert card["condition_voter"] == {"enabled": True, "weight": 1.0}
    assert card["hard"] == int(teachers_pick_cond.sum()) and card["dropped"] == 0
    md = data_card_markdown(card)
    assert "the teachers and the conditioned label (weight 1)" in md


@pytest.mark.parametrize("kwargs, match", [
    ({"condition": [0], "condition_weight": -1.0}, "condition_weight must be a finite number >= 0"),
    ({"condition": [0], "condition_weight": float("nan")}, "condition_weight must be a finite number >= 0"),
    ({"condition": [0], "condition_weight": float("inf")}, "condition_weight"),
    ({"condition": [3]}, r"condition label 3 is outside \[0, 2\)"),
    ({"condition": [-1]}, r"condition label -1 is outside \[0, 2\)"),
    ({"condition": [0, 1]}, "condition has 2 entries but probs has 1 samples"),
    ({"condition": [0.5]}, "integer class ids"),
    ({"condition": [0], "condition_weight": 0.0, "weights": [0.0, 0.0]}, "all zero"),
])
def test_bad_condition_voter_input_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ensemble_vote(GOOD, **kwargs)


def test_condition_voter_on_an_empty_set():
    r = ensemble_vote(torch.zeros(2, 0, 8), condition=[], condition_weight=0.5)
    assert len(r) == 0 and r.condition_weight == 0.5
    assert data_card([], r, EXPRESSIONS)["condition_voter"] == {"enabled": True, "weight": 0.5}

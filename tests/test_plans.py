"""Synthesis condition plans: determinism, class counts, AU targets, captions, and config/prompt errors."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest

from datamodules import plans as P
from datamodules.caption_builder import EXPRESSION_WORDS, TOY_ATTRIBUTES, CaptionBuilder
from datamodules.labels import CONTEMPT, DISFA_AUS, HAPPY, NEUTRAL, SAD, AUVocabulary
from datamodules.toyfaces import EXPRESSION_PROTOTYPES, au_cues

VOCAB = AUVocabulary()
EXPRESSION, TOY = CaptionBuilder(), CaptionBuilder(family="toy")  # the generator's builder the plan is given
REAL_COUNTS = np.array([50, 100, 20, 10, 5, 3, 12, 4])


def _real(counts=REAL_COUNTS, num_train=None) -> P.RealStats:
    """RealStats with given class counts and dummy AU stats (the counts are what the tests vary)."""
    k, a = len(counts), len(VOCAB)
    return P.RealStats(num_train=int(num_train or counts.sum()), class_counts=np.asarray(counts),
                       au_mean=np.zeros((k, a)), au_std=np.zeros((k, a)), au_known=np.ones((k, a), dtype=bool))


def _plan(num_classes=8, real=None, captioner=TOY, **kw) -> P.ConditionPlan:
    kw.setdefault("size", 64)
    return P.build_plan(P.PlanConfig(**kw), num_classes, VOCAB, real, captioner=captioner)


def _max_prefix_deviation(labels: np.ndarray, weights) -> float:
    """Largest |count_c(prefix) - len(prefix) * share_c| over all prefixes and classes."""
    p = np.asarray(weights, dtype=float) / np.sum(weights)
    onehot = np.eye(len(p))[labels]
    return float(np.abs(onehot.cumsum(0) - np.arange(1, len(labels) + 1)[:, None] * p).max())


# ------------------------------------------------------------------------------------------- determinism
def test_same_config_gives_same_rows_and_columns():
    a, b = _plan(base_seed=100), _plan(base_seed=100)
    assert a.rows(range(64)) == b.rows(range(64))
    rows = a.rows([0, 7])
    assert rows["sample_id"] == ["syn-00000000", "syn-00000007"]
    assert rows["seed"] == [100, 107]  # per-sample generation seed = base_seed + index
    assert _plan(seed=1).rows(range(64))["caption"] != a.rows(range(64))["caption"]
    assert hash(P.PlanConfig(size=3)) == hash(P.PlanConfig(size=3))  # usable as a cache key


def test_rows_do_not_depend_on_chunking_order_or_plan_length():
    short, long = _plan(size=40), _plan(size=400)
    whole = short.rows(range(40))
    chunked = {k: short.rows(range(0, 13))[k] + short.rows(range(13, 40))[k] for k in whole}
    backwards = short.rows(range(39, -1, -1))
    assert chunked == whole
    assert {k: v[::-1] for k, v in backwards.items()} == whole
    assert long.rows(range(40)) == whole


@pytest.mark.parametrize("distribution", ["balanced", "real", [3, 1, 0, 2, 1, 1, 5, 0.5]])
def test_1x_plan_is_a_prefix_of_the_5x_plan(distribution):
    real = _real(num_train=37)
    one = _plan(scale=1.0, size=None, class_distribution=distribution, real=real)
    five = _plan(scale=5.0, size=None, class_distribution=distribution, real=real)
    assert (len(one), len(five)) == (37, 185)
    assert np.array_equal(five.labels[:37], one.labels)
    assert five.rows(range(37)) == one.rows(range(37))


def test_target_aus_do_not_depend_on_caption_settings():
    # Separate rng streams: rewording captions must not move the AU targets of already planned faces.
    a = _plan(templates=("{expression}",)).rows(range(30))
    b = _plan(templates=("x {hair}, {skin}", "y {cues}")).rows(range(30))
    assert a["target_aus"] == b["target_aus"] and a["caption"] != b["caption"]


# ------------------------------------------------------------------------------------------- class counts
@pytest.mark.parametrize("num_classes", [7, 8])
def test_balanced_counts_exact_and_every_prefix_within_one(num_classes):
    plan = _plan(num_classes, size=803)
    counts = plan.class_counts(num_classes)
    assert counts.sum() == 803 and counts.max() - counts.min() <= 1 and len(counts) == num_classes
    assert np.array_equal(counts, P.class_counts(803, "balanced", num_classes))
    assert _max_prefix_deviation(plan.labels, np.ones(num_classes)) < 1


def test_real_distribution_follows_real_counts():
    real = _real()
    plan = _plan(size=500, class_distribution="real", real=real)
    counts = plan.class_counts(8)
    assert counts.sum() == 500 and np.all(np.abs(counts - 500 * REAL_COUNTS / REAL_COUNTS.sum()) < 1)
    assert np.array_equal(counts, P.class_counts(500, "real", 8, REAL_COUNTS))
    assert _max_prefix_deviation(plan.labels, REAL_COUNTS) < 1
    # n = the real size reproduces the real counts exactly.
    assert np.array_equal(P.class_counts(int(REAL_COUNTS.sum()), "real", 8, REAL_COUNTS), REAL_COUNTS)


def test_explicit_weights_and_zero_weight_classes_never_appear():
    weights = [1, 0, 2, 0, 1, 1, 1, 0]
    plan = _plan(size=301, class_distribution=weights)
    counts = plan.class_counts(8)
    assert counts[[1, 3, 7]].tolist() == [0, 0, 0]
    assert counts.sum() == 301 and np.all(np.abs(counts - 301 * np.array(weights) / 6) < 1)
    assert np.array_equal(counts, P.class_counts(301, weights, 8))


def test_class_sequence_prefixes_within_one_for_many_small_classes():
    # Plain largest-deficit-first lags by > 1 here (found by a random search); the schedule must not.
    p = [0.0047, 0.0491, 0.1904, 0.0458, 0.0208, 0.0029, 0.0082, 0.6782]
    assert _max_prefix_deviation(P.class_sequence(600, p), p) < 1
    assert P.class_sequence(10, [1, 1, 1]).tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]


def test_fill_rare_water_fills_the_rare_classes():
    # Small n: only the rarest classes, up to a common level (s_c = max(0, L - r_c)).
    assert P.class_counts(10, "fill_rare", 8, REAL_COUNTS).tolist() == [0, 0, 0, 0, 2, 5, 0, 3]
    # Large n: real + synthetic as balanced as integers allow, and the plan holds exactly those counts.
    plan = _plan(size=1000, class_distribution="fill_rare", real=_real())
    total = plan.class_counts(8) + REAL_COUNTS
    assert plan.class_counts(8).sum() == 1000 and total.max() - total.min() <= 1
    assert np.array_equal(plan.class_counts(8), P.class_counts(1000, "fill_rare", 8, REAL_COUNTS))


# ------------------------------------------------------------------------------------------- AU targets
def test_prototype_aus_follow_the_target_class():
    plan = _plan(size=8 * 30, au_jitter_std=0.0, strength_range=(0.6, 1.0))
    rows = plan.rows(range(len(plan)))
    for label, aus, mask in zip(rows["target_label"], rows["target_aus"], rows["au_mask"]):
        proto = np.array([EXPRESSION_PROTOTYPES[label].get(au, 0.0) for au in DISFA_AUS])
        aus = np.asarray(aus)
        assert all(mask)  # a prototype defines every AU (absent = 0)
        assert np.all(aus[proto == 0] == 0)
        assert np.all((aus[proto > 0] >= 0.6 * proto[proto > 0] - 1e-5) & (aus[proto > 0] <= proto[proto > 0] + 1e-5))


def test_au_jitter_varies_rows_and_stays_in_range():
    rows = _plan(size=8 * 40, au_jitter_std=1.5).rows(range(8 * 40))
    aus, labels = np.asarray(rows["target_aus"]), np.asarray(rows["target_label"])
    assert aus.min() >= 0 and aus.max() <= 5 and aus.max() == 5  # big jitter hits the clip
    protos = np.array([[EXPRESSION_PROTOTYPES[c].get(au, 0.0) for au in DISFA_AUS] for c in range(8)])
    assert np.all(aus[protos[labels] == 0] == 0)  # jitter only moves the prototype's own AUs
    happy = aus[labels == HAPPY]
    assert len({tuple(r) for r in happy}) == len(happy)
    # Without strength spread and jitter, every row of a class gets the same vector.
    fixed = _plan(size=16, strength_range=(1.0, 1.0), au_jitter_std=0.0).rows(range(16))
    assert fixed["target_aus"][HAPPY] == fixed["target_aus"][HAPPY + 8]


def test_vocabulary_order_and_aus_outside_it():
    vocab = AUVocabulary((12, 6, 23))
    plan = P.build_plan(P.PlanConfig(size=8, au_jitter_std=0.0, strength_range=(1.0, 1.0)), 8, vocab,
                        captioner=CaptionBuilder(aus=vocab.aus))
    rows = plan.rows(range(8))
    assert rows["target_aus"][HAPPY] == [4.0, 3.0, 0.0]  # vocabulary order, AU23 has no prototype value
    assert rows["target_aus"][SAD] == [0.0, 0.0, 0.0]    # sad's AU1/4/15 are not in this vocabulary


def test_real_stats_aus_follow_class_means_and_mask():
    rng = np.random.default_rng(0)
    n, a = 4000, len(VOCAB)
    labels = rng.integers(-1, 7, n)          # -1 = unknown label, ignored for class stats
    mean = rng.uniform(0.5, 4, (7, a))
    aus = np.clip(mean[np.maximum(labels, 0)] + 0.3 * rng.standard_normal((n, a)), 0, 5)
    mask = np.ones((n, a), dtype=bool)
    mask[labels == SAD, 3] = False           # AU5 never known for sad
    mask[(labels == HAPPY) & (rng.random(n) < 0.5), 0] = False  # AU1 known for half the happy faces
    aus[~mask] = 99.0                        # unknown values must not leak into the stats
    real = P.RealStats.from_arrays(labels, aus, mask, 7)
    assert real.num_train == n and real.class_counts.sum() == (labels >= 0).sum()
    assert not real.au_known[SAD, 3] and real.au_known[SAD].sum() == a - 1
    plan = P.build_plan(P.PlanConfig(size=2800, au_source="real_stats"), 7, VOCAB, real, captioner=EXPRESSION)
    rows = plan.rows(range(len(plan)))
    got, lab = np.asarray(rows["target_aus"]), np.asarray(rows["target_label"])
    for c in range(7):
        known = real.au_known[c]
        assert np.allclose(got[lab == c][:, known].mean(0), mean[c][known], atol=0.1)
        assert np.all(np.asarray(rows["au_mask"])[lab == c] == known)
    assert np.all(got[lab == SAD, 3] == 0)   # unknown AU: value 0, mask False


# ------------------------------------------------------------------------------------------- captions
@pytest.mark.parametrize("num_classes", [7, 8])
def test_template_captions_are_the_generator_builders(num_classes):
    """templates null: each row is the caption the generator's builder gives its class and target AUs."""
    plan = _plan(num_classes, captioner=EXPRESSION, size=8 * 20)
    rows = plan.rows(range(len(plan)))
    for label, aus, mask, caption in zip(rows["target_label"], rows["target_aus"], rows["au_mask"],
                                         rows["caption"]):
        assert caption == EXPRESSION.caption(label, aus, mask)
        assert re.match(rf"a close-up photo of an? {EXPRESSION_WORDS[label]} face", caption)
    assert len(set(rows["target_label"])) == num_classes
    assert any(c.startswith("a close-up photo of an angry face, brows furrowed") for c in rows["caption"])


def test_toy_family_captions_use_toy_words_and_vary():
    rows = _plan(size=200).rows(range(200))
    pattern = re.compile(r"a close-up photo of a person with (.+), (\w+) skin, (.+)")
    matches = [pattern.fullmatch(c) for c in rows["caption"]]
    assert all(matches), [c for c, m in zip(rows["caption"], matches) if not m][:3]
    hair, skin = {m.group(1) for m in matches}, {m.group(2) for m in matches}
    assert hair <= set(TOY_ATTRIBUTES["hair"]) and len(hair) > 10 and len(skin) > 5
    # The toy renderer's own phrasing (see toyfaces.caption_for).
    assert {"a shaved head", "short dark hair", "long blond hair", "red hair with a fringe"} <= \
        set(TOY_ATTRIBUTES["hair"])
    assert {"fair", "olive", "brown", "dark"} <= set(TOY_ATTRIBUTES["skin"])


def test_cue_words_match_the_target_aus():
    builder = CaptionBuilder(max_cues=2, cue_threshold=1.5, no_cues="neutral expression")
    plan = _plan(size=160, captioner=builder, templates=("{expression}: {cues}",))
    rows = plan.rows(range(160))
    for label, aus, caption in zip(rows["target_label"], rows["target_aus"], rows["caption"]):
        cues = au_cues(dict(zip(DISFA_AUS, aus)), 1.5, 2, unilateral=label == CONTEMPT)
        assert caption == f"{EXPRESSION_WORDS[label]}: {', '.join(cues) or 'neutral expression'}"
    by_label = dict(zip(rows["target_label"], rows["caption"]))
    assert by_label[NEUTRAL] == "neutral: neutral expression"
    assert "smiling" in by_label[HAPPY] and "smirking with one mouth corner raised" in by_label[CONTEMPT]


def test_a_generator_trained_without_aus_gets_captions_naming_none():
    # the plan still carries AU targets (they are written to the set), but the captions name none of them
    no_aus = CaptionBuilder(name_aus=False)
    rows = _plan(size=16, captioner=no_aus).rows(range(16))
    assert all(any(m) for m in rows["au_mask"])
    assert rows["caption"] == [f"a close-up photo of {'an' if c == 6 else 'a'} {EXPRESSION_WORDS[c]} face"
                               for c in rows["target_label"]]


def test_the_builder_must_share_the_plans_aus():
    with pytest.raises(ValueError, match="caption builder's AUs"):
        _plan(captioner=CaptionBuilder(aus=(1, 2)))


def test_attributes_can_be_configured():
    plan = _plan(size=40, templates=("{mood} person, {hair}",), attributes={"mood": ["calm", "tired"],
                                                                             "hair": ["bald"]})
    assert set(plan.rows(range(40))["caption"]) == {"calm person, bald", "tired person, bald"}


def _write(tmp_path, lines, name="prompts.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_prompts_with_and_without_labels(tmp_path):
    path = _write(tmp_path, [json.dumps({"caption": "HAPPY {hair}", "label": "Happiness"}),
                             json.dumps({"caption": "SAD {cues}", "label": 2}), "",
                             json.dumps({"caption": "ANY {expression}"})])
    plan = _plan(size=8 * 25, captions="jsonl", prompts=str(path))
    rows = plan.rows(range(len(plan)))
    seen: dict[int, set[str]] = {}
    for label, caption in zip(rows["target_label"], rows["caption"]):
        seen.setdefault(label, set()).add(caption.split()[0])
    assert seen[HAPPY] == {"HAPPY", "ANY"} and seen[SAD] == {"SAD", "ANY"}
    assert all(seen[c] == {"ANY"} for c in seen if c not in (HAPPY, SAD))
    assert "ANY neutral" in rows["caption"] and not any("{" in c for c in rows["caption"])


def test_jsonl_class_without_any_prompt_is_an_error(tmp_path):
    path = _write(tmp_path, [json.dumps({"caption": "a smile", "label": "happy"})])
    with pytest.raises(ValueError, match="no prompt for class 'neutral'"):
        _plan(captions="jsonl", prompts=str(path))


# ------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("kwargs, match", [
    (dict(size=10, scale=1.0), "exactly one of plan.size and plan.scale"),
    (dict(size=None), "exactly one of plan.size and plan.scale"),
    (dict(size=None, scale=-1), r"plan.scale must be > 0, got -1"),
    (dict(size=0), "plan.size"),
    (dict(class_distribution="uniform"), "plan.class_distribution"),
    (dict(class_distribution=[1, -1, 1, 1, 1, 1, 1, 1]), "plan.class_distribution"),
    (dict(au_source="openface"), "plan.au_source"),
    (dict(strength_range=(1.0, 0.5)), "plan.strength_range"),
    (dict(templates=("a {mood} face",), attributes={"hair": ["bald"]}),
     r"plan.templates\[0\] has unknown placeholder \{mood\}"),
    (dict(templates=("a {} face",)), r"plan.templates\[0\]"),
    (dict(captions="jsonl"), "plan.prompts"),
    (dict(attributes={"hair": "bald"}), r"plan.attributes\['hair'\]"),
])
def test_bad_config_names_the_field(kwargs, match):
    kwargs = {"size": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        P.PlanConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(templates=("a {mood} face",)), r"plan.templates\[0\] has unknown placeholder \{mood\}"),
    (dict(templates=("a {hair} face",)), r"plan.templates\[0\] has unknown placeholder \{hair\}"),
    (dict(attributes={"mood": ["calm"]}), r"plan.templates\[0\] has unknown placeholder \{hair\}"),
])
def test_templates_unknown_to_the_generators_builder(kwargs, match):
    # checked once the builder is known: {hair} exists in the toy family only
    captioner = TOY if "attributes" in kwargs else EXPRESSION
    with pytest.raises(ValueError, match=match):
        _plan(captioner=captioner, **kwargs)


def test_wrong_weight_count_is_an_error():
    with pytest.raises(ValueError, match="num_classes=7 weights, got 8"):
        _plan(7, class_distribution=[1] * 8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(au_source="real_stats"), "plan.au_source"),
    (dict(size=None, scale=2.0), "plan.scale"),
    (dict(class_distribution="real"), "plan.class_distribution"),
    (dict(class_distribution="fill_rare"), "plan.class_distribution"),
])
def test_real_set_settings_without_real_stats(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _plan(**kwargs)


def test_missing_prompts_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        _plan(captions="jsonl", prompts=str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("lines, match", [
    ([json.dumps({"caption": "ok"}), "{not json"], r"bad JSON at .*prompts.jsonl:2"),
    ([json.dumps({"caption": "ok", "label": "grumpy"})], r"prompts.jsonl:1: unknown expression class name"),
    ([json.dumps({"caption": "ok", "label": "contempt"})], r"prompts.jsonl:1: label 7 is outside the 7-class"),
    ([json.dumps({"caption": "ok", "label": 9})], r"prompts.jsonl:1: label 9 is outside"),
    ([json.dumps({"text": "no caption key"})], r'prompts.jsonl:1 needs a non-empty string "caption"'),
    ([json.dumps({"caption": "a {mood} face"})], r"unknown placeholder \{mood\}"),
])
def test_bad_prompt_lines(tmp_path, lines, match):
    path = _write(tmp_path, lines)
    with pytest.raises(ValueError, match=match):
        _plan(7, captions="jsonl", prompts=str(path))


def test_rows_out_of_range():
    with pytest.raises(IndexError, match="out of range"):
        _plan(size=5).rows([5])

"""The embedded procedural FACS faces: determinism, AU effects, class balance, label noise, captions, grid."""
import json
import re
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from datamodules import toyfaces as T
from datamodules.labels import (ANGER, CONTEMPT, DISFA_AUS, EXPRESSIONS, FEAR, HAPPY, NEUTRAL, SAD, SURPRISE)

CFG = T.ToyFacesConfig()


def _aus(**kw) -> np.ndarray:
    a = np.zeros(len(DISFA_AUS), dtype=np.float32)
    for name, v in kw.items():
        a[DISFA_AUS.index(int(name.removeprefix("au")))] = v
    return a


def _find(config, split, label, n=1, limit=3000):
    """First ``n`` indices of a split whose true class is ``label``."""
    out = [i for i in range(limit) if T.sample_labels(config, split, i)[1] == label][:n]
    assert len(out) == n, f"no {EXPRESSIONS[label]} in the first {limit} samples"
    return out


# ------------------------------------------------------------------------------------------- determinism
def test_same_inputs_give_identical_bytes():
    a, b = T.sample_toyface(CFG, "train", 7), T.sample_toyface(CFG, "train", 7)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.aus.tobytes() == b.aus.tobytes()
    assert (a.label, a.true_label, a.caption, a.sample_id) == (b.label, b.true_label, b.caption, b.sample_id)
    assert json.dumps(a.attributes, sort_keys=True) == json.dumps(b.attributes, sort_keys=True)
    assert a.sample_id == "toy_train_000007"


def test_different_index_split_or_seed_differ():
    ref = T.sample_toyface(CFG, "train", 3).image
    assert T.sample_toyface(CFG, "train", 4).image.tobytes() != ref.tobytes()
    assert T.sample_toyface(CFG, "test", 3).image.tobytes() != ref.tobytes()
    assert T.sample_toyface(replace(CFG, seed=1), "train", 3).image.tobytes() != ref.tobytes()


def test_splits_never_share_identities():
    keys = ("skin", "hair", "background", "face_width", "eye_spacing")
    ident = {s: {json.dumps([T.sample_toyface(CFG, s, i).attributes[k] for k in keys]) for i in range(12)}
             for s in T.SPLIT_OFFSETS}
    assert not ident["train"] & ident["val"] and not ident["train"] & ident["test"] and not ident["val"] & ident["test"]
    starts = sorted(T.SPLIT_OFFSETS.values())
    assert all(b - a >= T.MAX_INDEX for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError, match="index"):
        T.sample_toyface(CFG, "train", T.MAX_INDEX)
    with pytest.raises(ValueError, match="split"):
        T.sample_toyface(CFG, "holdout", 0)


def test_label_noise_knob_does_not_change_images():
    a = T.sample_toyface(CFG, "train", 11)
    b = T.sample_toyface(replace(CFG, label_noise=0.5), "train", 11)
    assert a.image.tobytes() == b.image.tobytes() and a.true_label == b.true_label


# ------------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("size", [32, 48, 64])
def test_shape_dtype_range(size):
    config = replace(CFG, image_size=size)
    faces = T.make_split(config, "val", 6)
    assert [f.sample_id for f in faces] == [f"toy_val_{i:06d}" for i in range(6)]
    for f in faces:
        assert f.image.shape == (size, size, 3) and f.image.dtype == np.uint8
        assert f.image.std() > 10  # not blank
        assert f.aus.shape == (12,) and f.aus.dtype == np.float32
        assert float(f.aus.min()) >= 0.0 and float(f.aus.max()) <= 5.0
        assert 0 <= f.label < 8 and 0 <= f.true_label < 8
        assert f.caption.startswith("a close-up photo of a person with ")
        json.dumps(f.attributes)  # plain python types only


# ------------------------------------------------------------------------------------------- AU effects
CLEAN = T.FaceParams()  # frontal, no pose jitter, no noise/blur/lighting
UPPER = {1, 2, 4, 5}
MIDDLE = {6, 9}
LOWER = {12, 15, 17, 20, 25, 26}


@pytest.mark.parametrize("au", DISFA_AUS)
def test_every_au_changes_the_image_where_expected(au):
    size = 48
    base = T.render_face(CLEAN, _aus(), size).astype(np.float64)
    full = np.abs(T.render_face(CLEAN, _aus(**{f"au{au}": 5.0}), size) - base).mean(2)
    half = np.abs(T.render_face(CLEAN, _aus(**{f"au{au}": 2.0}), size) - base).mean(2)
    assert full.mean() > 0.15 and full.max() > 40, f"AU{au} barely visible: {full.mean():.3f}"
    assert 0 < half.sum() < full.sum(), f"AU{au} effect does not grow with intensity"
    rows = full.sum(1) / full.sum()
    if au in UPPER:
        assert rows[: size // 2].sum() > 0.95
    elif au in MIDDLE:
        assert rows[int(0.35 * size): int(0.75 * size)].sum() > 0.95
    else:
        assert rows[size // 2:].sum() > 0.95
    cols = full.sum(0) / full.sum()
    assert abs(cols[: size // 2].sum() - 0.5) < 0.15, f"AU{au} should act on both sides"


def test_aus_have_distinct_effects():
    base = T.render_face(CLEAN, _aus(), 48).astype(np.float64)
    diffs = np.stack([(T.render_face(CLEAN, _aus(**{f"au{au}": 5.0}), 48) - base).ravel() for au in DISFA_AUS])
    diffs /= np.linalg.norm(diffs, axis=1, keepdims=True)
    cos = diffs @ diffs.T
    np.fill_diagonal(cos, 0)
    assert cos.max() < 0.9


@pytest.mark.parametrize("side", ["left", "right"])
def test_unilateral_au12_pulls_one_corner(side):
    params = replace(CLEAN, au12_side=side)
    base = T.render_face(params, _aus(), 48).astype(np.float64)
    d = np.abs(T.render_face(params, _aus(au12=5.0), 48) - base).mean(2)
    left_share = d[:, :24].sum() / d.sum()
    assert (left_share > 0.8) if side == "left" else (left_share < 0.2)


def test_render_noise_only_with_rng_and_bad_inputs():
    noisy = replace(CLEAN, noise_std=8.0)
    a = T.render_face(noisy, _aus(), 48, np.random.default_rng(0))
    b = T.render_face(noisy, _aus(), 48, np.random.default_rng(0))
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != T.render_face(noisy, _aus(), 48, None).tobytes()
    with pytest.raises(ValueError, match="aus"):
        T.render_face(CLEAN, np.zeros(5), 48)
    with pytest.raises(ValueError, match="hair_style"):
        T.FaceParams(hair_style="mohawk")


# ------------------------------------------------------------------------------------------- expressions
def test_prototypes_use_the_vocabulary_and_ground_truth_follows_them():
    assert set(T.EXPRESSION_PROTOTYPES) == set(range(8))
    for table in (T.EXPRESSION_PROTOTYPES, T.EXPRESSION_OPTIONAL_AUS):
        for aus in table.values():
            assert all(au in DISFA_AUS and 0 < v <= 5 for au, v in aus.items())
    config = replace(CFG, stray_au_prob=0.0)
    for label in (HAPPY, SAD, SURPRISE, ANGER, CONTEMPT):
        i = _find(config, "test", label)[0]
        f = T.sample_toyface(config, "test", i)
        active = {au for au, v in zip(DISFA_AUS, f.aus) if v > 0}
        assert set(T.EXPRESSION_PROTOTYPES[label]) <= active
        assert active <= set(T.EXPRESSION_PROTOTYPES[label]) | set(T.EXPRESSION_OPTIONAL_AUS.get(label, {}))
        assert f.attributes["unilateral"] == (label == CONTEMPT)
        if label == CONTEMPT:
            assert f.attributes["au12_side"] in ("left", "right")
    neutral = T.sample_toyface(config, "test", _find(config, "test", NEUTRAL)[0])
    assert not neutral.aus.any()


def test_intensity_range_scales_the_aus():
    lo, hi = replace(CFG, intensity_range=(0.3, 0.3), au_jitter=0.0), replace(CFG, intensity_range=(1.0, 1.0),
                                                                               au_jitter=0.0)
    i = _find(CFG, "test", SURPRISE)[0]
    k = DISFA_AUS.index(26)
    assert T.sample_toyface(lo, "test", i).aus[k] == pytest.approx(0.3 * T.EXPRESSION_PROTOTYPES[SURPRISE][26])
    assert T.sample_toyface(hi, "test", i).aus[k] == pytest.approx(T.EXPRESSION_PROTOTYPES[SURPRISE][26])


def test_class_distribution_follows_the_config():
    n = 2000
    for config in (CFG, replace(CFG, imbalance_power=0.0), replace(CFG, class_distribution=(1, 0, 0, 1, 0, 0, 2, 0))):
        p = T.class_distribution(config)
        counts = np.bincount([T.sample_labels(config, "test", i)[1] for i in range(n)], minlength=8)
        tol = 4 * np.sqrt(p * (1 - p) / n) + 0.005
        assert np.all(np.abs(counts / n - p) < tol), (counts / n, p)
        assert np.all(counts[p == 0] == 0)
    # default follows AffectNet's train counts softened by power 0.5: happy most common, contempt >= 3 %
    p = T.class_distribution(CFG)
    assert p.argmax() == HAPPY and p.min() > 0.03
    expected = np.sqrt(np.array(T.AFFECTNET_TRAIN_COUNTS, dtype=float))
    assert np.allclose(p, expected / expected.sum())


def test_seven_classes_never_yield_contempt():
    config = replace(CFG, num_classes=7, label_noise=0.5)
    pairs = [T.sample_labels(config, "train", i) for i in range(1500)]
    assert max(max(p) for p in pairs) <= 6
    assert len(T.class_distribution(config)) == 7
    assert any(obs != true for obs, true in pairs)


def test_label_noise_only_on_train_at_the_configured_rate():
    n = 3000
    train = [T.sample_labels(CFG, "train", i) for i in range(n)]
    flipped = [(obs, true) for obs, true in train if obs != true]
    assert abs(len(flipped) / n - CFG.label_noise) < 0.025
    assert all(obs in T.CONFUSABLE_CLASSES[true] for obs, true in flipped)
    for split in ("val", "test"):
        assert all(obs == true for obs, true in (T.sample_labels(CFG, split, i) for i in range(500)))
    noisy_test = replace(CFG, label_noise_splits=("train", "test"))
    assert any(o != t for o, t in (T.sample_labels(noisy_test, "test", i) for i in range(500)))
    # the rendered sample carries both labels, consistent with sample_labels
    i = next(i for i, (o, t) in enumerate(train) if o != t)
    f = T.sample_toyface(CFG, "train", i)
    assert (f.label, f.true_label) == train[i] and f.attributes["label_flipped"]
    faces = T.make_split(CFG, "train", i + 1)
    assert T.class_counts(faces).sum() == i + 1
    assert T.class_counts(faces, true=True).tolist() == np.bincount([t for _, t in train[: i + 1]],
                                                                     minlength=8).tolist()


# ------------------------------------------------------------------------------------------- captions
def test_captions_describe_the_true_expression():
    strong = replace(CFG, intensity_range=(1.0, 1.0), stray_au_prob=0.0, label_noise=0.9)
    cues = {HAPPY: ("smil",), SAD: ("mouth corners turned down", "inner brows raised"),
            SURPRISE: ("eyebrows raised", "jaw dropped"), FEAR: ("eyes wide open", "lips stretched", "eyebrows raised"),
            ANGER: ("brows furrowed",), CONTEMPT: ("one mouth corner",), NEUTRAL: ("neutral expression",)}
    for label, accepted in cues.items():
        for i in _find(strong, "train", label, n=2):
            f = T.sample_toyface(strong, "train", i)
            assert any(cue in f.caption for cue in accepted), (EXPRESSIONS[label], f.caption)
            assert "smil" not in f.caption or label == HAPPY
            assert f.attributes["skin_tone"] in f.caption
            if f.attributes["hair_style"] != "none":
                assert f.attributes["hair_colour"] in f.caption
            n_cues = len(f.caption.split(" skin")[1].split(", ")) - 1
            assert 1 <= n_cues <= 4  # 1-3 cues (+ optional "wearing glasses")
    assert T.caption_for(_aus(au12=4, au6=3), {"hair_colour": "dark", "skin_tone": "tan"}, "short") == \
        "a close-up photo of a person with short dark hair, tan skin, smiling, cheeks raised"


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs,field", [
    ({"image_size": 8}, "image_size"), ({"num_classes": 6}, "num_classes"), ({"label_noise": 1.5}, "label_noise"),
    ({"label_noise_splits": ("train", "dev")}, "label_noise_splits"), ({"intensity_range": (0.9, 0.2)},
                                                                      "intensity_range"),
    ({"intensity_range": (0.5,)}, "intensity_range"), ({"class_distribution": (1, 1, 1)}, "class_distribution"),
    ({"class_distribution": (1, -1, 1, 1, 1, 1, 1, 1)}, "class_distribution"), ({"imbalance_power": -1},
                                                                               "imbalance_power"),
    ({"stray_au_prob": 2.0}, "stray_au_prob"), ({"rotation_deg": 90}, "rotation_deg"), ({"noise_std": -1}, "noise_std"),
    ({"blur_prob": -0.1}, "blur_prob"), ({"seed": -3}, "seed"), ({"supersample": 0}, "supersample"),
    ({"au_visual_gain": 0}, "au_visual_gain"),
])
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        T.ToyFacesConfig(**kwargs)


def test_config_accepts_lists():
    config = T.ToyFacesConfig(intensity_range=[0.5, 0.9], label_noise_splits=["train", "val"],
                              class_distribution=[1] * 8)
    assert config.intensity_range == (0.5, 0.9) and config.label_noise_splits == ("train", "val")
    hash(config)


# ------------------------------------------------------------------------------------------- grid
@pytest.mark.parametrize("num_classes", [7, 8])
def test_sample_grid_png(tmp_path, num_classes):
    config = T.ToyFacesConfig(image_size=32, num_classes=num_classes)
    path = T.save_sample_grid(config, tmp_path / "sub" / "grid.png", per_class=3)
    with Image.open(path) as im:
        cell = 32 * T.GRID_SCALE
        assert im.format == "PNG" and im.size == (T.GRID_LABEL_WIDTH + 3 * cell, num_classes * cell)
        rgb = np.asarray(im.convert("RGB"))
    assert rgb[:, : T.GRID_LABEL_WIDTH].min() < 100  # class names drawn
    for r in range(num_classes):  # every cell filled with a face
        for c in range(3):
            tile = rgb[r * cell:(r + 1) * cell, T.GRID_LABEL_WIDTH + c * cell: T.GRID_LABEL_WIDTH + (c + 1) * cell]
            assert tile.std() > 10


def test_au_visual_gain_exaggerates_drawing_but_not_labels():
    """The gain moves features further from the neutral face; labels, AUs and identity stay the same."""
    base = T.ToyFacesConfig(noise_std=0.0, blur_prob=0.0, au_visual_gain=1.0)
    strong = replace(base, au_visual_gain=2.0)
    i = _find(base, "test", SURPRISE)[0]
    a, b = T.sample_toyface(base, "test", i), T.sample_toyface(strong, "test", i)
    assert a.label == b.label and np.array_equal(a.aus, b.aus) and a.caption == b.caption
    params, _ = T.sample_face_params(base, T._streams(base, "test", i)[2])
    neutral = T.render_face(params, np.zeros(len(DISFA_AUS)), base.image_size)
    moved = [np.abs(img.astype(float) - neutral.astype(float)).mean() for img in (a.image, b.image)]
    assert moved[1] > 1.3 * moved[0]

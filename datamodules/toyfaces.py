"""The embedded procedural FACS faces: cartoon faces with ground-truth AUs, expressions, captions.

Speed (measured, 1 core of a shared 2-core VM, supersample 4, full ``sample_toyface`` incl. sampling and caption):
~500 img/s at 48 px (400-560 across runs), about the same at 32 px, ~430 img/s at 64 px.

A sample is drawn from ``np.random.SeedSequence([config.seed, SPLIT_OFFSETS[split] + index])`` (the seeding of
``np.random.default_rng([seed, offset + index])``), spawned into independent streams for the class, the expression,
the identity/pose, the pixel noise and the label noise; so e.g. changing ``label_noise`` never changes an image and
splits never share identities. Pipeline: true class ~ AffectNet-like imbalance -> AUs = prototype x strength
(+ optional AUs, per-AU jitter, a stray AU) -> identity/pose -> ``render_face`` -> caption from the AUs ->
observed label = true label, flipped to a confusable class with prob ``label_noise`` on ``label_noise_splits``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from datamodules.labels import (ANGER, CONTEMPT, DISFA_AUS, DISGUST, EXPRESSIONS, FEAR, HAPPY, NEUTRAL, SAD,
                                SURPRISE)
from datamodules.toyfaces_render import HAIR_STYLES, FaceParams, render_face

__all__ = [
    "ToyFacesConfig", "ToyFace", "FaceParams", "SPLIT_OFFSETS", "EXPRESSION_PROTOTYPES", "EXPRESSION_OPTIONAL_AUS",
    "CONFUSABLE_CLASSES", "AFFECTNET_TRAIN_COUNTS", "sample_toyface", "render_face", "make_split", "class_counts",
    "class_distribution", "sample_labels", "sample_face_params", "sample_expression", "caption_for", "au_cues",
    "hair_phrase", "save_sample_grid",
]

SPLIT_OFFSETS: dict[str, int] = {"train": 0, "val": 10_000_000, "test": 20_000_000}
MAX_INDEX = 10_000_000  # indices per split (keeps the seed ranges disjoint)

# AffectNet (manually annotated) training-set counts, canonical order.
AFFECTNET_TRAIN_COUNTS: tuple[int, ...] = (74874, 134415, 25459, 14090, 6378, 3803, 24882, 3750)

# Expression id -> AU -> nominal intensity (0..5) at strength 1. Public: synthesis plans build on it.
EXPRESSION_PROTOTYPES: dict[int, dict[int, float]] = {
    NEUTRAL: {},
    HAPPY: {6: 3.0, 12: 4.0},
    SAD: {1: 3.5, 4: 2.5, 15: 3.5},
    SURPRISE: {1: 3.5, 2: 3.5, 5: 3.0, 26: 3.5},
    FEAR: {1: 3.0, 2: 2.5, 4: 2.5, 5: 3.5, 20: 3.5, 26: 2.5},
    DISGUST: {9: 4.0, 15: 2.5},
    ANGER: {4: 4.0, 5: 2.5, 17: 2.5},  # lips pressed = AU17 and never AU25/26
    CONTEMPT: {12: 3.5},                 # drawn unilateral (attributes["unilateral"] = True)
}
# AUs that accompany a prototype only sometimes (each with prob ``optional_au_prob``).
EXPRESSION_OPTIONAL_AUS: dict[int, dict[int, float]] = {
    HAPPY: {25: 2.5}, SAD: {17: 2.0}, SURPRISE: {25: 3.0}, FEAR: {25: 3.0}, DISGUST: {17: 2.0, 4: 1.5},
}
# AUs a class never shows (not even as a stray AU).
EXPRESSION_FORBIDDEN_AUS: dict[int, tuple[int, ...]] = {ANGER: (25, 26)}
# Label noise flips to one of these (filtered to the protocol's classes).
CONFUSABLE_CLASSES: dict[int, tuple[int, ...]] = {
    NEUTRAL: (SAD, CONTEMPT), HAPPY: (CONTEMPT, NEUTRAL), SAD: (NEUTRAL,), SURPRISE: (FEAR,), FEAR: (SURPRISE,),
    DISGUST: (ANGER,), ANGER: (DISGUST,), CONTEMPT: (HAPPY, NEUTRAL),
}

SKIN_TONES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("pale", (250, 222, 205)), ("fair", (240, 200, 172)), ("light", (226, 182, 148)), ("olive", (200, 160, 118)),
    ("tan", (182, 134, 95)), ("brown", (145, 98, 68)), ("dark", (105, 70, 50)), ("deep", (78, 52, 40)))
HAIR_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("black", (28, 24, 24)), ("dark", (58, 40, 30)), ("brown", (105, 70, 42)), ("auburn", (135, 62, 38)),
    ("blond", (212, 180, 115)), ("red", (175, 78, 40)), ("grey", (150, 148, 145)), ("white", (228, 226, 220)))
IRIS_COLOURS = ((70, 45, 30), (40, 30, 25), (70, 110, 160), (80, 120, 80), (110, 90, 60))

GRID_SCALE = 2         # save_sample_grid upscales each face by this
GRID_LABEL_WIDTH = 84  # px of the class-name column in save_sample_grid


def _pair(name: str, v, lo: float, hi: float) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a pair (low, high), got {v!r}") from None
    if not (lo <= a <= b <= hi):
        raise ValueError(f"{name} must satisfy {lo} <= low <= high <= {hi}, got {v!r}")
    return a, b


@dataclass(frozen=True)
class ToyFacesConfig:
    """Knobs of the toy dataset. Lists (e.g. from Hydra) are accepted for the tuple fields."""

    image_size: int = 48
    seed: int = 0
    num_classes: int = 8                                   # 7 drops contempt
    imbalance_power: float = 0.5                           # p ~ AffectNet counts ** power; 0 = balanced
    class_distribution: tuple[float, ...] | None = None    # overrides the AffectNet-like default (len num_classes)
    label_noise: float = 0.05                              # prob. the observed label is a confusable class
    label_noise_splits: tuple[str, ...] = ("train",)
    intensity_range: tuple[float, float] = (0.5, 1.0)      # expression strength s ~ U(range), x prototype
    au_jitter: float = 0.2                                 # per-AU multiplicative gaussian jitter (std)
    optional_au_prob: float = 0.5                          # prob. of each EXPRESSION_OPTIONAL_AUS entry
    stray_au_prob: float = 0.3                             # prob. of one random non-prototype AU
    stray_au_intensity: tuple[float, float] = (0.3, 1.5)
    identity_bias: float = 0.7                             # scale of resting brow/mouth shape variation
    rotation_deg: float = 10.0
    scale_jitter: float = 0.08
    shift_jitter: float = 0.06
    yaw_jitter: float = 0.5
    lighting_strength: float = 0.35
    noise_std: float = 3.0                                 # mean per-image gaussian noise std (0..255 units)
    blur_prob: float = 0.2
    glasses_prob: float = 0.08
    supersample: int = 4
    au_visual_gain: float = 2.0                            # exaggerates every AU's drawn movement (labels unchanged)

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, what: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        check("image_size", isinstance(self.image_size, int) and 16 <= self.image_size <= 256, "an int in 16..256")
        check("seed", isinstance(self.seed, int) and self.seed >= 0, "an int >= 0")
        check("num_classes", self.num_classes in (7, 8), "7 or 8")
        check("imbalance_power", 0.0 <= float(self.imbalance_power) <= 2.0, "in [0, 2]")
        if self.class_distribution is not None:
            try:
                dist = tuple(float(x) for x in self.class_distribution)
            except (TypeError, ValueError):
                raise ValueError(f"class_distribution must be a sequence of numbers, got "
                                 f"{self.class_distribution!r}") from None
            ok = (len(dist) == self.num_classes and all(x >= 0 and math.isfinite(x) for x in dist) and sum(dist) > 0)
            if not ok:
                raise ValueError(f"class_distribution must have num_classes={self.num_classes} non-negative weights "
                                 f"with a positive sum, got {self.class_distribution!r}")
            object.__setattr__(self, "class_distribution", dist)
        check("label_noise", 0.0 <= float(self.label_noise) < 1.0, "in [0, 1)")
        splits = (self.label_noise_splits,) if isinstance(self.label_noise_splits, str) else self.label_noise_splits
        splits = tuple(str(s) for s in splits)
        if any(s not in SPLIT_OFFSETS for s in splits):
            raise ValueError(f"label_noise_splits must name splits of {tuple(SPLIT_OFFSETS)}, got {splits!r}")
        object.__setattr__(self, "label_noise_splits", splits)
        object.__setattr__(self, "intensity_range", _pair("intensity_range", self.intensity_range, 0.0, 2.0))
        object.__setattr__(self, "stray_au_intensity", _pair("stray_au_intensity", self.stray_au_intensity, 0.0, 5.0))
        for name in ("au_jitter", "optional_au_prob", "stray_au_prob", "blur_prob", "glasses_prob",
                     "lighting_strength"):
            check(name, 0.0 <= float(getattr(self, name)) <= 1.0, "in [0, 1]")
        check("identity_bias", 0.0 <= float(self.identity_bias) <= 3.0, "in [0, 3]")
        check("rotation_deg", 0.0 <= float(self.rotation_deg) <= 45.0, "in [0, 45]")
        check("scale_jitter", 0.0 <= float(self.scale_jitter) <= 0.4, "in [0, 0.4]")
        check("shift_jitter", 0.0 <= float(self.shift_jitter) <= 0.25, "in [0, 0.25]")
        check("yaw_jitter", 0.0 <= float(self.yaw_jitter) <= 1.0, "in [0, 1]")
        check("noise_std", 0.0 <= float(self.noise_std) <= 64.0, "in [0, 64]")
        check("supersample", isinstance(self.supersample, int) and 1 <= self.supersample <= 8, "an int in 1..8")
        check("au_visual_gain", 0.0 < float(self.au_visual_gain) <= 4.0, "in (0, 4]")


@dataclass
class ToyFace:
    image: np.ndarray      # uint8 (S, S, 3)
    label: int             # observed (possibly noisy) canonical id
    true_label: int
    aus: np.ndarray        # float32 (12,), ground truth 0..5 in DISFA_AUS order
    caption: str
    attributes: dict = field(default_factory=dict)  # json-serialisable
    sample_id: str = ""


# --------------------------------------------------------------------------------------------- sampling
def class_distribution(config: ToyFacesConfig) -> np.ndarray:
    """Probabilities of the true classes, (num_classes,)."""
    if config.class_distribution is not None:
        p = np.asarray(config.class_distribution, dtype=np.float64)
    else:
        p = np.asarray(AFFECTNET_TRAIN_COUNTS[: config.num_classes], dtype=np.float64) ** config.imbalance_power
    return p / p.sum()


def sample_expression(config: ToyFacesConfig, label: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """AUs (12,) float32 of one sample of class ``label`` + expression attributes."""
    index = {au: i for i, au in enumerate(DISFA_AUS)}
    aus = np.zeros(len(DISFA_AUS), dtype=np.float64)
    strength = float(rng.uniform(*config.intensity_range))
    jitter = lambda: min(1.8, max(0.3, 1.0 + config.au_jitter * float(rng.standard_normal())))  # noqa: E731
    for au, v in EXPRESSION_PROTOTYPES[label].items():
        aus[index[au]] = v * strength * jitter()
    optional = []
    for au, v in EXPRESSION_OPTIONAL_AUS.get(label, {}).items():
        if rng.random() < config.optional_au_prob:
            aus[index[au]] = v * strength * jitter()
            optional.append(au)
    stray = None
    if rng.random() < config.stray_au_prob:
        banned = set(EXPRESSION_PROTOTYPES[label]) | set(EXPRESSION_OPTIONAL_AUS.get(label, {})) \
            | set(EXPRESSION_FORBIDDEN_AUS.get(label, ()))
        pool = [au for au in DISFA_AUS if au not in banned]
        stray = int(pool[rng.integers(len(pool))])
        aus[index[stray]] = rng.uniform(*config.stray_au_intensity)
    unilateral = label == CONTEMPT
    side = ("left", "right")[int(rng.integers(2))] if unilateral else None
    attrs = {"expression_strength": round(strength, 4), "optional_aus": optional, "stray_au": stray,
             "unilateral": unilateral, "unilateral_side": side}
    return np.clip(aus, 0.0, 5.0).astype(np.float32), attrs


def sample_face_params(config: ToyFacesConfig, rng: np.random.Generator) -> tuple[FaceParams, dict]:
    """Identity + pose + photometry, and the words the caption uses."""
    u = rng.uniform
    b = config.identity_bias
    skin_name, skin = SKIN_TONES[int(rng.integers(len(SKIN_TONES)))]
    skin = tuple(int(np.clip(c + d, 0, 255)) for c, d in zip(skin, rng.integers(-10, 11, 3)))
    hair_name, hair = HAIR_COLOURS[int(rng.integers(len(HAIR_COLOURS)))]
    hair_style = HAIR_STYLES[int(rng.choice(len(HAIR_STYLES), p=(0.12, 0.4, 0.28, 0.2)))]
    brows = tuple(int(c) for c in (np.array(hair) * 0.75 if sum(hair) < 450 else np.array(hair) * 0.55))
    if hair_style == "none":
        brows = tuple(int(c) for c in np.array(skin) * 0.45)
    t = u(0.3, 0.55)
    lips = tuple(int(c) for c in np.array(skin) * (1 - t) + np.array((175, 70, 80)) * t)
    bg = tuple(int(c) for c in rng.integers(30, 235, 3))
    params = FaceParams(
        face_width=u(0.86, 1.12), face_height=u(0.92, 1.06), jaw_taper=u(0.0, 0.35),
        eye_spacing=u(0.9, 1.1), eye_size=u(0.85, 1.15),
        brow_height=b * u(-0.012, 0.012), brow_tilt=b * u(-0.008, 0.008), brow_thickness=u(0.75, 1.3),
        nose_width=u(0.8, 1.25), nose_length=u(0.9, 1.1), mouth_width=u(0.85, 1.15),
        mouth_curve=b * u(-0.006, 0.006), lip_thickness=u(0.7, 1.3), blush=u(0.0, 0.12),
        skin=skin, lips=lips, iris=IRIS_COLOURS[int(rng.integers(len(IRIS_COLOURS)))], hair=hair, brows=brows,
        hair_style=hair_style, background=bg, clothes=tuple(int(c) for c in rng.integers(20, 230, 3)),
        glasses=bool(rng.random() < config.glasses_prob),
        rotation=u(-1, 1) * config.rotation_deg, scale=1.0 + u(-1, 1) * config.scale_jitter,
        shift_x=u(-1, 1) * config.shift_jitter, shift_y=u(-1, 1) * config.shift_jitter,
        yaw=u(-1, 1) * config.yaw_jitter,
        light_angle=u(0, 2 * np.pi), light_strength=u(0, config.lighting_strength),
        noise_std=u(0, 2 * config.noise_std),
        blur_radius=u(0.4, 0.9) if rng.random() < config.blur_prob else 0.0,
    )
    return params, {"skin_tone": skin_name, "hair_colour": hair_name}


# Caption cues per AU: (phrase, phrase when unilateral).
_CUES: dict[int, str] = {
    4: "brows furrowed", 5: "eyes wide open", 6: "cheeks raised", 9: "nose wrinkled", 12: "smiling",
    15: "mouth corners turned down", 17: "chin raised", 20: "lips stretched", 25: "lips parted", 26: "jaw dropped",
}


def hair_phrase(colour: str, style: str) -> str:
    """Caption words for a hair colour + style ('short dark hair', 'a shaved head'); plans reuse them."""
    return {"none": "a shaved head", "short": f"short {colour} hair", "long": f"long {colour} hair",
            "fringe": f"{colour} hair with a fringe"}[style]


def au_cues(aus_by_au: Mapping[int, float], threshold: float = 1.0, max_cues: int = 3,
            unilateral: bool = False) -> list[str]:
    """Plain-language cues of the AUs at or above ``threshold``, strongest first, at most ``max_cues``.

    ``aus_by_au`` maps AU number -> intensity; missing AUs count as 0 and AUs without a phrase are ignored, so
    any vocabulary works. AU1+AU2 merge into one cue; ``unilateral`` words AU12 as a smirk (contempt). The
    captions of the toy set and of synthesis plans share these words, so a generator trained on one reads the
    other. Empty list = no cue (callers say "neutral expression").
    """
    a1, a2 = float(aus_by_au.get(1, 0.0)), float(aus_by_au.get(2, 0.0))
    cues: list[tuple[float, str]] = []
    if a1 >= threshold and a2 >= threshold:
        cues.append((max(a1, a2), "eyebrows raised"))
    elif a1 >= threshold:
        cues.append((a1, "inner brows raised"))
    elif a2 >= threshold:
        cues.append((a2, "outer brows raised"))
    for au, phrase in _CUES.items():
        value = float(aus_by_au.get(au, 0.0))
        if value >= threshold:
            if au == 12 and unilateral:
                phrase = "smirking with one mouth corner raised"
            cues.append((value, phrase))
    cues.sort(key=lambda c: -c[0])  # stable: ties keep the fixed phrase order
    return [p for _, p in cues[:max_cues]]


def caption_for(aus: np.ndarray, words: dict, hair_style: str, glasses: bool = False, unilateral: bool = False,
                threshold: float = 1.0, max_cues: int = 3) -> str:
    """'a close-up photo of a person with short dark hair, fair skin, smiling, cheeks raised' (cues from AUs)."""
    cues = au_cues(dict(zip(DISFA_AUS, (float(x) for x in aus))), threshold, max_cues, unilateral)
    expression = ", ".join(cues) if cues else "neutral expression"
    extra = ", wearing glasses" if glasses else ""
    hair = hair_phrase(words["hair_colour"], hair_style)
    return f"a close-up photo of a person with {hair}, {words['skin_tone']} skin{extra}, {expression}"


def _streams(config: ToyFacesConfig, split: str, index: int) -> list[np.random.Generator]:
    if split not in SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; known: {tuple(SPLIT_OFFSETS)}")
    if not 0 <= int(index) < MAX_INDEX:
        raise ValueError(f"index must be in [0, {MAX_INDEX}), got {index}")
    seq = np.random.SeedSequence([config.seed, SPLIT_OFFSETS[split] + int(index)])
    return [np.random.default_rng(s) for s in seq.spawn(5)]  # class, expression, identity, pixels, label noise


def _true_label(config: ToyFacesConfig, rng: np.random.Generator) -> int:
    return int(np.searchsorted(np.cumsum(class_distribution(config)), rng.random() * (1 - 1e-12), side="right"))


def _observed_label(config: ToyFacesConfig, split: str, true_label: int, rng: np.random.Generator) -> int:
    if split in config.label_noise_splits and rng.random() < config.label_noise:
        options = [c for c in CONFUSABLE_CLASSES[true_label] if c < config.num_classes]
        return int(options[int(rng.integers(len(options)))])
    return true_label


def sample_labels(config: ToyFacesConfig, split: str, index: int) -> tuple[int, int]:
    """(observed label, true label) of a sample without rendering it (same values as ``sample_toyface``)."""
    streams = _streams(config, split, index)
    true_label = _true_label(config, streams[0])
    return _observed_label(config, split, true_label, streams[4]), true_label


def sample_toyface(config: ToyFacesConfig, split: str, index: int) -> ToyFace:
    """One sample; pure and deterministic in (config, split, index)."""
    r_class, r_expr, r_id, r_pix, r_noise = _streams(config, split, index)
    true_label = _true_label(config, r_class)
    aus, expr = sample_expression(config, true_label, r_expr)
    params, words = sample_face_params(config, r_id)
    if expr["unilateral"]:
        params = replace(params, au12_side=expr["unilateral_side"])
    image = render_face(params, aus, config.image_size, r_pix, supersample=config.supersample,
                        au_gain=config.au_visual_gain)
    label = _observed_label(config, split, true_label, r_noise)
    caption = caption_for(aus, words, params.hair_style, params.glasses, expr["unilateral"])
    attributes = {**{f.name: (list(v) if isinstance(v := getattr(params, f.name), tuple) else v)
                     for f in fields(params)},
                  **words, **expr, "expression": EXPRESSIONS[true_label], "label_flipped": label != true_label}
    attributes = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in attributes.items()}
    return ToyFace(image=image, label=label, true_label=true_label, aus=aus, caption=caption,
                   attributes=attributes, sample_id=f"toy_{split}_{index:06d}")


def make_split(config: ToyFacesConfig, split: str, n: int, progress: bool = False, start: int = 0) -> list[ToyFace]:
    """Samples ``start .. start+n-1`` of a split."""
    indices: Iterable[int] = range(start, start + n)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"toyfaces {split}", unit="img")
    return [sample_toyface(config, split, i) for i in indices]


def class_counts(faces: Sequence[ToyFace], num_classes: int = len(EXPRESSIONS), true: bool = False) -> np.ndarray:
    """Counts of the observed (or ``true``) labels, (num_classes,) int64."""
    labels = [f.true_label if true else f.label for f in faces]
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)[:num_classes]


# --------------------------------------------------------------------------------------------- grid
def save_sample_grid(config: ToyFacesConfig, path, per_class: int = 8, split: str = "test",
                     max_scan: int = 20_000, palette: bool = True) -> Path:
    """PNG with one row per class (class name at the row start), faces upscaled x2. Returns the path.

    Rows use the first samples of the split whose *true* class is the row's class. ``palette`` stores it with a
    256-colour dithered palette (the pixel noise makes full-colour PNGs large).
    """
    from PIL import Image, ImageDraw

    k, s = config.num_classes, config.image_size * GRID_SCALE
    found: dict[int, list[int]] = {c: [] for c in range(k)}
    for i in range(max_scan):
        c = sample_labels(config, split, i)[1]
        if len(found[c]) < per_class:
            found[c].append(i)
            if all(len(v) >= per_class for v in found.values()):
                break
    grid = Image.new("RGB", (GRID_LABEL_WIDTH + per_class * s, k * s), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c in range(k):
        draw.text((6, c * s + s // 2 - 6), EXPRESSIONS[c], fill=(0, 0, 0))
        for j, i in enumerate(found[c]):
            face = Image.fromarray(sample_toyface(config, split, i).image).resize((s, s), Image.NEAREST)
            grid.paste(face, (GRID_LABEL_WIDTH + j * s, c * s))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if palette:
        grid = grid.quantize(palette=grid.quantize(256, method=Image.Quantize.FASTOCTREE),
                             dither=Image.Dither.FLOYDSTEINBERG)
    grid.save(path, optimize=True)
    return path

"""The synthesis plan's settings (``synthesis.plan`` -> ``PlanConfig``), checked field by field, and JSONL prompt
loading ("prompt enrichment"). The plan itself is built in ``plans.py``."""
from __future__ import annotations

import json
import math
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from datamodules.labels import AU_MAX_INTENSITY, class_name_to_id
from datamodules.toyfaces import HAIR_COLOURS, HAIR_STYLES, SKIN_TONES, hair_phrase

DISTRIBUTIONS: tuple[str, ...] = ("balanced", "real", "fill_rare")
AU_SOURCES: tuple[str, ...] = ("prototype", "real_stats")
CAPTION_SOURCES: tuple[str, ...] = ("template", "jsonl")
BUILTIN_PLACEHOLDERS: tuple[str, ...] = ("expression", "cues")
NEUTRAL_CUE = "neutral expression"  # what toy captions say when no AU reaches the threshold

# The toy renderer's caption words, so plan captions stay inside the toy generator's vocabulary.
DEFAULT_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "hair": tuple(dict.fromkeys(hair_phrase(colour, style) for style in HAIR_STYLES for colour, _ in HAIR_COLOURS)),
    "skin": tuple(name for name, _ in SKIN_TONES),
}
DEFAULT_TEMPLATES: tuple[str, ...] = ("a close-up photo of a person with {hair}, {skin} skin, {cues}",)


# ============================================================================================ config
def _fail(name: str, what: str, value: Any) -> None:
    raise ValueError(f"plan.{name} must be {what}, got {value!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _number(name: str, value: Any) -> float:
    """A finite float, or an error naming the field (Hydra may hand over strings)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if isinstance(value, bool) or not math.isfinite(x):
        _fail(name, "a finite number", value)
    return x


def _placeholders(text: str, where: str) -> list[str]:
    """Field names of a format string; malformed braces or positional fields are errors naming ``where``."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ValueError(f"{where} is not a valid format string ({e}): {text!r}") from None
    names = []
    for _, name, _, spec in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit() or (spec and "{" in spec):
            raise ValueError(f"{where} may only use named placeholders like {{hair}}, got {text!r}")
        names.append(name)
    return names


def _check_placeholders(text: str, known: Sequence[str], where: str) -> None:
    unknown = [n for n in _placeholders(text, where) if n not in known]
    if unknown:
        raise ValueError(f"{where} has unknown placeholder {{{unknown[0]}}} in {text!r}; known: {sorted(known)}")


@dataclass(frozen=True)
class PlanConfig:
    """What to synthesise. Sequences/mappings from Hydra are accepted and normalised to tuples/dicts."""

    size: Optional[int] = None
    scale: Optional[float] = None
    class_distribution: str | Sequence[float] = "balanced"
    au_source: str = "prototype"
    strength_range: tuple[float, float] = (0.6, 1.0)
    au_jitter_std: float = 0.3
    captions: str = "template"
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    attributes: Mapping[str, Sequence[str]] = field(default_factory=lambda: dict(DEFAULT_ATTRIBUTES), hash=False)
    prompts: Optional[str] = None
    cue_threshold: float = 1.0
    max_cues: int = 3
    seed: int = 0
    base_seed: int = 0
    id_prefix: str = "syn-"

    def __post_init__(self) -> None:
        self._check_size()
        self._check_distribution()
        self._check_aus()
        self._check_captions()
        for name in ("seed", "base_seed"):
            if not (_is_int(getattr(self, name)) and getattr(self, name) >= 0):
                _fail(name, "an int >= 0", getattr(self, name))
        if not isinstance(self.id_prefix, str):
            _fail("id_prefix", "a string", self.id_prefix)

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _check_size(self) -> None:
        # Exactly one of the two, so "scale: 5" in an experiment file cannot silently lose to a default size.
        if (self.size is None) == (self.scale is None):
            raise ValueError(f"plan: set exactly one of plan.size and plan.scale, got size={self.size!r}, "
                             f"scale={self.scale!r}")
        if self.size is not None:
            if not (_is_int(self.size) and self.size >= 1):
                _fail("size", "an int >= 1", self.size)
            self._set("size", int(self.size))
        if self.scale is not None:
            if _number("scale", self.scale) <= 0:
                raise ValueError(f"plan.scale must be > 0, got {self.scale!r}")
            self._set("scale", float(self.scale))

    def _check_distribution(self) -> None:
        dist = self.class_distribution
        if isinstance(dist, str):
            if dist not in DISTRIBUTIONS:
                _fail("class_distribution", f"one of {DISTRIBUTIONS} or a list of class weights", dist)
            return
        try:
            weights = tuple(float(w) for w in dist)
        except (TypeError, ValueError):
            _fail("class_distribution", f"one of {DISTRIBUTIONS} or a list of class weights", dist)
        # The count (num_classes) is only known at build time; build_plan checks it.
        if not weights or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            _fail("class_distribution", "a list of non-negative weights with a positive sum", dist)
        self._set("class_distribution", weights)

    def _check_aus(self) -> None:
        if self.au_source not in AU_SOURCES:
            _fail("au_source", f"one of {AU_SOURCES}", self.au_source)
        try:
            lo, hi = (float(x) for x in self.strength_range)
        except (TypeError, ValueError):
            _fail("strength_range", "a pair (low, high)", self.strength_range)
        if not (0.0 <= lo <= hi <= 2.0):
            _fail("strength_range", "a pair with 0 <= low <= high <= 2", self.strength_range)
        self._set("strength_range", (lo, hi))
        if _number("au_jitter_std", self.au_jitter_std) < 0:
            _fail("au_jitter_std", ">= 0", self.au_jitter_std)
        if not 0.0 < _number("cue_threshold", self.cue_threshold) <= AU_MAX_INTENSITY:
            _fail("cue_threshold", f"in (0, {AU_MAX_INTENSITY}]", self.cue_threshold)
        self._set("au_jitter_std", float(self.au_jitter_std))
        self._set("cue_threshold", float(self.cue_threshold))
        if not (_is_int(self.max_cues) and self.max_cues >= 1):
            _fail("max_cues", "an int >= 1", self.max_cues)

    def _check_captions(self) -> None:
        if self.captions not in CAPTION_SOURCES:
            _fail("captions", f"one of {CAPTION_SOURCES}", self.captions)
        self._set("attributes", _normalise_attributes(self.attributes))
        templates = (self.templates,) if isinstance(self.templates, str) else tuple(self.templates)
        if not templates or not all(isinstance(t, str) and t for t in templates):
            _fail("templates", "a non-empty list of non-empty strings", self.templates)
        for i, template in enumerate(templates):
            _check_placeholders(template, self.placeholders, f"plan.templates[{i}]")
        self._set("templates", templates)
        if self.captions == "jsonl":
            if self.prompts is None or str(self.prompts) == "":
                _fail("prompts", 'a JSONL path when plan.captions="jsonl"', self.prompts)
            self._set("prompts", str(self.prompts))

    @property
    def placeholders(self) -> tuple[str, ...]:
        """Names a template or prompt may use."""
        return (*BUILTIN_PLACEHOLDERS, *self.attributes)


def _normalise_attributes(attributes: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(attributes, Mapping):
        _fail("attributes", "a mapping name -> list of phrases", attributes)
    out: dict[str, tuple[str, ...]] = {}
    for key, values in attributes.items():
        if not (isinstance(key, str) and key.isidentifier()) or key in BUILTIN_PLACEHOLDERS:
            _fail("attributes", f"keyed by identifiers other than {BUILTIN_PLACEHOLDERS}", key)
        # A bare string would be iterated character by character: refuse it.
        if isinstance(values, str) or not isinstance(values, Sequence) or not values \
                or not all(isinstance(v, str) for v in values):
            _fail(f"attributes[{key!r}]", "a non-empty list of strings", values)
        out[key] = tuple(values)
    return out


# ============================================================================================ prompts
def load_prompts(path: str | Path, num_classes: int) -> list[dict]:
    """JSONL prompts ``{"caption": str, "label": optional id or class name}`` -> [{caption, label|None, line}]."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan.prompts: prompts file {str(path)!r} does not exist")
    prompts = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"plan.prompts: bad JSON at {where}: {e.msg}") from None
            if not isinstance(record, dict):
                raise ValueError(f"plan.prompts: {where} must be a JSON object, got {line.strip()[:80]!r}")
            caption = record.get("caption")
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f'plan.prompts: {where} needs a non-empty string "caption"')
            prompts.append({"caption": caption, "label": _prompt_label(record.get("label"), num_classes, where),
                            "line": lineno})
    if not prompts:
        raise ValueError(f"plan.prompts: {path} holds no prompt")
    return prompts


def _prompt_label(label: Any, num_classes: int, where: str) -> Optional[int]:
    if label is None:
        return None
    if isinstance(label, str):
        try:
            label = class_name_to_id(label)
        except KeyError as e:
            raise ValueError(f"plan.prompts: {where}: {e.args[0]}") from None
    elif not _is_int(label):
        raise ValueError(f"plan.prompts: {where}: label must be a class id or name, got {label!r}")
    if not 0 <= label < num_classes:
        raise ValueError(f"plan.prompts: {where}: label {label} is outside the {num_classes}-class protocol "
                         f"(0..{num_classes - 1})")
    return int(label)

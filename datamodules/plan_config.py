"""The synthesis plan's settings (``synthesis.plan`` -> ``PlanConfig``), checked field by field, and JSONL prompt
loading ("prompt enrichment"). The plan itself is built in ``plans.py``."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from datamodules.caption_builder import (BUILTIN_PLACEHOLDERS, CaptionBuilder, check_placeholders,
                                         normalise_attributes, normalise_templates, placeholders)
from datamodules.labels import class_name_to_id

DISTRIBUTIONS: tuple[str, ...] = ("balanced", "real", "fill_rare")
AU_SOURCES: tuple[str, ...] = ("prototype", "real_stats")
CAPTION_SOURCES: tuple[str, ...] = ("template", "jsonl")


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
    templates: Optional[tuple[str, ...]] = None    # None: the generator's caption builder's
    attributes: Optional[Mapping[str, Sequence[str]]] = field(default=None, hash=False)  # None: the builder's
    prompts: Optional[str] = None
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
        self._set("au_jitter_std", float(self.au_jitter_std))

    def _check_captions(self) -> None:
        """Syntax here; the placeholder names once the generator's builder is known (``caption_builder``)."""
        if self.captions not in CAPTION_SOURCES:
            _fail("captions", f"one of {CAPTION_SOURCES}", self.captions)
        if self.attributes is not None:
            self._set("attributes", normalise_attributes(self.attributes, "plan.attributes"))
        if self.templates is not None:
            templates = normalise_templates(self.templates, "plan.templates")
            for i, template in enumerate(templates):
                if self.attributes is None:  # the builder's attributes are known at build time only
                    placeholders(template, f"plan.templates[{i}]")
                else:
                    check_placeholders(template, (*BUILTIN_PLACEHOLDERS, *self.attributes), f"plan.templates[{i}]")
            self._set("templates", templates)
        if self.captions == "jsonl":
            if self.prompts is None or str(self.prompts) == "":
                _fail("prompts", 'a JSONL path when plan.captions="jsonl"', self.prompts)
            self._set("prompts", str(self.prompts))

    def caption_builder(self, generator_builder: CaptionBuilder) -> CaptionBuilder:
        """The builder plan captions come from: the generator's, with this plan's templates / attributes when set
        (errors name ``plan.templates`` / ``plan.attributes``)."""
        return generator_builder.with_overrides(self.templates, self.attributes, key="plan")


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

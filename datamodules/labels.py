"""Canonical expression ids, per-dataset label maps and the action-unit vocabulary.

Expression ids follow AffectNet's order. Every reader maps its dataset's own ids into these,
so the rest of the suite only ever sees canonical ids.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

EXPRESSIONS: tuple[str, ...] = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt")
NEUTRAL, HAPPY, SAD, SURPRISE, FEAR, DISGUST, ANGER, CONTEMPT = range(8)
UNKNOWN_LABEL = -1

# Dataset id -> canonical id.
RAFDB_TO_CANONICAL: dict[int, int] = {1: SURPRISE, 2: FEAR, 3: DISGUST, 4: HAPPY, 5: SAD, 6: ANGER, 7: NEUTRAL}
FER2013_TO_CANONICAL: dict[int, int] = {0: ANGER, 1: DISGUST, 2: FEAR, 3: HAPPY, 4: SAD, 5: SURPRISE, 6: NEUTRAL}
# AffectNet ids 0..7 are already canonical; 8 none, 9 uncertain, 10 no-face are dropped by the readers.
AFFECTNET_DROPPED_IDS: frozenset[int] = frozenset({8, 9, 10})
# FERPlus vote columns in file order; the last two (unknown, NF = not a face) are not expressions.
FERPLUS_VOTE_COLUMNS: tuple[str, ...] = (
    "neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown", "NF")
FERPLUS_TO_CANONICAL: dict[str, int] = {
    "neutral": NEUTRAL, "happiness": HAPPY, "surprise": SURPRISE, "sadness": SAD,
    "anger": ANGER, "disgust": DISGUST, "fear": FEAR, "contempt": CONTEMPT}

# Folder / free-text class names -> canonical id (lower-cased lookup).
CLASS_NAME_ALIASES: dict[str, int] = {
    **{name: i for i, name in enumerate(EXPRESSIONS)},
    "neutrality": NEUTRAL, "happiness": HAPPY, "happy": HAPPY, "joy": HAPPY,
    "sadness": SAD, "sad": SAD, "surprised": SURPRISE, "surprise": SURPRISE,
    "fearful": FEAR, "fear": FEAR, "disgusted": DISGUST, "disgust": DISGUST,
    "angry": ANGER, "anger": ANGER, "contemptuous": CONTEMPT, "contempt": CONTEMPT,
}


def class_name_to_id(name: str) -> int:
    """Map a folder/class name such as ``Happiness`` or ``angry`` to its canonical id."""
    key = name.strip().lower()
    if key.isdigit() and int(key) < len(EXPRESSIONS):
        return int(key)
    if key not in CLASS_NAME_ALIASES:
        raise KeyError(f"unknown expression class name {name!r}; known: {sorted(CLASS_NAME_ALIASES)}")
    return CLASS_NAME_ALIASES[key]


def num_classes(protocol: int) -> int:
    """7-class drops contempt; 8-class keeps it."""
    if protocol not in (7, 8):
        raise ValueError(f"expression protocol must be 7 or 8, got {protocol}")
    return protocol


def in_protocol(label: int, protocol: int) -> bool:
    """Whether a canonical label exists under the protocol (contempt does not exist in 7-class)."""
    return 0 <= label < num_classes(protocol)


def class_names(protocol: int) -> tuple[str, ...]:
    return EXPRESSIONS[: num_classes(protocol)]


# ---------------------------------------------------------------- action units
DISFA_AUS: tuple[int, ...] = (1, 2, 4, 5, 6, 9, 12, 15, 17, 20, 25, 26)
AU_NAMES: dict[int, str] = {
    1: "inner brow raiser", 2: "outer brow raiser", 4: "brow lowerer", 5: "upper lid raiser",
    6: "cheek raiser", 7: "lid tightener", 9: "nose wrinkler", 10: "upper lip raiser", 12: "lip corner puller",
    14: "dimpler", 15: "lip corner depressor", 17: "chin raiser", 20: "lip stretcher", 23: "lip tightener",
    25: "lips part", 26: "jaw drop", 45: "blink",
}
AU_MAX_INTENSITY = 5.0


@dataclass(frozen=True)
class AUVocabulary:
    """An ordered list of AUs with OpenFace-scale intensities (0..5)."""

    aus: tuple[int, ...] = DISFA_AUS
    max_intensity: float = AU_MAX_INTENSITY
    _index: Mapping[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        aus = tuple(int(a) for a in self.aus)
        if not aus:
            raise ValueError("AU vocabulary is empty")
        if len(set(aus)) != len(aus):
            raise ValueError(f"AU vocabulary has duplicates: {aus}")
        if any(a <= 0 for a in aus):
            raise ValueError(f"AU numbers must be positive: {aus}")
        object.__setattr__(self, "aus", aus)
        object.__setattr__(self, "_index", {a: i for i, a in enumerate(aus)})

    def __len__(self) -> int:
        return len(self.aus)

    def index(self, au: int) -> int:
        if au not in self._index:
            raise KeyError(f"AU{au} is not in the vocabulary {self.aus}")
        return self._index[au]

    def openface_columns(self) -> list[str]:
        """OpenFace 2 intensity column names, e.g. ``AU01_r``."""
        return [f"AU{a:02d}_r" for a in self.aus]

    def vector(self, intensities: Mapping[int, float], strict: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """AU number -> intensity mapping to (values float32 (A,), known-mask bool (A,)).

        AUs absent from ``intensities`` are unknown (mask False, value 0). Values outside 0..max raise.
        """
        values = np.zeros(len(self), dtype=np.float32)
        mask = np.zeros(len(self), dtype=bool)
        for au, value in intensities.items():
            au = int(au)
            if au not in self._index:
                if strict:
                    raise KeyError(f"AU{au} is not in the vocabulary {self.aus}")
                continue
            value = float(value)
            if not (0.0 <= value <= self.max_intensity) or np.isnan(value):
                raise ValueError(f"AU{au} intensity {value} outside [0, {self.max_intensity}]")
            values[self._index[au]] = value
            mask[self._index[au]] = True
        return values, mask

    def unknown(self) -> tuple[np.ndarray, np.ndarray]:
        """All AUs unknown."""
        return np.zeros(len(self), dtype=np.float32), np.zeros(len(self), dtype=bool)

    def describe(self, values: Sequence[float], threshold: float = 1.0) -> list[str]:
        """Names of the AUs active above ``threshold`` (for captions and logs)."""
        return [AU_NAMES.get(a, f"AU{a}") for a, v in zip(self.aus, values) if v >= threshold]


def parse_au_list(aus: Iterable[int | str] | None) -> AUVocabulary:
    """Config value (list of ints or 'AU12'-style strings, or None for the default) -> vocabulary."""
    if aus is None:
        return AUVocabulary()
    parsed = []
    for a in aus:
        s = str(a).strip().upper().removeprefix("AU")
        if not s.isdigit():
            raise ValueError(f"bad AU name {a!r} in the AU list (expected e.g. 12 or 'AU12')")
        parsed.append(int(s))
    return AUVocabulary(tuple(parsed))

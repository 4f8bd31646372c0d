"""Captions for faces that come without one: the expression word and the face's known AU cues, filled into one
configured template family.

Generator training (faces without a caption), its evaluation conditions and sample grids, and synthesis plans all
caption through ``CaptionBuilder``, so a face planned for class c is captioned the way training captioned class c.
The generator saves its builder settings next to its pipeline (``captions.json``); synthesis reads them there.

Families (``family``; ``templates`` / ``attributes`` / ``no_cues`` override a family's own):

* ``expression`` (real data): "a close-up photo of a happy face, smiling, cheeks raised". No toy vocabulary.
* ``toy``: the toy renderer's own captions ("a close-up photo of a person with short dark hair, fair skin,
  smiling"): for a generator trained on toy captions. They carry no expression word, as the toy captions do not.
* ``auto``: ``toy`` when the data format is ``toy`` (every toy face carries the renderer's caption), else
  ``expression``.

Placeholders: ``{expression}`` (the expression adjective, empty for an unknown label), ``{cues}`` (plain-language
cues of the known AUs at or above ``cue_threshold``, strongest first, or ``no_cues`` when none is), and one per
attribute (one phrase drawn per caption). Empty comma-separated fields are dropped, so "a {expression} face, {cues}"
reads "a face" for an unknown label without AUs. AUs marked unknown are never named, and with ``name_aus`` off (a
generator whose training faces had no AUs) no AU is named at all.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from datamodules.labels import AU_MAX_INTENSITY, CONTEMPT, DISFA_AUS
from datamodules.toyfaces import HAIR_COLOURS, HAIR_STYLES, SKIN_TONES, au_cues, hair_phrase

# Adjectives in canonical id order: "a surprised face", not "a surprise face".
EXPRESSION_WORDS: tuple[str, ...] = ("neutral", "happy", "sad", "surprised", "fearful", "disgusted", "angry",
                                     "contemptuous")
BUILTIN_PLACEHOLDERS: tuple[str, ...] = ("expression", "cues")
SETTINGS_FILE = "captions.json"

TOY_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "hair": tuple(dict.fromkeys(hair_phrase(colour, style) for style in HAIR_STYLES for colour, _ in HAIR_COLOURS)),
    "skin": tuple(name for name, _ in SKIN_TONES),
}
FAMILIES: dict[str, dict[str, Any]] = {
    "expression": {"templates": ("a close-up photo of a {expression} face, {cues}",), "attributes": {},
                   "no_cues": ""},
    "toy": {"templates": ("a close-up photo of a person with {hair}, {skin} skin, {cues}",),
            "attributes": TOY_ATTRIBUTES, "no_cues": "neutral expression"},  # the toy captions' no-cue words
}
FAMILY_CHOICES: tuple[str, ...] = ("auto", *FAMILIES)


def resolve_family(family: str, data_format: Optional[str], key: str = "captions") -> str:
    if family not in FAMILY_CHOICES:
        raise ValueError(f"{key}.family must be one of {FAMILY_CHOICES}, got {family!r}")
    if family != "auto":
        return family
    if not data_format:
        raise ValueError(f"{key}.family=auto needs the data format ({key}.data_format)")
    return "toy" if data_format == "toy" else "expression"


def placeholders(text: str, where: str) -> list[str]:
    """Field names of a format string; malformed braces or positional fields are errors naming ``where``."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise ValueError(f"{where} is not a valid format string ({e}): {text!r}") from None
    names = []
    for _, name, _, spec in parsed:
        if name is None:
            continue
        if name == "" or not name.isidentifier() or (spec and "{" in spec):
            raise ValueError(f"{where} may only use named placeholders like {{expression}}, got {text!r}")
        names.append(name)
    return names


def check_placeholders(text: str, known: Sequence[str], where: str) -> None:
    unknown = [n for n in placeholders(text, where) if n not in known]
    if unknown:
        raise ValueError(f"{where} has unknown placeholder {{{unknown[0]}}} in {text!r}; known: {sorted(known)}")


def normalise_attributes(attributes: Any, where: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(attributes, Mapping):
        raise ValueError(f"{where} must be a mapping name -> list of phrases, got {attributes!r}")
    out: dict[str, tuple[str, ...]] = {}
    for name, values in attributes.items():
        if not (isinstance(name, str) and name.isidentifier()) or name in BUILTIN_PLACEHOLDERS:
            raise ValueError(f"{where} must be keyed by identifiers other than {BUILTIN_PLACEHOLDERS}, got {name!r}")
        # A bare string would be iterated character by character: refuse it.
        if isinstance(values, str) or not isinstance(values, Sequence) or not values \
                or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{where}[{name!r}] must be a non-empty list of strings, got {values!r}")
        out[name] = tuple(values)
    return out


def normalise_templates(templates: Any, where: str) -> tuple[str, ...]:
    templates = (templates,) if isinstance(templates, str) else tuple(templates)
    if not templates or not all(isinstance(t, str) and t.strip() for t in templates):
        raise ValueError(f"{where} must be a non-empty list of non-empty strings, got {templates!r}")
    return templates


@dataclass(frozen=True)
class CaptionBuilder:
    """Captions from (label, AUs in ``aus`` order, AU mask, rng). ``key`` names the config block in errors."""

    family: str = "expression"
    templates: Optional[Sequence[str]] = None          # None: the family's
    attributes: Optional[Mapping[str, Sequence[str]]] = field(default=None, hash=False)
    no_cues: Optional[str] = None
    cue_threshold: float = 1.0
    max_cues: int = 3
    name_aus: bool = True
    aus: Sequence[int] = DISFA_AUS
    key: str = field(default="captions", compare=False)

    def __post_init__(self) -> None:
        k = self.key
        if self.family not in FAMILIES:
            raise ValueError(f"{k}.family must be one of {tuple(FAMILIES)} once resolved, got {self.family!r}")
        own = FAMILIES[self.family]
        attributes = normalise_attributes(own["attributes"] if self.attributes is None else self.attributes,
                                          f"{k}.attributes")
        templates = normalise_templates(own["templates"] if self.templates is None else self.templates,
                                        f"{k}.templates")
        for i, template in enumerate(templates):
            check_placeholders(template, (*BUILTIN_PLACEHOLDERS, *attributes), f"{k}.templates[{i}]")
        no_cues = own["no_cues"] if self.no_cues is None else self.no_cues
        if not isinstance(no_cues, str):
            raise ValueError(f"{k}.no_cues must be a string, got {no_cues!r}")
        try:
            threshold = float(self.cue_threshold)
        except (TypeError, ValueError):
            threshold = float("nan")
        if isinstance(self.cue_threshold, bool) or not 0.0 < threshold <= AU_MAX_INTENSITY:
            raise ValueError(f"{k}.cue_threshold must be in (0, {AU_MAX_INTENSITY}], got {self.cue_threshold!r}")
        if isinstance(self.max_cues, bool) or not isinstance(self.max_cues, (int, np.integer)) or self.max_cues < 0:
            raise ValueError(f"{k}.max_cues must be an int >= 0, got {self.max_cues!r}")
        if not isinstance(self.name_aus, (bool, np.bool_)):
            raise ValueError(f"{k}.name_aus must be true or false, got {self.name_aus!r}")
        for name, value in (("templates", templates), ("attributes", attributes), ("no_cues", no_cues),
                            ("cue_threshold", threshold), ("max_cues", int(self.max_cues)),
                            ("name_aus", bool(self.name_aus)), ("aus", tuple(int(a) for a in self.aus))):
            object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]], aus: Sequence[int], key: str,
                    name_aus: bool = True) -> "CaptionBuilder":
        """A config block ``{family, templates, attributes, no_cues, cue_threshold, max_cues, data_format}``
        (None values: defaults; ``data_format`` only resolves ``family: auto``)."""
        values = {k: v for k, v in dict(config or {}).items() if v is not None}
        data_format = values.pop("data_format", None)
        unknown = sorted(set(values) - {"family", "templates", "attributes", "no_cues", "cue_threshold", "max_cues"})
        if unknown:
            raise ValueError(f"{key} has unknown setting(s) {unknown}")
        values["family"] = resolve_family(values.get("family", "expression"), data_format, key)
        return cls(**values, name_aus=name_aus, aus=tuple(aus), key=key)

    def settings(self) -> dict[str, Any]:
        """The resolved settings (JSON-ready): what ``from_config`` rebuilds this builder from."""
        return {"family": self.family, "templates": list(self.templates),
                "attributes": {k: list(v) for k, v in self.attributes.items()}, "no_cues": self.no_cues,
                "cue_threshold": self.cue_threshold, "max_cues": self.max_cues}

    def with_overrides(self, templates: Optional[Sequence[str]] = None,
                       attributes: Optional[Mapping[str, Sequence[str]]] = None, key: Optional[str] = None
                       ) -> "CaptionBuilder":
        """The same builder with other templates / attributes (None: keep); errors name ``key``."""
        return replace(self, templates=self.templates if templates is None else templates,
                       attributes=self.attributes if attributes is None else attributes, key=key or self.key)

    @property
    def placeholders(self) -> tuple[str, ...]:
        return (*BUILTIN_PLACEHOLDERS, *self.attributes)

    # ------------------------------------------------------------------ captions
    def caption(self, label: int, aus: Optional[Sequence[float]] = None, au_mask: Optional[Sequence[bool]] = None,
                rng: Optional[np.random.Generator] = None) -> str:
        """One caption; ``rng`` is needed when the family has a choice (several templates, attributes)."""
        return self.fill(self.templates[self._draw(len(self.templates), rng)], label, aus, au_mask, rng)

    def fill(self, text: str, label: int, aus: Optional[Sequence[float]] = None,
             au_mask: Optional[Sequence[bool]] = None, rng: Optional[np.random.Generator] = None) -> str:
        """``text`` (a template or a user prompt using the same placeholders) filled for one face."""
        # Every attribute is drawn even if the text does not use it, so draws never depend on the text chosen.
        values = {name: options[self._draw(len(options), rng)] for name, options in self.attributes.items()}
        word = EXPRESSION_WORDS[label] if 0 <= label < len(EXPRESSION_WORDS) else ""
        cues = self.cues(label, aus, au_mask)
        values.update(expression=word, cues=", ".join(cues) if cues else self.no_cues)
        out = ", ".join(part for part in (" ".join(p.split()) for p in text.format(**values).split(",")) if part)
        if word[:1] in tuple("aeiou"):
            out = re.sub(rf"\b([aA]) (?={word}\b)", r"\1n ", out)  # "an angry face"
        return out

    def cues(self, label: int, aus: Optional[Sequence[float]], au_mask: Optional[Sequence[bool]]) -> list[str]:
        """Cue phrases of the known AUs (none with ``name_aus`` off or without AUs)."""
        if aus is None or not self.name_aus or self.max_cues == 0:
            return []
        aus = [float(v) for v in aus]
        mask = [True] * len(aus) if au_mask is None else [bool(m) for m in au_mask]
        if len(aus) != len(self.aus) or len(mask) != len(self.aus):
            raise ValueError(f"got {len(aus)} AU values / {len(mask)} mask entries for the {len(self.aus)} AUs "
                             f"{list(self.aus)}")
        known = {au: v for au, v, m in zip(self.aus, aus, mask) if m}
        return au_cues(known, self.cue_threshold, self.max_cues, unilateral=label == CONTEMPT)

    def _draw(self, n: int, rng: Optional[np.random.Generator]) -> int:
        if n == 1:
            return 0
        if rng is None:
            raise ValueError(f"{self.key}: this caption family draws templates/attributes and needs an rng")
        return int(rng.integers(n))

    @property
    def draws(self) -> bool:
        """Whether captions involve a random choice (callers need an rng)."""
        return len(self.templates) > 1 or any(len(v) > 1 for v in self.attributes.values())


def caption_records(records: Sequence[Any], builder: Optional[CaptionBuilder], seed: int = 0) -> list[str]:
    """Each record's own caption, or the builder's from its label and known AUs when it has none."""
    rng = np.random.default_rng(seed)
    out = []
    for r in records:
        if r.caption:
            out.append(r.caption)
            continue
        if builder is None:
            raise ValueError(f"record {r.sample_id!r} has no caption and no caption builder was given")
        out.append(builder.caption(int(r.label), r.aus, r.au_mask, rng))
    return out


# ------------------------------------------------------------------ the generator's saved settings
def save_settings(directory: str | Path, builder: CaptionBuilder, trained_on_aus: Optional[bool]) -> Path:
    """``captions.json`` in a generator's pipeline folder: its builder settings, and whether its training faces
    carried AUs (``false``: its captions never named an AU, so synthesis names none either)."""
    path = Path(directory) / SETTINGS_FILE
    path.write_text(json.dumps({**builder.settings(), "trained_on_aus": trained_on_aus}, indent=2) + "\n")
    return path


def load_settings(directory: str | Path, aus: Sequence[int], key: str) -> CaptionBuilder:
    """The builder a generator saved with ``save_settings`` (errors name ``key``, the folder's config key)."""
    path = Path(directory) / SETTINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{key}: {path} is missing: the generator's caption settings (written by stage=generator). Retrain the "
            f'generator, or write it by hand, e.g. {{"family": "toy"}} for a generator trained on toy captions or '
            f'{{"family": "expression"}} for one trained on captionless faces')
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{key}: {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{key}: {path} must hold a JSON object, got {type(values).__name__}")
    trained = values.pop("trained_on_aus", None)
    try:
        return CaptionBuilder.from_config(values, aus, "captions.json", name_aus=trained is not False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{key}: {path}: {e}") from None

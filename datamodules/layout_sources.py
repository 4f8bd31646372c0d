"""Layout initialisation sources: the real face each planned synthetic face starts from.

With layout initialisation on, a synthetic face is not sampled from pure noise: a real face is DDIM-inverted to a
fraction (``strength``) of the sampler's trajectory and the remaining steps are sampled from there under the
face's own conditions, so the synthetic face keeps the real face's layout (pose, framing, face shape).

Which real face each plan row gets is a deterministic function of the row's index:

* ``per_class``: a real face labelled with the row's planned class; ``any``: any real face.
* Within a group (a class, or every face for ``any``) the k-th row of the plan takes position ``k mod M`` of the
  ``k // M``-th seeded permutation of the group's M faces (``np.random.SeedSequence([seed, mode, group, pass])``).
  Every real face is therefore used ``floor`` or ``ceil`` of (rows / M) times (no face is drawn twice before
  every face was drawn once), and because the plan's class sequence is prefix-stable, so are the sources: the
  rows of a small plan keep their sources in a larger one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from datamodules.batch import LOAD_ERRORS, FERRecord, load_record_image
from datamodules.errors import DataError
from datamodules.labels import EXPRESSIONS

SOURCE_MODES: tuple[str, ...] = ("per_class", "any")


class LayoutConfigError(ValueError):
    """A bad ``layout_init`` value; ``field`` is the key below ``layout_init``."""

    def __init__(self, field: str, message: str):
        super().__init__(f"layout_init.{field} {message}")
        self.field = field


@dataclass(frozen=True)
class LayoutConfig:
    """``synthesis.layout_init``: the ablation switch, the inversion strength, how sources are drawn, the seed."""

    enabled: bool = False
    strength: float = 0.5   # fraction of the sampler's steps run from the inverted face; 1 = the whole trajectory
    source: str = "per_class"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise LayoutConfigError("enabled", f"must be true or false, got {self.enabled!r}")
        try:
            strength = float(self.strength)
        except (TypeError, ValueError):
            strength = math.nan
        if isinstance(self.strength, bool) or not (0.0 < strength <= 1.0):  # nan fails too
            raise LayoutConfigError("strength", f"must be in (0, 1] (the fraction of the sampling steps run from "
                                                f"the inverted real face), got {self.strength!r}")
        object.__setattr__(self, "strength", strength)
        if self.source not in SOURCE_MODES:
            raise LayoutConfigError("source", f"must be one of {SOURCE_MODES}, got {self.source!r}")
        if not (isinstance(self.seed, (int, np.integer)) and not isinstance(self.seed, bool) and self.seed >= 0):
            raise LayoutConfigError("seed", f"must be an int >= 0, got {self.seed!r}")

    def settings(self) -> dict[str, Any]:
        return {"strength": self.strength, "source": self.source, "seed": int(self.seed)}


def assign_sources(labels: Sequence[int] | np.ndarray, pool_labels: Sequence[int] | np.ndarray, mode: str,
                   seed: int) -> np.ndarray:
    """(n,) int64: for each plan row (its planned class in ``labels``) an index into the real pool.

    ``pool_labels``: the pool faces' labels (-1 = unknown; such faces are drawn only by ``any``). ``per_class``
    with a planned class that no pool face has is a LayoutConfigError on ``source``.
    """
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    pool_labels = np.asarray(pool_labels, dtype=np.int64).reshape(-1)
    if mode not in SOURCE_MODES:
        raise LayoutConfigError("source", f"must be one of {SOURCE_MODES}, got {mode!r}")
    if len(pool_labels) == 0:
        raise LayoutConfigError("enabled", "needs real faces to invert, but the real train set has none")
    out = np.empty(len(labels), dtype=np.int64)
    if mode == "any":
        groups = {0: (np.arange(len(labels)), np.arange(len(pool_labels)))}
    else:
        groups = {}
        for c in np.unique(labels).tolist():
            members = np.flatnonzero(pool_labels == c)
            if len(members) == 0:
                raise LayoutConfigError("source", f"per_class: the plan asks for {EXPRESSIONS[c]!r} faces (class "
                                                  f"{c}) but the real train set has no face of that class; use "
                                                  f"source=any or a plan without that class")
            groups[c] = (np.flatnonzero(labels == c), members)
    mode_id = SOURCE_MODES.index(mode)
    for group, (rows, members) in groups.items():
        k = np.arange(len(rows))
        passes, position = k // len(members), k % len(members)
        for p in np.unique(passes).tolist():
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), mode_id, int(group), int(p)]))
            perm = rng.permutation(len(members))
            hit = passes == p
            out[rows[hit]] = members[perm[position[hit]]]
    return out


def load_faces(records: Sequence[FERRecord], image_size: int, color_mode: str) -> torch.Tensor:
    """(N,3,H,W) in [0,1]: the faces as the generator learned them (its resolution and colour mode, no
    augmentation). An unreadable face is a DataError naming it."""
    from datamodules.transforms import eval_transform

    transform = eval_transform(int(image_size), color_mode)
    images = []
    for record in records:
        try:
            image = load_record_image(record)
        except LOAD_ERRORS as err:
            where = record.image if isinstance(record.image, str) else "in memory"
            raise DataError(f"synthesis.layout_init: the real face {record.sample_id} ({where}) drawn as a layout "
                            f"source cannot be read: {err} (data.verify_images=true drops unreadable faces when "
                            "the data is read)") from err
        images.append(((transform(image) + 1) / 2).clamp(0, 1))
    return torch.stack(images)


class LayoutSources:
    """The source face of every plan row, and loading those faces for a batch of rows.

    ``pool``: the real faces sources may be drawn from (the stage passes the labelled train subset); ``labels``:
    the plan's class column.
    """

    def __init__(self, config: LayoutConfig, labels: Sequence[int] | np.ndarray, pool: Sequence[FERRecord],
                 image_size: Optional[int] = None, color_mode: str = "rgb"):
        if not config.enabled:
            raise ValueError("LayoutSources needs layout_init.enabled=true")
        self.config, self.pool = config, list(pool)
        self.index = assign_sources(labels, [r.label for r in self.pool], config.source, config.seed)
        self.image_size, self.color_mode = image_size, color_mode

    def __len__(self) -> int:
        return len(self.index)

    def at_resolution(self, image_size: int, color_mode: str) -> "LayoutSources":
        """Load faces at the generator's resolution and colour mode (known once the generator is loaded)."""
        self.image_size, self.color_mode = int(image_size), color_mode
        return self

    def source_ids(self, rows: Sequence[int]) -> list[str]:
        return [self.pool[self.index[int(i)]].sample_id for i in rows]

    def images(self, rows: Sequence[int]) -> torch.Tensor:
        if self.image_size is None:
            raise RuntimeError("LayoutSources.images before at_resolution(): the generator's size is not known")
        return load_faces([self.pool[self.index[int(i)]] for i in rows], self.image_size, self.color_mode)

    def summary(self) -> dict[str, Any]:
        """What the manifest records: the settings, the pool size and how many distinct faces were drawn."""
        return {**self.config.settings(), "pool_faces": len(self.pool),
                "distinct_sources": int(len(np.unique(self.index)))}

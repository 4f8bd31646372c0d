"""How synthetic faces are stored: resolution and image format (``synthesis.storage``), and the dataset card
(README.md) every set folder carries, so the set opens with plain ``datasets`` calls.

Students resize every face to ``data.image_size`` anyway, so storing 512 px SD faces as 512 px PNG mostly buys
disk: ``image_size`` (null = the generator's) and ``format`` (png lossless; jpeg / webp with ``quality``) trade
that off. The settings are recorded in the set's manifest (``meta.storage``).
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Optional

import torch
from PIL import Image

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


class StorageConfigError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class StorageConfig:
    image_size: Optional[int] = None  # stored side length; None = the generator's
    format: str = "png"
    quality: int = 95  # jpeg / webp only

    def __post_init__(self):
        if self.image_size is not None and (isinstance(self.image_size, bool) or not isinstance(self.image_size, int)
                                            or self.image_size < 8):
            raise StorageConfigError("image_size", f"must be null (the generator's) or an integer >= 8, "
                                                   f"got {self.image_size!r}")
        if self.format not in PIL_FORMATS:
            raise StorageConfigError("format", f"must be one of {', '.join(PIL_FORMATS)}, got {self.format!r}")
        if isinstance(self.quality, bool) or not isinstance(self.quality, int) or not 1 <= self.quality <= 100:
            raise StorageConfigError("quality", f"must be an integer in [1, 100], got {self.quality!r}")

    @property
    def is_default(self) -> bool:
        """PNG at the generator's size: the bytes every set had before storage was configurable."""
        return self.image_size is None and self.format == "png"

    def settings(self, generator_size: int) -> dict:
        return {"format": self.format, "quality": None if self.format == "png" else self.quality,
                "image_size": self.image_size or int(generator_size), "generator_image_size": int(generator_size)}


def storage_config(values: Optional[dict]) -> StorageConfig:
    """``synthesis.storage`` (absent = PNG at the generator's size); an unknown key is a StorageConfigError."""
    values = dict(values or {})
    unknown = sorted(set(values) - {"image_size", "format", "quality"})
    if unknown:
        raise StorageConfigError(unknown[0], "is not a storage setting (known: image_size, format, quality)")
    return StorageConfig(**values)


def encode_image(image: Image.Image, storage: StorageConfig) -> bytes:
    size = storage.image_size
    if size is not None and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    options = {} if storage.format == "png" else {"quality": storage.quality}
    image.save(buffer, format=PIL_FORMATS[storage.format], **options)
    return buffer.getvalue()


def encode_faces(images: torch.Tensor, color_mode: str = "rgb",
                 storage: Optional[StorageConfig] = None) -> list[dict]:
    """(N,3,H,W) in [0,1] -> the ``datasets.Image`` cell of each face, encoded as ``storage`` says (default:
    lossless, deterministic PNG at the generated size), RGB or for ``gray`` an L image of the luma."""
    from datamodules.synthetic import to_pil

    storage = storage or StorageConfig()
    return [{"bytes": encode_image(image, storage), "path": None} for image in to_pil(images, color_mode)]


# ------------------------------------------------------------------------------------------------ dataset cards
def _front_matter(configs: list[tuple[str, str]]) -> list[str]:
    """HF dataset-card metadata: ``load_dataset(<folder>, name)`` reads these files (arrow / parquet)."""
    lines = ["---", "configs:"]
    for name, pattern in configs:
        lines += [f"- config_name: {name}", "  data_files:", "  - split: train", f"    path: {pattern}"]
    return lines + ["---", ""]


def _table(rows: list[tuple[str, object]]) -> list[str]:
    return ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]


def synthetic_card(manifest: dict, class_names: list[str], settings: dict) -> str:
    """README.md of a synthesized set: counts per class, generator, sampling / guidance, storage, and how to load
    it. ``settings``: {"generator", "sample", "guidance", "layout_init"} as the stage used them."""
    meta = manifest.get("meta", {})
    counts = meta.get("class_counts") or []
    names = list(class_names) + [str(c) for c in range(len(class_names), len(counts))]
    storage = meta.get("storage") or {"format": "png", "image_size": meta.get("image_size")}
    lines = _front_matter([("default", "shards/*/data-*.arrow")])
    lines += ["# Synthetic FER set", "",
              f"{manifest.get('count', 0)} faces made by stage=synthesize (complete: {meta.get('complete')}); one "
              "row per face, nothing deleted.", "", "## Provenance", ""]
    lines += _table([("generator", f"`{settings.get('generator')}`"),
                     ("generator trained on", meta.get("generator_training_data") or "unknown"),
                     ("config fingerprint", meta.get("fingerprint")),
                     ("sampling", settings.get("sample")),
                     ("semantic guidance", settings.get("guidance") or "off"),
                     ("layout initialisation", meta.get("layout_init") or "off"),
                     ("stored as", f"{storage.get('format')} {storage.get('image_size')} px"
                      + (f", quality {storage['quality']}" if storage.get("quality") else "")
                      + f", colour {meta.get('color_mode', 'rgb')}")])
    lines += ["", "## Faces per planned class", "", "| class | faces |", "|---|---:|"]
    lines += [f"| {names[c]} | {n} |" for c, n in enumerate(counts)]
    lines += ["", "## Loading", "", "```python",
              "from datasets import load_dataset, load_from_disk, concatenate_datasets",
              "ds = load_dataset('<this folder>', split='train', streaming=True)  # reads the shards in place",
              "# zero-copy, memory-mapped (load_dataset without streaming converts into the HF cache: a copy)",
              "import json; m = json.load(open('<this folder>/manifest.json'))",
              "ds = concatenate_datasets([load_from_disk(f'<this folder>/shards/{s[\"name\"]}') for s in m['shards']])",
              "```", "", "Columns: image, sample_id, seed, target_label (the planned class), target_aus, au_mask, "
              "caption, guidance (json of the sampling settings)."]
    return "\n".join(lines) + "\n"


def labels_card(manifest: dict, data_card_md: str) -> str:
    """README.md of a relabelled set: where its faces are, how to join, then the vote's data card."""
    sources = manifest.get("sources", [])
    lines = _front_matter([("labels", manifest.get("labels", "labels.parquet"))])
    lines += ["# Relabelled synthetic FER set (labels only)", "",
              f"{manifest.get('count', 0)} labels voted by {', '.join(manifest.get('meta', {}).get('voters', []))}. "
              "The faces are not copied: they stay in the synthesized set(s) below, joined by `sample_id`.", ""]
    lines += [f"- `{s['path']}` (absolute when written: `{s['absolute']}`, {s['count']} faces)" for s in sources]
    lines += ["", "## Loading", "", "```python",
              "from datamodules.synthetic import load_synthetic",
              "ds = load_synthetic('<this folder>')  # faces + labels, joined and checked",
              "# plain datasets: the labels table alone",
              "from datasets import load_dataset",
              "labels = load_dataset('<this folder>', 'labels', split='train')  # or load_dataset('parquet', ...)",
              "```", "", "Columns: sample_id, probs/<voter>, final_label, soft_label, is_soft, confidence, "
              "voters_agree, kept (dropped faces stay with kept=false).", ""]
    body = data_card_md.split("\n", 1)[1] if data_card_md.startswith("# ") else data_card_md
    return "\n".join(lines) + "\n## Data card\n" + body

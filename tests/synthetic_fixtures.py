"""Toy synthetic sets on disk, shared by the tests of every stage that reads one (mix, relabel, report, DDP)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from datamodules.synthetic import to_pil, write_shard


def toy_faces(n: int):
    from datamodules.real import toy_records
    from datamodules.toyfaces import ToyFacesConfig

    return toy_records(ToyFacesConfig(image_size=32, seed=5), "test", n, progress=False)


def write_toy_synthetic_set(directory: Path, n: int = 40, shards: int = 2) -> list[str]:
    """Toy faces stored as a synthetic set, in ``shards`` shards; returns the sample ids in order."""
    records = toy_faces(n)
    ids = []
    per = (n + shards - 1) // shards
    for s in range(shards):
        part = records[s * per:(s + 1) * per]
        images = torch.stack([torch.from_numpy(np.asarray(r.image)).permute(2, 0, 1) for r in part]).float() / 255
        rows = {"image": to_pil(images), "sample_id": [f"syn-{s}-{i}" for i in range(len(part))],
                "seed": list(range(len(part))), "target_label": [r.label for r in part],
                "target_aus": [r.aus.tolist() for r in part], "au_mask": [r.au_mask.tolist() for r in part],
                "caption": [r.caption for r in part], "guidance": ["{}"] * len(part)}
        write_shard(directory, f"shard-{s:05d}", rows)
        ids += rows["sample_id"]
    return ids

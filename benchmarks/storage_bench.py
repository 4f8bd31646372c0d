"""Bytes per stored face, before vs after labels tables and configurable storage, and the 5x AffectNet estimate.

Three measurements, each by writing real sets with the store's own writers and summing the files on disk:

1. toy 32 px: a synthesized set of N toy faces (PNG, as stage=synthesize stores them); the relabelled set as it was
   written before (a second image set: faces + vote columns, ``write_dataset``) vs now (``labels.parquet`` +
   a reference, ``write_label_set``), with two voters' probabilities, 7 classes.
2. 512 px faces: M photographic 512 px faces (random crops / flips / brightness and ``--grain`` noise of the
   portrait shipped with matplotlib, ``grace_hopper.jpg``; a stand-in for SD faces, which are photographic too) written as shards
   in each storage setting (png 512 = what stage=synthesize stored before; jpeg / webp; 256 px; 128 px).
3. 5x AffectNet (1.44 M faces): before = PNG 512 synthesized + the relabel copy; after = the chosen storage + the
   labels table.

    .venv/bin/python benchmarks/storage_bench.py [--n 512] [--m 32] [--out storage.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.face_storage import StorageConfig, encode_faces  # noqa: E402
from datamodules.label_table import write_label_set  # noqa: E402
from datamodules.synthetic import load_synthetic, write_dataset, write_shard  # noqa: E402

AFFECTNET_5X = 1_440_000
log = logging.getLogger("storage_bench")
SETTINGS = [("png 512 (before)", StorageConfig()), ("jpeg q95 512", StorageConfig(format="jpeg", quality=95)),
            ("jpeg q90 512", StorageConfig(format="jpeg", quality=90)),
            ("webp q90 512", StorageConfig(format="webp", quality=90)),
            ("png 256", StorageConfig(image_size=256)), ("jpeg q95 256", StorageConfig(256, "jpeg", 95)),
            ("png 128", StorageConfig(image_size=128)), ("jpeg q95 128", StorageConfig(128, "jpeg", 95))]


def folder_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def rows_for(images: torch.Tensor, storage: StorageConfig, prefix: str, num_aus: int = 12) -> dict:
    n = len(images)
    return {"image": encode_faces(images, "rgb", storage), "sample_id": [f"{prefix}-{i:08d}" for i in range(n)],
            "seed": list(range(n)), "target_label": [i % 7 for i in range(n)],
            "target_aus": [[0.5] * num_aus] * n, "au_mask": [[True] * num_aus] * n,
            "caption": ["a photo of a happy face, smiling"] * n, "guidance": ['{"sample": {"steps": 25}}'] * n}


def vote_table(ids: list[str], seed: int = 0):
    """What relabel stores per face: two voters' probabilities (7 classes), the vote, kept flag."""
    from lightning_modules.labeling.voting import ensemble_vote
    from lightning_modules.stages.relabel_stage import label_table

    gen = torch.Generator().manual_seed(seed)
    probs = torch.randn(2, len(ids), 7, generator=gen).mul(2).softmax(-1)
    result = ensemble_vote(probs, 0.5, [1.0, 1.0])
    return label_table(ids, ["feranno", "teacher"], probs, result)


def toy_measure(root: Path, n: int) -> dict:
    from datamodules.real import toy_records
    from datamodules.toyfaces import ToyFacesConfig

    records = toy_records(ToyFacesConfig(image_size=32, seed=5), "test", n, progress=False)
    images = torch.stack([torch.from_numpy(np.asarray(r.image)).permute(2, 0, 1) for r in records]).float() / 255
    synth = root / "toy" / "synthesize" / "dataset"
    write_shard(synth, "chunk-000000", rows_for(images, StorageConfig(), "syn"))
    ids = load_synthetic(synth)["sample_id"]
    labels = vote_table(ids)
    from datasets import concatenate_datasets

    old = concatenate_datasets([load_synthetic(synth), labels.remove_columns("sample_id")], axis=1)
    write_dataset(root / "toy" / "relabel_before", old, meta={"voters": ["feranno", "teacher"]})
    write_label_set(root / "toy" / "relabel" / "dataset", [synth], labels, {"voters": ["feranno", "teacher"]})
    per = lambda d: folder_bytes(d) / n  # noqa: E731
    return {"faces": n, "synthesized": per(synth), "relabel_before": per(root / "toy" / "relabel_before"),
            "relabel_after": per(root / "toy" / "relabel" / "dataset")}


def photo_faces(m: int, grain: float, size: int = 512, seed: int = 0) -> torch.Tensor:
    import matplotlib.cbook

    photo = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    rng = np.random.default_rng(seed)
    faces = []
    for _ in range(m):
        side = int(rng.uniform(0.75, 1.0) * min(photo.size))
        x, y = (int(rng.integers(0, photo.size[k] - side + 1)) for k in (0, 1))
        face = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            face = face.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(face, dtype=np.float32) * rng.uniform(0.8, 1.2) + rng.normal(0, grain, (size, size, 3))
        faces.append(torch.from_numpy(np.clip(array, 0, 255) / 255).permute(2, 0, 1))
    return torch.stack(faces).float()


def photo_measure(root: Path, m: int, grain: float) -> dict:
    faces = photo_faces(m, grain)
    out = {}
    for name, storage in SETTINGS:
        directory = root / "photo" / name.replace(" ", "_")
        write_shard(directory, "chunk-000000", rows_for(faces, storage, "syn"))
        out[name] = folder_bytes(directory) / m
    return out


def estimate(toy: dict, photo: dict) -> dict:
    """5x AffectNet: faces x bytes per face; the labels table's bytes per face do not depend on the image size."""
    labels = toy["relabel_after"]
    before = AFFECTNET_5X * 2 * photo["png 512 (before)"]  # the relabel copy held every face again
    rows = {"before: png 512 synthesized + relabel copy": before}
    for name, _ in SETTINGS:
        rows[f"after: {name} + labels table"] = AFFECTNET_5X * (photo[name] + labels)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=512, help="toy faces")
    parser.add_argument("--m", type=int, default=32, help="512 px faces")
    parser.add_argument("--grain", type=float, default=2.0, help="sensor-like noise std (0..255) on the 512 px faces")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import datasets

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        toy = toy_measure(Path(tmp), args.n)
        photo = photo_measure(Path(tmp), args.m, args.grain)
    result = {"toy_32px_bytes_per_face": toy, "photo_512px_bytes_per_face": photo,
              "affectnet_5x_bytes": estimate(toy, photo)}
    log.info("toy 32 px, bytes/face: synthesized %.0f, relabel before %.0f, after %.0f", toy["synthesized"],
             toy["relabel_before"], toy["relabel_after"])
    for name, value in photo.items():
        log.info("512 px faces stored as %-16s %9.0f bytes/face", name, value)
    for name, value in result["affectnet_5x_bytes"].items():
        log.info("5x AffectNet %-45s %8.1f GB", name, value / 1e9)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

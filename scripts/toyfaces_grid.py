"""Write the per-class sample grid of the embedded toy faces (one row per expression).

    python scripts/toyfaces_grid.py --out docs/toyfaces_grid.png [--per-class 8] [--image-size 48] [--seed 0]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.toyfaces import ToyFacesConfig, save_sample_grid  # noqa: E402


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="docs/toyfaces_grid.png")
    ap.add_argument("--per-class", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-classes", type=int, default=8, choices=(7, 8))
    ap.add_argument("--split", default="test", choices=("train", "val", "test"))
    args = ap.parse_args(argv)
    config = ToyFacesConfig(image_size=args.image_size, seed=args.seed, num_classes=args.num_classes)
    path = save_sample_grid(config, args.out, per_class=args.per_class, split=args.split)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KB)")
    return path


if __name__ == "__main__":
    main()

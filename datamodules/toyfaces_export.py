"""Write the toy faces in every public FER format, so they flow through the same readers as real datasets.

    python -m datamodules.toyfaces_export --out data/toy_export --n-train 1000 --n-val 300 --n-test 1000

then e.g. ``python train.py stage=teacher data=fer2013 data.root=data/toy_export/fer2013``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping, Sequence

from datamodules.formats.export import ALL_FORMATS, ExportResult, ExportSample, export_fer_dataset
from datamodules.toyfaces import ToyFacesConfig, make_split


def export_toyfaces(config: ToyFacesConfig, sizes: Mapping[str, int], out_dir: str | Path,
                    formats: Sequence[str] = ALL_FORMATS, overwrite: bool = False,
                    progress: bool = False) -> ExportResult:
    """Render ``sizes[split]`` faces per split and export them (ground-truth AUs go to the OpenFace csv)."""
    splits = {
        split: [ExportSample(name=face.sample_id, image=face.image, label=face.label, aus=face.aus,
                             caption=face.caption)
                for face in make_split(config, split, n, progress=progress)]
        for split, n in sizes.items() if n > 0
    }
    return export_fer_dataset(splits, out_dir, formats=formats, seed=config.seed, overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-val", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", nargs="+", default=list(ALL_FORMATS), choices=ALL_FORMATS)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    config = ToyFacesConfig(image_size=args.image_size, seed=args.seed)
    result = export_toyfaces(config, {"train": args.n_train, "val": args.n_val, "test": args.n_test}, args.out,
                             formats=args.formats, overwrite=args.overwrite, progress=True)
    for fmt, root in result.items():
        print(f"{fmt:14s} {root}  {result.counts.get(fmt, {})}")


if __name__ == "__main__":
    main()

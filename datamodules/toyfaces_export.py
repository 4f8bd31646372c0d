"""Write the toy faces in every public FER format, so they flow through the same readers as real datasets.

    python -m datamodules.toyfaces_export --out data/toy_export --n-train 1000 --n-val 300 --n-test 1000

then e.g. ``python train.py stage=teacher data=fer2013 data.root=data/toy_export/fer2013``.

``--sidecars none`` writes the image formats only (no OpenFace AU csv, no captions jsonl): the data as
researchers download it. ``--sidecars partial --au-fraction 0.3`` writes AUs for a seeded 30 % of the faces.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Mapping, Sequence

from datamodules.formats.export import (ALL_FORMATS, SIDECAR_MODES, SIDECARS, ExportResult, ExportSample,
                                        export_fer_dataset, with_sidecars)
from datamodules.toyfaces import ToyFacesConfig, make_split


def export_toyfaces(config: ToyFacesConfig, sizes: Mapping[str, int], out_dir: str | Path,
                    formats: Sequence[str] | None = None, overwrite: bool = False,
                    progress: bool = False, sidecars: str = "all", au_fraction: float = 0.5) -> ExportResult:
    """Render ``sizes[split]`` faces per split and export them (ground-truth AUs go to the OpenFace csv).

    ``formats=None``: every format, less the sidecars when ``sidecars="none"``; ``sidecars``/``au_fraction``
    as in ``with_sidecars``.
    """
    if formats is None:
        formats = [f for f in ALL_FORMATS if sidecars != "none" or f not in SIDECARS]
    splits = {
        split: [ExportSample(name=face.sample_id, image=face.image, label=face.label, aus=face.aus,
                             caption=face.caption)
                for face in make_split(config, split, n, progress=progress)]
        for split, n in sizes.items() if n > 0
    }
    splits, formats = with_sidecars(splits, formats, sidecars, au_fraction, config.seed)
    return export_fer_dataset(splits, out_dir, formats=formats, seed=config.seed, overwrite=overwrite)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--n-val", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--formats", nargs="+", default=None, choices=ALL_FORMATS,
                        help="default: every format (without openface/captions when --sidecars none)")
    parser.add_argument("--sidecars", default="all", choices=SIDECAR_MODES,
                        help="all: AU csv + captions for every face; none: no sidecars; partial: AUs for "
                             "--au-fraction of the faces, captions for all")
    parser.add_argument("--au-fraction", type=float, default=0.5)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.sidecars == "none" and args.formats and set(args.formats) & set(SIDECARS):
        parser.error(f"--sidecars none writes no {'/'.join(SIDECARS)}; drop them from --formats")
    if not 0.0 <= args.au_fraction <= 1.0:
        parser.error(f"--au-fraction must be in [0, 1], got {args.au_fraction}")
    config = ToyFacesConfig(image_size=args.image_size, seed=args.seed)
    result = export_toyfaces(config, {"train": args.n_train, "val": args.n_val, "test": args.n_test}, args.out,
                             formats=args.formats, overwrite=args.overwrite, progress=True,
                             sidecars=args.sidecars, au_fraction=args.au_fraction)
    for fmt, root in result.items():
        print(f"{fmt:14s} {root}  {result.counts.get(fmt, {})}")


if __name__ == "__main__":
    main()

"""Per-AU agreement between two OpenFace-format AU csvs over one dataset: Pearson r, mean absolute error, means.

    python scripts/au_agreement.py --format imagefolder --root data/toy_bare/imagefolder \
        --predicted outputs/annotate/annotate_aus/openface_aus.<hash>.csv \
        --truth data/toy_truth/openface/openface_aus.csv [--json agreement.json]

Both csvs are joined to the dataset's faces (every split) the way the datamodule joins them, so the same script
compares the suite's AU detector with OpenFace on a real dataset. Faces with AUs in both csvs count; an AU that is
constant in either csv over those faces has no r (reported as n/a).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.formats import READERS, attach_openface, read_split  # noqa: E402
from datamodules.labels import DISFA_AUS, AUVocabulary  # noqa: E402
from datamodules.real import CARVE_VAL_FORMATS  # noqa: E402


def joined_aus(records, source: Path, vocab: AUVocabulary) -> tuple[np.ndarray, np.ndarray]:
    """(values (N, A), known (N, A)) of ``source`` for each record (unknown where the csv has no row)."""
    records = copy.deepcopy(records)
    attach_openface(records, source, vocab)
    values = np.zeros((len(records), len(vocab)), np.float32)
    known = np.zeros((len(records), len(vocab)), bool)
    for i, rec in enumerate(records):
        if rec.aus is not None:
            values[i], known[i] = rec.aus, rec.au_mask
    return values, known


def agreement(pred: np.ndarray, pred_known: np.ndarray, truth: np.ndarray, truth_known: np.ndarray,
              vocab: AUVocabulary) -> dict:
    rows = {}
    for j, au in enumerate(vocab.aus):
        both = pred_known[:, j] & truth_known[:, j]
        p, t = pred[both, j], truth[both, j]
        r = float(np.corrcoef(p, t)[0, 1]) if len(p) > 1 and p.std() > 0 and t.std() > 0 else None
        rows[f"AU{au:02d}"] = {"n": int(both.sum()), "pearson_r": r,
                               "mae": float(np.abs(p - t).mean()) if len(p) else None,
                               "mean_predicted": float(p.mean()) if len(p) else None,
                               "mean_truth": float(t.mean()) if len(t) else None}
    rs = [v["pearson_r"] for v in rows.values() if v["pearson_r"] is not None]
    return {"per_au": rows, "mean_pearson_r": float(np.mean(rs)) if rs else None,
            "mean_mae": float(np.mean([v["mae"] for v in rows.values() if v["mae"] is not None]))
            if any(v["mae"] is not None for v in rows.values()) else None}


def markdown(result: dict) -> str:
    fmt = lambda v, d=2: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = ["| AU | n | Pearson r | MAE | mean (predicted) | mean (truth) |", "|---|---:|---:|---:|---:|---:|"]
    for au, v in result["per_au"].items():
        lines.append(f"| {au} | {v['n']} | {fmt(v['pearson_r'])} | {fmt(v['mae'])} | {fmt(v['mean_predicted'])} | "
                     f"{fmt(v['mean_truth'])} |")
    lines.append(f"| mean | | {fmt(result['mean_pearson_r'])} | {fmt(result['mean_mae'])} | | |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", required=True, choices=sorted(READERS))
    parser.add_argument("--root", required=True, type=Path)
    parser.add_argument("--predicted", required=True, type=Path, help="OpenFace-format csv to judge")
    parser.add_argument("--truth", required=True, type=Path, help="reference OpenFace-format csv")
    parser.add_argument("--aus", type=int, nargs="+", default=list(DISFA_AUS))
    parser.add_argument("--splits", nargs="+", default=["train", "val", "test"])
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args(argv)
    vocab = AUVocabulary(tuple(args.aus))
    # formats whose val split is carved from train (RAF-DB) or is the test split (AffectNet) are read once
    splits = [s for s in args.splits if not (s == "val" and args.format in CARVE_VAL_FORMATS)]
    records = [r for split in splits for r in read_split(args.format, args.root, split).records]
    pred, pred_known = joined_aus(records, args.predicted, vocab)
    truth, truth_known = joined_aus(records, args.truth, vocab)
    result = {"faces": len(records), **agreement(pred, pred_known, truth, truth_known, vocab)}
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()

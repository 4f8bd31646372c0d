"""AU annotation with the suite's own detector (a FER classifier's AU head): predict AU intensities for records,
write them as an OpenFace-format csv that ``datamodules.formats.openface`` reads back, and summarise them in a card.

The csv has OpenFace's columns and layout (``", "``-separated, ``file, face_id, confidence, success, AUxx_r``):
one row per face, ``success`` 0 (and no values) for a face whose image could not be read. ``file`` is the most
specific name a sidecar join uses for the record (its path's last parts, or the dataset's own name for in-memory
images), so the csv joins back to exactly the faces it was made from; ``write_sidecar`` checks that it does.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from datamodules.batch import FERDataLoader, FERRecord, RecordDataset, collate_fer
from datamodules.errors import DataError
from datamodules.formats.common import SidecarIndex, record_join_keys
from datamodules.formats.openface import load_openface
from datamodules.labels import AUVocabulary
from datamodules.transforms import eval_transform

DECIMALS = 3  # OpenFace writes intensities with 2 decimals; 3 keep the detector's resolution


def predict_aus(model: torch.nn.Module, records: Sequence[FERRecord], image_size: int, num_aus: int,
                num_classes: int, batch_size: int = 256, num_workers: int = 0, device: str = "cpu",
                progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """-> (aus (N, A) float32, ok (N,) bool): the AU head's intensities per record; ``ok`` False (and NaN values)
    where the image could not be read (``RecordDataset`` counts and warns once)."""
    from tqdm.auto import tqdm

    dataset = RecordDataset(records, eval_transform(image_size), num_aus=num_aus, num_classes=num_classes,
                            name="annotate_aus")
    loader = FERDataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                           collate_fn=collate_fer)
    row = {rec.sample_id: i for i, rec in enumerate(records)}
    if len(row) != len(records):
        raise RuntimeError("annotate_aus: records with the same sample_id")
    out = np.full((len(records), num_aus), np.nan, dtype=np.float32)
    ok = np.zeros(len(records), dtype=bool)
    model = model.to(device).eval()
    with torch.no_grad():
        for batch in tqdm(loader, desc="annotate AUs", unit="batch", disable=not progress):
            if batch["image"].shape[0] == 0:
                continue
            aus = model(batch["image"].to(device))["aus"].float().cpu().numpy()
            index = [row[s] for s in batch["sample_id"]]
            out[index], ok[index] = aus, True
    return out, ok


def sidecar_name(rec: FERRecord, root: Optional[str] = None) -> str:
    """The record's image path relative to the dataset root where a sidecar join uses it (so the csv survives a
    moved dataset folder), else its most specific join name."""
    keys = record_join_keys(rec)
    if root and isinstance(rec.image, str):
        try:
            rel = Path(rec.image).resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:  # an image outside the root (a csv naming absolute paths)
            rel = None
        if rel in keys:
            return rel
    return keys[0]


def sidecar_names(records: Sequence[FERRecord], root: Optional[str] = None) -> list[str]:
    """The ``file`` value of each record, unique over ``records``."""
    names = [sidecar_name(rec, root) for rec in records]
    seen: dict[str, str] = {}
    for rec, name in zip(records, names):
        if name in seen:
            raise DataError(f"annotate_aus: faces {seen[name]!r} and {rec.sample_id!r} have the same file name "
                            f"{name!r}; an AU csv could not tell them apart")
        seen[name] = rec.sample_id
    return names


def write_sidecar(path: Path, records: Sequence[FERRecord], aus: np.ndarray, ok: np.ndarray,
                  vocab: AUVocabulary, root: Optional[str] = None) -> None:
    """Write the csv (tmp + rename), then read it back through the OpenFace reader: every annotated face must join
    to its own row with its own values."""
    names = sidecar_names(records, root)
    order = sorted(range(len(vocab)), key=lambda i: vocab.aus[i])  # OpenFace orders AU columns by number
    header = ["file", "face_id", "confidence", "success", *(f"AU{vocab.aus[i]:02d}_r" for i in order)]
    lines = [", ".join(header)]
    for name, values, good in zip(names, aus, ok):
        if "," in name or name != name.strip():
            raise DataError(f"annotate_aus: file name {name!r} cannot be written to a csv row")
        cells = [f"{values[i]:.{DECIMALS}f}" for i in order] if good else ["nan"] * len(order)
        lines.append(", ".join([name, "0", "1.00" if good else "0.00", "1" if good else "0", *cells]))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    check_round_trip(tmp, records, aus, ok, vocab)
    tmp.replace(path)


def check_round_trip(path: Path, records: Sequence[FERRecord], aus: np.ndarray, ok: np.ndarray,
                     vocab: AUVocabulary) -> None:
    rows, _ = load_openface(path, vocab)
    index = SidecarIndex(rows)
    for rec, values, good in zip(records, aus, ok):
        row = index.lookup(rec)
        if good != (row is not None):
            raise RuntimeError(f"annotate_aus: {rec.sample_id} {'lost' if good else 'gained'} its row in {path}")
        if good and not np.allclose(row.values, np.round(values, DECIMALS), atol=10 ** -DECIMALS):
            raise RuntimeError(f"annotate_aus: {rec.sample_id} reads back other AUs from {path}")


def au_card(records: Sequence[FERRecord], aus: np.ndarray, ok: np.ndarray, vocab: AUVocabulary,
            class_names: Sequence[str], splits: Sequence[str]) -> dict:
    """Coverage (per split), per-AU mean/std over the annotated faces, per-class AU means (labelled faces)."""
    names = [f"AU{a:02d}" for a in vocab.aus]
    done = aus[ok]
    labels = np.array([rec.label for rec in records])
    split_of = np.asarray(splits)
    card: dict = {
        "faces": len(records), "annotated": int(ok.sum()),
        "coverage": float(ok.mean()) if len(records) else 0.0,
        "splits": {s: {"faces": int((split_of == s).sum()), "annotated": int(ok[split_of == s].sum())}
                   for s in dict.fromkeys(splits)},
        "aus": list(vocab.aus),
        "au_mean": dict(zip(names, np.round(done.mean(0), 4).tolist())) if len(done) else {},
        "au_std": dict(zip(names, np.round(done.std(0), 4).tolist())) if len(done) else {},
        "class_counts": {}, "class_au_mean": {},
    }
    for c, cname in enumerate(class_names):
        pick = ok & (labels == c)
        card["class_counts"][cname] = int(pick.sum())
        if pick.any():
            card["class_au_mean"][cname] = dict(zip(names, np.round(aus[pick].mean(0), 3).tolist()))
    return card


def card_markdown(card: dict) -> str:
    names = [f"AU{a:02d}" for a in card["aus"]]
    lines = ["# AU annotation card", "",
             f"Detector: {card.get('detector', {}).get('checkpoint', '?')}"
             + (f" (AU MAE {card['detector']['test_au_mae']:.3f} on its own test faces)"
                if card.get("detector", {}).get("test_au_mae") is not None else "")
             + f"; sidecar: {card.get('sidecar', '?')}", "",
             f"Coverage: {card['annotated']} of {card['faces']} faces annotated ({100 * card['coverage']:.1f} %)"
             + ("; the others' images could not be read (success 0 in the csv)." if card['annotated'] < card['faces']
                else "."), "",
             "| split | faces | annotated |", "|---|---:|---:|"]
    lines += [f"| {s} | {v['faces']} | {v['annotated']} |" for s, v in card["splits"].items()]
    lines += ["", "| AU | mean | std |", "|---|---:|---:|"]
    lines += [f"| {n} | {card['au_mean'].get(n, float('nan')):.3f} | {card['au_std'].get(n, float('nan')):.3f} |"
              for n in names]
    lines += ["", "Per-class AU means (labelled faces):", "", "| class | n | " + " | ".join(names) + " |",
              "|---|---:|" + "---:|" * len(names)]
    for cname, means in card["class_au_mean"].items():
        lines.append(f"| {cname} | {card['class_counts'][cname]} | "
                     + " | ".join(f"{means[n]:.2f}" for n in names) + " |")
    return "\n".join(lines) + "\n"

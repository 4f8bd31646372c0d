"""Damage helpers for the bad-input tests: a tiny toy export in every format, and edits that break it."""
from __future__ import annotations

import csv
import shutil
import warnings
from pathlib import Path

SIZES = {"train": 12, "val": 4, "test": 8}
AFF, RAF = "training.csv", "EmoLabel/list_patition_label.txt"
FER, FERPLUS = "fer2013.csv", "fer2013new.csv"


def toy_export(directory: Path):
    """The toy faces (SIZES, 32 px) written in every public format under ``directory``."""
    from datamodules.toyfaces import ToyFacesConfig
    from datamodules.toyfaces_export import export_toyfaces

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return export_toyfaces(ToyFacesConfig(image_size=32, seed=5), SIZES, directory)


def copy(export, fmt: str, tmp_path: Path) -> Path:
    """A private copy of one exported format folder (or sidecar file) to damage."""
    src = Path(export[fmt])
    if src.is_file():  # a sidecar
        return Path(shutil.copy(src, tmp_path / src.name))
    return Path(shutil.copytree(src, tmp_path / fmt))


def rows_of(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


def write_rows(path: Path, rows) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def set_cell(path: Path, line: int, column: str, value: str) -> None:
    rows = rows_of(path)
    rows[line - 1][[h.strip() for h in rows[0]].index(column)] = value
    write_rows(path, rows)


def drop_column(path: Path, column: str) -> None:
    rows = rows_of(path)
    k = [h.strip() for h in rows[0]].index(column)
    write_rows(path, [r[:k] + r[k + 1:] for r in rows])


def edit_lines(path: Path, fn) -> None:
    path.write_text("\n".join(fn(path.read_text().splitlines())) + "\n")


def set_line(line: int, text: str):
    return lambda lines: lines[: line - 1] + [text] + lines[line:]


def cut_field(path: Path, line: int) -> None:
    edit_lines(path, lambda ls: ls[: line - 1] + [ls[line - 1].rsplit(",", 1)[0]] + ls[line:])


def npy_annotations(root: Path) -> list[Path]:
    return sorted((root / "train_set" / "annotations").glob("*_exp.npy"))


def read_warned(fmt, root, split, **options):
    """``read_split`` that must issue exactly one warning: (result, its message)."""
    from datamodules.formats import read_split

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = read_split(fmt, root, split, **options)
    return result, one_warning(caught)


def one_warning(caught) -> str:
    """The message of the one UserWarning among ``caught`` (fails if there are more or none)."""
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1, msgs
    return msgs[0]


def set_box(root: Path, line: int, edit) -> None:
    """Rewrite the AffectNet face box on ``line`` of training.csv as ``edit(x, y, w, h)``."""
    rows = rows_of(root / AFF)
    box = [int(v) for v in rows[line - 1][1:5]]
    rows[line - 1][1:5] = [str(v) for v in edit(*box)]
    write_rows(root / AFF, rows)


def corrupt_test_images(export, tmp_path, n: int) -> Path:
    """An imagefolder copy whose first ``n`` test images are not images any more."""
    root = copy(export, "imagefolder", tmp_path)
    for path in sorted((root / "test").rglob("*.png"))[:n]:
        path.write_bytes(b"not a png")
    return root

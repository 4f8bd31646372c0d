"""Every reader x every bad input it can meet: a one-line DataError naming the file (and line), or a counted skip
with one warning. The datasets are real format folders written by the toy exporter, then damaged."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from bad_data_helpers import (AFF, FER, FERPLUS, RAF, copy, cut_field, drop_column, edit_lines, npy_annotations,
                              one_warning, read_warned, rows_of, set_cell, set_line, toy_export, write_rows)
from datamodules.errors import DataError, DataFileNotFound
from datamodules.formats import load_captions, load_openface, read_split
from datamodules.labels import AUVocabulary
from datamodules.real import RealFERDataModule

VOCAB = AUVocabulary()


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return toy_export(tmp_path_factory.mktemp("export"))


# (case id, format, split, damage(root), file name the message must name, line or None, reader options)
READER_CASES = [
    ("affectnet-no-csv", "affectnet", "train", lambda r: (r / AFF).unlink(), AFF, None, {}),
    ("affectnet-empty", "affectnet", "train", lambda r: (r / AFF).write_text(""), AFF, 1, {}),
    ("affectnet-no-header", "affectnet", "train", lambda r: edit_lines(r / AFF, lambda ls: ls[1:]), AFF, 1, {}),
    ("affectnet-missing-column", "affectnet", "train", lambda r: drop_column(r / AFF, "expression"), AFF, 1, {}),
    ("affectnet-unknown-id", "affectnet", "train", lambda r: set_cell(r / AFF, 3, "expression", "12"), AFF, 3, {}),
    ("affectnet-text-id", "affectnet", "train", lambda r: set_cell(r / AFF, 3, "expression", "happy"), AFF, 3, {}),
    ("affectnet-text-box", "affectnet", "train", lambda r: set_cell(r / AFF, 3, "face_x", "left"), AFF, 3, {}),
    ("affectnet-nan-valence", "affectnet", "train", lambda r: set_cell(r / AFF, 3, "valence", "nan"), AFF, 3, {}),
    ("affectnet-empty-path", "affectnet", "train", lambda r: set_cell(r / AFF, 3, "subDirectory_filePath", " "),
     AFF, 3, {}),
    ("affectnet-short-row", "affectnet", "train", lambda r: cut_field(r / AFF, 3), AFF, 3, {}),
    ("affectnet-bad-landmarks", "affectnet", "train",
     lambda r: set_cell(r / AFF, 3, "facial_landmarks", "1;2;x" * 40), AFF, 3, {"landmarks": True}),
    ("affectnet-binary-csv", "affectnet", "train", lambda r: (r / AFF).write_bytes(b"\xff\xfe\x00\x81" * 50), AFF,
     1, {}),
    ("npy-no-set", "affectnet_npy", "train", lambda r: shutil.rmtree(r / "train_set"), "train_set", None, {}),
    ("npy-no-annotations", "affectnet_npy", "train", lambda r: [p.unlink() for p in npy_annotations(r)],
     "annotations", None, {}),
    ("npy-garbage", "affectnet_npy", "train", lambda r: npy_annotations(r)[1].write_bytes(b"junk"),
     "toy_train_000001_exp.npy", None, {}),
    ("npy-unknown-id", "affectnet_npy", "train", lambda r: np.save(npy_annotations(r)[1], np.array("11")),
     "toy_train_000001_exp.npy", None, {}),
    ("npy-not-scalar", "affectnet_npy", "train", lambda r: np.save(npy_annotations(r)[1], np.arange(3)),
     "toy_train_000001_exp.npy", None, {}),
    ("npy-missing-valence", "affectnet_npy", "train",
     lambda r: (r / "train_set/annotations/toy_train_000001_val.npy").unlink(), "toy_train_000001_val.npy", None,
     {"with_va": True}),
    ("rafdb-no-list", "rafdb", "train", lambda r: (r / RAF).unlink(), "list_patition_label.txt", None, {}),
    ("rafdb-three-fields", "rafdb", "train", lambda r: edit_lines(r / RAF, set_line(2, "train_00002.jpg 3 x")),
     "list_patition_label.txt", 2, {}),
    ("rafdb-unknown-label", "rafdb", "train", lambda r: edit_lines(r / RAF, set_line(2, "train_00002.jpg 8")),
     "list_patition_label.txt", 2, {}),
    ("rafdb-text-label", "rafdb", "train", lambda r: edit_lines(r / RAF, set_line(2, "train_00002.jpg sad")),
     "list_patition_label.txt", 2, {}),
    ("rafdb-bad-prefix", "rafdb", "train", lambda r: edit_lines(r / RAF, set_line(2, "dev_00002.jpg 3")),
     "list_patition_label.txt", 2, {}),
    ("fer2013-no-csv", "fer2013", "train", lambda r: (r / FER).unlink(), FER, None, {}),
    ("fer2013-empty", "fer2013", "train", lambda r: (r / FER).write_text(""), FER, 1, {}),
    ("fer2013-no-header", "fer2013", "train", lambda r: edit_lines(r / FER, lambda ls: ls[1:]), FER, 1, {}),
    ("fer2013-pixel-count", "fer2013", "train",
     lambda r: set_cell(r / FER, 3, "pixels", " ".join(rows_of(r / FER)[2][1].split()[:-1])), FER, 3, {}),
    ("fer2013-pixel-text", "fer2013", "train",
     lambda r: set_cell(r / FER, 3, "pixels", rows_of(r / FER)[2][1].replace(" ", " x", 1)), FER, 3, {}),
    ("fer2013-pixel-range", "fer2013", "train",
     lambda r: set_cell(r / FER, 3, "pixels", "300 " + rows_of(r / FER)[2][1].split(" ", 1)[1]), FER, 3, {}),
    ("fer2013-unknown-emotion", "fer2013", "train", lambda r: set_cell(r / FER, 3, "emotion", "7"), FER, 3, {}),
    ("fer2013-unknown-usage", "fer2013", "train", lambda r: set_cell(r / FER, 3, "Usage", "Dev" * 40), FER, 3, {}),
    ("ferplus-no-csv", "ferplus", "train", lambda r: (r / FERPLUS).unlink(), FERPLUS, None, {}),
    ("ferplus-no-images", "ferplus", "train",
     lambda r: (shutil.rmtree(r / "FER2013Train"), (r / FER).unlink()), "FER2013Train", None, {}),
    ("ferplus-missing-column", "ferplus", "train", lambda r: drop_column(r / FERPLUS, "NF"), FERPLUS, 1, {}),
    ("ferplus-negative-vote", "ferplus", "train", lambda r: set_cell(r / FERPLUS, 3, "anger", "-1"), FERPLUS, 3,
     {}),
    ("ferplus-text-vote", "ferplus", "train", lambda r: set_cell(r / FERPLUS, 3, "anger", "many"), FERPLUS, 3, {}),
    ("ferplus-bad-label-mode", "ferplus", "train", lambda r: None, "label_mode", None, {"label_mode": "vote"}),
    ("ferplus-misaligned-pixels", "ferplus", "train",
     lambda r: (shutil.rmtree(r / "FER2013Train"), set_cell(r / FER, 3, "Usage", "PrivateTest")), FERPLUS, 3, {}),
    ("imagefolder-no-split", "imagefolder", "train", lambda r: shutil.rmtree(r / "train"), "train", None, {}),
    ("imagefolder-unknown-class", "imagefolder", "train", lambda r: (r / "train" / "bored").mkdir(), "bored", None,
     {}),
    ("imagefolder-two-val-folders", "imagefolder", "val", lambda r: shutil.copytree(r / "val", r / "validation"),
     "validation", None, {}),
]


def assert_one_line(err: BaseException, file: str, line: int | None) -> None:
    text = str(err)
    assert "\n" not in text and len(text) < 300, text
    assert file in text, text
    if line is not None:
        assert f"{Path(file).name}:{line}:" in text, text


@pytest.mark.parametrize("case,fmt,split,damage,file,line,options", READER_CASES, ids=[c[0] for c in READER_CASES])
def test_reader_errors_are_one_line_data_errors(export, tmp_path, case, fmt, split, damage, file, line, options):
    root = copy(export, fmt, tmp_path)
    damage(root)
    with pytest.raises(DataError) as info:
        read_split(fmt, root, split, **options)
    assert_one_line(info.value, file, line)
    if case.endswith(("no-csv", "no-set", "no-annotations", "no-list", "no-images", "no-split")):
        assert isinstance(info.value, (DataFileNotFound, FileNotFoundError))


def test_fer2013_without_header_names_the_problem_not_the_pixels(export, tmp_path):
    root = copy(export, "fer2013", tmp_path)
    edit_lines(root / FER, lambda ls: ls[1:])
    with pytest.raises(DataError, match=r"fer2013\.csv:1: no header line \(expected columns emotion, pixels, "
                                        r"Usage\)") as info:
        read_split("fer2013", root, "train")
    assert "…" in str(info.value)  # the pixel string, shortened


SIDECAR_CASES = [
    ("captions-malformed", "captions", lambda p: edit_lines(p, set_line(2, "{not json")), 2),
    ("captions-not-object", "captions", lambda p: edit_lines(p, set_line(2, "[1, 2]")), 2),
    ("captions-missing-key", "captions", lambda p: edit_lines(p, set_line(2, '{"caption": "x"}')), 2),
    ("captions-not-string", "captions", lambda p: edit_lines(p, set_line(2, '{"file": 3, "caption": "x"}')), 2),
    ("openface-empty", "openface", lambda p: p.write_text(""), 1),
    ("openface-no-file-column", "openface", lambda p: drop_column(p, "file"), 1),
    ("openface-no-au-columns", "openface",
     lambda p: write_rows(p, [r[:6] for r in rows_of(p)]), 1),
    ("openface-short-row", "openface", lambda p: cut_field(p, 3), 3),
    ("openface-text-au", "openface", lambda p: set_cell(p, 3, "AU01_r", "high"), 3),
    ("openface-empty-name", "openface", lambda p: set_cell(p, 3, "file", " "), 3),
    ("openface-binary", "openface", lambda p: p.write_bytes(b"\x00\xff" * 100), 1),
]


@pytest.mark.parametrize("case,kind,damage,line", SIDECAR_CASES, ids=[c[0] for c in SIDECAR_CASES])
def test_sidecar_errors_are_one_line_data_errors(export, tmp_path, case, kind, damage, line):
    path = copy(export, kind, tmp_path)
    damage(path)
    with pytest.raises(DataError) as info:
        load_captions(path) if kind == "captions" else load_openface(path, VOCAB)
    assert_one_line(info.value, path.name, line)


@pytest.mark.parametrize("kind", ["captions", "openface"])
def test_missing_sidecar_is_data_file_not_found(tmp_path, kind):
    (tmp_path / "empty_dir").mkdir()
    for missing in (tmp_path / "nowhere.x", tmp_path / "empty_dir"):
        if kind == "captions" and missing.is_dir():
            continue
        with pytest.raises(DataFileNotFound) as info:
            load_captions(missing) if kind == "captions" else load_openface(missing, VOCAB)
        assert_one_line(info.value, missing.name, None)


@pytest.mark.parametrize("message,expected", [
    ("f.csv:3: bad value '" + "1 " * 4000 + "'", "f.csv:3: bad value '" + "1 " * 29 + "1…'"),
    ('f.csv:3: bad value "' + "x" * 100 + '" here', 'f.csv:3: bad value "' + "x" * 59 + '…" here'),
    ("f.csv:3: two\nlines\r\n  and  spaces", "f.csv:3: two lines and spaces"),
    ("f.csv:3: short 'ok'", "f.csv:3: short 'ok'"),
])
def test_one_line_shortens_values_and_joins_lines(message, expected):
    from datamodules.formats.common import one_line

    assert one_line(message) == expected


def test_one_line_cuts_the_middle_of_a_long_message_keeping_file_and_line():
    from datamodules.formats.common import one_line

    text = one_line("/data/set/labels.csv:12: " + " ".join(f"word{i}" for i in range(200)))
    assert len(text) <= 280 and text.startswith("/data/set/labels.csv:12: word0") and " … " in text
    assert text.endswith("word199")


# ------------------------------------------------------------------ counted skips at read time
@pytest.mark.parametrize("fmt", ["affectnet", "affectnet_npy", "rafdb", "ferplus"])
def test_missing_image_is_a_counted_skip_with_one_warning(export, tmp_path, fmt):
    root = copy(export, fmt, tmp_path)
    full = read_split(fmt, root, "train").records
    for rec in full[:2]:
        Path(rec.image).unlink()
    result, msg = read_warned(fmt, root, "train")
    assert result.skipped == {"missing_image": 2} and len(result.records) == len(full) - 2
    assert "skipped 2 record(s) whose image file is missing" in msg and Path(full[0].image).name in msg


def duplicate_affectnet(root: Path) -> tuple[int, int]:
    lines = (root / AFF).read_text().splitlines()
    (root / AFF).write_text("\n".join(lines + [lines[2]]) + "\n")
    return 3, len(lines) + 1


def duplicate_rafdb(root: Path) -> tuple[int, int]:
    lines = (root / RAF).read_text().splitlines()
    stem = lines[1].split()[0].removesuffix(".jpg")
    (root / RAF).write_text("\n".join(lines + [f"{stem}.png 1"]) + "\n")  # another name, the same aligned image
    return 2, len(lines) + 1


def duplicate_ferplus(root: Path) -> tuple[int, int]:
    lines = (root / FERPLUS).read_text().splitlines()
    (root / FERPLUS).write_text("\n".join(lines + [lines[2]]) + "\n")
    return 3, len(lines) + 1


DUPLICATES = {"affectnet": duplicate_affectnet, "rafdb": duplicate_rafdb, "ferplus": duplicate_ferplus}


@pytest.mark.parametrize("fmt", sorted(DUPLICATES))
def test_a_file_listed_twice_is_kept_once_and_counted(export, tmp_path, fmt):
    root = copy(export, fmt, tmp_path)
    before = read_split(fmt, root, "train").records
    first, second = DUPLICATES[fmt](root)
    result, msg = read_warned(fmt, root, "train")
    assert result.skipped == {"duplicate": 1}
    assert [r.sample_id for r in result.records] == [r.sample_id for r in before]  # the first listing is kept
    assert [r.label for r in result.records] == [r.label for r in before]
    assert "listed twice" in msg and f"lines {first} and {second}" in msg


def test_duplicate_never_lands_in_both_train_and_carved_val(export, tmp_path):
    root = copy(export, "rafdb", tmp_path)
    lines = (root / RAF).read_text().splitlines()
    train_lines = [ln for ln in lines if ln.startswith("train_")]
    (root / RAF).write_text("\n".join(lines + train_lines) + "\n")  # every train image listed twice
    dm = RealFERDataModule(format="rafdb", root=str(root), protocol=7, image_size=32, augment={}, val_fraction=0.5)
    with pytest.warns(UserWarning, match="listed twice"):
        dm.setup()
    train, val = dm.records["train"], dm.records["val"]
    assert len(train) + len(val) == len(train_lines)
    assert not {r.image for r in train} & {r.image for r in val}
    assert dm.summary()["skipped"]["train/duplicate"] == len(train_lines)


def test_a_train_file_also_listed_for_test_is_dropped_from_train(export, tmp_path):
    root = copy(export, "affectnet", tmp_path)
    train_lines = (root / AFF).read_text().splitlines()
    val_lines = (root / "validation.csv").read_text().splitlines()
    (root / "validation.csv").write_text("\n".join(val_lines + train_lines[1:3]) + "\n")
    dm = RealFERDataModule(format="affectnet", root=str(root), image_size=32, augment={})
    with pytest.warns(UserWarning, match="dropped 2 train record"):
        dm.setup()
    test_files = {r.image for r in dm.records["test"]}
    assert len(test_files) == len(val_lines) - 1 + 2
    assert not test_files & {r.image for split in ("train", "val") for r in dm.records[split]}
    assert dm.summary()["skipped"] == {"train/in_test_split": 2}
    assert len(dm.records["train"]) + len(dm.records["val"]) == len(train_lines) - 1 - 2


def test_captions_duplicate_keeps_the_first_and_names_its_lines(export, tmp_path):
    path = copy(export, "captions", tmp_path)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines + [lines[1].replace('"caption": "', '"caption": "other ')]) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        captions = load_captions(path)
    msg = one_warning(caught)
    assert f"lines 2 and {len(lines) + 1}" in msg
    assert not any(c.startswith("other ") for c in captions.values())


# ------------------------------------------------------------------ datamodule-level user errors
def test_datamodule_config_and_data_errors(export, tmp_path):
    with pytest.raises(DataFileNotFound, match="data.root"):
        RealFERDataModule(format="rafdb", root=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="data.format_options.label_mode"):
        RealFERDataModule(format="ferplus", root=str(export["ferplus"]), format_options={"label_mode": "vote"})
    with pytest.raises(ValueError, match=r"data.format_options: .*colour"):
        RealFERDataModule(format="fer2013", root=str(export["fer2013"]), format_options={"colour": True})
    with pytest.raises(ValueError, match="data.val_split=split: RAF-DB has no val split"):
        RealFERDataModule(format="rafdb", root=str(export["rafdb"]), val_split="split")
    root = copy(export, "rafdb", tmp_path)
    edit_lines(root / RAF, lambda ls: [ln for ln in ls if not ln.startswith("test_")])
    dm = RealFERDataModule(format="rafdb", root=str(root), protocol=7, image_size=32)
    with pytest.raises(DataError, match="the test split .* has no usable samples") as info:
        dm.setup()
    assert "\n" not in str(info.value)

"""Readers for the public FER formats + the exporter: round trips and the bad-input rules."""
from __future__ import annotations

import csv
import io
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.batch import RecordDataset, collate_fer, load_record_image
from datamodules.formats import (READERS, attach_captions, attach_openface, read_split, verify_images)
from datamodules.formats.export import ALL_FORMATS, ExportSample, export_fer_dataset
from datamodules.labels import CONTEMPT, FERPLUS_TO_CANONICAL, FERPLUS_VOTE_COLUMNS, AUVocabulary

SIZES = {"train": 24, "val": 8, "test": 8}
VOCAB = AUVocabulary()


def _smooth_image(rng, h: int, w: int) -> np.ndarray:
    """Low-frequency colour image (survives JPEG q95 closely), a little noise on top."""
    small = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR), dtype=np.int16)
    return np.clip(img + rng.integers(-3, 4, size=img.shape), 0, 255).astype(np.uint8)


def make_samples(seed: int = 0) -> dict[str, list[ExportSample]]:
    rng = np.random.default_rng(seed)
    splits, k = {}, 0
    for split, n in SIZES.items():
        samples = []
        for i in range(n):
            k += 1
            aus = None if k % 5 == 0 else np.round(rng.uniform(0, 5, size=len(VOCAB)), 4).astype(np.float32)
            name = f"toy_{split}_{i:06d}"
            samples.append(ExportSample(name=name, image=_smooth_image(rng, 30 + 2 * (k % 5), 28 + 4 * (k % 3)),
                                        label=(i + k) % 8, aus=aus, caption=f"caption for {name}"))
        splits[split] = samples
    return splits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    samples = make_samples()
    out = tmp_path_factory.mktemp("export")
    roots = export_fer_dataset(samples, out, seed=0)
    by_name = {s.name: s for ss in samples.values() for s in ss}
    return samples, by_name, roots


def expected_names(samples, fmt: str, split: str) -> list[str]:
    train_like = samples["train"] + samples["val"]
    if fmt in ("affectnet", "affectnet_npy"):
        chosen = train_like if split == "train" else samples["test"]
    elif fmt == "rafdb":
        chosen = [s for s in (train_like if split == "train" else samples["test"]) if s.label != CONTEMPT]
    elif fmt == "fer2013":
        chosen = [s for s in samples[split] if s.label != CONTEMPT]
    else:
        chosen = samples[split]
    return sorted(s.name for s in chosen)


def names_via_captions(records, roots) -> list[str]:
    """Every exported record carries its sample name in its caption: joins + identity check in one."""
    assert attach_captions(records, roots["captions"]) == len(records)
    return [r.caption.removeprefix("caption for ") for r in records]


def user_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


CASES = [(f, s) for f in READERS for s in ("train", "val", "test") if not (f == "rafdb" and s == "val")]


# ------------------------------------------------------------------ round trips
def test_export_writes_every_layout(exported):
    samples, _, roots = exported
    assert set(roots) == set(ALL_FORMATS)
    header = (roots["affectnet"] / "training.csv").read_text().splitlines()[0]
    assert header == ("subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,"
                      "expression,valence,arousal")
    assert (roots["rafdb"] / "EmoLabel" / "list_patition_label.txt").is_file()
    assert (roots["ferplus"] / "FER2013Valid").is_dir() and (roots["ferplus"] / "fer2013.csv").is_file()
    of_header = roots["openface"].read_text().splitlines()[0]
    assert of_header.startswith("file, frame, face_id, timestamp, confidence, success, AU01_r, AU02_r")
    n_contempt = sum(s.label == CONTEMPT for ss in samples.values() for s in ss)
    assert n_contempt > 0
    assert roots.skipped["rafdb"]["contempt_not_in_7_class_dataset"] == n_contempt
    assert roots.skipped["fer2013"]["contempt_not_in_7_class_dataset"] == n_contempt
    assert not roots.skipped["ferplus"]
    for fmt in READERS:  # the exporter's own bookkeeping agrees with the independent expectation
        for split, n in roots.counts[fmt].items():
            assert n == len(expected_names(samples, fmt, split)), (fmt, split)


@pytest.mark.parametrize("fmt,split", CASES)
def test_every_format_reads_back_exact_labels(exported, fmt, split):
    samples, by_name, roots = exported
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean export reads without any warning
        result = read_split(fmt, roots[fmt], split)
    assert not result.skipped
    names = names_via_captions(result.records, roots)
    assert sorted(names) == expected_names(samples, fmt, split)
    assert [r.label for r in result.records] == [by_name[n].label for n in names]
    ids = [r.sample_id for r in result.records]
    assert len(set(ids)) == len(ids) and all(i.startswith(f"{fmt}/") for i in ids)


def test_affectnet_crop_gives_back_the_original_face(exported):
    _, by_name, roots = exported
    records = read_split("affectnet", roots["affectnet"], "train", landmarks=True).records
    names = names_via_captions(records, roots)
    for rec, name in zip(records, names):
        original = by_name[name].image
        with Image.open(rec.image) as full:
            assert full.size[0] > original.shape[1] and full.size[1] > original.shape[0]  # really padded
        face = np.asarray(load_record_image(rec))
        assert face.shape == original.shape
        assert np.abs(face.astype(int) - original).mean() < 6  # JPEG q95
        x, y, w, h = rec.crop
        lnd = rec.meta["landmarks"]
        assert lnd.shape == (68, 2)
        assert (lnd[:, 0] > x - 0.1 * w).all() and (lnd[:, 0] < x + 1.1 * w).all()
        assert -1 <= rec.meta["valence"] <= 1 and -1 <= rec.meta["arousal"] <= 1


def test_imagefolder_is_lossless_and_fer2013_matches_ferplus_pngs(exported):
    _, by_name, roots = exported
    records = read_split("imagefolder", roots["imagefolder"], "val").records
    for rec, name in zip(records, names_via_captions(records, roots)):
        assert np.array_equal(np.asarray(load_record_image(rec)), by_name[name].image)
    fer = read_split("fer2013", roots["fer2013"], "test").records
    plus = {r.meta["name"]: r for r in read_split("ferplus", roots["ferplus"], "test").records}
    for rec in fer:
        assert rec.image.shape == (48, 48) and rec.image.dtype == np.uint8
        with Image.open(plus[rec.meta["name"]].image) as png:  # same row -> same fer%07d name -> same pixels
            assert np.array_equal(np.asarray(png), rec.image)


def test_ferplus_majority_distribution_and_csv_fallback(exported, tmp_path):
    _, by_name, roots = exported
    majority = read_split("ferplus", roots["ferplus"], "train").records
    dist = read_split("ferplus", roots["ferplus"], "train", label_mode="distribution").records
    assert [r.label for r in majority] == [r.label for r in dist]
    assert all(r.soft_label is None for r in majority)
    canon = [FERPLUS_TO_CANONICAL[c] for c in FERPLUS_VOTE_COLUMNS[:8]]
    for rec in dist:
        votes = rec.meta["votes"]
        assert rec.soft_label.shape == (8,) and rec.soft_label.sum() == pytest.approx(1.0)
        assert int(np.argmax(rec.soft_label)) == rec.label and rec.soft_label[rec.label] >= 0.7
        for col, c in enumerate(canon):
            assert rec.soft_label[c] == pytest.approx(votes[col] / votes[:8].sum())
    assert any(r.label == CONTEMPT for r in majority)  # FERPlus keeps contempt
    assert any((r.soft_label < 1).all() for r in dist)  # the seeded spread is there
    # without the PNG folders the pixels come from fer2013.csv at the same row
    root = shutil.copytree(roots["ferplus"], tmp_path / "ferplus")
    for d in ("FER2013Train", "FER2013Valid", "FER2013Test"):
        shutil.rmtree(root / d)
    fallback = read_split("ferplus", root, "train").records
    assert [r.label for r in fallback] == [r.label for r in majority]
    for a, b in zip(fallback, majority):
        with Image.open(b.image) as png:
            assert isinstance(a.image, np.ndarray) and np.array_equal(a.image, np.asarray(png))


def test_ferplus_skips_and_majority_rules(exported, tmp_path):
    _, _, roots = exported
    root = shutil.copytree(roots["ferplus"], tmp_path / "ferplus")
    path = root / "fer2013new.csv"
    rows = list(csv.reader(path.open()))
    train_rows = [i for i, r in enumerate(rows) if r[0] == "Training"]
    rows[train_rows[0]][1] = ""                                               # not a face: no name
    rows[train_rows[1]][2:] = ["1", "0", "0", "0", "0", "0", "0", "0", "6", "3"]  # majority unknown
    rows[train_rows[2]][2:] = ["0"] * 9 + ["10"]                              # no expression votes
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    base = len(read_split("ferplus", roots["ferplus"], "train").records)
    maj = read_split("ferplus", root, "train")
    assert len(maj.records) == base - 3
    assert maj.skipped == {"ferplus_no_name": 1, "ferplus_majority_unknown": 1, "ferplus_no_expression_votes": 1}
    dist = read_split("ferplus", root, "train", label_mode="distribution")
    assert len(dist.records) == base - 2
    rec = next(r for r in dist.records if r.meta["votes"][8] == 6)
    assert rec.label == 0 and rec.soft_label[0] == pytest.approx(1.0)  # the only expression vote: neutral
    with pytest.raises(ValueError, match="label_mode"):
        read_split("ferplus", root, "train", label_mode="vote")


def test_openface_round_trip_and_success_filter(exported):
    samples, by_name, roots = exported
    lines = roots["openface"].read_text().splitlines()
    assert any(", 0, " in ln.split(", AU")[0] and ln.split(", ")[5] == "0" for ln in lines[1:])  # success=0 rows
    for fmt, split in (("imagefolder", "train"), ("rafdb", "test"), ("fer2013", "val"), ("affectnet", "test")):
        records = read_split(fmt, roots[fmt], split).records
        names = names_via_captions(records, roots)
        n_with = sum(by_name[n].aus is not None for n in names)
        assert 0 < n_with < len(records)
        with pytest.warns(UserWarning, match=f"{len(records) - n_with} of {len(records)}"):
            assert attach_openface(records, roots["openface"], VOCAB) == n_with
        for rec, name in zip(records, names):
            truth = by_name[name].aus
            if truth is None:  # only a success==0 row exists for it: AUs stay unknown
                assert rec.aus is None and rec.au_mask is None
            else:
                assert rec.au_mask.all()
                np.testing.assert_allclose(rec.aus, truth, atol=1e-3)
    # an AU the csv does not have is unknown (mask False), not 0
    records = read_split("imagefolder", roots["imagefolder"], "train").records
    names = names_via_captions(records, roots)
    with pytest.warns(UserWarning):
        attach_openface(records, roots["openface"], AUVocabulary((12, 7, 1)))
    rec, name = next((r, n) for r, n in zip(records, names) if by_name[n].aus is not None)
    assert rec.au_mask.tolist() == [True, False, True]
    np.testing.assert_allclose(rec.aus[[0, 2]], by_name[name].aus[[VOCAB.index(12), VOCAB.index(1)]], atol=1e-3)


def test_openface_per_image_dir_clipping_and_missing_file_column(exported, tmp_path):
    _, _, roots = exported
    records = read_split("imagefolder", roots["imagefolder"], "val").records[:2]
    d = tmp_path / "openface_out"
    d.mkdir()
    header = "face, confidence, success, AU01_r, AU12_r, AU45_r"
    stems = [Path(r.image).stem for r in records]
    (d / f"{stems[0]}.csv").write_text(f"{header}\n0, 0.10, 0, 4.0, 4.0, 0.0\n1, 0.95, 1, -0.30, 5.40, 0.5\n")
    (d / f"{stems[1]}.csv").write_text(f"{header}\n0, 0.20, 0, 1.0, 1.0, 0.0\n")  # no successful face
    vocab = AUVocabulary((1, 12, 26))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert attach_openface(records, d, vocab) == 1
    msgs = user_warnings(caught)
    assert len(msgs) == 2 and "clipped 2" in msgs[0] and "1 of 2" in msgs[1]
    assert records[0].aus.tolist() == [0.0, 5.0, 0.0] and records[0].au_mask.tolist() == [True, True, False]
    assert records[1].aus is None
    no_file = tmp_path / "frames.csv"
    no_file.write_text("frame, face_id, timestamp, confidence, success, AU01_r\n1, 0, 0.0, 0.9, 1, 1.0\n")
    with pytest.raises(ValueError, match=r"frames\.csv:1: no file-name column"):
        attach_openface(records, no_file, vocab)
    with pytest.raises(FileNotFoundError, match="nowhere.csv"):
        attach_openface(records, tmp_path / "nowhere.csv", vocab)


def test_captions_errors_name_file_and_line(exported, tmp_path):
    _, _, roots = exported
    records = read_split("imagefolder", roots["imagefolder"], "test").records
    bad = tmp_path / "caps.jsonl"
    bad.write_text('{"file": "a.png", "caption": "x"}\n\n{"file": "b.png", "caption": \n')
    with pytest.raises(ValueError, match=r"caps\.jsonl:3: malformed json"):
        attach_captions(records, bad)
    bad.write_text('{"file": "a.png", "caption": "x"}\n{"caption": "y"}\n')
    with pytest.raises(ValueError, match=r"caps\.jsonl:2: missing key 'file'"):
        attach_captions(records, bad)


# ------------------------------------------------------------------ bad input
def test_missing_images_are_counted_with_one_warning(exported, tmp_path):
    _, _, roots = exported
    root = shutil.copytree(roots["affectnet"], tmp_path / "affectnet")
    full = read_split("affectnet", root, "train").records
    for rec in full[:3]:
        Path(rec.image.replace(str(roots["affectnet"]), str(root))).unlink()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = read_split("affectnet", root, "train")
    msgs = user_warnings(caught)
    assert len(msgs) == 1 and "skipped 3" in msgs[0]
    assert result.skipped == {"missing_image": 3} and len(result.records) == len(full) - 3


def test_affectnet_dropped_ids_and_unknown_ids(exported, tmp_path):
    _, _, roots = exported
    root = shutil.copytree(roots["affectnet"], tmp_path / "affectnet")
    path = root / "training.csv"
    lines = path.read_text().splitlines()
    n = len(read_split("affectnet", root, "train").records)
    row = lines[1].split(",")
    # other files (the same file twice would be a duplicate): dropped ids are counted before the file check
    extra = [",".join([f"9/extra_{k}.jpg"] + row[1:6] + [str(i)] + row[7:]) for k, i in enumerate((9, 9, 10, 8))]
    path.write_text("\n".join(lines + extra) + "\n")
    result = read_split("affectnet", root, "train")
    assert len(result.records) == n
    assert result.skipped == {"affectnet_id_9_uncertain": 2, "affectnet_id_10_no_face": 1, "affectnet_id_8_none": 1}
    bad_line = len(lines) + len(extra) + 1
    path.write_text("\n".join(lines + extra + [",".join(["9/extra_12.jpg"] + row[1:6] + ["12"] + row[7:])]) + "\n")
    with pytest.raises(ValueError, match=rf"training\.csv:{bad_line}: unknown AffectNet expression id 12"):
        read_split("affectnet", root, "train")
    path.write_text("\n".join(lines[:3] + [",".join(row[:6] + ["happy"] + row[7:])]) + "\n")
    with pytest.raises(ValueError, match=r"training\.csv:4: column 'expression' is not an integer"):
        read_split("affectnet", root, "train")


def test_affectnet_npy_scalars_and_errors(exported, tmp_path):
    _, _, roots = exported
    root = shutil.copytree(roots["affectnet_npy"], tmp_path / "npy")
    ann = root / "val_set" / "annotations"
    exp_files = sorted(ann.glob("*_exp.npy"))
    assert np.load(exp_files[0]).dtype.kind == "U"  # a numpy string scalar like the real release
    n = len(read_split("affectnet_npy", root, "test").records)
    np.save(exp_files[0], np.int64(np.load(exp_files[0]).item()))  # int ids work too
    np.save(exp_files[1], np.array("10"))
    result = read_split("affectnet_npy", root, "val", with_va=True)
    assert len(result.records) == n - 1 and result.skipped == {"affectnet_id_10_no_face": 1}
    assert all(-1 <= r.meta["valence"] <= 1 for r in result.records)
    np.save(exp_files[2], np.array("11"))
    with pytest.raises(ValueError, match=rf"{exp_files[2].name}.*unknown AffectNet expression id 11"):
        read_split("affectnet_npy", root, "val")


def test_fer2013_malformed_pixels_name_the_line(exported, tmp_path):
    _, _, roots = exported
    path = tmp_path / "fer2013" / "fer2013.csv"
    shutil.copytree(roots["fer2013"], path.parent)
    lines = path.read_text().splitlines()
    original = list(lines)
    emotion, pixels, usage = lines[3].split(",")
    lines[3] = f"{emotion},{' '.join(pixels.split()[:-1])},{usage}"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"fer2013\.csv:4: pixels has 2303 values"):
        read_split("fer2013", path.parent, usage_split_name(usage))
    lines[3] = f"{emotion},{pixels.replace(pixels.split()[5], 'x7', 1)},{usage}"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"fer2013\.csv:4: pixels contains a non-integer"):
        read_split("fer2013", path.parent, usage_split_name(usage))
    lines = list(original)
    lines[2] = f"7,{lines[2].split(',', 1)[1]}"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"fer2013\.csv:3: unknown FER2013 emotion id 7"):
        read_split("fer2013", path.parent, "train")


def usage_split_name(usage: str) -> str:
    return {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}[usage]


def test_imagefolder_unknown_class_and_val_alias(exported, tmp_path):
    _, _, roots = exported
    root = shutil.copytree(roots["imagefolder"], tmp_path / "imf")
    (root / "val").rename(root / "validation")
    assert len(read_split("imagefolder", root, "val").records) == SIZES["val"]
    (root / "train" / "bored").mkdir()
    with pytest.raises(ValueError, match="bored"):
        read_split("imagefolder", root, "train")


def test_missing_files_and_bad_arguments(exported, tmp_path):
    _, _, roots = exported
    root = shutil.copytree(roots["affectnet"], tmp_path / "affectnet")
    (root / "training.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"affectnet.*training\.csv"):
        read_split("affectnet", root, "train")
    with pytest.raises(FileNotFoundError, match=r"rafdb.*list_patition_label\.txt"):
        read_split("rafdb", root, "train")
    with pytest.raises(FileNotFoundError, match=r"fer2013.*does_not_exist"):
        read_split("fer2013", tmp_path / "does_not_exist", "train")
    with pytest.raises(ValueError, match="RAF-DB has no val split"):
        read_split("rafdb", roots["rafdb"], "val")
    with pytest.raises(ValueError, match="unknown data format"):
        read_split("celeba", roots["rafdb"], "train")
    with pytest.raises(ValueError, match="unknown split"):
        read_split("rafdb", roots["rafdb"], "dev")


def test_rafdb_unknown_label_names_the_line(exported, tmp_path):
    _, _, roots = exported
    root = shutil.copytree(roots["rafdb"], tmp_path / "rafdb")
    path = root / "EmoLabel" / "list_patition_label.txt"
    lines = path.read_text().splitlines()
    lines[4] = lines[4].split()[0] + " 8"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"list_patition_label\.txt:5: unknown RAF-DB label 8"):
        read_split("rafdb", root, "test")


def test_corrupt_images_found_by_verify_and_skipped_by_dataset(exported, tmp_path):
    _, _, roots = exported
    root = shutil.copytree(roots["imagefolder"], tmp_path / "imf")
    records = read_split("imagefolder", root, "test").records
    Path(records[1].image).write_bytes(b"this is not a png")
    buf = io.BytesIO()
    Image.open(records[4].image).convert("RGB").save(buf, format="JPEG", quality=95)
    jpeg = buf.getvalue()
    scan = jpeg.index(b"\xff\xda")  # cut inside the entropy-coded scan: PIL's verify() does not notice
    Path(records[4].image).write_bytes(jpeg[: (scan + len(jpeg)) // 2])  # this one, only a full decode does
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        checked = verify_images(records)
    assert checked.skipped == {"corrupt_image": 2} and len(checked.records) == len(records) - 2
    assert len(user_warnings(caught)) == 1
    to_tensor = lambda im: torch.from_numpy(np.asarray(im.resize((8, 8)), dtype=np.float32)).permute(2, 0, 1)
    ds = RecordDataset(records, to_tensor, num_aus=len(VOCAB), num_classes=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = collate_fer([ds[i] for i in range(len(ds))])  # the bad two are dropped, nothing takes their place
        ds.warn_new_failures()
        ds.warn_new_failures()  # nothing new: no second warning
    assert len(user_warnings(caught)) == 1 and ds.corrupt == {1, 4}
    assert ds.unreadable() == {"corrupt_image": 2}
    assert batch["sample_id"] == [r.sample_id for i, r in enumerate(records) if i not in (1, 4)]
    assert batch["image"].shape[0] == len(records) - 2


def test_exporter_rejects_bad_input(tmp_path):
    img = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="duplicate"):
        export_fer_dataset({"train": [ExportSample("a", img, 0, None), ExportSample("a", img, 1, None)]}, tmp_path)
    with pytest.raises(ValueError, match="label 8"):
        export_fer_dataset({"train": [ExportSample("a", img, 8, None)]}, tmp_path)
    with pytest.raises(ValueError, match="aus shape"):
        export_fer_dataset({"train": [ExportSample("a", img, 0, np.zeros(3))]}, tmp_path)
    with pytest.raises(ValueError, match="unknown format"):
        export_fer_dataset({"train": [ExportSample("a", img, 0, None)]}, tmp_path, formats=("celeba",))
    export_fer_dataset({"train": [ExportSample("a", img, 0, None)]}, tmp_path, formats=("imagefolder",))
    with pytest.raises(FileExistsError):
        export_fer_dataset({"train": [ExportSample("b", img, 0, None)]}, tmp_path, formats=("imagefolder",))
    export_fer_dataset({"train": [ExportSample("b", img, 0, None)]}, tmp_path, formats=("imagefolder",),
                       overwrite=True)
    assert [p.name for p in (tmp_path / "imagefolder" / "train" / "neutral").iterdir()] == ["b.png"]
    summary = json.loads((tmp_path / "export_summary.json").read_text())
    assert summary["formats"]["imagefolder"]["counts"]["train"] == 1


def test_export_without_contempt_reports_no_skips(tmp_path):
    """No contempt face to drop: fer2013 and rafdb report nothing (a zero count used to warn "skipped ...: 0")."""
    rng = np.random.default_rng(0)
    splits = {"train": [ExportSample(f"f{i}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), i % 7,
                                     np.zeros(12), "c") for i in range(7)]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        roots = export_fer_dataset(splits, tmp_path, formats=["fer2013", "rafdb"])
    assert not roots.skipped["fer2013"] and not roots.skipped["rafdb"]
    assert not [m for m in user_warnings(caught) if "skipped" in m]

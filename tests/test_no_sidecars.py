"""The toy exporter writes the public formats as researchers download them: without the OpenFace AU csv and the
captions jsonl, or with AUs for only part of the faces."""
from __future__ import annotations

import json

import numpy as np
import pytest

from datamodules.formats import READERS, attach_captions, attach_openface, read_split
from datamodules.formats.export import SIDECARS, ExportSample, with_sidecars
from datamodules.labels import AUVocabulary
from datamodules.toyfaces import ToyFacesConfig
from datamodules.toyfaces_export import export_toyfaces, main

SIZES = {"train": 16, "val": 6, "test": 6}
CONFIG = ToyFacesConfig(image_size=32, seed=3)


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    out = tmp_path_factory.mktemp("bare")
    return out, export_toyfaces(CONFIG, SIZES, out, sidecars="none")


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    out = tmp_path_factory.mktemp("partial")
    return out, export_toyfaces(CONFIG, SIZES, out, formats=["imagefolder", "ferplus", "openface", "captions"],
                                sidecars="partial", au_fraction=0.25)


def test_none_writes_every_image_format_and_no_sidecar(bare):
    out, result = bare
    assert sorted(result) == sorted(READERS)
    for sidecar in SIDECARS:
        assert not (out / sidecar).exists()
    summary = json.loads((out / "export_summary.json").read_text())
    assert not set(summary["formats"]) & set(SIDECARS)


@pytest.mark.parametrize("fmt", sorted(READERS))
def test_none_reads_back_without_aus_or_captions(bare, fmt):
    _, result = bare
    records = read_split(fmt, result[fmt], "train").records
    assert len(records) == result.counts[fmt]["train"] > 0
    assert all(r.aus is None and r.au_mask is None and r.caption == "" for r in records)
    assert all(r.label >= 0 for r in records)


@pytest.mark.parametrize("fmt", ["imagefolder", "ferplus"])
def test_partial_gives_aus_to_the_seeded_fraction_only(partial, fmt):
    _, result = partial
    records = [r for split in ("train", "val", "test") for r in read_split(fmt, result[fmt], split).records]
    n = sum(SIZES.values())
    assert len(records) == n
    with pytest.warns(UserWarning):  # the success=0 rows are counted in one warning, or none at all
        attach_openface(records, result["openface"], AUVocabulary())
    with_aus = [r for r in records if r.aus is not None]
    assert len(with_aus) == round(0.25 * n)
    assert all(r.au_mask.all() for r in with_aus)
    assert attach_captions(records, result["captions"]) == n  # captions stay complete
    assert all(r.caption for r in records)


def test_partial_selection_is_seeded_and_follows_names():
    rng = np.random.default_rng(0)
    splits = {"train": [ExportSample(f"face_{i:03d}", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), i % 8,
                                     np.full(len(AUVocabulary()), 1.0), "c") for i in range(40)]}
    pick = lambda seed: {s.name for s in with_sidecars(splits, ["imagefolder"], "partial", 0.5, seed)[0]["train"]
                         if s.aus is not None}
    assert pick(1) == pick(1) and len(pick(1)) == 20
    assert pick(1) != pick(2)
    assert all(s.aus is not None for s in splits["train"])  # the caller's samples are not modified
    kept, formats = with_sidecars(splits, ["imagefolder", "openface"], "all")
    assert formats == ("imagefolder", "openface") and kept["train"] == splits["train"]


@pytest.mark.parametrize("mode, formats, fraction, match", [
    ("some", ["imagefolder"], 0.5, "sidecars must be one of"),
    ("none", ["imagefolder", "openface"], 0.5, "sidecars=none but formats ask for"),
    ("partial", ["imagefolder"], 1.5, "au_fraction must be in"),
])
def test_with_sidecars_rejects_bad_requests(mode, formats, fraction, match):
    with pytest.raises(ValueError, match=match):
        with_sidecars({"train": []}, formats, mode, fraction)


@pytest.mark.parametrize("argv", [["--sidecars", "none", "--formats", "imagefolder", "captions"],
                                  ["--sidecars", "partial", "--au-fraction", "-0.1"],
                                  ["--sidecars", "some"]])
def test_cli_rejects_bad_sidecar_arguments(tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--out", str(tmp_path / "x"), "--n-train", "2", "--n-val", "0", "--n-test", "0", *argv])
    assert err.value.code == 2
    message = capsys.readouterr().err
    assert "--sidecars" in message or "--au-fraction" in message


def test_cli_none_writes_no_sidecar(tmp_path):
    main(["--out", str(tmp_path), "--n-train", "4", "--n-val", "2", "--n-test", "2", "--image-size", "32",
          "--sidecars", "none", "--formats", "imagefolder", "fer2013"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export_summary.json", "fer2013", "imagefolder"]

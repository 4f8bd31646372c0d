"""AU source per run (data.au_source) and stage=annotate_aus: the csv it writes reads back through the OpenFace
reader, its card, the key checks, the stage end to end on a toy export without AUs, and the pipeline step."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from conftest import TINY, compose
from datamodules.errors import DataError
from datamodules.formats import attach_openface, load_openface, read_split
from datamodules.labels import AUVocabulary, class_names
from datamodules.real import CARVE_VAL_FORMATS, RealFERDataModule
from datamodules.toyfaces import ToyFacesConfig
from datamodules.toyfaces_export import export_toyfaces
from lightning_modules.labeling.au_annotation import au_card, card_markdown, sidecar_names, write_sidecar
from lightning_modules.paradigms.classifier import CLASS_MARKER, class_path
from lightning_modules.paradigms.teacher import FERTeacher
from lightning_modules.run import preflight
from lightning_modules.run.runtime import ConfigError

VOCAB = AUVocabulary()
BASE = [o for o in TINY if not o.startswith("data.toy.")]
# a detector trained here for one epoch on 64 toy faces (what the stage trains, at test size)
DETECTOR = ("annotate.detector.overrides={data.toy.n_train:64,data.toy.n_val:16,data.toy.n_test:16,"
            "data.toy.image_size:32,data.image_size:32,data.batch_size:32,teacher.max_epochs:1}")


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """Toy faces exported as downloaded: image formats only, no AU csv."""
    out = tmp_path_factory.mktemp("bare")
    return export_toyfaces(ToyFacesConfig(image_size=32, seed=3), {"train": 24, "val": 8, "test": 8}, out,
                           formats=["imagefolder", "fer2013", "rafdb"], sidecars="none")


def annotate_overrides(root, *extra):
    return [*BASE, "data=imagefolder", f"data.root={root}", "data.protocol=8", "data.image_size=32",
            "data.num_workers=0", "data.au_source=annotate", "annotate.detector.data=toy", DETECTOR,
            "annotate.batch_size=16", *extra]


def _records(result, fmt):
    splits = ("train", "test") if fmt in CARVE_VAL_FORMATS else ("train", "val", "test")
    return [r for split in splits for r in read_split(fmt, result[fmt], split).records]


# ---------------------------------------------------------------------- the csv and the card
@pytest.mark.parametrize("fmt", ["imagefolder", "fer2013", "rafdb"])  # files, in-memory pixels, renamed files
def test_sidecar_round_trips_through_the_openface_reader(bare, fmt, tmp_path):
    records = _records(bare, fmt)
    rng = np.random.default_rng(0)
    aus = rng.uniform(0, 5, (len(records), len(VOCAB))).astype(np.float32)
    ok = np.ones(len(records), bool)
    ok[1] = False  # an unreadable face: success 0, no AUs
    path = tmp_path / "aus.csv"
    write_sidecar(path, records, aus, ok, VOCAB, root=str(bare[fmt]))
    header = path.read_text().splitlines()[0].split(", ")
    assert header[:4] == ["file", "face_id", "confidence", "success"] and header[4:] == VOCAB.openface_columns()
    fresh = _records(bare, fmt)
    with pytest.warns(UserWarning, match="1 of"):  # the success-0 face is the one unmatched record
        assert attach_openface(fresh, path, VOCAB) == len(records) - 1
    assert fresh[1].aus is None
    got = np.stack([r.aus for i, r in enumerate(fresh) if i != 1])
    np.testing.assert_allclose(got, np.delete(aus, 1, axis=0), atol=1e-3)
    assert all(r.au_mask.all() for i, r in enumerate(fresh) if i != 1)
    if fmt == "imagefolder":  # names relative to data.root: the csv still joins after the folder moves
        assert next(iter(load_openface(path, VOCAB)[0])).startswith(("train/", "val/", "test/"))


def test_two_faces_with_one_file_name_are_refused(bare):
    records = _records(bare, "imagefolder")[:2]
    twin = copy.deepcopy(records[0])
    twin.sample_id = "other"
    with pytest.raises(DataError, match="same file name"):
        sidecar_names([records[0], twin])


def test_card_counts_coverage_and_means():
    from datamodules.batch import FERRecord

    labels = [0, 0, 1, 1, -1]
    records = [FERRecord(sample_id=f"s{i}", image=f"/d/{i}.png", label=c) for i, c in enumerate(labels)]
    aus = np.array([[1, 0], [3, 2], [5, 4], [np.nan, np.nan], [0, 0]], np.float32)
    ok = np.array([True, True, True, False, True])
    vocab = AUVocabulary((12, 4))
    card = au_card(records, aus, ok, vocab, ["neutral", "happy"], ["train", "train", "train", "test", "test"])
    assert (card["faces"], card["annotated"], card["coverage"]) == (5, 4, 0.8)
    assert card["splits"] == {"train": {"faces": 3, "annotated": 3}, "test": {"faces": 2, "annotated": 1}}
    assert card["au_mean"] == {"AU12": 2.25, "AU04": 1.5}
    assert card["au_std"]["AU12"] == pytest.approx(np.std([1, 3, 5, 0]), abs=1e-4)
    assert card["class_au_mean"] == {"neutral": {"AU12": 2.0, "AU04": 1.0}, "happy": {"AU12": 5.0, "AU04": 4.0}}
    assert card["class_counts"] == {"neutral": 2, "happy": 1}  # the unreadable happy face is not counted
    md = card_markdown(card)
    assert "4 of 5 faces annotated (80.0 %)" in md and "| happy | 1 | 5.00 | 4.00 |" in md


# ---------------------------------------------------------------------- data.au_source
@pytest.mark.parametrize("overrides, key", [
    (["data.au_source=bogus"], "data.au_source"),
    (["data=imagefolder", "data.root=/r", "data.au_source=sidecar"], "data.openface"),
    (["data=imagefolder", "data.root=/r", "data.au_source=none", "data.openface=/r/aus.csv"], "data.openface"),
    (["data=imagefolder", "data.root=/r", "data.au_source=annotate", "data.openface=/r/aus.csv"], "data.openface"),
    (["data.openface=/r/aus.csv"], "data.openface"),                       # toy faces read no csv
    (["data.au_source=annotate", "annotate.detector.data=toy"], "data.au_source"),  # toy: export them first
    (["data=imagefolder", "data.root=/r", "data.au_source=annotate"], "annotate.detector"),  # no detector named
    (["data=imagefolder", "data.root=/r", "data.au_source=annotate", "annotate.detector.data=toy",
      "annotate.detector.checkpoint=/r/t.ckpt"], "annotate.detector"),     # two detectors named
    (["data=imagefolder", "data.root=/r", "data.au_source=annotate", "annotate.detector.data=nope"],
     "annotate.detector.data"),
    (["data=imagefolder", "data.root=/r", "data.au_source=annotate", "annotate.detector.data=imagefolder"],
     "annotate.detector.data"),                                             # the detector's data has no AUs
    (["data=imagefolder", "data.root=/r", "data.au_source=annotate", "annotate.detector.data=toy",
      "annotate.detector.overrides={trainer.max_epochs:1}"], "annotate.detector.overrides"),
    (["data=imagefolder", "data.root=/r", "data.au_source=annotate", "annotate.detector.data=toy",
      "annotate.detector.overrides={data.no_such_key:1}"], "annotate.detector.overrides"),
    (["data=imagefolder", "data.root=/r", "data.au_source=annotate", "annotate.detector.data=toy",
      "data.aus=[1,2,4]"], "annotate.detector"),                            # AU vocabulary mismatch
    (["data=imagefolder", "data.root=/r", "data.au_source=annotate", "annotate.detector.checkpoint=/r/t.ckpt"],
     "annotate.detector.checkpoint"),                                       # missing checkpoint
    (["data=imagefolder", "data.root=/r", "data.au_source=annotate", "annotate.detector.data=toy"],
     "data.au_source"),                                                     # stage=teacher before annotate_aus ran
    (["data=imagefolder", "data.root=/r", "stage=annotate_aus"], "data.au_source"),
])
def test_bad_au_source_combinations_name_the_key(tmp_path, overrides, key):
    cfg = compose([*BASE, "stage=teacher", *overrides], tmp_path / "run")
    with pytest.raises(ConfigError) as err:
        preflight.resolve_au_source(cfg)
    assert err.value.key == key


@pytest.mark.parametrize("overrides, source", [
    ([], "sidecar"),                                                        # toy faces: ground truth in memory
    (["data.au_source=none"], "none"),
    (["data=imagefolder", "data.root=/r"], "none"),                         # a download without a csv
    (["data=imagefolder", "data.root=/r", "data.openface=/r/aus.csv"], "sidecar"),
])
def test_au_source_resolves_and_is_saved_in_the_config(tmp_path, overrides, source):
    cfg = compose([*BASE, "stage=teacher", *overrides], tmp_path / "run")
    given = cfg.data.au_source
    resolved = preflight.resolve_au_source(cfg)
    assert resolved.data.au_source == source and cfg.data.au_source == given  # the caller's config is left as it was


def test_toy_faces_without_aus(tmp_path):
    dm = RealFERDataModule(format="toy", au_source="none", image_size=32, batch_size=8, augment={},
                           toy={"n_train": 8, "n_val": 4, "n_test": 4, "image_size": 32})
    dm.setup()
    assert all(r.aus is None for split in dm.records.values() for r in split)
    summary = dm.summary()
    assert summary["au_source"] == "none" and summary["train_with_aus"] == 0
    with pytest.raises(ValueError, match="data.openface"):
        RealFERDataModule(format="imagefolder", root=str(tmp_path), au_source="sidecar")


# ---------------------------------------------------------------------- the stage, end to end
@pytest.fixture(scope="module")
def annotated(bare, tmp_path_factory):
    import train

    run = tmp_path_factory.mktemp("annotate") / "run"
    metrics = train.run_stage(compose([*annotate_overrides(bare["imagefolder"]), "stage=annotate_aus"], run))
    return run, metrics


@pytest.mark.slow
def test_annotate_stage_writes_a_csv_the_run_reads(bare, annotated):
    import train

    run, metrics = annotated
    n = sum(bare.counts["imagefolder"].values())
    csv = Path(metrics["sidecar"])
    assert csv.parent == run / "annotate_aus" and metrics["annotated"] == metrics["faces"] == n
    card = json.loads((run / "annotate_aus" / "card.json").read_text())
    assert card["coverage"] == 1.0 and set(card["class_au_mean"]) <= set(class_names(8))
    assert all(0 <= v <= 5 for v in card["au_mean"].values())
    records = _records(bare, "imagefolder")
    assert attach_openface(records, csv, VOCAB) == n
    # a rerun with the same config is skipped; the teacher reads the csv as its AUs
    again = train.run_stage(compose([*annotate_overrides(bare["imagefolder"]), "stage=annotate_aus"], run))
    assert again["skipped"] and again["sidecar"] == str(csv)
    teacher = train.run_stage(compose([*annotate_overrides(bare["imagefolder"]), "stage=teacher"], run))
    assert teacher["data"]["au_source"] == "annotate"
    assert teacher["data"]["train_with_aus"] == teacher["data"]["train_size"] > 0
    saved = (run / "teacher" / "config.yaml").read_text()
    assert "au_source: annotate" in saved and csv.name in saved
    # another detector is another annotation: another csv name, so the stages reading it see a new input
    other = compose([*annotate_overrides(bare["imagefolder"]), "stage=teacher", "seed=1"], run)
    with pytest.raises(ConfigError, match="annotate_aus first"):
        preflight.resolve_au_source(other)


def _garbage(path: Path) -> Path:
    path.write_bytes(b"not a checkpoint")
    return path


def _save_classifier(path: Path, **hparams) -> Path:
    model = FERTeacher(backbone="resnet10t", num_classes=8, **hparams)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                CLASS_MARKER: class_path(FERTeacher), "pytorch-lightning_version": L.__version__}, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("make, extra, key, match", [
    (lambda p: _save_classifier(p, au_head=False), [], "checkpoint", "no AU head"),
    (lambda p: _save_classifier(p, au_head=True, num_aus=3), [], "checkpoint", "predicts 3 AUs"),
    (_garbage, [], "checkpoint", "not a loadable"),
    (lambda p: _save_classifier(p, au_head=True), ["annotate.detector.aus=[1,2]"], "checkpoint", "AU vocabulary"),
    (lambda p: _save_classifier(p, au_head=True), ["annotate.detector.image_size=null"], "image_size",
     "no config.yaml beside it"),
])
def test_bad_detector_checkpoints_are_config_errors(bare, tmp_path, make, extra, key, match):
    import train

    ckpt = make(tmp_path / "det.ckpt")  # no config.yaml beside it: its AUs and size come from the config
    overrides = [o for o in annotate_overrides(bare["imagefolder"]) if not o.startswith("annotate.detector")]
    overrides += [f"annotate.detector.checkpoint={ckpt}", "annotate.detector.aus=[1,2,4,5,6,9,12,15,17,20,25,26]",
                  "annotate.detector.image_size=32", *extra, "stage=annotate_aus"]
    with pytest.raises(ConfigError, match=match) as err:
        train.run_stage(compose(overrides, tmp_path / "run"))
    assert err.value.key == f"annotate.detector.{key}"


@pytest.mark.slow
def test_a_trained_detector_checkpoint_annotates_with_its_saved_config(bare, annotated, tmp_path):
    import train

    run, first = annotated
    ckpt = run / "au_detector" / "au_detector.ckpt"  # config.yaml beside it gives its AUs and input size
    overrides = [o for o in annotate_overrides(bare["imagefolder"]) if not o.startswith("annotate.detector")]
    metrics = train.run_stage(compose([*overrides, f"annotate.detector.checkpoint={ckpt}", "stage=annotate_aus"],
                                      tmp_path / "run"))
    assert metrics["annotated"] == first["annotated"]
    assert metrics["au_mean"] == pytest.approx(first["au_mean"], abs=1e-3)  # the same detector, the same AUs


# ---------------------------------------------------------------------- pipeline
def test_pipeline_runs_annotate_first_only_with_au_source_annotate(bare, tmp_path):
    from lightning_modules.stages import pipeline

    cfg = preflight.resolve_au_source(compose([*annotate_overrides(bare["imagefolder"]), "stage=pipeline"],
                                              tmp_path / "run"))
    plan = pipeline._plan(cfg)
    assert [label for label, _ in plan][:2] == ["annotate_aus", "teacher"]
    out_dir, digest, _, _ = plan[0][1]()
    assert out_dir == tmp_path / "run" / "annotate_aus" and cfg.data.openface.endswith(f"openface_aus.{digest}.csv")
    plain = preflight.resolve_au_source(compose([*BASE, "stage=pipeline"], tmp_path / "run"))
    assert "annotate_aus" not in [label for label, _ in pipeline._plan(plain)]
    listed = compose([*BASE, "stage=pipeline", "pipeline.stages=[annotate_aus,teacher]"], tmp_path / "run")
    with pytest.raises(ConfigError, match="pipeline.stages"):
        pipeline._plan(preflight.resolve_au_source(listed))


def test_agreement_script_scores_a_csv_against_itself(bare, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from au_agreement import main

    records = _records(bare, "imagefolder")
    rng = np.random.default_rng(1)
    truth = rng.uniform(0, 5, (len(records), len(VOCAB))).astype(np.float32)
    ok = np.ones(len(records), bool)
    write_sidecar(tmp_path / "truth.csv", records, truth, ok, VOCAB, root=str(bare["imagefolder"]))
    noisy = np.clip(truth + rng.normal(0, 1.0, truth.shape), 0, 5).astype(np.float32)
    write_sidecar(tmp_path / "pred.csv", records, noisy, ok, VOCAB, root=str(bare["imagefolder"]))
    args = ["--format", "imagefolder", "--root", str(bare["imagefolder"]), "--truth", str(tmp_path / "truth.csv")]
    same = main([*args, "--predicted", str(tmp_path / "truth.csv")])
    assert same["mean_pearson_r"] == pytest.approx(1.0) and same["mean_mae"] == pytest.approx(0.0, abs=1e-3)
    worse = main([*args, "--predicted", str(tmp_path / "pred.csv")])
    assert 0.3 < worse["mean_pearson_r"] < 0.99 and worse["per_au"]["AU01"]["n"] == len(records)


@pytest.mark.slow
def test_pipeline_annotates_then_skips_and_redoes_a_deleted_csv(bare, annotated, tmp_path):
    import train

    detector = annotated[0] / "au_detector" / "au_detector.ckpt"  # trained once for the module
    overrides = [o for o in annotate_overrides(bare["imagefolder"]) if not o.startswith("annotate.detector")]
    cfg = compose([*overrides, f"annotate.detector.checkpoint={detector}", "stage=pipeline",
                   "pipeline.stages=[teacher]"], tmp_path / "run")
    first = train.run_stage(cfg)
    assert (first["annotate_aus"], first["teacher"]) == ("ran", "ran")
    csv = next((tmp_path / "run" / "annotate_aus").glob("openface_aus.*.csv"))
    second = train.run_stage(cfg)
    assert (second["annotate_aus"], second["teacher"]) == ("skipped", "skipped")
    csv.unlink()
    third = train.run_stage(cfg)  # the teacher's input is the same file again: only the csv is redone
    assert (third["annotate_aus"], third["teacher"]) == ("ran", "skipped") and csv.is_file()

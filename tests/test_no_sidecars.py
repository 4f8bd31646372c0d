"""The toy exporter writes the public formats as researchers download them: without the OpenFace AU csv and the
captions jsonl, or with AUs for only part of the faces."""
from __future__ import annotations

import json
import warnings

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


# ---------------------------------------------------------------------- the `none` AU route: grids + evaluation
import torch  # noqa: E402

from datamodules.batch import FERRecord  # noqa: E402
from lightning_modules.generator.callbacks import grid_conditions, render_grids  # noqa: E402
from lightning_modules.generator.evaluation import (AU_METRICS_SKIPPED, evaluate_generator,  # noqa: E402
                                                    fidelity_metrics, records_eval_conditions)


def _face(i, label, aus=False, width=3):
    return FERRecord(sample_id=str(i), image=np.full((8, 8, 3), 10 * i % 250, np.uint8), label=label,
                     aus=np.full(width, float(label), np.float32) if aus else None,
                     au_mask=np.ones(width, bool) if aus else None, caption=f"face {i}")


def test_grid_conditions_without_aus_have_no_sweep():
    conds = grid_conditions([_face(0, 2), _face(1, 0), _face(2, 5), _face(3, 2)], num_classes=8, num_aus=3)
    assert conds.names == ["neutral", "sad", "disgust"] and conds.labels == [0, 2, 5]
    assert conds.captions == ["face 1", "face 0", "face 2"]
    assert conds.aus.shape == conds.au_mask.shape == (3, 3) and not conds.au_mask.any() and not conds.has_aus
    assert conds.sweep_aus is None and conds.sweep_mask is None


def test_grid_conditions_prefer_faces_with_aus_and_sweep_from_one():
    conds = grid_conditions([_face(0, 0), _face(1, 2), _face(2, 2, aus=True)], num_classes=8, num_aus=3)
    assert conds.captions == ["face 0", "face 2"]            # the sad row is the face with AUs
    assert conds.au_mask.tolist() == [[False] * 3, [True] * 3]
    assert conds.sweep_caption == "face 2" and conds.sweep_label == 2  # the neutral face has no AUs
    assert conds.sweep_aus.tolist() == [2.0, 2.0, 2.0] and conds.sweep_mask.all()


def test_eval_conditions_without_aus_draw_every_labelled_face():
    records = [_face(i, i % 3) for i in range(9)] + [_face(50, -1)]
    conds = records_eval_conditions(records, per_class=2, num_classes=3, seed=0, num_aus=4)
    assert sorted(conds.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert conds.aus.shape == (6, 4) and not conds.au_mask.any() and not conds.has_aus
    # with some AU-labelled faces only those are drawn (the AU metrics need them)
    mixed = records + [_face(60 + c, c, aus=True, width=4) for c in range(3)]
    conds = records_eval_conditions(mixed, per_class=2, num_classes=3, seed=0, num_aus=4)
    assert conds.captions == ["face 60", "face 61", "face 62"] and conds.au_mask.all()
    with pytest.raises(ValueError, match="records carry \\[4\\] AUs, expected 3"):
        records_eval_conditions(mixed, per_class=2, num_classes=3, seed=0, num_aus=3)


def test_fidelity_metrics_skip_au_metrics_without_au_labels():
    conds = records_eval_conditions([_face(i, i % 2) for i in range(4)], 2, 2, 0, num_aus=3)
    m = fidelity_metrics(torch.eye(2)[[0, 1, 1, 1]], None, conds, [1, 2, 4])
    assert m["au_metrics_skipped"] == AU_METRICS_SKIPPED == "no AU labels in the data"
    assert m["fer_acc"] == pytest.approx(0.75)
    assert not [k for k in m if k.startswith("au_") and k != "au_metrics_skipped"]


SMALL_GEN = dict(unet=dict(block_out_channels=[8, 16], layers_per_block=1, attention_head_dim=4, norm_num_groups=4,
                           down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                           up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"]),
                 text_encoder=dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_length=16),
                 image_size=16, aus=[1, 2, 4], ema_decay=None, sample=dict(steps=2), num_classes=3)


class _NoAUHeadTeacher(torch.nn.Module):
    """A teacher without an AU head (trained on data without AUs): logits from the mean brightness."""

    class _Model:
        num_features = 3

    model = _Model()

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([-4.0, 0.0, 4.0]))

    def forward(self, x):
        return {"logits": x.mean(dim=(1, 2, 3))[:, None] * self.w}

    def forward_features(self, x):
        return x.mean(dim=(2, 3))


@pytest.mark.parametrize("label_conditioning", [False, True])
def test_grids_and_evaluation_without_aus(tmp_path, label_conditioning):
    from lightning_modules.generator.module import FERGenerator

    torch.manual_seed(0)
    gen = FERGenerator(label_conditioning=label_conditioning, **SMALL_GEN)
    records = [_face(i, i % 3) for i in range(12)]
    paths = render_grids(gen, grid_conditions(records, 3, 3), tmp_path, "final", seeds=2, au_levels=[0, 5])
    assert sorted(paths) == ["expressions"] and paths["expressions"].is_file()
    assert not (tmp_path / "au_sweep_final.png").exists()
    conds = records_eval_conditions(records, per_class=2, num_classes=3, seed=0, num_aus=3)
    metrics, images = evaluate_generator(gen, _NoAUHeadTeacher(), conds, 8, progress=False)
    assert images.shape == (6, 3, 16, 16)
    assert metrics["au_metrics_skipped"] == metrics["reference/au_metrics_skipped"] == AU_METRICS_SKIPPED
    for key in ("fer_acc", "fid", "kid_mean", "reference/fer_acc"):
        assert isinstance(metrics[key], float), key
    assert "au_pearson_mean" not in metrics


@pytest.mark.slow
def test_generator_stage_on_ferplus_without_sidecars(tiny_cfg, tmp_path):
    """The reported crash: stage=generator on a FERPlus folder as downloaded (no OpenFace csv, no captions)."""
    import train

    export_toyfaces(CONFIG, {"train": 64, "val": 16, "test": 24}, tmp_path / "export", formats=["ferplus"],
                    sidecars="none")
    data = ["data=ferplus", f"data.root={tmp_path / 'export' / 'ferplus'}", "data.image_size=32"]
    train.run_stage(tiny_cfg("stage=teacher", *data))
    # per_class=4 on 24 imbalanced test faces: rare classes fill fewer rows' worth; the eval grid must still draw
    metrics = train.run_stage(tiny_cfg("stage=generator", *data, "generator.model.label_conditioning=true",
                                       "generator.eval.per_class=4"))
    ev = metrics["eval"]
    assert ev["au_metrics_skipped"] == "no AU labels in the data"
    assert "au_pearson_mean" not in ev and ev["num_samples"] > 0
    for key in ("fer_acc", "fid", "kid_mean", "reference/fer_acc"):
        assert isinstance(ev[key], float), key
    grids = tmp_path / "run" / "generator" / "grids"
    assert (grids / "expressions_final.png").is_file() and not (grids / "au_sweep_final.png").exists()
    assert (grids / "eval_samples.png").is_file()


@pytest.mark.parametrize("known_aus, trained", [(False, False), (True, True)])
def test_synthesis_requests_no_aus_from_a_generator_trained_without_them(tmp_path, known_aus, trained):
    from lightning_modules.generator.module import FERGenerator
    from lightning_modules.generator.pipeline import SynFERPipeline
    from lightning_modules.synthesis.writer import SynthesisModule

    torch.manual_seed(0)
    gen = FERGenerator(**SMALL_GEN)
    assert gen.trained_on_aus is None  # nothing trained yet: unknown
    batch = {"image": torch.rand(4, 3, 16, 16) * 2 - 1, "label": torch.tensor([0, 1, 2, 1]),
             "aus": torch.rand(4, 3) * 5 * known_aus, "au_mask": torch.full((4, 3), known_aus), "caption": [""] * 4}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        gen.training_step(batch, 0)
    assert gen.faces_seen == {"faces": 4, "with_aus": 4 * known_aus} and gen.trained_on_aus is trained
    checkpoint = {}  # the count survives a resume; an older checkpoint without it records nothing
    gen.on_save_checkpoint(checkpoint)
    resumed, older = FERGenerator(**SMALL_GEN), FERGenerator(**SMALL_GEN)
    resumed.on_load_checkpoint(checkpoint)
    older.on_load_checkpoint({})
    assert resumed.faces_seen == gen.faces_seen and resumed.trained_on_aus is trained
    assert older.faces_seen is None and older.trained_on_aus is None
    gen.save_generator(tmp_path / "pipe")
    assert json.loads((tmp_path / "pipe" / "au_adapter.json").read_text())["trained_on_aus"] is trained
    pipe = SynFERPipeline.from_pretrained(tmp_path / "pipe")
    module = SynthesisModule(pipe, dict(steps=2, text_scale=2.0, au_scale=2.0))
    assert module.request_aus is trained
    plan = {"sample_id": ["a", "b"], "target_aus": [[0.0, 5.0, 0.0], [5.0, 0.0, 5.0]], "au_mask": [[True] * 3] * 2,
            "caption": ["a happy face"] * 2, "seed": [3, 3], "target_label": [1, 1]}
    images = module.predict_step(plan, 0)["images"]
    # same seed + caption: only the AU request can tell the two faces apart
    assert torch.allclose(images[0], images[1]) is not trained

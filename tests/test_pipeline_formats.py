"""`stage=pipeline` on every public format as researchers download it: no OpenFace AU csv, no captions jsonl.

One toy export (written without sidecars) is read back through each format's reader; the public-dataset
experiments run with the tiny generator and CPU trainer swapped in. Every step must finish, report included.
"""
from __future__ import annotations

import json

import pytest

import train
from datamodules.toyfaces import ToyFacesConfig
from datamodules.toyfaces_export import export_toyfaces
from tests.conftest import TINY, compose

SIZES = {"train": 64, "val": 16, "test": 24}
# Tiny and fast on top of conftest's TINY: 1-epoch voters (and the self-training teacher) keep every face,
# 32 px generator, small synthetic set (0.5x; the experiments whose own mix reaches student_mix take all of it).
PIPELINE = ("stage=pipeline", "pipeline.feranno.max_epochs=1", "relabel.threshold=0", "pseudolabel.threshold=0",
            "data.image_size=32", "data.num_workers=0", "data.batch_size=32", "generator.model.image_size=32",
            "synthesis.plan.scale=0.5", "mix.scale=0.5", "synthesis.sample.steps=2", "trainer=cpu", "logger=csv")
STEPS = ("teacher", "generator", "synthesize", "synth_eval", "feranno", "relabel", "student", "student_mix")
LOWDATA = ("pseudolabel", "student_selftrain")  # the low-data experiments add the self-training baseline

# (name, overrides): each public format through its data config, and the public-dataset experiments with the
# GPU parts (Stable Diffusion, DDP) replaced by the tiny CPU ones.
RUNS = {
    "ferplus": ["data=ferplus"],
    "toy_lowdata": ["experiment=toy_lowdata", "data.train_limit=48", "pipeline.student_seeds=null"],
    "rafdb_scale": ["experiment=rafdb_scale", "generator=tiny"],
    "affectnet8_scale": ["experiment=affectnet8_scale", "generator=tiny"],
    "fer2013_lowdata_cpu": ["experiment=fer2013_lowdata_cpu", "data.train_limit=48"],
}
# Same format and steps as a run above, so only its plan is checked (each full run costs ~40 s of the suite).
PLANNED = {"fer2013_lowdata": ["experiment=fer2013_lowdata", "generator=tiny", "data.train_limit=48"]}
FORMAT = {"ferplus": "ferplus", "toy_lowdata": "imagefolder", "rafdb_scale": "rafdb",
          "affectnet8_scale": "affectnet", "fer2013_lowdata": "fer2013", "fer2013_lowdata_cpu": "fer2013"}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("downloads")
    result = export_toyfaces(ToyFacesConfig(image_size=32, seed=5), SIZES, out, formats=sorted(set(FORMAT.values())),
                             sidecars="none")
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_pipeline_runs_on_a_download_without_sidecars(export, tmp_path, name):
    base = [o for o in TINY if not o.startswith("data.toy.")]
    run = tmp_path / "run"
    cfg = compose([*base, *RUNS[name], *PIPELINE, f"data.root={export[FORMAT[name]]}"], run)
    assert cfg.data.openface is None and cfg.data.captions is None  # as downloaded
    results = train.run_stage(cfg)
    steps = STEPS + LOWDATA if "lowdata" in name else STEPS
    assert all(results[s] == "ran" for s in steps), results
    text = (run / "report" / "results.md").read_text()
    assert "| teacher |" in text and "| student_mix |" in text and "No AU conditioning" in text
    generator = json.loads((run / "generator" / "metrics.json").read_text())
    assert generator["eval/au_metrics_skipped"] == "no AU labels in the data" and "eval/fer_acc" in generator
    assert json.loads((run / "generator" / "pipeline" / "au_adapter.json").read_text())["trained_on_aus"] is False
    mixed = json.loads((run / "student_mix" / "metrics.json").read_text())
    assert mixed["data/mix/synthetic_size"] == json.loads((run / "synthesize" / "metrics.json").read_text())["images"]
    # both students are tested on the download's real test split, every face of it
    for student in ("student", "student_mix"):
        metrics = json.loads((run / student / "metrics.json").read_text())
        assert metrics["data/test_size"] == export.counts[FORMAT[name]]["test"] and "test/acc" in metrics


@pytest.mark.parametrize("name", sorted(PLANNED))
def test_the_other_experiments_plan_every_step_on_a_download(export, tmp_path, name):
    from lightning_modules.stages.pipeline import _plan

    cfg = compose([*[o for o in TINY if not o.startswith("data.toy.")], *PLANNED[name], *PIPELINE,
                   f"data.root={export[FORMAT[name]]}"], tmp_path / "run")
    assert cfg.data.openface is None and cfg.data.captions is None
    labels = [label for label, _ in _plan(cfg)]
    assert all(s in labels for s in STEPS + LOWDATA), labels

"""The paradigm stages (ssl, fewshot, clip) on a public format as downloaded: FERPlus without AU or caption
sidecars. Real faces only, so clip captions them from their labels and nothing asks for AUs."""
from __future__ import annotations

import json

import pytest

import train
from datamodules.toyfaces import ToyFacesConfig
from datamodules.toyfaces_export import export_toyfaces
from tests.conftest import TINY, compose

DATA = ("data=ferplus", "data.image_size=32", "data.num_workers=0", "data.batch_size=16", "logger=csv")
STAGES = {
    "ssl": ["stage=ssl", "ssl.max_steps=2", "ssl.probe.epochs=2", "ssl.projection_hidden_dim=32",
            "ssl.projection_dim=16"],
    "fewshot": ["stage=fewshot", "fewshot.backbone.checkpoint=random", "fewshot.k_shots=[1]", "fewshot.n_query=1",
                "fewshot.n_way=3", "fewshot.num_episodes=2", "fewshot.linear_probe.steps=5"],
    "clip": ["stage=clip", "clip.train_on=real", "clip.max_steps=2", "clip.batch_size=8",
             "clip.checkpoint_every_n_steps=1"],
}
KEYS = {"ssl": "probe/pretrained/test/acc", "fewshot": "1shot/prototype/acc", "clip": "zeroshot/after/test/acc"}


@pytest.fixture(scope="module")
def ferplus(tmp_path_factory):
    out = tmp_path_factory.mktemp("download")
    export_toyfaces(ToyFacesConfig(image_size=32, seed=5), {"train": 48, "val": 16, "test": 24}, out,
                    formats=["ferplus"], sidecars="none")
    return out / "ferplus"


@pytest.mark.slow
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_paradigm_stage_runs_on_ferplus_without_sidecars(ferplus, tmp_path, stage):
    base = [o for o in TINY if not o.startswith("data.") and not o.startswith("logger=")]
    cfg = compose([*base, *DATA, f"data.root={ferplus}", *STAGES[stage]], tmp_path / "run")
    assert cfg.data.openface is None and cfg.data.captions is None  # as downloaded
    train.run_stage(cfg)
    metrics = json.loads((tmp_path / "run" / stage / "metrics.json").read_text())
    assert KEYS[stage] in metrics and 0.0 <= metrics[KEYS[stage]] <= 1.0
    if stage != "fewshot":
        assert metrics["data/test_size"] == 24  # every face of the download's test split scored

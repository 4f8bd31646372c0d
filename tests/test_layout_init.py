"""Layout initialisation in `stage=synthesize`: which real face each planned face starts from (seeded, per class or
any, used equally often), its settings and errors, its part in the set's fingerprint, and an end-to-end run whose
faces follow the real faces their rows name."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY
from datamodules.batch import FERRecord
from datamodules.errors import DataError
from datamodules.layout_sources import LayoutConfig, LayoutConfigError, LayoutSources, assign_sources, load_faces
from lightning_modules.run.runtime import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")

# a real pool: 3 neutral, 5 happy, 1 sad, 2 unlabelled faces
POOL_LABELS = np.array([0, 1, 1, 0, 2, 1, -1, 1, 0, 1, -1])


def _labels(n: int, classes=(0, 1, 2), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).choice(classes, size=n)


# ------------------------------------------------------------------------------------------- source assignment
@pytest.mark.parametrize("n", [1, 7, 40])
def test_per_class_sources_carry_the_planned_class(n):
    labels = _labels(n)
    src = assign_sources(labels, POOL_LABELS, "per_class", seed=3)
    assert src.shape == (n,) and src.dtype == np.int64
    assert (POOL_LABELS[src] == labels).all()


def test_any_draws_from_every_face_including_unlabelled_ones():
    src = assign_sources(_labels(len(POOL_LABELS)), POOL_LABELS, "any", seed=0)
    assert sorted(src.tolist()) == list(range(len(POOL_LABELS)))  # one pass: each face exactly once


@pytest.mark.parametrize("mode", ["per_class", "any"])
def test_sources_are_seeded_and_reproducible(mode):
    labels = _labels(60)
    a, b = (assign_sources(labels, POOL_LABELS, mode, seed=5) for _ in range(2))
    assert (a == b).all()
    assert (assign_sources(labels, POOL_LABELS, mode, seed=6) != a).any()


@pytest.mark.parametrize("mode", ["per_class", "any"])
def test_rows_keep_their_sources_when_the_plan_grows(mode):
    labels = _labels(90)
    full = assign_sources(labels, POOL_LABELS, mode, seed=1)
    for k in (1, 13, 50):
        assert (assign_sources(labels[:k], POOL_LABELS, mode, seed=1) == full[:k]).all()


@pytest.mark.parametrize("mode, n", [("per_class", 37), ("per_class", 4), ("any", 30), ("any", 5)])
def test_every_face_of_a_group_is_used_floor_or_ceil_times(mode, n):
    """No face is drawn a second time before every face of its group was drawn once."""
    labels = _labels(n)
    src = assign_sources(labels, POOL_LABELS, mode, seed=2)
    groups = np.unique(labels) if mode == "per_class" else [None]
    for c in groups:
        rows = labels == c if c is not None else np.ones(n, bool)
        members = np.flatnonzero(POOL_LABELS == c) if c is not None else np.arange(len(POOL_LABELS))
        uses = np.array([(src[rows] == m).sum() for m in members])
        share = rows.sum() / len(members)
        assert uses.sum() == rows.sum() and set(uses) <= {math.floor(share), math.ceil(share)}, (c, uses)


def test_per_class_without_a_real_face_of_a_planned_class_names_the_key():
    with pytest.raises(LayoutConfigError, match="'surprise'.*no face of that class") as err:
        assign_sources([0, 3], POOL_LABELS, "per_class", seed=0)
    assert err.value.field == "source"
    assert len(assign_sources([0, 3], POOL_LABELS, "any", seed=0)) == 2  # any does not care
    with pytest.raises(LayoutConfigError, match="real train set has none") as err:
        assign_sources([0], [], "any", seed=0)
    assert err.value.field == "enabled"


@pytest.mark.parametrize("kwargs, field", [
    ({"strength": 0.0}, "strength"), ({"strength": -0.2}, "strength"), ({"strength": 1.5}, "strength"),
    ({"strength": float("nan")}, "strength"), ({"strength": "half"}, "strength"), ({"strength": True}, "strength"),
    ({"source": "nearest"}, "source"), ({"seed": -1}, "seed"), ({"seed": 1.5}, "seed"), ({"enabled": "yes"}, "enabled"),
])
def test_bad_settings_name_their_field(kwargs, field):
    with pytest.raises(LayoutConfigError, match=rf"^layout_init\.{field} ") as err:
        LayoutConfig(**{"enabled": True, **kwargs})
    assert err.value.field == field


def test_strength_one_is_allowed_and_strings_are_read_as_numbers():
    assert LayoutConfig(enabled=True, strength=1).strength == 1.0
    assert LayoutConfig(enabled=True, strength="0.25").strength == 0.25


# ------------------------------------------------------------------------------------------- loading and the plan
def _records(n: int = 4) -> list[FERRecord]:
    rng = np.random.default_rng(0)
    return [FERRecord(sample_id=f"real-{i}", image=rng.integers(0, 256, (20, 24, 3), dtype=np.uint8), label=i % 2)
            for i in range(n)]


@pytest.mark.parametrize("color_mode", ["rgb", "gray"])
def test_faces_load_at_the_generators_size_and_colour_mode(color_mode):
    faces = load_faces(_records(), 16, color_mode)
    assert faces.shape == (4, 3, 16, 16) and 0 <= faces.min() < faces.max() <= 1
    same_channels = torch.allclose(faces[:, 0], faces[:, 1], atol=1e-6) and torch.allclose(faces[:, 1], faces[:, 2],
                                                                                          atol=1e-6)
    assert same_channels == (color_mode == "gray")


def test_an_unreadable_source_face_is_a_data_error_naming_it(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"real-x .*broken\.png.*verify_images"):
        load_faces([FERRecord(sample_id="real-x", image=str(bad), label=0)], 16, "rgb")


def test_plan_rows_name_their_layout_source():
    from datamodules import plans as P
    from datamodules.caption_builder import CaptionBuilder
    from datamodules.labels import AUVocabulary

    plan = P.build_plan(P.PlanConfig(size=6, class_distribution=[1, 1, 0, 0, 0, 0, 0, 0]), 8, AUVocabulary(),
                        captioner=CaptionBuilder())
    assert "layout_source" not in plan.rows(range(2))
    pool = _records(4)
    sources = LayoutSources(LayoutConfig(enabled=True), plan.labels, pool).at_resolution(16, "rgb")
    plan.attach_layout(sources)
    rows = plan.rows([4, 1])
    by_id = {r.sample_id: r for r in pool}
    assert [by_id[s].label for s in rows["layout_source"]] == rows["target_label"]
    assert sources.images([4, 1]).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match="cover 2 rows, the plan has 6"):
        plan.attach_layout(LayoutSources(LayoutConfig(enabled=True), plan.labels[:2], pool))


# ------------------------------------------------------------------------------------------- the stage
@pytest.fixture(scope="module")
def generator_dir(tmp_path_factory) -> Path:
    """An untrained tiny generator saved as a pipeline folder, as stage=generator leaves it."""
    import hydra

    from conftest import compose

    directory = tmp_path_factory.mktemp("generator") / "pipeline"
    cfg = compose(TINY, directory.parent)
    torch.manual_seed(0)
    hydra.utils.instantiate(cfg.generator.model, num_classes=8, _convert_="all").save_generator(directory)
    return directory


def _overrides(generator_dir, *layout: str, size: int = 8) -> list[str]:
    return [f"synthesis.generator_path={generator_dir}", f"synthesis.plan.size={size}", "synthesis.plan.scale=null",
            "synthesis.chunk_size=8", "synthesis.batch_size=4", "synthesis.sample.steps=4", "synthesis.progress=false",
            *(f"synthesis.layout_init.{kv}" for kv in layout)]


@pytest.mark.parametrize("layout, key", [
    (["enabled=true", "strength=0"], "synthesis.layout_init.strength"),
    (["enabled=true", "strength=1.01"], "synthesis.layout_init.strength"),
    (["enabled=true", "source=nearest"], "synthesis.layout_init.source"),
    (["enabled=true"], "synthesis.layout_init"),  # + an unknown key
])
def test_stage_config_errors_name_the_key(tiny_cfg, generator_dir, layout, key):
    from lightning_modules.stages.synthesize_stage import checked_plan

    extra = ["+synthesis.layout_init.radius=3"] if len(layout) == 1 else []
    with pytest.raises(ConfigError, match=rf"`{key.replace('.', chr(92) + '.')}`"):
        checked_plan(tiny_cfg(*_overrides(generator_dir, *layout), *extra))


def test_per_class_with_a_class_the_labelled_subset_lacks(tiny_cfg, generator_dir):
    """data.train_limit=3 leaves at most 3 of the 8 planned classes with a real face."""
    from lightning_modules.stages.synthesize_stage import checked_plan

    cfg = tiny_cfg(*_overrides(generator_dir, "enabled=true"), "data.train_limit=3")
    with pytest.raises(ConfigError, match=r"`synthesis\.layout_init\.source`.*no face of that class"):
        checked_plan(cfg)
    plan = checked_plan(tiny_cfg(*_overrides(generator_dir, "enabled=true", "source=any"), "data.train_limit=3"))[0]
    assert plan.layout.summary()["pool_faces"] == 3  # only the labelled subset


def test_no_real_train_set_is_a_data_error_naming_the_switch(tiny_cfg, generator_dir, tmp_path):
    from lightning_modules.stages.synthesize_stage import checked_plan

    empty = tmp_path / "no_faces"
    empty.mkdir()
    data = ["data=imagefolder", f"data.root={empty}", "data.protocol=8"]
    with pytest.raises(DataError, match=r"synthesis\.layout_init\.enabled=true draws its source faces"):
        checked_plan(tiny_cfg(*_overrides(generator_dir, "enabled=true"), *data))
    assert checked_plan(tiny_cfg(*_overrides(generator_dir), *data))[0].layout is None  # off: no real face needed


def test_fingerprint_follows_the_layout_settings_only_when_on(tiny_cfg, generator_dir):
    from lightning_modules.stages.synthesize_stage import checked_plan

    def fingerprint(*layout: str) -> str:
        return checked_plan(tiny_cfg(*_overrides(generator_dir, *layout)))[2]

    off = fingerprint()
    assert fingerprint("strength=0.9", "source=any") == off  # a switched-off step changes no byte
    on = fingerprint("enabled=true")
    assert on != off and fingerprint("enabled=true") == on
    assert len({on, fingerprint("enabled=true", "strength=0.25"), fingerprint("enabled=true", "source=any"),
                fingerprint("enabled=true", "seed=7")}) == 4


@pytest.mark.slow
def test_synthesize_with_layout_init_follows_the_recorded_real_faces(tiny_cfg, generator_dir, caplog):
    """The faces differ from plain synthesis, each row names its source face (of the planned class), each face
    resembles its own source more than any other row's, the manifest records the settings, a rerun skips and a
    changed strength is another set."""
    from datamodules.synthetic import load_synthetic, read_manifest
    from lightning_modules.stages.synthesize_stage import real_train, run_synthesize_stage

    def faces(dataset) -> np.ndarray:
        return np.stack([np.asarray(im, np.float32).reshape(-1) / 255 for im in dataset["image"]])

    plain_cfg = tiny_cfg(*_overrides(generator_dir))
    run_synthesize_stage(plain_cfg)
    out = Path(plain_cfg.paths.run_dir) / "synthesize" / "dataset"
    plain = faces(load_synthetic(out))

    cfg = tiny_cfg(*_overrides(generator_dir, "enabled=true", "strength=0.5"), "synthesis.overwrite=true")
    metrics = run_synthesize_stage(cfg)
    dataset = load_synthetic(out)
    made = faces(dataset)
    assert made.shape == plain.shape and np.abs(made - plain).mean() > 0.05
    real = {r.sample_id: r for r in real_train(cfg).records["train"]}  # the labelled train subset
    sources = list(dataset["layout_source"])
    assert len(set(sources)) == 8 and all(s in real for s in sources)
    assert [real[s].label for s in sources] == list(dataset["target_label"])
    originals = load_faces([real[s] for s in sources], 32, "rgb").permute(0, 2, 3, 1).reshape(8, -1).numpy()
    similarity = np.corrcoef(made, originals)[:8, 8:]
    assert (similarity.argmax(axis=1) == np.arange(8)).all(), similarity.round(2)
    meta = read_manifest(out)["meta"]
    assert meta["layout_init"] == {"strength": 0.5, "source": "per_class", "seed": 0, "pool_faces": 96,
                                   "distinct_sources": 8} == metrics["layout_init"]
    assert json.loads(dataset[0]["guidance"])["layout_init"]["strength"] == 0.5

    with caplog.at_level("INFO", logger="lightning_modules.stages.synthesize_stage"):
        assert run_synthesize_stage(cfg).get("skipped") is True
    assert "already holds all 8 samples" in caplog.text
    with pytest.raises(ConfigError, match=r"synthesis\.overwrite.*another config"):
        run_synthesize_stage(tiny_cfg(*_overrides(generator_dir, "enabled=true", "strength=0.75")))

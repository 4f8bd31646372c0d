"""The real config tree composes, and bad configs stop before any work with a message naming the key."""
import pytest
from omegaconf import OmegaConf

import train
from lightning_modules.run.runtime import ConfigError, config_hash


def test_every_data_config_composes(tiny_cfg):
    for name in ("toy", "affectnet", "affectnet_npy", "rafdb", "fer2013", "ferplus", "imagefolder"):
        cfg = tiny_cfg(f"data={name}")
        assert cfg.data.format == name
        assert cfg.data._target_ == "datamodules.real.RealFERDataModule"


def test_experiment_files_only_override(tiny_cfg):
    base = tiny_cfg()
    quick = tiny_cfg("experiment=toy_quick")
    assert quick.experiment_name == "toy_quick" and base.experiment_name == "default"
    assert set(OmegaConf.to_container(quick.teacher)) == set(OmegaConf.to_container(base.teacher))


def _leaves(cfg, prefix=""):
    out = {}
    for k, v in cfg.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


SG_OFF = {f"synthesis.guidance.{k}": 0.0 for k in ("embedding_scale", "classifier_scale", "au_scale")}


@pytest.mark.parametrize("base", ["toy", "toy_full"])
@pytest.mark.parametrize("row, switched", [
    ("no_au", {"generator.model.au_adapter": False}),
    ("no_sg", SG_OFF),  # synthesis only: the generator (and its hash) stays the full method's
    ("no_relabel", {"relabel.enabled": False}),
])
def test_ablation_experiments_differ_from_their_base_only_in_their_switch(tmp_path, base, row, switched):
    """Each ablation row is its base experiment with one component off (plus its own output folder)."""
    from conftest import compose

    def leaves(name):
        cfg = compose([f"experiment={name}"], tmp_path)
        return _leaves(OmegaConf.to_container(cfg, resolve=False))

    experiment = f"toy_ablation_{row}" if base == "toy" else f"toy_full_{row}"
    full, ablation = leaves(base), leaves(experiment)
    diff = {k: v for k, v in ablation.items() if full.get(k) != v}
    assert diff.pop("experiment_name") == experiment
    assert diff == switched
    assert ablation["generator.guidance.au_scale"] == 0.0  # AU guidance needs the adapter


@pytest.mark.parametrize("overrides,key", [
    (["stage=paint"], "stage"),
    (["teacher.model.backbone=resnet_nonexistent"], "teacher.model.backbone"),
    (["teacher.model.lr=-1"], "teacher.model.lr"),
    (["teacher.model.label_smoothing=1.5"], "teacher.model.label_smoothing"),
    (["teacher.model.pretrained=/nonexistent/weights.safetensors"], "teacher.model.pretrained"),
    (["teacher.max_epochs=0"], "teacher.max_epochs"),
    (["data=fer2013", "data.root=/nonexistent/fer2013"], "data.root"),
    (["data.format=jaffe"], "data.format"),
    (["data.protocol=6"], "data.protocol"),
    (["data.val_fraction=1.5"], "data.val_fraction"),
    (["data.image_size=4"], "data.image_size"),
    (["data.train_resample_size=4"], "data.train_resample_size"),
    (["data.augment.crop_scale=[0.9,0.5]"], "augment.crop_scale"),
    (["data.toy.label_noise=2.0"], "label_noise"),
    *[([f"teacher.name={stage}"], "teacher.name") for stage in ("annotate_aus", "pseudolabel")],
])
def test_bad_config_is_a_named_error_before_work(tiny_cfg, overrides, key, tmp_path):
    cfg = tiny_cfg(*overrides)
    with pytest.raises((ConfigError, ValueError, FileNotFoundError)) as err:
        train.run_stage(cfg)
    assert key in str(err.value)
    # nothing was trained: no checkpoint, no metrics
    assert not list((tmp_path / "run").rglob("*.ckpt")) and not list((tmp_path / "run").rglob("metrics.json"))


def test_config_hash_tracks_relevant_keys(tiny_cfg):
    a = tiny_cfg()
    b = tiny_cfg("student.model.lr=0.5")
    c = tiny_cfg("teacher.model.lr=0.5")
    keys = ["data", "teacher", "trainer", "seed"]
    assert config_hash(a, keys) == config_hash(b, keys)
    assert config_hash(a, keys) != config_hash(c, keys)


def test_config_hash_does_not_depend_on_where_the_run_folder_is(tmp_path):
    from conftest import TINY, compose
    from lightning_modules.run.runtime import location_free

    keys = ["data", "generator", "trainer", "seed"]  # generator.guidance.classifier lies in the run folder
    here, there = compose(TINY, tmp_path / "a"), compose(TINY, tmp_path / "b" / "c")
    assert str(tmp_path / "a") in str(here.generator.guidance.classifier)
    assert config_hash(here, keys) == config_hash(there, keys)
    assert config_hash(here, keys) != config_hash(compose([*TINY, "generator.guidance.classifier=/x.ckpt"],
                                                          tmp_path / "a"), keys)
    # only whole path components are replaced: a sibling folder sharing the prefix is another path
    assert location_free({"p": [str(tmp_path / "a" / "x"), str(tmp_path / "ab")]}, str(tmp_path / "a")) == \
        {"p": ["<run_dir>/x", str(tmp_path / "ab")]}
    assert location_free("relative/run/x", "relative/run") == "<run_dir>/x"


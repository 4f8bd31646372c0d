"""Colour mode: gray datasets (FER2013, FERPlus) reach every model gray, the generator records the colour of its
training faces, synthesis stores its faces in it, and the student's mix converts synthetic faces to the real data's
mode; the generator's resolution against the faces' native size is logged and recorded."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, compose
from datamodules.mix import MixedFERDataModule
from datamodules.real import RealFERDataModule
from datamodules.synthetic import SyntheticFERDataset, load_synthetic, read_manifest, to_pil, write_shard
from datamodules.transforms import AugmentConfig, eval_transform, gray_tensor, to_color_mode, train_transform
from lightning_modules.run.runtime import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")
RNG = np.random.default_rng(0)
COLOURED = Image.fromarray(RNG.integers(0, 255, (40, 40, 3), dtype=np.uint8))


def equal_channels(images: torch.Tensor) -> bool:
    """(…,3,H,W): every pixel has the same value in its three channels."""
    return torch.equal(images[..., 0, :, :], images[..., 1, :, :]) and torch.equal(images[..., 0, :, :],
                                                                                    images[..., 2, :, :])


@pytest.mark.parametrize("make", [lambda mode: eval_transform(32, mode),
                                  lambda mode: train_transform(32, AugmentConfig(color_jitter=0.4), mode)])
def test_gray_transforms_give_equal_channels_rgb_keeps_colour(make):
    torch.manual_seed(0)
    assert equal_channels(make("gray")(COLOURED))
    assert not equal_channels(make("rgb")(COLOURED))


def test_gray_tensor_is_pil_luma():
    images = torch.rand(2, 3, 8, 8)
    gray = gray_tensor(images)
    assert gray.shape == images.shape and equal_channels(gray)
    stored = to_pil(images, "gray")
    assert all(img.mode == "L" for img in stored)
    pil_luma = np.asarray(to_pil(images)[0].convert("L"), dtype=int)
    assert np.abs(np.asarray(stored[0], dtype=int) - pil_luma).max() <= 1
    assert to_color_mode(COLOURED, "gray").mode == "RGB" and equal_channels(
        torch.from_numpy(np.array(to_color_mode(COLOURED, "gray"))).permute(2, 0, 1))
    with pytest.raises(ValueError, match="expected"):
        gray_tensor(torch.rand(3, 8, 8))


@pytest.mark.parametrize("data, mode", [("toy", "rgb"), ("fer2013", "gray"), ("ferplus", "gray"), ("rafdb", "rgb"),
                                        ("affectnet", "rgb"), ("imagefolder", "rgb")])
def test_data_configs_name_their_colour_mode(tmp_path, data, mode):
    base = TINY if data == "toy" else [o for o in TINY if not o.startswith("data.toy.")]
    assert compose([*base, f"data={data}"], tmp_path).data.color_mode == mode


@pytest.mark.parametrize("bad", ["grey", "RGB", ""])
def test_bad_colour_mode_is_a_config_error(tiny_cfg, bad):
    from lightning_modules.stages.classifier_stage import build_datamodule

    with pytest.raises(ValueError, match="data.color_mode must be one of rgb, gray"):
        RealFERDataModule(format="toy", color_mode=bad)
    with pytest.raises(ConfigError, match="data.color_mode") as err:
        build_datamodule(tiny_cfg(f"data.color_mode={bad!r}"))
    assert err.value.key == "data"


def _rgb_set(directory: Path, n: int = 12) -> Path:
    images = torch.rand(n, 3, 32, 32)
    write_shard(directory, "shard-00000", {
        "image": to_pil(images), "sample_id": [f"syn-{i}" for i in range(n)], "seed": list(range(n)),
        "target_label": [i % 8 for i in range(n)], "target_aus": [[0.0] * 12] * n, "au_mask": [[False] * 12] * n,
        "caption": ["a face"] * n, "guidance": ["{}"] * n})
    return directory


def test_an_rgb_generators_faces_reach_a_gray_student_gray(tmp_path, caplog):
    directory = _rgb_set(tmp_path / "rgb")
    rows = load_synthetic(directory)
    assert not equal_channels(SyntheticFERDataset(rows, 32, 8)[0]["image"])
    assert equal_channels(SyntheticFERDataset(rows, 32, 8, color_mode="gray")[0]["image"])
    real = RealFERDataModule(format="toy", toy={"n_train": 24, "n_val": 8, "n_test": 8, "image_size": 32},
                             image_size=32, batch_size=8, color_mode="gray")
    mix = MixedFERDataModule(real, synthetic=str(directory), mode="concat", scale=0.5)
    with caplog.at_level(logging.INFO, logger="datamodules.mix"):
        mix.setup("fit")
    assert "stored rgb; the student gets them gray" in caplog.text
    batches = list(mix.train_dataloader())
    assert sum(mix.is_synthetic(i) for i in range(len(mix.train_dataset))) == 12
    assert all(equal_channels(b["image"]) for b in batches)
    assert equal_channels(next(iter(mix.val_dataloader()))["image"])


def test_the_generator_evaluation_judges_faces_in_the_data_colour():
    from lightning_modules.stages.generator_stage import ColorModeSampler

    class Model:
        vocab = "vocab"

        def sample(self, captions, *args, **kwargs):
            return torch.rand(len(captions), 3, 8, 8)

    assert equal_channels(ColorModeSampler(Model(), "gray").sample(["a", "b"]))
    assert not equal_channels(ColorModeSampler(Model(), "rgb").sample(["a", "b"]))
    assert ColorModeSampler(Model(), "gray").vocab == "vocab"


@pytest.mark.slow
def test_gray_export_to_generator_to_synthesis_to_student(tiny_cfg, tmp_path, caplog):
    """FERPlus as downloaded (48 px gray, no sidecars) -> the generator records gray -> synthesis stores L images ->
    the student's mixed batches have equal channels."""
    from datamodules.toyfaces import ToyFacesConfig
    from datamodules.toyfaces_export import export_toyfaces
    from lightning_modules.stages.classifier_stage import build_student_datamodule
    from lightning_modules.stages.generator_stage import run_generator_stage
    from lightning_modules.stages.synthesize_stage import run_synthesize_stage

    export_toyfaces(ToyFacesConfig(image_size=40, seed=3), {"train": 32, "val": 8, "test": 16}, tmp_path / "export",
                    formats=["ferplus"], sidecars="none")
    data = ["data=ferplus", f"data.root={tmp_path / 'export' / 'ferplus'}", "data.image_size=32",
            "data.num_workers=0"]
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no teacher: the generator evaluation is skipped with a warning
        metrics = run_generator_stage(tiny_cfg("stage=generator", *data, "generator.model.image_size=16"))
    assert "gray faces of native size 48x48, trained at 16x16" in caplog.text
    pipeline = tmp_path / "run" / "generator" / "pipeline"
    recorded = json.loads((pipeline / "training_data.json").read_text())
    assert recorded["color_mode"] == "gray" and recorded["native_size"] == [48, 48]
    assert recorded["generator_image_size"] == 16 and recorded["data_image_size"] == 32
    assert metrics["training_data"] == recorded

    caplog.clear()
    with caplog.at_level(logging.INFO):
        run_synthesize_stage(tiny_cfg("stage=synthesize", *data, f"synthesis.generator_path={pipeline}",
                                      "synthesis.plan.size=8", "synthesis.plan.scale=null", "synthesis.chunk_size=4",
                                      "synthesis.batch_size=4", "synthesis.sample.steps=2",
                                      "synthesis.progress=false"))
    assert "the generator makes gray faces at 16x16, learned from ferplus faces of native size 48x48" in caplog.text
    dataset_dir = tmp_path / "run" / "synthesize" / "dataset"
    meta = read_manifest(dataset_dir)["meta"]
    assert meta["color_mode"] == "gray" and meta["image_size"] == 16
    stored = load_synthetic(dataset_dir)
    assert len(stored) == 8 and all(img.mode == "L" for img in stored["image"])

    student = build_student_datamodule(tiny_cfg("stage=student", *data, "mix.mode=concat", "mix.scale=null",
                                                f"mix.synthetic={dataset_dir}"))
    assert student.num_synthetic == 8
    batches = list(student.train_dataloader())
    assert sum(len(b["sample_id"]) for b in batches) == student.num_real + 8
    assert all(equal_channels(b["image"]) for b in batches)

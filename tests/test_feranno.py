"""FERAnno: the pseudo-label teacher on the generator's own UNet (default design: both branches).

One small random-weight generator pipeline (the tiny architecture at 16 px with narrower blocks) serves every test:
random UNet features with a trained head are enough to check shapes, freezing, determinism, checkpoints, the stage
and that the head learns well above chance on easy toy faces.
"""
import shutil

import lightning as L
import pytest
import torch

from conftest import SMALL_TEXT, SMALL_UNET
from lightning_modules.labeling.feranno import FROZEN_PREFIX, FERAnnoTeacher
from lightning_modules.paradigms.classifier import CLASS_MARKER, FERClassifier, class_path
from lightning_modules.paradigms.teacher import MOVED_CLASSES, classifier_class, load_fer_classifier
from lightning_modules.run.runtime import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")

HEAD = dict(pool_size=2, fusion_dim=32, fusion_heads=4, dropout=0.0)


@pytest.fixture(scope="module")
def pipeline_dir(small_pipeline_dir):
    return small_pipeline_dir


@pytest.fixture(scope="module")
def model(pipeline_dir):
    torch.manual_seed(0)
    return FERAnnoTeacher(generator_path=str(pipeline_dir), **HEAD).eval()


def _images(n=4, size=24, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _batch(n=4, size=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": _images(n, size, seed), "label": torch.randint(0, 8, (n,), generator=g),
            "aus": torch.rand(n, 12, generator=g) * 5, "au_mask": torch.ones(n, 12, dtype=torch.bool),
            "sample_id": [str(i) for i in range(n)]}


# ---------------------------------------------------------------------- forward
def test_forward_shapes_and_one_feature_map_per_hooked_block(model, pipeline_dir):
    x = _images(3, size=24)  # any input size: resized to the pipeline's 16 px
    maps = model.unet_features(x)
    assert len(maps) == len(model.unet.up_blocks) == 3 and model.feature_blocks == [0, 1, 2]
    assert [m.shape[1] for m in maps] == model.feature_channels == [32, 32, 16]
    assert [m.shape[-1] for m in maps] == [8, 16, 16] and all(m.shape[0] == 3 for m in maps)
    with torch.no_grad():
        out = model(x)
    # bidirectional fusion (the default): the mean feature token and the mean attention token, concatenated
    assert out["logits"].shape == (3, 8) and out["features"].shape == (3, 2 * HEAD["fusion_dim"])
    assert model.null_au_tokens is not None  # the pipeline carries the AU adapter: null AU tokens are fed

    two = FERAnnoTeacher(generator_path=str(pipeline_dir), feature_blocks=[0, 2], au_head=True, **HEAD).eval()
    assert [m.shape[1] for m in two.unet_features(x)] == [32, 16]
    with torch.no_grad():
        out = two(x)
    assert out["aus"].shape == (3, 12) and 0 <= float(out["aus"].min()) and float(out["aus"].max()) <= 5
    two.remove_hooks()
    assert all(not block._forward_hooks for block in two.unet.up_blocks)
    with pytest.raises(RuntimeError, match="hooks were removed"):
        two(x)
    with pytest.raises(ValueError, match="feature_blocks"):
        FERAnnoTeacher(generator_path=str(pipeline_dir), feature_blocks=[0, 3], **HEAD)


def test_pipeline_without_au_adapter_uses_text_only(pipeline_dir, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(pipeline_dir, plain)
    for f in plain.glob("au_adapter.*"):
        f.unlink()
    model = FERAnnoTeacher(generator_path=str(plain), **HEAD).eval()
    assert model.null_au_tokens is None
    with torch.no_grad():
        assert model(_images(2))["logits"].shape == (2, 8)


@pytest.mark.parametrize("noise", ["add", "invert"])
def test_label_conditioned_generator_gets_the_null_class(tmp_path, noise):
    """A generator trained with class labels (datasets without AUs) needs class labels in every UNet call; FERAnno
    gives the null class, so features never depend on a label it is meant to predict."""
    from lightning_modules.generator.module import FERGenerator

    torch.manual_seed(0)
    generator = FERGenerator(image_size=16, unet=SMALL_UNET, text_encoder=SMALL_TEXT, ema_decay=None,
                             label_conditioning=True)
    generator.save_generator(tmp_path / "pipe")
    model = FERAnnoTeacher(generator_path=str(tmp_path / "pipe"), noise=noise, **HEAD).eval()
    seen = []
    model.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["class_labels"]),
                                         with_kwargs=True)
    with torch.no_grad():
        assert model(_images(2))["logits"].shape == (2, 8)
    assert seen and all(c.tolist() == [generator.null_class] * 2 for c in seen)


def test_latent_mode_encodes_with_the_frozen_vae(tmp_path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from lightning_modules.generator.conditioning import tiny_text_encoder
    from lightning_modules.generator.pipeline import SynFERPipeline

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=16)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=32,
                                block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                attention_head_dim=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
    text, tokenizer = tiny_text_encoder(**SMALL_TEXT)
    SynFERPipeline(unet=unet, scheduler=DDPMScheduler(), text_encoder=text, tokenizer=tokenizer,
                   vae=vae).save_pretrained(tmp_path / "latent")
    model = FERAnnoTeacher(generator_path=str(tmp_path / "latent"), noise="invert", **HEAD).eval()
    assert model.vae is not None and model.image_size == 16 and model.eval_noise.shape == (1, 4, 8, 8)
    maps = model.unet_features(_images(2, size=20))
    assert [tuple(m.shape[1:]) for m in maps] == [(32, 8, 8), (16, 8, 8)]
    model.train()
    assert not model.vae.training and not any(p.requires_grad for p in model.vae.parameters())


# ---------------------------------------------------------------------- frozen parts
def test_frozen_parts_get_no_gradient_and_stay_in_eval_mode(pipeline_dir):
    model = FERAnnoTeacher(generator_path=str(pipeline_dir), **HEAD)
    model.train()
    assert model.training and model.fusion.training
    assert all(not m.training for m in model.diffusion.modules())
    frozen = list(model.diffusion.parameters())
    assert frozen and not any(p.requires_grad for p in frozen)
    trainable = model.trainable_parameters()
    assert {id(p) for p in trainable}.isdisjoint({id(p) for p in frozen})
    assert sum(p.numel() for p in trainable) < sum(p.numel() for p in frozen)
    batch = _batch()
    loss = model._loss(batch, model(batch["image"]))["total"]
    loss.backward()
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in model.classifier.parameters())
    assert model.proj[0][1].weight.grad.abs().sum() > 0  # gradients reach the projection of the features
    assert model.attention_tokens.proj.weight.grad.abs().sum() > 0  # ... and of the attention maps
    model.eval()
    assert all(not m.training for m in model.modules())


# ---------------------------------------------------------------------- determinism
@pytest.mark.parametrize("noise", ["add", "invert"])
def test_eval_is_deterministic_and_batch_independent(pipeline_dir, noise):
    model = FERAnnoTeacher(generator_path=str(pipeline_dir), noise=noise, **HEAD).eval()
    x = _images(4)
    with torch.no_grad():
        first, second, part = model(x)["logits"], model(x)["logits"], model(x[:2])["logits"]
    assert torch.equal(first, second)
    assert torch.allclose(first[:2], part, atol=1e-5)  # the fixed noise map does not depend on batch position
    model.train()  # training: random noise for "add", the deterministic inversion for "invert"
    a, b = model.unet_features(x)[0], model.unet_features(x)[0]
    assert torch.equal(a, b) == (noise == "invert")


# ---------------------------------------------------------------------- checkpoints
def _fit_one_step(model, tmp_path):
    from torch.utils.data import DataLoader

    batches = DataLoader([_batch(4, seed=i) for i in range(2)], batch_size=None)  # ready-made batches
    trainer = L.Trainer(max_epochs=1, max_steps=1, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, train_dataloaders=batches)
    path = tmp_path / "feranno.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_checkpoint_holds_the_head_only_and_reloads_identically(pipeline_dir, tmp_path):
    model = FERAnnoTeacher(generator_path=str(pipeline_dir), **HEAD)
    path = _fit_one_step(model, tmp_path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and not any(k.startswith(FROZEN_PREFIX) or "unet" in k or "vae" in k or "text_encoder" in k
                            for k in keys)
    assert ckpt[CLASS_MARKER] == "lightning_modules.labeling.feranno.FERAnnoTeacher"
    assert path.stat().st_size < 0.5 * sum(p.numel() * 4 for p in model.diffusion.parameters())
    loaded = load_fer_classifier(path)
    assert isinstance(loaded, FERAnnoTeacher) and not loaded.training
    x = _images(3)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x)["logits"], loaded(x)["logits"])
    # a checkpoint without its head weights fails loudly
    del ckpt["state_dict"]["classifier.weight"]
    torch.save(ckpt, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match="head weights"):
        load_fer_classifier(tmp_path / "broken.ckpt")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_fer_classifier(tmp_path / "missing.ckpt")


def test_generic_loader_reads_timm_checkpoints(tmp_path):
    from lightning_modules.paradigms.student import FERStudent

    student = FERStudent(backbone="resnet18", num_classes=4, channels_last=False).eval()
    ckpt = {"state_dict": student.state_dict(), "hyper_parameters": dict(student.hparams),
            CLASS_MARKER: "lightning_modules.paradigms.student.FERStudent", "pytorch-lightning_version": L.__version__}
    torch.save(ckpt, tmp_path / "student.ckpt")
    del ckpt[CLASS_MARKER]  # written before the marker existed: recognised by its `backbone` hyperparameter
    torch.save(ckpt, tmp_path / "legacy.ckpt")
    x = torch.rand(2, 3, 32, 32)
    for name, cls in (("student.ckpt", FERStudent), ("legacy.ckpt", FERClassifier)):
        loaded = load_fer_classifier(tmp_path / name)
        assert type(loaded) is cls and not loaded.training and loaded.au_head is None
        with torch.no_grad():
            assert torch.allclose(loaded(x)["logits"], student(x)["logits"])


@pytest.mark.parametrize("old, new", sorted(MOVED_CLASSES.items()))
def test_class_markers_written_before_the_subpackages_still_load(old, new):
    cls = classifier_class({CLASS_MARKER: new})
    assert class_path(cls) == new  # the table names where each class lives now
    assert classifier_class({CLASS_MARKER: old}) is cls


def test_pre_move_timm_checkpoint_loads_as_its_class(tmp_path):
    from lightning_modules.paradigms.student import FERStudent

    student = FERStudent(backbone="resnet18", num_classes=4, channels_last=False).eval()
    torch.save({"state_dict": student.state_dict(), "hyper_parameters": dict(student.hparams),
                CLASS_MARKER: "lightning_modules.student.FERStudent", "pytorch-lightning_version": L.__version__},
               tmp_path / "old.ckpt")
    loaded = load_fer_classifier(tmp_path / "old.ckpt")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert type(loaded) is FERStudent and torch.equal(loaded(x)["logits"], student(x)["logits"])
    with pytest.raises(ValueError, match="unknown classifier class 'lightning_modules.nowhere.FERStudent'"):
        classifier_class({CLASS_MARKER: "lightning_modules.nowhere.FERStudent"})


# ---------------------------------------------------------------------- bad input
def test_missing_generator_path_and_bad_arguments(pipeline_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher.model.generator_path"):
        FERAnnoTeacher(generator_path=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="teacher.model.generator_path"):
        FERAnnoTeacher()
    for t in (0, 1000, -3, 2.5):
        with pytest.raises(ValueError, match="timestep"):
            FERAnnoTeacher(generator_path=str(pipeline_dir), timestep=t)
    with pytest.raises(ValueError, match="noise"):
        FERAnnoTeacher(generator_path=str(pipeline_dir), noise="jitter")
    with pytest.raises(ValueError, match="fusion_dim"):
        FERAnnoTeacher(generator_path=str(pipeline_dir), fusion_dim=30, fusion_heads=4)


def test_config_checks_name_the_key(tiny_cfg, tmp_path, pipeline_dir):
    from lightning_modules.stages.classifier_stage import check_classifier_config, output_name

    cfg = tiny_cfg("stage=teacher", "teacher=feranno")
    assert output_name(cfg, "teacher") == "feranno" and output_name(tiny_cfg("stage=teacher"), "teacher") == "teacher"
    with pytest.raises(ConfigError, match="teacher.model.generator_path") as err:
        check_classifier_config(cfg, "teacher")
    assert err.value.key == "teacher.model.generator_path"
    shutil.copytree(pipeline_dir, tmp_path / "run" / "generator" / "pipeline")
    check_classifier_config(cfg, "teacher")
    with pytest.raises(ConfigError, match="1000") as err:
        check_classifier_config(tiny_cfg("stage=teacher", "teacher=feranno", "teacher.model.timestep=1000"), "teacher")
    assert err.value.key == "teacher.model.timestep"
    with pytest.raises(ConfigError) as err:
        check_classifier_config(tiny_cfg("stage=teacher", "teacher=feranno", "teacher.model.feature_blocks=[0,3]"),
                                "teacher")
    assert err.value.key == "teacher.model.feature_blocks"
    with pytest.raises(ConfigError) as err:
        check_classifier_config(tiny_cfg("stage=teacher", "teacher=feranno", "teacher.name=generator"), "teacher")
    assert err.value.key == "teacher.name"


# ---------------------------------------------------------------------- stage + learning
def test_teacher_stage_with_feranno_writes_its_own_folder(tiny_cfg, tmp_path, pipeline_dir):
    from lightning_modules.stages.classifier_stage import build_datamodule, run_classifier_stage

    run = tmp_path / "run"
    shutil.copytree(pipeline_dir, run / "generator" / "pipeline")  # where teacher.model.generator_path points
    cfg = tiny_cfg("stage=teacher", "teacher=feranno", "teacher.model.fusion_dim=32", "teacher.model.pool_size=2")
    metrics = run_classifier_stage(cfg, "teacher")
    out = run / "feranno"
    for name in ("feranno.ckpt", "metrics.json", "config.yaml", "confusion_matrix.png", "stage_done.json"):
        assert (out / name).is_file(), name
    assert not (run / "teacher").exists()
    assert metrics["checkpoint"] == str(out / "feranno.ckpt")
    loaded = load_fer_classifier(out / "feranno.ckpt")
    assert isinstance(loaded, FERAnnoTeacher) and loaded.hparams.generator_path == str(run / "generator" / "pipeline")
    # the saved checkpoint reproduces the reported test accuracy (its eval noise map is fixed)
    data = build_datamodule(cfg)
    data.setup("test")
    with torch.no_grad():
        hits = torch.cat([loaded(b["image"])["logits"].argmax(1) == b["label"] for b in data.test_dataloader()])
    assert len(hits) == 48 and metrics["test/acc"] == pytest.approx(hits.float().mean().item())


def test_feranno_beats_chance_on_toy_faces(pipeline_dir, tmp_path):
    """Random UNet + a trained head on the default design (features + cross-attention maps at t=1, bidirectional
    fusion), easy balanced toy faces (strong expressions, no pose jitter or label noise): measured 42.1 % test
    accuracy here (the single-branch design, features at t=25: 33.8 %, 27-33 % with other seeds; chance 12.5 %)."""
    from datamodules.real import RealFERDataModule

    easy = dict(imbalance_power=0.0, label_noise=0.0, intensity_range=[1.0, 1.0], identity_bias=0.2,
                rotation_deg=0.0, shift_jitter=0.0, scale_jitter=0.0, yaw_jitter=0.0, noise_std=0.0, blur_prob=0.0,
                stray_au_prob=0.0, au_visual_gain=3.0)
    no_aug = dict(hflip=False, crop_scale=[1.0, 1.0], rotation_deg=0, color_jitter=0.0, random_erasing=0.0)
    data = RealFERDataModule(format="toy", image_size=32, batch_size=32, eval_batch_size=128, augment=no_aug,
                             toy=dict(n_train=480, n_val=16, n_test=240, image_size=32, **easy))
    L.seed_everything(0)
    model = FERAnnoTeacher(generator_path=str(pipeline_dir), pool_size=4, fusion_dim=64, dropout=0.0, lr=3e-3)
    trainer = L.Trainer(max_epochs=5, logger=False, enable_checkpointing=False, limit_val_batches=0,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=data)
    result = trainer.test(model, datamodule=data, verbose=False)[0]
    print(f"FERAnno toy test accuracy {result['test/acc']:.3f}, mean class acc {result['test/mean_class_acc']:.3f}")
    assert result["test/acc"] >= 0.2 and result["test/mean_class_acc"] >= 0.18  # chance: 0.125

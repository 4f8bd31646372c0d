"""FERAnno's two branches (decoder features, text cross-attention maps), their fusion and the design switches.

A small random-weight SynFER pipeline (pixel space, AU adapter, cross-attention in one down, the mid and one up
block) is enough: the tests check what the branches read, that probing leaves the UNet's output alone, the switch
table, the config errors and that the fused model trains and reloads from its checkpoint.
"""
import lightning as L
import pytest
import torch

from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from conftest import SMALL_TEXT, SMALL_UNET
from lightning_modules.labeling.feranno import FERAnnoTeacher
from lightning_modules.labeling.feranno_branches import AttentionProbe, BidirectionalFusion
from lightning_modules.paradigms.teacher import load_fer_classifier
from lightning_modules.run.runtime import ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")

HEAD = dict(pool_size=2, fusion_dim=32, fusion_heads=4, dropout=0.0)
D = HEAD["fusion_dim"]


@pytest.fixture(scope="module")
def pipeline_dir(small_pipeline_dir):
    return small_pipeline_dir


@pytest.fixture(scope="module")
def model(pipeline_dir):
    torch.manual_seed(0)
    return FERAnnoTeacher(generator_path=str(pipeline_dir), **HEAD).eval()


def _images(n=3, size=24, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _caption_tokens(model, caption):
    return len(model_tokenizer(model)(caption).input_ids) - 1  # words + end token, start token left out


def model_tokenizer(model):
    from lightning_modules.generator.pipeline import SynFERPipeline

    return SynFERPipeline.from_pretrained(model.hparams.generator_path).tokenizer


# ---------------------------------------------------------------------- what the branches read
def test_default_is_the_papers_design(model, pipeline_dir):
    assert (model.hparams.timestep, model.branches, model.fusion_mode) == (1, ["features", "attention"],
                                                                          "bidirectional")
    assert isinstance(model.fusion, BidirectionalFusion)
    seen = []
    model.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(int(args[1][0])), with_kwargs=True)
    with torch.no_grad():
        model(_images(2))
    assert seen == [1]  # one UNet pass, at t = 1


def test_branch_shapes_and_attention_maps_are_text_probabilities(model):
    x = _images(3)
    read = model.read_unet(x)
    assert [tuple(f.shape) for f in read["features"]] == [(3, 32, 8, 8), (3, 32, 16, 16), (3, 16, 16, 16)]
    names = model.attention_tap.names
    assert len(names) == 4 and all(n.endswith("attn2.processor") for n in names)  # down, up x2, mid
    length = model.caption_states.shape[1]
    # one (N, positions, text tokens) map per probed layer; the cross-attention here runs at 4 x 4
    assert [tuple(m.shape) for m in read["attention"]] == [(3, 16, length)] * 4
    for m in read["attention"]:  # real softmax probabilities over the text tokens
        assert torch.allclose(m.sum(-1), torch.ones(3, 16), atol=1e-5) and float(m.min()) >= 0
    tokens = model.branch_tokens(x)
    n_caption = _caption_tokens(model, model.hparams.caption)
    assert tokens["features"].shape == (3, 3, D) and tokens["attention"].shape == (3, n_caption, D)
    assert model.attention_tokens.token_ids.tolist() == list(range(1, n_caption + 1))
    with torch.no_grad():
        out = model(x)
    assert out["logits"].shape == (3, 8) and out["features"].shape == (3, 2 * D)


def test_attention_branch_sees_the_caption(pipeline_dir):
    x = _images(2)
    maps = {}
    for caption in ("a photo of a happy face", "a photo of a sad face", "a photo of a happy face"):
        torch.manual_seed(0)
        teacher = FERAnnoTeacher(generator_path=str(pipeline_dir), caption=caption, **HEAD).eval()
        maps.setdefault(caption, []).append(torch.stack(teacher.attention_maps(x)))
    happy, sad = maps["a photo of a happy face"], maps["a photo of a sad face"][0]
    assert torch.equal(happy[0], happy[1])  # deterministic for one caption
    assert happy[0].shape == sad.shape and (happy[0] - sad).abs().max() > 1e-3  # the caption changes the maps


def test_probes_leave_the_unet_output_and_the_au_adapter_alone(pipeline_dir):
    teacher = FERAnnoTeacher(generator_path=str(pipeline_dir), **HEAD).eval()
    unet, tap = teacher.unet, teacher.attention_tap
    probed = [unet.attn_processors[n] for n in tap.names]
    assert all(isinstance(p, AttentionProbe) and isinstance(p.inner, IPAdapterAttnProcessor2_0) for p in probed)
    x_t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    steps = torch.ones(2, dtype=torch.long)
    text = teacher.caption_states.expand(2, -1, -1)
    null_au = [teacher.null_au_tokens.expand(2, -1, -1)]
    other_au = [torch.randn_like(null_au[0])]
    with torch.no_grad():
        probed_out = unet(x_t, steps, encoder_hidden_states=(text, null_au), return_dict=False)[0]
        au_out = unet(x_t, steps, encoder_hidden_states=(text, other_au), return_dict=False)[0]
    assert (probed_out - au_out).abs().max() > 1e-4  # the AU tokens still reach the UNet through the probes
    teacher.remove_hooks()
    assert all(isinstance(unet.attn_processors[n], IPAdapterAttnProcessor2_0) for n in tap.names)
    with torch.no_grad():
        plain_out = unet(x_t, steps, encoder_hidden_states=(text, null_au), return_dict=False)[0]
    assert torch.equal(probed_out, plain_out)
    with pytest.raises(RuntimeError, match="hooks were removed"):
        teacher(_images(1))


# ---------------------------------------------------------------------- switches
@pytest.mark.parametrize("branches,fusion,width,n_tokens", [
    (["features"], "self", D, 1 + 3),              # the single-branch FERAnno: [CLS] + one token per scale
    (["attention"], "self", D, None),
    (["features"], "concat", D, None),
    (["attention"], "concat", D, None),
    (["features", "attention"], "concat", 2 * D, None),
    (["features", "attention"], "self", D, None),
    (["features", "attention"], "bidirectional", 2 * D, None),
])
def test_switch_table(pipeline_dir, branches, fusion, width, n_tokens):
    teacher = FERAnnoTeacher(generator_path=str(pipeline_dir), branches=branches, fusion=fusion, **HEAD).eval()
    x = _images(2)
    with torch.no_grad():
        out = teacher(x)
    assert out["logits"].shape == (2, 8) and out["features"].shape == (2, width)
    assert set(teacher.branch_tokens(x)) == set(branches)
    probes = [p for p in teacher.unet.attn_processors.values() if isinstance(p, AttentionProbe)]
    assert bool(probes) == ("attention" in branches)  # the attention branch off: the UNet is not touched
    assert hasattr(teacher, "proj") == ("features" in branches)
    assert hasattr(teacher, "cls_token") == (fusion == "self")
    if "features" not in branches:
        with pytest.raises(RuntimeError, match="features branch is off"):
            teacher.unet_features(x)
    if "attention" not in branches:
        with pytest.raises(RuntimeError, match="attention branch is off"):
            teacher.attention_maps(x)
    if n_tokens is not None:
        seen = []
        teacher.fusion.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[1]))
        with torch.no_grad():
            teacher(x)
        assert seen == [n_tokens]


def test_attention_layers_choose_the_probed_layers(pipeline_dir):
    teacher = FERAnnoTeacher(generator_path=str(pipeline_dir), attention_layers=["up_blocks"], **HEAD).eval()
    assert [n.split(".")[0] for n in teacher.attention_tap.names] == ["up_blocks", "up_blocks"]
    assert len(teacher.attention_maps(_images(2))) == 2
    others = [p for n, p in teacher.unet.attn_processors.items() if not n.startswith("up_blocks")]
    assert not any(isinstance(p, AttentionProbe) for p in others)


@pytest.mark.parametrize("overrides,key", [
    (dict(branches="features"), "branches"),
    (dict(branches=[]), "branches"),
    (dict(branches=["features", "attn"]), "branches"),
    (dict(branches=["features", "features"]), "branches"),
    (dict(fusion="sum"), "fusion"),
    (dict(branches=["features"], fusion="bidirectional"), "fusion"),
    (dict(attention_layers="up_blocks"), "attention_layers"),
    (dict(attention_layers=[""]), "attention_layers"),
    (dict(attention_layers=["decoder"]), "attention_layers"),  # matches no attn2 layer of this UNet
])
def test_bad_design_values_name_the_key(pipeline_dir, overrides, key):
    with pytest.raises(ConfigError, match=key) as err:
        FERAnnoTeacher(generator_path=str(pipeline_dir), **{**HEAD, **overrides})
    assert err.value.key == f"teacher.model.{key}"


@pytest.mark.parametrize("override,key", [
    ("teacher.model.branches=[features,faces]", "teacher.model.branches"),
    ("teacher.model.fusion=bidirectional teacher.model.branches=[attention]", "teacher.model.fusion"),
    ("teacher.model.attention_layers=up_blocks", "teacher.model.attention_layers"),
])
def test_preflight_checks_the_design(tiny_cfg, tmp_path, pipeline_dir, override, key):
    import shutil

    from lightning_modules.stages.classifier_stage import check_classifier_config

    shutil.copytree(pipeline_dir, tmp_path / "run" / "generator" / "pipeline")
    check_classifier_config(tiny_cfg("stage=teacher", "teacher=feranno"), "teacher")  # the shipped config is valid
    with pytest.raises(ConfigError) as err:
        check_classifier_config(tiny_cfg("stage=teacher", "teacher=feranno", *override.split()), "teacher")
    assert err.value.key == key


def test_stage_reports_the_models_own_key(tiny_cfg, tmp_path, pipeline_dir):
    """Values only the loaded UNet can check (which attn2 layers exist) fail at model build, naming their key."""
    import shutil
    from types import SimpleNamespace

    from lightning_modules.stages.classifier_stage import build_classifier

    shutil.copytree(pipeline_dir, tmp_path / "run" / "generator" / "pipeline")
    cfg = tiny_cfg("stage=teacher", "teacher=feranno", "teacher.model.attention_layers=[decoder]")
    data = SimpleNamespace(num_classes=8, vocab=list(range(12)), class_names=None)
    with pytest.raises(ConfigError, match="decoder") as err:
        build_classifier(cfg, "teacher", data)
    assert err.value.key == "teacher.model.attention_layers"


# ---------------------------------------------------------------------- training + checkpoints
def _fit(model, tmp_path, steps, batches):
    from torch.utils.data import DataLoader

    trainer = L.Trainer(max_epochs=-1, max_steps=steps, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(model, train_dataloaders=DataLoader(batches, batch_size=None))
    path = tmp_path / "feranno.ckpt"
    trainer.save_checkpoint(path)
    return path


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": _images(n, seed=seed), "label": torch.arange(n) % 8, "aus": torch.rand(n, 12, generator=g) * 5,
            "au_mask": torch.ones(n, 12, dtype=torch.bool), "sample_id": [str(i) for i in range(n)]}


@pytest.mark.slow
def test_fused_model_trains_and_reloads_from_its_checkpoint(pipeline_dir, tmp_path):
    L.seed_everything(0)
    model = FERAnnoTeacher(generator_path=str(pipeline_dir), lr=1e-2, **HEAD)
    batch = _batch()
    model.eval()
    with torch.no_grad():
        before = model._loss(batch, model(batch["image"]))["cls"].item()
    path = _fit(model, tmp_path, steps=40, batches=[batch])  # one fixed batch: the head must fit it
    model.eval()
    with torch.no_grad():
        after = model._loss(batch, model(batch["image"]))["cls"].item()
    assert after < 0.5 * before
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert any(k.startswith("attention_tokens.") for k in ckpt["state_dict"])
    assert not any(k.startswith("diffusion.") for k in ckpt["state_dict"])  # probes live in the frozen UNet
    loaded = load_fer_classifier(path)
    assert loaded.branches == ["features", "attention"] and loaded.fusion_mode == "bidirectional"
    with torch.no_grad():
        assert torch.equal(model(batch["image"])["logits"], loaded(batch["image"])["logits"])


def test_checkpoint_from_before_the_branches_loads_as_single_branch(pipeline_dir, tmp_path):
    """Checkpoints written before ``branches``/``fusion`` existed hold the single-branch head."""
    L.seed_everything(0)
    model = FERAnnoTeacher(generator_path=str(pipeline_dir), timestep=25, branches=["features"], fusion="self",
                           **HEAD)
    path = _fit(model, tmp_path, steps=1, batches=[_batch(4)])
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    for name in ("branches", "fusion", "attention_layers"):
        del ckpt["hyper_parameters"][name]
    torch.save(ckpt, tmp_path / "legacy.ckpt")
    loaded = load_fer_classifier(tmp_path / "legacy.ckpt")
    assert loaded.branches == ["features"] and loaded.fusion_mode == "self" and loaded.hparams.timestep == 25
    model.eval()
    x = _images(2)
    with torch.no_grad():
        assert torch.equal(model(x)["logits"], loaded(x)["logits"])

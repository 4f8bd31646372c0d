"""The class-label conditioning path of the generator: class embedding, label dropout, label CFG, save/load,
synthesis, and bit-identical sampling when it is off."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.generator.components import add_class_embedding, build_tiny, null_class_id
from lightning_modules.generator.conditioning import class_conditions
from lightning_modules.generator.module import FERGenerator
from lightning_modules.generator.pipeline import SynFERPipeline, label_guided_noise

SMALL = dict(unet=dict(block_out_channels=[8, 16], layers_per_block=1, attention_head_dim=4, norm_num_groups=4,
                       down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                       up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"]),
             text_encoder=dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_length=16),
             image_size=16, ema_decay=None)
CAPTIONS = ["a happy face", "a sad face", "a face"]


def _generator(label_conditioning=True, seed=0, **kw) -> FERGenerator:
    torch.manual_seed(seed)
    gen = FERGenerator(label_conditioning=label_conditioning, num_classes=4, **{**SMALL, **kw})
    if label_conditioning:  # a seeded embedding: the same rows whatever the default init
        with torch.no_grad():
            gen.unet.class_embedding.weight.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
    return gen


def _batch(n=6):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, "label": torch.tensor([0, 1, 2, 3, -1, 1])[:n],
            "aus": torch.rand(n, 12, generator=g) * 5, "au_mask": torch.ones(n, 12, dtype=torch.bool),
            "caption": [""] * n}


def test_class_embedding_shapes_and_training_gradient():
    gen = _generator(label_conditioning=True, seed=1)
    assert gen.null_class == 4 and gen.unet.config.num_class_embeds == 5
    assert gen.unet.class_embedding.weight.shape == (5, gen.unet.time_embedding.linear_2.out_features)
    # the tiny UNet trains from scratch: N(0, 1) rows on the time embedding's scale; zeros on request
    fresh = FERGenerator(label_conditioning=True, num_classes=4, **SMALL).unet.class_embedding.weight
    assert 0.5 < float(fresh.std()) < 1.5 and fresh.mean().abs() < 0.3
    zeros = FERGenerator(label_conditioning=True, num_classes=4, label_embedding_init="zeros", **SMALL)
    assert not zeros.unet.class_embedding.weight.any()
    with pytest.raises(ValueError, match="label_embedding_init"):
        FERGenerator(label_conditioning=True, label_embedding_init="ones", **SMALL)
    loss = gen.diffusion_loss(_batch(), train=True)
    loss.backward()
    grad = gen.unet.class_embedding.weight.grad
    assert torch.isfinite(loss) and grad is not None and grad[:4].abs().sum() > 0
    images = gen.sample(CAPTIONS, seeds=[0, 1, 2], class_labels=torch.tensor([0, 3, -1]), steps=2)
    assert images.shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="already has a class embedding"):
        add_class_embedding(gen.unet, 5)
    with pytest.raises(ValueError, match="label_dropout"):
        FERGenerator(label_conditioning=True, label_dropout=1.0, **SMALL)


@pytest.mark.parametrize("dropout, expected_null", [(0.0, 0.0), (0.25, 0.25), (0.6, 0.6)])
def test_label_dropout_to_the_null_class(dropout, expected_null):
    labels = torch.arange(4000) % 7
    classes = class_conditions(labels, 7, dropout, torch.Generator().manual_seed(0))
    null = classes == 7
    assert null.float().mean().item() == pytest.approx(expected_null, abs=0.025)
    assert torch.equal(classes[~null], labels[~null])  # kept labels are unchanged
    again = class_conditions(labels, 7, dropout, torch.Generator().manual_seed(0))
    assert torch.equal(classes, again)


def test_unknown_labels_are_the_null_class_and_out_of_range_is_an_error():
    assert class_conditions(torch.tensor([-1, 0, 6]), 7).tolist() == [7, 0, 6]
    with pytest.raises(ValueError, match="must be < 7"):
        class_conditions(torch.tensor([0, 7]), 7)


def test_label_guided_noise_nests_outside_text():
    g = torch.Generator().manual_seed(0)
    null, label, text = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    s = 2.5
    guided = null + s * (text - null)  # text CFG with the label in the conditional pass
    assert torch.equal(label_guided_noise(guided, label, null, s, s), guided)  # equal scales: joint CFG
    # label_scale = 1: no label guidance, the text guided against the same label
    assert torch.allclose(label_guided_noise(guided, label, null, 1.0, s), label + s * (text - label), atol=1e-6)
    assert torch.allclose(label_guided_noise(guided, label, null, 4.0, s),
                          null + 4.0 * (label - null) + s * (text - label), atol=1e-5)


def _pipe(gen: FERGenerator) -> SynFERPipeline:
    return gen.pipeline()


def _run(pipe, classes=None, **kw):
    settings = dict(seeds=[5, 6, 7], num_inference_steps=3, progress=False, text_scale=2.0, au_scale=1.0)
    return pipe(CAPTIONS, class_labels=classes, **{**settings, **kw}).images


def test_label_scale_one_is_text_guidance_at_a_fixed_label():
    gen = _generator()
    pipe = _pipe(gen)
    classes = torch.tensor([1, 1, 1])
    tested = _run(pipe, classes, label_scale=1.0)
    # reference: plain text CFG (label_scale = text_scale) whose unconditional pass also carries class 1
    forward = pipe.unet.forward

    def null_is_class_1(sample, t, encoder_hidden_states=None, class_labels=None, **kw):
        return forward(sample, t, encoder_hidden_states=encoder_hidden_states,
                       class_labels=torch.where(class_labels == 4, 1, class_labels), **kw)

    pipe.unet.forward = null_is_class_1
    try:
        reference = _run(pipe, classes, label_scale=2.0)
    finally:
        del pipe.unet.forward
    assert torch.allclose(tested, reference, atol=1e-5)
    assert not torch.allclose(_run(pipe, classes, label_scale=4.0), tested, atol=1e-3)  # label guidance acts


def test_passes_per_step_and_class_validation():
    gen = _generator()
    pipe = _pipe(gen)
    sizes = []
    hook = pipe.unet.register_forward_hook(lambda m, args, out: sizes.append(args[0].shape[0]))
    try:
        _run(pipe, torch.tensor([0, 1, 2]))                      # label_scale = text_scale: 2 passes
        _run(pipe, torch.tensor([0, 1, 2]), label_scale=3.0)     # + the label pass
        _run(pipe, None, label_scale=3.0)                        # no label asked: nothing to guide
    finally:
        hook.remove()
    assert sizes == [6] * 3 + [9] * 3 + [6] * 3
    assert not torch.allclose(_run(pipe, torch.tensor([0, 0, 0])), _run(pipe, torch.tensor([3, 3, 3])), atol=1e-3)
    for bad, match in ((torch.tensor([0, 1]), "shape"), (torch.tensor([0, 1, 5]), "in \\[0, 4\\]")):
        with pytest.raises(ValueError, match=match):
            _run(pipe, bad)
    with pytest.raises(ValueError, match="label_scale must be >= 0"):
        _run(pipe, torch.tensor([0, 1, 2]), label_scale=-1.0)
    plain = _pipe(_generator(label_conditioning=False))
    assert plain.null_class is None
    with pytest.raises(ValueError, match="no class embedding"):
        _run(plain, torch.tensor([0, 1, 2]))


def test_save_load_round_trip_keeps_the_class_embedding(tmp_path):
    gen = _generator(aus=[1, 2, 4])
    before = gen.sample(CAPTIONS, seeds=[1, 2, 3], class_labels=torch.tensor([2, 0, -1]), steps=3, label_scale=3.0)
    classes = torch.tensor([2, 0, 4])  # the pipeline takes the null id itself
    gen.save_generator(tmp_path / "pipe")
    pipe = SynFERPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.null_class == 4 and pipe.has_au_adapter
    assert torch.equal(pipe.unet.class_embedding.weight, gen.unet.class_embedding.weight)
    after = pipe(CAPTIONS, seeds=[1, 2, 3], class_labels=classes, num_inference_steps=3, text_scale=2.0,
                 au_scale=2.0, label_scale=3.0, progress=False).images
    assert torch.allclose(before, after, atol=1e-6)


def test_synthesis_uses_the_planned_label_as_class_condition():
    from lightning_modules.synthesis.writer import SynthesisModule

    gen = _generator(aus=[1, 2, 4])
    batch = {"sample_id": ["a", "b"], "target_aus": [[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]],
             "au_mask": [[True] * 3, [True] * 3], "caption": ["a happy face", "a sad face"], "seed": [3, 4],
             "target_label": [1, 2]}
    module = SynthesisModule(gen.pipeline(), dict(steps=2, text_scale=2.0, au_scale=2.0, label_scale=3.0))
    images = module.predict_step(batch, 0)["images"]
    expected = gen.sample(batch["caption"], torch.tensor(batch["target_aus"]), torch.tensor(batch["au_mask"]),
                          seeds=[3, 4], class_labels=torch.tensor([1, 2]), steps=2, label_scale=3.0)
    assert torch.allclose(images, expected, atol=1e-6)
    # a pipeline without a class embedding is called as before (no class labels, the label scale dropped)
    plain = _generator(label_conditioning=False, aus=[1, 2, 4])
    module = SynthesisModule(plain.pipeline(), dict(steps=2, text_scale=2.0, au_scale=2.0, label_scale=3.0))
    assert module.predict_step(batch, 0)["images"].shape == (2, 3, 16, 16)


# Sampled from FERGenerator at commit a519ee7 (before the label path existed), same seeds and settings.
GOLDEN = {True: (713.8888651430607, [0.34812140464782715, 0.22198864817619324, 1.0]),
          False: (712.4626282155514, [0.31956660747528076, 0.1802867352962494, 1.0])}


@pytest.mark.parametrize("au_adapter", [True, False])
def test_label_conditioning_off_samples_bit_identically_to_before(au_adapter):
    torch.manual_seed(0)
    gen = FERGenerator(image_size=16, au_adapter=au_adapter, ema_decay=None, label_conditioning=False,
                       **{k: v for k, v in SMALL.items() if k not in ("image_size", "ema_decay")})
    assert gen.unet.class_embedding is None and gen.null_class is None
    aus = torch.linspace(0, 5, 2 * 12).view(2, 12)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :6] = False
    x = gen.sample(["a happy face", "a sad face"], aus, mask, seeds=[3, 4], steps=3, text_scale=2.0, au_scale=3.0,
                   class_labels=torch.tensor([1, 2]))  # ignored without a class embedding
    total, pixel = GOLDEN[au_adapter]
    assert x.double().sum().item() == pytest.approx(total, rel=1e-6)
    assert x[0, :, 5, 7].tolist() == pytest.approx(pixel, abs=1e-6)


def test_null_class_id_of_other_class_embeddings():
    parts = build_tiny(16, SMALL["unet"], SMALL["text_encoder"])
    assert null_class_id(parts.unet) is None
    add_class_embedding(parts.unet, 9)
    assert null_class_id(parts.unet) == 8


class _Guide(torch.nn.Module):
    """A differentiable stand-in FER classifier: class scores from the mean colour."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)))

    def forward(self, images):
        return {"logits": images.mean(dim=(2, 3)) @ self.w}


def test_semantic_guidance_and_layout_init_take_the_class_condition():
    from lightning_modules.guidance.semantic import SemanticGuidance

    pipe = _pipe(_generator())
    classes = torch.tensor([0, 1, 2])
    plain = _run(pipe, classes, label_scale=3.0)
    sg = SemanticGuidance(embedding_scale=1.0, classifier_scale=1.0, window=(0.0, 1.0))
    guided = _run(pipe, classes, label_scale=3.0, semantic_guidance=sg, guide=_Guide(), labels=classes)
    assert guided.shape == plain.shape and not torch.allclose(guided, plain, atol=1e-4)
    init = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    laid_out = _run(pipe, classes, init_images=init, init_strength=0.5)
    assert laid_out.shape == plain.shape


def test_lora_fine_tune_trains_and_saves_the_class_embedding(tmp_path):
    from tests.tiny_sd import save_tiny_sd

    sd = save_tiny_sd(tmp_path / "sd")
    gen = FERGenerator(backbone="pretrained", pretrained_path=str(sd), image_size=32, finetune="lora", lora_rank=2,
                       label_conditioning=True, num_classes=4, ema_decay=None, frozen_dtype=None)
    assert gen.unet.class_embedding.weight.requires_grad
    assert not gen.unet.class_embedding.weight.any()  # a pretrained UNet starts out exactly as it was
    assert not gen.unet.conv_in.weight.requires_grad  # the base UNet stays frozen
    with torch.no_grad():
        gen.unet.class_embedding.weight.normal_()
    before = gen.sample(CAPTIONS, seeds=[1, 2, 3], class_labels=torch.tensor([0, 1, 3]), steps=2, label_scale=3.0)
    gen.save_generator(tmp_path / "pipe")
    pipe = SynFERPipeline.from_pretrained(tmp_path / "pipe")
    assert pipe.null_class == 4
    assert torch.equal(pipe.unet.class_embedding.weight, gen.unet.class_embedding.weight)
    after = pipe(CAPTIONS, seeds=[1, 2, 3], class_labels=torch.tensor([0, 1, 3]), num_inference_steps=2,
                 text_scale=gen.sample_settings["text_scale"], au_scale=gen.sample_settings["au_scale"],
                 label_scale=3.0, progress=False).images
    assert torch.allclose(before, after, atol=1e-5)

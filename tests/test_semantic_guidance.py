"""Semantic guidance and layout initialisation in the sampler (guidance/sampling.py + SynFERPipeline).

A fixed tiny random pixel-space pipeline and a fixed tiny random classifier: the checks are about the direction
and size of the updates, which must hold for any model."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lightning_modules.guidance.sampling import ClassifierGuide, encode_images, invert_to
from lightning_modules.guidance.semantic import SemanticGuidance
from tests.test_generator_pipeline import _add_au_adapter, pixel_pipe  # noqa: F401  (pixel_pipe: a fixture)

pytestmark = pytest.mark.usefixtures("single_thread")

CAPTIONS = ["a happy face", "a sad face", "a photo of a person", "an angry face"]
SEEDS = [3, 4, 5, 6]
NUM_CLASSES, NUM_AUS = 4, 5  # the AU adapter of _add_au_adapter has 5 AUs


class TinyClassifier(nn.Module):
    """Expression logits + AU intensities from images in [-1,1] (the teacher's interface)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(2),
                                  nn.Flatten())
        self.logits = nn.Linear(64, NUM_CLASSES)
        self.aus = nn.Linear(64, NUM_AUS)

    def forward(self, x):
        h = self.body(x)
        return {"logits": self.logits(h), "aus": torch.sigmoid(self.aus(h)) * 5}


@pytest.fixture(scope="module")
def pipe(pixel_pipe):  # noqa: F811
    """The tiny 16 px pixel-space pipeline of test_generator_pipeline.py."""
    return pixel_pipe


@pytest.fixture(scope="module")
def guide():
    torch.manual_seed(2)
    return ClassifierGuide(TinyClassifier(), image_size=12)


def _sample(pipe, **kw):
    kw.setdefault("num_inference_steps", 10)
    return pipe(CAPTIONS, seeds=SEEDS, progress=False, **kw).images


def _target_prob(guide, images, labels):
    with torch.no_grad():
        return guide(images)["logits"].softmax(-1).gather(1, labels[:, None]).squeeze(1)


def _least_likely(guide, images):
    with torch.no_grad():
        return guide(images)["logits"].argmin(-1)


def test_all_scales_zero_is_bit_identical_to_plain_sampling(pipe, guide):
    plain = _sample(pipe, text_scale=2.0)
    labels = torch.zeros(len(CAPTIONS), dtype=torch.long)
    off = _sample(pipe, text_scale=2.0, semantic_guidance=SemanticGuidance(), guide=guide, labels=labels)
    assert torch.equal(plain, off)
    assert torch.equal(plain, _sample(pipe, text_scale=2.0, semantic_guidance=None, guide=guide))


def test_embedding_guidance_raises_target_probability(pipe, guide):
    plain = _sample(pipe, text_scale=2.0)
    labels = _least_likely(guide, plain)  # the hardest target for every sample
    before = _target_prob(guide, plain, labels)
    sg = SemanticGuidance(embedding_scale=2.0, window=(0.0, 1.0))
    guided = _sample(pipe, text_scale=2.0, semantic_guidance=sg, guide=guide, labels=labels)
    after = _target_prob(guide, guided, labels)
    assert not torch.equal(plain, guided)
    assert (after > before).all(), (before, after)
    # a larger step moves further (the normalised step has size λ per token)
    stronger = _sample(pipe, text_scale=2.0, semantic_guidance=SemanticGuidance(embedding_scale=6.0, window=(0.0, 1.0)),
                       guide=guide, labels=labels)
    assert _target_prob(guide, stronger, labels).mean() > after.mean()


def test_guidance_acts_only_inside_the_window(pipe, guide):
    plain = _sample(pipe, text_scale=2.0, num_inference_steps=5)
    labels = _least_likely(guide, plain)
    seen = []

    def record(i, t, latents):
        seen.append(latents.clone())

    plain_traj = []
    _sample(pipe, text_scale=2.0, num_inference_steps=5, step_callback=lambda i, t, x: plain_traj.append(x.clone()))
    _sample(pipe, text_scale=2.0, num_inference_steps=5, step_callback=record, guide=guide, labels=labels,
            semantic_guidance=SemanticGuidance(embedding_scale=3.0, window=(0.6, 1.0)))
    # steps 0..2 end at 20/40/60 % of the trajectory: untouched; steps 3, 4 are guided
    for i in range(3):
        assert torch.equal(seen[i], plain_traj[i])
    assert not torch.equal(seen[3], plain_traj[3])


def test_classifier_guidance_on_pixels_raises_target_probability(pipe, guide):
    plain = _sample(pipe)
    labels = _least_likely(guide, plain)
    before = _target_prob(guide, plain, labels)
    guided = _sample(pipe, semantic_guidance=SemanticGuidance(classifier_scale=5.0, window=(0.0, 1.0)), guide=guide,
                     labels=labels)
    assert (_target_prob(guide, guided, labels) > before).all()


def test_au_guidance_moves_detected_aus_toward_request(pipe, guide):
    _add_au_adapter(pipe)
    try:
        aus = torch.tensor([[5.0] * 3 + [0.0] * 2, [0.0] * 3 + [5.0] * 2] * 2)
        mask = torch.ones_like(aus, dtype=torch.bool)

        def au_error(images):
            with torch.no_grad():
                return ((guide(images)["aus"] - aus) ** 2).mean(-1)

        plain = _sample(pipe, aus=aus, au_mask=mask)
        guided = _sample(pipe, aus=aus, au_mask=mask, guide=guide,
                         semantic_guidance=SemanticGuidance(au_scale=2.0, window=(0.0, 1.0)))
        assert (au_error(guided) < au_error(plain)).all()
    finally:
        from lightning_modules.generator.conditioning import plain_attention_processors

        pipe.unet.set_attn_processor(plain_attention_processors(pipe.unet))
        pipe.set_au_adapter(None, None)


def test_guidance_argument_errors(pipe, guide):
    labels = torch.zeros(len(CAPTIONS), dtype=torch.long)
    sg = SemanticGuidance(embedding_scale=1.0)
    with pytest.raises(ValueError, match="guidance classifier"):
        _sample(pipe, semantic_guidance=sg, labels=labels)
    with pytest.raises(ValueError, match="target labels"):
        _sample(pipe, semantic_guidance=sg, guide=guide)
    with pytest.raises(ValueError, match="labels must have shape"):
        _sample(pipe, semantic_guidance=sg, guide=guide, labels=labels[:2])
    with pytest.raises(ValueError, match="needs the requested AUs"):
        _sample(pipe, semantic_guidance=SemanticGuidance(au_scale=1.0), guide=guide)
    with pytest.raises(ValueError, match="window"):
        SemanticGuidance(embedding_scale=1.0, window=(0.8, 0.5))
    with pytest.raises(ValueError, match="au_scale must be >= 0"):
        SemanticGuidance(au_scale=-1.0)


# ---------------------------------------------------------------------- layout initialisation
def _faces(n=len(CAPTIONS)):
    g = torch.Generator().manual_seed(7)
    base = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(base, size=(16, 16), mode="bilinear", align_corners=False)


def test_layout_init_keeps_the_source_layout(pipe):
    faces = _faces()
    plain = _sample(pipe, num_inference_steps=10)
    init = _sample(pipe, num_inference_steps=10, init_images=faces, init_strength=0.5)
    err_plain = (plain - faces).abs().mean()
    err_init = (init - faces).abs().mean()
    assert err_init < 0.5 * err_plain, (err_init, err_plain)
    # strength 0 is plain sampling, bit for bit
    assert torch.equal(plain, _sample(pipe, num_inference_steps=10, init_images=faces, init_strength=0.0))
    # deterministic
    assert torch.equal(init, _sample(pipe, num_inference_steps=10, init_images=faces, init_strength=0.5))


def test_inversion_of_one_step_is_the_ddim_forward_formula(pipe):
    faces = _faces(2)
    state = pipe._null_state(2)
    pipe.scheduler.set_timesteps(10)
    t = pipe.scheduler.timesteps[-1:]  # one step from the clean image to the first grid point
    x = invert_to(pipe, faces, t, state)
    x0 = encode_images(pipe, faces)
    with torch.no_grad():
        eps = pipe.unet(x0, 0, encoder_hidden_states=state).sample
    a = pipe.scheduler.alphas_cumprod[int(t[0])]
    assert torch.allclose(x, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-6)


def test_layout_init_errors(pipe):
    with pytest.raises(ValueError, match="init_strength"):
        _sample(pipe, init_images=_faces(), init_strength=1.5)
    with pytest.raises(ValueError, match="init_images must have shape"):
        _sample(pipe, init_images=_faces(2), init_strength=0.5)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        _sample(pipe, init_images=_faces() * 3, init_strength=0.5)

"""Guidance math (lightning_modules/guidance/semantic.py): which UNet passes a step needs, how they combine, x̂0."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from lightning_modules.guidance.semantic import GuidancePlan, combine_guidance, predict_x0


# ---------------------------------------------------------------------- GuidancePlan.passes
@pytest.mark.parametrize("text_scale, au_scale, use_aus, expected", [
    (1.0, 1.0, False, ("text",)),                 # no AUs, no guidance: one conditional pass
    (1.0, 7.0, False, ("text",)),                 # au_scale is irrelevant without AUs
    (3.0, 1.0, False, ("null", "text")),          # no AUs, text CFG
    (0.0, 1.0, False, ("null", "text")),          # scale 0 (pure unconditional) still needs both passes
    (1.0, 1.0, True, ("full",)),                  # AUs, both scales 1: one joint pass
    (2.5, 2.5, True, ("null", "full")),           # equal scales: two-pass CFG on the joint condition
    (1.0, 3.0, True, ("null", "text", "full")),   # different scales: three passes
    (2.0, 1.0, True, ("null", "text", "full")),
    (2.0, 3.0, True, ("null", "text", "full")),
])
def test_passes(text_scale, au_scale, use_aus, expected):
    assert GuidancePlan(text_scale, au_scale, use_aus).passes == expected


def test_plan_is_frozen():
    plan = GuidancePlan(2.0, 3.0, True)
    with pytest.raises(Exception):
        plan.text_scale = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------------- combine_guidance
def _eps(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for k in ("null", "text", "full")}


def _reference(ts: float, as_: float, eps: dict[str, torch.Tensor]) -> torch.Tensor:
    """The full formula of the docstring, with every pass computed."""
    return eps["null"] + ts * (eps["text"] - eps["null"]) + as_ * (eps["full"] - eps["text"])


@pytest.mark.parametrize("text_scale, au_scale", [(1.0, 1.0), (2.5, 2.5), (1.0, 3.0), (2.0, 1.0), (2.0, 3.0),
                                                  (0.0, 4.0), (7.5, 0.0)])
def test_combine_with_aus_matches_formula(text_scale, au_scale):
    plan = GuidancePlan(text_scale, au_scale, use_aus=True)
    eps = _eps()
    # hand over only the passes of the plan: the skipped ones must really be redundant
    out = combine_guidance(plan, {p: eps[p] for p in plan.passes})
    if plan.passes == ("null", "text", "full"):
        expected = _reference(text_scale, au_scale, eps)
    else:
        # skipped "text" pass: the formula with text_scale == au_scale does not depend on eps_text
        expected = _reference(text_scale, au_scale, {**eps, "text": torch.full_like(eps["text"], 1e3)})
        assert torch.allclose(expected, _reference(text_scale, au_scale, eps))
        if plan.passes == ("full",):
            # and with both scales 1 not on eps_null either
            assert torch.allclose(expected, _reference(1.0, 1.0, {**eps, "null": eps["null"] * 0 - 5}))
    assert out.shape == eps["null"].shape
    assert torch.allclose(out, expected, atol=1e-9)


def test_combine_three_pass_hand_computed_values():
    plan = GuidancePlan(2.0, 3.0, use_aus=True)
    eps = {"null": torch.tensor([1.0]), "text": torch.tensor([2.0]), "full": torch.tensor([5.0])}
    # 1 + 2*(2-1) + 3*(5-2) = 12
    assert combine_guidance(plan, eps).item() == pytest.approx(12.0)
    plan = GuidancePlan(2.0, 2.0, use_aus=True)
    # 1 + 2*(5-1) = 9 (eps_text unused)
    assert combine_guidance(plan, {"null": eps["null"], "full": eps["full"]}).item() == pytest.approx(9.0)


@pytest.mark.parametrize("text_scale", [1.0, 0.0, 3.0, 7.5])
def test_combine_without_aus_matches_formula(text_scale):
    plan = GuidancePlan(text_scale, 5.0, use_aus=False)  # au_scale must be ignored
    eps = _eps(1)
    out = combine_guidance(plan, {p: eps[p] for p in plan.passes})
    # without AUs, "full" == "text" so the AU term vanishes
    expected = _reference(text_scale, 5.0, {**eps, "full": eps["text"]})
    assert torch.allclose(out, expected, atol=1e-9)


def test_combine_ignores_extra_passes():
    plan = GuidancePlan(3.0, 1.0, use_aus=False)
    eps = _eps(2)
    with_extra = combine_guidance(plan, eps)
    only = combine_guidance(plan, {"null": eps["null"], "text": eps["text"]})
    assert torch.equal(with_extra, only)


@pytest.mark.parametrize("text_scale, au_scale, use_aus, give", [
    (1.0, 1.0, False, ()),
    (3.0, 1.0, False, ("text",)),
    (3.0, 1.0, False, ("null",)),
    (1.0, 1.0, True, ("text", "null")),
    (2.0, 2.0, True, ("null", "text")),
    (2.0, 3.0, True, ("null", "full")),
])
def test_combine_missing_pass_raises(text_scale, au_scale, use_aus, give):
    plan = GuidancePlan(text_scale, au_scale, use_aus)
    eps = _eps()
    missing = [p for p in plan.passes if p not in give]
    with pytest.raises(ValueError, match="missing noise predictions") as err:
        combine_guidance(plan, {p: eps[p] for p in give})
    for p in missing:
        assert repr(p) in str(err.value)


# ---------------------------------------------------------------------- predict_x0
def _noised(prediction_type: str):
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    xt = sched.add_noise(x0, noise, t)
    return sched, x0, noise, t, xt


def test_predict_x0_epsilon():
    sched, x0, noise, t, xt = _noised("epsilon")
    out = predict_x0(xt, noise, sched.alphas_cumprod[t], "epsilon")
    assert out.dtype == xt.dtype
    assert torch.allclose(out, x0, atol=1e-6)
    # the default parametrisation is epsilon
    assert torch.allclose(predict_x0(xt, noise, sched.alphas_cumprod[t]), x0, atol=1e-6)
    # a wrong noise estimate gives a wrong x0
    assert not torch.allclose(predict_x0(xt, noise * 0, sched.alphas_cumprod[t]), x0, atol=1e-3)


def test_predict_x0_v_prediction():
    sched, x0, noise, t, xt = _noised("v_prediction")
    v = sched.get_velocity(x0, noise, t)
    out = predict_x0(xt, v, sched.alphas_cumprod[t], "v_prediction")
    assert torch.allclose(out, x0, atol=1e-6)
    # treating v as epsilon is wrong (guards against a swapped branch)
    assert not torch.allclose(predict_x0(xt, v, sched.alphas_cumprod[t], "epsilon"), x0, atol=1e-3)


def test_predict_x0_sample():
    sched, x0, noise, t, xt = _noised("sample")
    out = predict_x0(xt, x0, sched.alphas_cumprod[t], "sample")
    assert torch.equal(out, x0)


def test_predict_x0_scalar_alpha_bar_broadcasts():
    sched, x0, noise, _, _ = _noised("epsilon")
    t = torch.tensor([250] * 4)
    xt = sched.add_noise(x0, noise, t)
    out = predict_x0(xt, noise, sched.alphas_cumprod[250], "epsilon")  # 0-d alpha_bar
    assert torch.allclose(out, x0, atol=1e-6)


def test_predict_x0_float32_sample_keeps_dtype():
    sched, x0, noise, t, _ = _noised("epsilon")
    x0, noise = x0.float(), noise.float()
    t = torch.tensor([0, 10, 100, 300])
    xt = sched.add_noise(x0, noise, t)
    out = predict_x0(xt, noise, sched.alphas_cumprod[t].double(), "epsilon")
    assert out.dtype == torch.float32
    assert torch.allclose(out, x0, atol=1e-4)


def test_predict_x0_unknown_type_raises():
    sched, x0, noise, t, xt = _noised("epsilon")
    with pytest.raises(ValueError, match="unknown prediction_type 'flow'"):
        predict_x0(xt, noise, sched.alphas_cumprod[t], "flow")


# ---------------------------------------------------------------------- semantic guidance math
from lightning_modules.guidance.semantic import (SemanticGuidance, au_guidance_loss,  # noqa: E402
                                                 classifier_guided_noise, ddim_inversion_step, embedding_guidance_step,
                                                 expression_loss, guidance_window, normalized_gradient, predict_epsilon)


@pytest.mark.parametrize("steps, window, expected", [
    (25, (0.6, 1.0), [False] * 15 + [True] * 10),   # the paper's default: the last 40 %
    (5, (0.6, 1.0), [False, False, False, True, True]),
    (2, (0.6, 1.0), [False, True]),                 # few steps: the last one is always in an end=1 window
    (1, (0.6, 1.0), [True]),
    (4, (0.0, 0.5), [True, True, False, False]),
    (4, (0.0, 1.0), [True] * 4),
])
def test_guidance_window(steps, window, expected):
    assert guidance_window(steps, *window) == expected
    assert SemanticGuidance(embedding_scale=1.0, window=window).active_steps(steps) == expected


def test_semantic_guidance_switches():
    assert not SemanticGuidance().enabled
    assert SemanticGuidance(embedding_scale=0.5).enabled and not SemanticGuidance(embedding_scale=0.5).latent_enabled
    assert SemanticGuidance(classifier_scale=1.0).latent_enabled
    assert SemanticGuidance(au_scale=1.0).latent_enabled


def test_embedding_step_moves_every_sample_by_lambda_against_its_whole_gradient():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(2, 5, 8, generator=g)
    grad = torch.randn(2, 5, 8, generator=g) * torch.tensor([1e-4, 1.0, 30.0, 2.0, 0.5])[None, :, None]
    step = c - embedding_guidance_step(c, grad, 0.7)                             # the default: the paper's norm
    assert torch.allclose(step.flatten(1).norm(dim=1), torch.full((2,), 0.7), atol=1e-5)  # λ per sample
    cos = torch.nn.functional.cosine_similarity(step.flatten(1), grad.flatten(1), dim=-1)
    assert torch.allclose(cos, torch.ones(2), atol=1e-5)                         # along +∇ as a whole, subtracted
    # tokens keep their share of the gradient: a token moves λ·‖∇token‖/‖∇sample‖ (the tiny-gradient one barely)
    share = grad.norm(dim=-1) / grad.flatten(1).norm(dim=1, keepdim=True)
    assert torch.allclose(step.norm(dim=-1), 0.7 * share, atol=1e-6)
    assert (step.norm(dim=-1)[:, 0] < 1e-4).all()
    # per-token normalisation (the option): every token moves by exactly λ, whatever its share
    per_token = c - embedding_guidance_step(c, grad, 0.7, per_token=True)
    assert torch.allclose(per_token.norm(dim=-1), torch.full((2, 5), 0.7), atol=1e-5)
    assert torch.allclose(torch.nn.functional.cosine_similarity(per_token, grad, dim=-1), torch.ones(2, 5), atol=1e-5)


def test_sg_normalises_the_whole_gradient_by_default():
    assert SemanticGuidance().per_token is False
    grad = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]])
    assert torch.allclose(normalized_gradient(grad), grad / 5.0)
    assert torch.allclose(normalized_gradient(grad, per_token=True), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))


@pytest.mark.parametrize("overrides", [[], ["generator=sd"]])
def test_configs_default_to_the_whole_gradient_norm(tmp_path, overrides):
    from conftest import compose
    from lightning_modules.guidance.settings import semantic_guidance

    cfg = compose(overrides, tmp_path)
    assert cfg.generator.guidance.per_token is False and cfg.synthesis.guidance.per_token is False
    assert semantic_guidance(cfg.synthesis.guidance).per_token is False
    on = compose([*overrides, "generator.guidance.per_token=true"], tmp_path)
    assert semantic_guidance(on.synthesis.guidance, "synthesis.guidance").per_token is True


def test_normalized_gradient_of_zero_stays_zero():
    assert torch.equal(normalized_gradient(torch.zeros(1, 3, 4)), torch.zeros(1, 3, 4))


def test_embedding_step_lowers_a_loss():
    torch.manual_seed(0)
    w = torch.randn(8, 3)
    c = torch.randn(4, 6, 8, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0])
    loss = expression_loss(c.mean(1) @ w, target)
    grad, = torch.autograd.grad(loss, c)
    new = embedding_guidance_step(c.detach(), grad, 0.05)
    assert expression_loss(new.mean(1) @ w, target) < loss


def test_expression_loss_is_summed_per_sample():
    logits = torch.randn(3, 4)
    target = torch.tensor([0, 1, 2])
    one = expression_loss(logits[:1], target[:1])
    assert torch.allclose(expression_loss(logits, target),
                          sum(expression_loss(logits[i:i + 1], target[i:i + 1]) for i in range(3)))
    assert one > 0


def test_au_guidance_loss_masks_unknown_aus():
    pred = torch.tensor([[1.0, 5.0], [2.0, 2.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    mask = torch.tensor([[True, False], [True, True]])
    assert torch.isclose(au_guidance_loss(pred, target, mask), torch.tensor(0.0 + 2.0))  # (0) + (4+0)/2
    assert torch.isclose(au_guidance_loss(pred, target), torch.tensor(12.5 + 2.0))


def test_classifier_guided_noise_moves_x0_against_the_gradient():
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    a = scheduler.alphas_cumprod[500]
    x, eps, grad = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    x0 = predict_x0(x, eps, a)
    x0_guided = predict_x0(x, classifier_guided_noise(eps, grad, a), a)
    # x̂0 moves by −(1−ᾱ)/sqrt(ᾱ)·∇: a descent direction
    assert torch.allclose(x0_guided - x0, -(1 - a) / a.sqrt() * grad, atol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_epsilon_inverts_the_parametrisation(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    a = scheduler.alphas_cumprod[300]
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction_type]
    assert torch.allclose(predict_epsilon(xt, out, a, prediction_type), eps, atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_inversion_step_equals_diffusers_inverse_scheduler(prediction_type):
    from diffusers import DDIMInverseScheduler

    inverse = DDIMInverseScheduler(num_train_timesteps=1000, prediction_type=prediction_type, clip_sample=False,
                                   set_alpha_to_one=False, steps_offset=1)
    inverse.set_timesteps(10)
    x, out = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = int(inverse.timesteps[3])        # diffusers steps from t - ratio up to t
    expected = inverse.step(out, t, x).prev_sample
    a_from, a_to = inverse.alphas_cumprod[t - 100], inverse.alphas_cumprod[t]
    assert torch.allclose(ddim_inversion_step(x, out, a_from, a_to, prediction_type), expected, atol=1e-5)

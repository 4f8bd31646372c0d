"""Guidance math as pure functions over tensors (no models, no schedulers): unit-testable on their own."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GuidancePlan:
    """Which UNet passes one denoising step needs for the requested scales.

    ``eps = eps_null + text_scale * (eps_text - eps_null) + au_scale * (eps_full - eps_text)``
    with ``null`` = (negative/empty text, no AUs), ``text`` = (text, no AUs), ``full`` = (text, AUs).
    Passes whose weight is redundant are skipped: with equal scales it is the usual two-pass CFG on the joint
    condition; with both scales 1 it is a single conditional pass.
    """

    text_scale: float
    au_scale: float
    use_aus: bool

    @property
    def passes(self) -> tuple[str, ...]:
        if not self.use_aus:
            return ("text",) if self.text_scale == 1.0 else ("null", "text")
        if self.text_scale == 1.0 and self.au_scale == 1.0:
            return ("full",)
        if self.text_scale == self.au_scale:
            return ("null", "full")
        return ("null", "text", "full")


def combine_guidance(plan: GuidancePlan, eps: dict[str, torch.Tensor]) -> torch.Tensor:
    """Combine the per-condition noise predictions of ``plan.passes`` into the guided prediction."""
    missing = [p for p in plan.passes if p not in eps]
    if missing:
        raise ValueError(f"missing noise predictions for passes {missing}")
    if plan.passes == ("text",) or plan.passes == ("full",):
        return eps[plan.passes[0]]
    if plan.passes == ("null", "text"):
        return eps["null"] + plan.text_scale * (eps["text"] - eps["null"])
    if plan.passes == ("null", "full"):
        return eps["null"] + plan.text_scale * (eps["full"] - eps["null"])
    return (eps["null"] + plan.text_scale * (eps["text"] - eps["null"])
            + plan.au_scale * (eps["full"] - eps["text"]))


def predict_x0(sample: torch.Tensor, model_output: torch.Tensor, alpha_bar: torch.Tensor,
               prediction_type: str = "epsilon") -> torch.Tensor:
    """Clean-sample estimate x̂0 from x_t and the model output (ε, v or x0 parametrisation)."""
    alpha_bar = _expand(torch.as_tensor(alpha_bar).to(sample), sample)
    if prediction_type == "epsilon":
        return (sample - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * sample - (1 - alpha_bar).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r} (epsilon | v_prediction | sample)")


def predict_epsilon(sample: torch.Tensor, model_output: torch.Tensor, alpha_bar: torch.Tensor,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """The noise estimate ε̂ from x_t and the model output (ε, v or x0 parametrisation)."""
    alpha_bar = _expand(torch.as_tensor(alpha_bar).to(sample), sample)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * model_output + (1 - alpha_bar).sqrt() * sample
    if prediction_type == "sample":
        return (sample - alpha_bar.sqrt() * model_output) / (1 - alpha_bar).sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r} (epsilon | v_prediction | sample)")


def ddim_inversion_step(sample: torch.Tensor, model_output: torch.Tensor, alpha_bar_from: torch.Tensor,
                        alpha_bar_to: torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """One deterministic DDIM step *up* the noise levels (ᾱ_from > ᾱ_to), as ``DDIMInverseScheduler.step``:
    ``x_to = sqrt(ᾱ_to)·x̂0 + sqrt(1−ᾱ_to)·ε̂``. Written out because layout initialisation and FERAnno invert along
    the sampler's own timestep grid (any sampler), which DDIMInverseScheduler's fixed grid does not offer."""
    x0 = predict_x0(sample, model_output, alpha_bar_from, prediction_type)
    eps = predict_epsilon(sample, model_output, alpha_bar_from, prediction_type)
    alpha_bar_to = _expand(torch.as_tensor(alpha_bar_to).to(sample), sample)
    return alpha_bar_to.sqrt() * x0 + (1 - alpha_bar_to).sqrt() * eps


def _expand(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    while value.ndim < like.ndim:
        value = value.unsqueeze(-1)
    return value


# ---------------------------------------------------------------------------------------------- semantic guidance
@dataclass(frozen=True)
class SemanticGuidance:
    """Classifier-driven guidance during the late denoising steps (SynFER §3.3); every scale 0 = plain sampling.

    - ``embedding_scale`` (λ_g, the paper's SG): ``c_text ← c_text − λ_g·∇L/‖∇L‖`` with L the cross-entropy of a
      frozen FER classifier on x̂0 against the target expression; the update carries over to later steps.
      ``‖∇L‖`` is the norm of a sample's whole gradient over all its text tokens, as in the paper; ``per_token``
      normalises each token's gradient on its own instead (every token then moves by λ_g, however little it
      mattered to the loss).
    - ``classifier_scale``: classic classifier guidance on x_t through x̂0 (the diffusers CLIP-guided template:
      ``ε ← ε + sqrt(1−ᾱ_t)·∇_x L``).
    - ``au_scale``: the same on x_t with L = MSE between the classifier's AU head on x̂0 and the requested AUs.
    ``window`` = (start, end) fractions of the denoising steps where guidance acts (default: the last 40 %).
    """

    embedding_scale: float = 0.0
    classifier_scale: float = 0.0
    au_scale: float = 0.0
    window: tuple[float, float] = (0.6, 1.0)
    per_token: bool = False

    def __post_init__(self):
        for name in ("embedding_scale", "classifier_scale", "au_scale"):
            if getattr(self, name) < 0:
                raise ValueError(f"semantic guidance {name} must be >= 0, got {getattr(self, name)}")
        start, end = self.window
        if not 0.0 <= start < end <= 1.0:
            raise ValueError(f"semantic guidance window must satisfy 0 <= start < end <= 1, got {self.window}")

    @property
    def enabled(self) -> bool:
        return self.embedding_scale > 0 or self.latent_enabled

    @property
    def latent_enabled(self) -> bool:
        return self.classifier_scale > 0 or self.au_scale > 0

    def active_steps(self, num_steps: int) -> list[bool]:
        return guidance_window(num_steps, *self.window)


def guidance_window(num_steps: int, start: float, end: float) -> list[bool]:
    """Which of ``num_steps`` denoising steps act: step i (ending at fraction (i+1)/num_steps of the trajectory)
    when start < (i+1)/num_steps <= end. (0.6, 1.0) with 25 steps = the last 10 steps; any window with end = 1
    includes the last step, however few steps there are."""
    return [start < (i + 1) / num_steps <= end for i in range(num_steps)]


def normalized_gradient(grad: torch.Tensor, per_token: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """∇/‖∇‖ per sample (norm over all but the batch dim; the default) or per token (norm over the last dim)."""
    if per_token:
        norm = grad.norm(dim=-1, keepdim=True)
    else:
        norm = grad.flatten(1).norm(dim=1).view(-1, *([1] * (grad.ndim - 1)))
    return grad / norm.clamp_min(eps)


def embedding_guidance_step(embedding: torch.Tensor, grad: torch.Tensor, scale: float, per_token: bool = False
                            ) -> torch.Tensor:
    """The paper's SG update ``c ← c − λ·∇L/‖∇L‖``: every sample (``per_token``: every token) moves by exactly λ
    against ∇L."""
    return embedding - scale * normalized_gradient(grad, per_token)


def expression_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the batch, so each sample's gradient is its own (not divided by N)."""
    return torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")


def au_guidance_loss(pred_aus: torch.Tensor, target_aus: torch.Tensor, mask: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Per-sample mean squared AU error over known AUs, summed over the batch."""
    mask = torch.ones_like(target_aus, dtype=torch.bool) if mask is None else mask.bool()
    m = mask.to(pred_aus.dtype)
    return (((pred_aus - target_aus) ** 2 * m).sum(-1) / m.sum(-1).clamp_min(1)).sum()


def classifier_guided_noise(noise_pred: torch.Tensor, grad: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """ε ← ε + sqrt(1−ᾱ_t)·∇_x L: moves x̂0 against ∇L (diffusers' CLIP-guided pipeline, with grads = −∇L)."""
    alpha_bar = _expand(alpha_bar.to(noise_pred.dtype), noise_pred)
    return noise_pred + (1 - alpha_bar).sqrt() * grad

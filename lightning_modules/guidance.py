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
    alpha_bar = alpha_bar.to(sample.dtype)
    while alpha_bar.ndim < sample.ndim:
        alpha_bar = alpha_bar.unsqueeze(-1)
    if prediction_type == "epsilon":
        return (sample - (1 - alpha_bar).sqrt() * model_output) / alpha_bar.sqrt()
    if prediction_type == "v_prediction":
        return alpha_bar.sqrt() * sample - (1 - alpha_bar).sqrt() * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"unknown prediction_type {prediction_type!r} (epsilon | v_prediction | sample)")

"""Two-phase training of the generator: phase 1 fine-tunes the UNet (or its LoRA), the trained text encoder and
the class embedding on captions with the AU branch off (AU attention scale 0), phase 2 trains the AU adapter (AU
encoder + AU attention projections) alone with everything else frozen. ``one_phase`` trains all of it together.

One optimizer holds two parameter groups for the whole run (phase-1 parts, AU adapter), each with its own learning
rate and warmup + decay over its own phase (zero outside it); the phase of a step follows from ``global_step``
alone, and a frozen part has ``requires_grad`` off so it gets no gradient and AdamW skips it (no weight decay
either). The optimizer, its state and the checkpoint keep one shape across the boundary, so Lightning's own resume
restores them in either phase. Re-creating the optimizer at the boundary would not: ``configure_optimizers`` runs
before a resumed run knows its step, and would build the phase-1 optimizer for a phase-2 checkpoint.

With EMA, the first phase-2 step loads the EMA weights of the phase-1 parts into the model (the adapter learns on
the UNet that sampling uses; their EMA stays equal to them while frozen) and restarts the EMA warm-up for the
adapter, which starts training then.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
from torch.optim.lr_scheduler import LambdaLR

from lightning_modules.generator.conditioning import set_au_attention_scale
from lightning_modules.run.runtime import require

log = logging.getLogger(__name__)
SCHEDULES = ("one_phase", "two_phase")


@dataclass(frozen=True)
class PhaseSchedule:
    """``one_phase``, or ``two_phase`` with its step counts (their sum is max_steps) and learning rates."""

    schedule: str = "one_phase"
    phase1_steps: int = 0
    phase2_steps: int = 0
    phase1_lr: Optional[float] = None
    phase2_lr: Optional[float] = None

    @property
    def two_phase(self) -> bool:
        return self.schedule == "two_phase"

    def phase_at(self, step: int) -> int:
        """0 (one phase), 1 or 2 for the optimizer step ``step`` (0-based: steps already done)."""
        if not self.two_phase:
            return 0
        return 1 if step < self.phase1_steps else 2

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: Optional[dict]) -> "PhaseSchedule":
        schedule = cls(**(value or {}))
        if schedule.schedule not in SCHEDULES:
            raise ValueError(f"training schedule must be one of {SCHEDULES}, got {schedule.schedule!r}")
        if schedule.two_phase and (schedule.phase1_steps < 1 or schedule.phase2_steps < 1 or not schedule.phase1_lr
                                   or not schedule.phase2_lr):
            raise ValueError(f"two_phase needs phase steps >= 1 and learning rates > 0, got {schedule}")
        return schedule


def resolve_schedule(training: Optional[dict], max_steps: int, max_epochs: int, lr: float,
                     key: str = "generator.training") -> PhaseSchedule:
    """The schedule of ``generator.training`` (phase steps from ``phase1_steps`` / ``phase2_steps`` or
    ``phase1_fraction`` of max_steps; lrs null = ``lr``); ConfigError naming the key."""
    t = dict(training or {})
    schedule = t.get("schedule") or "one_phase"
    require(schedule in SCHEDULES, f"{key}.schedule", f"must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if schedule == "one_phase":
        return PhaseSchedule()
    require(max_steps >= 1, "generator.max_steps",
            f"two_phase counts its phases in optimizer steps: set it >= 1, got {max_steps}")
    require(max_epochs < 1, "generator.max_epochs",
            f"two_phase ends at generator.max_steps (an epoch limit could stop it inside phase 1): set -1, "
            f"got {max_epochs}")
    p1, p2 = t.get("phase1_steps"), t.get("phase2_steps")
    for name, v in (("phase1_steps", p1), ("phase2_steps", p2)):
        require(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1), f"{key}.{name}",
                f"must be a number of optimizer steps >= 1 or null, got {v!r}")
    if p1 is None and p2 is None:
        fraction = t.get("phase1_fraction", 0.5)
        require(isinstance(fraction, (int, float)) and 0 < fraction < 1, f"{key}.phase1_fraction",
                f"must be in (0, 1), got {fraction!r}")
        p1 = int(round(fraction * max_steps))
        require(1 <= p1 < max_steps, f"{key}.phase1_fraction",
                f"{fraction} of generator.max_steps={max_steps} leaves a phase without steps (each needs >= 1)")
        p2 = max_steps - p1
    elif p2 is None:
        p2 = max_steps - p1
        require(p2 >= 1, f"{key}.phase1_steps", f"is {p1}, leaving no phase-2 step of generator.max_steps={max_steps}")
    elif p1 is None:
        p1 = max_steps - p2
        require(p1 >= 1, f"{key}.phase2_steps", f"is {p2}, leaving no phase-1 step of generator.max_steps={max_steps}")
    else:
        require(p1 + p2 == max_steps, f"{key}.phase2_steps",
                f"phase1_steps + phase2_steps = {p1 + p2} must equal generator.max_steps={max_steps}")
    lrs = []
    for name in ("phase1_lr", "phase2_lr"):
        v = t.get(name)
        require(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0), f"{key}.{name}",
                f"must be > 0 or null (generator.model.lr), got {v!r}")
        lrs.append(float(v if v is not None else lr))
    return PhaseSchedule("two_phase", int(p1), int(p2), *lrs)


# ---------------------------------------------------------------------- the module's side
def adapter_ids(module) -> set[int]:
    """The AU adapter's parameters (AU encoder + the AU projections of the attention processors), by id."""
    parts = [module.au_encoder, module.au_processors]
    return {id(p) for part in parts if part is not None for p in part.parameters()}


def phase_groups(module) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Every trainable parameter as (phase 1: UNet / LoRA, text encoder, class embedding; phase 2: AU adapter)."""
    au = adapter_ids(module)
    params = module.trainable_parameters()
    return [p for p in params if id(p) not in au], [p for p in params if id(p) in au]


def apply_phase(module, phase: int) -> None:
    """Trainability and AU branch of ``phase`` (1: captions, AU branch off; 2: AU adapter alone)."""
    au = adapter_ids(module)
    for p in module.trainable_parameters():
        p.requires_grad_((id(p) in au) == (phase == 2))
    set_au_attention_scale(module.au_processors, 0.0 if phase == 1 else module.hparams.au_attn_scale)


def start_phase2(module) -> None:
    """At the first phase-2 step: the phase-1 parts take their EMA weights, the EMA warm-up restarts."""
    if module.ema is None:
        return
    au = adapter_ids(module)
    with torch.no_grad():
        for p, shadow in zip(module.trainable_parameters(), module.ema.shadow_params):
            if id(p) not in au:
                p.copy_(shadow.to(p.device, p.dtype))
    module.ema.optimization_step = 0


class PhaseTracker:
    """Called at every training batch start: switches parts at the boundary (also the first batch of a resumed
    run, in whichever phase it resumes)."""

    def __init__(self, schedule: PhaseSchedule):
        self.schedule, self.phase = schedule, None

    def on_batch_start(self, module, step: int, first_micro_batch: bool) -> None:
        phase = self.schedule.phase_at(step)
        if phase == 0:
            return
        if phase == 2 and step == self.schedule.phase1_steps and first_micro_batch:
            start_phase2(module)
        if phase != self.phase:
            apply_phase(module, phase)
            log.info("generator: phase %d from step %d: %s", phase, step,
                     "captions (UNet, text encoder, class embedding; AU branch off)" if phase == 1 else
                     "AU adapter alone (UNet, text encoder, class embedding frozen)")
            self.phase = phase

    def finish(self, module) -> None:
        """After training: the AU branch on again (sampling, saving); a run stopped in phase 1 warns."""
        if self.phase == 1:
            log.warning("generator: training stopped in phase 1: the AU adapter is untrained")
        if self.phase is not None and module.au_processors is not None:
            set_au_attention_scale(module.au_processors, module.hparams.au_attn_scale)
        self.phase = None


def _decay(name: str, warmup: int, steps: int) -> Callable[[int], float]:
    from diffusers.optimization import get_scheduler

    dummy = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_scheduler(name, dummy, num_warmup_steps=min(warmup, max(steps - 1, 0)), num_training_steps=steps)
    if not isinstance(sched, LambdaLR):
        raise ValueError(f"generator.model.lr_schedule={name!r} has no per-step factor; two_phase needs one")
    return sched.lr_lambdas[0]


def two_phase_optimizer(module, schedule: PhaseSchedule) -> dict:
    """AdamW with a group per phase; each group's lr warms up and decays over its phase and is 0 outside it."""
    hp = module.hparams
    first, adapter = phase_groups(module)
    opt = torch.optim.AdamW([{"params": first, "lr": schedule.phase1_lr},
                             {"params": adapter, "lr": schedule.phase2_lr}], weight_decay=hp.weight_decay)
    boundary = schedule.phase1_steps
    f1 = _decay(hp.lr_schedule, hp.warmup_steps, schedule.phase1_steps)
    f2 = _decay(hp.lr_schedule, hp.warmup_steps, schedule.phase2_steps)
    # plain functions: LambdaLR saves no state for them, so the checkpoint holds only the step count
    def lr1(step):  # noqa: E306
        return f1(step) if step < boundary else 0.0

    def lr2(step):
        return f2(step - boundary) if step >= boundary else 0.0

    return {"optimizer": opt, "lr_scheduler": {"scheduler": LambdaLR(opt, [lr1, lr2]), "interval": "step"}}


# ---------------------------------------------------------------------- exact resume
def rng_state() -> dict:
    """The random streams training draws from (noise, timesteps, dropouts, batch order), saved in checkpoints: a
    resumed run continues with the draws the uninterrupted run would have made."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # tensors and plain numbers only: checkpoints are read with torch.load(weights_only=True)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])

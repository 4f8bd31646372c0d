"""A fit resumed from a mid-epoch checkpoint continues as the uninterrupted fit would have.

Lightning restores the weights, optimizer, schedulers and loop counters, but restarts the epoch's data iterator
from its first batch and leaves the random state where the new process's setup left it. This callback stores the
global RNG states (torch, numpy, python, CUDA) with every checkpoint and, when a fit resumes, skips the batches the
killed run had trained on in that epoch (``FERDataLoader.skip_batches``: indices only, no image is read) and
restores the RNG states before the first new batch is drawn. With ``num_workers=0`` the resumed run is step for step
the uninterrupted one (every rank restores rank 0's states, which equal its own: all ranks are seeded alike and
draw alike); with loader workers it resumes at the right batch in the same order, while the workers' augmentation
draws start afresh.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import lightning as L

log = logging.getLogger(__name__)


def rng_states() -> dict[str, Any]:
    """The global RNG states in types ``torch.load(weights_only=True)`` accepts (the best checkpoint is read so)."""
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


class ExactResume(L.Callback):
    def __init__(self) -> None:
        self._restored: Optional[dict[str, Any]] = None

    def state_dict(self) -> dict[str, Any]:  # called at every checkpoint save, i.e. at the saved step
        return {"rng": rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("rng")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # on_train_start, not on_train_epoch_start: Lightning skips the latter when it restarts an epoch mid-way.
        # The train iterator exists but has not drawn its first batch yet.
        if self._restored is None:
            return
        rng, self._restored = self._restored, None
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed  # batches of the epoch already trained
        if 0 < done < trainer.num_training_batches:
            loaders = trainer.train_dataloader
            for loader in loaders.values() if isinstance(loaders, dict) else (
                    loaders if isinstance(loaders, (list, tuple)) else [loaders]):
                if hasattr(loader, "skip_batches"):
                    loader.skip_batches = done
            if trainer.is_global_zero:  # Lightning warns that the loader is "not resumable": this makes it so
                log.info("resuming mid-epoch: the first %d batches of epoch %d were trained before the checkpoint "
                         "and are skipped", done, trainer.current_epoch)
        set_rng_states(rng)


# ------------------------------------------------------------------------ step-budget fits (ssl, clip)
def prepare_resumable_fit(cfg, out_dir, resume_digest: str, weights: str, enabled: bool):
    """(checkpoint to resume from or None, why) for a fit of a fixed step budget under ``resume_digest``: the
    previous final weights file ``weights`` goes, checkpoints stay when resuming; the run is marked resumable and its
    config saved."""
    from lightning_modules.run import runtime

    resume, why = runtime.resume_checkpoint(out_dir, resume_digest, enabled=enabled)
    runtime.clear_stage(out_dir, (weights,), keep_checkpoints=resume is not None)
    runtime.start_resumable(out_dir, resume_digest)
    runtime.save_resolved_config(cfg, out_dir)
    return resume, why


def fit_and_export(trainer: L.Trainer, model: L.LightningModule, out_dir, weights: str, resume, **fit_args) -> float:
    """``trainer.fit`` (from ``resume`` when given), then the final step saved as ``checkpoints/last.ckpt`` by every
    rank (a rerun that only rescores resumes there and trains nothing) and exported without training state to
    ``out_dir/weights`` on rank 0. Returns the fit's seconds."""
    import time
    from pathlib import Path

    from lightning_modules.run import runtime

    start = time.time()
    trainer.fit(model, ckpt_path=str(resume) if resume else None, **fit_args)
    seconds = time.time() - start
    last = Path(out_dir) / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last)
    if trainer.is_global_zero:
        runtime.export_weights(last, Path(out_dir) / weights)
    return seconds

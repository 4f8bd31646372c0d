"""Synthesis as ``trainer.predict``: a trained SynFER pipeline (+ optional semantic guidance) turns plan batches
into faces, and ``ShardWriter`` streams them into the synthetic store chunk by chunk.

Memory stays flat in the plan size: Lightning keeps no predictions (``return_predictions=False``), the writer
holds at most one chunk of encoded faces, and the plan computes its rows on demand.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.callbacks import BasePredictionWriter
from tqdm.auto import tqdm

from datamodules.face_storage import encode_faces
from datamodules.synthesis import chunk_name
from lightning_modules.generator.sample_settings import SamplingSettings

log = logging.getLogger(__name__)


class SynthesisModule(L.LightningModule):
    """Wraps a ``SynFERPipeline``: its torch parts are registered as children so the Trainer places them on the
    rank's device. ``sample`` = the pipeline call settings (sampler, steps, text_scale, au_scale, label_scale, ...).
    A label-conditioned pipeline gets each face's planned expression (``target_label``) as its class condition.
    ``layout_strength``: layout initialisation on; each batch then carries its rows' real faces (``init_images``),
    DDIM-inverted to that fraction of the trajectory before the remaining steps are sampled."""

    def __init__(self, pipe, sample: dict[str, Any], guidance=None, guide: Optional[nn.Module] = None,
                 layout_strength: Optional[float] = None):
        super().__init__()
        self.pipe = pipe
        self.unet, self.text_encoder, self.vae = pipe.unet, pipe.text_encoder, pipe.vae
        self.au_encoder = pipe.au_encoder
        # a generator trained without AU labels never learned what an AU request means: ask for none
        self.request_aus = pipe.has_au_adapter and pipe.au_trained is not False
        if pipe.has_au_adapter and not self.request_aus:
            log.warning("synthesis: the generator's AU branch was trained without AU labels (au_adapter.json "
                        "trained_on_aus=false); faces are sampled without the plan's AU targets")
        self.guide = guide
        self.guidance = guidance if guidance is not None and guidance.enabled else None
        self.training_data = generator_training_data(pipe)
        self.color_mode = self.training_data.get("color_mode", "rgb")  # faces are stored in it
        settings = dict(sample)
        if pipe.null_class is None:  # a label scale means nothing to a pipeline without class labels
            settings.pop("label_scale", None)
        self.settings = SamplingSettings.of(num_inference_steps=int(settings.pop("steps", 25)), progress=False,
                                            semantic_guidance=self.guidance, init_strength=layout_strength or 0.0,
                                            **settings)
        self.layout_strength = layout_strength
        self.requires_grad_(False)
        pipe.set_progress_bar_config(disable=True)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        n = len(batch["sample_id"])
        aus = torch.tensor(batch["target_aus"], dtype=torch.float32) if self.request_aus else None
        au_mask = torch.tensor(batch["au_mask"], dtype=torch.bool) if aus is not None else None
        extra = {}
        if self.guidance is not None:
            extra = {"guide": self.guide, "labels": torch.tensor(batch["target_label"], dtype=torch.long)}
        if self.pipe.null_class is not None:  # the planned expression is the class condition
            extra["class_labels"] = torch.tensor(batch["target_label"], dtype=torch.long)
        if self.layout_strength is not None:
            if "init_images" not in batch:
                raise RuntimeError("layout initialisation is on but the plan batch carries no source faces")
            extra["init_images"] = batch["init_images"]
        images = self.pipe(list(batch["caption"]), aus=aus, au_mask=au_mask, seeds=list(batch["seed"]),
                           settings=self.settings, batch_size=n, **extra).images
        return {"images": images.cpu()}


def generator_training_data(pipe) -> dict:
    """What a saved generator learned from (colour mode, sizes; {} when unknown), logged once."""
    from lightning_modules.stages.generator_stage import read_training_data

    info = read_training_data(pipe.name_or_path) if getattr(pipe, "name_or_path", None) else {}
    if info:
        native = info.get("native_size", ["?", "?"])
        log.info("synthesis: the generator makes %s faces at %dx%d, learned from %s faces of native size %sx%s "
                 "(students read them at %s px)", info.get("color_mode", "rgb"), *(2 * [int(info.get(
                     "generator_image_size", pipe.config.image_size))]), info.get("format", "?"), *native,
                 info.get("data_image_size", "?"))
    else:
        log.info("synthesis: the generator folder records no training data (%s); faces are stored RGB",
                 "training_data.json")
    return info


def shard_features(num_aus: int, layout: bool = False):
    """``layout``: the set was made with layout initialisation; each row names its source face."""
    from datasets import Features, Image, Sequence, Value

    columns = {"image": Image(), "sample_id": Value("string"), "seed": Value("int64"),
               "target_label": Value("int64"), "target_aus": Sequence(Value("float32"), length=num_aus),
               "au_mask": Sequence(Value("bool"), length=num_aus), "caption": Value("string"),
               "guidance": Value("string")}
    if layout:
        columns["layout_source"] = Value("string")
    return Features(columns)


class ShardWriter(BasePredictionWriter):
    """Buffers one chunk's rows, writes it as a shard (+ manifest entry) when its last batch arrives, shows an
    images/s progress bar on rank 0 and records per-rank totals in ``stats_dir/rank<r>.json``."""

    COLUMNS = ("sample_id", "seed", "target_label", "target_aus", "au_mask", "caption")

    def __init__(self, output_dir: Path, stats_dir: Path, guidance_json: str, num_aus: int, total_images: int,
                 progress: bool = True, layout: bool = False, storage=None):
        from datamodules.face_storage import StorageConfig

        super().__init__(write_interval="batch")
        self.storage = storage or StorageConfig()  # stored resolution and image format
        self.output_dir, self.stats_dir = Path(output_dir), Path(stats_dir)
        self.guidance_json, self.features = guidance_json, shard_features(num_aus, layout)
        self.columns = (*self.COLUMNS, "layout_source") if layout else self.COLUMNS
        self.total_images, self.progress = int(total_images), progress
        self.buffer: dict[str, list] = {}
        self.images = self.shards = 0
        self.bar = None
        self.started = 0.0

    def on_predict_start(self, trainer, pl_module) -> None:
        self.buffer, self.images, self.shards, self.started = {}, 0, 0, time.perf_counter()
        if trainer.is_global_zero and self.progress:
            per_rank = -(-self.total_images // trainer.world_size)
            self.bar = tqdm(total=per_rank, unit="img", desc=f"synthesize (rank 0 of {trainer.world_size})",
                            dynamic_ncols=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        rows = {c: list(batch[c]) for c in self.columns}
        color_mode = getattr(pl_module, "color_mode", "rgb")
        rows["image"] = encode_faces(prediction["images"], color_mode, self.storage)
        rows["guidance"] = [self.guidance_json] * len(rows["sample_id"])
        for key, values in rows.items():
            self.buffer.setdefault(key, []).extend(values)
        n = len(rows["sample_id"])
        self.images += n
        if self.bar is not None:
            self.bar.update(n)
        if batch["last_in_chunk"]:
            from datamodules.synthetic import write_shard

            # replace=True: a chunk listed by a rank that died after writing it is simply redone
            storage = self.storage.settings(int(prediction["images"].shape[-1]))
            meta = {"color_mode": color_mode, "image_size": storage["image_size"], "storage": storage,
                    "generator_training_data": getattr(pl_module, "training_data", {})}
            write_shard(self.output_dir, chunk_name(int(batch["chunk"])), self.buffer, features=self.features,
                        replace=True, meta=meta)
            self.buffer = {}
            self.shards += 1

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.buffer:
            raise RuntimeError("synthesis ended inside a chunk: the plan batches do not close their chunks")
        self.stats_dir.mkdir(parents=True, exist_ok=True)
        seconds = time.perf_counter() - self.started
        (self.stats_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"rank": trainer.global_rank, "images": self.images, "shards": self.shards, "seconds": seconds,
             "device": str(pl_module.device)}))

"""A LoRA generator saved as its own weights + a reference to the frozen Stable Diffusion folder it was tuned from.

A LoRA fine-tune changes only the LoRA layers (plus parts the base model lacks, e.g. a class embedding) and the AU
adapter; the UNet, VAE, text encoder and tokenizer stay the base folder's. Saving them again costs ~4 GB (SD 1.5,
fp32) per run, so such a pipeline folder holds instead:

    model_index.json         the pipeline config (component classes, image_size), as diffusers writes it
    scheduler/               the sampling scheduler (built from the training schedule, not the base's own)
    base_model.json          path + fingerprint of the base folder, component dtypes, the UNet config keys that
                             differ from the base's (e.g. ``num_class_embeds``)
    unet_extra.safetensors   UNet weights the base lacks (a class embedding), when there are any
    pytorch_lora_weights.safetensors, au_adapter.*   as in a full save

Loading rebuilds the parts from the base folder and checks its fingerprint (file names, sizes and samples of their
bytes), so a moved, missing or different base model is a clear error instead of a silently different generator.
A pipeline qualifies only when every frozen part was loaded from one base folder and none of its base weights can
have been trained (``requires_grad`` off); anything else is saved in full.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
from pathlib import Path
from typing import Optional

import torch

from lightning_modules.run.runtime import ConfigError

log = logging.getLogger(__name__)

BASE_MODEL = "base_model.json"
UNET_EXTRA = "unet_extra.safetensors"
BASE_PARTS = ("unet", "vae", "text_encoder", "tokenizer")  # taken from the base folder
SAMPLE_BYTES = 1 << 20  # per sample; three samples (start, middle, end) of each base file enter the fingerprint


def base_fingerprint(base: Path) -> dict[str, list]:
    """Per file of the base parts: size and a hash of its first, middle and last MiB. Survives a copy or move of
    the folder (no times), tells apart models of one architecture (SD 1.4 vs 1.5 have the same names and sizes)."""
    listing = {}
    for part in BASE_PARTS:
        for path in sorted(p for p in (base / part).rglob("*") if p.is_file()):
            size = path.stat().st_size
            digest = hashlib.sha256()
            with path.open("rb") as f:
                for offset in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
                    f.seek(offset)
                    digest.update(f.read(SAMPLE_BYTES))
            listing[str(path.relative_to(base))] = [size, digest.hexdigest()[:16]]
    return listing


def _source(module) -> Optional[Path]:
    """The folder a diffusers/transformers part was loaded from (None: built in memory)."""
    config = getattr(module, "config", None)
    name = getattr(config, "_name_or_path", None) if config is not None else None
    name = name or getattr(module, "name_or_path", None)
    return Path(name).resolve() if name and Path(name).is_dir() else None


def _normalised(value):
    return json.loads(json.dumps(value, default=list))


def _base_unet_keys(unet, base: Path) -> tuple[dict, set]:
    """The base folder's UNet config and its weight names (from an empty model: nothing is read but the config)."""
    base_config = type(unet).load_config(base / "unet")
    with torch.device("meta"):
        return base_config, set(type(unet).from_config(base_config).state_dict())


def _unet_extra(unet, base: Path) -> tuple[dict, dict]:
    """(UNet config keys that differ from the base's, UNet weights the base has no place for)."""
    base_config, base_keys = _base_unet_keys(unet, base)
    own = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    overrides = {k: _normalised(v) for k, v in own.items() if _normalised(v) != _normalised(base_config.get(k))}
    extra = {}
    for key, value in unet.state_dict().items():
        key = key.replace(".base_layer", "")
        if "lora_" not in key and ".processor." not in key and key not in base_keys:
            extra[key] = value.detach().cpu().contiguous()
    return overrides, extra


def frozen_base(pipe) -> Optional[Path]:
    """The base folder a LoRA pipeline's frozen parts all come from, or None (then the pipeline is saved in
    full): no LoRA, parts built in memory or from different folders, or a base weight that may have trained."""
    if not getattr(pipe.unet, "peft_config", None) or pipe.vae is None:
        return None
    sources = {part: _source(getattr(pipe, part)) for part in BASE_PARTS}
    base = sources["unet"].parent if sources["unet"] is not None else None
    if base is None or any(sources[part] != base / part for part in BASE_PARTS):
        return None
    for part in ("vae", "text_encoder"):
        if any(p.requires_grad for p in getattr(pipe, part).parameters()):
            return None
    _, base_keys = _base_unet_keys(pipe.unet, base)
    for name, p in pipe.unet.named_parameters():
        if p.requires_grad and "lora_" not in name and name.replace(".base_layer", "") in base_keys:
            return None
    return base


def save_with_base_reference(pipe, directory: Path, base: Path) -> None:
    """Write the pipeline config, scheduler, reference and the UNet parts the base lacks (LoRA and AU adapter are
    saved by the caller)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_config(directory)  # model_index.json: classes + image_size, so stages that check for it find it
    pipe.scheduler.save_pretrained(directory / "scheduler")
    overrides, extra = _unet_extra(pipe.unet, base)
    if extra:
        save_file(extra, str(directory / UNET_EXTRA))
    reference = {"path": str(base), "fingerprint": base_fingerprint(base), "unet_config": overrides,
                 "dtypes": {part: str(getattr(pipe, part).dtype).removeprefix("torch.")
                            for part in ("unet", "vae", "text_encoder")}}
    (directory / BASE_MODEL).write_text(json.dumps(reference, indent=2, sort_keys=True) + "\n")
    log.info("generator: LoRA saved in %s with a reference to its base model %s (no copy of UNet, VAE, text "
             "encoder: the base folder must stay there)", directory, base)


def unet_config(directory: str | Path) -> dict:
    """A pipeline folder's UNet config: its own ``unet/config.json``, or for a LoRA over a base folder the base's
    with the recorded changes (raises OSError/ValueError when unreadable)."""
    directory = Path(directory)
    ref_file = directory / BASE_MODEL
    if not ref_file.is_file():
        return json.loads((directory / "unet" / "config.json").read_text())
    reference = json.loads(ref_file.read_text())
    base = json.loads((Path(reference["path"]) / "unet" / "config.json").read_text())
    return {**base, **(reference.get("unet_config") or {})}


def check_base(directory: Path) -> tuple[Path, dict]:
    """The recorded base folder and reference; a missing, incomplete or changed base is a ``ConfigError`` that
    names the path and where to set it."""
    ref_file = directory / BASE_MODEL
    reference = json.loads(ref_file.read_text())
    base = Path(reference["path"])
    key = f"{ref_file}:path"
    fix = (f"put the base Stable Diffusion folder back at {base}, or write its new location into {ref_file} "
           f"(key \"path\")")
    if not base.is_dir():
        raise ConfigError(key, f"the LoRA generator {directory} is built on the base model folder {base}, which "
                               f"does not exist (moved or deleted?): {fix}")
    missing = [part for part in BASE_PARTS if not (base / part).is_dir()]
    if missing:
        raise ConfigError(key, f"the base model folder {base} of the LoRA generator {directory} lacks "
                               f"{', '.join(m + '/' for m in missing)}: {fix}")
    recorded, found = reference["fingerprint"], base_fingerprint(base)
    if recorded != found:
        changed = sorted(name for name in set(recorded) | set(found) if recorded.get(name) != found.get(name))
        raise ConfigError(key, f"the base model folder {base} is not the one the LoRA generator {directory} was "
                               f"trained on: {len(changed)} files differ ({', '.join(changed[:4])}"
                               f"{' ...' if len(changed) > 4 else ''}); {fix}")
    return base, reference


def _as_saved(module, dtype: torch.dtype):
    """The part as a full save would load again: its weights rounded to the dtype it had (e.g. a bf16 frozen VAE);
    diffusers models held in float32 (``DiffusionPipeline.from_pretrained``'s default), transformers models in
    the dtype they were saved in."""
    from diffusers import ModelMixin

    if module.dtype != dtype:
        module.to(dtype)
    if isinstance(module, ModelMixin) and module.dtype != torch.float32:
        module.to(torch.float32)
    return module


def _component_class(index: dict, part: str):
    library, name = index[part]
    return getattr(importlib.import_module(library), name)


def load_from_base_reference(cls, directory: Path):
    """A pipeline (without LoRA and AU adapter, which the caller loads) from the base folder named in
    ``base_model.json`` + this folder's scheduler, config and UNet extras."""
    from safetensors.torch import load_file

    base, reference = check_base(directory)
    index = cls.load_config(directory)
    dtypes = {part: getattr(torch, name) for part, name in reference["dtypes"].items()}
    unet_cls = _component_class(index, "unet")
    unet = _as_saved(unet_cls.from_pretrained(base / "unet"), dtypes["unet"])
    overrides = reference.get("unet_config") or {}
    if overrides or (directory / UNET_EXTRA).is_file():
        state = unet.state_dict()
        if (directory / UNET_EXTRA).is_file():
            state.update(load_file(str(directory / UNET_EXTRA)))
        with torch.device("meta"):
            grown = unet_cls.from_config({**unet.config, **overrides})
        grown.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in grown.buffers()):
            raise RuntimeError(f"UNet buffers left uninitialised rebuilding {directory} from {base}")
        grown.register_to_config(_name_or_path=str(base / "unet"))
        unet = grown.eval()
    parts = {part: _as_saved(_component_class(index, part).from_pretrained(base / part), dtypes[part])
             for part in ("vae", "text_encoder")}
    tokenizer = _component_class(index, "tokenizer").from_pretrained(base / "tokenizer")
    scheduler = _component_class(index, "scheduler").from_pretrained(directory / "scheduler")
    return cls(unet=unet, scheduler=scheduler, tokenizer=tokenizer, image_size=index.get("image_size"), **parts)

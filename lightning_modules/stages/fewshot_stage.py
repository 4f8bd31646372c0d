"""`stage=fewshot`: N-way K-shot recognition of real faces with a frozen backbone (a teacher or student checkpoint
trained on real, synthetic or mixed faces, or an untrained one as the floor).

The features of every face of ``fewshot.split`` are computed once (no gradients); then, per K of
``fewshot.k_shots``, ``fewshot.num_episodes`` seeded episodes are scored by class prototypes and by a linear probe
on the support features. ``<run>/fewshot/`` gets metrics.json (``<K>shot/<method>/acc`` and ``.../ci95``, the
half-width of the 95 % interval over episodes), results.md (the table) and config.yaml.
"""
from __future__ import annotations

import logging
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from lightning_modules.paradigms import fewshot as fs
from lightning_modules.run import runtime, trainer_setup
from lightning_modules.run.runtime import ConfigError, require

STAGE = "fewshot"
HASH_KEYS = ["data", "fewshot", "seed"]
SPLITS = ("train", "val", "test")
RANDOM = "random"
EPISODE_CHUNK = 100  # episodes whose probes are fitted together (memory: chunk x N*K x feature dim)
METHOD_NAMES = {"prototype": "prototype", "linear_probe": "linear probe"}
log = logging.getLogger(__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_config(cfg: DictConfig) -> None:
    """Every ``fewshot`` key, before any data or weights are read."""
    f = cfg.fewshot
    require(str(f.split) in SPLITS, "fewshot.split", f"must be one of {', '.join(SPLITS)}, got {f.split!r}")
    shots = f.k_shots
    require(OmegaConf.is_list(shots) and len(shots) > 0 and all(_is_int(k) and k >= 1 for k in shots)
            and len(set(shots)) == len(shots), "fewshot.k_shots",
            f"must be a non-empty list of distinct integers >= 1, got {shots!r}")
    require(f.n_way == "all" or (_is_int(f.n_way) and f.n_way >= 2), "fewshot.n_way",
            f"must be `all` (every class of the data) or an integer >= 2, got {f.n_way!r}")
    require(_is_int(f.n_query) and f.n_query >= 1, "fewshot.n_query", f"must be an integer >= 1, got {f.n_query!r}")
    require(_is_int(f.num_episodes) and f.num_episodes >= 2, "fewshot.num_episodes",
            f"must be an integer >= 2 (a 95 % interval needs two), got {f.num_episodes!r}")
    methods = f.methods
    require(OmegaConf.is_list(methods) and len(methods) > 0 and set(methods) <= set(fs.METHODS)
            and len(set(methods)) == len(methods), "fewshot.methods",
            f"must be a non-empty list of {', '.join(fs.METHODS)}, got {methods!r}")
    require(f.prototype.metric in fs.METRICS, "fewshot.prototype.metric",
            f"must be one of {', '.join(fs.METRICS)}, got {f.prototype.metric!r}")
    probe = f.linear_probe
    require(_is_int(probe.steps) and probe.steps >= 1, "fewshot.linear_probe.steps",
            f"must be an integer >= 1, got {probe.steps!r}")
    require(float(probe.lr) > 0, "fewshot.linear_probe.lr", f"must be > 0, got {probe.lr}")
    require(float(probe.weight_decay) >= 0, "fewshot.linear_probe.weight_decay",
            f"must be >= 0, got {probe.weight_decay}")
    require(f.image_size is None or (_is_int(f.image_size) and 16 <= f.image_size <= 1024), "fewshot.image_size",
            f"must be null (the backbone's own) or an integer in [16, 1024], got {f.image_size!r}")
    require(_is_int(f.batch_size) and f.batch_size >= 1, "fewshot.batch_size",
            f"must be an integer >= 1, got {f.batch_size!r}")
    require(f.device in ("auto", "cpu", "cuda"), "fewshot.device", f"must be auto, cpu or cuda, got {f.device!r}")
    require(f.device != "cuda" or torch.cuda.is_available(), "fewshot.device", "cuda: no GPU is available")
    if str(f.backbone.checkpoint) == RANDOM:
        import timm

        require(timm.is_model(str(f.arch)), "fewshot.arch", f"unknown timm model {f.arch!r}")
    else:
        backbone_checkpoint(cfg)


def backbone_checkpoint(cfg: DictConfig) -> Optional[Path]:
    """``fewshot.backbone.checkpoint``: None for ``random``; a plain name is a classifier stage's folder in
    ``fewshot.backbone.run_dir`` (its ``<name>/<name>.ckpt``), anything else a checkpoint path."""
    value = str(cfg.fewshot.backbone.checkpoint)
    if value == RANDOM:
        return None
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value) and not value.endswith(".ckpt"):
        path = Path(str(cfg.fewshot.backbone.run_dir)) / value / f"{value}.ckpt"
        hint = f" (run stage={value} first, or name a .ckpt path)" if value in ("teacher", "student") else \
            " (a classifier stage's folder of fewshot.backbone.run_dir, or a .ckpt path)"
    else:
        path, hint = Path(value), ""
    require(path.is_file(), "fewshot.backbone.checkpoint", f"no checkpoint at {path}{hint}")
    return path


def trained_image_size(checkpoint: Path) -> Optional[int]:
    """The face size a classifier stage trained at: ``data.image_size`` of the config.yaml beside its checkpoint."""
    config = checkpoint.parent / "config.yaml"
    if not config.is_file():
        return None
    size = OmegaConf.select(OmegaConf.load(config), "data.image_size", default=None)
    return int(size) if _is_int(size) else None


# A checkpoint of a model that is no FER classifier (e.g. a self-supervised encoder) names its class under this key
# (``module.QualName``, written in its ``on_save_checkpoint``); the class is a LightningModule with
# ``forward_features(images in [-1, 1], (N, 3, S, S)) -> (N, D)``.


class ForwardFeatures(nn.Module):
    """A module whose ``forward_features`` is its features, as ``fs.extract_features`` takes it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)


def load_feature_module(path: Path, device: torch.device) -> nn.Module:
    """A FER classifier (teacher, student, FERAnno), or a feature module named by ``fs.FEATURE_MARKER``."""
    import importlib

    from lightning_modules.paradigms.teacher import load_fer_classifier

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    name = checkpoint.get(fs.FEATURE_MARKER) if isinstance(checkpoint, dict) else None
    del checkpoint
    if not name:
        return load_fer_classifier(path, map_location=str(device))
    module, _, qualname = str(name).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), qualname)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"it names an unknown feature module class {name!r}") from err
    if not (isinstance(cls, type) and hasattr(cls, "load_from_checkpoint") and hasattr(cls, "forward_features")):
        raise ValueError(f"{name!r} is no LightningModule with forward_features")
    return ForwardFeatures(cls.load_from_checkpoint(path, map_location=str(device)))


def load_backbone(cfg: DictConfig, num_classes: int, device: torch.device) -> tuple[nn.Module, dict]:
    """(the frozen backbone in eval mode, a description for metrics.json). Its class count does not matter (only
    features are used); its input channels do: faces reach it with three."""
    from lightning_modules.paradigms.classifier import FERClassifier

    path = backbone_checkpoint(cfg)
    if path is None:
        torch.manual_seed(int(cfg.fewshot.seed))  # the floor is the same untrained network on every run of a seed
        model = FERClassifier(backbone=str(cfg.fewshot.arch), num_classes=num_classes, channels_last=False)
        return model.to(device).eval(), {"backbone": RANDOM, "arch": str(cfg.fewshot.arch), "trained_image_size": None}
    try:
        model = load_feature_module(path, device)
    except (ValueError, KeyError, EOFError, RuntimeError, pickle.UnpicklingError) as err:
        raise ConfigError("fewshot.backbone.checkpoint", f"{path} is not a loadable FER classifier or feature "
                                                         f"module checkpoint: {err}") from err
    inner = model.model if isinstance(model, ForwardFeatures) else model
    hparams = dict(getattr(inner, "hparams", {}))
    in_chans = int(hparams.get("in_chans", 3))
    require(in_chans == 3, "fewshot.backbone.checkpoint",
            f"{path} takes {in_chans}-channel inputs; faces reach every model with 3 channels (data.color_mode=gray "
            "gives the luma in all three)")
    return model.to(device).eval(), {"backbone": str(path), "arch": hparams.get("backbone", type(inner).__name__),
                                     "checkpoint_classes": hparams.get("num_classes"),
                                     "trained_image_size": trained_image_size(path)}


def check_input_size(backbone: nn.Module, size: int, device: torch.device) -> int:
    """The feature width at ``size``; a backbone that cannot take that size is a config error."""
    try:
        with torch.no_grad():
            return int(fs.as_features(backbone(torch.zeros(2, 3, size, size, device=device))).shape[1])
    except (RuntimeError, ValueError, AssertionError) as err:  # e.g. a ViT built for one image size
        raise ConfigError("fewshot.image_size", f"the backbone cannot take {size}x{size} faces: {err}") from err


def face_loader(datamodule, split: str, size: int, batch_size: int, num_workers: int):
    """The split's faces at ``size`` through the evaluation transform (no augmentation, in any split)."""
    from datamodules.batch import FERDataLoader, collate_fer
    from datamodules.transforms import eval_transform

    dataset = datamodule.datasets[split].variant(transform=eval_transform(size, datamodule.color_mode))
    return dataset, FERDataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                                  collate_fn=collate_fer)


def resolve_n_way(f: DictConfig, num_classes: int) -> int:
    if f.n_way == "all":
        return num_classes
    require(f.n_way <= num_classes, "fewshot.n_way", f"{f.n_way} > the {num_classes} classes of the data")
    return int(f.n_way)


def class_pool(labels: np.ndarray, n_way: int, k_shots: list[int], n_query: int, class_names: list[str],
               split: str, warn: bool = True) -> dict[int, dict[str, int]]:
    """Per K: the classes left out for having fewer than K + Q faces (one warning for all K); a config error when
    fewer than N classes remain."""
    skipped = {}
    for k in k_shots:
        short = fs.short_classes(labels, k, n_query, range(len(class_names)))
        if len(class_names) - len(short) < n_way:
            faces = ", ".join(f"{class_names[c]}: {n}" for c, n in short.items())
            raise ConfigError("fewshot.n_way", f"{n_way}-way {k}-shot episodes with {n_query} queries need {n_way} "
                                               f"classes with >= {k + n_query} faces in the {split} split; too few "
                                               f"in {faces} (lower fewshot.n_query or fewshot.k_shots, or fewer "
                                               "classes: fewshot.n_way)")
        skipped[k] = {class_names[c]: n for c, n in short.items()}
    if warn and any(skipped.values()):
        detail = "; ".join(f"{k}-shot: {', '.join(f'{c} ({n} faces)' for c, n in s.items())}"
                           for k, s in skipped.items() if s)
        warnings.warn(f"fewshot: {sum(map(len, skipped.values()))} class draw(s) left out of the episode pools for "
                      f"having fewer than K + {n_query} faces in the {split} split: {detail}")
    return skipped


def evaluate(features: torch.Tensor, labels: np.ndarray, f: DictConfig, n_way: int, progress: bool) -> dict:
    """``{"<K>shot": {method: summary}}`` over the seeded episodes of every K."""
    from tqdm.auto import tqdm

    probe = {"steps": int(f.linear_probe.steps), "lr": float(f.linear_probe.lr),
             "weight_decay": float(f.linear_probe.weight_decay)}
    results = {}
    for k in f.k_shots:
        eps = fs.episodes(labels, n_way, int(k), int(f.n_query), int(f.num_episodes), int(f.seed))
        accs: dict[str, list[float]] = {m: [] for m in f.methods}
        with tqdm(total=len(eps), desc=f"fewshot {n_way}-way {k}-shot", unit="episode", disable=not progress) as bar:
            for start in range(0, len(eps), EPISODE_CHUNK):
                chunk = range(start, min(start + EPISODE_CHUNK, len(eps)))
                seeds = [int(np.random.SeedSequence([int(f.seed), e, int(k)]).generate_state(1)[0]) for e in chunk]
                for method in f.methods:
                    accs[method] += fs.episode_accuracies(features, eps[chunk.start:chunk.stop], method,
                                                          metric=str(f.prototype.metric), probe=probe, seeds=seeds)
                bar.update(len(chunk))
        results[f"{k}shot"] = {m: fs.summarize(a) for m, a in accs.items()}
        log.info("fewshot: %d-way %d-shot over %d episodes: %s", n_way, k, len(eps),
                 ", ".join(f"{m} {s['acc']:.3f} ± {s['ci95']:.3f}" for m, s in results[f"{k}shot"].items()))
    return results


def results_table(results: dict, n_way: int, info: dict, f: DictConfig, faces: int) -> str:
    methods = list(f.methods)
    head = [METHOD_NAMES[m] + (f" ({f.prototype.metric})" if m == "prototype" else "") for m in methods]
    lines = [f"# Few-shot recognition: {n_way}-way, {f.n_query} queries per class, {f.num_episodes} episodes",
             "", f"Backbone: {info['backbone']} ({info['arch']}), frozen; faces: {faces} of the {f.split} split at "
             f"{info['image_size']} px; seed {f.seed}. Cells: mean accuracy ± half-width of the 95 % interval.", "",
             "| K | " + " | ".join(head) + " |", "|---|" + "---|" * len(methods)]
    for key, row in results.items():
        lines.append(f"| {key[:-4]} | " + " | ".join(f"{row[m]['acc']:.3f} ± {row[m]['ci95']:.3f}" for m in methods)
                     + " |")
    return "\n".join(lines) + "\n"


def done_digest(cfg: DictConfig) -> str:
    checkpoint = backbone_checkpoint(cfg)
    return runtime.inputs_hash(cfg, HASH_KEYS, [checkpoint] if checkpoint else [])


def run_fewshot_stage(cfg: DictConfig) -> dict:
    """Writes ``<run_dir>/fewshot/``; skips when it holds the results of this config and backbone (``force=true``
    reruns). The folder is locked for this process while it runs."""
    with runtime.stage_locks():
        return _run_fewshot_stage(cfg)


def _run_fewshot_stage(cfg: DictConfig) -> dict:
    from lightning_modules.stages.classifier_stage import build_datamodule

    require(OmegaConf.select(cfg, "fewshot") is not None, "fewshot", "no fewshot settings in the config")
    check_config(cfg)
    f = cfg.fewshot
    out_dir = runtime.stage_dir(cfg, STAGE)
    digest = done_digest(cfg)
    if runtime.finished_earlier(cfg, STAGE, out_dir, digest):
        return {"skipped": True}
    if not runtime.is_rank_zero():  # one process evaluates; the episodes need no second one
        return {"evaluated_on_rank_zero": True}
    device = torch.device("cuda" if f.device == "cuda" or (f.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    # the weights before the data: a bad checkpoint stops the run before any face is read
    backbone, info = load_backbone(cfg, int(cfg.data.protocol), device)
    datamodule = build_datamodule(cfg)
    datamodule.setup("fit")  # every split: a bad label file stops the run here
    n_way = resolve_n_way(f, datamodule.num_classes)
    size = int(f.image_size or info["trained_image_size"] or cfg.data.image_size)
    if size != int(cfg.data.image_size):
        log.info("fewshot: faces resized to %d px (%s; data.image_size=%s)", size,
                 "fewshot.image_size" if f.image_size else "the size the backbone trained at", cfg.data.image_size)
    info["image_size"] = size
    dim = check_input_size(backbone, size, device)
    pool_args = (n_way, list(f.k_shots), int(f.n_query), datamodule.class_names, str(f.split))
    split_labels = np.array([r.label for r in datamodule.records[str(f.split)]])
    class_pool(split_labels[split_labels >= 0], *pool_args, warn=False)  # too few faces: stop before the features
    dataset, loader = face_loader(datamodule, str(f.split), size, int(f.batch_size), int(cfg.data.num_workers))
    progress = bool(OmegaConf.select(cfg, "trainer.enable_progress_bar", default=True))
    features, labels = fs.extract_features(backbone, loader, device)
    labelled = labels >= 0
    if not labelled.all():  # an episode needs every face's class
        warnings.warn(f"fewshot: {int((~labelled).sum())} unlabelled face(s) of the {f.split} split left out of the "
                      "episodes (counted in metrics.json: unlabelled_left_out)")
    features, labels = features[labelled].to(device), labels[labelled].numpy()
    log.info("fewshot: %d x %d features of the %s split (%s)", len(labels), dim, f.split, info["backbone"])
    skipped = class_pool(labels, *pool_args)  # again: faces that failed to load are not in the features
    results = evaluate(features, labels, f, n_way, progress)
    metrics = {**results, **info, "n_way": n_way, "n_query": int(f.n_query), "num_episodes": int(f.num_episodes),
               "k_shots": list(f.k_shots), "split": str(f.split), "faces": len(labels), "feature_dim": dim,
               "unlabelled_left_out": int((~labelled).sum()), "unreadable": dataset.unreadable(),
               "skipped_classes": {f"{k}shot": s for k, s in skipped.items() if s},
               "class_counts": {datamodule.class_names[c]: n for c, n in fs.class_counts(labels).items()},
               "prototype_metric": str(f.prototype.metric), "seed": int(f.seed)}
    loggers = trainer_setup.build_loggers(cfg, out_dir, STAGE)
    try:
        runtime.log_scalars(loggers, runtime.flatten("", results, {}), prefix="fewshot")
        runtime.save_resolved_config(cfg, out_dir)
        (out_dir / "results.md").write_text(results_table(results, n_way, info, f, len(labels)))
        runtime.write_metrics(out_dir, metrics)
        runtime.mark_done(out_dir, digest)
    finally:  # after the outputs: the wandb run records them
        trainer_setup.finish_loggers(loggers)
    return metrics

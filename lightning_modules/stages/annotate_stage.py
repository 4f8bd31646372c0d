"""`stage=annotate_aus`: label a dataset without AUs with the suite's own AU detector (a teacher's AU head) and write
an OpenFace-format csv plus a card, into ``<run_dir>/annotate_aus/``. With ``data.au_source=annotate`` every
other stage then reads that csv as its ``data.openface`` (train.py points it there) and behaves as ``sidecar``.

The detector is either a trained checkpoint (``annotate.detector.checkpoint``) or trained here on an AU-labelled
dataset (``annotate.detector.data``, a data config name, + ``annotate.detector.overrides`` on ``data.*`` /
``teacher.*``): exactly what ``train.py stage=teacher data=<name> <overrides>`` trains, into
``<run_dir>/<annotate.detector.name>/``. The csv's name carries the annotation's hash (data, detector), so the
stages reading it see a new input whenever the annotation changes; a rerun with the same hash is skipped.
"""
from __future__ import annotations

import copy
import logging
import pickle
import time
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from datamodules.errors import DataError
from lightning_modules.run import runtime
from lightning_modules.run.runtime import ConfigError, require

log = logging.getLogger(__name__)

STAGE = "annotate_aus"
CONFIG_DIR = Path(__file__).resolve().parents[2] / "experiments"
# The data keys that decide which faces are annotated (not how they are batched or augmented for training).
DATA_KEYS = ("format", "root", "protocol", "aus", "format_options", "verify_images")
OVERRIDE_ROOTS = ("data", "teacher")


def compose_config(overrides: list[str]) -> DictConfig:
    """The config tree composed with ``overrides`` (inside a running Hydra app or not)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def detector_spec(cfg: DictConfig) -> DictConfig:
    det = OmegaConf.select(cfg, "annotate.detector")
    require(det is not None, "annotate.detector", "missing: the annotate config group is not in the config")
    has_ckpt, has_data = det.checkpoint is not None, det.data is not None
    require(has_ckpt or has_data, "annotate.detector",
            "name the AU detector: annotate.detector.checkpoint=<a teacher .ckpt with an AU head> or "
            "annotate.detector.data=<a data config with AUs to train one on, e.g. toy>")
    require(not (has_ckpt and has_data), "annotate.detector",
            "set annotate.detector.checkpoint or annotate.detector.data, not both")
    return det


def detector_config(cfg: DictConfig) -> DictConfig:
    """The detector's teacher-stage config: data and teacher composed from ``annotate.detector``, the rest (trainer,
    logger, seed, run folder) the run's; its AUs must come from a sidecar (or the toy faces) in the run's vocabulary."""
    det = detector_spec(cfg)
    overrides = OmegaConf.to_container(det.overrides, resolve=True) if det.overrides is not None else {}
    require(isinstance(overrides, dict), "annotate.detector.overrides",
            f"must be a mapping of data.* / teacher.* keys to values, got {overrides!r}")
    bad = [k for k in overrides if str(k).split(".", 1)[0] not in OVERRIDE_ROOTS or "." not in str(k)]
    require(not bad, "annotate.detector.overrides", f"only data.<key> / teacher.<key> entries apply, got {bad}")
    require(str(det.data) != "" and "/" not in str(det.data), "annotate.detector.data",
            f"must name a data config (experiments/data/<name>.yaml), got {det.data!r}")
    require((CONFIG_DIR / "data" / f"{det.data}.yaml").is_file(), "annotate.detector.data",
            f"no data config experiments/data/{det.data}.yaml")
    composed = compose_config([f"data={det.data}"])
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.data, out.teacher = composed.data, composed.teacher
    out.teacher.name, out.stage = str(det.name), "teacher"
    for key, value in overrides.items():  # struct mode: an unknown key is refused, never added
        try:
            OmegaConf.update(out, key, value, merge=True)
        except Exception as err:  # noqa: BLE001 - an unknown key, a value of the wrong type
            raise ConfigError("annotate.detector.overrides", f"{key}: {' '.join(str(err).split())[:200]}") from err
    source = _au_source(out.data)
    require(source == "sidecar", "annotate.detector.data",
            f"the detector's data has no AUs (au_source={source}); give it an OpenFace csv through "
            "annotate.detector.overrides={data.openface: <csv>} or train it on toy faces")
    with open_dict(out):
        out.data.au_source = source  # resolved, as in every stage's saved config
    require(list(out.data.aus) == list(cfg.data.aus), "annotate.detector",
            f"AU vocabulary mismatch: the detector would learn {list(out.data.aus)}, the run's data.aus is "
            f"{list(cfg.data.aus)}")
    return out


def _au_source(data: DictConfig) -> str:
    from datamodules.real import au_source_problem, resolve_au_source

    problem = au_source_problem(data.format, data.get("au_source"), data.get("openface"))
    if problem is not None:
        raise ConfigError("annotate.detector.overrides", f"the detector's {problem[0]}: {problem[1]}")
    return resolve_au_source(data.format, data.get("au_source"), data.get("openface"))


def checkpoint_facts(cfg: DictConfig) -> dict[str, Any]:
    """A given checkpoint's AU list and input size: ``annotate.detector.aus`` / ``.image_size``, else ``data.aus`` /
    ``data.image_size`` of the config.yaml the teacher stage saved beside it."""
    det = detector_spec(cfg)
    path = Path(str(det.checkpoint))
    require(path.is_file(), "annotate.detector.checkpoint", f"checkpoint not found: {path}")
    saved = path.parent / "config.yaml"
    saved_data = OmegaConf.load(saved).get("data", {}) if saved.is_file() else {}
    if saved_data.get("format") is not None:  # a teacher trained without AUs has an AU head that never learned
        from datamodules.real import au_source_problem, resolve_au_source

        args = (saved_data.format, saved_data.get("au_source"), saved_data.get("openface"))
        require(au_source_problem(*args) is not None or resolve_au_source(*args) != "none",
                "annotate.detector.checkpoint", f"{path} was trained on data without AUs ({saved}: data.au_source "
                "resolves to none); its AU head never learned")
    facts = {"checkpoint": str(path)}
    for key in ("aus", "image_size"):
        value = det.get(key)
        value = value if value is not None else saved_data.get(key)
        require(value is not None, f"annotate.detector.{key}",
                f"unknown for {path} (no config.yaml beside it giving data.{key}); set it")
        facts[key] = list(value) if key == "aus" else int(value)
    require(facts["aus"] == list(cfg.data.aus), "annotate.detector.checkpoint",
            f"AU vocabulary mismatch: {path} predicts {facts['aus']}, the run's data.aus is {list(cfg.data.aus)}")
    return facts


def annotation_digest(cfg: DictConfig) -> str:
    """Hash of what decides the csv: the faces (data keys) and the detector (its file, or its training config)."""
    det = detector_spec(cfg)
    if det.checkpoint is not None:
        facts = checkpoint_facts(cfg)
        inputs, detector = [Path(facts["checkpoint"])], facts
    else:
        from lightning_modules.stages.classifier_stage import done_digest

        inputs, detector = [], done_digest(detector_config(cfg), "teacher")
    trimmed = OmegaConf.create({"data": {k: cfg.data.get(k) for k in DATA_KEYS}, "detector": detector})
    return runtime.inputs_hash(trimmed, ["data", "detector"], inputs)


def sidecar_path(cfg: DictConfig, digest: Optional[str] = None) -> Path:
    digest = digest or annotation_digest(cfg)
    return Path(cfg.paths.run_dir) / STAGE / f"openface_aus.{digest}.csv"


def trained_detector(cfg: DictConfig) -> tuple[Path, int]:
    """(checkpoint, input size): the named one, or the one trained (or already trained) from the detector config."""
    from lightning_modules.stages.classifier_stage import done_digest, run_classifier_stage

    det = detector_spec(cfg)
    if det.checkpoint is not None:
        facts = checkpoint_facts(cfg)
        return Path(facts["checkpoint"]), facts["image_size"]
    det_cfg = detector_config(cfg)
    out_dir = Path(cfg.paths.run_dir) / str(det.name)
    ckpt = out_dir / f"{det.name}.ckpt"
    if cfg.get("force", False) or not runtime.is_done(out_dir, done_digest(det_cfg, "teacher")) or not ckpt.is_file():
        log.info("annotate_aus: training the AU detector on data=%s into %s", det.data, out_dir)
        run_classifier_stage(det_cfg, "teacher")
    else:
        log.info("annotate_aus: AU detector %s is trained for this config, reusing it", ckpt)
    return ckpt, int(det_cfg.data.image_size)


def load_detector(path: Path, num_aus: int):
    from lightning_modules.paradigms.teacher import load_fer_classifier

    key = "annotate.detector.checkpoint"
    try:
        model = load_fer_classifier(path)
    except (ValueError, KeyError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as err:  # not a
        # classifier checkpoint, a damaged or truncated file
        reason = " ".join(str(err).split())[:200]
        raise ConfigError(key, f"{path} is not a loadable FER classifier checkpoint ({reason})") from err
    require(getattr(model, "au_head", None) is not None, key, f"{path} has no AU head (train it with teacher.model."
            "au_head=true on AU-labelled data)")
    require(model.au_head.out_features == num_aus, key,
            f"AU vocabulary mismatch: {path}'s AU head predicts {model.au_head.out_features} AUs, data.aus has "
            f"{num_aus}")
    return model


def build_faces(cfg: DictConfig, image_size: int):
    """The run's datamodule without AUs and without a train limit (every face of every split is annotated)."""
    from lightning_modules.stages.classifier_stage import build_datamodule

    plain = copy.deepcopy(cfg)
    with open_dict(plain):
        plain.data.openface, plain.data.au_source, plain.data.train_limit = None, "none", None
        plain.data.image_size = image_size
    datamodule = build_datamodule(plain)
    datamodule.setup("fit")
    return datamodule


def detector_facts(cfg: DictConfig, checkpoint: Path) -> dict[str, Any]:
    """For the card: which detector, and its AU error on its own held-out faces where its stage recorded one."""
    import json

    facts: dict[str, Any] = {"checkpoint": str(checkpoint), "trained_on": detector_spec(cfg).data}
    metrics = checkpoint.parent / "metrics.json"
    if metrics.is_file():
        scores = json.loads(metrics.read_text())
        facts.update({k.replace("/", "_"): scores[k] for k in ("test/au_mae", "test/acc") if k in scores})
    return facts


def wait_for(out_dir: Path, digest: str, path: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not (runtime.is_done(out_dir, digest) and path.is_file()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"annotate_aus: rank 0 wrote no {path} in {seconds} s")
        time.sleep(1.0)


def run_annotate_stage(cfg: DictConfig) -> dict:
    """Train (or load) the detector, annotate every face of the run's data, write the csv and the card."""
    import numpy as np
    import torch

    from lightning_modules.labeling.au_annotation import au_card, card_markdown, predict_aus, write_sidecar

    ann = cfg.annotate
    require(int(ann.batch_size) >= 1, "annotate.batch_size", f"must be >= 1, got {ann.batch_size}")
    require(float(ann.wait_seconds) > 0, "annotate.wait_seconds", f"must be > 0, got {ann.wait_seconds}")
    digest = annotation_digest(cfg)
    out_dir = runtime.stage_dir(cfg, STAGE)
    path = sidecar_path(cfg, digest)
    if not cfg.get("force", False) and runtime.is_done(out_dir, digest) and path.is_file():
        log.info("annotate_aus: %s is done for this config, skipping (force=true reruns it)", path)
        return {"skipped": True, "sidecar": str(path)}
    checkpoint, image_size = trained_detector(cfg)
    datamodule = build_faces(cfg, image_size)
    model = load_detector(checkpoint, len(datamodule.vocab))
    if not runtime.is_rank_zero():
        wait_for(out_dir, digest, path, float(ann.wait_seconds))
        return {"sidecar": str(path)}
    splits = [s for s in ("train", "val", "test") for _ in datamodule.records[s]]
    records = [r for s in ("train", "val", "test") for r in datamodule.records[s]]
    runtime.clear_stage(out_dir, [p.name for p in out_dir.glob("openface_aus.*")] + ["card.json", "card.md"])
    runtime.save_resolved_config(cfg, out_dir)
    device = "cuda" if torch.cuda.is_available() and str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda") else "cpu"
    start = time.time()
    aus, ok = predict_aus(model, records, image_size, len(datamodule.vocab), datamodule.num_classes,
                          batch_size=int(ann.batch_size), num_workers=int(ann.num_workers), device=device,
                          progress=bool(cfg.trainer.get("enable_progress_bar", True)))
    if not ok.any():
        raise DataError(f"annotate_aus: not one of the {len(records)} face images of data.root could be read")
    write_sidecar(path, records, aus, ok, datamodule.vocab, root=cfg.data.get("root"))
    card = au_card(records, aus, ok, datamodule.vocab, datamodule.class_names, splits)
    card.update(sidecar=str(path), config_hash=digest, image_size=image_size, detector=detector_facts(cfg, checkpoint))
    runtime.write_json_atomic(out_dir / "card.json", card)
    (out_dir / "card.md").write_text(card_markdown(card))
    seconds = time.time() - start
    log.info("annotate_aus: %d of %d faces annotated (%.1f %%) in %.1f s -> %s (use it with data.au_source=annotate)",
             card["annotated"], card["faces"], 100 * card["coverage"], seconds, path)
    metrics = {"sidecar": str(path), "faces": card["faces"], "annotated": card["annotated"],
               "coverage": card["coverage"], "seconds": seconds, "au_mean": card["au_mean"],
               "mean_au_intensity": float(np.nanmean(aus[ok]))}
    runtime.write_metrics(out_dir, metrics)
    runtime.mark_done(out_dir, digest)
    return metrics

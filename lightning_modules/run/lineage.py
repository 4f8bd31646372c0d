"""wandb lineage: every stage's models and sets are reference artifacts that downstream stages use, so a student's
run shows the generator, teacher and synthetic data behind it; and a requeued stage keeps its wandb run.

An artifact is named and built from its path alone (``<run>/<stage folder>/<file or folder>``), so the stage that
writes it and a later stage that reads it build the same artifact (same name, type and digest) without asking a
server: that is what lets lineage work in offline runs. Large outputs are references with ``checksum=False`` (a
reference is a pointer, nothing is uploaded or hashed); the stage folder's small ``config.yaml`` is a checksummed
reference, so a set made again under another config is a new version. Inputs and outputs are derived from the
config by ``stage_inputs`` / ``stage_outputs``; no stage code names its artifacts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

RUN_ID_FILE = "wandb_run.json"
CONFIG_FILE = "config.yaml"  # runtime.save_resolved_config writes it into every stage folder
# Keys that never change what a stage computes (``stage``: the same teacher runs alone or in stage=pipeline; the
# pipeline's own keys reach a stage through its derived config): a requeued run continues its wandb run whatever they
# are. ``force`` starts a new run anyway.
RUN_KEY_IGNORED = ("force", "stage", "pipeline", "report")
MAX_NAME = 128  # wandb's limit on artifact names
STANDARD_OUTPUTS = ("pipeline", "dataset")  # what stages name their output folders
ID_CHARS = string.ascii_lowercase + string.digits


@dataclass(frozen=True)
class ArtifactRef:
    """A stage output or input: ``path`` (a file or folder) and the artifact that points at it."""

    name: str
    type: str  # "model" (checkpoints, generator pipelines) | "dataset" (synthetic, relabelled, pseudolabel sets)
    path: Path


def artifact_name(path: Path, output_root: Optional[str]) -> str:
    """A stage's own output (``<stage>/pipeline``, ``<stage>/dataset``, ``<stage>/<stage>.ckpt``) is named after its
    stage folder relative to ``output_root`` with '/' as '-' (``toy-generator`` for ``outputs/toy/generator/
    pipeline``), outside ``output_root`` after its last two folders (``<run>-<stage>``); any other path after itself
    (relative, or its last three parts)."""
    path = Path(path).resolve()
    own = path.name in STANDARD_OUTPUTS or path.name == f"{path.parent.name}.ckpt"
    base = path.parent if own else path
    parts = base.parts[-2:] if own else base.parts[-3:]
    if output_root:
        try:
            parts = base.relative_to(Path(output_root).resolve()).parts or parts
        except ValueError:
            pass
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts)).strip("-_.") or "artifact"
    if len(name) > MAX_NAME:  # keep the informative end, a hash keeps it unique
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = f"{digest}-{name[-(MAX_NAME - 9):]}"
    return name


def artifact_type(path: Path) -> str:
    """A set folder (``dataset``, or any folder with a synthetic set's ``manifest.json``) is a dataset; a checkpoint
    file or a generator's pipeline folder a model."""
    path = Path(path)
    return "dataset" if path.name == "dataset" or (path / "manifest.json").is_file() else "model"


def ref(path: Any, cfg: DictConfig) -> ArtifactRef:
    path = Path(str(path))
    return ArtifactRef(artifact_name(path, _output_root(cfg)), artifact_type(path), path)


def _output_root(cfg: DictConfig) -> Optional[str]:
    root = OmegaConf.select(cfg, "output_root", default=None, throw_on_resolution_failure=False)
    return None if root is None else str(root)


def _role(cfg: DictConfig, stage: str) -> Optional[str]:
    """A classifier stage's role: its logger is named after its output folder (``teacher.name``/``student.name``)."""
    for role in ("student", "teacher"):
        if stage == str(OmegaConf.select(cfg, f"{role}.name", default=None) or role):
            return role
    return None


def _is_ssl(cfg: DictConfig, stage: str) -> bool:
    return cfg.get("stage") == "ssl" and stage == str(OmegaConf.select(cfg, "ssl.name", default="ssl"))


def stage_outputs(cfg: DictConfig, stage: str, out_dir: Path) -> list[ArtifactRef]:
    """What stage ``stage`` (the name it gives its loggers) writes into ``out_dir`` for later stages."""
    out_dir = Path(out_dir)
    paths = {"generator": [out_dir / "pipeline"], "synthesize": [out_dir / "dataset"],
             "relabel": [out_dir / "dataset"], "pseudolabel": [out_dir / "dataset"]}.get(stage)
    if paths is None and _is_ssl(cfg, stage):
        paths = [out_dir / "ssl.ckpt"]
    if paths is None:
        paths = [out_dir / f"{stage}.ckpt"] if _role(cfg, stage) else []  # synth_eval, fewshot write metrics only
    return [ref(p, cfg) for p in paths]


def stage_inputs(cfg: DictConfig, stage: str) -> list[ArtifactRef]:
    """The models and sets stage ``stage`` reads, from its config (only those that exist: a missing optional input,
    e.g. a judge not trained yet, is the stage's own business)."""
    paths: list[Any] = []
    if stage == "generator":
        if OmegaConf.select(cfg, "generator.eval.enabled", default=False):
            paths.append(_judge(cfg, "generator.eval.judge", "generator.guidance.classifier"))
        if _guided(cfg, "generator.guidance"):
            paths.append(cfg.generator.guidance.classifier)
    elif stage == "synthesize":
        paths.append(cfg.synthesis.generator_path)
        if _guided(cfg, "synthesis.guidance"):
            paths.append(cfg.synthesis.guidance.classifier)
    elif stage == "synth_eval":
        paths += [cfg.synth_eval.input, _judge(cfg, "synth_eval.judge", "synthesis.guidance.classifier")]
    elif stage in ("relabel", "pseudolabel"):
        if stage == "relabel":
            paths += [cfg.relabel.input] if isinstance(cfg.relabel.input, str) else list(cfg.relabel.input)
        paths += [v.checkpoint for v in cfg[stage].voters.values()]
    elif stage == "fewshot":
        from lightning_modules.stages.fewshot_stage import backbone_checkpoint

        paths.append(backbone_checkpoint(cfg))  # None for the untrained floor
    elif _is_ssl(cfg, stage):
        if cfg.mix.mode != "real_only":  # pretraining on synthetic faces too
            from lightning_modules.stages.classifier_stage import synthetic_sets

            paths += synthetic_sets(cfg)
    elif (role := _role(cfg, stage)) is not None:
        if role == "student" and cfg.mix.mode != "real_only":
            from lightning_modules.stages.classifier_stage import synthetic_sets

            paths += synthetic_sets(cfg)
        generator = OmegaConf.select(cfg, f"{role}.model.generator_path", default=None)
        if generator:  # FERAnno reads the generator's UNet and VAE
            paths.append(generator)
    refs, seen = [], set()
    for p in paths:
        if p is None or str(p) in seen or not Path(str(p)).exists():
            continue
        seen.add(str(p))
        refs.append(ref(p, cfg))
    return refs


def _guided(cfg: DictConfig, key: str) -> bool:
    g = OmegaConf.select(cfg, key)
    return g is not None and (float(g.classifier_scale) > 0 or float(g.au_scale) > 0 or float(g.embedding_scale) > 0)


def _judge(cfg: DictConfig, key: str, guide_key: str) -> Optional[Path]:
    from lightning_modules.generator.evaluation import resolve_judge

    try:
        return resolve_judge(str(OmegaConf.select(cfg, key)), cfg.paths.run_dir,
                             OmegaConf.select(cfg, guide_key)).checkpoint
    except ValueError:  # the stage reports a bad judge itself
        return None


def build_artifact(artifact: ArtifactRef):
    """The wandb Artifact of ``artifact``: its file or folder as unhashed references, plus the checksummed
    ``config.yaml`` of the stage folder when there is one; metadata: path and a names/sizes/mtimes fingerprint."""
    import wandb

    from lightning_modules.run.runtime import path_fingerprint

    path = Path(artifact.path).resolve()
    result = wandb.Artifact(artifact.name, type=artifact.type,
                            metadata={"path": str(path), "fingerprint": path_fingerprint(path)})
    result.add_reference(path.as_uri(), name=path.name, checksum=False)
    config = path.parent / CONFIG_FILE
    if config.is_file():
        result.add_reference(config.as_uri(), name=CONFIG_FILE, checksum=True)
    return result


def record(run, cfg: DictConfig, stage: str, out_dir: Path) -> None:
    """Declare the finished stage's inputs as used by ``run`` and log its outputs."""
    for artifact in stage_inputs(cfg, stage):
        use(run, build_artifact(artifact))
    for artifact in stage_outputs(cfg, stage, out_dir):
        if artifact.path.exists():
            run.log_artifact(build_artifact(artifact))
        else:
            log.warning("%s: no %s at %s to log as wandb artifact %s", stage, artifact.type, artifact.path,
                        artifact.name)


def use(run, artifact) -> None:
    """``run.use_artifact(artifact)``. wandb refuses use_artifact offline; the record it writes for an artifact
    built here (log it, then mark it used once committed) is what an offline run stores instead, and ``wandb
    sync`` replays it."""
    if run.offline:
        run._log_artifact(artifact, is_user_created=True, use_after_commit=True)
    else:
        run.use_artifact(artifact)


def run_key(cfg: DictConfig) -> str:
    """The stage's whole resolved config (minus ``RUN_KEY_IGNORED``), independent of the run folder's location."""
    from lightning_modules.run.runtime import config_hash

    return config_hash(cfg, [k for k in cfg.keys() if k not in RUN_KEY_IGNORED])


def wandb_run_id(cfg: DictConfig, out_dir: Path) -> str:
    """The id of the stage's wandb run: the previous one when that run did not finish and had this config (a
    requeued or killed job continues its run), else a new one; recorded in ``<out_dir>/wandb_run.json``."""
    from lightning_modules.run.runtime import DONE_MARKER, write_json_atomic

    path = Path(out_dir) / RUN_ID_FILE
    key = run_key(cfg)
    try:
        previous = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        previous = {}
    finished = (Path(out_dir) / DONE_MARKER).is_file()
    if previous.get("key") == key and previous.get("id") and not finished and not cfg.get("force", False):
        log.info("wandb: continuing run %s of this stage (same config, not finished)", previous["id"])
        return str(previous["id"])
    run_id = "".join(secrets.choice(ID_CHARS) for _ in range(8))  # wandb's own id format
    write_json_atomic(path, {"id": run_id, "key": key})
    return run_id


class StageWandbLogger(WandbLogger):
    """Lightning's WandbLogger that knows its stage, so ``trainer_setup.finish_loggers`` can record the lineage."""

    def __init__(self, cfg: DictConfig, stage: str, out_dir: Path, artifacts: bool, **kwargs: Any):
        super().__init__(**kwargs)
        self.stage_cfg, self.stage, self.out_dir, self.artifacts = cfg, stage, Path(out_dir), artifacts

    def record_lineage(self) -> None:
        """Inputs used and outputs logged (``logger.wandb.artifacts``); a file that cannot be referenced costs the
        lineage, with one warning, never the finished stage."""
        import wandb

        if not self.artifacts:
            return
        try:
            record(self.experiment, self.stage_cfg, self.stage, self.out_dir)
        except (OSError, ValueError, wandb.errors.Error) as err:  # e.g. the server unreachable online
            log.warning("%s: wandb lineage not recorded: %s", self.stage, err)

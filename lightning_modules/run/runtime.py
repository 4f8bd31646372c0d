"""What every stage shares: output folders and their locks, the config-hash marker, resume state, metrics.json
(the loggers and the Trainer: ``trainer_setup``)."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Optional

import lightning as L
from omegaconf import DictConfig, OmegaConf

DONE_MARKER = "stage_done.json"
log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A bad config value, raised before any work starts; the message names the key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config error at `{key}`: {message}")
        self.key = key


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(key, message)


def is_rank_zero() -> bool:
    """Before the Trainer exists: the process Lightning (or torchrun / SLURM) calls global rank 0."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def stage_dir(cfg: DictConfig, stage: str) -> Path:
    """``<run_dir>/<stage>``, created; inside ``stage_locks()`` also locked for this run (see there)."""
    path = Path(cfg.paths.run_dir) / stage
    path.mkdir(parents=True, exist_ok=True)
    if _lock_scopes:
        lock_folder(path)
    return path


# ------------------------------------------------------------------------------------------------ folder locks
LOCKS = ".locks"  # <run_dir>/.locks/<stage>.lock (+ .owner): a run that stops early leaves its stage folder as it was
_held_locks: dict[str, Any] = {}          # folder -> its FileLock, held by this process
_lock_scopes: list[list[str]] = []        # open stage_locks() scopes, outermost first: the folders each took


class FolderInUse(ConfigError):
    """Another live process holds the stage folder this run would write (and clear)."""

    def __init__(self, folder: Path, owner: str):
        super().__init__("experiment_name", f"{folder} is in use by another run ({owner}); wait for it to end, or "
                                            "give this run its own folder (experiment_name=... or output_root=...)")
        self.folder = folder


@contextmanager
def stage_locks():
    """While open, every ``stage_dir`` is locked for this process (rank 0 only: the ranks of one DDP run share their
    folders), so a second run of the same experiment stops with ``FolderInUse`` instead of clearing this run's
    checkpoints. Locks are released when the outermost scope closes; the OS releases them when the process dies
    (``flock``), so a killed run never blocks the next one."""
    _lock_scopes.append([])
    try:
        yield
    finally:
        for folder in _lock_scopes.pop():
            lock = _held_locks.pop(folder, None)
            if lock is not None:
                _owner_file(Path(folder)).unlink(missing_ok=True)
                lock.release()


def lock_folder(folder: Path) -> None:
    """Take ``folder``'s lock for the outermost open ``stage_locks()`` scope (a no-op when this process holds it,
    and on ranks other than 0); ``FolderInUse`` naming the holder's pid and host when another process does."""
    import socket

    from filelock import FileLock, Timeout

    key = str(Path(folder).resolve())
    if key in _held_locks or not is_rank_zero() or not _lock_scopes:
        return
    lock_path = _owner_file(Path(key)).with_suffix("")
    lock_path.parent.mkdir(exist_ok=True)
    lock = FileLock(str(lock_path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderInUse(Path(folder), _lock_owner(Path(key))) from None
    _held_locks[key] = lock
    _lock_scopes[0].append(key)
    # the lock file itself is truncated by every acquire attempt: the holder is described next to it
    write_json_atomic(_owner_file(Path(key)),
                      {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})


def _owner_file(folder: Path) -> Path:
    return folder.parent / LOCKS / f"{folder.name}.lock.owner"


def _lock_owner(folder: Path) -> str:
    try:
        owner = json.loads(_owner_file(folder).read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner["since"]))
        return f"pid {owner['pid']} on {owner['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet recorded its pid and host"


RUN_DIR_TOKEN = "<run_dir>"


def run_dir_of(cfg: DictConfig) -> Optional[str]:
    """``paths.run_dir`` resolved, or None where the config has none (a masked copy, a test config)."""
    try:
        value = OmegaConf.select(cfg, "paths.run_dir", default=None, throw_on_resolution_failure=False)
    except Exception:  # e.g. ${hydra:...} outside a Hydra run
        return None
    return str(value) if value is not None else None


def location_free(value: Any, run_dir: Optional[str]) -> Any:
    """``value`` (nested lists/dicts) with paths inside the run folder written as ``<run_dir>/...``: a stage's hash
    then means the same in a moved copy of the folder or in another run folder (``pipeline.reuse``)."""
    if run_dir is None:
        return value
    prefixes = sorted({run_dir.rstrip("/"), str(Path(run_dir).resolve())}, key=len, reverse=True)
    if isinstance(value, dict):
        return {k: location_free(v, run_dir) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [location_free(v, run_dir) for v in value]
    if isinstance(value, str):
        for prefix in prefixes:
            if value == prefix or value.startswith(prefix + "/"):
                return RUN_DIR_TOKEN + value[len(prefix):]
    return value


def config_hash(cfg: DictConfig, keys: Iterable[str]) -> str:
    """Hash of the resolved config subtrees a stage depends on (its skip-if-done key), independent of where the
    run folder is."""
    parts = {}
    for key in keys:
        value = OmegaConf.select(cfg, key)
        parts[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig) else value
    parts = location_free(parts, run_dir_of(cfg))
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def path_fingerprint(path: Path) -> str:
    """Names, sizes and modification times of a file or a folder's files (absent: "missing"): a retrained model or
    a rewritten synthetic set is a different input, found without reading gigabytes of weights."""
    path = Path(path)
    if not path.exists():
        return "missing"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    listing = [(str(p.relative_to(path.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def inputs_hash(cfg: DictConfig, keys: Iterable[str], inputs: Iterable[Path]) -> str:
    """``config_hash`` + the fingerprints of the files a stage reads (another stage's outputs)."""
    prints = [path_fingerprint(Path(p)) for p in inputs]
    return config_hash(cfg, keys) + "-" + hashlib.sha256("".join(prints).encode()).hexdigest()[:8]


def is_done(out_dir: Path, digest: str) -> bool:
    marker = out_dir / DONE_MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("config_hash") == digest
    except json.JSONDecodeError:
        return False


def finished_earlier(cfg: DictConfig, name: str, out_dir: Path, digest: str) -> bool:
    """Whether ``out_dir`` holds this config's finished run (its metrics included) and ``force`` is off; says so."""
    if cfg.get("force", False) or not (is_done(out_dir, digest) and (out_dir / "metrics.json").is_file()):
        return False
    log.info("%s: finished earlier with this config in %s; skipped (force=true reruns it)", name, out_dir)
    return True


def log_scalars(loggers, metrics: dict, prefix: str = "", step: Optional[int] = None) -> None:
    """The numbers of ``metrics`` (booleans, None and text left out) to every logger, ``prefix/`` before each key."""
    scalars = {f"{prefix}/{k}" if prefix else k: v for k, v in metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for lg in loggers:
        lg.log_metrics(scalars, step=step)
        lg.save()


def mark_done(out_dir: Path, digest: str, **extra: Any) -> None:
    write_json_atomic(out_dir / DONE_MARKER, {"config_hash": digest, "finished": time.time(), **extra})


def clear_stage(out_dir: Path, artifacts: Iterable[str] = (), keep_checkpoints: bool = False) -> None:
    """Forget a previous run of this stage: done marker, metrics, checkpoints (``checkpoints/`` and Lightning's SLURM
    ``hpc_ckpt_*.ckpt``), CSV log and the stage's ``artifacts`` (files or folders, e.g. ``teacher.ckpt``), so a rerun
    that dies is never reported with the old numbers, a later stage cannot load a model whose numbers are gone, and a
    requeued job never resumes another config's state. Call it only once the new run has built its config, data,
    model and Trainer: a rerun that fails on any of those must leave the finished run as it was.
    ``keep_checkpoints``: a resumed run keeps its checkpoints; its CSV log so far moves to
    ``csv/metrics.part<N>.csv``."""
    import shutil

    names = [DONE_MARKER, "metrics.json", *artifacts]
    if not keep_checkpoints:
        names += ["checkpoints", "csv", *(p.name for p in hpc_checkpoints(out_dir))]
    elif (out_dir / "csv" / "metrics.csv").is_file():  # Lightning's CSV logger deletes it when the run resumes
        part = len(list((out_dir / "csv").glob("metrics.part*.csv"))) + 1
        os.replace(out_dir / "csv" / "metrics.csv", out_dir / "csv" / f"metrics.part{part}.csv")
    for name in names:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def hpc_checkpoints(out_dir: Path) -> list[Path]:
    """The checkpoints Lightning's SLURM plugin writes into the Trainer's ``default_root_dir`` (the stage folder) on
    SIGUSR1 before a requeue: ``hpc_ckpt_<n>.ckpt``, oldest first."""
    found = [p for p in Path(out_dir).glob("hpc_ckpt_*.ckpt") if p.stem[len("hpc_ckpt_"):].isdigit()]
    return sorted(found, key=lambda p: int(p.stem[len("hpc_ckpt_"):]))


RESUME_STATE = "resume_state.json"


def resume_checkpoint(out_dir: Path, digest: str, enabled: bool = True) -> tuple[Optional[Path], str]:
    """``(checkpoint, "")`` when an unfinished earlier run of this stage had the resume key ``digest``: the newest of
    ``checkpoints/last.ckpt`` and the SLURM ``hpc_ckpt_*.ckpt`` (passed to ``fit`` explicitly, so Lightning's own
    SLURM auto-resume never picks a file on its own); else ``(None, why it starts from scratch)``. Read-only: the
    caller records the new key with ``start_resumable`` once the run is about to start."""
    last = out_dir / "checkpoints" / "last.ckpt"
    candidates = [p for p in [last, *hpc_checkpoints(out_dir)] if p.is_file()]
    if not enabled:
        return None, "resuming is off"
    if not candidates:
        return None, "no checkpoint of an earlier run"
    try:
        same = json.loads((out_dir / RESUME_STATE).read_text()).get("config_hash") == digest
    except (FileNotFoundError, json.JSONDecodeError):
        same = False
    newest = max(candidates, key=lambda p: p.stat().st_mtime_ns)
    if not same:
        return None, f"the config changed since {newest} was written"
    return newest, ""


def start_resumable(out_dir: Path, digest: str) -> None:
    """Record the resume key of the run that starts now (after ``clear_stage`` on a fresh start)."""
    write_json_atomic(out_dir / RESUME_STATE, {"config_hash": digest})


def log_start(stage: str, resume: Optional[Path], why: str) -> None:
    """One rank-zero line: which checkpoint the stage resumes (epoch, step), or why it starts from scratch."""
    if not is_rank_zero():
        return
    if resume is None:
        log.info("%s: starting from scratch (%s)", stage, why)
        return
    import torch

    state = torch.load(resume, map_location="cpu", weights_only=False, mmap=True)
    log.info("%s: resuming from %s (epoch %s, step %s)", stage, resume, state.get("epoch"), state.get("global_step"))


# What a finished stage's model file does not need: the training state (Adam alone doubles a resnet18's size).
TRAINING_STATE_KEYS = ("optimizer_states", "lr_schedulers", "callbacks", "loops")


def export_weights(checkpoint: Path, dest: Path) -> None:
    """Write ``checkpoint`` to ``dest`` without its training state, atomically; ``load_from_checkpoint`` reads it as
    before (weights + hyper-parameters), resuming a fit uses ``checkpoints/last.ckpt`` instead."""
    import torch
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    for key in TRAINING_STATE_KEYS:
        state.pop(key, None)
    tmp = dest.with_name(dest.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, dest)


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default))
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def save_resolved_config(cfg: DictConfig, out_dir: Path) -> None:
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


def record_stage(trainer: L.Trainer, out_dir: Path, metrics: dict[str, Any], digest: str) -> None:
    """Rank 0: metrics.json, then the done marker (a marker never points at missing numbers)."""
    if trainer.is_global_zero:
        write_metrics(out_dir, metrics)
        mark_done(out_dir, digest)


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts to one level with '/'-joined keys (metrics.json is flat)."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}/{k}" if prefix else str(k), v, out)
    else:
        if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
            value = value.item()
        if isinstance(value, float) and math.isnan(value):
            value = None
        out[prefix] = value
    return out


def write_metrics(out_dir: Path, metrics: dict[str, Any]) -> Path:
    path = out_dir / "metrics.json"
    write_json_atomic(path, flatten("", metrics, {}))
    return path

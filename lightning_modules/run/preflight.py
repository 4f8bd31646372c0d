"""What ``train.py`` checks before a stage runs, and how it tells user errors from bugs.

A user error (a bad config value, a bad or missing data file) is reported as one line on stderr with exit status 2;
anything else is a bug and keeps its full traceback (exit status 1). ``HYDRA_FULL_ERROR=1`` adds the traceback to a
user error too, for debugging.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

from datamodules.errors import DataError
from lightning_modules.run.runtime import ConfigError, is_rank_zero, require, stage_locks

USER_ERRORS = (ConfigError, DataError)  # DataFileNotFound is a DataError
EXIT_USER_ERROR = 2
EXIT_BUG = 1

# What to pass for `???` keys whose meaning is not obvious from the name.
MISSING_HINTS = {
    "data.root": "the folder holding the dataset files of data.format",
    "generator.model.pretrained_path": "a local Stable Diffusion folder in diffusers layout",
}


def missing_value_error(exc: MissingMandatoryValue | InterpolationToMissingValueError) -> ConfigError:
    """An unset ``???`` key as a ConfigError naming the full key and what to pass."""
    key = exc.full_key or "?"
    if isinstance(exc, InterpolationToMissingValueError):  # e.g. `a: ${b}` with b unset: name both
        return ConfigError(key, f"refers to a value that is not set ({one_line(exc.msg)})")
    hint = f" ({MISSING_HINTS[key]})" if key in MISSING_HINTS else ""
    return ConfigError(key, f"is required but not set: pass {key}=<value> on the command line{hint}")


def user_error(exc: Optional[BaseException]) -> Optional[Exception]:
    """The user error behind ``exc``: itself, or one in its ``__cause__``/``__context__`` chain (Hydra's
    InstantiationException wraps the datamodule's own exception), else None (a bug)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, USER_ERRORS):
            return exc
        if isinstance(exc, (MissingMandatoryValue, InterpolationToMissingValueError)):
            return missing_value_error(exc)
        exc = exc.__cause__ if exc.__cause__ is not None else (None if exc.__suppress_context__ else exc.__context__)
    return None


def one_line(message: Any) -> str:
    return re.sub(r"\s*\n\s*", " ", str(message).strip())


def user_message(err: Exception) -> str:
    """ConfigError carries its own ``config error at `key`:`` prefix; data errors get ``error:``."""
    text = one_line(err)
    return text if isinstance(err, ConfigError) else f"error: {text}"


def report(exc: BaseException) -> int:
    """Print ``exc`` the way its kind deserves and return the exit status: 2 for a user error, 1 for a bug."""
    found = user_error(exc)
    if found is None:
        traceback.print_exception(exc, file=sys.stderr)
        return EXIT_BUG
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exception(exc, file=sys.stderr)
    print(user_message(found), file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


# ----------------------------------------------------------------------------------------------------------- trainer
def _device_ids(text: str) -> Optional[list[int]]:
    """Lightning's string forms: "2", "-1", "0,1" (trailing comma allowed)."""
    parts = [p.strip() for p in text.split(",")]
    if parts and parts[-1] == "" and len(parts) > 1:
        parts = parts[:-1]
    if not parts or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        return None
    return [int(p) for p in parts]


def check_trainer(cfg: DictConfig) -> None:
    """``trainer.devices`` / ``trainer.num_nodes`` before any stage work (Lightning would stop only after the stage
    has read its data, with a traceback)."""
    trainer = cfg.get("trainer")
    if trainer is None:
        return
    accelerator = str(trainer.get("accelerator", "auto"))
    devices = trainer.get("devices", "auto")
    if isinstance(devices, ListConfig):
        devices = OmegaConf.to_container(devices)
    cpu = accelerator == "cpu"
    expected = ("a number of devices >= 1 or 'auto'" if cpu else
                "a number of devices >= 1, -1 (all), a list of device indices, or 'auto'")
    ok = False
    if isinstance(devices, bool):
        ok = False
    elif isinstance(devices, int):
        ok = devices >= 1 or (devices == -1 and not cpu)
    elif isinstance(devices, str):
        ids = _device_ids(devices)
        ok = devices.strip() == "auto" or (ids is not None and (
            (len(ids) == 1 and (ids[0] >= 1 or (ids[0] == -1 and not cpu))) or
            (len(ids) > 1 and not cpu and min(ids) >= 0 and len(set(ids)) == len(ids))))
    elif isinstance(devices, list):
        ok = (not cpu and len(devices) > 0 and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                   for d in devices) and len(set(devices)) == len(devices))
    require(ok, "trainer.devices", f"must be {expected} with trainer.accelerator={accelerator}, got {devices!r}")
    nodes = trainer.get("num_nodes", 1)
    require(isinstance(nodes, int) and not isinstance(nodes, bool) and nodes >= 1, "trainer.num_nodes",
            f"must be an integer >= 1, got {nodes!r}")


# --------------------------------------------------------------------------------------------------------- AU source
AU_STAGES = ("teacher", "generator", "synthesize", "relabel", "student", "pipeline", "annotate_aus")


def resolve_au_source(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` with ``data.au_source`` resolved (null: sidecar when data.openface is set or the data are
    toy faces, else none) and, for ``annotate``, ``data.openface`` pointing at the csv stage ``annotate_aus`` writes
    for this config. Bad combinations are ConfigErrors naming the key; one log line says where the AUs come from."""
    import copy
    import logging

    from omegaconf import open_dict

    from datamodules.real import au_source_problem, resolve_au_source as resolve

    data = cfg.get("data")
    if data is None or "au_source" not in data or cfg.get("stage") not in AU_STAGES:
        return cfg
    fmt, source, openface = data.format, data.au_source, data.openface
    if source == "annotate":
        require(openface is None, "data.openface",
                f"is set ({openface}) but data.au_source=annotate reads the csv stage annotate_aus writes; unset "
                "data.openface, or choose data.au_source=sidecar to read this csv")
        problem = au_source_problem(fmt, source, "the annotate_aus csv")  # e.g. toy faces: before any detector work
        if problem is not None:
            raise ConfigError(*problem)
        from lightning_modules.stages.annotate_stage import sidecar_path

        openface = str(sidecar_path(cfg))
        if cfg.stage not in ("pipeline", "annotate_aus"):
            require(Path(openface).is_file(), "data.au_source",
                    f"annotate: no annotated AU csv for this data and detector yet ({openface}); run "
                    "stage=annotate_aus first (stage=pipeline runs it)")
    elif cfg.stage == "annotate_aus":
        raise ConfigError("data.au_source", f"stage=annotate_aus writes the AU csv of data.au_source=annotate, got "
                                            f"{source or 'null'}; set data.au_source=annotate")
    problem = au_source_problem(fmt, source, openface)
    if problem is not None:
        raise ConfigError(*problem)
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.data.au_source, out.data.openface = resolve(fmt, source, openface), openface
    why = {"sidecar": f"OpenFace csv {openface}" if openface else "the toy faces' ground truth",
           "annotate": f"the suite's AU detector, csv {openface}",
           "none": "no AUs: text/label conditioning only, AU metrics skipped"}[out.data.au_source]
    if is_rank_zero():
        logging.getLogger(__name__).info("data.au_source=%s (%s)", out.data.au_source, why)
    return out


# -------------------------------------------------------------------------------------------------------- run folder
def check_writable_dir(path: Path) -> Optional[str]:
    """None if ``path`` is (now) a folder we can write to, else why not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        return err.strerror or type(err).__name__
    return None


class RunFolderCheck(Callback):
    """Hydra creates the run folder and its log file before the task runs, so an uncreatable ``output_root`` would
    end in Hydra's own traceback; this checks the folder first and reports it as a user error. Each job holds the
    locks of the stage folders it writes until it ends (``runtime.stage_locks``): a second run of the same experiment
    stops with a one-line error naming the folder and the process holding it."""

    def __init__(self) -> None:
        self._locks = contextlib.ExitStack()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._locks.enter_context(stage_locks())

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        self._locks.close()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, dir_key: str) -> None:
        try:
            folder = OmegaConf.select(config, dir_key)
            overrides = [*(OmegaConf.select(config, "hydra.overrides.task", default=[]) or []),
                         *(OmegaConf.select(config, "hydra.overrides.hydra", default=[]) or [])]
        except Exception:  # an unresolvable folder is Hydra's to report
            return
        if folder is None:
            return
        why = check_writable_dir(Path(str(folder)))
        if why is None:
            return
        key = dir_key if any(o.startswith(f"{dir_key}=") for o in overrides) else "output_root"
        err = ConfigError(key, f"cannot create or write the run folder {folder} ({why}); choose a writable folder")
        sys.exit(report(err))

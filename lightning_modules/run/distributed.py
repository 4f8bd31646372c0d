"""Several processes through one run: barriers between pipeline steps, Hydra sweeps whose jobs use DDP, and sweep
folders that every rank and node agrees on.

Lightning's DDP launcher starts the other ranks of a job (when no cluster started them) by running ``train.py``
again with the parent's command line. In a ``--multirun`` sweep that command would start a sweep of its own in
every child; the parent therefore exports the job it is running (``JOB_ENV``) and a child rewrites its command
line into that one job (``child_argv``).
"""
from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Callable, Iterator, Optional

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

SWEEP_ID_ENV = "SYNFER_SWEEP_ID"  # the sweep folder's name, shared by every process of one sweep
JOB_ENV = "SYNFER_HYDRA_JOB"      # the multirun job a parent runs, for the DDP children it starts
# What Lightning's DDP launcher writes into the parent's environment; left there, the next job of a sweep would
# take itself for an externally started rank and wait for children that never come.
LAUNCH_ENV = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# Overrides that belong to the sweep, not to one of its jobs: a child runs its job in run mode.
SWEEP_ONLY = ("hydra.sweep", "hydra.launcher", "hydra/launcher", "hydra.sweeper", "hydra/sweeper", "hydra.mode",
              "hydra.run", "hydra.job.name", "hydra.output_subdir", "hydra.job.num", "hydra.job.id")


def sweep_id(pattern: str = "%Y-%m-%d_%H-%M-%S") -> str:
    """The sweep folder's name: ``$SYNFER_SWEEP_ID`` when set, else the SLURM job (and step), else the current
    time in ``pattern``. The value is exported, so processes started later (DDP ranks, submitit jobs, which inherit
    the submitting environment) name the same folder, where each computing its own time would not."""
    value = os.environ.get(SWEEP_ID_ENV)
    if not value:
        job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID", "")
        if job:
            value = f"slurm{job}" + (f".{step}" if step.isdigit() else "")
        else:
            value = datetime.now().strftime(pattern)
        os.environ[SWEEP_ID_ENV] = value
    return value


OmegaConf.register_new_resolver("sweep_id", sweep_id, use_cache=True, replace=True)


def _is_sweep_only(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return any(key == k or key.startswith(k + ".") for k in SWEEP_ONLY)


def _quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@contextmanager
def sweep_job() -> Iterator[None]:
    """Around one job of a Hydra multirun: export the job (its overrides and output folder) for the DDP children
    Lightning may start, and afterwards restore what Lightning's launcher set in the environment. Outside a
    multirun: nothing."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        yield
        return
    hc = HydraConfig.get()
    saved = {key: os.environ.get(key) for key in (*LAUNCH_ENV, JOB_ENV)}
    os.environ[JOB_ENV] = json.dumps({
        "parent": os.getpid(), "output_dir": str(hc.runtime.output_dir),
        "overrides": [*(o for o in hc.overrides.hydra if not _is_sweep_only(o)), *hc.overrides.task]})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def child_argv(argv: list[str]) -> list[str]:
    """``argv`` of a process Lightning started as another rank of a multirun job (``LOCAL_RANK`` set, the job
    exported by its parent process): that one job in run mode, in the job's folder. Anything else: unchanged."""
    payload = os.environ.get(JOB_ENV)
    if "LOCAL_RANK" not in os.environ or not payload:
        return argv
    job = json.loads(payload)
    if job.get("parent") != os.getppid():  # inherited by an unrelated process further down
        return argv
    return [argv[0], *job["overrides"], f"hydra.run.dir={_quoted(job['output_dir'])}", "hydra.output_subdir=null",
            f"hydra.job.name=train_ddp_process_{os.environ['LOCAL_RANK']}"]


_BARRIER_GROUP: dict = {}


def _barrier_group(seconds: float):
    """A gloo group over all ranks whose timeout is ``seconds`` (rank 0 checks the others against the barrier's own
    timeout, the others wait for rank 0 up to the group's): NCCL's barrier takes no timeout, and a CPU wait needs no
    GPU. Made by every rank at the same barrier, once per process group and timeout."""
    import torch.distributed as dist

    world = dist.group.WORLD
    if _BARRIER_GROUP.get("world") is not world or _BARRIER_GROUP.get("seconds") != seconds:
        _BARRIER_GROUP.update(world=world, seconds=seconds,
                              group=dist.new_group(backend="gloo", timeout=timedelta(seconds=seconds)))
    return _BARRIER_GROUP["group"]


def distributed_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier(what: str, seconds: float) -> None:
    """All ranks wait here for each other, at most ``seconds``; a rank that does not arrive (crashed, or still busy
    with rank-0-only work) is a TimeoutError naming ``what``."""
    import torch.distributed as dist

    try:
        dist.monitored_barrier(group=_barrier_group(seconds), timeout=timedelta(seconds=seconds))
    except RuntimeError as err:
        raise TimeoutError(f"rank {dist.get_rank()}: the processes did not all reach the barrier after {what} "
                           f"within {seconds:g} s (pipeline.barrier_timeout_seconds), or one failed: {err}") from err


def wait_for(done: Callable[[], bool], what: str, seconds: float, poll: float = 1.0) -> None:
    """Poll ``done`` until it holds, at most ``seconds``; then a TimeoutError naming ``what``."""
    deadline = time.monotonic() + seconds
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited more than {seconds:g} s for {what} (pipeline.barrier_timeout_seconds)")
        time.sleep(poll)


def after_step(label: str, done: Optional[Callable[[], bool]], ran_here: bool, seconds: float) -> None:
    """End of a pipeline step: the next step starts on no rank before this one finished on all, rank 0's saving
    and evaluation included. With a process group (Lightning made one in an earlier step) that is a barrier. Without
    one, a rank other than 0 that ran the step itself waits until ``done`` (rank 0's done marker): the ranks of a
    cluster launch (srun, torchrun) all start at the first step, before any Trainer joined them. A rank that skipped
    the step found it finished (or skipped it for the same reason as rank 0) and has nothing to wait for."""
    from lightning_modules.run import runtime

    if distributed_ready():
        barrier(f"pipeline step {label}", seconds)
    elif ran_here and done is not None and not runtime.is_rank_zero():
        log.info("pipeline: waiting for rank 0 to finish %s", label)
        wait_for(done, f"rank 0 to finish pipeline step {label}", seconds)


def log_on_rank_zero_only() -> None:
    """Other ranks keep warnings and errors only: the stages' progress lines appear once per run (rank 0's, in
    Hydra's job log) instead of once per process."""
    from lightning_modules.run.runtime import is_rank_zero

    if not is_rank_zero():
        logging.getLogger().setLevel(logging.WARNING)

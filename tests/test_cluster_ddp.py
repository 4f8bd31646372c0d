"""Cluster runs: barriers between pipeline steps, a DDP pipeline killed mid-synthesis and rerun, Hydra sweeps whose
jobs use DDP (no nested sweeps, one sweep folder), the SLURM launcher config, and the metric train.py returns."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import CONFIG_DIR, REPO, TINY, compose
from lightning_modules.run import distributed
from lightning_modules.run.runtime import ConfigError

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}


# ------------------------------------------------------------------------------------------- waits between steps
@pytest.fixture
def rank(monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    def set_rank(value: int):
        monkeypatch.setattr(rank_zero_only, "rank", value)

    return set_rank


@pytest.mark.parametrize("rank_id, ran_here, marker_after, waits", [
    (1, True, 0.3, True),     # rank 1 ran a step outside any process group: it waits for rank 0's marker
    (0, True, None, False),   # rank 0 wrote the marker itself
    (1, False, None, False),  # rank 1 found the step finished (or skipped it as rank 0 did): nothing to wait for
])
def test_without_a_process_group_other_ranks_wait_for_rank_zeros_marker(rank, tmp_path, rank_id, ran_here,
                                                                        marker_after, waits):
    rank(rank_id)
    marker = tmp_path / "stage_done.json"
    if marker_after is not None:
        threading.Timer(marker_after, marker.touch).start()
    start = time.monotonic()
    distributed.after_step("generator", marker.is_file, ran_here, seconds=10)
    assert (time.monotonic() - start >= marker_after) if waits else (time.monotonic() - start < 0.2)


def test_a_rank_zero_that_never_finishes_is_a_timeout_naming_the_step(rank, tmp_path):
    rank(1)
    with pytest.raises(TimeoutError, match="pipeline step synthesize.*barrier_timeout_seconds"):
        distributed.after_step("synthesize", (tmp_path / "never").is_file, True, seconds=0.3)


BARRIER_RANK = """
import os, sys, time
import torch.distributed as dist
from lightning_modules.run import distributed
rank = int(sys.argv[1])
dist.init_process_group("gloo", rank=rank, world_size=2)
for delay, seconds in ((1.0, 20.0), (3.0, 0.5)):  # rank 0 alone saves and evaluates for `delay` seconds
    distributed.barrier("warm-up", seconds)  # both ranks make the barrier group here
    if rank == 0:
        time.sleep(delay)
    try:
        distributed.barrier("pipeline step generator", seconds)
        print(f"passed {seconds}", flush=True)
    except TimeoutError as err:
        print(f"timeout {seconds}: {err}", flush=True)
        break
"""


@pytest.mark.slow
@pytest.mark.ddp
def test_other_ranks_wait_for_rank_zero_at_the_barrier_up_to_the_timeout():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    procs = [subprocess.Popen([sys.executable, "-c", BARRIER_RANK, str(r)], cwd=REPO, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in (0, 1)]
    outs = [p.communicate(timeout=120)[0].splitlines() for p in procs]
    assert outs[1][0] == "passed 20.0"  # waited about a second for rank 0
    assert outs[1][1].startswith("timeout 0.5: rank 1:") and "pipeline step generator" in outs[1][1]
    assert "barrier_timeout_seconds" in outs[1][1]


@pytest.mark.parametrize("key, value", [
    ("pipeline.barrier_timeout_seconds", "0"), ("pipeline.barrier_timeout_seconds", "true"),
    ("pipeline.barrier_timeout_seconds", "soon"), ("pipeline.monitor", "nobody"),
])
def test_bad_pipeline_wait_and_monitor_settings_name_their_key(tiny_cfg, key, value):
    from lightning_modules.stages.pipeline import run_pipeline

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_pipeline(tiny_cfg("stage=pipeline", f"{key}={value}"))


# ------------------------------------------------------------------- a DDP pipeline killed mid-synthesis, rerun
SYNTH = ["synthesis.plan.size=48", "synthesis.plan.scale=null", "synthesis.chunk_size=4", "synthesis.batch_size=2",
         "synthesis.sample.steps=6", "synthesis.progress=false"]


def _set(directory: Path) -> dict:
    """Every column of every row, in order; images as pixel arrays."""
    import datasets
    from PIL import Image

    from datamodules.synthetic import load_synthetic

    rows = load_synthetic(directory).cast_column("image", datasets.Image(decode=False)).to_dict()
    rows["image"] = [np.asarray(Image.open(io.BytesIO(image["bytes"])), dtype=np.int16) for image in rows["image"]]
    return rows


def assert_same_set(made: dict, expected: dict):
    """Equal column by column. Pixels may differ by one intensity level: Lightning gives each DDP rank
    cores // ranks torch threads, the in-process reference all cores, and float sums then round differently."""
    made_images, expected_images = made.pop("image"), expected.pop("image")
    assert made == expected
    assert len(made_images) == len(expected_images)
    for i, (a, b) in enumerate(zip(made_images, expected_images)):
        assert a.shape == b.shape and int(np.abs(a - b).max()) <= 1, f"face {i} differs"


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_pipeline_killed_mid_synthesis_resumes_to_the_uninterrupted_set(tmp_path):
    """Two gloo ranks: teacher, generator (rank 0 saves and evaluates it while rank 1 waits), synthesis; the whole
    process group is killed once the first shards are written; the rerun skips the finished steps, makes only the
    missing faces and ends with the set one uninterrupted process makes from the same generator."""
    from datamodules.synthetic import read_manifest
    from lightning_modules.stages.synthesize_stage import run_synthesize_stage

    cmd = [sys.executable, "train.py", "stage=pipeline", "trainer=ddp_cpu", *TINY, *SYNTH,
           "pipeline.stages=[teacher,generator,synthesize]", f"output_root={tmp_path}", "experiment_name=run"]
    run = tmp_path / "run"
    dataset = run / "synthesize" / "dataset"
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # its own process group: the DDP child dies with it
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (dataset / "manifest.json").is_file() and read_manifest(dataset)["count"] >= 4:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    written = read_manifest(dataset)["count"]
    assert 0 < written < 48 and read_manifest(dataset)["meta"]["complete"] is False
    assert "eval/fid" in json.loads((run / "generator" / "metrics.json").read_text())  # rank 0's evaluation ran

    rerun = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    log = rerun.stdout + rerun.stderr
    assert "teacher is done" in log and "generator is done" in log and "resuming" in log
    metrics = json.loads((run / "synthesize" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["generated_now"] == 48 - written

    reference = compose([*TINY, *SYNTH, "stage=synthesize", f"synthesis.generator_path={run / 'generator' / 'pipeline'}"],
                        tmp_path / "reference")
    run_synthesize_stage(reference)
    made, expected = _set(dataset), _set(tmp_path / "reference" / "synthesize" / "dataset")
    assert len(made["sample_id"]) == 48
    assert_same_set(made, expected)


# --------------------------------------------------------------------------------- sweeps whose jobs use DDP
@pytest.mark.parametrize("env, expected", [
    ({distributed.SWEEP_ID_ENV: "given"}, "given"),
    ({"SLURM_JOB_ID": "123", "SLURM_STEP_ID": "0"}, "slurm123.0"),
    ({"SLURM_JOB_ID": "123"}, "slurm123"),
])
def test_sweep_id_is_shared_through_the_environment(monkeypatch, env, expected):
    for key in (distributed.SWEEP_ID_ENV, "SLURM_JOB_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.sweep_id() == expected
    assert os.environ[distributed.SWEEP_ID_ENV] == expected  # processes started later name the same folder


def test_sweep_id_falls_back_to_the_time_once(monkeypatch):
    for key in (distributed.SWEEP_ID_ENV, "SLURM_JOB_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(key, raising=False)
    first = distributed.sweep_id("%Y-%m-%d_%H-%M-%S-%f")
    time.sleep(0.01)
    assert distributed.sweep_id("%Y-%m-%d_%H-%M-%S-%f") == first and len(first) == 26


@pytest.fixture
def multirun_job(tmp_path):
    """HydraConfig of job 1 of a multirun (``seed=0,1``) with a launcher override, as the parent process sees it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["stage=student", "seed=1", "data.root='a dir'", "hydra/launcher=slurm",
                                                 "hydra.job.chdir=false"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.runtime.output_dir = str(tmp_path / "multirun" / "x" / "1")
    saved = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    yield cfg
    HydraConfig.instance().cfg = saved


def test_a_multirun_jobs_ddp_children_run_that_job_and_the_launch_env_is_restored(multirun_job, monkeypatch):
    for key in distributed.LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "cluster-node")  # set before the job (a cluster's): kept
    sweep_argv = ["train.py", "--multirun", "stage=student", "seed=0,1", "hydra/launcher=slurm"]
    with distributed.sweep_job():
        os.environ.update(LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="4242")  # Lightning
        assert distributed.child_argv(sweep_argv) == sweep_argv  # this process itself is no child
        monkeypatch.setenv("LOCAL_RANK", "1")
        monkeypatch.setattr(os, "getppid", os.getpid)  # as seen from a child this process started
        child = distributed.child_argv(sweep_argv)
        monkeypatch.undo()
    out = multirun_job.hydra.runtime.output_dir
    assert child == ["train.py", "hydra.job.chdir=false", "stage=student", "seed=1", "data.root='a dir'",
                     f'hydra.run.dir="{out}"', "hydra.output_subdir=null", "hydra.job.name=train_ddp_process_1"]
    assert os.environ.get("MASTER_ADDR") is None or os.environ["MASTER_ADDR"] != "127.0.0.1"
    assert all(k not in os.environ for k in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", distributed.JOB_ENV))


def test_an_inherited_job_export_is_ignored_outside_the_jobs_children(multirun_job, monkeypatch):
    with distributed.sweep_job():
        monkeypatch.setenv("LOCAL_RANK", "1")
        argv = ["train.py", "stage=teacher"]
        assert distributed.child_argv(argv) == argv  # the exporting process is not its parent


@pytest.mark.slow
@pytest.mark.ddp
def test_multirun_with_ddp_runs_exactly_one_two_rank_job_per_sweep_point(tmp_path):
    tiny = [o for o in TINY if not o.startswith("data.toy.n_")]
    cmd = [sys.executable, "train.py", "--multirun", "stage=student", "trainer=ddp_cpu", *tiny, "data.toy.n_train=64",
           "data.toy.n_val=32", "data.toy.n_test=32", "seed=0,1", f"output_root={tmp_path}", "experiment_name=sweep"]
    proc = subprocess.run(cmd, cwd=REPO, env={k: v for k, v in ENV.items() if k != distributed.SWEEP_ID_ENV},
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((tmp_path / "sweep" / "multirun").iterdir())
    assert len(sweeps) == 1, sweeps  # no child started a sweep of its own
    assert sorted(p.name for p in sweeps[0].iterdir() if not p.name.startswith(".")) == ["0", "1", "multirun.yaml"]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("metrics.json")) == [
        Path("sweep/multirun") / sweeps[0].name / job / "student" / "metrics.json" for job in ("0", "1")]
    for seed in (0, 1):
        job = sweeps[0] / str(seed) / "student"
        assert json.loads((job / "metrics.json").read_text())["world_size"] == 2
        assert yaml.safe_load((job / "config.yaml").read_text())["seed"] == seed
        assert (job / "stage_done.json").is_file()


# ---------------------------------------------------------------------------------------- SLURM launcher config
def test_slurm_launcher_config_gives_one_task_per_device_on_each_node(tmp_path, monkeypatch):
    """Composed with the real config tree and turned into the sbatch script submitit would submit (no submission)."""
    import shutil

    import hydra
    import submitit
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                                 "trainer.num_nodes=2", "experiment_name=scale",
                                                 f"output_root={tmp_path}"], return_hydra_config=True)
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    params = launcher.params
    assert (params["tasks_per_node"], params["nodes"], params["gpus_per_node"]) == (4, 2, 4)
    assert params["submitit_folder"].startswith(f"{tmp_path}/scale/multirun/")
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/bin/srun" if name == "srun" else which(name))
    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    base = set(OmegaConf.structured(BaseQueueConf).keys())  # the launcher's own mapping of its parameters
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python train.py", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --job-name=scale", "#SBATCH --signal=USR1@120"):  # Lightning's requeue signal
        assert line in script
    assert "USR2" not in script  # submitit's own signal would not reach Lightning's requeue handler


# ----------------------------------------------------------------------------------- the metric train.py returns
def _write(path: Path, payload: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.json").write_text(json.dumps(payload))


@pytest.mark.parametrize("stage, result, files, expected", [
    ("teacher", {"best_val_acc": 0.5, "test/acc": 0.4}, {}, 0.5),
    ("student", {"best_val_acc": None}, {}, None),                      # no best checkpoint: no value
    ("generator", {"val_loss": 0.25}, {}, 0.25),
    ("synth_eval", {"skipped": True}, {"synth_eval": {"fer_acc": 0.75}}, 0.75),  # finished earlier: its file
    ("synthesize", {"images": 48}, {}, None),
    ("ssl", {"probe": {"pretrained": {"val": {"acc": 0.375}}}}, {}, 0.375),  # the stage returns nested metrics
    ("ssl", {"skipped": True}, {"ssl": {"probe/pretrained/val/acc": 0.5}}, 0.5),
    ("clip", {"skipped": True}, {"clip": {"zeroshot/after/val/acc": 0.25}}, 0.25),
    ("pipeline", {}, {"student_mix": {"best_val_acc": 0.6}, "student": {"best_val_acc": 0.9}}, 0.6),
    ("pipeline", {}, {"student": {"best_val_acc": 0.9}}, None),         # the monitored student has no metrics
])
def test_train_returns_the_stages_monitored_metric(tiny_cfg, tmp_path, rank, stage, result, files, expected):
    import train

    rank(0)
    for folder, payload in files.items():
        _write(tmp_path / "run" / folder, payload)
    assert train.monitored_metric(tiny_cfg(f"stage={stage}"), result) == expected


def test_pipeline_metric_is_the_monitored_students_mean_over_seeds(tiny_cfg, tmp_path, rank):
    import train

    rank(0)
    for name, acc in [("student_seed0", 0.9), ("student_mix_seed0", 0.5), ("student_mix_seed1", 0.7)]:
        _write(tmp_path / "run" / name, {"best_val_acc": acc})
    seeded = ("stage=pipeline", "pipeline.student_seeds=[0,1]")
    assert train.monitored_metric(tiny_cfg(*seeded), {}) == pytest.approx(0.6)
    _write(tmp_path / "run" / "student_seed1", {"best_val_acc": 0.8})
    assert train.monitored_metric(tiny_cfg(*seeded, "pipeline.monitor=student"), {}) == pytest.approx(0.85)
    rank(1)  # the other ranks return nothing: rank 0 reports the run
    assert train.monitored_metric(tiny_cfg(*seeded), {}) is None


@pytest.mark.slow
def test_the_hydra_entry_point_returns_the_metric_a_sweeper_optimises(tiny_cfg, tmp_path):
    import train

    value = train.main(tiny_cfg("stage=student"))
    metrics = json.loads((tmp_path / "run" / "student" / "metrics.json").read_text())
    assert isinstance(value, float) and value == metrics["best_val_acc"]


@pytest.mark.parametrize("rank, info_shown", [(0, True), (1, False)])
def test_only_rank_zero_logs_progress_lines(monkeypatch, rank, info_shown):
    import logging

    from lightning.pytorch.utilities import rank_zero_only

    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)
    monkeypatch.setattr(rank_zero_only, "rank", rank, raising=False)
    try:
        distributed.log_on_rank_zero_only()
        stage_log = logging.getLogger("lightning_modules.stages.pipeline")
        assert stage_log.isEnabledFor(logging.INFO) is info_shown
        assert stage_log.isEnabledFor(logging.WARNING)  # warnings and errors still come from every rank
    finally:
        root.setLevel(before)  # setLevel also clears the loggers' cached answers

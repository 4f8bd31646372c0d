"""Preemption-safe classifier runs: which checkpoint a rerun resumes (last.ckpt or SLURM's hpc_ckpt_*), stale SLURM
checkpoints never reach a changed config, a SIGKILLed teacher resumes mid-epoch to the uninterrupted result, and
two runs never share a stage folder."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from conftest import REPO, TINY, EpochProbe, KillAtEpoch, compose, with_trainer_callbacks
from lightning_modules.run import runtime
from lightning_modules.run.runtime import FolderInUse

pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------- which checkpoint a rerun resumes
def _write(path: Path, age_s: float) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"ckpt")
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


RESUME_CASES = {  # id -> (files with their age in s, resume key matches, resume on, expected file or why not)
    "last only": ({"checkpoints/last.ckpt": 5}, True, True, "checkpoints/last.ckpt"),
    "hpc newer than last": ({"checkpoints/last.ckpt": 9, "hpc_ckpt_1.ckpt": 5, "hpc_ckpt_2.ckpt": 1}, True, True,
                            "hpc_ckpt_2.ckpt"),
    "last newer than hpc": ({"checkpoints/last.ckpt": 1, "hpc_ckpt_1.ckpt": 5}, True, True, "checkpoints/last.ckpt"),
    "hpc only": ({"hpc_ckpt_3.ckpt": 1}, True, True, "hpc_ckpt_3.ckpt"),
    "nothing": ({}, True, True, "no checkpoint of an earlier run"),
    "config changed": ({"checkpoints/last.ckpt": 9, "hpc_ckpt_1.ckpt": 1}, False, True,
                       "the config changed since {out}/hpc_ckpt_1.ckpt was written"),
    "resume off": ({"hpc_ckpt_1.ckpt": 1}, True, False, "resuming is off"),
}


@pytest.mark.parametrize("case", list(RESUME_CASES), ids=list(RESUME_CASES))
def test_a_rerun_resumes_the_newest_checkpoint_of_its_config(tmp_path, case):
    files, same, enabled, expected = RESUME_CASES[case]
    for rel, age in files.items():
        _write(tmp_path / rel, age)
    runtime.start_resumable(tmp_path, "this-config" if same else "other-config")
    resume, why = runtime.resume_checkpoint(tmp_path, "this-config", enabled=enabled)
    if expected.endswith(".ckpt"):
        assert (resume, why) == (tmp_path / expected, "")
    else:
        assert resume is None and why == expected.format(out=tmp_path)


def test_hpc_checkpoints_are_ordered_by_number_and_ignore_other_files(tmp_path):
    for name in ("hpc_ckpt_10.ckpt", "hpc_ckpt_9.ckpt", "hpc_ckpt_x.ckpt", "hpc_ckpt_2.ckpt.tmp", "notes.ckpt"):
        _write(tmp_path / name, 0)
    assert [p.name for p in runtime.hpc_checkpoints(tmp_path)] == ["hpc_ckpt_9.ckpt", "hpc_ckpt_10.ckpt"]


@pytest.mark.parametrize("keep", [False, True], ids=["fresh start", "resumed"])
def test_clear_stage_drops_slurm_checkpoints_only_on_a_fresh_start(tmp_path, keep):
    for name in ("hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt", "checkpoints/last.ckpt", "metrics.json", "keep.txt"):
        _write(tmp_path / name, 0)
    runtime.clear_stage(tmp_path, keep_checkpoints=keep)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    kept = ["checkpoints/last.ckpt", "hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"] if keep else []
    assert left == sorted([*kept, "keep.txt"])


@pytest.mark.parametrize("override, key", [
    ("teacher.checkpoint_every_n_steps=0", "teacher.checkpoint_every_n_steps"),
    ("teacher.checkpoint_every_n_steps=true", "teacher.checkpoint_every_n_steps"),
    ("student.checkpoint_every_n_steps=2.5", "student.checkpoint_every_n_steps"),
    ("teacher.resume=maybe", "teacher.resume"),
])
def test_resume_settings_are_checked_before_any_work(tiny_cfg, tmp_path, override, key):
    stage = override.split(".")[0]
    with pytest.raises(runtime.ConfigError, match=f"`{key}`"):
        train.run_stage(tiny_cfg(f"stage={stage}", override))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ SLURM: Lightning's own auto-resume path


FAKE_SLURM = {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "teacher", "SLURM_JOB_ID": "42",
              "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}


@pytest.mark.slow
@pytest.mark.parametrize("rerun, resumes", [([], True), (["teacher.model.lr=0.01"], False)],
                         ids=["same config: resumes the hpc checkpoint", "changed config: stale hpc checkpoint gone"])
def test_a_requeued_slurm_job_resumes_only_its_own_config(tiny_cfg, tmp_path, monkeypatch, rerun, resumes):
    out = tmp_path / "run" / "teacher"
    args = ("stage=teacher", "teacher.max_epochs=2")
    with_trainer_callbacks(monkeypatch, KillAtEpoch(1))
    with pytest.raises(RuntimeError, match="killed"):
        train.run_stage(tiny_cfg(*args))
    # what SLURMEnvironment's SIGUSR1 handler leaves before the requeue: the state at the signal
    hpc = out / "hpc_ckpt_1.ckpt"
    hpc.write_bytes((out / "checkpoints" / "last.ckpt").read_bytes())
    for key, value in FAKE_SLURM.items():
        monkeypatch.setenv(key, value)
    from lightning.fabric.plugins.environments import SLURMEnvironment

    assert SLURMEnvironment.detect()  # Lightning would pick hpc_ckpt_1 itself if it were left and ckpt_path None
    probe = EpochProbe()
    with_trainer_callbacks(monkeypatch, probe)
    metrics = train.run_stage(tiny_cfg(*args, *rerun))
    if resumes:
        assert metrics["resumed_from"] == str(hpc) and probe.epochs == [1]
    else:
        assert metrics["resumed_from"] == "" and probe.epochs == [0, 1] and not hpc.exists()
    assert metrics["epochs"] == 2


# ----------------------------------------------------------------------------------------- stage folder locks
HOLDER = """
import sys
from pathlib import Path
from lightning_modules.run import runtime
with runtime.stage_locks():
    runtime.lock_folder(Path(sys.argv[1]))
    print("locked", flush=True)
    sys.stdin.readline()
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _lock_fails(folder: Path, holder_pid: int) -> None:
    with runtime.stage_locks(), pytest.raises(FolderInUse) as err:
        runtime.lock_folder(folder)
    text = str(err.value)
    assert str(folder) in text and f"pid {holder_pid} on {socket.gethostname()}" in text
    assert text.startswith("config error at `experiment_name`")  # train.py: one line, exit 2


@pytest.mark.parametrize("ending", ["exits", "SIGKILL"])
def test_a_locked_stage_folder_stops_a_second_process_until_the_first_ends(tmp_path, ending):
    folder = tmp_path / "run" / "teacher"
    folder.mkdir(parents=True)
    holder = _holder(folder)
    try:
        _lock_fails(folder, holder.pid)
    finally:
        if ending == "exits":
            holder.communicate("\n", timeout=30)
        else:
            holder.send_signal(signal.SIGKILL)
            holder.wait(timeout=30)
    with runtime.stage_locks():  # a killed holder's lock went with its process
        runtime.lock_folder(folder)
        runtime.lock_folder(folder)  # the same process again: no conflict with itself
        assert json.loads((tmp_path / "run" / ".locks" / "teacher.lock.owner").read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / ".locks" / "teacher.lock.owner").exists()
    assert sorted(p.name for p in folder.iterdir()) == []  # nothing of the lock inside the stage folder


def test_only_rank_zero_locks_and_only_inside_a_run(tmp_path, monkeypatch):
    folder = tmp_path / "run" / "teacher"
    folder.mkdir(parents=True)
    holder = _holder(folder)
    try:
        runtime.lock_folder(folder)  # no stage_locks() scope: nothing taken, nothing checked
        monkeypatch.setattr(runtime, "is_rank_zero", lambda: False)
        with runtime.stage_locks():
            runtime.lock_folder(folder)  # rank 1 of the holder's run shares its folder
    finally:
        holder.communicate("\n", timeout=30)


def test_a_hydra_job_holds_every_stage_folder_it_writes_until_it_ends(tmp_path):
    from omegaconf import OmegaConf

    from lightning_modules.run.preflight import RunFolderCheck

    owner = tmp_path / ".locks" / "generator.lock.owner"
    check = RunFolderCheck()
    check.on_job_start(config=None)
    runtime.stage_dir(OmegaConf.create({"paths": {"run_dir": str(tmp_path)}}), "generator")  # any stage, any step
    with runtime.stage_locks():  # a stage's own scope inside the job does not end the job's hold
        runtime.stage_dir(OmegaConf.create({"paths": {"run_dir": str(tmp_path)}}), "generator")
    assert json.loads(owner.read_text())["pid"] == os.getpid()
    check.on_job_end(config=None, job_return=None)
    assert not owner.exists()


# ------------------------------------------------------- SIGKILL mid-epoch through train.py, resume, same result
# 96 faces / batch 8 = 12 steps per epoch; last.ckpt every 5 steps: the first one is mid-epoch 0
KILL_RUN = [*[o for o in TINY if not o.startswith("data.batch_size")], "stage=teacher", "data.batch_size=8",
            "teacher.max_epochs=2", "teacher.checkpoint_every_n_steps=5", "teacher.model.backbone=test_resnet",
            "trainer.accelerator=cpu", "trainer.devices=1", "data.num_workers=0"]
STEPS_PER_EPOCH = 12


def _cli(run_dir: Path) -> list[str]:
    return [sys.executable, "train.py", *KILL_RUN, f"hydra.run.dir={run_dir}"]


def _stop_at_first_checkpoint(proc: subprocess.Popen, last: Path, timeout: float = 240) -> int:
    """SIGSTOP ``proc`` as soon as ``last`` exists and loads; its global step."""
    deadline = time.time() + timeout
    while not last.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.005)
    while True:
        proc.send_signal(signal.SIGSTOP)
        try:
            return int(torch.load(last, map_location="cpu", weights_only=False)["global_step"])
        except Exception:  # caught mid-write: let it finish the file
            proc.send_signal(signal.SIGCONT)
            time.sleep(0.05)


def _train_rows(csv: Path) -> dict[int, str]:
    import csv as csvlib

    with csv.open() as f:
        return {int(r["step"]): r["train/loss"] for r in csvlib.DictReader(f) if r.get("train/loss")}


@pytest.mark.slow
def test_a_sigkilled_teacher_resumes_mid_epoch_to_the_uninterrupted_result(tmp_path, caplog):
    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_cli(run_dir), cwd=REPO, env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    try:
        step = _stop_at_first_checkpoint(first, run_dir / "teacher" / "checkpoints" / "last.ckpt")
        assert 0 < step % STEPS_PER_EPOCH  # mid-epoch
        # a second run of the same folder while the first holds it: one line, exit 2, names the holder
        second = subprocess.run(_cli(run_dir), cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"{run_dir / 'teacher'} is in use by another run (pid {first.pid} on {socket.gethostname()}" \
               in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)

    with caplog.at_level("INFO", logger="lightning_modules.run.runtime"):
        resumed = train.run_stage(compose(KILL_RUN, run_dir))  # the killed run's lock died with it
    last = run_dir / "teacher" / "checkpoints" / "last.ckpt"
    assert f"teacher: resuming from {last} (epoch 0, step {step})" in caplog.text
    reference = train.run_stage(compose(KILL_RUN, tmp_path / "whole"))
    assert reference["resumed_from"] == "" and resumed["optimizer_steps"] == 2 * STEPS_PER_EPOCH
    # the rerun trains exactly the steps the kill cost, and each of them as the uninterrupted run did
    rows = _train_rows(run_dir / "teacher" / "csv" / "metrics.csv")
    whole = _train_rows(tmp_path / "whole" / "teacher" / "csv" / "metrics.csv")
    assert min(rows) == step and rows == {s: loss for s, loss in whole.items() if s >= step}
    for key in ("test/acc", "test/loss", "best_val_acc"):
        assert resumed[key] == reference[key], key
    assert torch.equal(torch.load(run_dir / "teacher" / "confusion_matrix.pt"),
                       torch.load(tmp_path / "whole" / "teacher" / "confusion_matrix.pt"))


# ---------------------------------------------------------------- the loader side of a mid-epoch resume
@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_loader_skips_the_trained_batches_of_the_same_order(workers):
    from datamodules.batch import FERDataLoader

    def loader():
        torch.manual_seed(7)  # what seed_everything leaves: the order follows from it and the epoch
        return FERDataLoader(torch.arange(40), batch_size=4, shuffle=True, num_workers=workers,
                             persistent_workers=workers > 0)

    whole, resumed = loader(), loader()
    whole.sampler.set_epoch(3)
    resumed.sampler.set_epoch(3)
    order = [b.tolist() for b in whole]
    torch.manual_seed(123)  # the global RNG does not decide the order
    resumed.skip_batches = 4
    assert [b.tolist() for b in resumed] == order[4:] and len(resumed) == 10
    assert [b.tolist() for b in resumed] == order  # only the first pass skips
    resumed.sampler.set_epoch(4)
    assert [b.tolist() for b in resumed] != order  # another epoch, another order
    assert sorted(sum(order, [])) == list(range(40))

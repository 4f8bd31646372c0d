"""train.py's error contract: a user error is one line on stderr naming the key or file, exit 2, no traceback
(HYDRA_FULL_ERROR=1 adds it); any other exception is a bug with its full traceback, exit 1."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

import train
from conftest import REPO
from datamodules.errors import DataError, DataFileNotFound
from lightning_modules.run import preflight
from lightning_modules.run.runtime import ConfigError

OFFLINE = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "OMP_NUM_THREADS": "1"}


def _train(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "train.py", "logger=csv", "trainer.enable_progress_bar=false", *args],
                          cwd=REPO, env={**environ, **OFFLINE, **env}, capture_output=True, text=True, timeout=300)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(("config error at", "error:"))]


def _unset(key: str) -> MissingMandatoryValue:
    cfg = OmegaConf.create({"data": {"root": "???", "copy": "${data.root}"}})
    with pytest.raises((MissingMandatoryValue, InterpolationToMissingValueError)) as err:
        OmegaConf.select(cfg, key, throw_on_missing=True)
    return err.value


def _chained(outer: type[Exception], inner: Exception, explicit: bool = True) -> Exception:
    try:
        try:
            raise inner
        except Exception as err:
            if explicit:
                raise outer("wrapped") from err
            raise outer("while handling")
    except Exception as err:  # noqa: BLE001
        return err


# ------------------------------------------------------------------------------------------------- in process
@pytest.mark.parametrize("make, expected", [
    (lambda: ConfigError("mix.ratio", "must be in [0, 1]"), "config error at `mix.ratio`: must be in [0, 1]"),
    (lambda: DataError("x.csv:3: unknown emotion id 9"), "error: x.csv:3: unknown emotion id 9"),
    (lambda: DataFileNotFound("fer2013: dataset root not found: /nope"), "error: fer2013: dataset root not found"),
    (lambda: _chained(InstantiationException, DataError("a.csv:1: header lacks column(s)")), "error: a.csv:1:"),
    (lambda: _chained(RuntimeError, ConfigError("k", "bad"), explicit=False), "config error at `k`: bad"),
    (lambda: _unset("data.root"), "config error at `data.root`: is required but not set: pass data.root=<value>"),
    (lambda: _unset("data.copy"), "config error at `data.copy`: refers to a value that is not set"),
    (lambda: DataError("first line\n  second line"), "error: first line second line"),
])
def test_user_errors_are_found_also_when_wrapped(make, expected):
    found = preflight.user_error(make())
    assert found is not None and preflight.user_message(found).startswith(expected)


@pytest.mark.parametrize("make", [
    lambda: RuntimeError("boom"),
    lambda: ValueError("a plain ValueError is a bug, not a user error"),
    lambda: FileNotFoundError("/tmp/x"),
    lambda: KeyError("stage"),
    lambda: _chained(TypeError, ValueError("inner")),
])
def test_other_exceptions_are_bugs(make):
    assert preflight.user_error(make()) is None


def test_context_suppressed_with_from_none_is_not_followed():
    try:
        try:
            raise DataError("hidden")
        except DataError:
            raise RuntimeError("bug") from None
    except RuntimeError as err:
        assert preflight.user_error(err) is None


@pytest.mark.parametrize("raised, code, traceback", [
    (RuntimeError("boom"), 1, True),
    (DataError("a.csv:2: pixels has 3 values"), 2, False),
    (_chained(InstantiationException, ConfigError("data.format", "unknown format 'x'")), 2, False),
])
def test_wrapper_exit_status_and_traceback(monkeypatch, capsys, raised, code, traceback):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def fail(cfg):
        raise raised

    monkeypatch.setattr(train, "run_stage", fail)
    with pytest.raises(SystemExit) as exit_:
        train.run_reporting_errors(OmegaConf.create({"stage": "teacher"}))
    assert exit_.value.code == code
    err = capsys.readouterr().err
    assert ("Traceback" in err) == traceback
    if traceback:
        assert "RuntimeError: boom" in err and "in fail" in err  # the bug's own frame is kept
    else:
        assert err.count("\n") == 1 and len(_error_lines(err)) == 1


def test_full_error_env_adds_the_traceback_to_a_user_error(monkeypatch, capsys):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(DataError) as raised:
        raise DataError("a.csv:2: bad row")
    assert preflight.report(raised.value) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "DataError" in err
    assert err.splitlines()[-1] == "error: a.csv:2: bad row"


@pytest.mark.parametrize("accelerator, devices, ok", [
    ("cpu", 1, True), ("cpu", 2, True), ("cpu", "auto", True), ("cpu", "2", True),
    ("cpu", 0, False), ("cpu", -1, False), ("cpu", -2, False), ("cpu", [0, 1], False), ("cpu", "two", False),
    ("cpu", True, False), ("cpu", 1.5, False), ("cpu", None, False),
    ("gpu", 4, True), ("gpu", -1, True), ("gpu", [0, 1], True), ("gpu", "0,1", True), ("gpu", "auto", True),
    ("gpu", 0, False), ("gpu", -2, False), ("gpu", [], False), ("gpu", [0, 0], False), ("gpu", [-1], False),
    ("gpu", "0,x", False),
])
def test_trainer_devices_preflight(accelerator, devices, ok):
    cfg = OmegaConf.create({"trainer": {"accelerator": accelerator, "devices": devices, "num_nodes": 1}})
    if ok:
        preflight.check_trainer(cfg)
    else:
        with pytest.raises(ConfigError) as err:
            preflight.check_trainer(cfg)
        assert err.value.key == "trainer.devices" and repr(devices) in str(err.value)


@pytest.mark.parametrize("nodes", [0, -1, "2", 1.5])
def test_trainer_num_nodes_preflight(nodes):
    cfg = OmegaConf.create({"trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": nodes}})
    with pytest.raises(ConfigError) as err:
        preflight.check_trainer(cfg)
    assert err.value.key == "trainer.num_nodes"


def test_run_folder_check(tmp_path):
    assert preflight.check_writable_dir(tmp_path / "new" / "run") is None and (tmp_path / "new" / "run").is_dir()
    (tmp_path / "afile").write_text("")
    assert preflight.check_writable_dir(tmp_path / "afile" / "run") == "Not a directory"


# ------------------------------------------------------------------------------------------------- the real CLI
def _fer2013_wrong_header(tmp_path):
    (tmp_path / "fer").mkdir()
    (tmp_path / "fer" / "fer2013.csv").write_text("emotion,pixel_values,Usage\n0," + " ".join(["0"] * 2304)
                                                  + ",Training\n")
    return [f"data.root={tmp_path / 'fer'}"]


def _uncreatable(tmp_path):
    (tmp_path / "afile").write_text("")  # root ignores chmod; nothing can create a folder under a file
    return [f"output_root={tmp_path / 'afile' / 'sub'}"]


@pytest.mark.slow
@pytest.mark.parametrize("args, make, expected", [
    (["stage=distill"], None, "config error at `stage`: unknown stage 'distill'"),
    (["data=fer2013"], None, "config error at `data.root`: is required but not set"),
    (["data=fer2013", "data.root=MISSING"], None, "data.root does not exist"),
    (["data=fer2013"], _fer2013_wrong_header, "fer2013.csv:1: header lacks column(s) pixels"),
    (["trainer.devices=0"], None, "config error at `trainer.devices`: must be a number of devices >= 1"),
    ([], _uncreatable, "config error at `output_root`: cannot create or write the run folder"),
], ids=["unknown-stage", "data-root-unset", "data-root-missing", "fer2013-header", "devices-0", "output-root"])
def test_user_error_is_one_line_and_exit_2(tmp_path, args, make, expected):
    args = [a.replace("MISSING", str(tmp_path / "missing")) for a in args]
    extra = make(tmp_path) if make else [f"output_root={tmp_path / 'out'}"]
    proc = _train([*args, *extra])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == lines[0]  # the last thing the user sees
    assert not (tmp_path / "out" / "default" / "teacher" / "metrics.json").exists()


@pytest.mark.slow
def test_full_error_env_shows_the_traceback_of_a_user_error(tmp_path):
    proc = _train(["data=fer2013", f"output_root={tmp_path}"], HYDRA_FULL_ERROR="1")
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "MissingMandatoryValue" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("config error at `data.root`")

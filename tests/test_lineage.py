"""wandb lineage: which artifacts each stage uses and logs (derived from its config), artifacts built alike by the
stage that writes and the stage that reads, what an offline run records, the wandb run id a requeued stage keeps,
and the ``logger.wandb.artifacts`` switch."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from lightning_modules.run import lineage, runtime, trainer_setup
from lightning_modules.run.lineage import StageWandbLogger

WANDB = ("logger=default",)  # CSV + wandb offline


def wandb_records(path: Path, timeout: float = 60.0) -> list:
    """The protobuf records of a finished offline run's ``.wandb`` file, once wandb's service has written its exit
    record (``wandb.finish`` returns before that file is complete)."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_read_log(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _read_log(path: Path):
    """wandb's leveldb-style log: 7-byte file header, 32 KiB blocks, each record chunk with a 7-byte header (crc32,
    length, kind full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if len(data) < 7:
        return
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a wandb transaction log"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def offline_runs(stage_dir: Path) -> list[Path]:
    return sorted((stage_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def artifact_records(run_file: Path) -> dict[str, tuple[str, bool]]:
    """name -> (digest, used) of the lineage artifacts (not wandb's own, e.g. logged tables): ``used`` is wandb's
    use-after-commit (an input), else a logged output."""
    return {r.artifact.name: (r.artifact.digest, r.artifact.use_after_commit) for r in wandb_records(run_file)
            if r.WhichOneof("record_type") == "artifact" and r.artifact.type in ("model", "dataset")}


def run_ids(run_file: Path) -> set[str]:
    return {r.run.run_id for r in wandb_records(run_file) if r.WhichOneof("record_type") == "run"}


@pytest.fixture
def run_tree(tmp_path):
    """Every stage's output in a run folder, as the stages write them (tiny files, wandb never reads them)."""
    run = tmp_path / "run"
    for stage, name in [("teacher", "teacher.ckpt"), ("judge", "judge.ckpt"), ("feranno", "feranno.ckpt"),
                        ("student", "student.ckpt")]:
        (run / stage).mkdir(parents=True)
        (run / stage / name).write_bytes(b"weights")
    for stage, files in [("generator/pipeline", ["model_index.json", "unet/weights.bin"]),
                         ("synthesize/dataset", ["manifest.json", "shards/0.arrow"]),
                         ("relabel/dataset", ["manifest.json"]), ("pseudolabel/dataset", ["manifest.json"])]:
        for f in files:
            (run / stage / f).parent.mkdir(parents=True, exist_ok=True)
            (run / stage / f).write_text(f)
    for stage in ("teacher", "generator", "synthesize"):
        (run / stage / "config.yaml").write_text(f"stage: {stage}\n")
    return run


FERANNO = ("teacher=feranno", "teacher.name=feranno")
SG = ("synthesis.guidance.embedding_scale=1.0",)


@pytest.mark.parametrize("stage, overrides, inputs", [
    ("teacher", (), []),
    ("feranno", FERANNO, ["run-generator"]),
    ("judge", ("teacher.name=judge",), []),
    ("generator", (), ["run-teacher"]),  # the TINY judge is the guide: teacher.ckpt
    ("generator", ("generator.eval.judge=separate",), ["run-judge"]),
    ("generator", ("generator.eval.enabled=false",), []),
    ("generator", ("generator.eval.enabled=false", "generator.guidance.au_scale=1"), ["run-teacher"]),
    ("synthesize", (), ["run-generator"]),
    ("synthesize", SG, ["run-generator", "run-teacher"]),
    ("synth_eval", (), ["run-synthesize", "run-teacher"]),
    ("relabel", (), ["run-synthesize", "run-feranno", "run-teacher"]),
    ("pseudolabel", (), ["run-teacher"]),
    ("student", (), []),  # real only
    ("student", ("mix.mode=concat",), ["run-relabel"]),
    ("student", ("mix.mode=concat", "relabel.enabled=false"), ["run-synthesize"]),
    ("s2", ("mix.mode=concat", "student.name=s2"), ["run-relabel"]),  # its loggers carry its folder name
    ("report", (), []),
    ("ssl", (), []),  # real faces only
    ("ssl", ("mix.mode=concat",), ["run-relabel"]),
    ("fewshot", ("fewshot.backbone.checkpoint=student",), ["run-student"]),
    ("fewshot", ("fewshot.backbone.checkpoint=random",), []),
])
def test_stage_inputs_follow_the_config(tiny_cfg, run_tree, stage, overrides, inputs):
    cfg = tiny_cfg(f"stage={stage}", *overrides)
    refs = lineage.stage_inputs(cfg, stage)
    assert [r.name for r in refs] == inputs
    for r in refs:
        assert r.path.exists() and r.type == ("dataset" if "dataset" in str(r.path) else "model")


def test_missing_inputs_are_left_out_and_a_mixed_student_names_each_set(tiny_cfg, run_tree, tmp_path):
    other = tmp_path / "elsewhere" / "sets" / "mine"
    other.mkdir(parents=True)
    cfg = tiny_cfg("stage=student", "mix.mode=concat",
                   f"mix.synthetic=[{run_tree / 'relabel/dataset'},{other},{tmp_path / 'gone'}]")
    assert [r.name for r in lineage.stage_inputs(cfg, "student")] == ["run-relabel", "elsewhere-sets-mine"]
    (run_tree / "teacher" / "teacher.ckpt").unlink()
    assert lineage.stage_inputs(tiny_cfg("stage=relabel"), "relabel")[-1].name == "run-feranno"


@pytest.mark.parametrize("stage, overrides, output", [
    ("teacher", (), "teacher/teacher.ckpt"),
    ("judge", ("teacher.name=judge",), "judge/judge.ckpt"),
    ("student", ("student.name=s2",), None),  # the folder name is student.name: s2, not student
    ("s2", ("student.name=s2",), "s2/s2.ckpt"),
    ("generator", (), "generator/pipeline"),
    ("synthesize", (), "synthesize/dataset"),
    ("relabel", (), "relabel/dataset"),
    ("pseudolabel", (), "pseudolabel/dataset"),
    ("synth_eval", (), None),
    ("ssl", ("stage=ssl",), "ssl/ssl.ckpt"),
    ("fewshot", ("stage=fewshot",), None),
])
def test_stage_outputs(tiny_cfg, tmp_path, stage, overrides, output):
    cfg = tiny_cfg(*overrides)
    refs = lineage.stage_outputs(cfg, stage, tmp_path / "run" / stage)
    assert [str(r.path.relative_to(tmp_path / "run")) for r in refs] == ([output] if output else [])


@pytest.mark.parametrize("path, root, name", [
    ("outputs/toy/generator/pipeline", "outputs", "toy-generator"),
    ("outputs/toy/multirun/2026-01-01_10-00-00/3/student/student.ckpt", "outputs",
     "toy-multirun-2026-01-01_10-00-00-3-student"),
    ("/data/other run/teacher/teacher.ckpt", "outputs", "other_run-teacher"),
    ("/data/x/teacher/teacher.ckpt", None, "x-teacher"),
    ("/models/fer/best.ckpt", "outputs", "models-fer-best.ckpt"),  # not a stage's own output: named after itself
    ("outputs/sets/mine", "outputs", "sets-mine"),
])
def test_artifact_names(tmp_path, monkeypatch, path, root, name):
    monkeypatch.chdir(tmp_path)
    assert lineage.artifact_name(Path(path), root) == name


def test_long_artifact_names_stay_unique_and_valid():
    a = lineage.artifact_name(Path("/r/" + "a" * 200 + "/teacher/teacher.ckpt"), None)
    b = lineage.artifact_name(Path("/r/" + "b" + "a" * 199 + "/teacher/teacher.ckpt"), "/r")
    assert len(a) <= 128 and len(b) <= 128 and a != b and a.endswith("-teacher")


def test_writer_and_reader_build_the_same_artifact(tiny_cfg, run_tree):
    """The version a later stage uses is the one the stage that wrote it logged: same name, type, digest; a set
    made again under another config (its stage's config.yaml) is a new version."""
    cfg = tiny_cfg("stage=synthesize")
    written = lineage.build_artifact(lineage.stage_outputs(cfg, "generator", run_tree / "generator")[0])
    read = lineage.build_artifact(lineage.stage_inputs(cfg, "synthesize")[0])
    assert (written.name, written.type, written.digest) == (read.name, read.type, read.digest)
    refs = {e.path: e.ref for e in read.manifest.entries.values()}
    assert refs["pipeline/unet/weights.bin"] == (run_tree / "generator/pipeline/unet/weights.bin").as_uri()
    assert refs["config.yaml"] == (run_tree / "generator/config.yaml").as_uri()
    assert read.metadata["fingerprint"] == runtime.path_fingerprint(run_tree / "generator" / "pipeline")
    (run_tree / "generator" / "config.yaml").write_text("stage: generator\nseed: 1\n")
    assert lineage.build_artifact(lineage.stage_inputs(cfg, "synthesize")[0]).digest != read.digest


def test_run_id_is_kept_for_an_unfinished_stage_with_the_same_config(tiny_cfg, tmp_path):
    out = tmp_path / "run" / "teacher"
    out.mkdir(parents=True)
    cfg = tiny_cfg("stage=teacher")
    first = lineage.wandb_run_id(cfg, out)
    assert json.loads((out / lineage.RUN_ID_FILE).read_text())["id"] == first
    assert lineage.wandb_run_id(cfg, out) == first  # requeued / killed and rerun
    assert lineage.wandb_run_id(tiny_cfg("stage=pipeline", "pipeline.student_seeds=[0,1]"), out) == first
    assert lineage.wandb_run_id(tiny_cfg("stage=teacher", "force=true"), out) != first  # force: a fresh run
    second = lineage.wandb_run_id(cfg, out)
    assert second != first and lineage.wandb_run_id(tiny_cfg("stage=teacher", "teacher.max_epochs=2"), out) != second
    third = lineage.wandb_run_id(cfg, out)
    runtime.mark_done(out, "abc")  # the previous run finished: training again is a new run
    assert lineage.wandb_run_id(cfg, out) != third
    (out / lineage.RUN_ID_FILE).write_text("{not json")
    assert len(lineage.wandb_run_id(cfg, out)) == 8


def test_build_loggers_resumes_the_stage_run_and_checks_the_switch(tiny_cfg, tmp_path):
    out = tmp_path / "run" / "teacher"
    out.mkdir(parents=True)
    cfg = tiny_cfg("stage=teacher", *WANDB)
    ids = []
    for _ in range(2):
        (wb,) = [lg for lg in trainer_setup.build_loggers(cfg, out, "teacher")
                 if isinstance(lg, StageWandbLogger)]
        ids.append(wb._wandb_init["id"])
        assert wb._wandb_init["resume"] == "allow" and wb.artifacts is True
    assert ids[0] == ids[1] == json.loads((out / lineage.RUN_ID_FILE).read_text())["id"]
    (wb,) = [lg for lg in trainer_setup.build_loggers(tiny_cfg(*WANDB, "logger.wandb.artifacts=false"), out,
                                                      "teacher") if isinstance(lg, StageWandbLogger)]
    assert wb.artifacts is False
    with pytest.raises(runtime.ConfigError, match="logger.wandb.artifacts"):
        trainer_setup.build_loggers(tiny_cfg(*WANDB, "logger.wandb.artifacts=sometimes"), out, "teacher")
    assert not any(isinstance(lg, StageWandbLogger) for lg in trainer_setup.build_loggers(tiny_cfg(), out, "teacher"))


def _offline_stage_run(cfg, out: Path, stage: str, fail: bool = False) -> Path:
    loggers = trainer_setup.build_loggers(cfg, out, stage)
    try:
        for lg in loggers:
            lg.log_metrics({"x": 1.0})
        if fail:
            raise RuntimeError("killed")
    finally:
        trainer_setup.finish_loggers(loggers)
    return offline_runs(out)[-1]


def test_offline_runs_record_used_and_logged_artifacts(tiny_cfg, run_tree):
    cfg = tiny_cfg("stage=synthesize", *WANDB)
    made = artifact_records(_offline_stage_run(cfg, run_tree / "generator", "generator"))
    assert made["run-generator"][1] is False  # logged
    used = artifact_records(_offline_stage_run(cfg, run_tree / "synthesize", "synthesize"))
    assert used["run-generator"] == (made["run-generator"][0], True)  # the same version, used
    assert used["run-synthesize"][1] is False
    # a failing stage logs no outputs, and its requeued rerun continues the same wandb run
    failing = run_tree / "relabel"
    with pytest.raises(RuntimeError, match="killed"):
        _offline_stage_run(tiny_cfg("stage=relabel", *WANDB), failing, "relabel", fail=True)
    assert "run-relabel" not in artifact_records(offline_runs(failing)[-1])
    _offline_stage_run(tiny_cfg("stage=relabel", *WANDB), failing, "relabel")
    first, second = offline_runs(failing)
    assert run_ids(first) == run_ids(second) == {json.loads((failing / lineage.RUN_ID_FILE).read_text())["id"]}
    assert artifact_records(second)["run-relabel"][1] is False


def test_artifacts_off_records_no_lineage(tiny_cfg, run_tree):
    cfg = tiny_cfg("stage=synthesize", *WANDB, "logger.wandb.artifacts=false")
    assert artifact_records(_offline_stage_run(cfg, run_tree / "synthesize", "synthesize")) == {}


@pytest.mark.slow
def test_teacher_relabel_student_lineage_offline(tiny_cfg, tmp_path, single_thread):
    """A tiny teacher votes on a synthetic set, a student learns from the relabelled set: the student's offline run
    uses the relabelled set the relabel run logged, which used the teacher's checkpoint the teacher run logged."""
    import train
    from synthetic_fixtures import write_toy_synthetic_set

    run = tmp_path / "run"
    train.run_stage(tiny_cfg("stage=teacher", *WANDB))
    write_toy_synthetic_set(run / "synthesize" / "dataset", n=32)
    voters = ("~relabel.voters.feranno", "relabel.batch_size=16")
    train.run_stage(tiny_cfg("stage=relabel", *WANDB, *voters))
    train.run_stage(tiny_cfg("stage=student", *WANDB, "mix.mode=concat", "mix.scale=null"))
    teacher, relabel, student = (artifact_records(offline_runs(run / s)[-1]) for s in ("teacher", "relabel", "student"))
    assert teacher == {"run-teacher": (teacher["run-teacher"][0], False)}
    assert relabel == {"run-teacher": (teacher["run-teacher"][0], True),
                       "run-synthesize": (relabel["run-synthesize"][0], True),
                       "run-relabel": (relabel["run-relabel"][0], False)}
    assert student == {"run-relabel": (relabel["run-relabel"][0], True),
                       "run-student": (student["run-student"][0], False)}
    # wandb disabled: the same stages run, no wandb folder
    train.run_stage(tiny_cfg("stage=student", "student.name=plain", "mix.mode=concat", "mix.scale=null"))
    assert (run / "plain" / "plain.ckpt").is_file() and not (run / "plain" / "wandb").exists()


def test_lineage_trouble_costs_a_warning_not_the_stage(tiny_cfg, run_tree, monkeypatch, caplog):
    cfg = tiny_cfg("stage=synthesize", *WANDB)
    (run_tree / "pseudolabel" / "dataset" / "manifest.json").unlink()
    (run_tree / "pseudolabel" / "dataset").rmdir()
    with caplog.at_level("WARNING", logger="lightning_modules.run.lineage"):
        run_file = _offline_stage_run(cfg, run_tree / "pseudolabel", "pseudolabel")
    records = artifact_records(run_file)
    assert records == {"run-teacher": (records["run-teacher"][0], True)}  # its voter; no set to log
    assert "no dataset at" in caplog.text and "run-pseudolabel" in caplog.text

    def unreadable(artifact):
        raise PermissionError(13, "Permission denied", str(artifact.path))

    monkeypatch.setattr(lineage, "build_artifact", unreadable)
    caplog.clear()
    with caplog.at_level("WARNING", logger="lightning_modules.run.lineage"):
        assert artifact_records(_offline_stage_run(cfg, run_tree / "synthesize", "synthesize")) == {}
    assert caplog.text.count("wandb lineage not recorded") == 1 and "Permission denied" in caplog.text

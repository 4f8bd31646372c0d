import json
import os

import pytest
import yaml

from lightning_modules.stages.report import collect_metrics, render_results_md


def _write(run, stage, metrics):
    (run / stage).mkdir(parents=True)
    (run / stage / "metrics.json").write_text(json.dumps(metrics))


def test_results_table_in_pipeline_order_with_skips(tmp_path):
    _write(tmp_path, "student", {"test/acc": 0.5, "data/train_size": 10})
    _write(tmp_path, "teacher", {"test/acc": 0.75, "test/au_mae": 0.4, "data/skipped/train/missing_image": 2})
    _write(tmp_path, "report", {"teacher/test/acc": 0.0})  # the report's own output is not an input
    metrics = collect_metrics(tmp_path)
    assert list(metrics) == ["teacher", "student"]
    text = render_results_md(metrics, ["confusion_teacher.png"], "t")
    rows = [line for line in text.splitlines() if line.startswith("| teacher") or line.startswith("| student")]
    assert rows[0].startswith("| teacher | 0.7500") and rows[1].startswith("| student | 0.5000")
    assert "missing_image" in text and "![confusion_teacher](confusion_teacher.png)" in text


def test_corrupt_metrics_file_is_named(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="teacher/metrics.json"):
        collect_metrics(tmp_path)


# ------------------------------------------------------------------ sweeps, ablations, sample grids
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cfg(run, *dirs, **report):
    """A minimal stage=report config (no toy grid: data.format is not toy)."""
    from omegaconf import OmegaConf

    return OmegaConf.create({"experiment_name": "t", "data": {"format": "imagefolder"}, "paths": {"run_dir": str(run)},
                             "report": {"dirs": [str(d) for d in dirs], "baseline": None, "grid_per_class": 3,
                                        **report}})


def _job(job, stage, acc, mode, scale=1.0, experiment="toy", config=True, au=True, sg=1.0, relabel=True, **extra):
    """A student stage folder as stage=student writes it: metrics.json (+ config.yaml)."""
    _write(job, stage, {"test/acc": acc, "test/mean_class_acc": acc - 0.1, "data/mix/mode": mode,
                        "data/mix/scale": scale, **extra})
    if config:
        config = {"experiment_name": experiment, "mix": {"mode": mode, "scale": scale}, "student": {"name": stage},
                  "generator": {"model": {"au_adapter": au}, "guidance": {"embedding_scale": sg}},
                  "relabel": {"enabled": relabel}}
        (job / stage / "config.yaml").write_text(yaml.safe_dump(config))


def _scaling_sweep(root, config=True):
    """Hydra multirun layout <root>/<date>/<job>/student/: synthetic_only / concat x scales 1, 2."""
    accs = {("synthetic_only", 1): 0.40, ("synthetic_only", 2): 0.45, ("concat", 1): 0.62, ("concat", 2): 0.65}
    for num, ((mode, scale), acc) in enumerate(accs.items()):
        _job(root / "2025-01-01_00-00-00" / str(num), "student", acc, mode, float(scale), config=config)


def _valid_png(path):
    from PIL import Image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def _table_rows(text, header):
    """Markdown table rows (header included) of the section whose title starts with ``header``."""
    section = text.split(header, 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]


def test_scaling_table_and_plot_from_a_sweep_folder(tmp_path):
    from lightning_modules.stages.report import run_report

    run = tmp_path / "toy"
    _job(run, "student", 0.60, "real_only")                       # the pipeline's real-only student = baseline
    _scaling_sweep(run / "multirun")
    out = run_report(_cfg(run, run / "multirun"))                  # <exp>/multirun: dates and jobs below it
    report = run / "report"
    text = (report / "results.md").read_text()
    assert _table_rows(text, "## Scaling") == [
        "| mode \\ scale | 0 | 1 | 2 |",
        "| real only | 0.6000 | – | – |",
        "| synthetic only | – | 0.4000 | 0.4500 |",
        "| real + synthetic (concat) | – | 0.6200 | 0.6500 |"]
    assert "![scaling](scaling.png)" in text and out["jobs"] == 5
    _valid_png(report / "scaling.png")
    merged = json.loads((report / "metrics.json").read_text())
    assert merged["student/test/acc"] == 0.60                       # the run folder's flat keys stay
    assert merged["scaling/real_only/0"] == 0.60 and merged["scaling/concat/2"] == 0.65
    assert merged["scaling/synthetic_only/1"] == 0.40
    assert "## Ablation" not in text                                 # one experiment: not an ablation


def test_scaling_baseline_from_config_and_repeated_points(tmp_path):
    from lightning_modules.report.plots import StudentRecord, scaling_markdown, scaling_table
    from lightning_modules.stages.report import run_report

    _job(tmp_path / "base", "student", 0.5, "real_only")
    sweep = tmp_path / "sweep"
    _scaling_sweep(sweep)
    run_report(_cfg(tmp_path / "run", sweep, baseline=str(tmp_path / "base" / "student" / "metrics.json")))
    text = (tmp_path / "run" / "report" / "results.md").read_text()
    assert "| real only | 0.5000 | – | – |" in text
    # pure: repeated points are averaged (± sample std, n); two experiments get their own rows; real-only = fallback
    # baseline
    records = [StudentRecord("a", "student", "concat", 1.0, 0.6, experiment="x"),
               StudentRecord("b", "student", "concat", 1.0, 0.8, experiment="x"),
               StudentRecord("c", "student", "real_only", 0.0, 0.3, experiment="x"),
               StudentRecord("d", "student", "ratio", 2.0, 0.5, experiment="y")]
    table = scaling_table(records)
    assert table.baseline == 0.3 and table.scales == [1.0, 2.0]
    lines = scaling_markdown(table, image=None)
    assert "| x: real + synthetic (concat) | – | 0.7000 ± 0.1414 (n=2) | – |" in lines
    assert "| y: real + synthetic (ratio) | – | – | 0.5000 |" in lines


def test_ablation_table_and_bar_chart(tmp_path):
    from lightning_modules.stages.report import run_report

    sweep = tmp_path / "ablation" / "2025-01-01_00-00-00"
    rows = [("toy", True, 1.0, True, 0.70), ("toy_ablation_no_au", False, 1.0, True, 0.66),
            ("toy_ablation_no_sg", True, 0.0, True, 0.64), ("toy_ablation_no_relabel", True, 1.0, False, 0.62)]
    for num, (experiment, au, sg, relabel, acc) in enumerate(rows):
        job = sweep / str(num)
        _job(job, "student", 0.60, "real_only", experiment=experiment, au=au, sg=sg, relabel=relabel)
        _job(job, "student_mix", acc, "concat", experiment=experiment, au=au, sg=sg, relabel=relabel)
        _write(job, "generator", {"eval/fer_acc": 0.5 - num / 10})
        if relabel:                                                  # the no-relabel row has no vote
            _write(job, "relabel", {"data_card/agreement_with_condition_all": [0.4, 0.35, 0.3][num]})
        _write(job, "report", {"student/test/acc": 0.0})           # each pipeline job's own report: not a stage
    run_report(_cfg(tmp_path / "run", sweep))                        # the run folder itself may be empty
    report = tmp_path / "run" / "report"
    text = (report / "results.md").read_text()
    assert _table_rows(text, "## Ablation") == [
        "| experiment | job | AU adapter | SG λ | relabel | student acc | student_mix acc | generator FER-Acc "
        "| vote = condition |",
        "| toy | 0 | yes | 1 | yes | 0.6000 | 0.7000 | 0.5000 | 0.4000 |",
        "| toy_ablation_no_au | 1 | no | 1 | yes | 0.6000 | 0.6600 | 0.4000 | 0.3500 |",
        "| toy_ablation_no_sg | 2 | yes | 0 | yes | 0.6000 | 0.6400 | 0.3000 | 0.3000 |",
        "| toy_ablation_no_relabel | 3 | yes | 1 | no | 0.6000 | 0.6200 | 0.2000 | – |"]
    assert "![ablation](ablation.png)" in text and "## Scaling" not in text
    _valid_png(report / "ablation.png")
    merged = json.loads((report / "metrics.json").read_text())
    assert merged["ablation/toy_ablation_no_sg/student_mix"] == 0.64
    assert merged["ablation/toy/generator/fer_acc"] == 0.5
    assert merged["ablation/toy_ablation_no_sg/relabel/agreement_with_condition"] == 0.3
    assert "ablation/toy_ablation_no_relabel/relabel/agreement_with_condition" not in merged


def test_synthetic_sample_grid_linked(tmp_path):
    from synthetic_fixtures import write_toy_synthetic_set

    from datamodules.synthetic import load_synthetic
    from lightning_modules.report.plots import pick_per_class
    from lightning_modules.stages.report import run_report

    run = tmp_path / "run"
    _job(run, "student", 0.5, "real_only")
    write_toy_synthetic_set(run / "synthesize" / "dataset", n=24, shards=1)
    run_report(_cfg(run))
    report = run / "report"
    text = (report / "results.md").read_text()
    assert "## Synthetic samples (synthesize/dataset, 24 faces" in text
    assert "![synthetic_samples](synthetic_samples.png)" in text
    classes = len(set(load_synthetic(run / "synthesize" / "dataset")["target_label"]))
    width, height = _valid_png(report / "synthetic_samples.png")
    assert (width, height) == (96 + 3 * 64, classes * 64)           # 3 faces per class, 32 px at 2x, label column
    # pure: first faces of each class, dropped (kept=false) and unknown (-1) labels left out
    assert pick_per_class([2, 0, 2, 2, -1, 0, 2], 2, kept=[1, 1, 0, 1, 1, 1, 1]) == {0: [1, 5], 2: [0, 3]}


def test_sweep_errors_and_jobs_without_config(tmp_path):
    from lightning_modules.stages.report import run_report

    sweep = tmp_path / "sweep"
    _scaling_sweep(sweep, config=False)                               # no config.yaml: data/mix/* keys are used
    with pytest.warns(UserWarning, match=r"4 student folder\(s\) without a readable config.yaml"):
        run_report(_cfg(tmp_path / "run", sweep))
    text = (tmp_path / "run" / "report" / "results.md").read_text()
    assert "| real + synthetic (concat) | – | 0.6200 | 0.6500 |" in text
    (sweep / "2025-01-01_00-00-00" / "3" / "student" / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="2025-01-01_00-00-00/3/student/metrics.json"):
        run_report(_cfg(tmp_path / "run", sweep))
    with pytest.raises(FileNotFoundError, match="report.dirs"):
        run_report(_cfg(tmp_path / "run", tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="metrics.json"):
        run_report(_cfg(tmp_path / "empty"))


def test_generator_table_optional_columns():
    with_fid = render_results_md({"generator": {"eval/fer_acc": 0.5, "eval/fid": 40.0, "eval/unguided/fer_acc": 0.3}},
                                 [], "t")
    assert "eval/fid" in with_fid and "eval/unguided/fer_acc" in with_fid
    assert "| generator | 0.5000 | 0.3000 |" in with_fid
    plain = render_results_md({"generator": {"eval/fer_acc": 0.5}}, [], "t")
    assert "eval/fid" not in plain and "eval/unguided" not in plain
    assert "No AU conditioning" not in plain
    no_aus = render_results_md({"generator": {"eval/fer_acc": 0.5, "eval/au_metrics_skipped": "no AU labels in the data"}},
                               [], "t")
    assert "No AU conditioning for `generator`: AU metrics skipped (no AU labels in the data)." in no_aus


def test_report_config_node_composes(tmp_path):
    from conftest import TINY, compose

    cfg = compose([*TINY, "stage=report", "report.dirs=[a,b]"], tmp_path / "run")
    assert list(cfg.report.dirs) == ["a", "b"] and cfg.report.baseline is None and cfg.report.grid_per_class == 8
    assert cfg.report.note is None


# ------------------------------------------------------------------ honesty: note, seeds, noise, optimizer steps
def _classifier(run, stage, acc, mode, epochs, per_epoch, test_size=1000, batch=64):
    _write(run, stage, {"test/acc": acc, "data/mix/mode": mode, "epochs": epochs,
                        "train_batches_per_epoch": per_epoch, "data/test_size": test_size})
    (run / stage / "config.yaml").write_text(yaml.safe_dump({"experiment_name": "t", "seed": 0,
                                                             "data": {"batch_size": batch},
                                                             "mix": {"mode": mode}, "student": {"name": stage}}))


@pytest.mark.parametrize("per_epoch_mix, more_steps_line", [
    (24, "- student_mix trained 1.5x the optimizer steps of the real-only student (192 vs 128"),
    (16, None),                                            # same steps: no claim about longer training
])
def test_classifier_table_states_seeds_noise_and_steps(tmp_path, per_epoch_mix, more_steps_line):
    from lightning_modules.stages.report import run_report

    run = tmp_path / "run"
    _classifier(run, "student", 0.43, "real_only", epochs=8, per_epoch=16)
    _classifier(run, "student_mix", 0.48, "concat", epochs=8, per_epoch=per_epoch_mix)
    run_report(_cfg(run, note="Smoke run: one seed, a few minutes of CPU"))
    text = (run / "report" / "results.md").read_text()
    assert text.splitlines()[:4] == ["# SynFER results: t", "", "> **Smoke run: one seed, a few minutes of CPU**", ""]
    rows = _table_rows(text, "## FER classifiers")
    assert rows[0].endswith("| seeds | epochs | optimizer steps | batch size |")
    assert rows[1].startswith("| student | 0.4300 |") and rows[1].endswith("| 1 | 8 | 128 | 64 |")
    assert rows[2].endswith(f"| 1 | 8 | {8 * per_epoch_mix} | 64 |")
    assert "**One seed per row**" in text
    # binomial SE at the noisier row: sqrt(.48 * .52 / 1000) = 1.58 points; a difference needs 2 * sqrt(2) * SE
    assert "± 1.6 points (one standard error, 1000 test faces)" in text and "below 4.5 points" in text
    assert (more_steps_line in text) if more_steps_line else ("optimizer steps of the real-only" not in text)


def test_no_note_no_banner_and_bad_note_is_a_config_error(tmp_path):
    from lightning_modules.run.runtime import ConfigError
    from lightning_modules.stages.report import run_report

    run = tmp_path / "run"
    _classifier(run, "student", 0.5, "real_only", epochs=2, per_epoch=4, test_size=0)   # no test size: no SE line
    run_report(_cfg(run))
    text = (run / "report" / "results.md").read_text()
    assert ">" not in text.split("## FER classifiers", 1)[0] and "Test-set noise" not in text
    with pytest.raises(ConfigError, match="report.note"):
        run_report(_cfg(run, note=["not", "a", "string"]))


# ------------------------------------------------------------------ fair comparisons: seeds, protocol, equal steps
def _student(run, stage, acc, mode, steps, seed=None, group=None, patience=None, max_steps=None, stopped=False,
             size=1000, scale=1.0, experiment="t"):
    """A student stage folder as stage=student writes it now: the protocol keys in metrics.json."""
    _write(run, stage, {"test/acc": acc, "test/mean_class_acc": acc - 0.05, "data/mix/mode": mode,
                        "data/mix/scale": 0.0 if mode == "real_only" else scale, "optimizer_steps": steps,
                        "epochs": round(steps / 16, 2), "train_batches_per_epoch": 16, "train_set_size": size,
                        "max_steps": max_steps, "early_stopping_patience": patience, "stopped_early": stopped,
                        "seed": seed, "student_group": group or stage, "data/test_size": 1000})
    (run / stage / "config.yaml").write_text(yaml.safe_dump({"experiment_name": experiment, "data": {"batch_size": 64},
                                                             "mix": {"mode": mode}, "student": {"name": stage}}))


def test_seeded_students_are_averaged_with_their_protocol(tmp_path):
    from lightning_modules.stages.report import run_report

    run = tmp_path / "run"
    real, mixed = [0.50, 0.54, 0.52], [0.55, 0.61, 0.58]
    for seed, (a, b) in enumerate(zip(real, mixed)):
        _student(run, f"student_seed{seed}", a, "real_only", 720, seed, "student", max_steps=720, size=500)
        _student(run, f"student_mix_seed{seed}", b, "concat", 720, seed, "student_mix", max_steps=720, size=3000)
    run_report(_cfg(run))
    text = (run / "report" / "results.md").read_text()
    assert _table_rows(text, "## Students") == [
        "| student | mix | train set | seeds | test/acc | test/mean_class_acc | test/macro_f1 | optimizer steps "
        "| epochs |",
        "| student | real_only | 500 | 0, 1, 2 | 0.5200 ± 0.0200 (n=3) | 0.4700 ± 0.0200 (n=3) | – | 720 | 45 |",
        "| student_mix | concat ×1 | 3000 | 0, 1, 2 | 0.5800 ± 0.0300 (n=3) | 0.5300 ± 0.0300 (n=3) | – | 720 "
        "| 45 |"]
    assert ("Protocol: every student 720 optimizer steps, batch size 64 (equal steps); step budget "
            "(student.max_steps); no early stopping; the checkpoint with the best real val/acc is tested; seeds 0, 1, "
            "2 (n = 3 per student).") in text
    assert "did NOT" not in text
    assert ("- student_mix − student: +6.0 points of test accuracy (means over n = 3 and 3 runs; seed spread ± 3.0 "
            "and ± 2.0 points).") in text
    # the per-run table lists seeds in order, each student's seeds together
    stages = [r.split(" | ")[0][2:] for r in _table_rows(text, "## FER classifiers")[1:7]]
    assert stages == ["student_seed0", "student_seed1", "student_seed2", "student_mix_seed0", "student_mix_seed1",
                      "student_mix_seed2"]


@pytest.mark.parametrize("mixed_steps, patience, stopped_at, equal", [
    (720, None, None, True),
    (4320, None, None, False),        # 15 epochs each over 500 and 3,000 faces: 6x the steps
    (720, 5, 400, True),              # early stopping ends runs sooner: their budgets are what must match
])
def test_protocol_line_and_unequal_steps_warning_single_seed(tmp_path, mixed_steps, patience, stopped_at, equal):
    from lightning_modules.stages.report import run_report

    run = tmp_path / "run"
    _student(run, "student", 0.59, "real_only", stopped_at or 720, 0, patience=patience, max_steps=720,
             stopped=stopped_at is not None, size=500)
    _student(run, "student_mix", 0.55, "concat", mixed_steps, 0, patience=patience, max_steps=mixed_steps,
             size=3000)
    run_report(_cfg(run))
    text = (run / "report" / "results.md").read_text()
    assert "seed 0 (n = 1 per student); one run each: seed-to-seed variation not measured." in text
    warning = ("**Warning: the students of this table did NOT get equal optimizer steps** (student: 720, "
               f"student_mix: {mixed_steps})")
    assert (warning not in text) if equal else (warning in text)
    if patience:
        assert "early stopping on the real val/acc (patience 5 validations; 1 of 2 runs stopped before their budget)" \
            in text and "every student 720 optimizer steps" in text
    else:
        assert "no early stopping" in text


def test_scaling_and_ablation_tables_average_seeds(tmp_path):
    from lightning_modules.stages.report import run_report

    run = tmp_path / "toy"
    for seed, acc in enumerate([0.50, 0.52, 0.54]):
        _student(run, f"student_seed{seed}", acc, "real_only", 300, seed, "student", max_steps=300)
    jobs = [(1.0, 0, 0.58), (2.0, 0, 0.60), (2.0, 1, 0.64), (2.0, 2, 0.62)]   # sweep: student.seed=0,1,2 at 2x
    for num, (scale, seed, acc) in enumerate(jobs):
        _student(run / "multirun" / "d" / str(num), "student", acc, "concat", 300, seed, scale=scale, max_steps=300)
    run_report(_cfg(run, run / "multirun"))
    text = (run / "report" / "results.md").read_text()
    assert _table_rows(text, "## Scaling")[1:] == [
        "| real only | 0.5200 ± 0.0200 (n=3) | – | – |",
        "| real + synthetic (concat) | – | 0.5800 | 0.6200 ± 0.0200 (n=3) |"]
    scaling = text.split("## Scaling", 1)[1]
    assert "Protocol: every student 300 optimizer steps, batch size 64 (equal steps)" in scaling
    assert "seeds 0, 1, 2 (n = 1–3 per cell)" in scaling
    merged = json.loads((run / "report" / "metrics.json").read_text())
    assert merged["scaling/real_only/0"] == pytest.approx(0.52) and merged["scaling/concat/2"] == pytest.approx(0.62)

    sweep = tmp_path / "ablation"
    for num, (experiment, accs, steps) in enumerate([("toy", (0.6, 0.7), 300), ("toy_no_sg", (0.62, 0.66), 600)]):
        for seed, acc in enumerate(accs):
            _student(sweep / str(num), f"student_mix_seed{seed}", acc, "concat", steps, seed, "student_mix",
                     max_steps=steps, experiment=experiment)
    run_report(_cfg(tmp_path / "run", sweep))
    text = (tmp_path / "run" / "report" / "results.md").read_text()
    assert _table_rows(text, "## Ablation")[1:] == ["| toy | 0 | 0.6500 ± 0.0707 (n=2) |",
                                                   "| toy_no_sg | 1 | 0.6400 ± 0.0283 (n=2) |"]
    assert "did NOT get equal optimizer steps** (toy/student_mix_seed0: 300" in text.split("## Ablation", 1)[1]


def test_cumulative_ablation_table_has_the_synthetic_sets_columns(tmp_path):
    """The paper's cumulative rows (base, + fine-tune, + SG, + layout init) as generation-only jobs: no students,
    the synthetic set's judged FER-Acc / AU r / FID / KID per row, the judge named once."""
    from lightning_modules.stages.report import run_report

    sweep = tmp_path / "cumulative"
    rows = [("base", False, 0.0, False, 0.13), ("finetune", True, 0.0, False, 0.40), ("sg", True, 1.0, False, 0.55),
            ("layout", True, 1.0, True, 0.60), ("sg_per_token", True, 1.0, False, 0.50)]
    for num, (experiment, finetune, sg, layout, acc) in enumerate(rows):
        job = sweep / str(num)
        _write(job, "synth_eval", {"fer_acc": acc, "au_pearson_mean": acc / 2, "fid": 50.0 - 10 * num,
                                   "kid_mean": 0.1, "judge": "/j.ckpt", "judge_also_guided": False})
        config = {"experiment_name": experiment, "generator": {"data": {"expression_labels": finetune}},
                  "synthesis": {"guidance": {"embedding_scale": sg, "per_token": experiment.endswith("per_token")},
                                "layout_init": {"enabled": layout}}}
        (job / "synth_eval" / "config.yaml").write_text(yaml.safe_dump(config))
    run_report(_cfg(tmp_path / "run", sweep))
    report = tmp_path / "run" / "report"
    text = (report / "results.md").read_text()
    assert _table_rows(text, "## Ablation") == [
        "| experiment | job | expression fine-tune | SG λ | SG per token | layout init | set FER-Acc | set AU r | set FID "
        "| set KID |",
        "| base | 0 | no | 0 | no | no | 0.1300 | 0.0650 | 50.0 | 0.1000 |",
        "| finetune | 1 | yes | 0 | no | no | 0.4000 | 0.2000 | 40.0 | 0.1000 |",
        "| sg | 2 | yes | 1 | no | no | 0.5500 | 0.2750 | 30.0 | 0.1000 |",
        "| layout | 3 | yes | 1 | no | yes | 0.6000 | 0.3000 | 20.0 | 0.1000 |",
        "| sg_per_token | 4 | yes | 1 | yes | no | 0.5000 | 0.2500 | 10.0 | 0.1000 |"]
    assert "Synthetic sets judged by `/j.ckpt` (did not guide)." in text and "ablation.png" not in text
    # rows that reused one run's judge hold hard links to it: named once
    judge = tmp_path / "judge.ckpt"
    judge.write_bytes(b"weights")
    for num in range(len(rows)):
        link = tmp_path / f"row{num}" / "judge.ckpt"
        link.parent.mkdir()
        os.link(judge, link)
        metrics_file = sweep / str(num) / "synth_eval" / "metrics.json"
        metrics_file.write_text(json.dumps({**json.loads(metrics_file.read_text()), "judge": str(link)}))
    run_report(_cfg(tmp_path / "run", sweep))
    judged = [line for line in (report / "results.md").read_text().splitlines() if line.startswith("Synthetic sets")]
    assert judged == [f"Synthetic sets judged by `{tmp_path / 'row0' / 'judge.ckpt'}` (did not guide)."]
    merged = json.loads((report / "metrics.json").read_text())
    assert merged["ablation/layout/synth_eval/fer_acc"] == 0.6 and merged["ablation/base/synth_eval/fid"] == 50.0


def test_self_training_students_get_their_own_scaling_row(tmp_path):
    """Pseudo-labelled real faces (the self-training baseline) are not averaged into the synthetic faces' cell."""
    import json as _json

    from lightning_modules.report.plots import SELF_TRAINING, StudentRecord, scaling_markdown, scaling_table
    from lightning_modules.stages.report import extra_faces_of

    sets = {}
    for name, source in (("pseudo", "pseudolabel"), ("synth", None)):
        (tmp_path / name).mkdir()
        meta = {"source": source} if source else {}
        (tmp_path / name / "manifest.json").write_text(_json.dumps({"format": "synfer-synthetic/1", "count": 1,
                                                                     "meta": meta, "shards": []}))
        sets[name] = str(tmp_path / name)
    assert extra_faces_of([sets["pseudo"]]) == SELF_TRAINING
    assert extra_faces_of(sets["synth"]) == "synthetic"
    assert extra_faces_of([sets["pseudo"], sets["synth"]]) == "synthetic"
    assert extra_faces_of([str(tmp_path / "gone")]) == "synthetic"  # unknown: cannot be told apart
    records = [StudentRecord("run", "student", "real_only", 0.0, 0.50),
               StudentRecord("run", "student_mix", "concat", 3.0, 0.46),
               StudentRecord("run", "student_selftrain", "concat", 3.0, 0.43, extra_faces=SELF_TRAINING)]
    table = scaling_table(records)
    assert [table.label(k) for k in table.rows] == ["real + synthetic (concat)", "real + pseudo-labelled real (concat)"]
    text = "\n".join(scaling_markdown(table, image=None))
    assert "| real + synthetic (concat) | – | 0.4600 |" in text
    assert "| real + pseudo-labelled real (concat) | – | 0.4300 |" in text

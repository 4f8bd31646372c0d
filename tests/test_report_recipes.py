"""The "does it help?" recipe table: recipes named from saved configs (each recipe file, older configs), the table from
student folders as stage=student writes them (cells over seeds, differences to real only, the protocol line and the
unequal-steps warning), its flat metrics and its wandb table."""
from __future__ import annotations

import json

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, TINY, compose
from lightning_modules.report.recipes import (RecipeRun, recipe_of, recipe_table, recipes_markdown,
                                              recipes_metrics, recipes_wandb_rows)
from lightning_modules.report.students import RunProtocol

RECIPES = sorted(p.stem for p in (CONFIG_DIR / "recipe").glob("*.yaml"))


def test_every_issue_recipe_has_a_file():
    assert RECIPES == sorted(["real_only", "concat", "conditioned", "hard_labels", "ratio_weighted", "pretrain",
                              "judge_filtered", "synthetic_only"])


@pytest.mark.parametrize("name", RECIPES)
def test_each_recipe_file_reads_back_as_its_name(tmp_path, name):
    """Composed as the sweep runs it (toy_full + the sweep + the recipe), the resolved mix names the recipe, and the
    student lands in its own folder; the file sets nothing but mix keys and the student's name."""
    raw = yaml.safe_load((CONFIG_DIR / "recipe" / f"{name}.yaml").read_text())
    assert set(raw) == {"mix", "student"} and set(raw["student"]) == {"name"}
    cfg = compose(["experiment=toy_full", "sweep=recipes_toy_full", f"+recipe={name}", "mix.scale=3"], tmp_path)
    mix = OmegaConf.to_container(cfg.mix, resolve=True)
    assert recipe_of({"mix": mix}) == name
    assert cfg.student.name == f"student_{name}" and cfg.student.max_steps == 705
    assert mix["synthetic"] == "outputs/toy_full/relabel/dataset" and mix["scale"] == 3
    # alone (a single run in the experiment folder) it composes as well and names the same recipe
    alone = compose(["experiment=toy_full", f"+recipe={name}"], tmp_path)
    assert recipe_of({"mix": OmegaConf.to_container(alone.mix, resolve=True)}) == name


@pytest.mark.parametrize("mix, name", [
    (None, "real_only"),                                                     # no mix node: today's default mode
    ({"mode": "concat", "scale": 5.0, "use_relabel": True}, "concat"),      # before vote_labels / weights existed
    ({"mode": "concat", "use_relabel": False}, "conditioned"),
    ({"mode": "synthetic_only", "scale": 2.0}, "synthetic_only"),
    ({"mode": "ratio", "ratio": 0.5}, "ratio"),                              # unweighted ratio mixing
    ({"mode": "ratio", "ratio": 0.25, "synthetic_loss_weight": 0.5}, "ratio0.25_weighted"),
    ({"mode": "pretrain", "pretrain_fraction": 0.3}, "pretrain0.3"),
    ({"mode": "pretrain", "vote_labels": "hard"}, "pretrain_hard_labels"),
    ({"mode": "concat", "use_relabel": False, "vote_labels": "hard"}, "conditioned"),  # no vote: its labels unused
    ({"mode": "concat", "min_judge_confidence": 0.8}, "judge_filtered0.8"),
    ({"mode": "concat", "min_judge_confidence": 0.3, "judge": "guide"}, "judge_filtered_by_guide"),
    ({"mode": "concat", "min_judge_confidence": 0.3, "judge": "outputs/x/judge/judge.ckpt"}, "judge_filtered"),
    ({"mode": "concat", "synthetic_loss_weight": 0.5, "min_judge_confidence": 0.5}, "weighted_judge_filtered0.5"),
    ({"mode": "concat", "min_judge_confidence": 0.3, "judge": "/weights/fer_teacher.ckpt"},
     "judge_filtered_by_fer_teacher"),
    ({"mode": "concat", "class_balance": True, "kept_only": False}, "class_balanced_with_dropped"),
    ({"mode": "real_only", "vote_labels": "hard", "synthetic_loss_weight": 0.1}, "real_only"),
    ({"mode": "concat", "synthetic_loss_weight": None, "vote_labels": None}, "concat"),  # null reads as the default
])
def test_recipe_of_older_and_other_configs(mix, name):
    assert recipe_of({} if mix is None else {"mix": mix}) == name


@pytest.mark.parametrize("judge, name", [
    ("separate", "judge_filtered"),
    ("/o/toy_full/judge/judge.ckpt", "judge_filtered"),        # the experiment's own judge, as the sweep names it
    ("/o/strong_judge/judge/judge.ckpt", "judge_filtered_by_strong_judge"),
])
def test_a_judge_filtered_recipe_names_a_judge_of_another_run(judge, name):
    mix = {"mode": "concat", "min_judge_confidence": 0.3, "judge": judge}
    assert recipe_of({"experiment_name": "toy_full", "mix": mix}) == name


@pytest.mark.parametrize("recipe, text", [
    ("pretrain", "synthetic faces for the first half of the steps, then real faces"),
    ("judge_filtered", "concat with the synthetic faces the judge gives their label p >= 0.3"),
    ("judge_filtered0.5", "concat with the synthetic faces the judge gives their label p >= 0.5"),
    ("judge_filtered_by_strong_judge",
     "concat with the synthetic faces the judge strong_judge gives their label p >= 0.3"),
    ("judge_filtered0.8_by_guide", "concat with the synthetic faces the guiding classifier gives their label p >= 0.8"),
    ("ratio0.25_weighted", None),
])
def test_legend_describes_file_recipes_and_judge_filters(recipe, text):
    from lightning_modules.report.recipes import describe

    assert describe(recipe) == text


@pytest.mark.parametrize("mix, match", [
    ({"mode": "ratio", "ratio": "half"}, "mix.ratio must be a number, got 'half'"),
    ({"mode": "concat", "synthetic_loss_weight": True}, "mix.synthetic_loss_weight must be a number"),
    ("concat", "mix must be a mapping"),
])
def test_recipe_of_bad_values_name_the_key(mix, match):
    with pytest.raises(ValueError, match=match):
        recipe_of({"mix": mix})


# ------------------------------------------------------------------ student folders as stage=student writes them
def _student(job, stage, acc, mix, seed, steps=705, experiment="toy_full", resample=None):
    """metrics.json (test metrics, datamodule summary, protocol keys) + the resolved config.yaml of one student."""
    mode = mix["mode"]
    (job / stage).mkdir(parents=True)
    (job / stage / "metrics.json").write_text(json.dumps({
        "test/acc": acc, "test/mean_class_acc": acc - 0.05, "data/mix/mode": mode,
        "data/mix/scale": mix.get("scale", 1.0), "optimizer_steps": steps, "epochs": round(steps / 47, 2),
        "train_batches_per_epoch": 47, "train_set_size": 3000, "max_steps": steps, "max_epochs": 15,
        "early_stopping_patience": None, "stopped_early": False, "seed": seed,
        "student_group": stage.rsplit("_seed", 1)[0], "data/test_size": 400}))
    config = {"experiment_name": experiment, "seed": 0, "data": {"batch_size": 64, "train_resample_size": resample},
              "student": {"name": stage, "seed": seed, "max_steps": steps}, "mix": {"scale": 1.0, **mix}}
    (job / stage / "config.yaml").write_text(yaml.safe_dump(config))


def _recipe_mix(name, scale):
    mix = yaml.safe_load((CONFIG_DIR / "recipe" / f"{name}.yaml").read_text())["mix"]
    return {**mix, "scale": float(scale)}


def _study(tmp_path, pretrain_steps=705):
    """The toy_full run folder (the pipeline's real-only and real + 5x students, 3 seeds) and a recipes sweep folder:
    pretrain at 1x and 5x, synthetic only at 1x, concat at 5x for seed 0 (a twin of the pipeline's student_mix)."""
    run, sweep = tmp_path / "toy_full", tmp_path / "recipes" / "2026-01-01_00-00-00"
    for seed, (real, mixed) in enumerate([(0.58, 0.60), (0.60, 0.62), (0.62, 0.61)]):
        _student(run, f"student_seed{seed}", real, {"mode": "real_only", "scale": 5.0}, seed)
        _student(run, f"student_mix_seed{seed}", mixed, {"mode": "concat", "scale": 5.0}, seed)  # old-style config
    jobs = [("pretrain", 1, [0.61, 0.63, 0.65]), ("pretrain", 5, [0.64, 0.66, 0.68]),
            ("synthetic_only", 1, [0.40, 0.42, 0.44]), ("concat", 5, [0.99])]
    num = 0
    for name, scale, accs in jobs:
        for seed, acc in enumerate(accs):
            steps = pretrain_steps if (name, scale, seed) == ("pretrain", 5, 2) else 705
            _student(sweep / str(num), f"student_{name}", acc, _recipe_mix(name, scale), seed, steps)
            num += 1
    return run, tmp_path / "recipes"


def _report_cfg(run, *dirs):
    return OmegaConf.create({"experiment_name": "toy_full", "data": {"format": "imagefolder"},
                             "paths": {"run_dir": str(run)},
                             "report": {"dirs": [str(d) for d in dirs], "baseline": None, "grid_per_class": 3}})


def _section(text, header):
    return text.split(header, 1)[1].split("\n## ", 1)[0]


def _rows(section):
    return [line for line in section.splitlines() if line.startswith("|") and not line.startswith("|---")]


def test_recipe_table_from_student_folders(tmp_path):
    from lightning_modules.stages.report import run_report

    run, recipes = _study(tmp_path)
    run_report(_report_cfg(run, recipes))
    text = (run / "report" / "results.md").read_text()
    section = _section(text, "## Does it help? Recipes")
    by_acc, by_class = section.split("The same students by mean-class test accuracy", 1)
    assert _rows(by_acc) == [
        "| recipe \\ synthetic faces | none | 1x | 5x |",
        "| real only | 0.6000 ± 0.0200 (n=3) | – | – |",
        # the sweep's concat twin of seed 0 (0.99) is left out: n counts distinct seeds
        "| concat | – | – | 0.6100 ± 0.0100 (n=3), Δ +1.0 |",
        "| pretrain | – | 0.6300 ± 0.0200 (n=3), Δ +3.0 | 0.6600 ± 0.0200 (n=3), Δ +6.0 |",
        "| synthetic only | – | 0.4200 ± 0.0200 (n=3), Δ -18.0 | – |"]
    assert ("Best cell: pretrain at 5x, +6.0 points over real only (seed spread ± 2.0 and ± 2.0 points: beyond the "
            "two spreads added).") in section
    assert "Protocol: every student 705 optimizer steps, batch size 64 (equal steps)" in section
    assert "(n = 3 per cell)" in section and "did NOT" not in section
    assert "Left out 1 run(s) repeating the recipe, scale and seed" in section and "9/student_concat" in section
    assert "pretrain = synthetic faces for the first half of the steps, then real faces" in section
    assert "## Scaling" in text                                     # the plain scaling table stays
    merged = json.loads((run / "report" / "metrics.json").read_text())
    assert merged["recipes/real_only/0"] == pytest.approx(0.60)
    assert merged["recipes/pretrain/5"] == pytest.approx(0.66) and merged["recipes/concat/5"] == pytest.approx(0.61)
    assert merged["recipes/synthetic_only/1"] == pytest.approx(0.42) and "recipes/pretrain/3" not in merged
    # the same students by mean-class accuracy (the fixtures write test acc - 0.05): same shape, same deltas
    assert _rows(by_class) == [
        "| recipe \\ synthetic faces | none | 1x | 5x |",
        "| real only | 0.5500 ± 0.0200 (n=3) | – | – |",
        "| concat | – | – | 0.5600 ± 0.0100 (n=3), Δ +1.0 |",
        "| pretrain | – | 0.5800 ± 0.0200 (n=3), Δ +3.0 | 0.6100 ± 0.0200 (n=3), Δ +6.0 |",
        "| synthetic only | – | 0.3700 ± 0.0200 (n=3), Δ -18.0 | – |"]
    assert "Best cell (mean-class test accuracy): pretrain at 5x, +6.0 points" in by_class
    assert merged["recipes/real_only/0/mean_class_acc"] == pytest.approx(0.55)
    assert merged["recipes/pretrain/5/mean_class_acc"] == pytest.approx(0.61)


def test_students_on_shrunk_real_faces_are_a_row_of_their_own(tmp_path):
    """A real-only student on real faces shrunk to 32 px (data.train_resample_size) is the resolution diagnosis: its
    own row in the "none" column with its difference to real only; never part of the real-only baseline nor of the
    scaling table, even from the experiment's run folder; not a candidate for the best recipe."""
    from lightning_modules.stages.report import run_report

    run, recipes = _study(tmp_path)
    for seed, acc in enumerate([0.50, 0.52, 0.54]):
        _student(run if seed == 0 else recipes / "small" / str(seed), f"student_small{seed}", acc,
                 {"mode": "real_only", "scale": 5.0}, seed, resample=32)
    run_report(_report_cfg(run, recipes))
    text = (run / "report" / "results.md").read_text()
    section = _section(text, "## Does it help? Recipes")
    rows = _rows(section.split("The same students by mean-class test accuracy", 1)[0])
    assert rows[:3] == ["| recipe \\ synthetic faces | none | 1x | 5x |",
                        "| real only | 0.6000 ± 0.0200 (n=3) | – | – |",
                        "| real_only_train32px | 0.5200 ± 0.0200 (n=3), Δ -8.0 | – | – |"]
    assert "real_only_train32px = the real train set alone, real train faces shrunk to 32 px first" in section
    assert "Best cell: pretrain at 5x" in section
    merged = json.loads((run / "report" / "metrics.json").read_text())
    assert merged["recipes/real_only/0"] == pytest.approx(0.60)
    assert merged["recipes/real_only_train32px/0"] == pytest.approx(0.52)
    scaling = _section(text, "## Scaling")
    assert "student_small" not in scaling and merged["scaling/real_only/0"] == pytest.approx(0.60)


def test_recipe_of_names_shrunk_real_faces():
    assert recipe_of({"data": {"train_resample_size": 32}, "mix": {"mode": "real_only"}}) == "real_only_train32px"
    assert recipe_of({"data": {"train_resample_size": 24}, "mix": {"mode": "concat"}}) == "concat_train24px"
    assert recipe_of({"data": {"train_resample_size": None}, "mix": {"mode": "concat"}}) == "concat"


def test_unequal_steps_between_cells_are_warned(tmp_path):
    from lightning_modules.stages.report import run_report

    run, recipes = _study(tmp_path, pretrain_steps=300)             # one pretrain student stopped at 300 steps
    run_report(_report_cfg(run, recipes))
    section = _section((run / "report" / "results.md").read_text(), "## Does it help? Recipes")
    assert "300–705 optimizer steps per student" in section
    assert ("Warning: the students of this table did NOT get equal optimizer steps** (pretrain ×5 "
            "(2026-01-01_00-00-00/5/student_pretrain): 300, real only (toy_full/student_seed0): 705") in section


def test_plain_scaling_gets_no_recipe_table(tmp_path):
    from lightning_modules.stages.report import run_report

    run = tmp_path / "run"
    _student(run, "student", 0.6, {"mode": "real_only"}, 0)
    _student(run, "student_mix", 0.62, {"mode": "concat", "scale": 5.0}, 0)
    _student(run, "student_syn", 0.5, {"mode": "synthetic_only", "scale": 5.0}, 0)
    run_report(_report_cfg(run))
    assert "Does it help?" not in (run / "report" / "results.md").read_text()
    assert not any(k.startswith("recipes/") for k in json.loads((run / "report" / "metrics.json").read_text()))


def test_old_style_config_in_the_table(tmp_path):
    """A student saved before the recipe keys existed (use_relabel false, nothing else) is the conditioned recipe."""
    from lightning_modules.stages.report import run_report

    run = tmp_path / "run"
    _student(run, "student", 0.6, {"mode": "real_only"}, 0)
    _student(run, "student_cond", 0.55, {"mode": "concat", "scale": 3.0, "use_relabel": False}, 0)
    run_report(_report_cfg(run))
    rows = _rows(_section((run / "report" / "results.md").read_text(), "## Does it help? Recipes"))
    assert rows[1:3] == ["| real only | 0.6000 (n=1) | – |", "| conditioned | – | 0.5500 (n=1), Δ -5.0 |"]


def test_bad_recipe_value_names_the_student_config(tmp_path):
    from lightning_modules.stages.report import run_report

    run = tmp_path / "run"
    _student(run, "student_pretrain", 0.6, {"mode": "pretrain", "pretrain_fraction": "most"}, 0)
    with pytest.raises(ValueError, match=r"student_pretrain/config.yaml: mix.pretrain_fraction must be a number"):
        run_report(_report_cfg(run))


def _run(label, recipe, scale, acc, seed, steps=705, experiment=None):
    return RecipeRun(label, recipe, scale, acc, RunProtocol(steps=steps, seed=seed, max_steps=steps), experiment)


def test_table_without_real_only_and_across_experiments():
    table = recipe_table([_run("a", "pretrain", 1.0, 0.5, 0, experiment="x"),
                          _run("b", "pretrain", None, 0.7, 0, experiment="y")])
    lines = recipes_markdown(table)
    assert "| recipe \\ synthetic faces | none | 1x | every kept face |" in lines
    assert "| x: pretrain | – | 0.5000 (n=1) | – |" in lines
    assert "| y: pretrain | – | – | 0.7000 (n=1) |" in lines
    assert any(line.startswith("No real-only student found") for line in lines)
    assert not any(line.startswith("Best cell") for line in lines)
    assert recipes_metrics(table) == {"recipes/x/pretrain/1": 0.5, "recipes/y/pretrain/all": 0.7}
    assert not any("mean-class" in line for line in lines)  # runs without a mean-class accuracy: one table


def test_wandb_rows_and_given_baseline():
    base = [_run("base/student", "real_only", 0.0, 0.5, 0)]
    table = recipe_table([_run("a", "real_only", 0.0, 0.9, 0), _run("b", "hard_labels", 3.0, 0.6, 0),
                          _run("c", "hard_labels", 3.0, 0.64, 1, steps=600)], baseline=base)
    rows = recipes_wandb_rows(table)
    assert rows[0] == [None, "real_only", 0.0, 0.5, None, 1, None, 705, 705]    # the given baseline, not run a
    assert rows[1][:4] == [None, "hard_labels", 3.0, pytest.approx(0.62)]
    assert rows[1][5:] == [2, pytest.approx(12.0), 600, 705]


def test_recipe_table_is_logged_to_wandb_offline(tmp_path):
    from lightning_modules.stages.report import run_report

    run, recipes = _study(tmp_path)
    tiny = [o for o in TINY if not o.startswith("logger=")]
    cfg = compose([*tiny, "logger=default", "logger.wandb.mode=offline", "logger.wandb.artifacts=false",
                   "experiment_name=toy_full", f"report.dirs=[{recipes}]"], run)
    run_report(cfg)
    tables = list((run / "report" / "wandb").glob("offline-run-*/files/media/table/report/recipes_*.table.json"))
    assert len(tables) == 1
    logged = json.loads(tables[0].read_text())
    assert logged["columns"][:3] == ["experiment", "recipe", "scale"]
    assert [(r[1], r[2], r[5]) for r in logged["data"]] == [("real_only", 0.0, 3), ("concat", 5.0, 3),
                                                             ("pretrain", 1.0, 3), ("pretrain", 5.0, 3),
                                                             ("synthetic_only", 1.0, 3)]

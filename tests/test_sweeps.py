"""Sweeps: the Hydra multirun configs compose, the wandb sweep specs match them, and a tiny real multirun runs one
student per swept point, each in its own folder and wandb run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import CONFIG_DIR, REPO, TINY


def _compose_with_hydra(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def test_scaling_sweep_config():
    cfg = _compose_with_hydra(["sweep=scaling", "experiment=toy"])
    assert cfg.stage == "student" and cfg.logger.wandb.group == "toy-scaling"
    assert cfg.mix.synthetic == "outputs/toy/relabel/dataset"
    params = cfg.hydra.sweeper.params
    assert params["mix.mode"] == "synthetic_only,concat" and params["mix.scale"] == "1,2,3,4,5"


def test_ablation_sweep_rows_are_experiments():
    cfg = _compose_with_hydra(["sweep=ablation"])
    assert cfg.stage == "pipeline"
    rows = cfg.hydra.sweeper.params["experiment"].split(",")
    assert rows[0] == "toy" and len(rows) == 4
    for row in rows:  # every row composes, with the sweep's wandb group kept
        one = _compose_with_hydra(["sweep=ablation", f"experiment={row}"])
        assert one.experiment_name == row and one.logger.wandb.group == "toy-ablation"


def test_toy_full_ablation_rows_reuse_the_full_run():
    cfg = _compose_with_hydra(["sweep=ablation_toy_full"])
    rows = cfg.hydra.sweeper.params["experiment"].split(",")
    assert rows[0] == "toy_full" and len(rows) == 4 and cfg.stage == "pipeline"
    for row in rows:
        one = _compose_with_hydra(["sweep=ablation_toy_full", f"experiment={row}"])
        assert one.experiment_name == row and one.pipeline.reuse == "outputs/toy_full"
        assert one.logger.wandb.group == "toy_full-ablation" and one.data.toy.n_train == 500
    no_sg = _compose_with_hydra(["sweep=ablation_toy_full", "experiment=toy_full_no_sg"])
    assert no_sg.synthesis.guidance.embedding_scale == 0.0 and no_sg.generator.guidance.embedding_scale == 1.0


def test_cumulative_rows_add_one_component_each():
    cfg = _compose_with_hydra(["sweep=cumulative_toy_full"])
    rows = cfg.hydra.sweeper.params["experiment"].split(",")
    assert len(rows) == 4 and cfg.stage == "pipeline" and cfg.pipeline.reuse == "outputs/toy_full"
    one = {row: _compose_with_hydra(["sweep=cumulative_toy_full", f"experiment={row}"]) for row in rows}
    switches = [(c.generator.data.expression_labels, c.synthesis.guidance.embedding_scale,
                 c.synthesis.layout_init.enabled) for c in one.values()]
    assert switches == [(False, 0.0, False), (True, 0.0, False), (True, 1.0, False), (True, 1.0, True)]
    for row, c in one.items():  # the sets are compared, by a judge that guides nothing; no students
        assert c.experiment_name == row and c.synth_eval.judge == "separate" and "students" not in c.pipeline.stages
        assert c.logger.wandb.group == "toy_full-cumulative" and c.data.toy.n_train == 500


@pytest.mark.parametrize("name, hydra_sweep", [("scaling", "scaling"), ("ablation", "ablation"),
                                               ("cumulative_toy_full", "cumulative_toy_full"),
                                               ("recipes_toy_full", "recipes_toy_full"),
                                               ("recipes_judge_filtered_toy_full",
                                                "recipes_judge_filtered_toy_full"),
                                               ("ssl_sources", "ssl_sources"), ("clip_sources", "clip_sources"),
                                               ("fewshot_sources", "fewshot_sources")])
def test_wandb_sweep_specs_match_the_hydra_sweeps(name, hydra_sweep):
    """Same swept values; a Hydra parameter with one value is a fixed override of the spec's command; and the
    command's fixed overrides are what the Hydra sweep composes to (its data, judge, wandb group)."""
    spec = yaml.safe_load((CONFIG_DIR / "wandb_sweeps" / f"{name}.yaml").read_text())
    assert spec["program"] == "train.py" and "${args_no_hyphens}" in spec["command"]
    fixed = dict(str(c).split("=", 1) for c in spec["command"] if "=" in str(c) and not str(c).startswith("$"))
    composed = _compose_with_hydra([f"sweep={hydra_sweep}", f"experiment={fixed.get('experiment', 'toy')}"])
    hydra_params = composed.hydra.sweeper.params
    for key, values in spec["parameters"].items():
        assert sorted(map(str, values["values"])) == sorted(hydra_params[key].split(","))
    for key, values in hydra_params.items():
        assert key in spec["parameters"] or fixed.get(key) == values, key
    for key, value in fixed.items():
        if key not in ("stage", "experiment", "logger.wandb.mode"):  # online: the spec is for a wandb server
            assert str(OmegaConf.select(composed, key)) == value, key
    stage = next(c for c in spec["command"] if str(c).startswith("stage="))
    assert stage == f"stage={_compose_with_hydra([f'sweep={hydra_sweep}']).stage}"


def test_recipes_sweep_runs_each_recipe_at_three_scales_and_seeds():
    cfg = _compose_with_hydra(["sweep=recipes_toy_full", "experiment=toy_full"])
    params = cfg.hydra.sweeper.params
    recipes = params["+recipe"].split(",")
    files = sorted(p.stem for p in (CONFIG_DIR / "recipe").glob("*.yaml"))
    # real only ignores the scale: not swept; judge_filtered keeps too few faces for 3x / 5x: its own sweep
    assert sorted(recipes) == [r for r in files if r not in ("real_only", "judge_filtered")]
    assert params["mix.scale"] == "1,3,5" and params["student.seed"] == "0,1,2" and params["experiment"] == "toy_full"
    assert cfg.stage == "student" and cfg.logger.wandb.group == "toy_full-recipes"
    assert cfg.mix.judge == "outputs/toy_full/judge/judge.ckpt" and cfg.student.max_steps == 705
    # its own folder: report.dirs=[outputs/recipes] then holds no scaling-sweep students
    assert OmegaConf.to_container(cfg.hydra.sweep)["dir"].startswith("${output_root}/recipes/")


def test_judge_filtered_sweep_is_the_recipes_sweep_at_1x():
    recipes = _compose_with_hydra(["sweep=recipes_toy_full", "experiment=toy_full"])
    cfg = _compose_with_hydra(["sweep=recipes_judge_filtered_toy_full", "experiment=toy_full"])
    params = cfg.hydra.sweeper.params
    assert params["+recipe"] == "judge_filtered" and str(params["mix.scale"]) == "1"
    assert params["student.seed"] == "0,1,2" and params["experiment"] == "toy_full"
    assert cfg.mix.judge == recipes.mix.judge and cfg.mix.synthetic == recipes.mix.synthetic
    assert cfg.logger.wandb.group == recipes.logger.wandb.group and cfg.stage == "student"
    assert OmegaConf.to_container(cfg.hydra.sweep)["dir"] == OmegaConf.to_container(recipes.hydra.sweep)["dir"]


@pytest.mark.slow
def test_tiny_scaling_multirun_runs_each_point_in_its_own_run(tmp_path):
    from synthetic_fixtures import write_toy_synthetic_set

    synthetic = tmp_path / "synthetic"
    write_toy_synthetic_set(synthetic, n=96, shards=1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    tiny = [o for o in TINY if not o.startswith("logger=")]
    cmd = [sys.executable, "train.py", "--multirun", "sweep=scaling", *tiny, f"output_root={tmp_path}",
           "experiment_name=sw", f"mix.synthetic={synthetic}", "mix.scale=0.5", "mix.mode=synthetic_only,concat"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((tmp_path / "sw" / "multirun").glob("*/*/student/metrics.json"))
    assert len(jobs) == 2                                            # one student per swept point
    modes = sorted(json.loads(p.read_text())["data/mix/mode"] for p in jobs)
    assert modes == ["concat", "synthetic_only"]
    runs = [next((p.parent / "wandb").glob("offline-run-*")) for p in jobs]
    assert len({r.name for r in runs}) == 2                          # wandb.finish between runs: two runs
    for job in jobs:
        config = OmegaConf.load(job.parent / "config.yaml")
        assert config.logger.wandb.group == "sw-scaling" and config.mix.scale == 0.5
    # the report reads the real sweep folder: one scaling row per mode
    from conftest import compose
    from lightning_modules.stages.report import run_report

    run_report(compose([*TINY, f"report.dirs=[{tmp_path / 'sw' / 'multirun'}]"], tmp_path / "report_run"))
    text = (tmp_path / "report_run" / "report" / "results.md").read_text()
    accuracy = {json.loads(p.read_text())["data/mix/mode"]: json.loads(p.read_text())["test/acc"] for p in jobs}
    assert "synthetic only" in text and f"{accuracy['synthetic_only']:.4f}" in text
    assert (tmp_path / "report_run" / "report" / "scaling.png").is_file()


@pytest.mark.parametrize("experiment, data", [("affectnet8_scale", "affectnet"), ("rafdb_scale", "rafdb"),
                                              ("fer2013_lowdata", "fer2013")])
def test_cluster_experiments_compose_for_gpus(experiment, data):
    """The public-dataset experiments: their data format, SD generator, DDP + bf16 trainer, and the two local paths
    left for the user (data.root, generator.model.pretrained_path) as required values."""
    cfg = _compose_with_hydra([f"experiment={experiment}"])
    assert cfg.data.format == data and cfg.experiment_name == experiment
    assert cfg.generator.model.backbone == "pretrained" and cfg.trainer.strategy == "ddp"
    assert cfg.trainer.precision == "bf16-mixed"
    # the user's local folders: data.root is required, the SD folder is checked by stage=generator (not set here)
    assert OmegaConf.is_missing(cfg.data, "root") and cfg.generator.model.pretrained_path in (None, "???")
    assert cfg.synthesis.plan.scale == 5.0
    assert cfg.synthesis.guidance.embedding_scale == 1.0  # the README: the cluster experiments use SG with λ = 1

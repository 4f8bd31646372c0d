"""stage=ssl: the NT-Xent loss, the two views of a face, config errors, an end-to-end run with its linear probes, the
sources sweep and a two-process DDP run whose negatives come from both ranks."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import CONFIG_DIR, REPO, TINY
from lightning_modules.paradigms.ssl import TwoViews, ViewAugment, negatives_per_anchor, nt_xent, view_transform
from lightning_modules.run.runtime import ConfigError

FAST = ["stage=ssl", "ssl.max_steps=2", "ssl.probe.epochs=5", "ssl.projection_hidden_dim=32",
        "ssl.projection_dim=16"]


# ------------------------------------------------------------------------------------------------------ NT-Xent
@pytest.mark.parametrize("temperature", [1.0, 0.5, 0.25])
def test_nt_xent_orthogonal_pairs_by_hand(temperature):
    """Two faces, both views equal, the faces orthogonal: each anchor's positive has similarity 1, its two
    negatives 0, so every anchor's loss is -log(e^(1/t) / (e^(1/t) + 2)) = log(1 + 2 e^(-1/t))."""
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = math.log(1 + 2 * math.exp(-1 / temperature))
    assert nt_xent(z, z.clone(), temperature).item() == pytest.approx(expected, rel=1e-5)


def _reference(z_a: torch.Tensor, z_b: torch.Tensor, t: float) -> float:
    """The SimCLR formula written out anchor by anchor: -log(exp(s(i, pos) / t) / sum_{k != i} exp(s(i, k) / t))."""
    z = [v / v.norm() for v in torch.cat([z_a, z_b])]
    n = len(z_a)
    total = 0.0
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        denominator = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[pos]) / t) / denominator)
    return total / (2 * n)


def test_nt_xent_matches_the_formula_anchor_by_anchor():
    gen = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    for t in (0.2, 1.0):
        assert nt_xent(z_a, z_b, t).item() == pytest.approx(_reference(z_a, z_b, t), rel=1e-5)


def test_nt_xent_is_symmetric_and_scale_free():
    gen = torch.Generator().manual_seed(1)
    z_a, z_b = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    assert nt_xent(z_a, z_b, 0.3).item() == pytest.approx(nt_xent(z_b, z_a, 0.3).item(), rel=1e-6)
    assert nt_xent(3 * z_a, z_b, 0.3).item() == pytest.approx(nt_xent(z_a, z_b, 0.3).item(), rel=1e-5)  # cosine


def test_nt_xent_positives_are_the_same_row_of_the_other_view():
    """Matching rows (view b = view a + noise) give a low loss; the same views paired with the wrong rows do not."""
    gen = torch.Generator().manual_seed(2)
    z_a = torch.randn(8, 16, generator=gen)
    z_b = z_a + 0.05 * torch.randn(8, 16, generator=gen)
    aligned, shifted = nt_xent(z_a, z_b, 0.1).item(), nt_xent(z_a, z_b.roll(1, dims=0), 0.1).item()
    assert aligned < 0.05 < 5 < shifted


def test_nt_xent_with_candidates_of_all_ranks_equals_the_whole_batch():
    """What a rank computes from gathered candidates (its rows at ``offset``), weighted by its pairs, sums to the
    loss of the whole global batch: uneven shares (2 and 4 pairs) included."""
    gen = torch.Generator().manual_seed(3)
    z_a, z_b = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    whole = nt_xent(z_a, z_b, 0.5).item()
    shares = [(0, 2), (2, 6)]
    per_rank = [nt_xent(z_a[lo:hi], z_b[lo:hi], 0.5, z_a, z_b, offset=lo).item() * (hi - lo) for lo, hi in shares]
    assert sum(per_rank) / 6 == pytest.approx(whole, rel=1e-6)
    assert negatives_per_anchor(6) == 10


@pytest.mark.parametrize("call, match", [
    (lambda z: nt_xent(z, z, 0.0), "temperature"),
    (lambda z: nt_xent(z, z, -0.5), "temperature"),
    (lambda z: nt_xent(z[:1], z[:1], 0.5), "at least 2 pairs"),
    (lambda z: nt_xent(z, z[:2], 0.5), "expected"),
    (lambda z: nt_xent(z[:2], z[:2], 0.5, z, z, offset=2), "offset"),
])
def test_nt_xent_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(3, 4))


def test_probe_scores_are_the_suites_classification_metrics():
    """The probe scores without a process group, with the same definitions as the classifiers' metrics (labels -1
    left out), and learns a linearly separable toy problem."""
    from lightning_modules.paradigms.metrics import classification_metrics
    from lightning_modules.paradigms.ssl_probe import ProbeSettings, score_probe, train_linear_probe

    gen = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 4, (64,), generator=gen)
    features = torch.nn.functional.one_hot(labels, 4).float() * 3 + 0.3 * torch.randn(64, 4, generator=gen)
    with pytest.warns(UserWarning, match="2 of 64 train faces have no label"):
        probe = train_linear_probe(features, torch.cat([labels[:62], torch.tensor([-1, -1])]), 4,
                                   ProbeSettings(epochs=30, batch_size=16), seed=0)
    scores = score_probe(probe, features, labels, 4)
    assert scores["acc"] == 1.0
    noisy = torch.randn(64, 4, generator=gen)
    reference = classification_metrics(4, "")
    reference.update(probe(noisy).argmax(dim=1), labels)
    assert score_probe(probe, noisy, labels, 4) == pytest.approx({k: float(v) for k, v in reference.compute().items()})


# ------------------------------------------------------------------------------------------------------- views
def _face():
    from datamodules.real import toy_records
    from datamodules.toyfaces import ToyFacesConfig
    from PIL import Image

    return Image.fromarray(toy_records(ToyFacesConfig(image_size=32, seed=5), "test", 1, progress=False)[0].image)


def test_views_without_augmentation_are_the_plain_face():
    from datamodules.transforms import eval_transform

    face = _face()
    plain = ViewAugment(strength=0.0, crop_scale=(1.0, 1.0), hflip=False, grayscale_p=0.0)
    views = TwoViews(view_transform(32, plain))(face)
    assert views.shape == (2, 3, 32, 32)
    assert torch.allclose(views[0], eval_transform(32)(face), atol=1e-6) and torch.equal(views[0], views[1])


def test_augmented_views_differ():
    torch.manual_seed(0)
    views = TwoViews(view_transform(32, ViewAugment()))(_face())
    assert views.shape == (2, 3, 32, 32) and (views[0] - views[1]).abs().mean() > 0.05
    assert views.min() >= -1 and views.max() <= 1


@pytest.mark.parametrize("kwargs, key", [({"strength": 3.0}, "strength"), ({"crop_scale": (0.6, 0.2)}, "crop_scale"),
                                         ({"jitter_p": 1.5}, "jitter_p"), ({"grayscale_p": -0.1}, "grayscale_p")])
def test_view_augment_rejects_out_of_range_values(kwargs, key):
    with pytest.raises(ValueError, match=f"ssl.augment.{key}"):
        ViewAugment(**kwargs)


def test_each_row_of_a_batch_holds_two_views_of_its_own_face(tiny_cfg):
    """Through the mixed datamodule: with a flip as the only augmentation, both views of every row are that row's
    face (sample_id) or its mirror image, and flips are drawn per view."""
    from datamodules.transforms import eval_transform
    from lightning_modules.stages.ssl_stage import build_ssl_datamodule

    cfg = tiny_cfg(*FAST, "ssl.augment.strength=0", "ssl.augment.crop_scale=[1.0,1.0]", "ssl.augment.grayscale_p=0",
                   "ssl.batch_size=16")
    torch.manual_seed(0)
    datamodule = build_ssl_datamodule(cfg)
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape == (16, 2, 3, 32, 32)
    from datamodules.batch import load_record_image

    records = {r.sample_id: r for r in datamodule.real.records["train"]}
    flips = set()
    for views, sample_id in zip(batch["image"], batch["sample_id"]):
        face = eval_transform(32)(load_record_image(records[sample_id]))
        for view in views:
            same, mirrored = torch.allclose(view, face, atol=1e-5), torch.allclose(view, face.flip(-1), atol=1e-5)
            assert same or mirrored, sample_id
            flips.add(mirrored)
    assert flips == {True, False}


# -------------------------------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("override, key", [
    ("ssl.method=moco_v3", "ssl.method"),
    ("ssl.temperature=0", "ssl.temperature"),
    ("ssl.temperature=-0.1", "ssl.temperature"),
    ("ssl.batch_size=1", "ssl.batch_size"),
    ("data.batch_size=1", "data.batch_size"),   # ssl.batch_size null: the data's batch size is used
    ("mix.mode=ratio", "mix.mode"),
    ("mix.ratio=1.5", "mix.ratio"),
    ("ssl.augment.strength=5", "ssl.augment.strength"),
    ("ssl.augment.crop_scale=[0.9,0.1]", "ssl.augment.crop_scale"),
    ("ssl.probe.epochs=0", "ssl.probe.epochs"),
    ("ssl.probe.lr=0", "ssl.probe.lr"),
    ("ssl.probe.baseline_random=maybe", "ssl.probe.baseline_random"),
    ("ssl.backbone=no_such_net", "ssl.backbone"),
    ("ssl.max_steps=0", "ssl.max_steps"),
    ("ssl.checkpoint_every_n_steps=null", "ssl.checkpoint_every_n_steps"),
    ("ssl.name=student", "ssl.name"),
    ("mix.class_balance=true", "mix.class_balance"),  # draws by label: not self-supervised
    ("ssl.pretrained=/no/such/weights.pth", "ssl.pretrained"),
])
def test_bad_ssl_config_names_the_key(tiny_cfg, override, key):
    from lightning_modules.stages.ssl_stage import check_ssl_config

    with pytest.raises(ConfigError) as err:
        check_ssl_config(tiny_cfg(*FAST, override))
    assert err.value.key == key


def test_a_good_config_passes_and_the_probe_is_not_part_of_the_resume_key(tiny_cfg):
    from lightning_modules.stages.ssl_stage import check_ssl_config, digests

    cfg = tiny_cfg(*FAST)
    check_ssl_config(cfg)
    resume, done = digests(cfg)
    resume2, done2 = digests(tiny_cfg(*FAST, "ssl.probe.epochs=7"))
    assert resume == resume2 and done != done2
    assert digests(tiny_cfg(*FAST, "ssl.temperature=0.3"))[0] != resume


# ------------------------------------------------------------------------------------------------------ sweep
def test_ssl_sources_sweep_composes_and_real_only_is_its_own_command():
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["sweep=ssl_sources", "experiment=toy", "ssl.seed=2"],
                      return_hydra_config=True)
    assert cfg.stage == "ssl" and cfg.mix.synthetic == "outputs/toy/relabel/dataset" and cfg.mix.seed == 2
    params = dict(cfg.hydra.sweeper.params)
    assert params == {"mix.mode": "synthetic_only,concat", "mix.scale": "1,5", "ssl.seed": "0,1,2"}

    def jobs(*command_line):
        parser = OverridesParser.create()
        overrides = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + list(command_line))
        return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]

    assert len(jobs()) == 12
    real_only = jobs("mix.mode=real_only", "mix.scale=1")
    assert len(real_only) == 3 and all("mix.mode=real_only" in job and "mix.scale=1" in job for job in real_only)


def test_wandb_spec_of_the_ssl_sweep_matches_the_hydra_sweep():
    import yaml
    from hydra import compose, initialize_config_dir

    spec = yaml.safe_load((CONFIG_DIR / "wandb_sweeps" / "ssl_sources.yaml").read_text())
    fixed = dict(str(c).split("=", 1) for c in spec["command"] if "=" in str(c) and not str(c).startswith("$"))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["sweep=ssl_sources", f"experiment={fixed['experiment']}"],
                      return_hydra_config=True)
    assert {k: sorted(map(str, v["values"])) for k, v in spec["parameters"].items()} == {
        k: sorted(v.split(",")) for k, v in cfg.hydra.sweeper.params.items()}
    assert fixed["stage"] == cfg.stage == "ssl" and fixed["mix.synthetic"] == cfg.mix.synthetic
    assert fixed["logger.wandb.group"] == cfg.logger.wandb.group == "toy-ssl"
    assert spec["metric"]["name"] == "probe/pretrained/test/acc"  # what the stage logs to wandb


# ------------------------------------------------------------------------------------------------ report table
def _ssl_metrics(mode, scale, seed, acc, random_acc=0.2, steps=300):
    return {"data/mix/mode": mode, "data/mix/scale": scale, "seed": seed, "optimizer_steps": steps,
            "global_batch_size": 64, "probe/pretrained/test/acc": acc, "probe/pretrained/test/mean_class_acc": acc - 0.1,
            "probe/pretrained/test/macro_f1": acc - 0.2, "probe/random_init/test/acc": random_acc}


def test_ssl_report_table_rows_seeds_and_difference_to_real_only():
    from lightning_modules.report.ssl import ssl_markdown, ssl_metrics, ssl_run

    found = {"a": _ssl_metrics("concat", 5.0, 0, 0.50), "b": _ssl_metrics("real_only", 1.0, 0, 0.40),
             "c": _ssl_metrics("real_only", 1.0, 1, 0.44), "d": _ssl_metrics("synthetic_only", 1.0, 0, 0.30),
             "e": {"best_val_acc": 0.9}}  # a student: not an ssl run
    runs = [r for job, m in found.items() if (r := ssl_run(job, m)) is not None]
    assert len(runs) == 4
    lines = ssl_markdown(runs)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| pretrained")]
    assert [row.split(" | ")[0] for row in rows] == ["| real only", "| synthetic only ×1", "| real + synthetic ×5"]
    assert "0.4200 ± 0.0283 (n=2)" in rows[0] and rows[0].endswith("| – |")
    assert rows[1].endswith("| -12.00 |") and rows[2].endswith("| +8.00 |")
    assert "300 optimizer steps, global batch 64" in "\n".join(lines) and "Warning" not in "\n".join(lines)
    assert ssl_metrics(runs)["ssl/real only/probe_test_acc"] == pytest.approx(0.42)
    uneven = ssl_markdown([*runs, ssl_run("f", _ssl_metrics("concat", 1.0, 0, 0.5, steps=100))])
    assert any(line.startswith("**Warning:**") for line in uneven)
    assert any("No real-only" in line for line in ssl_markdown([runs[0]])) and ssl_markdown([]) == []


# ------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_ssl_stage_pretrains_on_real_and_synthetic_and_probes(tiny_cfg, tmp_path, single_thread):
    """concat at scale 0.5: 96 real + 48 synthetic faces; metrics.json holds both probes, which are what the saved
    backbone gives; the same config is skipped; a probe-only change probes again without training."""
    from synthetic_fixtures import write_toy_synthetic_set

    from lightning_modules.paradigms.ssl import SimCLR
    from lightning_modules.paradigms.ssl_probe import ProbeSettings, linear_probe
    from lightning_modules.stages.ssl_stage import build_ssl_datamodule, digests, probe_loaders, run_ssl_stage

    synthetic = tmp_path / "synthetic"
    write_toy_synthetic_set(synthetic, n=48, shards=1)
    args = [*FAST, "mix.mode=concat", "mix.scale=0.5", f"mix.synthetic={synthetic}"]
    cfg = tiny_cfg(*args)
    metrics = run_ssl_stage(cfg)
    out = tmp_path / "run" / "ssl"
    written = json.loads((out / "metrics.json").read_text())
    assert written["probe/pretrained/test/acc"] == metrics["probe"]["pretrained"]["test"]["acc"]
    from lightning_modules.report.ssl import ssl_run

    row = ssl_run("job", written)  # what the report table reads
    assert row.source == "real + synthetic ×0.5" and row.steps == 2 and row.random_init["acc"] == written[
        "probe/random_init/test/acc"]
    assert metrics["train_set_size"] == 144 and metrics["data"]["mix"]["synthetic_size"] == 48
    assert metrics["optimizer_steps"] == 2 and metrics["negatives_per_anchor"] == 2 * 32 - 2
    for which in ("pretrained", "random_init"):
        assert metrics["probe"][which]["train_size"] == 96 and set(metrics["probe"][which]["test"]) == {
            "acc", "mean_class_acc", "macro_f1"}

    # the reported probe is what the exported backbone gives
    model = SimCLR.load_from_checkpoint(out / "ssl.ckpt", map_location="cpu").eval()
    loaders = probe_loaders(build_ssl_datamodule(cfg))
    again = linear_probe(model.encode, loaders, 8, ProbeSettings(epochs=5), seed=0, device=torch.device("cpu"))
    assert again["test"] == pytest.approx(metrics["probe"]["pretrained"]["test"])
    assert again["val"] == pytest.approx(metrics["probe"]["pretrained"]["val"])
    initial = SimCLR(projection_hidden_dim=32, projection_dim=16)
    assert not torch.equal(initial.backbone.conv1.weight, model.backbone.conv1.weight)  # it did train

    # the pretrained backbone is what few-shot episodes read (fewshot.backbone.checkpoint=ssl: <run>/ssl/ssl.ckpt)
    from lightning_modules.stages.fewshot_stage import run_fewshot_stage

    shots = run_fewshot_stage(tiny_cfg("stage=fewshot", "fewshot.backbone.checkpoint=ssl", "fewshot.k_shots=[1]",
                                       "fewshot.n_query=2", "fewshot.num_episodes=2", "fewshot.n_way=4",
                                       "fewshot.linear_probe.steps=5"))
    assert shots["backbone"].endswith("ssl.ckpt") and "1shot/prototype/acc" in json.loads(
        (tmp_path / "run" / "fewshot" / "metrics.json").read_text())

    assert run_ssl_stage(tiny_cfg(*args)) == {"skipped": True}
    probe_only = tiny_cfg(*args, "ssl.probe.epochs=3")
    probed = run_ssl_stage(probe_only)
    assert probed["resumed_from"].endswith("last.ckpt") and probed["optimizer_steps"] == 2  # no step trained
    assert json.loads((out / "stage_done.json").read_text())["config_hash"] == digests(probe_only)[1]
    assert probed["probe"]["pretrained"]["test"] == pytest.approx(
        linear_probe(model.encode, loaders, 8, ProbeSettings(epochs=3), seed=0, device=torch.device("cpu"))["test"])


@pytest.mark.slow
def test_a_killed_ssl_run_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, single_thread):
    """96 faces, 32 per step: 3 steps an epoch, 5 planned, a checkpoint every 3 steps. Killed when epoch 1 starts
    (the checkpoint of step 3, the last batch of epoch 0), the rerun resumes there and ends with the weights of a
    run that was never stopped."""
    from conftest import KillAtEpoch, compose, with_trainer_callbacks

    from lightning_modules.stages.ssl_stage import run_ssl_stage

    args = [*FAST, "ssl.max_steps=5", "ssl.checkpoint_every_n_steps=3", "ssl.probe.baseline_random=false",
            "ssl.probe.epochs=1"]
    whole = run_ssl_stage(compose([*TINY, *args], tmp_path / "whole"))
    with_trainer_callbacks(monkeypatch, KillAtEpoch(1))
    killed = compose([*TINY, *args], tmp_path / "killed")
    with pytest.raises(RuntimeError, match="killed"):
        run_ssl_stage(killed)
    assert not (tmp_path / "killed" / "ssl" / "metrics.json").exists()
    with_trainer_callbacks(monkeypatch)
    resumed = run_ssl_stage(killed)
    assert resumed["resumed_from"].endswith("last.ckpt") and resumed["optimizer_steps"] == whole["optimizer_steps"] == 5
    weights = [torch.load(tmp_path / run / "ssl" / "ssl.ckpt", weights_only=False)["state_dict"]
               for run in ("whole", "killed")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert resumed["probe"] == whole["probe"]


@pytest.mark.slow
@pytest.mark.ddp
def test_ssl_stage_gathers_negatives_across_two_ddp_processes(tmp_path):
    """16 faces per rank and step on 2 ranks: every anchor is contrasted with the other rank's faces too, so it
    has 2 x 32 - 2 negatives (one process with the same batch size: 30)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", "trainer=ddp_cpu", *TINY, *FAST, "ssl.batch_size=16",
           f"output_root={tmp_path}", "experiment_name=ddp"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "ssl" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["optimizer_steps"] == 2
    assert metrics["global_batch_size"] == 32 and metrics["negatives_per_anchor"] == 62
    assert metrics["probe/pretrained/test/acc"] is not None and metrics["probe/random_init/test/acc"] is not None
    assert (tmp_path / "ddp" / "ssl" / "ssl.ckpt").is_file()

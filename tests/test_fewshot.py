"""Few-shot recognition: seeded episodes, prototype and linear-probe classifiers, the 95 % interval, config errors,
the sweep over backbones and a tiny `stage=fewshot` run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import CONFIG_DIR, TINY, compose
from lightning_modules.paradigms import fewshot as fs
from lightning_modules.run.runtime import ConfigError

# 5 classes of 30, 25, 20, 12 and 4 faces, shuffled
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(5), [30, 25, 20, 12, 4]))


def _key(episode: fs.Episode) -> tuple:
    return (episode.classes, tuple(episode.support.tolist()), tuple(episode.query.tolist()))


# ------------------------------------------------------------------------------------------------ episodes
def test_same_seed_same_episodes_other_seed_other_episodes():
    first = fs.episodes(LABELS, 3, 5, 4, num_episodes=20, seed=7)
    again = fs.episodes(LABELS, 3, 5, 4, num_episodes=20, seed=7)
    other = fs.episodes(LABELS, 3, 5, 4, num_episodes=20, seed=8)
    assert [_key(e) for e in first] == [_key(e) for e in again]
    assert sum(_key(a) != _key(b) for a, b in zip(first, other)) >= 18
    assert len({_key(e) for e in first}) == 20  # episodes of one seed differ from each other
    # episode e does not depend on how many are drawn
    assert [_key(e) for e in fs.episodes(LABELS, 3, 5, 4, num_episodes=5, seed=7)] == [_key(e) for e in first[:5]]


@pytest.mark.parametrize("n_way, k_shot, n_query", [(2, 1, 1), (3, 5, 4), (4, 1, 11), (3, 10, 10)])
def test_episode_supports_and_queries_are_disjoint_with_k_and_q_per_class(n_way, k_shot, n_query):
    for episode in fs.episodes(LABELS, n_way, k_shot, n_query, num_episodes=10, seed=1):
        assert len(set(episode.classes)) == n_way
        assert not set(episode.support) & set(episode.query)
        assert len(set(episode.support)) == n_way * k_shot and len(set(episode.query)) == n_way * n_query
        for local, c in enumerate(episode.classes):  # local labels follow `classes`, and name the true class
            assert (LABELS[episode.support[episode.support_labels == local]] == c).sum() == k_shot
            assert (LABELS[episode.query[episode.query_labels == local]] == c).sum() == n_query
            assert LABELS[episode.support[episode.support_labels == local]].tolist() == [c] * k_shot


def test_k_shots_of_one_episode_share_classes_and_queries_and_nest_supports():
    one, five = (fs.sample_episode(LABELS, 3, k, 4, fs.episode_rng(3, 9)) for k in (1, 5))
    assert one.classes == five.classes and one.query.tolist() == five.query.tolist()
    for local in range(3):
        assert set(one.support[one.support_labels == local]) <= set(five.support[five.support_labels == local])


def test_classes_with_too_few_faces_are_left_out_and_named():
    assert fs.short_classes(LABELS, 5, 10) == {3: 12, 4: 4}
    drawn = {c for e in fs.episodes(LABELS, 3, 5, 10, num_episodes=30, seed=0) for c in e.classes}
    assert drawn == {0, 1, 2}
    with pytest.raises(ValueError, match=r"4 classes with >= 15 faces; 3 of 5 have them.*class 3: 12, class 4: 4"):
        fs.sample_episode(LABELS, 4, 5, 10, fs.episode_rng(0, 0))


@pytest.mark.parametrize("args, message", [((1, 1, 1), "n_way must be an integer >= 2"),
                                           ((3, 0, 1), "k_shot must be an integer >= 1"),
                                           ((3, 1, 0), "n_query must be an integer >= 1")])
def test_bad_episode_arguments(args, message):
    with pytest.raises(ValueError, match=message):
        fs.sample_episode(LABELS, *args, rng=fs.episode_rng(0, 0))


# ------------------------------------------------------------------------------------------------ scores
def test_interval_is_1_96_sample_std_over_sqrt_episodes():
    out = fs.summarize([0.5, 1.0, 0.75, 0.25])
    std = math.sqrt(((0.5 - 0.625) ** 2 + 0.375 ** 2 + 0.125 ** 2 + 0.375 ** 2) / 3)
    assert out["acc"] == pytest.approx(0.625) and out["std"] == pytest.approx(std)
    assert out["ci95"] == pytest.approx(1.96 * std / 2) and out["episodes"] == 4
    with pytest.raises(ValueError, match=">= 2 episodes"):
        fs.summarize([1.0])


def _clusters(n_classes=5, per_class=20, dim=32, spread=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=gen)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=gen), labels.numpy()


@pytest.mark.parametrize("method, metric", [("prototype", "cosine"), ("prototype", "euclidean"),
                                            ("linear_probe", "cosine")])
def test_separable_features_are_classified_perfectly(method, metric):
    features, labels = _clusters()
    accs = [fs.episode_accuracy(features, e, method, metric=metric, seed=i)
            for i, e in enumerate(fs.episodes(labels, 5, 1, 10, num_episodes=10, seed=0))]
    assert accs == [1.0] * 10


@pytest.mark.parametrize("method", fs.METHODS)
def test_random_features_score_near_chance(method):
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(200, 32, generator=gen)
    labels = np.random.default_rng(1).integers(0, 5, 200)  # labels unrelated to the features
    eps = fs.episodes(labels, 5, 5, 10, num_episodes=200, seed=0)
    out = fs.summarize(fs.episode_accuracies(features, eps, method))
    assert abs(out["acc"] - 0.2) < 0.03 and out["ci95"] < 0.03


def test_probes_fitted_together_are_the_probes_fitted_alone():
    features, labels = _clusters(spread=3.0)  # overlapping: the fit depends on its init and steps
    eps = fs.episodes(labels, 5, 3, 10, num_episodes=6, seed=0)
    probe = {"steps": 20, "lr": 0.1, "weight_decay": 1e-2}
    together = fs.episode_accuracies(features, eps, "linear_probe", probe=probe, seeds=[5, 6, 7, 8, 9, 10])
    alone = [fs.episode_accuracy(features, e, "linear_probe", probe=probe, seed=s) for e, s in zip(eps, range(5, 11))]
    assert together == alone and len(set(together)) > 1  # not trivially all 1.0


def test_linear_probe_is_seeded():
    features, labels = _clusters(spread=3.0)
    episode = fs.sample_episode(labels, 5, 5, 10, fs.episode_rng(0, 0))
    x, y, q = (features[torch.as_tensor(episode.support)], torch.as_tensor(episode.support_labels),
               features[torch.as_tensor(episode.query)])
    assert torch.equal(*[fs.linear_probe_predict(x, y, q, 5, steps=3, seed=0) for _ in range(2)])
    init_only = [fs.linear_probe_predict(x, y, q, 5, steps=0, seed=s) for s in (0, 1)]  # the seed sets the init
    assert not torch.equal(*init_only)


def test_unknown_method_and_metric():
    features, labels = _clusters()
    episode = fs.sample_episode(labels, 2, 1, 1, fs.episode_rng(0, 0))
    with pytest.raises(ValueError, match="method must be one of"):
        fs.episode_accuracy(features, episode, "knn")
    with pytest.raises(ValueError, match="metric must be one of"):
        fs.episode_accuracy(features, episode, "prototype", metric="l1")


# ------------------------------------------------------------------------------------------------ features
class _Dict(nn.Module):
    def forward(self, x):
        return {"features": x.flatten(1)[:, :4], "logits": x.flatten(1)[:, :2]}


def test_features_once_per_split_from_any_module():
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.float32).view(5, 3, 2, 2)
    batches = [{"image": images[:3], "label": torch.tensor([0, 1, 2])},
               {"image": images[:0], "label": torch.tensor([], dtype=torch.long)},  # every face failed to load
               {"image": images[3:], "label": torch.tensor([1, 0])}]
    for backbone in (_Dict(), lambda x: x.flatten(1)[:, :4]):
        features, labels = fs.extract_features(backbone, batches)
        assert torch.equal(features, images.flatten(1)[:, :4]) and labels.tolist() == [0, 1, 2, 1, 0]
    with pytest.raises(ValueError, match=r"must return \(N, D\) features, got \(3, 3, 2, 2\)"):
        fs.extract_features(nn.Identity(), batches)
    with pytest.raises(ValueError, match="without 'features'"):
        fs.extract_features(lambda x: {"logits": x}, batches)


# ------------------------------------------------------------------------------------------------ the stage
def _save_classifier(path: Path, in_chans: int = 3, trained_size: int | None = None) -> Path:
    from lightning_modules.paradigms.teacher import FERTeacher

    torch.manual_seed(0)
    model = FERTeacher(backbone="resnet18", num_classes=7, num_aus=12, in_chans=in_chans, channels_last=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams),
                "pytorch-lightning_version": "2.6.0"}, path)
    if trained_size:
        (path.parent / "config.yaml").write_text(f"data:\n  image_size: {trained_size}\n")
    return path


class TinyEncoder(L.LightningModule):
    """What a self-supervised stage's checkpoint looks like to stage=fewshot: features, no classes."""

    def __init__(self, dim: int = 6):
        super().__init__()
        self.save_hyperparameters()
        self.proj = nn.Linear(3, dim)

    def forward_features(self, images):
        return self.proj(images.mean((2, 3)))


def _save_encoder(path: Path, marker: str = f"{__name__}.TinyEncoder") -> Path:
    from lightning_modules.paradigms.fewshot import FEATURE_MARKER

    model = TinyEncoder()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), FEATURE_MARKER: marker,
                "pytorch-lightning_version": "2.6.0"}, path)
    return path


FAST = ["stage=fewshot", "fewshot.k_shots=[1,3]", "fewshot.n_query=3", "fewshot.num_episodes=4",
        "data.toy.n_test=96", "data.toy.imbalance_power=0", "fewshot.linear_probe.steps=10"]


@pytest.mark.parametrize("override, key", [
    ("fewshot.k_shots=[0,5]", "fewshot.k_shots"), ("fewshot.k_shots=[]", "fewshot.k_shots"),
    ("fewshot.k_shots=[5,5]", "fewshot.k_shots"), ("fewshot.n_way=1", "fewshot.n_way"),
    ("fewshot.n_way=some", "fewshot.n_way"), ("fewshot.n_query=0", "fewshot.n_query"),
    ("fewshot.num_episodes=1", "fewshot.num_episodes"), ("fewshot.methods=[knn]", "fewshot.methods"),
    ("fewshot.prototype.metric=l1", "fewshot.prototype.metric"), ("fewshot.split=holdout", "fewshot.split"),
    ("fewshot.linear_probe.lr=0", "fewshot.linear_probe.lr"), ("fewshot.image_size=8", "fewshot.image_size"),
    ("fewshot.device=tpu", "fewshot.device"), ("fewshot.arch=resnet_nope", "fewshot.arch"),
    ("fewshot.backbone.checkpoint=student", "fewshot.backbone.checkpoint"),
    ("fewshot.backbone.checkpoint=/nowhere/x.ckpt", "fewshot.backbone.checkpoint"),
])
def test_config_errors_name_the_key_before_any_work(tiny_cfg, override, key):
    from lightning_modules.stages import fewshot_stage

    base = ["fewshot.backbone.checkpoint=random"] if "checkpoint=" not in override else []
    cfg = tiny_cfg(*FAST, *base, override)
    with pytest.raises(ConfigError) as err:
        fewshot_stage.check_config(cfg)
    assert err.value.key == key
    if override.endswith("=student"):  # a stage name resolves in the run folder, and says what to run
        assert "student/student.ckpt (run stage=student first" in str(err.value)


@pytest.mark.parametrize("make, override, key, message", [
    (None, "fewshot.n_way=9", "fewshot.n_way", "9 > the 8 classes"),
    (None, "fewshot.n_query=40", "fewshot.n_way", "need 8 classes with >= 41 faces in the test split"),
    ("garbage", None, "fewshot.backbone.checkpoint",
     "not a loadable FER classifier or feature module checkpoint: invalid load key"),
    ("one_channel", None, "fewshot.backbone.checkpoint", "takes 1-channel inputs"),
    ("unknown_encoder", None, "fewshot.backbone.checkpoint", "unknown feature module class 'nowhere.Encoder'"),
])
def test_stage_errors_that_need_the_data_or_weights(tiny_cfg, tmp_path, make, override, key, message):
    from lightning_modules.stages.fewshot_stage import run_fewshot_stage

    overrides = [*FAST, "fewshot.backbone.checkpoint=random"]
    if make == "garbage":
        (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
        overrides.append(f"fewshot.backbone.checkpoint={tmp_path / 'bad.ckpt'}")
    elif make == "one_channel":
        overrides.append(f"fewshot.backbone.checkpoint={_save_classifier(tmp_path / 'gray' / 'gray.ckpt', 1)}")
    elif make == "unknown_encoder":
        overrides.append(f"fewshot.backbone.checkpoint={_save_encoder(tmp_path / 'e.ckpt', 'nowhere.Encoder')}")
    with pytest.raises(ConfigError, match=message) as err:
        run_fewshot_stage(tiny_cfg(*overrides, *([override] if override else [])))
    assert err.value.key == key


def test_a_backbone_that_cannot_take_the_size_is_a_config_error():
    from lightning_modules.paradigms.classifier import FERClassifier
    from lightning_modules.stages.fewshot_stage import check_input_size

    vit = FERClassifier(backbone="vit_tiny_patch16_224", num_classes=7, channels_last=False).eval()
    with pytest.raises(ConfigError, match="cannot take 32x32 faces") as err:
        check_input_size(vit, 32, torch.device("cpu"))
    assert err.value.key == "fewshot.image_size"


def test_classes_short_of_faces_are_skipped_with_one_counted_warning():
    from lightning_modules.stages.fewshot_stage import class_pool

    names = ["a", "b", "c", "d", "e"]
    with pytest.warns(UserWarning, match=r"3 class draw\(s\) left out.*5-shot: d \(12 faces\), e \(4 faces\)") as rec:
        skipped = class_pool(LABELS, 3, [1, 5], 10, names, "test")
    assert len(rec) == 1 and skipped == {1: {"e": 4}, 5: {"d": 12, "e": 4}}


def test_sweep_over_backbone_sources_composes():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lightning_modules.stages.fewshot_stage import backbone_checkpoint

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=["sweep=fewshot_sources", "experiment=toy"],
                            return_hydra_config=True)
    assert cfg.stage == "fewshot" and cfg.logger.wandb.group == "toy-fewshot"
    assert cfg.hydra.sweeper.params["fewshot.backbone.checkpoint"].split(",") == ["student", "student_mix", "random"]
    assert cfg.fewshot.backbone.run_dir == "outputs/toy"  # a job looks up the experiment's students, not its own
    with pytest.raises(ConfigError, match="outputs/toy/student_mix/student_mix.ckpt"):
        cfg.fewshot.backbone.checkpoint = "student_mix"
        backbone_checkpoint(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["checkpoint", "random"])
def test_stage_writes_every_k_and_skips_when_done(tmp_path, untrained_teacher_ckpt, source, single_thread):
    import train

    backbone = untrained_teacher_ckpt if source == "checkpoint" else "random"
    cfg = compose([*TINY, *FAST, f"fewshot.backbone.checkpoint={backbone}"], tmp_path / "run")
    result = train.run_stage(cfg)
    out = tmp_path / "run" / "fewshot"
    metrics = json.loads((out / "metrics.json").read_text())
    for k in (1, 3):
        for method in fs.METHODS:
            assert metrics[f"{k}shot/{method}/acc"] == result[f"{k}shot"][method]["acc"]
            assert metrics[f"{k}shot/{method}/episodes"] == 4 and metrics[f"{k}shot/{method}/ci95"] >= 0
    assert metrics["n_way"] == 8 and metrics["faces"] == 96 and metrics["image_size"] == 32
    assert metrics["backbone"] == str(backbone)
    table = (out / "results.md").read_text()
    assert "| 1 |" in table and "| 3 |" in table and "8-way" in table
    assert train.run_stage(cfg) == {"skipped": True}


@pytest.mark.slow
def test_faces_reach_a_checkpoint_at_the_size_it_trained_at(tmp_path, single_thread):
    """A 7-class student trained at 40 px on 8-class 32 px data: features only, faces resized to 40 px."""
    import train

    _save_classifier(tmp_path / "run" / "student" / "student.ckpt", trained_size=40)
    cfg = compose([*TINY, *FAST, "fewshot.backbone.checkpoint=student", "fewshot.methods=[prototype]"],
                  tmp_path / "run")
    result = train.run_stage(cfg)
    assert result["image_size"] == 40 and result["trained_image_size"] == 40 and result["checkpoint_classes"] == 7
    assert result["backbone"] == str(tmp_path / "run" / "student" / "student.ckpt") and result["n_way"] == 8
    assert "linear_probe" not in result["1shot"]


@pytest.mark.slow
def test_a_feature_module_checkpoint_plugs_in(tmp_path, single_thread):
    """A checkpoint naming its feature module class (a self-supervised encoder) is scored on its features."""
    import train

    path = _save_encoder(tmp_path / "run" / "ssl" / "ssl.ckpt")
    cfg = compose([*TINY, *FAST, "fewshot.backbone.checkpoint=ssl"], tmp_path / "run")
    result = train.run_stage(cfg)
    assert result["feature_dim"] == 6 and result["arch"] == "TinyEncoder" and result["backbone"] == str(path)
    assert set(result) >= {"1shot", "3shot"}

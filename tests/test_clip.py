"""stage=clip: open_clip zero-shot of real faces with the configured prompts, before and after contrastive
fine-tuning on (face, caption) pairs; its config errors, data errors and report table."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIG_DIR, REPO, TINY
from datamodules.errors import DataError
from lightning_modules.run.runtime import ConfigError

FAST = ["stage=clip", "clip.max_steps=2", "clip.batch_size=16", "clip.checkpoint_every_n_steps=1"]


class SpyTokenizer:
    """open_clip's tokenizer, recording every text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, texts):
        self.texts += list(texts)
        return self.tokenizer(texts)


class TableTokenizer:
    """Text -> its row in a fixed table (a stand-in that makes embeddings known by hand)."""

    def __init__(self, texts):
        self.index = {t: i for i, t in enumerate(texts)}

    def __call__(self, texts):
        return torch.tensor([self.index[t] for t in texts])


class TableModel(torch.nn.Module):
    def __init__(self, text_rows, image_dim=2):
        super().__init__()
        self.rows = torch.tensor(text_rows, dtype=torch.float32)
        self.image_dim = image_dim

    def encode_text(self, tokens, normalize=False):
        out = self.rows[tokens]
        return F.normalize(out, dim=-1) if normalize else out

    def encode_image(self, images, normalize=False):  # the "image" is its feature vector
        return F.normalize(images, dim=-1) if normalize else images


# ------------------------------------------------------------------------------------------------- prompts
def test_zero_shot_embeds_exactly_the_configured_prompts_in_order(tiny_cfg):
    from lightning_modules.paradigms.clip import ClipSpec, clip_tokenizer, create_clip, zeroshot_weights
    from lightning_modules.stages.clip_stage import model_spec, prompts

    cfg = tiny_cfg(*FAST, "data.protocol=7", "clip.prompts.templates=['a {} face','{} - a photo']",
                   "clip.prompts.class_words.anger=furious", "+clip.prompts.class_words.sad=unhappy")
    templates, words = prompts(cfg)
    # the config's adjectives, overridden / extended on the command line; classes not listed use their name
    assert words == ["neutral", "happy", "unhappy", "surprised", "fearful", "disgusted", "furious"]
    model = create_clip(model_spec(cfg))
    spy = SpyTokenizer(clip_tokenizer(model_spec(cfg), model))
    weights = zeroshot_weights(model, spy, templates, words, torch.device("cpu"))
    assert spy.texts == ["a neutral face", "neutral - a photo", "a happy face", "happy - a photo", "a unhappy face",
                         "unhappy - a photo", "a surprised face", "surprised - a photo", "a fearful face",
                         "fearful - a photo", "a disgusted face", "disgusted - a photo", "a furious face",
                         "furious - a photo"]
    assert weights.shape == (64, 7)
    assert ClipSpec(config=model_spec(cfg).config) == model_spec(cfg)  # the tiny default: a config, no weights file


def test_class_embeddings_are_normalised_means_of_normalised_prompt_embeddings():
    from lightning_modules.paradigms.clip import prompt_texts, zeroshot_scores, zeroshot_weights

    templates, words = ["{} a", "{} b"], ["x", "y"]
    texts = prompt_texts(templates, words)
    assert texts == ["x a", "x b", "y a", "y b"]
    # class x: (3, 0) and (0, 1) -> unit (1, 0), (0, 1) -> mean (.5, .5) -> (1, 1)/sqrt 2 (the raw mean would lean
    # to the longer vector); class y: (0, 2), (-1, 5) -> about (-0.1, 0.995)
    model = TableModel([[3.0, 0.0], [0.0, 1.0], [0.0, 2.0], [-1.0, 5.0]])
    weights = zeroshot_weights(model, TableTokenizer(texts), templates, words, torch.device("cpu"))
    s = 1 / math.sqrt(2)
    y = F.normalize(torch.tensor([0.0, 1.0]) + F.normalize(torch.tensor([-1.0, 5.0]), dim=0), dim=0)
    assert torch.allclose(weights, torch.stack([torch.tensor([s, s]), y], dim=1), atol=1e-6)

    # images scored by argmax cosine: (1, 0.2) is nearer class x, (-0.3, 1) nearer y, (0, 1) nearer y
    batch = {"image": torch.tensor([[1.0, 0.2], [-0.3, 1.0], [0.0, 1.0], [5.0, 5.0]]),
             "label": torch.tensor([0, 1, 0, -1])}  # -1: unknown, not scored
    scores = zeroshot_scores(model, weights, [batch], 2, torch.device("cpu"))
    assert scores["faces"] == 3 and scores["acc"] == pytest.approx(2 / 3)
    assert scores["mean_class_acc"] == pytest.approx((1 / 2 + 1) / 2)


# ----------------------------------------------------------------------------------------------- bad config
@pytest.mark.parametrize("override, key", [
    ("clip.prompts.templates=[]", "clip.prompts.templates"),
    ("clip.prompts.templates=null", "clip.prompts.templates"),
    ("clip.prompts.templates=['a {} face','a photo of a face']", "clip.prompts.templates[1]"),
    ("clip.prompts.templates=['a {} face with {mood}']", "clip.prompts.templates[0]"),
    ("+clip.prompts.class_words.joy=glad", "clip.prompts.class_words.joy"),
    ("clip.model.pretrained=/no/such/weights.bin", "clip.model.pretrained"),
    ("clip.model.name=no_such_arch", "clip.model.name"),
    ("clip.train_on=everything", "clip.train_on"),
    ("clip.scale=0", "clip.scale"),
    ("clip.max_steps=0", "clip.max_steps"),
    ("clip.batch_size=1", "clip.batch_size"),
    ("clip.warmup_fraction=1", "clip.warmup_fraction"),
    ("clip.augment.crop_scale=[0.5,2]", "clip.augment.crop_scale"),
    ("clip.name=student", "clip.name"),
    ("clip.real_captions.family=poems", "clip.real_captions.family"),
])
def test_bad_clip_config_names_the_key(tiny_cfg, override, key):
    from lightning_modules.stages.clip_stage import check_clip_config

    extra = ["clip.train_on=real"] if "real_captions" in override else []
    with pytest.raises(ConfigError) as err:
        check_clip_config(tiny_cfg(*FAST, *extra, override))
    assert err.value.key == key


@pytest.mark.parametrize("pretrained", ["/no/such/open_clip.bin", "openai"])  # a tag would download: refused
def test_a_named_model_needs_an_existing_local_weights_file(tiny_cfg, pretrained):
    from lightning_modules.stages.clip_stage import check_clip_config

    with pytest.raises(ConfigError, match="never downloaded") as err:
        check_clip_config(tiny_cfg(*FAST, "clip.model.name=RN50", f"clip.model.pretrained={pretrained}"))
    assert err.value.key == "clip.model.pretrained"


def test_a_model_that_needs_a_download_or_another_loss_is_refused(tiny_cfg):
    from lightning_modules.stages.clip_stage import check_clip_config

    with pytest.raises(ConfigError, match="download") as err:
        check_clip_config(tiny_cfg(*FAST, "+clip.model.config.text_cfg.hf_model_name=bert-base-uncased"))
    assert err.value.key == "clip.model.config"
    with pytest.raises(ConfigError, match="SigLIP") as err:
        check_clip_config(tiny_cfg(*FAST, "clip.model.name=ViT-B-16-SigLIP"))
    assert err.value.key == "clip.model.name"


def test_a_checkpoint_of_another_architecture_or_no_checkpoint_at_all_names_the_key(tiny_cfg, tmp_path):
    from lightning_modules.paradigms.clip import create_clip
    from lightning_modules.stages.clip_stage import model_spec, start_weights

    other = tmp_path / "wider.pt"
    torch.save(create_clip(model_spec(tiny_cfg(*FAST, "clip.model.config.embed_dim=32"))).state_dict(), other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    for path in (other, garbage):
        spec = model_spec(tiny_cfg(*FAST, f"clip.model.pretrained={path}"))
        with pytest.raises(ConfigError, match=f"{path.name} is not an open_clip checkpoint") as err:
            start_weights(create_clip(spec), spec)
        assert err.value.key == "clip.model.pretrained"


def test_a_good_config_passes_and_the_prompts_are_not_part_of_the_resume_key(tiny_cfg):
    from lightning_modules.stages.clip_stage import check_clip_config, digests

    cfg = tiny_cfg(*FAST, "clip.synthetic=/nowhere")
    check_clip_config(cfg)
    resume, done = digests(cfg)
    resume2, done2 = digests(tiny_cfg(*FAST, "clip.synthetic=/nowhere", "clip.prompts.templates=['{}']"))
    assert resume == resume2 and done != done2
    assert digests(tiny_cfg(*FAST, "clip.synthetic=/nowhere", "clip.lr=1e-3"))[0] != resume
    assert digests(tiny_cfg(*FAST, "clip.synthetic=/nowhere", "mix.synthetic=/other"))[0] == resume  # not read
    assert digests(tiny_cfg(*FAST, "mix.synthetic=/a"))[0] != digests(tiny_cfg(*FAST, "mix.synthetic=/b"))[0]
    real = digests(tiny_cfg(*FAST, "clip.train_on=real"))[0]  # reads no synthetic set: its settings do not count
    assert digests(tiny_cfg(*FAST, "clip.train_on=real", "clip.scale=5", "clip.synthetic=/x"))[0] == real


# ------------------------------------------------------------------------------------------------- bad data
def _captionless_set(directory, captions):
    from synthetic_fixtures import toy_faces

    from datamodules.synthetic import to_pil, write_shard

    records = toy_faces(len(captions))
    images = torch.stack([torch.from_numpy(r.image.copy()).permute(2, 0, 1) for r in records]).float() / 255
    write_shard(directory, "shard-00000", {
        "image": to_pil(images), "sample_id": [f"s{i}" for i in range(len(records))],
        "target_label": [r.label for r in records], "target_aus": [r.aus.tolist() for r in records],
        "au_mask": [r.au_mask.tolist() for r in records], "caption": list(captions)})


def test_a_synthetic_set_without_captions_is_a_data_error_naming_it(tiny_cfg, tmp_path):
    from lightning_modules.paradigms.clip import image_transform
    from lightning_modules.stages.clip_stage import synthetic_pairs

    empty = tmp_path / "no_captions"
    _captionless_set(empty, ["", " ", ""])
    tf = image_transform(32, [0.5] * 3, [0.5] * 3)
    with pytest.raises(DataError, match="no_captions.*caption"):
        synthetic_pairs(tiny_cfg(*FAST, f"clip.synthetic={empty}"), 96, tf, 8)
    with pytest.raises(DataError, match="manifest"):
        synthetic_pairs(tiny_cfg(*FAST, f"clip.synthetic={tmp_path / 'missing'}"), 96, tf, 8)

    some = tmp_path / "some_captions"
    _captionless_set(some, ["a face", "", "another face", "a third face"])
    with pytest.warns(UserWarning, match="1 kept synthetic face"):
        pairs = synthetic_pairs(tiny_cfg(*FAST, f"clip.synthetic={some}"), 96, tf, 8)
    assert [pairs[i]["caption"] for i in range(len(pairs))] == ["a face", "another face", "a third face"]
    with pytest.raises(DataError, match="clip.scale=0.05 needs 5"):  # round(0.05 x 96) = 5 > 3 captioned faces
        with pytest.warns(UserWarning):
            synthetic_pairs(tiny_cfg(*FAST, f"clip.synthetic={some}", "clip.scale=0.05"), 96, tf, 8)


# ------------------------------------------------------------------------------------------------ the report
def _clip_metrics(train_on, scale, seed, before, after, steps=200):
    return {"zeroshot/before/test/acc": before, "zeroshot/after/test/acc": after,
            "zeroshot/after/test/mean_class_acc": after - 0.05, "zeroshot/after/test/macro_f1": after - 0.1,
            "train_on": train_on, "scale": scale, "seed": seed, "optimizer_steps": steps, "model": "config"}


def test_clip_report_rows_before_after_and_the_gain():
    from lightning_modules.report.clip import clip_markdown, clip_metrics, clip_run
    from lightning_modules.stages.report import paradigm_tables
    from lightning_modules.report.plots import JobResult

    assert clip_run("x", {"probe/pretrained/test/acc": 0.5}) is None  # another stage's metrics
    runs = [clip_run(f"j{i}", m) for i, m in enumerate([
        _clip_metrics("both", 1.0, 0, 0.10, 0.40), _clip_metrics("synthetic", 1.0, 0, 0.12, 0.30),
        _clip_metrics("synthetic", 1.0, 1, 0.14, 0.34), _clip_metrics("real", None, 0, 0.12, 0.50)])]
    lines = clip_markdown(runs)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| fine-tuned")]
    assert rows == [
        "| synthetic captions ×1 | 0.1300 ± 0.0141 (n=2) | 0.3200 ± 0.0283 (n=2) | +19.00 | 0.2700 ± 0.0283 "
        "| 0.2200 ± 0.0283 |",
        "| real, captioned from labels | 0.1200 (n=1) | 0.5000 (n=1) | +38.00 | 0.4500 | 0.4000 |",
        "| real + synthetic ×1 | 0.1000 (n=1) | 0.4000 (n=1) | +30.00 | 0.3500 | 0.3000 |"]
    assert clip_metrics(runs)["clip/synthetic captions ×1/zeroshot_test_acc_after"] == pytest.approx(0.32)
    assert clip_markdown([]) == []
    assert not any("Warning" in line for line in lines)
    assert any("Warning" in line for line in clip_markdown([*runs, clip_run("k", _clip_metrics("both", 5, 0, .1, .2,
                                                                                             steps=7))]))
    job = JobResult("run", {"clip": _clip_metrics("synthetic", 1.0, 0, 0.1, 0.2)}, {}, [])
    sections, flat = paradigm_tables([job])
    assert "## Zero-shot (open_clip, prompt templates, real test faces)" in sections
    assert flat == {"clip/synthetic captions ×1/zeroshot_test_acc_before": 0.1,
                    "clip/synthetic captions ×1/zeroshot_test_acc_after": 0.2}


# ------------------------------------------------------------------------------------------------------ sweep
def test_clip_sources_sweep_composes():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["sweep=clip_sources", "experiment=toy", "clip.seed=2"],
                      return_hydra_config=True)
    assert cfg.stage == "clip" and cfg.clip.synthetic == "outputs/toy/relabel/dataset" and cfg.clip.seed == 2
    assert dict(cfg.hydra.sweeper.params) == {"clip.train_on": "synthetic,both", "clip.scale": "1,5",
                                              "clip.seed": "0,1,2"}


# ------------------------------------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_clip_stage_scores_before_and_after_fine_tuning(tiny_cfg, tmp_path, single_thread):
    """Synthetic pairs (48 toy faces with their captions) + real train faces captioned from labels: metrics.json
    holds the zero-shot scores of the model as built and of the exported fine-tuned weights; the same config is
    skipped; new prompts score again without training."""
    from synthetic_fixtures import write_toy_synthetic_set

    from lightning_modules.paradigms.clip import ClipFineTune, preprocess
    from lightning_modules.stages.clip_stage import (build_data, digests, eval_loaders, prompts, run_clip_stage,
                                                     zeroshot)

    synthetic = tmp_path / "synthetic"
    write_toy_synthetic_set(synthetic, n=48, shards=1)
    args = [*FAST, f"clip.synthetic={synthetic}", "clip.train_on=both", "clip.scale=0.25"]
    cfg = tiny_cfg(*args)
    metrics = run_clip_stage(cfg)
    out = tmp_path / "run" / "clip"
    written = json.loads((out / "metrics.json").read_text())
    assert metrics["synthetic_pairs"] == 24 and metrics["real_pairs"] == 96 and metrics["optimizer_steps"] == 2
    assert metrics["global_batch_size"] == 16 and metrics["train_on"] == "both"
    for which in ("before", "after"):
        for split in ("val", "test"):
            assert written[f"zeroshot/{which}/{split}/faces"] == {"val": 32, "test": 48}[split]
            assert {"acc", "mean_class_acc", "macro_f1"} <= set(metrics["zeroshot"][which][split])
    assert written["prompts/templates"] == list(cfg.clip.prompts.templates)

    # "before" is the model as the stage builds it (seeded), "after" the exported weights
    templates, words = prompts(cfg)
    torch.manual_seed(0)
    fresh = ClipFineTune(config=metrics_config(cfg))
    tuned = ClipFineTune.load_from_checkpoint(out / "clip.ckpt", map_location="cpu")
    real, _, eval_tf = build_data(cfg, *preprocess(tuned.model))
    loaders = eval_loaders(real, eval_tf)
    cpu = torch.device("cpu")
    assert zeroshot(fresh.model, fresh.tokenizer, templates, words, loaders, 8, cpu, "before")["test"] == \
        pytest.approx(metrics["zeroshot"]["before"]["test"])
    assert zeroshot(tuned.model, tuned.tokenizer, templates, words, loaders, 8, cpu, "after")["test"] == \
        pytest.approx(metrics["zeroshot"]["after"]["test"])
    assert not torch.equal(fresh.model.token_embedding.weight, tuned.model.token_embedding.weight)  # it trained

    from lightning_modules.report.clip import clip_run

    row = clip_run("job", written)
    assert row.source == "real + synthetic ×0.25" and row.delta == pytest.approx(
        written["zeroshot/after/test/acc"] - written["zeroshot/before/test/acc"])

    assert run_clip_stage(tiny_cfg(*args)) == {"skipped": True}
    reprompted = tiny_cfg(*args, "clip.prompts.templates=['a {} face']")
    again = run_clip_stage(reprompted)
    assert again["resumed_from"].endswith("last.ckpt") and again["optimizer_steps"] == 2  # no step trained
    assert json.loads((out / "stage_done.json").read_text())["config_hash"] == digests(reprompted)[1]


def metrics_config(cfg):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg.clip.model.config, resolve=True)


def test_a_missing_synthetic_set_is_a_data_error_naming_it(tiny_cfg):
    """A DataError: train.py turns it into one line and exit 2 (tests/test_cli_errors.py)."""
    import train

    with pytest.raises(DataError, match="/no/such/set"):
        train.run_stage(tiny_cfg(*FAST, "clip.synthetic=/no/such/set"))


@pytest.mark.slow
@pytest.mark.ddp
def test_clip_stage_gathers_pairs_across_two_ddp_processes(tmp_path):
    """8 pairs per rank and step on 2 ranks: the loss sees the global batch of 16 (every face against both ranks'
    captions); rank 0 scores zero-shot before and after while the other rank trains alongside."""
    from synthetic_fixtures import write_toy_synthetic_set

    synthetic = tmp_path / "synthetic"
    write_toy_synthetic_set(synthetic, n=32, shards=1)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", "trainer=ddp_cpu", *TINY, *FAST, "clip.batch_size=8",
           f"clip.synthetic={synthetic}", f"output_root={tmp_path}", "experiment_name=ddp"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "clip" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["optimizer_steps"] == 2 and metrics["global_batch_size"] == 16
    assert metrics["zeroshot/before/test/faces"] == 48 and metrics["zeroshot/after/test/faces"] == 48
    assert (tmp_path / "ddp" / "clip" / "clip.ckpt").is_file()


@pytest.mark.slow
def test_a_killed_clip_run_resumes_to_the_uninterrupted_weights(tmp_path, monkeypatch, single_thread):
    """96 real captioned faces, 32 per step: 3 steps an epoch, 5 planned, a checkpoint every 3 steps. Killed when
    epoch 1 starts, the rerun resumes from step 3 and ends with the weights and scores of a run never stopped."""
    from conftest import KillAtEpoch, compose, with_trainer_callbacks

    from lightning_modules.stages.clip_stage import run_clip_stage

    args = [*TINY, *FAST, "clip.train_on=real", "clip.batch_size=32", "clip.max_steps=5",
            "clip.checkpoint_every_n_steps=3"]
    whole = run_clip_stage(compose(args, tmp_path / "whole"))
    with_trainer_callbacks(monkeypatch, KillAtEpoch(1))
    killed = compose(args, tmp_path / "killed")
    with pytest.raises(RuntimeError, match="killed"):
        run_clip_stage(killed)
    assert not (tmp_path / "killed" / "clip" / "metrics.json").exists()
    with_trainer_callbacks(monkeypatch)
    resumed = run_clip_stage(killed)
    assert resumed["resumed_from"].endswith("last.ckpt") and resumed["optimizer_steps"] == whole["optimizer_steps"] == 5
    weights = [torch.load(tmp_path / run / "clip" / "clip.ckpt", weights_only=False)["state_dict"]
               for run in ("whole", "killed")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert resumed["zeroshot"] == whole["zeroshot"] and whole["real_pairs"] == 96 and whole["synthetic_pairs"] == 0


@pytest.mark.slow
def test_a_local_checkpoint_is_the_model_scored_before_fine_tuning(tiny_cfg, tmp_path, single_thread):
    """clip.model.pretrained: the "before" scores are those of the file's weights (not the seeded random init);
    the exported fine-tuned model loads without that file."""
    from lightning_modules.paradigms.clip import ClipFineTune, create_clip, preprocess
    from lightning_modules.stages.clip_stage import (build_data, eval_loaders, model_spec, prompts, run_clip_stage,
                                                     zeroshot)

    base = tiny_cfg(*FAST)
    torch.manual_seed(7)
    start = create_clip(model_spec(base))
    weights = tmp_path / "start.pt"
    torch.save({"state_dict": start.state_dict()}, weights)
    cfg = tiny_cfg(*FAST, "clip.train_on=real", "clip.max_steps=1", f"clip.model.pretrained={weights}")
    metrics = run_clip_stage(cfg)
    templates, words = prompts(cfg)
    real, _, eval_tf = build_data(cfg, *preprocess(start))
    loaders, cpu = eval_loaders(real, eval_tf), torch.device("cpu")
    expected = zeroshot(start, ClipFineTune(config=metrics_config(cfg)).tokenizer, templates, words, loaders, 8, cpu,
                        "before")
    assert metrics["zeroshot"]["before"] == expected and metrics["pretrained"] == str(weights)
    torch.manual_seed(0)  # what the stage would have started from without the file
    seeded = ClipFineTune(config=metrics_config(cfg))
    assert not torch.equal(seeded.model.token_embedding.weight, start.token_embedding.weight)
    weights.unlink()
    tuned = ClipFineTune.load_from_checkpoint(tmp_path / "run" / "clip" / "clip.ckpt", map_location="cpu")
    assert zeroshot(tuned.model, tuned.tokenizer, templates, words, loaders, 8, cpu, "after") == \
        metrics["zeroshot"]["after"]

"""The one caption builder: its captions, its config errors, the generator saving it, evaluation/grid conditions
using it, and, per public format exported without sidecars, synthesis captions that training gives the same
class."""
from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch

from datamodules.batch import FERRecord
from datamodules.caption_builder import (EXPRESSION_WORDS, SETTINGS_FILE, CaptionBuilder, load_settings,
                                         save_settings)
from datamodules.labels import ANGER, CONTEMPT, DISFA_AUS, HAPPY, NEUTRAL, UNKNOWN_LABEL
from datamodules.toyfaces import ToyFacesConfig, hair_phrase, sample_toyface
from datamodules.toyfaces_export import export_toyfaces

AU = {au: i for i, au in enumerate(DISFA_AUS)}


def _aus(**named: float) -> list[float]:
    """AU vector in DISFA order from e.g. AU6=3.0."""
    values = [0.0] * len(DISFA_AUS)
    for name, v in named.items():
        values[AU[int(name[2:])]] = v
    return values


SMILE = _aus(AU6=3.0, AU12=4.0, AU25=0.5)  # cheeks raised, smiling; lips parted below the threshold


# ---------------------------------------------------------------------------------------------- the builder
@pytest.mark.parametrize("label", range(8))
def test_expression_family_names_the_expression(label):
    caption = CaptionBuilder().caption(label)
    article = "an" if label == ANGER else "a"
    assert caption == f"a close-up photo of {article} {EXPRESSION_WORDS[label]} face"


@pytest.mark.parametrize("label, aus, mask, expected", [
    (HAPPY, SMILE, None, "a close-up photo of a happy face, smiling, cheeks raised"),
    # an unknown label gives no expression word, the AU cues stay
    (UNKNOWN_LABEL, SMILE, None, "a close-up photo of a face, smiling, cheeks raised"),
    (UNKNOWN_LABEL, None, None, "a close-up photo of a face"),
    # unknown AUs (mask False) are never named, however strong their stored value
    (HAPPY, SMILE, [i != AU[12] for i in range(12)], "a close-up photo of a happy face, cheeks raised"),
    (HAPPY, SMILE, [False] * 12, "a close-up photo of a happy face"),
    (CONTEMPT, _aus(AU12=3.0), None, "a close-up photo of a contemptuous face, smirking with one mouth corner raised"),
    (NEUTRAL, _aus(AU1=2.0, AU2=2.5, AU4=1.5, AU5=4.0, AU26=3.0), None,
     "a close-up photo of a neutral face, eyes wide open, jaw dropped, eyebrows raised"),  # max_cues=3
])
def test_expression_captions(label, aus, mask, expected):
    assert CaptionBuilder().caption(label, aus, mask) == expected


def test_name_aus_off_names_no_au_and_settings_change_the_cues():
    assert CaptionBuilder(name_aus=False).caption(HAPPY, SMILE) == "a close-up photo of a happy face"
    assert CaptionBuilder(cue_threshold=3.5, no_cues="calm").caption(HAPPY, SMILE) == \
        "a close-up photo of a happy face, smiling"
    assert CaptionBuilder(no_cues="no visible action").caption(NEUTRAL, [0.0] * 12) == \
        "a close-up photo of a neutral face, no visible action"
    assert CaptionBuilder(max_cues=0).caption(HAPPY, SMILE) == "a close-up photo of a happy face"
    vocab = CaptionBuilder(aus=(12, 6))  # any vocabulary order
    assert vocab.caption(HAPPY, [4.0, 3.0]) == "a close-up photo of a happy face, smiling, cheeks raised"


def test_toy_family_imitates_the_toy_renderers_captions():
    """The toy family (no expression word, as the toy captions have none) reproduces a toy face's own caption
    from its hair, skin, label and AUs."""
    config = ToyFacesConfig(image_size=16, seed=4, glasses_prob=0.0)
    for i in range(24):
        face = sample_toyface(config, "train", i)
        a = face.attributes
        builder = CaptionBuilder(family="toy", attributes={"hair": [hair_phrase(a["hair_colour"], a["hair_style"])],
                                                           "skin": [a["skin_tone"]]})
        assert builder.caption(face.true_label, face.aus) == face.caption


def test_draws_are_seeded_and_need_an_rng():
    builder = CaptionBuilder(templates=["a {expression} face, {cues}", "{light} photo of a {expression} person"],
                             attributes={"light": ["a dim", "a bright"]})
    draw = lambda seed: [builder.caption(HAPPY, SMILE, rng=rng)  # noqa: E731
                         for rng in [np.random.default_rng(seed)] for _ in range(20)]
    # the first template uses no {light}: three captions in all
    assert draw(1) == draw(1) and set(draw(1)) == {"a happy face, smiling, cheeks raised",
                                                   "a dim photo of a happy person", "a bright photo of a happy person"}
    rng = np.random.default_rng(0)
    assert {builder.caption(ANGER, rng=rng) for _ in range(20)} == {
        "an angry face", "a dim photo of an angry person", "a bright photo of an angry person"}
    with pytest.raises(ValueError, match="needs an rng"):
        builder.caption(HAPPY)


@pytest.mark.parametrize("config, match", [
    ({"templates": ["a {mood} face"]}, r"generator.model.captions.templates\[0\] has unknown placeholder \{mood\}"),
    ({"templates": ["a {} face"]}, r"generator.model.captions.templates\[0\] may only use named placeholders"),
    ({"templates": ["a {expression face"]}, r"generator.model.captions.templates\[0\] is not a valid format"),
    ({"templates": []}, r"generator.model.captions.templates must be a non-empty list"),
    ({"family": "toy", "templates": ["{hair}, {eyes}"]}, r"templates\[0\] has unknown placeholder \{eyes\}"),
    ({"attributes": {"hair": "bald"}}, r"generator.model.captions.attributes\['hair'\] must be a non-empty list"),
    ({"attributes": {"cues": ["x"]}}, r"generator.model.captions.attributes must be keyed by identifiers"),
    ({"family": "cartoon"}, r"generator.model.captions.family must be one of"),
    ({"family": "auto"}, r"family=auto needs the data format"),
    ({"cue_threshold": 0}, r"generator.model.captions.cue_threshold must be in \(0, 5.0\]"),
    ({"max_cues": -1}, r"generator.model.captions.max_cues must be an int >= 0"),
    ({"template": ["a face"]}, r"generator.model.captions has unknown setting\(s\) \['template'\]"),
])
def test_bad_settings_name_the_config_key(config, match):
    with pytest.raises(ValueError, match=match):
        CaptionBuilder.from_config(config, DISFA_AUS, "generator.model.captions")


@pytest.mark.parametrize("family, data_format, resolved", [
    ("auto", "toy", "toy"), ("auto", "ferplus", "expression"), ("auto", "imagefolder", "expression"),
    ("expression", "toy", "expression"), ("toy", "rafdb", "toy"), (None, None, "expression"),
])
def test_family_auto_follows_the_data_format(family, data_format, resolved):
    builder = CaptionBuilder.from_config({"family": family, "data_format": data_format}, DISFA_AUS, "c")
    assert builder.family == resolved


def test_wrong_au_count_is_an_error():
    with pytest.raises(ValueError, match="got 2 AU values / 2 mask entries for the 12 AUs"):
        CaptionBuilder().caption(HAPPY, [1.0, 2.0])


# ---------------------------------------------------------------------------------------------- saved settings
def test_settings_round_trip_and_a_generator_without_aus(tmp_path):
    builder = CaptionBuilder(family="toy", cue_threshold=2.0, max_cues=1)
    save_settings(tmp_path, builder, trained_on_aus=True)
    loaded = load_settings(tmp_path, DISFA_AUS, "synthesis.generator_path")
    assert loaded == builder and loaded.name_aus
    save_settings(tmp_path, builder, trained_on_aus=False)  # its captions never named an AU: synthesis names none
    assert not load_settings(tmp_path, DISFA_AUS, "k").name_aus


@pytest.mark.parametrize("content, match", [
    (None, r"synthesis.generator_path: .*captions.json is missing.*\{\"family\": \"toy\"\}"),
    ("{nope", r"synthesis.generator_path: .*captions.json is not valid JSON"),
    ("[1]", r"captions.json must hold a JSON object"),
    (json.dumps({"templates": ["a {mood}"]}), r"synthesis.generator_path: .*captions.json: .*unknown placeholder"),
])
def test_bad_saved_settings_name_the_folder(tmp_path, content, match):
    if content is not None:
        (tmp_path / SETTINGS_FILE).write_text(content)
    with pytest.raises((FileNotFoundError, ValueError), match=match):
        load_settings(tmp_path, DISFA_AUS, "synthesis.generator_path")


# ---------------------------------------------------------------------------------------------- the generator
SMALL_GEN = dict(unet=dict(block_out_channels=[8, 16], layers_per_block=1, attention_head_dim=4, norm_num_groups=4,
                           down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                           up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"]),
                 text_encoder=dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_length=16),
                 image_size=16, aus=[6, 12, 4], ema_decay=None, sample=dict(steps=2), num_classes=8)


def test_generator_captions_faces_without_one_and_saves_its_builder(tmp_path):
    from lightning_modules.generator.module import FERGenerator

    torch.manual_seed(0)
    gen = FERGenerator(captions={"family": "auto", "data_format": "ferplus", "max_cues": 1}, **SMALL_GEN)
    batch = {"image": torch.zeros(3, 3, 16, 16), "label": torch.tensor([HAPPY, ANGER, UNKNOWN_LABEL]),
             "aus": torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]),
             "au_mask": torch.tensor([[True] * 3, [True] * 3, [False] * 3]), "caption": ["", "my own caption", ""]}
    assert gen.on_before_batch_transfer(dict(batch), 0)["caption"] == gen.captions_for(batch) == [
        "a close-up photo of a happy face, smiling", "my own caption", "a close-up photo of a face"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        gen.training_step(batch, 0)
    gen.save_generator(tmp_path / "pipe")
    saved = json.loads((tmp_path / "pipe" / SETTINGS_FILE).read_text())
    assert saved["family"] == "expression" and saved["max_cues"] == 1 and saved["trained_on_aus"] is True
    assert load_settings(tmp_path / "pipe", [6, 12, 4], "k") == gen.captioner


def test_generator_stage_names_a_bad_captions_block(tiny_cfg):
    from lightning_modules.run.runtime import ConfigError
    from lightning_modules.stages.generator_stage import build_generator, build_generator_datamodule

    cfg = tiny_cfg("generator.model.captions.templates=['a {mood} face']")
    with pytest.raises(ConfigError, match=r"generator.model.captions.templates\[0\] has unknown placeholder"):
        build_generator(cfg, build_generator_datamodule(cfg))


def test_caption_templates_change_the_generator_config_hash(tiny_cfg):
    from lightning_modules.run import runtime
    from lightning_modules.stages.generator_stage import HASH_KEYS, resume_hash

    plain, other = tiny_cfg(), tiny_cfg("generator.model.captions.templates=['a {expression} person, {cues}']")
    assert runtime.config_hash(plain, HASH_KEYS) != runtime.config_hash(other, HASH_KEYS)
    assert resume_hash(plain) != resume_hash(other)  # a run with other captions does not resume this one


# ---------------------------------------------------------------------------------------------- eval and grids
def _face(i, label, caption="", aus=None):
    return FERRecord(sample_id=f"f{i}", image=np.full((8, 8, 3), 20 * i % 250, np.uint8), label=label,
                     aus=None if aus is None else np.asarray(aus, np.float32),
                     au_mask=None if aus is None else np.ones(len(aus), bool), caption=caption)


def test_eval_and_grid_conditions_caption_captionless_faces_with_the_builder():
    from lightning_modules.generator.callbacks import grid_conditions
    from lightning_modules.generator.evaluation import records_eval_conditions

    builder = CaptionBuilder(aus=(6, 12, 4))
    records = [_face(0, NEUTRAL), _face(1, HAPPY, aus=[3.0, 4.0, 0.0]), _face(2, ANGER, caption="my own caption")]
    expected = ["a close-up photo of a neutral face", "a close-up photo of a happy face, smiling, cheeks raised",
                "my own caption"]
    grid = grid_conditions(records, num_classes=8, num_aus=3, captioner=builder)
    assert grid.captions == expected and grid.sweep_caption == expected[1]  # the sweep starts from the AU face
    conds = records_eval_conditions(records, per_class=1, num_classes=8, seed=0, num_aus=3, captioner=builder)
    # with AU-labelled faces only those are drawn (the AU metrics need them)
    assert conds.captions == [expected[1]]
    no_aus = [_face(0, NEUTRAL), _face(2, ANGER, caption="my own caption")]
    conds = records_eval_conditions(no_aus, per_class=1, num_classes=8, seed=0, num_aus=3, captioner=builder)
    assert conds.captions == [expected[0], expected[2]]
    with pytest.raises(ValueError, match="record 'f0' has no caption and no caption builder was given"):
        grid_conditions(records, num_classes=8, num_aus=3)


# ---------------------------------------------------------------------------------------------- per format
FORMATS = ["fer2013", "ferplus", "rafdb", "affectnet", "imagefolder"]


@pytest.fixture(scope="module")
def bare_export(tmp_path_factory):
    """Toy faces in every public format as downloaded: no OpenFace csv, no captions jsonl; all 7 classes."""
    config = ToyFacesConfig(image_size=32, seed=5, num_classes=7, imbalance_power=0.0, label_noise=0.0)
    return export_toyfaces(config, {"train": 70, "val": 7, "test": 7}, tmp_path_factory.mktemp("bare"),
                           formats=FORMATS, sidecars="none")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_synthesis_captions_are_ones_training_gives_the_class(bare_export, tiny_cfg, tmp_path, fmt, single_thread):
    """A generator trained on the export (its captions from the training batches, as Lightning hands them over),
    saved; the synthesis plan read from its folder: every caption planned for class c is one training produced
    for class c, with the expression word, and names no AU (the faces had none)."""
    from lightning_modules.stages.generator_stage import build_generator, build_generator_datamodule
    from lightning_modules.stages.synthesize_stage import checked_plan

    data = [f"data={fmt}", f"data.root={bare_export[fmt]}", "data.protocol=7", "data.image_size=32",
            "data.num_workers=0", "generator.batch_size=35"]
    cfg = tiny_cfg(*data)
    datamodule = build_generator_datamodule(cfg)
    gen = build_generator(cfg, datamodule)
    datamodule.setup("fit")
    trained: dict[int, set[str]] = {}
    for batch in datamodule.train_dataloader():
        batch = gen.on_before_batch_transfer(batch, 0)
        for label, caption in zip(batch["label"].tolist(), batch["caption"]):
            trained.setdefault(label, set()).add(caption)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a Trainer
            gen.training_step(batch, 0)
    assert sorted(trained) == list(range(7))
    gen.save_generator(tmp_path / "pipeline")

    plan, size, _ = checked_plan(tiny_cfg(*data, f"synthesis.generator_path={tmp_path / 'pipeline'}",
                                          "synthesis.plan.size=56", "synthesis.plan.scale=null"))
    rows = plan.rows(range(size))
    assert sorted(set(rows["target_label"])) == list(range(7)) and all(any(m) for m in rows["au_mask"])
    for label, caption in zip(rows["target_label"], rows["caption"]):
        assert caption in trained[label], (label, caption, trained[label])
        assert re.fullmatch(rf"a close-up photo of an? {EXPRESSION_WORDS[label]} face", caption)


def test_synthesis_fingerprint_follows_the_caption_templates(tiny_cfg, tmp_path):
    from lightning_modules.generator.module import FERGenerator
    from lightning_modules.run.runtime import ConfigError
    from lightning_modules.stages.synthesize_stage import checked_plan

    pipe = tmp_path / "pipeline"
    FERGenerator(**{**SMALL_GEN, "aus": list(DISFA_AUS)}).save_generator(pipe)
    base = [f"synthesis.generator_path={pipe}", "synthesis.plan.size=16", "synthesis.plan.scale=null"]
    _, _, plain = checked_plan(tiny_cfg(*base))
    plan, _, overridden = checked_plan(tiny_cfg(*base, "synthesis.plan.templates=['a photo of a {expression} face']"))
    assert overridden != plain and plan.rows([1])["caption"] == ["a photo of a happy face"]
    save_settings(pipe, CaptionBuilder(templates=["an image of a {expression} face, {cues}"]), None)
    plan, _, rewritten = checked_plan(tiny_cfg(*base))
    assert rewritten not in (plain, overridden) and plan.rows([1])["caption"][0].startswith("an image of a happy")
    with pytest.raises(ConfigError, match=r"synthesis.plan.*plan.templates\[0\] has unknown placeholder \{hair\}"):
        checked_plan(tiny_cfg(*base, "synthesis.plan.templates=['a person with {hair}']"))
    (pipe / SETTINGS_FILE).unlink()
    with pytest.raises(ConfigError, match="synthesis.generator_path.*captions.json is missing"):
        checked_plan(tiny_cfg(*base))

"""Generator evaluation metrics, evaluation/grid conditions and component-builder errors (captions of faces
without one: tests/test_caption_builder.py)."""
import numpy as np
import pytest
import torch

from datamodules.batch import FERRecord
from lightning_modules.generator.callbacks import GeneratorSampleGrids, grid_conditions
from lightning_modules.generator.components import build_tiny, load_pretrained
from lightning_modules.generator.evaluation import (EvalConditions, TeacherFeatures, distribution_metrics,
                                                    fidelity_metrics, records_eval_conditions, teacher_scores)

AUS = [1, 2, 4]


def _conds(labels, aus, mask=None):
    aus = torch.tensor(aus, dtype=torch.float32)
    return EvalConditions(labels=torch.tensor(labels), aus=aus,
                          au_mask=torch.ones_like(aus, dtype=torch.bool) if mask is None else torch.tensor(mask),
                          captions=[""] * len(labels), seeds=list(range(len(labels))))


def test_fidelity_metrics_accuracy_and_pearson():
    conds = _conds([0, 1, 1, 2], [[0, 5, 1], [1, 5, 2], [2, 5, 3], [3, 5, 4]])
    probs = torch.eye(3)[[0, 1, 2, 2]]  # one mistake (a class-1 face read as 2)
    pred = torch.tensor([[0.0, 1, 4], [1, 2, 3], [2, 3, 2], [3, 4, 1]])  # AU1 perfect, AU4 inverted
    m = fidelity_metrics(probs, pred, conds, AUS)
    assert m["fer_acc"] == pytest.approx(0.75)
    assert m["fer_acc/happy"] == pytest.approx(0.5) and m["fer_acc/neutral"] == 1.0
    assert m["au_pearson/AU1"] == pytest.approx(1.0) and m["au_pearson/AU4"] == pytest.approx(-1.0)
    assert m["au_pearson/AU2"] is None  # requested AU2 is constant: no r, not averaged
    assert m["au_pearson_count"] == 2 and m["au_pearson_mean"] == pytest.approx(0.0)
    assert m["au_mae/AU1"] == pytest.approx(0.0)


def test_fidelity_metrics_constant_prediction_scores_zero_and_masks_unknown_aus():
    conds = _conds([0] * 4, [[0, 0, 0], [1, 0, 5], [2, 0, 0], [3, 0, 5]],
                   mask=[[True, True, False]] * 3 + [[True, True, True]])
    pred = torch.full((4, 3), 2.0)
    m = fidelity_metrics(torch.eye(3)[[0] * 4], pred, conds, AUS)
    assert m["au_pearson/AU1"] == 0.0           # the detector ignores the request: no control
    assert m["au_pearson/AU4"] is None          # only one known value: no r
    assert m["au_pearson_count"] == 1


def test_au_acc_counts_activation_agreement_over_known_aus():
    conds = _conds([0, 0], [[0, 2, 5], [3, 0.5, 0]], mask=[[True, True, False], [True, True, True]])
    pred = torch.tensor([[0.2, 1.5, 0.0], [0.9, 0.4, 4.0]])
    # known entries: (0 vs 0.2) ok, (2 vs 1.5) ok, (3 vs 0.9) miss, (0.5 vs 0.4) ok, (0 vs 4) miss -> 3/5
    m = fidelity_metrics(torch.eye(3)[[0, 0]], pred, conds, AUS, au_active_threshold=1.0)
    assert m["au_acc"] == pytest.approx(0.6)
    assert fidelity_metrics(torch.eye(3)[[0, 0]], pred, conds, AUS, au_active_threshold=0.3)["au_acc"] == \
        pytest.approx(0.8)


class _FeatureTeacher(torch.nn.Module):
    """forward_features = per-channel means: FID/KID become checkable by hand."""

    class _Model:
        num_features = 3

    model = _Model()

    def forward_features(self, x):
        return x.mean(dim=(2, 3))


def test_distribution_metrics_zero_for_identical_sets_and_grow_with_shift():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(40, 3, 8, 8, generator=g)
    features = TeacherFeatures(_FeatureTeacher(), 8)
    same = distribution_metrics(features, real.clone(), real)
    assert same["fid"] == pytest.approx(0.0, abs=1e-3)
    assert abs(same["kid_mean"]) < 1e-3
    near = distribution_metrics(features, (real + 0.05).clamp(0, 1), real)
    far = distribution_metrics(features, (real + 0.3).clamp(0, 1), real)
    assert 0 < near["fid"] < far["fid"] and near["kid_mean"] < far["kid_mean"]
    with pytest.raises(ValueError, match="at least 2"):
        distribution_metrics(features, real[:1], real)


def test_teacher_scores_needs_an_au_head():
    class NoAUHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return {"logits": torch.zeros(len(x), 8)}

    with pytest.raises(ValueError, match="no AU head"):
        teacher_scores(NoAUHead(), torch.rand(2, 3, 16, 16), 32)


def _record(i, label, aus=True):
    return FERRecord(sample_id=str(i), image=np.full((8, 8, 3), i % 25 * 10, np.uint8), label=label,
                     aus=np.full(3, float(label), np.float32) if aus else None,
                     au_mask=np.ones(3, bool) if aus else None, caption=f"face {i}")


def test_records_eval_conditions_are_class_balanced():
    records = [_record(i, i % 3) for i in range(12)] + [_record(99, 1, aus=False)]
    conds = records_eval_conditions(records, per_class=2, num_classes=3, seed=0)
    assert sorted(conds.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert conds.references.shape == (6, 3, 8, 8) and conds.seeds == [0, 1, 2, 3, 4, 5]
    assert "face 99" not in conds.captions
    with pytest.raises(ValueError, match="no labelled records"):
        records_eval_conditions([_record(0, -1)], 2, 3, 0)


def test_grid_conditions_and_callback_arguments():
    conds = grid_conditions([_record(0, 2), _record(1, 0), _record(2, 2)], num_classes=8, num_aus=3)
    assert conds.names == ["neutral", "sad"] and conds.captions == ["face 1", "face 0"]
    assert conds.sweep_caption == "face 1"  # the AU sweep starts from the neutral face
    with pytest.raises(ValueError, match="no labelled records"):
        grid_conditions([_record(0, -1)], 8, 3)
    for bad in (dict(every_n_steps=-1), dict(seeds=0), dict(au_levels=[])):
        with pytest.raises(ValueError, match="grids"):
            GeneratorSampleGrids(conds, ".", **bad)


def test_component_builders_reject_bad_input(tmp_path):
    with pytest.raises(ValueError, match="divisible by 4"):
        build_tiny(30)
    with pytest.raises(ValueError, match="generator.model.unet"):
        build_tiny(32, unet={"no_such_argument": 1})
    with pytest.raises(FileNotFoundError, match="pretrained_path does not exist"):
        load_pretrained(str(tmp_path / "nope"))
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="missing vae/, text_encoder/, tokenizer/, scheduler/"):
        load_pretrained(str(tmp_path / "sd"))


def test_eval_conditions_skip_unloadable_reference_faces(tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"not a png")
    bad = FERRecord(sample_id="bad", image=str(corrupt), label=0, aus=np.zeros(3, np.float32),
                    au_mask=np.ones(3, bool), caption="broken")
    records = [_record(i, i % 3) for i in range(6)] + [bad]
    with pytest.warns(UserWarning, match="skipped 1 of"):
        conds = records_eval_conditions(records, per_class=3, num_classes=3, seed=0)
    assert "broken" not in conds.captions and conds.references.shape[0] == len(conds.labels) == 6
    with pytest.raises(ValueError, match="no loadable reference faces"), pytest.warns(UserWarning):
        records_eval_conditions([bad], 1, 3, 0)

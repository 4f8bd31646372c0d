"""Coverage of generated faces in a feature space: k-NN precision/recall, within-class feature and AU spread."""
import pytest
import torch

from lightning_modules.generator import feature_metrics as fm

LINE = torch.tensor([[0.0], [1.0], [3.0], [7.0]])


def test_knn_radii_are_distances_to_the_kth_other_point():
    assert fm.knn_radii(LINE, 1).tolist() == [1, 1, 2, 4]
    assert fm.knn_radii(LINE, 2).tolist() == [3, 2, 3, 6]
    with pytest.raises(ValueError, match="k must be in"):
        fm.knn_radii(LINE, 4)


def test_precision_recall_of_the_same_far_and_collapsed_sets():
    real = torch.randn(40, 5, generator=torch.Generator().manual_seed(0))
    assert fm.knn_precision_recall(real, real.clone(), k=3) == {"precision": 1.0, "recall": 1.0}
    assert fm.knn_precision_recall(real, real + 100, k=3) == {"precision": 0.0, "recall": 0.0}
    # every generated sample is real[0]: all look real, but they cover one real sample only (their radius is 0)
    assert fm.knn_precision_recall(real, real[:1].repeat(10, 1), k=3) == {"precision": 1.0, "recall": 1 / 40}


def test_precision_counts_generated_samples_inside_the_real_balls():
    # real balls (k=1): radius 1 around 0 and 1, 2 around 3, 4 around 7 -> [-1, 11] is covered, 12 and -2 are not
    generated = torch.tensor([[0.5], [10.5], [12.0], [-2.0]])
    assert fm.knn_precision_recall(LINE, generated, k=1)["precision"] == 0.5


def test_class_spread_and_au_spread_per_class():
    features = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0], [9.0, 9.0]])
    labels = torch.tensor([0, 0, 1, 3])
    assert fm.class_spread(features, labels, 4) == {0: 5.0, 1: None, 2: None, 3: None}
    aus = torch.tensor([[0.0, 2.0], [2.0, 2.0], [1.0, 1.0], [5.0, 5.0]])
    spread = fm.au_spread(aus, labels, 4)
    assert spread[0] == pytest.approx((2 ** 0.5 + 0) / 2) and spread[1] is None


def test_mean_of_shared_classes_only():
    assert fm.mean_of_shared({0: 1.0, 1: 3.0, 2: None}, {0: 2.0, 1: None, 2: 4.0}) == (1.0, 2.0)
    assert fm.mean_of_shared({0: None}, {0: 1.0}) == (None, None)


def test_fid_of_features_is_zero_for_the_same_set_and_grows_with_a_shift():
    feats = torch.randn(200, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert fm.fid_of_features(feats, feats.clone()) == pytest.approx(0.0, abs=1e-6)
    # Gaussian sets differing only in mean: FID = the squared mean difference (4 dims x 2^2 = 16)
    assert fm.fid_of_features(feats, feats + 2.0) == pytest.approx(16.0, rel=1e-6)

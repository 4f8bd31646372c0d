import math

import torch

from lightning_modules.paradigms.losses import hard_to_soft, masked_au_mse, smooth, soft_cross_entropy


def test_soft_ce_equals_torch_ce_on_one_hot():
    torch.manual_seed(0)
    logits = torch.randn(6, 8)
    label = torch.tensor([0, 1, 2, 7, 3, 3])
    ours = soft_cross_entropy(logits, hard_to_soft(label, 8))
    assert torch.allclose(ours, torch.nn.functional.cross_entropy(logits, label))
    smoothed = soft_cross_entropy(logits, hard_to_soft(label, 8, 0.1))
    assert torch.allclose(smoothed, torch.nn.functional.cross_entropy(logits, label, label_smoothing=0.1))


def test_unknown_labels_are_ignored_and_all_unknown_is_zero():
    logits = torch.randn(3, 4, requires_grad=True)
    label = torch.tensor([-1, 2, -1])
    loss = soft_cross_entropy(logits, hard_to_soft(label, 4))
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits[1:2], label[1:2]))
    empty = soft_cross_entropy(logits, hard_to_soft(torch.tensor([-1, -1, -1]), 4))
    assert empty.item() == 0.0
    empty.backward()  # still differentiable
    assert torch.all(logits.grad == 0)


def test_soft_targets_reach_the_loss():
    logits = torch.zeros(1, 2)
    assert math.isclose(soft_cross_entropy(logits, torch.tensor([[0.5, 0.5]])).item(), math.log(2), rel_tol=1e-6)
    logits = torch.tensor([[2.0, 0.0]])
    a = soft_cross_entropy(logits, torch.tensor([[1.0, 0.0]]))
    b = soft_cross_entropy(logits, torch.tensor([[0.5, 0.5]]))
    assert b > a


def test_smooth_keeps_zero_rows():
    target = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    out = smooth(target, 0.2)
    assert torch.allclose(out[0], torch.tensor([0.1, 0.9])) and out[1].sum() == 0


def test_masked_au_mse_counts_known_aus_only():
    pred = torch.tensor([[1.0, 5.0], [2.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [2.0, 3.0]])
    mask = torch.tensor([[True, False], [True, False]])
    assert masked_au_mse(pred, target, mask).item() == 0.5  # (1 + 0) / 2
    assert masked_au_mse(pred, target, torch.zeros_like(mask)).item() == 0.0


# ------------------------------------------------------------------ per-sample weights (mix.synthetic_loss_weight)
def test_weighted_soft_ce_is_the_batch_mean_of_weighted_rows():
    from lightning_modules.paradigms.losses import weighted_soft_cross_entropy

    torch.manual_seed(1)
    logits = torch.randn(4, 5)
    label = torch.tensor([0, 3, -1, 4])  # row 2 has no target: ignored, and not counted in the mean
    target = hard_to_soft(label, 5)
    weight = torch.tensor([1.0, 0.25, 7.0, 0.0])
    per_row = torch.nn.functional.cross_entropy(logits, label.clamp_min(0), reduction="none")
    expected = (1.0 * per_row[0] + 0.25 * per_row[1] + 0.0 * per_row[3]) / 3
    assert torch.allclose(weighted_soft_cross_entropy(logits, target, weight), expected)
    # all weights 1 = the unweighted loss
    unweighted = soft_cross_entropy(logits, target)
    assert torch.allclose(weighted_soft_cross_entropy(logits, target, torch.ones(4)), unweighted)


def test_weight_zero_rows_get_no_gradient_and_bad_weights_are_refused():
    import pytest

    from lightning_modules.paradigms.losses import weighted_soft_cross_entropy

    logits = torch.randn(3, 4, requires_grad=True)
    target = hard_to_soft(torch.tensor([1, 2, 3]), 4)
    weighted_soft_cross_entropy(logits, target, torch.tensor([1.0, 0.0, 2.0])).backward()
    assert torch.all(logits.grad[1] == 0) and torch.any(logits.grad[0] != 0) and torch.any(logits.grad[2] != 0)
    # row 2 (w=2) pulls twice as hard as it would with weight 1
    logits2 = logits.detach().clone().requires_grad_(True)
    weighted_soft_cross_entropy(logits2, target, torch.ones(3)).backward()
    assert torch.allclose(logits.grad[2], 2 * logits2.grad[2])
    with pytest.raises(ValueError, match="shape"):
        weighted_soft_cross_entropy(logits, target, torch.ones(2))
    with pytest.raises(ValueError, match=">= 0"):
        weighted_soft_cross_entropy(logits, target, torch.tensor([1.0, -1.0, 1.0]))

import math

import torch

from lightning_modules.losses import hard_to_soft, masked_au_mse, smooth, soft_cross_entropy


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

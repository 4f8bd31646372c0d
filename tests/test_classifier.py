"""The classifier LightningModule without a Trainer: AU head, soft labels, local pretrained weights."""
import pytest
import torch

from lightning_modules.paradigms.classifier import FERClassifier, create_backbone
from lightning_modules.paradigms.student import FERStudent
from lightning_modules.paradigms.teacher import FERTeacher


def _batch(n=8, k=8, a=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, "label": torch.randint(0, k, (n,), generator=g),
            "aus": torch.rand(n, a, generator=g) * 5, "au_mask": torch.ones(n, a, dtype=torch.bool)}


def test_teacher_has_au_head_student_does_not():
    assert FERTeacher(backbone="resnet18").au_head is not None
    assert FERStudent(backbone="resnet18").au_head is None


def test_au_head_learns_and_ignores_unknown_aus():
    torch.manual_seed(0)
    model = FERTeacher(backbone="resnet18", num_aus=12, au_loss_weight=1.0, channels_last=False)
    batch = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = model._loss(batch, model(batch["image"]))["au"].item()
    for _ in range(15):
        loss = model._loss(batch, model(batch["image"]))["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = model._loss(batch, model(batch["image"]))["au"].item()
    assert last < 0.5 * first
    # unknown AUs contribute no loss and no gradient to the AU head
    unknown = {**batch, "au_mask": torch.zeros_like(batch["au_mask"])}
    model.zero_grad()
    losses = model._loss(unknown, model(unknown["image"]))
    assert losses["au"].item() == 0.0
    losses["total"].backward()
    assert model.au_head.weight.grad is None or torch.all(model.au_head.weight.grad == 0)


def test_soft_labels_take_precedence_over_hard_labels():
    model = FERStudent(backbone="resnet18", num_classes=4, channels_last=False).eval()
    batch = _batch(n=4, k=4)
    out = model(batch["image"])
    hard = model._loss(batch, out)["cls"]
    uniform = model._loss({**batch, "soft_label": torch.full((4, 4), 0.25)}, out)["cls"]
    expected = -(torch.log_softmax(out["logits"], 1).mean(1)).mean()
    assert torch.allclose(uniform, expected) and not torch.allclose(uniform, hard)


def test_pretrained_weights_only_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    source = create_backbone("resnet18", num_classes=8)
    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = create_backbone("resnet18", num_classes=8, pretrained=str(path))
    # the backbone comes from the file; timm re-initialises the classifier for the new class count (fine-tuning)
    backbone = [k for k in source.state_dict() if not k.startswith("fc.")]
    assert len(backbone) > 100
    for name in backbone:
        assert torch.equal(source.state_dict()[name], loaded.state_dict()[name]), name
    with pytest.raises(FileNotFoundError, match="pretrained"):
        create_backbone("resnet18", num_classes=8, pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="backbone"):
        FERClassifier(backbone="resnet_does_not_exist")


def test_a_batch_whose_faces_all_failed_to_load_is_skipped_not_trained_on():
    """The datamodule drops unreadable faces from their batch; an all-dropped batch must not reach BatchNorm."""
    model = FERStudent(backbone="resnet18", num_classes=8)
    empty = {k: v[:0] for k, v in _batch().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.training_step(empty, 0) is None
    preds = model._eval_step(empty, "val", model.val_metrics)
    assert preds.numel() == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no running-stat update

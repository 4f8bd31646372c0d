"""FER teachers: the timm classifier with an AU-intensity head, and the generic checkpoint loader.

The teacher labels and scores synthetic faces later (FER-Acc, AU fidelity, relabel votes), so its AU head is
on by default: it is the suite's AU detector. The FERAnno teacher (UNet features) lives in ``labeling/feranno.py``;
``load_fer_classifier`` loads either kind (and students) from a checkpoint.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from lightning_modules.paradigms.classifier import CLASS_MARKER, FERClassifier, FERClassifierBase

# Class markers written before the classifiers moved into subpackages, so those checkpoints keep loading.
MOVED_CLASSES = {
    "lightning_modules.classifier.FERClassifier": "lightning_modules.paradigms.classifier.FERClassifier",
    "lightning_modules.teacher.FERTeacher": "lightning_modules.paradigms.teacher.FERTeacher",
    "lightning_modules.student.FERStudent": "lightning_modules.paradigms.student.FERStudent",
    "lightning_modules.feranno.FERAnnoTeacher": "lightning_modules.labeling.feranno.FERAnnoTeacher",
}


class FERTeacher(FERClassifier):
    def __init__(self, *args, au_head: bool = True, **kwargs):
        super().__init__(*args, au_head=au_head, **kwargs)


def load_teacher(path: str | Path, map_location: str = "cpu") -> FERTeacher:
    """A trained teacher from its ``teacher.ckpt`` (a Lightning checkpoint), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    return FERTeacher.load_from_checkpoint(path, map_location=map_location).eval()


def classifier_class(checkpoint: dict[str, Any]) -> type[FERClassifierBase]:
    """The class that wrote a classifier checkpoint: its marker, else (timm checkpoints written before the marker
    existed) FERClassifier when the hyperparameters name a ``backbone``."""
    name = checkpoint.get(CLASS_MARKER)
    if name:
        module, _, qualname = MOVED_CLASSES.get(name, name).rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), qualname)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"checkpoint names an unknown classifier class {name!r}") from err
        if not (isinstance(cls, type) and issubclass(cls, FERClassifierBase)):
            raise ValueError(f"checkpoint class {name!r} is not a FER classifier")
        return cls
    hparams = checkpoint.get("hyper_parameters") or {}
    if "backbone" in hparams:
        return FERClassifier
    raise ValueError("not a FER classifier checkpoint: no class marker and no `backbone` in its hyperparameters")


def load_fer_classifier(path: str | Path, map_location: str = "cpu", **overrides: Any) -> FERClassifierBase:
    """Any trained FER classifier (timm teacher/student or FERAnno) from its Lightning checkpoint, in eval mode.

    ``overrides`` replace saved hyperparameters, e.g. ``generator_path=`` when a FERAnno checkpoint's generator
    folder has moved.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier checkpoint not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    cls = classifier_class(checkpoint)
    del checkpoint
    return cls.load_from_checkpoint(path, map_location=map_location, **overrides).eval()

"""FER teachers: the timm classifier with an AU-intensity head.

The teacher labels and scores synthetic faces later (FER-Acc, AU fidelity, relabel votes), so its AU head is
on by default: it is the suite's AU detector.
"""
from __future__ import annotations

from pathlib import Path

from lightning_modules.classifier import FERClassifier


class FERTeacher(FERClassifier):
    def __init__(self, *args, au_head: bool = True, **kwargs):
        super().__init__(*args, au_head=au_head, **kwargs)


def load_teacher(path: str | Path, map_location: str = "cpu") -> FERTeacher:
    """A trained teacher from its ``teacher.ckpt`` (a Lightning checkpoint), in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher checkpoint not found: {path}")
    return FERTeacher.load_from_checkpoint(path, map_location=map_location).eval()

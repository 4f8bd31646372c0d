"""FER students: the classifier trained on real, synthetic or mixed data and tested on real data only."""
from __future__ import annotations

from lightning_modules.classifier import FERClassifier


class FERStudent(FERClassifier):
    """Students carry no AU head by default: they are judged on expression accuracy alone."""

    def __init__(self, *args, au_head: bool = False, **kwargs):
        super().__init__(*args, au_head=au_head, **kwargs)

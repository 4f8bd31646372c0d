"""Supervised FER paradigms: the timm classifier, its teacher and student, their losses and metrics."""

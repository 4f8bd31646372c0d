"""Labelling faces with the suite's own models (AU annotation)."""

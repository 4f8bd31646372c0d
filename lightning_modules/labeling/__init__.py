"""Labelling faces with the suite's own models (AU annotation; FERAnno's branches and fusion)."""

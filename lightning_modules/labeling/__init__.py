"""Labelling faces: the FERAnno teacher (its branches and fusion), AU annotation, the relabel ensemble vote."""

"""Semantic guidance: the pure guidance math, the sampler hooks, and the settings read from a config."""

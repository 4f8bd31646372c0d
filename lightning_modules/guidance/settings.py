"""Semantic guidance settings from a config: the ``generator.guidance`` / ``synthesis.guidance`` node as a
``SemanticGuidance``, and the frozen guiding classifier. The generator stage (evaluation) and synthesis both use them."""
from __future__ import annotations

from omegaconf import DictConfig

from lightning_modules.guidance.semantic import SemanticGuidance
from lightning_modules.run.runtime import ConfigError


def semantic_guidance(g: DictConfig, key: str = "generator.guidance") -> SemanticGuidance:
    """A guidance config node (``generator.guidance``, ``synthesis.guidance``) as a SemanticGuidance (ConfigError
    naming ``key`` when out of range)."""
    try:
        return SemanticGuidance(float(g.embedding_scale), float(g.classifier_scale), float(g.au_scale),
                                tuple(float(x) for x in g.window), bool(g.per_token))
    except (ValueError, TypeError) as err:
        raise ConfigError(key, str(err)) from err


def load_guide(checkpoint: str, image_size: int, device="cpu"):
    """The frozen guidance classifier (a teacher checkpoint) taking images at ``image_size`` (data.image_size)."""
    from lightning_modules.guidance.sampling import ClassifierGuide
    from lightning_modules.paradigms.teacher import load_teacher

    return ClassifierGuide(load_teacher(checkpoint, map_location=device), image_size)

"""Backbones with a ``features(x)`` method and a linear ``classifier``, behind one registry."""

from longtail.models.registry import available_models, build_model

__all__ = ["available_models", "build_model"]

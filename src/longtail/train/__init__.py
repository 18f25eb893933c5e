"""Stage 1: representation learning (loop, schedules, losses, SWA, SWAG).

The package's entry point is :class:`Stage1` (the training loop, :mod:`longtail.train.loop`);
code above this layer (``fit``, ``sweep``, the CLI) imports it from here. It is imported on first
use, so ``longtail.train.bn`` or ``longtail.train.swag`` load without the loop. The plumbing
other stages share lives below this layer: data loading in :mod:`longtail.data.build`, device
and process facts in :mod:`longtail.core.runtime` and :mod:`longtail.core.distributed`,
crash-safe files in :mod:`longtail.core.io`.
"""

from __future__ import annotations

import importlib

__all__ = ["Stage1"]


def __getattr__(name: str) -> object:
    """Import ``Stage1`` from :mod:`longtail.train.loop` on first use."""
    if name in __all__:
        return getattr(importlib.import_module("longtail.train.loop"), name)
    raise AttributeError(f"module 'longtail.train' has no attribute {name!r}")

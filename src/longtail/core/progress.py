"""Progress bars for long work: shown on an interactive terminal, by the main process only.

Every long loop in longtail (stage-1 epochs, feature extraction, SWAG feature banks, SRepr's
α grid) draws its bar through :func:`progress`, so one rule decides when bars appear:

- on standard error when it is a terminal, and only on rank 0 of a ``torchrun`` job;
- never in logs, pipes or CI output (the per-epoch summary lines are what those keep);
- ``LONGTAIL_PROGRESS=1`` forces bars on (e.g. to record a terminal session),
  ``LONGTAIL_PROGRESS=0`` turns them off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import torch.distributed as dist
from tqdm.auto import tqdm

ENV = "LONGTAIL_PROGRESS"


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def bars_enabled(is_main: bool | None = None) -> bool:
    """Whether a bar would be drawn now: ``$LONGTAIL_PROGRESS`` if set, else a terminal.

    ``is_main`` overrides the rank test (default: rank 0 of the process group, or no group).
    """
    if not (_is_main() if is_main is None else is_main):
        return False
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return sys.stderr.isatty()


def progress(
    iterable: Iterable | None = None,
    *,
    desc: str,
    total: int | None = None,
    unit: str = "it",
    is_main: bool | None = None,
    **kwargs,
) -> tqdm:
    """A ``tqdm`` bar on standard error that disappears when done (``leave=False``).

    Disabled (a no-op object with the same methods) unless :func:`bars_enabled`.
    """
    kwargs.setdefault("leave", False)
    return tqdm(
        iterable,
        desc=desc,
        total=total,
        unit=unit,
        disable=not bars_enabled(is_main),
        file=sys.stderr,
        dynamic_ncols=True,
        **kwargs,
    )


def format_seconds(seconds: float) -> str:
    """``[H:]MM:SS`` as tqdm prints its own ETA."""
    return tqdm.format_interval(max(seconds, 0.0))

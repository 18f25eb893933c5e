"""Training checkpoints: written atomically with a checksum (see :mod:`longtail.io`).

Checkpoints are ``ckpt-<epoch>-<step>.pt`` in the run directory, each with a ``.sha256`` beside
it; the newest two are kept. A truncated or corrupt file is detected and the previous one named.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from longtail.errors import LongtailError
from longtail.io import (  # noqa: F401 - re-exported: checkpoints are written through these
    atomic_torch_save,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    verified_load,
)

KEEP = 2
_CKPT = re.compile(r"ckpt-(\d+)-(\d+)\.pt$")


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``run_dir``, oldest first (by epoch, then step)."""
    found = []
    for p in Path(run_dir).glob("ckpt-*.pt"):
        m = _CKPT.search(p.name)
        if m:
            found.append(((int(m.group(1)), int(m.group(2))), p))
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict, run_dir: str | os.PathLike, epoch: int, step: int) -> Path:
    """Write ``ckpt-<epoch>-<step>.pt`` atomically and delete all but the newest ``KEEP``."""
    path = Path(run_dir) / f"ckpt-{epoch:04d}-{step:07d}.pt"
    atomic_torch_save(state, path)
    for old in list_checkpoints(run_dir)[:-KEEP]:
        old.unlink(missing_ok=True)
        Path(f"{old}.sha256").unlink(missing_ok=True)
    return path


def load_latest_checkpoint(
    run_dir: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict | None:
    """The newest valid checkpoint's state, or ``None`` when there is none.

    A corrupt newest checkpoint raises an error that names it and the previous one, which the
    user can restore by deleting the bad file.
    """
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    try:
        return verified_load(ckpts[-1], map_location)
    except LongtailError as e:
        offer = ""
        for prev in reversed(ckpts[:-1]):
            try:
                verified_load(prev, "cpu")
            except LongtailError:
                continue
            offer = (
                f"; the previous checkpoint {str(prev)!r} is intact: delete "
                f"{ckpts[-1].name} and resume again to continue from it"
            )
            break
        raise LongtailError(f"{e}{offer or '; no intact earlier checkpoint'}") from None

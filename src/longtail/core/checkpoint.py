"""Training checkpoints: written atomically with a checksum (see :mod:`longtail.core.io`).

Checkpoints are ``ckpt-<epoch>-<step>.pt`` in the run directory (named by
:class:`longtail.core.rundir.RunDir`), each with a ``.sha256`` beside it; the newest two are kept. A
truncated or corrupt file is detected and the previous one named.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from longtail.core.errors import LongtailError
from longtail.core.io import atomic_torch_save, verified_load
from longtail.core.rundir import RunDir

KEEP = 2


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``run_dir``, oldest first (by epoch, then step)."""
    return RunDir(run_dir).checkpoints()


def save_checkpoint(state: dict, run_dir: str | os.PathLike, epoch: int, step: int) -> Path:
    """Write ``ckpt-<epoch>-<step>.pt`` atomically and delete all but the newest ``KEEP``."""
    path = RunDir(run_dir).checkpoint_path(epoch, step)
    atomic_torch_save(state, path)
    for old in list_checkpoints(run_dir)[:-KEEP]:
        _remove_with_digest(old)
    return path


def _remove_with_digest(path: Path) -> int:
    """Delete ``path`` and the ``<path>.sha256`` beside it when there; returns the bytes freed."""
    freed = 0
    for f in (path, Path(f"{path}.sha256")):
        if f.is_file():
            freed += f.stat().st_size
        f.unlink(missing_ok=True)
    return freed


def delete_checkpoints(run_dir: str | os.PathLike) -> int:
    """Delete every checkpoint of a *finished* run in ``run_dir`` (and the ``.sha256`` beside
    it, and the branch point ``sweep`` starts SGD baselines from); returns the bytes freed.

    For callers whose runs are never resumed or branched once finished (``longtail fit``'s
    candidates and re-fit: two checkpoints of 13-33 MB each per ResNet-32 run). Refuses a run
    that has not finished (:attr:`RunDir.finished`), so it keeps what a resume continues from.
    """
    rundir = RunDir(run_dir)
    if not rundir.finished:
        raise LongtailError(
            f"{rundir.path} has not finished stage 1: its checkpoints are what a resume "
            "continues from, so they are kept"
        )
    return sum(_remove_with_digest(p) for p in [*rundir.checkpoints(), rundir.branch_path])


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

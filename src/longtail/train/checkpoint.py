"""Crash-safe files: atomic writes (temp file + rename) and checksummed checkpoints.

Checkpoints are ``ckpt-<epoch>-<step>.pt`` in the run directory, each with a ``.sha256`` beside
it; the newest two are kept. A truncated or corrupt file is detected and the previous one named.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch

from longtail.errors import LongtailError

KEEP = 2
_CKPT = re.compile(r"ckpt-(\d+)-(\d+)\.pt$")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save`` atomically; writes ``<path>.sha256`` and returns the hex digest."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path, data)
    atomic_write_text(f"{path}.sha256", digest + "\n")
    return digest


def verified_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a file written by :func:`atomic_torch_save`, checking its checksum first."""
    path = Path(path)
    if not path.is_file():
        raise LongtailError(f"checkpoint {str(path)!r} not found")
    data = path.read_bytes()
    side = Path(f"{path}.sha256")
    if side.is_file():
        want = side.read_text().strip()
        got = hashlib.sha256(data).hexdigest()
        if want != got:
            raise LongtailError(
                f"checkpoint {str(path)!r} is corrupt or truncated "
                f"(sha256 {got[:12]}… != recorded {want[:12]}…)"
            )
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise LongtailError(f"checkpoint {str(path)!r} cannot be read: {e}") from e


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

"""Crash-safe files: atomic writes (temp file + rename, fsync) and checksummed torch files.

The bottom layer every stage writes through, so a crash or a full disk never leaves a
half-written checkpoint, cache, results file or report behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import torch

from longtail.errors import LongtailError


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

"""Crash-safe files: atomic writes (temp file + rename, fsync) and checksummed torch files.

The bottom layer every stage writes through, so a crash or a full disk never leaves a
half-written checkpoint, cache, results file or report behind.

Torch files hold plain data only (tensors, numbers, strings, ``None``, lists, tuples and dicts)
and are read back with ``torch.load(..., weights_only=True)``: a file dropped into a shared run
directory cannot run code when it is loaded. :func:`atomic_torch_save` refuses anything else.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from longtail.core.errors import LongtailError


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


# what a torch file written here may hold: what torch.load(weights_only=True) rebuilds
_PLAIN = (torch.Tensor, bool, int, float, str, bytes, type(None), torch.Size, torch.dtype)


def check_plain(obj: Any, where: str = "state") -> None:
    """Raise ``TypeError`` unless ``obj`` is tensors, numbers, strings, ``None``, lists, tuples
    and dicts (string / int keys) all the way down: the data ``weights_only=True`` loads."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} would need pickle; use str or int keys")
            check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(
            f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}, which would need "
            "pickle to load; save tensors, numbers, strings, None, lists, tuples and dicts only"
        )


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> str:
    """``torch.save`` atomically; writes ``<path>.sha256`` and returns the hex digest.

    ``obj`` must be plain data (:func:`check_plain`), so :func:`verified_load` can read it with
    ``weights_only=True``; anything else raises ``TypeError`` before a byte is written.
    """
    check_plain(obj)
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(path, data)
    atomic_write_text(f"{path}.sha256", digest + "\n")
    return digest


def verified_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Load a file written by :func:`atomic_torch_save`, checking its checksum first.

    Unpickles with ``weights_only=True``: a file holding any other Python object (a checkpoint
    of an older longtail, or a planted one) raises :class:`LongtailError` without running it.
    """
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
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise LongtailError(
                f"checkpoint {str(path)!r} holds a pickled Python object ({found.group(1)}), not "
                "only tensors, numbers, strings, lists and dicts; longtail never unpickles those "
                "(loading could run code). If an older longtail wrote it, retrain, or load it "
                "yourself in code you trust and re-save its plain state"
            ) from None
        raise LongtailError(f"checkpoint {str(path)!r} cannot be read: {_why(e)}") from e
    except Exception as e:  # noqa: BLE001 - any other loading failure means a bad file
        raise LongtailError(f"checkpoint {str(path)!r} cannot be read: {_why(e)}") from e


def _why(e: Exception) -> str:
    """One line of a torch.load error (its messages run over several)."""
    text = str(e)
    inner = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", text, re.DOTALL)
    if inner:
        text = inner.group(1)
    return " ".join(text.split()) or type(e).__name__

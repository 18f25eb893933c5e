"""A user's own data, materialised as split files: the dataset named ``user``.

``longtail fit`` decodes and splits the user's folder or CSV once and writes ``ROOT/train.pt``,
``ROOT/val.pt`` and ``ROOT/test.pt`` (``ROOT`` = ``FIT_DIR/data``). From then on the data is an
ordinary dataset: ``load_dataset("user", split, root=ROOT)``, ``prepare_data("user",
root=ROOT)``, stage 1 and stage 2 (``data.dataset=user data.root=ROOT``) read these files and
nothing else. Every fit has its own ``ROOT``, so several fits in one process never share state.

Each file is a dict (loadable with ``torch.load(..., weights_only=True)``):

- ``format``: ``"longtail-user-split/1"``;
- ``classes``: class names, index = label; ``labels``: ``(N,)`` int64;
- ``mean``, ``std``: per-channel statistics of the *training* split (all three splits are
  normalised alike);
- ``images``: ``(N, C, H, W)`` uint8 pixels (small images, decoded once), or ``None``;
- ``paths``: ``N`` absolute file paths (large images, decoded while training), or ``None``;
- ``in_training`` (optional, default false): the split's images are also in the training split
  on purpose (``longtail fit``'s re-fit trains on every labelled image); the data layer's
  test-leak check lets it pass, and nothing measured on it is a hold-out estimate. Kept in the
  loaded dataset's ``meta``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from longtail.core.errors import LongtailError
from longtail.data.datasets import ImageDataset, register_dataset

FORMAT = "longtail-user-split/1"
SPLITS = ("train", "val", "test")


def split_path(root: str | os.PathLike, split: str) -> Path:
    """``ROOT/<split>.pt``."""
    if split not in SPLITS:
        raise LongtailError(f"unknown split {split!r}; use train, val or test")
    return Path(root).expanduser() / f"{split}.pt"


def save_user_split(ds: ImageDataset, root: str | os.PathLike, split: str) -> Path:
    """Write ``ds`` (in memory or file-backed) as ``ROOT/<split>.pt``, atomically.

    Args:
        ds: the split; ``ds.images`` ``(N, C, H, W)`` uint8 or ``ds.paths`` (absolute).
        root: the folder holding the split files (created if missing).
        split: ``train``, ``val`` or ``test``.

    Returns:
        The path written.
    """
    path = split_path(root, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {
        "format": FORMAT,
        "name": ds.name,
        "classes": list(ds.classes),
        "labels": ds.labels.clone(),
        "mean": [float(m) for m in ds.mean],
        "std": [float(s) for s in ds.std],
        "images": ds.images.contiguous() if ds.images is not None else None,
        "paths": [str(p) for p in ds.paths] if ds.paths is not None else None,
        "in_training": bool(ds.meta.get("in_training", False)),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def load_user_split(root: str | os.PathLike, split: str) -> ImageDataset | None:
    """Read ``ROOT/<split>.pt`` back as an :class:`ImageDataset`.

    Returns ``None`` for a missing ``val`` file (a hold-out is then carved from train).

    Raises:
        LongtailError: a missing train / test file, or a file that is not a user split.
    """
    path = split_path(root, split)
    if not path.is_file():
        if split == "val":
            return None
        raise LongtailError(
            f"{str(path)!r} not found: data.root of dataset 'user' must be a folder written by "
            "`longtail fit` (FIT_DIR/data holding train.pt, val.pt, test.pt)"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        raise LongtailError(f"{path}: not a readable user split ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise LongtailError(f"{path}: not a user split written by `longtail fit`")
    return ImageDataset(
        labels=obj["labels"],
        classes=list(obj["classes"]),
        images=obj["images"],
        paths=obj["paths"],
        name=obj.get("name") or "user",
        mean=tuple(obj["mean"]),
        std=tuple(obj["std"]),
        meta={"in_training": True} if obj.get("in_training") else {},
    )


def _load(split: str, root: str | None = None, **_) -> ImageDataset | None:
    if not root:
        raise LongtailError(
            "dataset 'user' needs data.root = the data folder of a `longtail fit` output"
        )
    return load_user_split(root, split)


register_dataset("user", _load)

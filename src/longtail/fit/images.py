"""Reading a user's image files robustly, and the one preprocessing rule fit and predict share.

Every file is opened with PIL; whatever PIL cannot read (a text file, a truncated PNG, a file
that vanished) becomes a :class:`BadFile` with the reason, never an exception. Grayscale,
palette, RGBA, CMYK and 16-bit images are converted, and EXIF orientation applied, by
:func:`longtail.imaging.pil_to_rgb`.

:class:`Preprocessing` is the resize rule recorded in the model bundle: resize the shorter side
to ``resize_to`` (bilinear, antialiased), centre-crop ``size x size``, uint8 ``(C, S, S)``; the
network divides by 255 and normalises with ``mean`` / ``std`` itself. Small images are decoded
with ``resize_to == size`` once into memory; streamed images use ``resize_to = round(size *
8/7)``, exactly torchvision's evaluation pipeline in :func:`longtail.data.streaming.
build_transform` (256 -> 224). :meth:`Preprocessing.to_array` is the same rule in Pillow and
numpy alone, for the torch-free ONNX runtime.

This module imports torch only when a torch transform is asked for.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import numpy as np
from PIL import Image

from longtail.core.errors import LongtailError
from longtail.imaging import exif_orientation, pil_to_rgb

if TYPE_CHECKING:
    import torch

SINGLE_CHANNEL_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
T = TypeVar("T")


class BadFile(NamedTuple):
    """A file that is not a readable image, and why."""

    path: str
    reason: str


class Header(NamedTuple):
    """What PIL reads from an image's header without decoding it: ``(width, height, mode)``."""

    width: int
    height: int
    mode: str


def _reason(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {msg}" if not msg.startswith(type(e).__name__) else msg


def read_header(path: str) -> Header | BadFile:
    """The image size and mode from the header, or why the file is not an image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, EXIF warnings
            with Image.open(path) as img:
                w, h = int(img.width), int(img.height)
                if exif_orientation(img) >= 5:  # stored turned by 90 degrees: report it upright
                    w, h = h, w
                return Header(w, h, str(img.mode))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return BadFile(path, "not an image (" + _reason(e) + ")")


def open_image(path: str, channels: int) -> Image.Image:
    """Decode a whole image and convert it to ``L`` (1 channel) or ``RGB`` (3).

    Raises whatever PIL raises on a bad file; :func:`decode` turns that into a :class:`BadFile`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Image.open(path) as img:
            img.load()
            return pil_to_rgb(img, channels)


@dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes network input (stored in the model bundle).

    Attributes:
        size: side ``S`` of the square network input.
        channels: 1 (grayscale) or 3 (RGB).
        resize_to: the shorter side is resized to this, then the centre ``S x S`` is cropped.
        mean, std: per-channel normalisation in ``[0, 1]`` units (applied inside the network).
    """

    size: int
    channels: int
    resize_to: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> dict:
        """A JSON-ready description, with the rule spelled out for non-Python deployers."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d["rule"] = (
            "apply the EXIF orientation; 16-bit grayscale / 257 to 8 bits; "
            f"convert to {'L (grayscale)' if self.channels == 1 else 'RGB'} (alpha composited "
            f"onto white for RGB); resize the shorter side to {self.resize_to} px (bilinear, "
            f"antialiased); centre-crop {self.size}x{self.size}; float32 = uint8 / 255, shape "
            f"(B, {self.channels}, {self.size}, {self.size}); the network normalises with "
            "mean / std itself"
        )
        return d

    @classmethod
    def from_json(cls, d: dict) -> Preprocessing:
        """Inverse of :meth:`to_json`."""
        return cls(
            int(d["size"]),
            int(d["channels"]),
            int(d["resize_to"]),
            tuple(float(m) for m in d["mean"]),
            tuple(float(s) for s in d["std"]),
        )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(width, height)`` after resizing the shorter side to ``resize_to`` (torchvision's
        rule: the longer side is ``int(resize_to * long / short)``)."""
        if width <= height:
            return self.resize_to, int(self.resize_to * height / width)
        return int(self.resize_to * width / height), self.resize_to

    def to_array(self, img: Image.Image) -> np.ndarray:
        """PIL image (already ``L`` / ``RGB``) -> uint8 ``(C, S, S)`` numpy array, with Pillow only.

        The rule of :meth:`transform`: Pillow's bilinear resize (antialiased when shrinking)
        and torchvision's centre-crop offsets; torchvision's antialiased resize is built to
        match Pillow's, so pixels agree up to rounding (identical when no resize is needed).
        """
        w, h = self.resized_size(img.width, img.height)
        if (w, h) != img.size:
            img = img.resize((w, h), Image.Resampling.BILINEAR)
        top, left = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
        img = img.crop((left, top, left + self.size, top + self.size))
        return np.ascontiguousarray(
            np.atleast_3d(np.asarray(img, dtype=np.uint8)).transpose(2, 0, 1)
        )

    def transform(self) -> Callable[[Image.Image], torch.Tensor]:
        """PIL image (already ``L`` / ``RGB``) -> uint8 ``(C, S, S)``."""
        from torchvision.transforms import v2

        return v2.Compose(
            [
                v2.PILToTensor(),
                v2.Resize(self.resize_to, antialias=True),
                v2.CenterCrop(self.size),
            ]
        )


BUNDLE_JSON = "bundle.json"  # a bundle's description, next to its network files


def find_bundle(path: str | os.PathLike) -> Path:
    """The bundle folder for ``path``: ``FIT_DIR/bundle`` or ``FIT_DIR`` itself.

    Raises:
        LongtailError: neither holds ``bundle.json``.
    """
    p = Path(path).expanduser()
    if not (p / BUNDLE_JSON).is_file() and (p / "bundle" / BUNDLE_JSON).is_file():
        p = p / "bundle"
    if not (p / BUNDLE_JSON).is_file():
        raise LongtailError(
            f"{str(path)!r} holds no model bundle ({BUNDLE_JSON}); give the --out folder of "
            "`longtail fit` or its bundle/ sub-folder"
        )
    return p


class BundleMeta:
    """What a bundle's ``bundle.json`` (``self.meta``) says about its input and output, shared
    by the torch bundle and the onnxruntime one (which must not import torch)."""

    meta: dict

    @property
    def classes(self) -> list[str]:
        """Class names, index = output column."""
        return list(self.meta["classes"])

    @property
    def preprocessing(self) -> Preprocessing:
        """How files become the network's input."""
        return Preprocessing.from_json(self.meta["preprocessing"])


def decode(path: str, prep: Preprocessing, tf=None) -> torch.Tensor | BadFile:
    """Pixels of one file, uint8 ``(C, S, S)`` as ``prep`` says, or why it cannot be read."""
    try:
        img = open_image(path, prep.channels)
        return (tf or prep.transform())(img)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return BadFile(path, "unreadable image (" + _reason(e) + ")")


def decode_array(path: str, prep: Preprocessing) -> np.ndarray | BadFile:
    """Pixels of one file as uint8 ``(C, S, S)`` numpy (Pillow only, :meth:`Preprocessing.
    to_array`), or why it cannot be read."""
    try:
        return prep.to_array(open_image(path, prep.channels))
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return BadFile(path, "unreadable image (" + _reason(e) + ")")


def verify(path: str, channels: int) -> BadFile | None:
    """Decode a file fully (and drop the pixels): ``None`` when it is a readable image."""
    try:
        open_image(path, channels)
        return None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return BadFile(path, "unreadable image (" + _reason(e) + ")")


def parallel_map(fn: Callable[[str], T], paths: Iterable[str], workers: int = 0) -> Iterator[T]:
    """``fn`` over ``paths`` in order, on threads (PIL decodes without the GIL).

    ``workers=0``: ``min(4, cpu count)``; 1: in the calling thread.
    """
    workers = workers or min(4, os.cpu_count() or 1)
    if workers <= 1:
        yield from map(fn, paths)
        return
    with ThreadPoolExecutor(workers) as pool:
        yield from pool.map(fn, paths)


def list_image_inputs(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Files named in ``inputs``, with folders expanded recursively (sorted, hidden skipped).

    Raises:
        FileNotFoundError: an input that does not exist (the caller reports it).
    """
    out: list[str] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                out += [str(Path(dirpath) / f) for f in sorted(filenames) if not f.startswith(".")]
        elif p.is_file():
            out.append(str(p))
        else:
            raise FileNotFoundError(str(item))
    return out

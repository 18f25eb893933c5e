"""Decoding any PIL image into an upright 8-bit ``L`` or ``RGB`` image (no torch).

Shared by the training data pipeline (:mod:`longtail.data.streaming`), ``longtail fit`` /
``predict`` (:mod:`longtail.fit.images`) and the torch-free ONNX runtime
(:mod:`longtail.fit.onnx_runtime`), so every path decodes a file the same way.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

#: EXIF tag of the camera's orientation; values 5-8 mean the stored image is turned 90 degrees.
EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8; 1 = upright) read from the header, without decoding pixels."""
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block must not make the image unreadable
        return 1
    return value if 1 <= value <= 8 else 1


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (``I;16*``) and 32-bit integer (``I``) grayscale -> ``L``, rescaled, not clipped.

    PIL's own ``convert("L")`` clips every value above 255 to white; a 16-bit scan or medical
    image then turns almost entirely white. Values are divided by 257 (65535 -> 255); ``I``
    images whose values exceed 65535 are scaled by their own maximum.
    """
    a = np.asarray(img, dtype=np.float64)
    top = 65535.0 if a.size == 0 or a.max() <= 65535 else float(a.max())
    a = np.clip(a, 0, None) * (255.0 / top)
    return Image.fromarray(np.rint(a).astype(np.uint8), mode="L")


def pil_to_rgb(img: Image.Image, channels: int = 3) -> Image.Image:
    """Upright ``L`` (1 channel) or ``RGB`` (3) image from any PIL image.

    Applies the EXIF orientation (phone and camera photos are stored sideways with a tag),
    rescales 16-bit grayscale to 8 bits, composites transparency onto white, and converts
    grayscale / palette / RGBA / CMYK.
    """
    if exif_orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in SIXTEEN_BIT_MODES:
        img = _to_8bit(img)
    mode = "L" if channels == 1 else "RGB"
    if img.mode == mode:
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")  # transparent pixels become white, in colour and in grey
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    return img.convert(mode)

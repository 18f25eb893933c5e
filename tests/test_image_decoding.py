"""Decoding users' image files: EXIF orientation, 16-bit grayscale (Fashion-MNIST pixels)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from longtail.data.datasets import load_fashion_mnist
from longtail.data.streaming import exif_orientation, pil_to_rgb
from longtail.fit.images import Header, open_image, read_header

pytestmark = pytest.mark.fashion_mnist


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    """A non-square uint8 (28, 40) grayscale picture from two Fashion-MNIST test images."""
    ds = load_fashion_mnist(None, "test")
    a, b = ds.images[0, 0].numpy(), ds.images[1, 0].numpy()
    return np.concatenate([a, b[:, :12]], axis=1)


def _save_with_orientation(arr: np.ndarray, path, orientation: int) -> None:
    img = Image.fromarray(arr).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif)  # PNG keeps pixels exact, unlike JPEG


@pytest.mark.parametrize(
    "orientation, upright",
    [
        (1, lambda a: a),
        (3, lambda a: np.rot90(a, 2)),
        (6, lambda a: np.rot90(a, -1)),  # stored turned 90 degrees anticlockwise
        (8, lambda a: np.rot90(a, 1)),
        (2, lambda a: a[:, ::-1]),
    ],
)
def test_exif_orientation_is_applied(tmp_path, picture, orientation, upright):
    path = tmp_path / f"o{orientation}.png"
    _save_with_orientation(picture, path, orientation)
    with Image.open(path) as img:
        assert exif_orientation(img) == orientation
    got = np.asarray(open_image(str(path), 1))
    want = upright(picture)
    assert got.shape == want.shape
    assert np.array_equal(got, want)
    h = read_header(str(path))
    assert isinstance(h, Header) and (h.height, h.width) == want.shape


def test_sixteen_bit_grayscale_is_rescaled_not_clipped(tmp_path, picture):
    wide = picture.astype(np.uint16) * 257  # 0..255 -> 0..65535
    path = tmp_path / "deep.png"
    Image.fromarray(wide).save(path)
    with Image.open(path) as img:
        assert img.mode.startswith("I")  # PIL reads a 16-bit PNG as I or I;16
        grey = np.asarray(pil_to_rgb(img, 1))
        plain = np.asarray(img.convert("L"))
    assert np.array_equal(grey, picture)
    # PIL's own conversion clips: most of the picture would turn white
    assert (plain == 255).mean() > 0.4 > (grey == 255).mean()
    rgb = np.asarray(open_image(str(path), 3))
    assert rgb.shape == (*picture.shape, 3) and np.array_equal(rgb[..., 1], picture)


def test_broken_exif_does_not_make_an_image_unreadable(tmp_path, picture):
    path = tmp_path / "odd.png"
    _save_with_orientation(picture, path, 42)  # not a valid orientation
    assert np.array_equal(np.asarray(open_image(str(path), 1)), picture)

"""Long-tailed Fashion-MNIST PNG folders and one `longtail fit` on them, shared by the fit, predict
and export tests (the fit runs once per session: the ``fitted`` fixture in conftest.py)."""

from __future__ import annotations

import contextlib
import functools
import io
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from longtail.cli import main
from longtail.data.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist

# folder names: "T-shirt/top" becomes "T-shirt top" (a space in a class name)
CLASSES = [c.replace("/", " ") for c in FASHION_MNIST_CLASSES]
COUNTS = [int(120 * 0.1 ** (i / 9)) for i in range(10)]  # 120 .. 12, imbalance factor 10
HELDOUT_PER_CLASS = 15
FIT_ARGS = ["device=cpu", "precision=fp32", "optim.epochs=4", "stage2.srepr_samples=3"]


@functools.cache
def fashion_mnist(split: str):
    """The real Fashion-MNIST ``split`` ("train" or "test"), read once per session.

    Read lazily, inside the tests that carry ``@pytest.mark.fashion_mnist`` (conftest.py skips or
    fails those without the data); a loader error fails the test, it never turns into a skip.
    """
    return load_fashion_mnist(None, split)


def _file_name(j: int) -> str:
    return ["img {j}.png", "bild_ü_{j}.png", "画像 {j}.png", "x{j}.png"][j % 4].format(j=j)


def write_tree(root: Path, counts: list[int] = COUNTS, seed: int = 0, extras: bool = True) -> None:
    """A long-tailed ImageFolder of Fashion-MNIST train PNGs (``counts[c]`` images of class c).

    ``extras`` adds an RGBA PNG and an odd-sized grayscale JPEG to class 1 (valid), a truncated
    PNG to class 0 and a text file to class 2 (both skipped).
    """
    ds = fashion_mnist("train")
    x, y = ds.images.numpy()[:, 0], ds.labels.numpy()
    rng = np.random.RandomState(seed)
    for c, n in enumerate(counts):
        d = root / CLASSES[c]
        d.mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(rng.permutation(np.flatnonzero(y == c))[:n]):
            Image.fromarray(x[i]).save(d / _file_name(j))
    if not extras:
        return
    img = Image.fromarray(x[np.flatnonzero(y == 1)[-1]])
    rgba = img.convert("RGBA")
    rgba.putalpha(255)
    rgba.save(root / CLASSES[1] / "rgba ïmage.png")
    img.resize((37, 23)).save(root / CLASSES[1] / "odd size.jpg", quality=95)  # grayscale L
    good = (root / CLASSES[0] / _file_name(0)).read_bytes()
    (root / CLASSES[0] / "corrupt ü.png").write_bytes(good[: len(good) // 2])  # truncated
    (root / CLASSES[2] / "notes.txt").write_text("not an image\n")


def write_heldout(root: Path) -> dict[str, str]:
    """Fashion-MNIST *test* images (never trained on), nested folders; ``{path: class}``."""
    ds = fashion_mnist("test")
    x, y = ds.images.numpy()[:, 0], ds.labels.numpy()
    truth = {}
    for c in range(10):
        for j, i in enumerate(np.flatnonzero(y == c)[:HELDOUT_PER_CLASS]):
            d = root / f"batch {j % 3}" / "ñested"
            d.mkdir(parents=True, exist_ok=True)
            p = d / f"test {c}-{j}.png"
            Image.fromarray(x[i]).save(p)
            truth[str(p)] = CLASSES[c]
    (root / "README.txt").write_text("held-out images\n")
    return truth


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@dataclass
class Fitted:
    out: Path  # the fit's --out folder
    tree: Path  # the training ImageFolder
    heldout: Path  # Fashion-MNIST test images, never trained on
    truth: dict[str, str]  # held-out path -> class
    stdout: str  # what `longtail fit` printed
    seconds: float


def fit_tree(base: Path) -> Fitted:
    """One `longtail fit` through the CLI, in process, on a tree written under ``base``."""
    tree = base / "my images"
    write_tree(tree)
    truth = write_heldout(base / "held out")
    out = base / "fit out"
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        # the default bundle: the two-network ensemble (export and predict cover it)
        code = main(["fit", str(tree), "--out", str(out), *FIT_ARGS])
    assert code == 0
    return Fitted(out, tree, base / "held out", truth, buf.getvalue(), time.perf_counter() - t0)

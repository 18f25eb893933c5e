"""``longtail predict`` throughput: torch eager (``model.pt``) vs onnxruntime (``model.onnx``).

    python benchmarks/predict_throughput.py [--bundle FIT_DIR] [--images 2000] [--repeats 3] \
        [--threads 1]

Both runtimes predict the same Fashion-MNIST *test* images, written as 28x28 PNG files, through
:func:`longtail.fit.predict.predict_paths` (decode with threads, batch 64, top-5), so the figures
include decoding; the network alone is also timed on the decoded uint8 batches. Without
``--bundle`` a bundle is fitted first on a small long-tailed Fashion-MNIST folder (4 epochs, as
in the tests; about a minute). Trials alternate between the runtimes; medians are reported.
Both runtimes get ``--threads`` intra-op threads (default 1: on a shared 2-core machine two
spinning threads per runtime run several times slower than one). The last line is
``onnx/torch <ratio>``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image

from longtail.data.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from longtail.fit.bundle import load_bundle
from longtail.fit.onnx_runtime import load_onnx
from longtail.fit.predict import predict_paths
from longtail.fitting import fit


def write_images(root: Path, n: int) -> list[str]:
    """The first ``n`` Fashion-MNIST test images as PNG files; their paths."""
    x = load_fashion_mnist(None, "test").images.numpy()[:n, 0]
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(x):
        p = root / f"{i:05d}.png"
        Image.fromarray(img).save(p)
        paths.append(str(p))
    return paths


def fit_bundle(root: Path) -> Path:
    """A bundle fitted on a long-tailed Fashion-MNIST train folder (120 .. 12 per class)."""
    ds = load_fashion_mnist(None, "train")
    x, y = ds.images.numpy()[:, 0], ds.labels.numpy()
    rng = np.random.RandomState(0)
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        d = root / "train" / name.replace("/", " ")
        d.mkdir(parents=True)
        for j, i in enumerate(rng.permutation(np.flatnonzero(y == c))[: int(120 * 0.1 ** (c / 9))]):
            Image.fromarray(x[i]).save(d / f"{j}.png")
    args = ["device=cpu", "precision=fp32", "optim.epochs=4", "loss.mixup_alpha=0.2"]
    args += ["stage2.srepr_samples=3"]
    with contextlib.redirect_stdout(io.StringIO()):
        fit(root / "train", root / "fit", overrides=args)
    return root / "fit"


def time_predict(model, paths: list[str], batch: int) -> float:
    """Images per second of predict_paths over ``paths`` (decode + network + top-5)."""
    t0 = time.perf_counter()
    n = sum(1 for _ in predict_paths(model, paths, top_k=5, batch_size=batch, progress=False))
    return n / (time.perf_counter() - t0)


def time_network(model, batches: list[np.ndarray]) -> float:
    """Images per second of the network alone on decoded uint8 batches."""
    t0 = time.perf_counter()
    n = sum(len(model.predict_uint8(b)) for b in batches)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bundle", default=None, help="a `longtail fit` --out folder")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of both runtimes")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="predict-throughput-"))
    paths = write_images(tmp / "images", a.images)
    bundle = Path(a.bundle) if a.bundle else fit_bundle(tmp)
    models = {"torch": load_bundle(bundle), "onnx": load_onnx(bundle, threads=a.threads)}
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime "
        f"{ort.__version__}; {len(paths)} images, batch {a.batch_size}; bundle {bundle} "
        f"({models['torch'].meta['spec']['backbone']}, head {models['torch'].meta['method']})"
    )
    m = models["torch"]
    pix = np.stack([np.asarray(m.decode(p)) for p in paths])
    batches = [pix[i : i + a.batch_size] for i in range(0, len(pix), a.batch_size)]
    diff = np.abs(models["onnx"].predict_uint8(pix) - m.predict_uint8(pix)).max()
    print(f"max |p_onnx - p_torch| on the {len(pix)} images: {diff:.2g}")
    for rt in models:  # warm-up: allocator, onnxruntime's first-run planning, page cache
        time_network(models[rt], batches[:2])
    runs: dict[str, dict[str, list[float]]] = {rt: {"predict": [], "network": []} for rt in models}
    for trial in range(1, a.repeats + 1):
        for rt, model in models.items():
            runs[rt]["predict"].append(time_predict(model, paths, a.batch_size))
            runs[rt]["network"].append(time_network(model, batches))
            print(
                f"trial {trial} {rt:5s}: predict {runs[rt]['predict'][-1]:8.1f} img/s, "
                f"network only {runs[rt]['network'][-1]:8.1f} img/s"
            )
    med = {rt: {k: statistics.median(v) for k, v in r.items()} for rt, r in runs.items()}
    for rt in models:
        print(
            f"{rt} (median): predict {med[rt]['predict']:.1f} img/s, network only "
            f"{med[rt]['network']:.1f} img/s"
        )
    print(f"onnx/torch {med['onnx']['predict'] / med['torch']['predict']:.2f}")


if __name__ == "__main__":
    main()

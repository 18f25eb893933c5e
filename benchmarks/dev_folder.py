"""A development folder: Fashion-MNIST training images that no benchmark fit trains on.

    python benchmarks/dev_folder.py DEV_DIR [--per-class 300] [--seed 12345]
        [--folders 1000:50:0,1,2,3,4 500:100:0,1,2]

``benchmarks/fit_folder.py`` draws each seed's long-tailed train folder from the Fashion-MNIST
*training* set (``--n-max``, ``--imbalance``, ``--seeds``) and tests on the Fashion-MNIST *test*
set. A rule of ``longtail fit`` (how the search weighs its hold-out, say) should be judged on
images that are neither: this script writes ``--per-class`` training images per class that none
of the ``--folders`` (``N_MAX:IMBALANCE:SEEDS``, the benchmark's folders) contains, as
``DEV_DIR/<class>/<i>.png``, drawn with ``--seed``. ``benchmarks/search_candidates.py DEV_DIR
FIT_DIR ...`` then scores every candidate of those fits on it; docs/RESULTS.md (issue 19, "The
search's default stands within two sds") used the defaults.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from fit_folder import CLASSES, _write_pngs, train_indices
from longtail.data.datasets import load_fashion_mnist


def used_by(labels: np.ndarray, folders: list[tuple[int, float, list[int]]]) -> np.ndarray:
    """``(N,)`` bool: which training images (``labels`` ``(N,)``) the benchmark's folders hold,
    each ``(n_max, imbalance, seeds)`` drawn by ``fit_folder.train_indices``."""
    used = np.zeros(len(labels), bool)
    for n_max, imbalance, seeds in folders:
        for s in seeds:
            used[train_indices(labels, n_max=n_max, imbalance=imbalance, seed=s)] = True
    return used


def parse_folder(text: str) -> tuple[int, float, list[int]]:
    """``"1000:50:0,1,2"`` -> ``(1000, 50.0, [0, 1, 2])``."""
    try:
        n_max, imbalance, seeds = text.split(":")
        return int(n_max), float(imbalance), [int(s) for s in seeds.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--folders {text!r}: expected N_MAX:IMBALANCE:SEEDS, e.g. 1000:50:0,1,2"
        ) from None


def main() -> None:
    """Parse the arguments and write the folder (it must not exist yet)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dev_dir", type=Path)
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument(
        "--folders",
        type=parse_folder,
        nargs="+",
        default=[(1000, 50.0, [0, 1, 2, 3, 4]), (500, 100.0, [0, 1, 2])],
    )
    a = p.parse_args()
    if a.dev_dir.exists():
        raise SystemExit(f"{a.dev_dir} exists: give a new folder (nothing was written)")
    tr = load_fashion_mnist(None, "train")
    x, y = tr.images.squeeze(1).numpy(), np.asarray(tr.labels)
    free = ~used_by(y, a.folders)
    rng = np.random.default_rng(a.seed)
    idx = []
    for c in range(len(CLASSES)):
        pool = np.flatnonzero((y == c) & free)
        if len(pool) < a.per_class:
            raise SystemExit(
                f"class {CLASSES[c]}: {len(pool)} unused training images, fewer than "
                f"--per-class {a.per_class}: ask for fewer"
            )
        idx.append(rng.permutation(pool)[: a.per_class])
    idx = np.concatenate(idx)
    _write_pngs(x[idx], y[idx], a.dev_dir)
    print(f"{a.dev_dir}: {len(idx)} images, none of the {int((~free).sum())} the folders use")


if __name__ == "__main__":
    main()

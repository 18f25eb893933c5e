"""Every shipped full-scale recipe runs a few steps on tiny data in its dataset's genuine format.

CIFAR: python pickles (``cifar-10-batches-py``, ``cifar-100-python``); ImageNet-LT and
Places-LT: JPEG trees with ``<Stem>_{train,val,test}.txt`` list files; iNaturalist-2018: the
original ``train2018.json`` / ``val2018.json``. The recipe's own backbone is used (ResNeXt-50,
ResNet-152, ResNet-50), shrunk only in image size, batch, epochs and workers.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from longtail.classify.run import classify
from longtail.config import load_config
from longtail.train.loop import Stage1

TINY = [
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "swa.start=0",
    "swa.anneal_epochs=0.5",
    "swa.every_steps=1",
    "swa.swag_rank=2",
    "stage2.epochs=1",
    "stage2.lws_epochs=1",
    "precision=fp32",
    "stage2.srepr_samples=2",
    "stage2.srepr_epochs=1",
    "stage2.srepr_alpha_grid=[0.5]",
    "stage2.srepr_bn_images=8",
]
FILES = [
    "optim.batch_size=4",
    "data.image_size=32",
    "data.num_workers=0",
    "swa.bn_batches=2",
    "data.val_per_class=1",
]
RNG = np.random.default_rng(0)


def _pickle(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar(root: Path, classes: int, train_per_class: int, test_per_class: int) -> None:
    def batch(n: int, key: bytes) -> dict:
        labels = np.repeat(np.arange(classes), n).tolist()
        data = RNG.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        return {b"data": data, key: labels, b"batch_label": b"tiny"}

    if classes == 10:
        base = root / "cifar-10-batches-py"
        base.mkdir()
        per = train_per_class // 5
        for i in range(1, 6):
            _pickle(batch(per, b"labels"), base / f"data_batch_{i}")
        _pickle(batch(test_per_class, b"labels"), base / "test_batch")
        _pickle({b"label_names": [b"c%d" % i for i in range(10)]}, base / "batches.meta")
    else:
        base = root / "cifar-100-python"
        base.mkdir()
        _pickle(batch(train_per_class, b"fine_labels"), base / "train")
        _pickle(batch(test_per_class, b"fine_labels"), base / "test")
        _pickle({b"fine_label_names": [b"f%d" % i for i in range(100)]}, base / "meta")


def _jpeg(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path, "JPEG")
    return path.as_posix()


def _lists(root: Path, stem: str, sizes: dict[str, int], classes: int = 4) -> None:
    for split, n in sizes.items():
        lines = []
        for c in range(classes):
            for i in range(max(1, n - c)):  # a small long tail
                rel = f"{split}/n{c:08d}/img_{i}.JPEG"
                _jpeg(root / rel)
                lines.append(f"{rel} {c}")
        (root / f"{stem}_{split}.txt").write_text("\n".join(lines) + "\n")


def _inat(root: Path) -> None:
    for split, n in (("train", 6), ("val", 2)):
        images, anns = [], []
        for c in range(4):
            for i in range(max(1, n - c)):
                rel = f"train_val2018/Plantae/{c}/{split}_{i}.jpg"
                _jpeg(root / rel)
                images.append({"id": len(images), "file_name": rel, "width": 48, "height": 40})
                anns.append({"id": len(anns), "image_id": len(anns), "category_id": c})
        cats = [{"id": c, "name": f"species {c}"} for c in range(4)]
        doc = {"images": images, "annotations": anns, "categories": cats}
        (root / f"{split}2018.json").write_text(json.dumps(doc))


CASES = {
    "cifar10_lt": (
        lambda r: _cifar(r, 10, 10, 2),
        ["data.imbalance=2", "data.val_per_class=1", "optim.batch_size=16"],
    ),
    "cifar100_lt": (
        lambda r: _cifar(r, 100, 3, 1),
        ["data.imbalance=1", "data.val_per_class=1", "optim.batch_size=32"],
    ),
    "imagenet_lt": (lambda r: _lists(r, "ImageNet_LT", {"train": 6, "val": 2, "test": 2}), FILES),
    "places_lt": (lambda r: _lists(r, "Places_LT", {"train": 6, "val": 2, "test": 2}), FILES),
    "inat2018": (_inat, FILES),
}


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_recipe_runs_a_few_steps_on_genuine_format(recipe: str, tmp_path: Path) -> None:
    make, extra = CASES[recipe]
    data = tmp_path / "data"
    data.mkdir()
    make(data)
    cfg = load_config(recipe, [f"data.root={data}", *TINY, *extra])
    run = tmp_path / "run"
    stage1 = Stage1(cfg, run).fit()
    assert set(stage1) >= {"final", "swa"}
    assert 0.0 <= stage1["swa"]["accuracy"] <= 1.0 and np.isfinite(stage1["swa"]["nll"])
    rows = (run / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 2 and int(rows[1].split(",")[1]) >= 1  # one epoch, >= 1 step
    res = classify(run, ["joint", "ncm", "crt", "srepr"], log=lambda *_: None)
    assert set(res["methods"]) >= {"joint", "ncm", "crt", "srepr", "swag_bma"}
    assert len(res["train_counts"]) == len(res["methods"]["crt"]["per_class"])

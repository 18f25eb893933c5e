"""`longtail fit` + `longtail predict` on a small long-tailed folder of PNG photos.

    python benchmarks/fit_folder.py --work /tmp/if50 --imbalance 50 --n-max 1000 --seeds 0 1 2
    python benchmarks/fit_folder.py --work /tmp/if100 --imbalance 100 --n-max 500 --seeds 0 1 2
    python benchmarks/fit_folder.py --work /tmp/if50 --compare before after   # tables, no run

Builds, per seed, what a practitioner brings to ``fit``: a folder ``train/<class>/<i>.png`` of
Fashion-MNIST training images with a long-tailed profile (``n_c = floor(n_max * IF^(-c/9))``,
class 0 the largest; ``--n-max 1000 --imbalance 50`` gives 2,795 images, 20 in the rarest class;
the subset drawn with the seed), and a balanced test folder of ``--test-per-class`` images per
class from the Fashion-MNIST *test* set (the same for every seed). It then runs, as a user would,
``longtail fit train --out FIT seed=SEED [--fit-arg ...]`` and ``longtail predict FIT test
--format csv``, and scores the CSV: balanced accuracy (mean of per-class accuracies), per-class
accuracy, top-1 ECE (15 equal-width bins of the predicted probability) and the wall time of each
command; for an ensemble bundle, also each of its networks alone (the same fit, so the
comparison is paired). One JSON per seed in ``--work`` and a summary (mean +- std over seeds)
on stdout.
``--compare TAG [TAG ...]`` runs nothing: it reads those JSONs and prints, per tag, the Markdown
rows of docs/RESULTS.md (mean +- sample std over the seeds, :func:`longtail.evaluate.results.
mean_std`; per-class accuracy; the methods chosen).

The ``longtail`` that runs is the one Python imports (``PYTHONPATH=OTHER_CHECKOUT/src`` measures
another revision with this script). Needs the Debian package ``dataset-fashion-mnist``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from longtail.data.datasets import load_fashion_mnist
from longtail.data.longtail import longtail_counts
from longtail.evaluate.results import mean_std
from longtail.evaluate.tables import Table, render_markdown

CLASSES = [
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
]


def _write_pngs(images: np.ndarray, labels: np.ndarray, root: Path) -> None:
    """``images`` ``(N, 28, 28)`` uint8, ``labels`` ``(N,)`` -> ``root/<class>/<i>.png``."""
    tmp = root.with_name(root.name + ".tmp")
    for i, (x, y) in enumerate(zip(images, labels, strict=True)):
        d = tmp / CLASSES[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(x).save(d / f"{i:05d}.png")
    tmp.rename(root)


def train_indices(labels: np.ndarray, *, n_max: int, imbalance: float, seed: int) -> np.ndarray:
    """Indices into the training set (``labels`` ``(N,)``) of ``seed``'s long-tailed subset:
    ``longtail_counts(n_max, 10, imbalance)`` images per class, drawn with ``seed``."""
    counts = longtail_counts(n_max, len(CLASSES), imbalance)
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [rng.permutation(np.flatnonzero(labels == c))[:n] for c, n in enumerate(counts)]
    )


def build_folders(work: Path, *, n_max: int, imbalance: float, seed: int, test_per_class: int):
    """The long-tailed train folder for ``seed`` and the shared balanced test folder."""
    train_dir = work / f"train-seed{seed}"
    test_dir = work / "test"
    if not test_dir.exists():
        te = load_fashion_mnist(None, "test")
        x, y = te.images.squeeze(1).numpy(), np.asarray(te.labels)
        idx = np.concatenate([np.flatnonzero(y == c)[:test_per_class] for c in range(len(CLASSES))])
        _write_pngs(x[idx], y[idx], test_dir)
    if not train_dir.exists():
        tr = load_fashion_mnist(None, "train")
        x, y = tr.images.squeeze(1).numpy(), np.asarray(tr.labels)
        idx = train_indices(y, n_max=n_max, imbalance=imbalance, seed=seed)
        _write_pngs(x[idx], y[idx], train_dir)
    return train_dir, test_dir


def top1_ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error of the top-1 probability ``conf`` ``(N,)``, a fraction."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def score_predictions(pred: np.ndarray, conf: np.ndarray, truth: np.ndarray) -> dict:
    """Balanced accuracy, per-class accuracy and ECE of predicted classes ``pred`` ``(N,)`` with
    their probabilities ``conf`` ``(N,)`` against ``truth`` ``(N,)`` (indices into CLASSES)."""
    per_class = [float((pred[truth == c] == c).mean()) for c in range(len(CLASSES))]
    return {
        "balanced_accuracy": float(np.mean(per_class)),
        "per_class": per_class,
        "ece": top1_ece(conf, pred == truth),
    }


def score_csv(text: str) -> dict:
    """:func:`score_predictions` of ``longtail predict --format csv``, and ``n_test``."""
    rows = list(csv.DictReader(text.splitlines()))
    truth = np.array([CLASSES.index(Path(r["path"]).parent.name) for r in rows])
    pred = np.array([CLASSES.index(r["label"]) for r in rows])
    conf = np.array([float(r["probability"]) for r in rows])
    return {**score_predictions(pred, conf, truth), "n_test": len(rows)}


def score_probabilities(prob: np.ndarray, truth: np.ndarray) -> dict:
    """:func:`score_predictions` of probabilities ``(N, K)`` (columns in CLASSES' order)."""
    return score_predictions(prob.argmax(1), prob.max(1), truth)


def test_images(bundle, test_dir: Path) -> tuple:
    """The test folder as a bundle sees it: images ``(N, C, S, S)`` in [0, 1], decoded by
    ``bundle`` (a loaded ``longtail fit`` bundle), and their labels ``(N,)`` as indices into
    CLASSES (the folder names)."""
    import torch

    from longtail.fit.images import list_image_inputs

    paths = list_image_inputs([str(test_dir)])
    truth = np.array([CLASSES.index(Path(q).parent.name) for q in paths])
    return torch.stack([bundle.decode(q) for q in paths]).float().div(255.0), truth


def scoring_args(doc: str, fits: str) -> tuple:
    """The command line of a script that scores ``longtail fit`` folders on the test folder
    (``TEST_DIR FIT_DIR [FIT_DIR ...] [--json OUT]``; ``doc``'s first line describes it, ``fits``
    the folders it wants): the parsed arguments and :func:`test_images` through the first fit's
    bundle."""
    from longtail.fit.bundle import load_bundle

    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("test_dir", type=Path, help="class subfolders of test images")
    p.add_argument("fit_dirs", type=Path, nargs="+", help=fits)
    p.add_argument("--json", type=Path, help="also write every figure here")
    a = p.parse_args()
    return (a, *test_images(load_bundle(a.fit_dirs[0] / "bundle"), a.test_dir))


def raw_logits(net, x):
    """Un-tempered logits ``(N, K)`` of a deployed network (``DeployedClassifier``: its
    ``logits`` divided by its ``temperature``) on images ``x`` ``(N, C, S, S)`` in [0, 1],
    256 at a time, without autograd."""
    import torch

    with torch.no_grad():
        return torch.cat([net.logits(c) for c in x.split(256)]) * net.temperature


def score_members(bundle_dir: Path, test_dir: Path, expect: float) -> dict:
    """Each network of an ensemble bundle scored alone on the test folder (``{}`` for a single
    network): ``{member name: score_probabilities(...)}``, names from ``bundle.json``; exits
    unless the members' mean probabilities score ``expect`` (the balanced accuracy of
    ``longtail predict``'s CSV)."""
    import torch

    from longtail.fit.bundle import load_bundle, members

    b = load_bundle(bundle_dir)
    nets = members(b.model)
    if len(nets) < 2:
        return {}
    x, truth = test_images(b, test_dir)
    names = b.meta.get("ensemble") or [f"member {i}" for i in range(len(nets))]
    # the bundle's class order (its folder names, sorted) -> CLASSES' order
    order = [b.meta["classes"].index(c) for c in CLASSES]
    probs = [torch.softmax(raw_logits(m, x) / m.temperature, 1)[:, order].numpy() for m in nets]
    whole = score_probabilities(np.mean(probs, axis=0), truth)["balanced_accuracy"]
    if abs(whole - expect) > 1e-3:  # a check of this scoring against `longtail predict`'s
        raise SystemExit(f"members' mean scores {whole:.4f}, longtail predict {expect:.4f}")
    return {n: score_probabilities(p, truth) for n, p in zip(names, probs, strict=True)}


def run_seed(a: argparse.Namespace, seed: int) -> dict:
    """Build the folders, fit, predict and score one seed."""
    train_dir, test_dir = build_folders(
        a.work, n_max=a.n_max, imbalance=a.imbalance, seed=seed, test_per_class=a.test_per_class
    )
    out = a.work / f"fit-{a.tag}-seed{seed}"
    if out.exists():
        raise SystemExit(f"{out} exists: remove it or pick another --tag")
    lt = [sys.executable, "-m", "longtail"]
    t0 = time.perf_counter()
    subprocess.run(
        [*lt, "fit", str(train_dir), "--out", str(out), f"seed={seed}", *a.fit_arg], check=True
    )
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    p = subprocess.run(
        [*lt, "predict", str(out), str(test_dir), "--format", "csv"],
        check=True,
        capture_output=True,
        text=True,
    )
    result = {
        "seed": seed,
        "tag": a.tag,
        "fit_args": a.fit_arg,
        "n_max": a.n_max,
        "imbalance": a.imbalance,
        "fit_seconds": fit_s,
        "predict_seconds": time.perf_counter() - t0,
        **score_csv(p.stdout),
    }
    members = score_members(out / "bundle", test_dir, result["balanced_accuracy"])
    if members:
        result["members"] = members
    fit_json = out / "fit.json"
    if fit_json.exists():
        result["chosen"] = json.loads(fit_json.read_text()).get("chosen")
    (a.work / f"result-{a.tag}-seed{seed}.json").write_text(json.dumps(result, indent=1))
    return result


def _pm(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    m = mean_std(scale * v for v in values)
    if m is None:
        return "-"
    return f"{m.mean:.{digits}f}" + ("" if m.std is None else f" ± {m.std:.{digits}f}")


def _chosen(work: Path, tag: str, result: dict) -> str:
    """``method recipe`` of one seed's fit (``+mirror`` when the bundle averages mirror images),
    from its fit.json; the method alone for fits without a recipe search or a fit.json."""
    f = work / f"fit-{tag}-seed{result['seed']}" / "fit.json"
    if not f.is_file():
        return str(result.get("chosen"))
    fit = json.loads(f.read_text())
    mirror = (fit.get("mirror") or {}).get("used")
    recipe = fit.get("recipe", "")
    recipe = "" if " " in recipe else f" {recipe}"  # before the search: a sentence, not a name
    return f"{fit['chosen']}{recipe}" + (" +mirror" if mirror else "")


def compare(work: Path, tags: list[str]) -> str:
    """Markdown tables of the saved results of ``tags`` in ``work`` (seeds in file order)."""
    runs = {
        t: [json.loads(f.read_text()) for f in sorted(work.glob(f"result-{t}-seed*.json"))]
        for t in tags
    }
    missing = [t for t, r in runs.items() if not r]
    if missing:
        raise SystemExit(f"no result-<tag>-seed*.json in {work} for {', '.join(missing)}")
    head = ["tag", "seeds", "balanced acc %", "per seed", "ECE %", "fit s", "chosen"]
    rows = [
        [
            t,
            " ".join(str(r["seed"]) for r in rs),
            _pm([r["balanced_accuracy"] for r in rs]),
            ", ".join(f"{100 * r['balanced_accuracy']:.2f}" for r in rs),
            _pm([r["ece"] for r in rs]),
            _pm([r["fit_seconds"] for r in rs], 1.0, 0),
            ", ".join(_chosen(work, t, r) for r in rs),
        ]
        for t, rs in runs.items()
    ]
    for t, rs in runs.items():  # an ensemble's networks alone, from the same fits
        for name in rs[0].get("members", {}):
            ms = [r["members"][name] for r in rs]
            rows.append(
                [
                    f"{t}: {name} alone",
                    " ".join(str(r["seed"]) for r in rs),
                    _pm([m["balanced_accuracy"] for m in ms]),
                    ", ".join(f"{100 * m['balanced_accuracy']:.2f}" for m in ms),
                    _pm([m["ece"] for m in ms]),
                    "",
                    "",
                ]
            )
    per_class = [
        [t] + [_pm([r["per_class"][c] for r in rs], digits=1) for c in range(len(CLASSES))]
        for t, rs in runs.items()
    ]
    n = [sum(1 for _ in (work / "train-seed0" / c).iterdir()) for c in CLASSES]
    cls = [f"{c} ({k})" for c, k in zip(CLASSES, n, strict=True)]
    return "\n".join(
        render_markdown(Table.plain(head, rows))
        + ["", "per-class test accuracy %, mean ± sd over the seeds (training images, seed 0):", ""]
        + render_markdown(Table.plain(["tag", *cls], per_class))
    )


def main() -> None:
    """Parse the arguments, run every seed and print the summary."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="folder for images, fits, results")
    p.add_argument("--n-max", type=int, default=1000)
    p.add_argument("--imbalance", type=float, default=50.0)
    p.add_argument("--test-per-class", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--tag", default="default", help="names this configuration's outputs")
    p.add_argument("--fit-arg", action="append", default=[], help="extra `longtail fit` argument")
    p.add_argument("--compare", nargs="+", metavar="TAG", help="print saved results; run nothing")
    a = p.parse_args()
    if a.compare:
        print(compare(a.work, a.compare))
        return
    a.work.mkdir(parents=True, exist_ok=True)
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    cpu = next(
        (ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")),
        platform.processor(),
    )
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {cpu}, {os.cpu_count()} cores, tag {a.tag}")
    results = [run_seed(a, s) for s in a.seeds]
    for r in results:
        pc = " ".join(f"{100 * v:.0f}" for v in r["per_class"])
        print(
            f"seed {r['seed']}: balanced acc {100 * r['balanced_accuracy']:.2f} %, ECE "
            f"{100 * r['ece']:.2f} %, fit {r['fit_seconds']:.0f} s, predict "
            f"{r['predict_seconds']:.0f} s, chosen {r.get('chosen')}; per class {pc}"
        )
        for name, m in r.get("members", {}).items():
            print(
                f"  {name} alone: balanced acc {100 * m['balanced_accuracy']:.2f} %, "
                f"ECE {100 * m['ece']:.2f} %"
            )

    def ms(key: str, scale: float = 100.0) -> str:
        v = [scale * r[key] for r in results]
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        return f"{statistics.mean(v):.2f} +- {sd:.2f}"

    print(
        f"mean over {len(results)} seed(s): balanced acc {ms('balanced_accuracy')} %, ECE "
        f"{ms('ece')} %, fit {ms('fit_seconds', 1.0)} s"
    )


if __name__ == "__main__":
    main()

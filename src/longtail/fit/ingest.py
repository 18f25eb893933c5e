"""The data step of ``longtail fit``: from a user's folder or CSV to the ``user`` dataset.

Reads the candidates (:mod:`longtail.fit.sources`), drops the files PIL cannot read (listed, or
an error with ``strict``), excludes classes with fewer than 2 usable images (reported; an error
when fewer than 2 classes remain), holds out a stratified test split and a class-balanced
validation split unless the user gave them, decodes small images once, and writes
``OUT/{train,val,test}.pt`` (:mod:`longtail.data.user`) for stages 1 and 2.

Split rules: test = ``floor(0.2 n_c)`` images of each class ``c`` (stratified); validation =
``min(20, floor(0.2 n'_c))`` of what is left (:func:`longtail.data.prepare.balanced_holdout`,
the hold-out the project uses for natively long-tailed data); the rest trains. A class needs 5
images to lend one to test and 7 to lend one to validation as well.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from longtail.core.errors import LongtailError
from longtail.data.datasets import IMAGENET_MEAN, IMAGENET_STD, ImageDataset, channel_stats
from longtail.data.longtail import imbalance_factor
from longtail.data.prepare import balanced_holdout
from longtail.data.shots import shot_splits
from longtail.data.user import save_user_split
from longtail.fit.images import (
    BadFile,
    Header,
    Preprocessing,
    decode,
    parallel_map,
    read_header,
    verify,
)
from longtail.fit.plan import InputPlan, plan_input
from longtail.fit.sources import LabelledFiles, class_names, read_source

TEST_FRACTION = 0.2
VAL_PER_CLASS = 20
MIN_IMAGES = 2
SHOW_SKIPPED = 20


@dataclass
class UserData:
    """The materialised data of one fit.

    Attributes:
        root: the folder holding ``train.pt``, ``val.pt``, ``test.pt`` (``data.root``).
        classes: class names of the trained classes, index = label.
        plan: the input plan; ``preprocessing``: the resize / normalisation rule.
        splits: ``{"train", "val", "test"}`` -> :class:`ImageDataset`.
        skipped: files that are not readable images, with the reason.
        excluded: classes left out (name -> usable images).
        origins: how each split was made (``"given: PATH"`` or the hold-out rule).
    """

    root: Path
    classes: list[str]
    plan: InputPlan
    preprocessing: Preprocessing
    splits: dict[str, ImageDataset]
    skipped: list[BadFile] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-ready description (written to ``ROOT/meta.json``)."""
        return {
            "classes": self.classes,
            "sizes": {k: len(v) for k, v in self.splits.items()},
            "train_counts": self.splits["train"].counts().tolist(),
            "origins": self.origins,
            "excluded_classes": self.excluded,
            "skipped": [{"path": b.path, "reason": b.reason} for b in self.skipped],
            "preprocessing": self.preprocessing.to_json(),
            "in_memory": self.plan.in_memory,
            "input_plan": self.plan.reasons,
        }


def profile_lines(
    counts: np.ndarray, classes: list[str], many: int = 100, few: int = 20
) -> list[str]:
    """The class-count profile: imbalance factor, shot splits, per-class counts (largest first).

    Args:
        counts: ``(C,)`` images per class.
        classes: the ``C`` class names.
    """
    counts = np.asarray(counts)
    order = np.argsort(-counts, kind="stable")
    sizes = shot_splits(counts, many, few).sizes()
    lines = [
        f"{len(classes)} classes, {int(counts.sum()):,} images; imbalance factor "
        f"{imbalance_factor(counts):.3g} (largest {classes[order[0]]!r} {int(counts[order[0]])}, "
        f"smallest {classes[order[-1]]!r} {int(counts[order[-1]])})",
        f"shot splits: many (> {many}) {sizes['many']}, medium {sizes['medium']}, few (< {few}) "
        f"{sizes['few']} classes",
    ]
    width = max(len(c) for c in classes)
    top = int(counts.max()) or 1
    for i in order:
        bar = "#" * max(1, round(30 * counts[i] / top)) if counts[i] else ""
        lines.append(f"  {classes[i]:<{width}} {int(counts[i]):>7,} {bar}")
    return lines


def _scan(
    files: LabelledFiles, what: str, workers: int
) -> tuple[list[int], list[Header], list[BadFile]]:
    """Header pass: indices and headers of the candidates PIL can open, and the others."""
    good, headers, bad = [], [], []
    it = parallel_map(read_header, files.paths, workers)
    for i, h in enumerate(
        tqdm(it, total=len(files.paths), desc=f"reading {what}", leave=False, disable=None)
    ):
        if isinstance(h, BadFile):
            bad.append(h)
        else:
            good.append(i)
            headers.append(h)
    return good, headers, bad


def _decode_all(
    paths: list[str], prep: Preprocessing, in_memory: bool, what: str, workers: int
) -> tuple[list[int], torch.Tensor | None, list[BadFile]]:
    """Decode pass: indices of readable files, their pixels (in memory) and the failures."""
    tf = prep.transform()

    def one(p: str) -> torch.Tensor | BadFile | None:
        return decode(p, prep, tf) if in_memory else verify(p, prep.channels)

    ok, pixels, bad = [], [], []
    it = parallel_map(one, paths, workers)
    for i, r in enumerate(
        tqdm(it, total=len(paths), desc=f"decoding {what}", leave=False, disable=None)
    ):
        if isinstance(r, BadFile):
            bad.append(r)
            continue
        ok.append(i)
        if in_memory:
            pixels.append(r)
    if in_memory:
        c, s = prep.channels, prep.size
        images = torch.stack(pixels) if pixels else torch.zeros(0, c, s, s, dtype=torch.uint8)
        return ok, images, bad
    return ok, None, bad


@dataclass
class _Pool:
    """The readable images of one source: paths, class names, pixels (in memory)."""

    paths: list[str]
    names: list[str]
    images: torch.Tensor | None


def _read(
    files: LabelledFiles, what: str, headers_out: list[Header] | None, workers: int
) -> tuple[list[int], list[BadFile]]:
    """Header pass over one source; the non-candidates it listed count as skipped too."""
    good, headers, bad = _scan(files, what, workers)
    if headers_out is not None:
        headers_out += headers
    return good, [BadFile(p, r) for p, r in files.skipped] + bad


def _map_names(names: list[str], classes: list[str], what: str, dropped: set[str]) -> np.ndarray:
    """Labels of ``names`` in ``classes``, -1 for a ``dropped`` class; unknown names raise."""
    index = {c: i for i, c in enumerate(classes)}
    for c in classes:  # integer-looking names also match canonically (007 == 7)
        if c.isdecimal():
            index.setdefault(str(int(c)), index[c])
    out, unknown = [], set()
    for n in names:
        key = str(int(n)) if n not in index and n.isdecimal() else n
        if key in index:
            out.append(index[key])
        else:
            out.append(-1)
            if n not in dropped:
                unknown.add(n)
    if unknown:
        raise LongtailError(
            f"the {what} split has classes the training data lacks: "
            f"{', '.join(sorted(unknown)[:10])}; training classes: {', '.join(classes[:20])}"
        )
    return np.asarray(out, dtype=np.int64)


def _stratified_test(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(rest, test)`` indices: ``floor(fraction * n_c)`` of each class to test."""
    rng = np.random.RandomState(seed)
    rest, test = [], []
    for c in range(int(labels.max()) + 1):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(len(idx) * fraction)
        test.append(idx[:k])
        rest.append(idx[k:])
    return np.concatenate(rest), np.concatenate(test)


def _stats(images: torch.Tensor | None, channels: int) -> tuple[tuple, tuple]:
    if images is not None and len(images):
        return channel_stats(images)
    if channels == 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return (float(np.mean(IMAGENET_MEAN)),), (float(np.mean(IMAGENET_STD)),)


def _skipped_lines(skipped: list[BadFile]) -> list[str]:
    lines = [f"  {b.path}: {b.reason}" for b in skipped[:SHOW_SKIPPED]]
    if len(skipped) > SHOW_SKIPPED:
        lines.append(f"  ... and {len(skipped) - SHOW_SKIPPED} more (all in skipped.txt)")
    return lines


def read_user_data(
    train: str | os.PathLike,
    out: str | os.PathLike,
    *,
    val: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    image_size: int | None = None,
    weights_path: str | None = None,
    model: str | None = None,
    strict: bool = False,
    seed: int = 0,
    test_fraction: float = TEST_FRACTION,
    val_per_class: int = VAL_PER_CLASS,
    many: int = 100,
    few: int = 20,
    workers: int = 0,
    log: Callable[[str], None] = print,
) -> UserData:
    """Read, check, split and decode a user's data, writing nothing (:func:`save_user_data`
    materialises the result; :func:`prepare_user_data` does both).

    Args:
        train: ImageFolder tree or CSV / list file with the training images (and, unless
            ``val`` / ``test`` are given, the images held out for validation and test).
        out: the folder the data will be saved in (``UserData.root``); not touched here.
        val, test: the user's own validation / test data (same formats), optional.
        image_size, weights_path, model: see :func:`longtail.fit.plan.plan_input`.
        strict: fail on the first unreadable or non-image file instead of skipping it.
        seed: seed of the hold-outs.
        workers: decoding threads (0: up to 4).
        log: where progress lines go.

    Raises:
        LongtailError: unreadable files under ``strict``; fewer than 2 classes with 2 or more
            images; a validation / test class unknown to training; empty validation or test.
    """
    out = Path(out)
    sources = {"train": read_source(train)}
    if val is not None:
        sources["val"] = read_source(val)
    if test is not None:
        sources["test"] = read_source(test)
    headers: list[Header] = []
    good: dict[str, list[int]] = {}
    skipped: list[BadFile] = []
    for what, files in sources.items():
        g, bad = _read(files, what, headers if what == "train" else None, workers)
        good[what] = g
        skipped += bad
    if strict and skipped:
        raise LongtailError(
            f"{len(skipped)} file(s) are not readable images (--strict): "
            + "; ".join(f"{b.path} ({b.reason})" for b in skipped[:5])
            + (" ..." if len(skipped) > 5 else "")
        )
    plan = plan_input(headers, image_size, weights_path, model)
    log("input: " + "; ".join(plan.reasons))
    prep0 = Preprocessing(plan.size, plan.channels, plan.resize_to, (0.0,), (1.0,))

    pools: dict[str, _Pool] = {}
    for what, files in sources.items():
        paths = [files.paths[i] for i in good[what]]
        ok, images, bad = _decode_all(paths, prep0, plan.in_memory, what, workers)
        if strict and bad:
            raise LongtailError(
                f"{len(bad)} file(s) are not readable images (--strict): "
                + "; ".join(f"{b.path} ({b.reason})" for b in bad[:5])
            )
        skipped += bad
        all_names, _ = class_names(files)
        names = [all_names[good[what][i]] for i in ok]
        pools[what] = _Pool([paths[i] for i in ok], names, images)
    if skipped:
        log(f"skipped {len(skipped)} file(s) that are not readable images:")
        for line in _skipped_lines(skipped):
            log(line)

    # classes: every class the training source names; those with < 2 usable images go
    _, candidates = class_names(sources["train"])
    usable = {c: 0 for c in candidates}
    for n in pools["train"].names:
        usable[n] += 1
    excluded = {c: k for c, k in usable.items() if k < MIN_IMAGES}
    classes = [c for c in candidates if c not in excluded]
    for c, k in excluded.items():
        log(
            f"excluded class {c!r}: {k} usable image(s), a class needs at least {MIN_IMAGES} "
            "(one to train on, one more to hold out or compare with)"
        )
    if len(classes) < 2:
        raise LongtailError(
            f"only {len(classes)} class(es) have {MIN_IMAGES} or more usable images "
            f"({', '.join(f'{c}: {k}' for c, k in usable.items())}); a classifier needs 2"
        )
    labels = {what: _map_names(p.names, classes, what, set(excluded)) for what, p in pools.items()}
    for what in ("val", "test"):
        if what in pools and (labels[what] < 0).any():
            log(f"{what}: dropped {int((labels[what] < 0).sum())} image(s) of excluded classes")
    keep = np.flatnonzero(labels["train"] >= 0)  # indices into pools["train"]
    y = labels["train"][keep]
    log("class-count profile of the usable training-source images:")
    for line in profile_lines(np.bincount(y, minlength=len(classes)), classes, many, few):
        log("  " + line)

    # hold-outs, as (pool, index array) per split
    chosen: dict[str, tuple[str, np.ndarray]] = {}
    origins = {"train": f"{sources['train'].origin}: {sources['train'].source}"}
    rest = np.arange(len(keep))
    if "test" in pools:
        chosen["test"] = ("test", np.flatnonzero(labels["test"] >= 0))
        origins["test"] = f"given: {sources['test'].source}"
    else:
        rest, t_idx = _stratified_test(y, test_fraction, seed)
        chosen["test"] = ("train", keep[np.sort(t_idx)])
        origins["test"] = f"held out from train: floor({test_fraction:g} n_c) per class"
    if "val" in pools:
        chosen["val"] = ("val", np.flatnonzero(labels["val"] >= 0))
        origins["val"] = f"given: {sources['val'].source}"
    else:
        k, h = balanced_holdout(y[rest], val_per_class, seed + 1)
        chosen["val"] = ("train", keep[np.sort(rest[h])])
        rest = rest[k]
        origins["val"] = f"held out from train: min({val_per_class}, floor(0.2 n_c)) per class"
    chosen["train"] = ("train", keep[np.sort(rest)])
    for what in ("val", "test"):
        if len(chosen[what][1]) == 0:
            raise LongtailError(
                f"the {what} split is empty: the classes are too small to hold images out "
                f"(a class needs 5 images for test, 7 for validation too); pass --{what}-dir"
            )

    def pixels(src: str, idx: np.ndarray) -> torch.Tensor | None:
        images = pools[src].images
        return images[torch.from_numpy(idx)] if images is not None else None

    mean, std = _stats(pixels(*chosen["train"]), plan.channels)
    prep = Preprocessing(plan.size, plan.channels, plan.resize_to, tuple(mean), tuple(std))
    splits: dict[str, ImageDataset] = {}
    for what in ("train", "val", "test"):
        src, idx = chosen[what]
        splits[what] = ImageDataset(
            labels=torch.from_numpy(labels[src][idx]),
            classes=list(classes),
            images=pixels(src, idx),
            paths=None if plan.in_memory else [pools[src].paths[i] for i in idx],
            name="user",
            mean=prep.mean,
            std=prep.std,
        )
    log("splits: " + ", ".join(f"{w} {len(d):,} ({origins[w]})" for w, d in splits.items()))
    counts = splits["train"].counts()
    sh = shot_splits(counts, many, few).sizes()
    log(
        f"training split: imbalance factor {imbalance_factor(counts):.3g}; shot splits many "
        f"(> {many}) {sh['many']}, medium {sh['medium']}, few (< {few}) {sh['few']} classes"
    )
    return UserData(out, classes, plan, prep, splits, skipped, excluded, origins)


def pooled_for_refit(data: UserData, root: str | os.PathLike) -> UserData:
    """Every labelled image ``fit`` may train on, as the training split of a new ``user`` dataset.

    The training split becomes train + validation + the internal test split (the hold-outs that
    served to choose), in that order; a test split the user gave (``--test-dir``) stays out of
    training. Validation and test keep their images so that stages 1 and 2 run unchanged, but
    they are no longer hold-outs: nothing measured on them in the re-fit is an estimate.

    Args:
        data: the materialised data of the selection runs.
        root: the folder the pooled dataset will be saved in (:func:`save_user_data`).
    """
    parts = [data.splits["train"], data.splits["val"]]
    if not data.origins.get("test", "").startswith("given"):
        parts.append(data.splits["test"])
    in_memory = parts[0].images is not None
    train = ImageDataset(
        labels=torch.cat([d.labels for d in parts]),
        classes=list(data.classes),
        images=torch.cat([d.images for d in parts]) if in_memory else None,
        paths=None if in_memory else [p for d in parts for p in (d.paths or [])],
        name="user",
        mean=data.preprocessing.mean,
        std=data.preprocessing.std,
    )
    pooled = [w for w in ("train", "val", "test") if any(d is data.splits[w] for d in parts)]
    every = "every labelled image" if len(parts) == 3 else "every image but the test split given"
    origins = {**data.origins, "train": " + ".join(pooled) + f" of the selection data ({every})"}
    splits = {"train": train}
    for w in ("val", "test"):  # the pooled hold-outs say so (the test-leak check lets them be)
        d = data.splits[w]
        splits[w] = replace(d, meta={**d.meta, "in_training": True}) if w in pooled else d
    return UserData(
        Path(root),
        data.classes,
        data.plan,
        data.preprocessing,
        splits,
        data.skipped,
        data.excluded,
        origins,
    )


def save_user_data(data: UserData) -> None:
    """Materialise ``data`` in ``data.root``: ``{train,val,test}.pt``, ``meta.json`` and
    ``skipped.txt`` (the folder is created)."""
    out = data.root
    out.mkdir(parents=True, exist_ok=True)
    for what, ds in data.splits.items():
        save_user_split(ds, out, what)
    meta = json.dumps(data.summary(), indent=2, ensure_ascii=False) + "\n"
    (out / "meta.json").write_text(meta, encoding="utf-8")
    (out / "skipped.txt").write_text(
        "".join(f"{b.path}\t{b.reason}\n" for b in data.skipped), encoding="utf-8"
    )


def prepare_user_data(
    train: str | os.PathLike,
    out: str | os.PathLike,
    *,
    val: str | os.PathLike | None = None,
    test: str | os.PathLike | None = None,
    **kwargs: Any,
) -> UserData:
    """Read, check, split, decode and materialise a user's data into ``out``:
    :func:`read_user_data` (same arguments) then :func:`save_user_data`."""
    data = read_user_data(train, out, val=val, test=test, **kwargs)
    save_user_data(data)
    return data

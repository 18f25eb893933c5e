"""``longtail predict``: calibrated top-k labels for image files and folders, from a bundle.

Files are decoded with the bundle's preprocessing in batches (threads decode, the network runs
one batch at a time), so a folder of any size streams through in constant memory. Files that
are not readable images are skipped and listed (or stop everything with ``strict``).

Two runtimes run the network: ``torch`` (the bundle's ``model.pt`` rebuilt as a
:class:`~longtail.fit.bundle.Bundle`) and ``onnx`` (``model.onnx`` with onnxruntime,
:class:`~longtail.fit.onnx_runtime.OnnxClassifier`); both offer ``classes``, ``dir``,
``decode(path)`` and ``predict_uint8(x)``. This module imports neither torch nor onnxruntime
itself: the runtime chosen is loaded by :func:`load_classifier`.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

import numpy as np
from tqdm.auto import tqdm

from longtail.core.errors import LongtailError
from longtail.fit.images import BadFile, list_image_inputs, parallel_map, read_header

if TYPE_CHECKING:
    from longtail.fit.bundle import Bundle
    from longtail.fit.onnx_runtime import OnnxClassifier

    Classifier = Bundle | OnnxClassifier

RUNTIMES = ("torch", "onnx")


@dataclass
class Prediction:
    """Top-k classes of one image, most probable first.

    Attributes:
        path: the image file; ``labels``: class names (``k``); ``probabilities``: their
            calibrated probabilities (``k``; all ``K`` of them sum to 1).
    """

    path: str
    labels: list[str]
    probabilities: list[float]

    @property
    def label(self) -> str:
        """The most probable class."""
        return self.labels[0]

    @property
    def probability(self) -> float:
        """Its calibrated probability."""
        return self.probabilities[0]

    def to_json(self) -> dict:
        """``{path, label, probability, top_k: [{label, probability}, ...]}``."""
        return {
            "path": self.path,
            "label": self.label,
            "probability": self.probability,
            "top_k": [
                {"label": a, "probability": p}
                for a, p in zip(self.labels, self.probabilities, strict=True)
            ],
        }


def _check_all(paths: list[str]) -> None:
    bad = [b for b in map(read_header, paths) if isinstance(b, BadFile)]
    if bad:
        raise LongtailError(
            f"{len(bad)} input(s) are not readable images (--strict): "
            + "; ".join(f"{b.path} ({b.reason})" for b in bad[:5])
            + (" ..." if len(bad) > 5 else "")
        )


def load_classifier(bundle_dir: str | os.PathLike, runtime: str = "torch") -> Classifier:
    """The bundle in ``bundle_dir`` on ``runtime``: ``torch`` (``model.pt``) or ``onnx``
    (``model.onnx``, needing only onnxruntime, numpy and Pillow)."""
    if runtime == "torch":
        from longtail.fit.bundle import load_bundle

        return load_bundle(bundle_dir)
    if runtime == "onnx":
        from longtail.fit.onnx_runtime import load_onnx

        return load_onnx(bundle_dir)
    raise LongtailError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")


def predict_paths(
    bundle: Classifier,
    paths: list[str],
    *,
    top_k: int = 5,
    batch_size: int = 64,
    strict: bool = False,
    on_skip: Callable[[BadFile], None] | None = None,
    workers: int = 0,
    progress: bool = True,
) -> Iterator[Prediction]:
    """Predictions for ``paths`` in order, one batch of ``batch_size`` images at a time.

    ``bundle``: a :class:`~longtail.fit.bundle.Bundle` or an
    :class:`~longtail.fit.onnx_runtime.OnnxClassifier` (:func:`load_classifier`).

    Unreadable files are passed to ``on_skip`` and left out; with ``strict`` every header is
    checked first and any bad file raises :class:`LongtailError` before the first prediction.
    A tqdm progress bar goes to stderr when ``progress``.
    """
    if batch_size < 1:
        raise LongtailError(f"--batch-size must be >= 1, got {batch_size}")
    if top_k < 1:
        raise LongtailError(f"--top-k must be >= 1, got {top_k}")
    if strict:
        _check_all(paths)  # before the first prediction, so nothing is half-written
    return _iterate(bundle, paths, top_k, batch_size, strict, on_skip, workers, progress)


def _iterate(
    bundle: Classifier,
    paths: list[str],
    top_k: int,
    batch_size: int,
    strict: bool,
    on_skip: Callable[[BadFile], None] | None,
    workers: int,
    progress: bool,
) -> Iterator[Prediction]:
    classes = bundle.classes
    k = min(top_k, len(classes))
    bar = tqdm(total=len(paths), unit="img", desc="predict", file=sys.stderr, disable=not progress)
    try:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            ok, pixels = [], []
            for p, r in zip(chunk, parallel_map(bundle.decode, chunk, workers), strict=True):
                if isinstance(r, BadFile):
                    if strict:
                        raise LongtailError(f"{r.path}: {r.reason} (--strict)")
                    if on_skip is not None:
                        on_skip(r)
                else:
                    ok.append(p)
                    pixels.append(r)
            if pixels:
                probs = bundle.predict_uint8(np.stack([np.asarray(q) for q in pixels]))
                top_i = np.argsort(-probs, axis=1, kind="stable")[:, :k]
                top_p = np.take_along_axis(probs, top_i, axis=1)
                for p, ps, idx in zip(ok, top_p.tolist(), top_i.tolist(), strict=True):
                    yield Prediction(p, [classes[i] for i in idx], [float(v) for v in ps])
            bar.update(len(chunk))
    finally:
        bar.close()


def predict(
    bundle_dir: str | os.PathLike,
    inputs: Iterable[str | os.PathLike],
    *,
    top_k: int = 5,
    batch_size: int = 64,
    strict: bool = False,
    progress: bool = False,
    runtime: str = "torch",
) -> tuple[list[Prediction], list[BadFile]]:
    """Predict every image file in ``inputs`` (folders recursively); returns ``(predictions,
    skipped)``. The Python face of ``longtail predict``; ``runtime``: ``torch`` or ``onnx``."""
    bundle = load_classifier(bundle_dir, runtime)
    paths = expand_inputs(inputs)
    skipped: list[BadFile] = []
    preds = list(
        predict_paths(
            bundle,
            paths,
            top_k=top_k,
            batch_size=batch_size,
            strict=strict,
            on_skip=skipped.append,
            progress=progress,
        )
    )
    return preds, skipped


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """The files of ``inputs``, folders expanded recursively; a missing input raises."""
    try:
        paths = list_image_inputs(inputs)
    except FileNotFoundError as e:
        raise LongtailError(f"input {str(e)!r} not found") from None
    if not paths:
        raise LongtailError("no input files (the folders given are empty)")
    return paths


def _text(s: str) -> str:
    """A path as printable text (undecodable file-name bytes become ``\\x..`` escapes)."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def write_json(
    preds: Iterable[Prediction], skipped: list[BadFile], out: TextIO, bundle_dir: str
) -> int:
    """Stream ``{"bundle", "predictions": [...], "skipped": [...]}`` to ``out``; returns the
    number of predictions. ``skipped`` is read after the predictions are exhausted."""
    out.write('{"bundle": ' + json.dumps(bundle_dir) + ', "predictions": [')
    n = 0
    for p in preds:
        out.write(("\n  " if n == 0 else ",\n  ") + json.dumps(p.to_json()))
        n += 1
    sk = [{"path": b.path, "reason": b.reason} for b in skipped]
    out.write('\n], "skipped": ' + json.dumps(sk) + "}\n")
    return n


def write_csv(preds: Iterable[Prediction], out: TextIO, top_k: int) -> int:
    """CSV rows ``path,label,probability[,label_2,probability_2,...]``; returns the count."""
    w = csv.writer(out, lineterminator="\n")
    header = ["path", "label", "probability"]
    for r in range(2, top_k + 1):
        header += [f"label_{r}", f"probability_{r}"]
    w.writerow(header)
    n = 0
    for p in preds:
        row = [_text(p.path)]
        for a, q in zip(p.labels, p.probabilities, strict=True):
            row += [_text(a), f"{q:.6g}"]
        w.writerow(row)
        n += 1
    return n

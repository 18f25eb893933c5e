"""A bundle's ``model.onnx`` run with onnxruntime, numpy and Pillow only (no torch).

``longtail predict --runtime onnx`` uses this: it reads ``bundle.json`` (class names and the
preprocessing rule), decodes files with Pillow (:meth:`longtail.fit.images.Preprocessing.
to_array`) and runs the ONNX graph, which takes float32 images ``(B, C, S, S)`` in ``[0, 1]``
(input ``images``) and returns calibrated probabilities ``(B, K)`` (output ``probabilities``):
normalisation, the stage-2 head and the temperature are inside the graph. A graph exported
with a fixed batch size is fed in chunks of that size (the last one padded).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from longtail.core.errors import LongtailError
from longtail.fit.images import BUNDLE_JSON, BadFile, BundleMeta, decode_array, find_bundle

ONNX_FILE = "model.onnx"


def run_batched(fn, x: np.ndarray, batch: int | None) -> np.ndarray:
    """``fn`` over ``x`` ``(B, ...)`` in chunks of ``batch`` rows (the last one zero-padded and
    its padding dropped), or in one call when ``batch`` is ``None`` (a dynamic batch axis)."""
    if batch is None or len(x) == batch:
        return fn(x)
    out = []
    for i in range(0, len(x), batch):
        part = x[i : i + batch]
        n = len(part)
        if n < batch:
            part = np.concatenate([part, np.zeros((batch - n, *part.shape[1:]), part.dtype)])
        out.append(fn(part)[:n])
    return np.concatenate(out)


@dataclass
class OnnxClassifier(BundleMeta):
    """An ONNX model bundle on onnxruntime.

    Attributes:
        dir: the bundle folder; ``meta``: its ``bundle.json``; ``session``: the
            ``onnxruntime.InferenceSession``; ``batch``: the graph's fixed batch size, or
            ``None`` when its batch axis is dynamic.
    """

    dir: Path
    meta: dict
    session: object
    batch: int | None

    def decode(self, path: str) -> np.ndarray | BadFile:
        """uint8 ``(C, S, S)`` pixels of one file (Pillow), or why it cannot be read."""
        return decode_array(path, self.preprocessing)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """``(B, K)`` float32 calibrated probabilities of float32 images ``(B, C, S, S)`` in
        ``[0, 1]``."""
        name = self.session.get_inputs()[0].name

        def run(part: np.ndarray) -> np.ndarray:
            return self.session.run(None, {name: part})[0]

        return run_batched(run, np.ascontiguousarray(x, dtype=np.float32), self.batch)

    def predict_uint8(self, x: np.ndarray) -> np.ndarray:
        """``(B, K)`` probabilities of uint8 images ``(B, C, S, S)`` (divided by 255 here)."""
        return self.probabilities(x.astype(np.float32) / np.float32(255.0))


def load_onnx(
    path: str | os.PathLike, model: str | os.PathLike | None = None, threads: int | None = None
) -> OnnxClassifier:
    """Open a bundle folder's ``model.onnx`` (or ``model``) on onnxruntime's CPU provider,
    with ``threads`` intra-op threads (default: onnxruntime's, one per core).

    Raises:
        LongtailError: no bundle, no ONNX file (export one with ``longtail export DIR --format
            onnx``), or onnxruntime not installed.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise LongtailError(
            "--runtime onnx needs onnxruntime: pip install 'longtail[export]' "
            "(or pip install onnxruntime)"
        ) from None
    d = find_bundle(path)
    try:
        meta = json.loads((d / BUNDLE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LongtailError(f"{d / BUNDLE_JSON}: unreadable ({e})") from e
    f = Path(model) if model is not None else d / ONNX_FILE
    if not f.is_file():
        raise LongtailError(
            f"{str(f)!r} not found: write it with `longtail export {d} --format onnx "
            "--dynamic-batch`"
        )
    try:
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for bad files
        raise LongtailError(f"{str(f)!r} cannot be loaded by onnxruntime: {e}") from e
    b = session.get_inputs()[0].shape[0]
    return OnnxClassifier(d, meta, session, b if isinstance(b, int) else None)

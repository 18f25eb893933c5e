"""Deployable files of a network, each checked by its own runtime right after it is written.

Formats (:data:`FILES`):

- ``onnx`` (``model.onnx``): PyTorch's ``torch.export``-based exporter
  (``torch.onnx.export(exported_program, dynamo=True)``), standard ONNX operators only, one
  self-contained file; run with onnxruntime (or any ONNX runtime, in any language);
- ``pt2`` (``model.pt2``): a ``torch.export`` ExportedProgram, ``torch.export.load(f).module()``;
- ``torchscript`` (``model.ts``): ``torch.jit.script`` (deprecated upstream, kept for old
  consumers).

Every graph takes float32 images ``(B, C, S, S)`` in ``[0, 1]`` (input ``images``: uint8 / 255,
resized and cropped as the bundle's preprocessing says) and returns calibrated probabilities
``(B, K)`` (output ``probabilities``); normalisation, the stage-2 head and its temperature are
inside. ``onnx`` and ``pt2`` are traced by ``torch.export`` from a copy of the network with
longtail's CPU kernels switched off (:func:`deployable_copy`), and the traced graph is refused
if it holds any operator other than standard ATen ones (:func:`nonstandard_ops`).

The check (:func:`export_model`): the written file is loaded by its runtime (onnxruntime,
``torch.export.load``, ``torch.jit.load``), run on real validation images and compared with the
PyTorch network; a maximum absolute probability difference above :data:`TOLERANCE` removes the
file and raises :class:`ExportError` with the figures.
"""

from __future__ import annotations

import copy
import io
import operator
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from longtail.core.errors import LongtailError
from longtail.core.io import atomic_write_bytes
from longtail.fit.onnx_runtime import run_batched

FILES = {"onnx": "model.onnx", "pt2": "model.pt2", "torchscript": "model.ts"}
TOLERANCE = 1e-4  # max abs probability difference, fp32
INPUT, OUTPUT = "images", "probabilities"
_BUILTIN_MODULES = ("_operator", "operator", "math", "builtins")  # getitem, symbolic sizes
_USAGE = {
    "onnx": "s = onnxruntime.InferenceSession('model.onnx'); probs = s.run(None, {'images': x})[0]",
    "pt2": "m = torch.export.load('model.pt2').module(); probs = m(x)",
    "torchscript": "m = torch.jit.load('model.ts'); probs = m(x)",
}
_INPUT_DOC = (
    "x: float32 (B, C, S, S) in [0, 1] = uint8 pixels / 255, resized and cropped as "
    "'preprocessing' says; probs: (B, K) calibrated probabilities, columns = 'classes'"
)


class ExportError(LongtailError):
    """An export that could not be written, or whose file disagrees with the network."""


def deployable_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU eval-mode copy of ``model`` with longtail's CPU kernels switched off
    (``kernels="off"`` on every backbone that has the switch), so tracing records PyTorch's own
    operators only."""
    m = copy.deepcopy(model).float().cpu().eval()
    for mod in m.modules():
        if isinstance(getattr(type(mod), "kernels", None), property):
            mod.kernels = "off"
    return m


def nonstandard_ops(program: torch.export.ExportedProgram) -> list[str]:
    """Operators of ``program``'s graph that are not standard ATen ops (custom ops, ctypes
    kernels, higher-order ops), by name; Python's ``operator`` builtins on sizes are allowed."""
    bad = set()
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        t = node.target
        if isinstance(t, torch._ops.OpOverload) and t.namespace == "aten":
            continue
        if getattr(t, "__module__", None) in _BUILTIN_MODULES or t is operator.getitem:
            continue
        bad.add(str(t))
    return sorted(bad)


def trace(
    model: nn.Module, example: torch.Tensor, dynamic_batch: bool
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` on ``example`` (float ``(B, C, S, S)``), batch axis symbolic
    when ``dynamic_batch`` (``B`` of ``example`` must then be >= 2).

    Raises:
        ExportError: tracing failed, or the graph holds a non-standard operator.
    """
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        program = torch.export.export(model, (example,), dynamic_shapes=shapes)
    except Exception as e:  # noqa: BLE001 - torch.export raises many types
        raise ExportError(f"torch.export could not trace the network: {e}") from e
    bad = nonstandard_ops(program)
    if bad:
        raise ExportError(
            "the traced graph holds non-standard operators " + ", ".join(bad) + "; an exported "
            "model may use standard ATen operators only (switch custom kernels off for export)"
        )
    return program


def _onnx_bytes(program: torch.export.ExportedProgram, example: torch.Tensor, opset: int | None):
    try:  # the exporter's and the check's dependencies, asked here for one clear message
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ExportError(
            "ONNX export needs onnx, onnxscript and onnxruntime: pip install 'longtail[export]'"
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            onnx_program = torch.onnx.export(
                program,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT],
                output_names=[OUTPUT],
                verbose=False,
            )
        except Exception as e:  # noqa: BLE001 - the exporter raises many types
            raise ExportError(f"torch.onnx.export failed: {e}") from e
    proto = onnx_program.model_proto
    got = {o.domain: o.version for o in proto.opset_import}.get("")
    if opset is not None and got != opset:
        raise ExportError(
            f"--opset {opset} was asked for but the exporter produced opset {got} (PyTorch's "
            "exporter implements opset 18 and later; choose --opset 18 or higher)"
        )
    custom = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
    if custom or len(proto.functions):
        raise ExportError(
            f"the ONNX graph uses non-standard operator domains {custom} / "
            f"{len(proto.functions)} local functions; expected standard ONNX operators only"
        )
    return proto.SerializeToString(), {"opset": got}


def _serialise(model: nn.Module, fmt: str, example: torch.Tensor, dynamic_batch: bool, opset):
    """``(file bytes, extra record fields)`` of ``model`` in ``fmt``."""
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated upstream, still loadable
            try:
                ts, how = torch.jit.script(model), "torch.jit.script"
            except Exception:  # noqa: BLE001 - fall back to tracing whatever scripting rejects
                ts, how = torch.jit.trace(model, example), "torch.jit.trace"
            buf = io.BytesIO()
            torch.jit.save(ts, buf)
        return buf.getvalue(), {"method": how}
    program = trace(model, example, dynamic_batch)
    if fmt == "pt2":
        buf = io.BytesIO()
        torch.export.save(program, buf)
        return buf.getvalue(), {"method": "torch.export"}
    data, extra = _onnx_bytes(program, example, opset)
    return data, {"method": "torch.export + torch.onnx.export(dynamo=True)", **extra}


def _runner(fmt: str, path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The written file loaded by its own runtime: float32 ``(B, C, S, S)`` -> ``(B, K)``."""
    if fmt == "onnx":
        import onnxruntime as ort

        s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: s.run(None, {INPUT: x})[0]
    if fmt == "pt2":
        m = torch.export.load(str(path)).module()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = torch.jit.load(str(path), map_location="cpu")

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return m(torch.from_numpy(x)).numpy()

    return run


def export_model(
    model: nn.Module,
    fmt: str,
    path: str | os.PathLike,
    *,
    check_images: torch.Tensor,
    opset: int | None = None,
    dynamic_batch: bool = True,
    batch_size: int = 1,
) -> dict:
    """Write ``model`` (images -> probabilities) as ``fmt`` to ``path`` and check the file.

    Args:
        model: float images ``(B, C, S, S)`` in ``[0, 1]`` -> probabilities ``(B, K)``.
        fmt: ``onnx``, ``pt2`` or ``torchscript``.
        check_images: real validation images, float ``(N, C, S, S)`` in ``[0, 1]``.
        opset: ONNX opset (default: the exporter's, 20 in torch 2.14).
        dynamic_batch: a symbolic batch axis (``onnx`` / ``pt2``); else a fixed ``batch_size``.
            TorchScript always takes any batch.

    Returns:
        The record stored in ``bundle.json``: file, method, input / output, the check's
        ``max_abs_diff`` (probabilities) and ``top1_agreement`` over ``checked_images``.

    Raises:
        ExportError: unknown format, missing dependency, tracing / export failure, or a check
            difference above :data:`TOLERANCE` (the file is removed).
    """
    if fmt not in FILES:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FILES)}")
    if batch_size < 1:
        raise ExportError(f"--batch-size must be >= 1, got {batch_size}")
    path = Path(path)
    model = deployable_copy(model)
    x = check_images.float().cpu().contiguous()
    dynamic = dynamic_batch or fmt == "torchscript"
    n_example = max(2, min(4, len(x))) if dynamic else batch_size
    example = x[torch.arange(n_example) % len(x)]  # repeats images when there are fewer
    data, extra = _serialise(model, fmt, example, dynamic, opset)
    atomic_write_bytes(path, data)
    try:
        got = run_batched(_runner(fmt, path), x.numpy(), None if dynamic else batch_size)
        with torch.no_grad():
            want = model(x).numpy()
        diff = float(np.abs(got - want).max())
        agree = float((got.argmax(1) == want.argmax(1)).mean())
        if not diff <= TOLERANCE:
            raise ExportError(
                f"{fmt} export check failed: {path} gives probabilities up to {diff:.3g} away "
                f"from the PyTorch network on {len(x)} validation images (tolerance "
                f"{TOLERANCE:g}; top-1 agrees on {100 * agree:.1f}%); the file was removed"
            )
    except ExportError:
        path.unlink(missing_ok=True)
        raise
    except Exception as e:  # noqa: BLE001 - a file its runtime cannot load or run
        path.unlink(missing_ok=True)
        raise ExportError(
            f"{fmt} export check failed: {path} cannot be run by its runtime ({e}); the file "
            "was removed"
        ) from e
    c, s = int(x.shape[1]), int(x.shape[2])
    return {
        "format": fmt,
        "file": path.name,
        **extra,
        "input": {
            "name": INPUT,
            "dtype": "float32",
            "range": [0.0, 1.0],
            "shape": ["batch" if dynamic else batch_size, c, s, s],
        },
        "output": {
            "name": OUTPUT,
            "dtype": "float32",
            "shape": ["batch" if dynamic else batch_size, int(want.shape[1])],
        },
        "checked_images": int(len(x)),
        "max_abs_diff": diff,
        "top1_agreement": agree,
        "tolerance": TOLERANCE,
        "usage": _USAGE[fmt] + "  # " + _INPUT_DOC,
    }

"""Fused BatchNorm (+ residual) + ReLU for CPU training, from a C kernel built on first use.

On CPU a ResNet-32 training step spends almost half its time in memory-bound BatchNorm, ReLU
and residual adds (docs/RESULTS.md, step anatomy). PyTorch runs them as separate passes over
each activation; :func:`bn_relu` does ``relu(bn(x) + residual)`` in training mode as one forward
and one backward kernel (``fused_bn.c``), about twice as fast per layer. The kernel is compiled
with the system C compiler (``$CC``, default ``cc``; ``-O3 -march=native -fopenmp``) into
``$LONGTAIL_CACHE_DIR/kernels`` (default ``~/.cache/longtail/kernels``) the first time it is
needed. Without a compiler, or for anything the kernel does not cover (eval mode, GPU, NCHW
layout, channels not a multiple of 16, fp16, ``torch.compile``, SyncBatchNorm), the same
function computes with PyTorch's own ops, so results never depend on the fast path being there.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

_SOURCE = Path(__file__).with_name("fused_bn.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
_DTYPES = {torch.bfloat16: 1, torch.float32: 0}
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed: str | None = None


def cache_dir() -> Path:
    """Kernel folder: ``$LONGTAIL_CACHE_DIR/kernels``, else ``~/.cache/longtail/kernels``."""
    root = os.environ.get("LONGTAIL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "longtail"
    )
    return Path(root) / "kernels"


def _cpu_tag() -> str:
    """The CPU's feature flags: a kernel built with -march=native only runs where they match."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> ctypes.CDLL:
    compiler = shlex.split(os.environ.get("CC") or "cc")
    key = hashlib.sha256(
        _SOURCE.read_bytes() + " ".join([*compiler, *_FLAGS, _cpu_tag()]).encode()
    ).hexdigest()[:16]
    out = cache_dir() / f"fused_bn-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".fused_bn-", suffix=".so")
        os.close(fd)
        try:
            proc = subprocess.run(
                [*compiler, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True
            )
            if proc.returncode != 0:
                raise RuntimeError(f"{compiler[0]} failed: {proc.stderr.strip()[-500:]}")
            os.replace(tmp, out)  # atomic: concurrent builders each publish a whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    p, i64, i32, f64 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_double
    lib.lt_bn_relu_forward.argtypes = [p, p, p, i64, i32, p, p, p, p, f64, f64, p, i32]
    lib.lt_bn_relu_backward.argtypes = [p, p, p, p, p, i64, i32, p, p, p, i32]
    lib.lt_bn_relu_forward.restype = lib.lt_bn_relu_backward.restype = i32
    return lib


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, built on first call; ``None`` (after one warning) if it cannot be."""
    global _lib, _failed
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is None and _failed is None:
            try:
                _lib = _build()
            except (OSError, RuntimeError) as e:
                _failed = str(e)
                warnings.warn(
                    f"longtail: the fused BatchNorm+ReLU CPU kernel could not be built ({e}); "
                    "training uses PyTorch's separate ops instead (slower on CPU, same results). "
                    "Install a C compiler with OpenMP (e.g. gcc) or set fused_bn=false to "
                    "silence this.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class _BNReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, momentum, eps):
        n, c, h, w = x.shape
        y = torch.empty_like(x)
        stats = torch.empty(4 * c, dtype=torch.float32)  # mean, invstd, scale, shift
        status = load_kernel().lt_bn_relu_forward(
            _ptr(x), _ptr(residual), _ptr(y), n * h * w, c, _ptr(weight), _ptr(bias),
            _ptr(running_mean), _ptr(running_var), momentum, eps, _ptr(stats), _DTYPES[x.dtype],
        )  # fmt: skip
        if status != 0:
            raise MemoryError("fused BatchNorm+ReLU: out of memory for per-channel sums")
        ctx.has_residual = residual is not None
        ctx.save_for_backward(x, y if ctx.has_residual else None, stats)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, y, stats = ctx.saved_tensors
        n, c, h, w = x.shape
        dy = dy.contiguous(memory_format=torch.channels_last)
        dx = torch.empty_like(x)
        dres = torch.empty_like(x) if ctx.has_residual else None
        dw, db = torch.empty(c), torch.empty(c)
        status = load_kernel().lt_bn_relu_backward(
            _ptr(dy), _ptr(x), _ptr(y), _ptr(dres), _ptr(dx), n * h * w, c, _ptr(stats),
            _ptr(dw), _ptr(db), _DTYPES[x.dtype],
        )  # fmt: skip
        if status != 0:
            raise MemoryError("fused BatchNorm+ReLU: out of memory for per-channel sums")
        return dx, dres, dw, db, None, None, None, None


def _fusable(bn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    return (
        type(bn) is nn.BatchNorm2d
        and bn.training
        and bn.track_running_stats
        and bn.affine
        and bn.running_mean is not None
        and bn.weight.dtype == torch.float32
        and x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype in _DTYPES
        and x.shape[1] % 16 == 0
        and x.shape[0] * x.shape[2] * x.shape[3] > 1  # else PyTorch's error or empty result
        and x.is_contiguous(memory_format=torch.channels_last)
        and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape))
        and not torch.compiler.is_compiling()
        and load_kernel() is not None
    )


def bn_relu(
    bn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None, fused: bool = True
) -> torch.Tensor:
    """``relu(bn(x) + residual)``, through the fused CPU kernel when it applies.

    ``x``, ``residual``: ``(N, C, H, W)``, same shape and dtype. The fused path (training mode,
    CPU, channels-last bf16/fp32, ``C % 16 == 0``, a plain ``nn.BatchNorm2d``) updates the running
    statistics and ``num_batches_tracked`` exactly as ``bn.forward`` does; everything else, or
    ``fused=False``, runs ``bn`` and ``F.relu`` themselves.
    """
    if fused and _fusable(bn, x, residual):
        if residual is not None:
            residual = residual.contiguous(memory_format=torch.channels_last)
        bn.num_batches_tracked.add_(1)
        momentum = bn.momentum
        if momentum is None:  # cumulative moving average, as nn.BatchNorm2d does
            momentum = 1.0 / float(bn.num_batches_tracked)
        return _BNReLU.apply(
            x, residual, bn.weight, bn.bias, bn.running_mean, bn.running_var, momentum, bn.eps
        )
    out = bn(x)
    if residual is not None:
        out = out + residual
    return F.relu_(out)

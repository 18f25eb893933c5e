"""Fused BatchNorm (+ residual) + ReLU for CPU training, from a C kernel built on first use.

On CPU a ResNet-32 training step spends almost half its time in memory-bound BatchNorm, ReLU
and residual adds (docs/RESULTS.md, step anatomy). PyTorch runs them as separate passes over
each activation; :func:`bn_relu` does ``relu(bn(x) + residual)`` in training mode as one forward
and one backward kernel (``fused_bn.c``), about twice as fast per layer. The kernel is compiled
by the system C compiler on first use (``models/kernels.py``). Without a compiler, or for
anything the kernel does not cover (eval mode, GPU, NCHW layout, channels not a multiple of 16,
fp16, ``torch.compile``, SyncBatchNorm), the same function computes with PyTorch's own ops, so
results never depend on the fast path being there.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from longtail.models import kernels

_DTYPES = {torch.bfloat16: 1, torch.float32: 0}
_P, _I64, _I32, _F64 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_double
_SIGNATURES: kernels.Signatures = {
    "lt_bn_relu_forward": (_I32, [_P, _P, _P, _I64, _I32, _P, _P, _P, _P, _F64, _F64, _P, _I32]),
    "lt_bn_relu_backward": (_I32, [_P, _P, _P, _P, _P, _I64, _I32, _P, _P, _P, _I32]),
}


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, built on first call; ``None`` (after one warning) if it cannot be."""
    return kernels.load("fused_bn", _SIGNATURES, "fused BatchNorm+ReLU", "fused_bn")


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

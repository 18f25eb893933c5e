"""Fused BatchNorm (+ residual) + ReLU for CPU training, from a C kernel built on first use.

On CPU a ResNet-32 training step spends almost half its time in memory-bound BatchNorm, ReLU
and residual adds (docs/RESULTS.md, step anatomy). PyTorch runs them as separate passes over
each activation; :func:`bn_relu` does ``relu(bn(x) + residual)`` in training mode as one forward
and one backward kernel (``fused_bn.c``, portable C vectors: it builds on any CPU with a C
compiler). The two passes are the custom ops ``torch.ops.longtail.bn_relu_forward`` /
``bn_relu_backward`` (with fake and autograd registrations), so ``torch.compile`` and
``torch.export`` see one op. Under ``kernels="auto"`` the kernel is used for a shape only where
:mod:`~longtail.models.autotune` measured it faster than PyTorch's ops on this machine; for
anything the kernel does not cover (eval mode, GPU, NCHW layout, channels not a multiple of 16,
fp16, SyncBatchNorm) the same function computes with PyTorch's own ops, so results never depend
on the fast path being there.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from longtail.models import autotune, kernels
from longtail.models.kernel_inputs import CL, check, check_channels

_DTYPES = {torch.bfloat16: 1, torch.float32: 0}
_P, _I64, _I32, _F64 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_double
_SIGNATURES: kernels.Signatures = {
    "lt_bn_relu_forward": (_I32, [_P, _P, _P, _I64, _I32, _P, _P, _P, _P, _F64, _F64, _P, _I32]),
    "lt_bn_relu_backward": (_I32, [_P, _P, _P, _P, _P, _I64, _I32, _P, _P, _P, _I32]),
}
NAME = "fused_bn"


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, built on first call; ``None`` (after one warning) if it cannot be."""
    return kernels.load(NAME, _SIGNATURES, "fused BatchNorm+ReLU", "kernels")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _check_activation(op: str, name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    check(op, name, t, (like.dtype,), 4, channels_last=True, shape=tuple(like.shape))


def _check_forward(x, residual, weight, bias) -> None:
    op = "longtail::bn_relu_forward"
    check(op, "x", x, tuple(_DTYPES), 4, channels_last=True)
    check_channels(op, x.shape[1])
    if residual is not None:
        _check_activation(op, "residual", residual, x)
    for name, t in (("weight", weight), ("bias", bias)):
        check(op, name, t, (torch.float32,), shape=(x.shape[1],))


@torch.library.custom_op("longtail::bn_relu_forward", mutates_args=(), device_types="cpu")
def bn_relu_forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``relu(batch_norm(x) + residual)`` with batch statistics, and those statistics.

    ``x``, ``residual``: ``(N, C, H, W)`` bf16/fp32 channels-last, ``C % 16 == 0``;
    ``weight``, ``bias``: ``(C,)`` fp32. Returns ``y`` like ``x`` and ``stats`` ``(5 C,)`` fp32:
    mean, 1/std, scale, shift, unbiased variance. Running statistics are not touched.
    """
    _check_forward(x, residual, weight, bias)
    return _forward_impl(x, residual, weight, bias, eps)


def _forward_impl(
    x, residual, weight, bias, eps: float, running=None, momentum: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`bn_relu_forward` without its input checks (callers checked them); ``running``:
    optional ``(running_mean, running_var)``, moved by ``momentum`` inside the kernel."""
    rm, rv = running if running is not None else (None, None)
    n, c, h, w = x.shape
    y = torch.empty_like(x, memory_format=CL)
    stats = torch.empty(5 * c, dtype=torch.float32)
    lib = load_kernel()
    if lib is None:
        raise RuntimeError("the fused BatchNorm kernel is not built; see kernels.status")
    kernels.set_threads(lib)
    status = lib.lt_bn_relu_forward(
        _ptr(x), _ptr(residual), _ptr(y), n * h * w, c, _ptr(weight), _ptr(bias),
        _ptr(rm), _ptr(rv), momentum, eps, _ptr(stats), _DTYPES[x.dtype],
    )  # fmt: skip
    if status != 0:
        raise MemoryError("fused BatchNorm+ReLU: out of memory for per-channel sums")
    return y, stats


@bn_relu_forward.register_fake
def _(x, residual, weight, bias, eps):
    _check_forward(x, residual, weight, bias)
    return torch.empty_like(x, memory_format=CL), x.new_empty(5 * x.shape[1], dtype=torch.float32)


def _check_backward(dy, x, y, stats) -> None:
    op = "longtail::bn_relu_backward"
    check(op, "x", x, tuple(_DTYPES), 4, channels_last=True)
    check_channels(op, x.shape[1])
    _check_activation(op, "dy", dy, x)
    if y.numel():
        _check_activation(op, "y", y, x)
    check(op, "stats", stats, (torch.float32,), shape=(5 * x.shape[1],))


@torch.library.custom_op("longtail::bn_relu_backward", mutates_args=(), device_types="cpu")
def bn_relu_backward(
    dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor, stats: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`bn_relu_forward` given ``dy`` (like ``x``).

    ``y``: the forward's output when it had a residual, else an empty tensor; ``stats`` its
    statistics. Returns ``dx``, ``dresidual`` (empty without a residual), ``dweight``, ``dbias``.
    """
    _check_backward(dy, x, y, stats)
    return _backward_impl(dy, x, y, stats)


def _backward_impl(dy, x, y, stats) -> tuple[torch.Tensor, ...]:
    """:func:`bn_relu_backward` without its input checks (callers checked them)."""
    n, c, h, w = x.shape
    dx = torch.empty_like(x, memory_format=CL)
    dres = torch.empty_like(x, memory_format=CL) if y.numel() else x.new_empty(0)
    dw, db = torch.empty(c), torch.empty(c)
    lib = load_kernel()
    if lib is None:
        raise RuntimeError("the fused BatchNorm kernel is not built; see kernels.status")
    kernels.set_threads(lib)
    status = lib.lt_bn_relu_backward(
        _ptr(dy), _ptr(x), _ptr(y), _ptr(dres), _ptr(dx), n * h * w, c, _ptr(stats),
        _ptr(dw), _ptr(db), _DTYPES[x.dtype],
    )  # fmt: skip
    if status != 0:
        raise MemoryError("fused BatchNorm+ReLU: out of memory for per-channel sums")
    return dx, dres, dw, db


@bn_relu_backward.register_fake
def _(dy, x, y, stats):
    _check_backward(dy, x, y, stats)
    c = x.shape[1]
    dres = torch.empty_like(x, memory_format=CL) if y.numel() else x.new_empty(0)
    return (
        torch.empty_like(x, memory_format=CL),
        dres,
        x.new_empty(c, dtype=torch.float32),
        (x.new_empty(c, dtype=torch.float32)),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, residual, _, _, _ = inputs
    y, stats = output
    ctx.has_residual = residual is not None
    ctx.save_for_backward(x, y if ctx.has_residual else x.new_empty(0), stats)
    ctx.mark_non_differentiable(stats)


def _backward(ctx, dy, _dstats):
    x, y, stats = ctx.saved_tensors
    dx, dres, dw, db = bn_relu_backward(dy.contiguous(memory_format=CL), x, y, stats)
    return dx, dres if ctx.has_residual else None, dw, db, None


bn_relu_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerBNReLU(torch.autograd.Function):
    """Eager route to the same two passes, without the custom-op dispatcher.

    Calling a ``torch.library.custom_op`` from eager Python costs ~140 µs per forward + backward
    pair here (dispatcher, Python autograd wrapper, input checks), ~4 ms of a ~110 ms ResNet-32
    step on an AMX Xeon (docs/RESULTS.md, "Kernels chosen by measurement"); :func:`_fusable`
    has already checked what the kernel needs. Graphs (``torch.compile``, ``torch.export``)
    still see the custom op.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, running, momentum):
        y, stats = _forward_impl(x, residual, weight, bias, eps, running, momentum)
        ctx.has_residual = residual is not None
        ctx.save_for_backward(x, y if ctx.has_residual else x.new_empty(0), stats)
        ctx.mark_non_differentiable(stats)
        ctx.set_materialize_grads(False)  # no zero tensor for the statistics' gradient
        return y, stats

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dstats):
        if dy is None:
            return (None,) * 7
        x, y, stats = ctx.saved_tensors
        dx, dres, dw, db = _backward_impl(dy.contiguous(memory_format=CL), x, y, stats)
        return dx, dres if ctx.has_residual else None, dw, db, None, None, None


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
        and x.is_contiguous(memory_format=CL)
        and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape))
        and kernels.ready(NAME, load_kernel)
    )


def _kernel_path(bn: nn.BatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None):
    """The fused op; running statistics and ``num_batches_tracked`` updated as ``bn`` does."""
    if residual is not None:
        residual = residual.contiguous(memory_format=CL)
    bn.num_batches_tracked.add_(1)
    momentum = bn.momentum
    if momentum is None:  # cumulative moving average, as nn.BatchNorm2d does
        momentum = 1.0 / float(bn.num_batches_tracked)
    if not torch.compiler.is_compiling():  # the kernel moves the running statistics itself
        running = (bn.running_mean, bn.running_var)
        return _EagerBNReLU.apply(x, residual, bn.weight, bn.bias, bn.eps, running, momentum)[0]
    y, stats = bn_relu_forward(x, residual, bn.weight, bn.bias, bn.eps)
    c = x.shape[1]
    with torch.no_grad():
        bn.running_mean.lerp_(stats[:c], momentum)
        bn.running_var.lerp_(stats[4 * c :], momentum)
    return y


def _pytorch_path(bn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None):
    out = bn(x)
    if residual is not None:
        out = out + residual
    return F.relu_(out)


def _key(x: torch.Tensor, residual: torch.Tensor | None, grad: bool) -> str:
    """Autotune key of the fused op on ``x`` (with a residual or not, with a backward or not)."""
    shape = "x".join(map(str, x.shape))
    return f"{NAME}|{str(x.dtype)[6:]}|{shape}|res={int(residual is not None)}|grad={int(grad)}"


def _decide(bn: nn.BatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None) -> str:
    """Kernel or PyTorch for this shape, timed on copies of the real tensors (fwd + bwd when
    autograd will need the backward, else the forward alone); neither touches ``bn``."""
    grad = torch.is_grad_enabled() and (x.requires_grad or bn.weight.requires_grad)
    compiling = torch.compiler.is_compiling()
    if not compiling:  # decided: no copies (they cost ~4 tensor copies per call)
        site = (NAME, x.dtype, x.shape, residual is not None, grad)
        known = autotune.memo(site, lambda: autotune.cached(_key(x, residual, grad)))
        if known is not None:
            return known
    key = _key(x, residual, grad)
    if compiling:  # no timing while tracing: eager runs decided it
        return autotune.lookup(key) or autotune.BASELINE
    xs = x.detach().clone().requires_grad_(grad)
    rs = None if residual is None else residual.detach().contiguous(memory_format=CL).clone()
    w = bn.weight.detach().clone().requires_grad_(grad)
    b = bn.bias.detach().clone().requires_grad_(grad)
    dy = torch.ones_like(x)  # no draw from the global RNG: a cached decision must not change a run

    def run(fn):
        def call():
            y = fn()
            if grad:
                torch.autograd.grad(y, (xs, w, b), dy)

        return call

    def kernel():
        return bn_relu_forward(xs, rs, w, b, bn.eps)[0]

    def pytorch():
        out = F.batch_norm(xs, None, None, w, b, True, 0.0, bn.eps)
        return F.relu(out if rs is None else out + rs)

    return autotune.choose(key, {"kernel": run(kernel), autotune.BASELINE: run(pytorch)})


def bn_relu(
    bn: nn.Module,
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    kernels: str = "auto",
) -> torch.Tensor:
    """``relu(bn(x) + residual)``, through the fused CPU kernel when it applies.

    ``x``, ``residual``: ``(N, C, H, W)``, same shape and dtype. The fused path (training mode,
    CPU, channels-last bf16/fp32, ``C % 16 == 0``, a plain ``nn.BatchNorm2d``) updates the running
    statistics and ``num_batches_tracked`` exactly as ``bn.forward`` does. ``kernels``: ``"on"``
    takes it wherever it applies, ``"auto"`` only where measured faster here
    (:mod:`~longtail.models.autotune`), ``"off"`` never; otherwise ``bn`` and ``F.relu`` run.
    """
    if (
        kernels != "off"
        and _fusable(bn, x, residual)
        and (kernels == "on" or _decide(bn, x, residual) == "kernel")
    ):
        return _kernel_path(bn, x, residual)
    return _pytorch_path(bn, x, residual)

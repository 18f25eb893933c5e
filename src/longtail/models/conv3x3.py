"""3x3 convolutions for bf16 CPU training, from a C kernel built on first use.

oneDNN's bf16 convolutions reach about 40% of a CPU's bf16 matmul peak on ResNet-32's
16-channel layers and on every weight gradient (docs/RESULTS.md, step anatomy). ``conv3x3.c``
computes the forward, input-gradient and weight-gradient passes of a 3x3, stride-1, padding-1
convolution, and the weight gradient of a stride-2 one, with AVX512-BF16 dot products
(``vdpbf16ps``), reusing every loaded value for several products; on this project's machine
each pass takes 0.5-0.9 of oneDNN's time. :func:`conv3x3` takes this path for channels-last bf16
inputs under CPU bf16 autocast, channel counts that are multiples of 16, and a CPU with
AVX512-BF16 (the C compiler is called on first use, ``models/kernels.py``); anything else,
``torch.compile`` included, runs ``conv`` itself. Products are exact and sums fp32, as in oneDNN;
the weight gradient is returned in fp32 without the intermediate bf16 rounding that autocast's
path applies."""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from longtail.models import kernels

_P, _I32, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
_SIGNATURES: kernels.Signatures = {
    "lt_conv3x3_available": (_I32, []),
    "lt_conv3x3_forward": (_I32, [_P, _P, _P, _P] + [_I32] * 6 + [_I64] * 3),
    "lt_conv3x3_weight_grad": (_I32, [_P, _P, _P] + [_I32] * 6 + [_I64] * 3),
}
_CL = torch.channels_last


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or ``None`` if it cannot be built or the CPU lacks AVX512-BF16."""
    return kernels.load(
        "conv3x3",
        _SIGNATURES,
        "3x3 convolution",
        "fast_conv",
        usable=lambda lib: bool(lib.lt_conv3x3_available()),  # asked once, not per call
    )


def _check(status: int, what: str) -> None:
    if status == 1:
        raise MemoryError(f"3x3 convolution kernel: out of memory for the {what} workspace")
    if status != 0:
        raise RuntimeError(f"3x3 convolution kernel: {what} failed with status {status}")


def _strides(weight: torch.Tensor) -> tuple[int, int, int]:
    """Strides of a (C_out, C_in, 3, 3) weight's two channel dims and its 9 taps (elements)."""
    return weight.stride(0), weight.stride(1), weight.stride(3)


def _run_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    out_channels: int,
    transpose: int,
    add: torch.Tensor | None = None,
) -> torch.Tensor:
    n, c, h, w = x.shape
    y = torch.empty((n, out_channels, h, w), dtype=torch.bfloat16, memory_format=_CL)
    if add is not None:
        add = add.to(torch.bfloat16).contiguous(memory_format=_CL)
        assert add.shape == y.shape
    status = load_kernel().lt_conv3x3_forward(
        x.data_ptr(), weight.data_ptr(), y.data_ptr(), None if add is None else add.data_ptr(),
        n, h, w, c, out_channels, transpose, *_strides(weight),
    )  # fmt: skip
    _check(status, "forward" if not transpose else "input-gradient")
    return y


def forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Kernel pass: ``conv2d(x, weight, padding=1)``, stride 1.

    ``x``: ``(N, C_in, H, W)`` bf16 channels-last; ``weight``: ``(C_out, C_in, 3, 3)`` fp32
    (rounded to bf16 as autocast does). Returns ``(N, C_out, H, W)`` bf16 channels-last.
    """
    return _run_forward(x, weight, weight.shape[0], 0)


def input_grad(
    dy: torch.Tensor, weight: torch.Tensor, add: torch.Tensor | None = None
) -> torch.Tensor:
    """Kernel pass: the gradient ``(N, C_in, H, W)`` of :func:`forward`'s input, given ``dy``
    ``(N, C_out, H, W)`` bf16 channels-last; bf16 channels-last. ``add`` (shaped like the
    result): another branch's gradient for the same input, summed in before the one rounding."""
    return _run_forward(dy, weight, weight.shape[1], 1, add)


def weight_grad(
    x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor, stride: int = 1
) -> torch.Tensor:
    """Kernel pass: the fp32 gradient of a 3x3, padding-1 convolution's weight.

    ``x``: ``(N, C_in, H, W)``, ``dy``: ``(N, C_out, H', W')`` (``H' = (H - 1) // stride + 1``),
    both bf16 channels-last; ``stride`` 1 or 2. Returns a tensor like ``weight``
    ``(C_out, C_in, 3, 3)``, same strides, so autograd keeps it without a copy.
    """
    n, c, h, w = x.shape
    dw = torch.empty_like(weight)
    status = load_kernel().lt_conv3x3_weight_grad(
        x.data_ptr(), dy.data_ptr(), dw.data_ptr(), n, h, w, c, weight.shape[0], stride,
        *_strides(dw),
    )  # fmt: skip
    _check(status, "weight-gradient")
    return dw


class _Conv3x3(torch.autograd.Function):
    """Stride 1: all three passes in the kernel. Stride 2: the weight gradient in the kernel,
    forward and input gradient in oneDNN (which does well enough there)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
        weight = weight.detach()  # contiguous or channels-last: the kernel takes its strides
        ctx.save_for_backward(x, weight)
        ctx.stride = stride
        if stride == 1:
            return forward(x, weight)
        return F.conv2d(x, weight.to(torch.bfloat16), stride=stride, padding=1)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dy = dy.to(torch.bfloat16).contiguous(memory_format=_CL)
        dx = dw = None
        if ctx.needs_input_grad[0] and ctx.stride == 1:
            dx = input_grad(dy, weight)
        elif ctx.needs_input_grad[0]:
            s = [ctx.stride] * 2
            dx = torch.ops.aten.convolution_backward(
                dy, x, weight.to(torch.bfloat16), None, s, [1, 1], [1, 1], False, [0, 0], 1,
                [True, False, False],
            )[0]  # fmt: skip
        if ctx.needs_input_grad[1]:
            dw = weight_grad(x, dy, weight, ctx.stride)
        return dx, dw, None


class _Conv3x3Fork(torch.autograd.Function):
    """Stride 1: ``(conv(x), x)``; the gradient of the second output is added to the first's
    input gradient inside the kernel instead of by a separate autograd add."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor):
        weight = weight.detach()
        ctx.save_for_backward(x, weight)
        ctx.set_materialize_grads(False)
        return forward(x, weight), x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor | None, dres: torch.Tensor | None):
        x, weight = ctx.saved_tensors
        if dy is None:  # only the identity branch reached the loss
            return dres, None
        dy = dy.to(torch.bfloat16).contiguous(memory_format=_CL)
        dx = input_grad(dy, weight, dres) if ctx.needs_input_grad[0] else None
        dw = weight_grad(x, dy, weight) if ctx.needs_input_grad[1] else None
        return dx, dw


def _applies(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (3, 3)
        and conv.stride in ((1, 1), (2, 2))
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.bias is None
        and conv.padding_mode == "zeros"
        and conv.weight.dtype == torch.float32
        and conv.weight.stride(2) == 3 * conv.weight.stride(3)  # taps evenly spaced
        and conv.in_channels % 16 == 0
        and conv.out_channels % 16 == 0
        and x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and x.dim() == 4
        and x.shape[1] == conv.in_channels
        and x.numel() > 0  # empty batch or image: PyTorch gives the result or the error
        and x.is_contiguous(memory_format=_CL)
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and not torch.compiler.is_compiling()
        and load_kernel() is not None
    )


def conv3x3_fork(
    conv: nn.Conv2d, x: torch.Tensor, fast: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(conv(x), x)`` for a residual block whose input also feeds the identity shortcut.

    Shapes as :func:`conv3x3`. On the kernel path (stride 1) the gradient reaching the returned
    ``x`` is summed into the convolution's input gradient in the same pass, which saves
    autograd's separate add of the two branch gradients (one read and write of the activation).
    Otherwise this is ``(conv3x3(conv, x, fast), x)``.
    """
    if fast and conv.stride == (1, 1) and _applies(conv, x):
        return _Conv3x3Fork.apply(x, conv.weight)
    return conv3x3(conv, x, fast), x


def conv3x3(conv: nn.Conv2d, x: torch.Tensor, fast: bool = True) -> torch.Tensor:
    """``conv(x)``, through the 3x3 bf16 CPU kernel when it applies.

    ``x``: ``(N, C_in, H, W)``; returns ``(N, C_out, H', W')``. The kernel path needs a plain
    ``nn.Conv2d`` (3x3, stride 1 or 2, padding 1, no bias, fp32 weight), ``C_in`` and ``C_out``
    multiples of 16, ``x`` channels-last bf16 on CPU under ``torch.autocast("cpu",
    dtype=torch.bfloat16)``; its gradient for ``conv.weight`` is fp32. Otherwise, or with
    ``fast=False``, this is ``conv(x)``.
    """
    if fast and _applies(conv, x):
        return _Conv3x3.apply(x, conv.weight, conv.stride[0])
    return conv(x)

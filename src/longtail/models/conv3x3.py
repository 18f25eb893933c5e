"""3x3 convolutions for bf16 CPU training, from a C kernel built on first use.

oneDNN's bf16 convolutions reach about 40% of a CPU's bf16 matmul peak on ResNet-32's
16-channel layers and on every weight gradient on an AVX512-BF16 CPU without AMX (docs/RESULTS.md,
step anatomy). ``conv3x3.c`` computes the forward, input-gradient and weight-gradient passes of a
3x3, stride-1, padding-1 convolution, and the weight gradient of a stride-2 one, with AVX512-BF16
dot products (``vdpbf16ps``), reusing every loaded value for several products; on that machine
each pass takes 0.5-0.9 of oneDNN's time, while on an AMX Xeon oneDNN is ~4x faster. So under
``kernels="auto"`` each pass and shape takes the kernel only where
:mod:`~longtail.models.autotune` measured it faster here. The three passes are the custom ops
``torch.ops.longtail.conv3x3_forward`` / ``conv3x3_input_grad`` / ``conv3x3_weight_grad`` (fake
and autograd registrations), which is what ``torch.compile`` sees. :func:`conv3x3` takes this path
for channels-last bf16 inputs under CPU bf16 autocast, channel counts that are multiples of 16,
and a CPU with AVX512-BF16 (elsewhere the C source compiles to a stub reporting "unavailable");
anything else runs ``conv`` itself. Products are exact and sums fp32, as in oneDNN; the weight
gradient is returned in fp32 without the intermediate bf16 rounding that autocast's path applies.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from longtail.core.errors import KernelInputError
from longtail.models import autotune, kernels
from longtail.models.kernel_inputs import check, check_channels

_P, _I32, _I64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
_SIGNATURES: kernels.Signatures = {
    "lt_conv3x3_available": (_I32, []),
    "lt_conv3x3_forward": (_I32, [_P, _P, _P, _P] + [_I32] * 6 + [_I64] * 3),
    "lt_conv3x3_weight_grad": (_I32, [_P, _P, _P] + [_I32] * 6 + [_I64] * 3),
}
_CL = torch.channels_last
NAME = "conv3x3"
NEEDS = "AVX512-BF16"


def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or ``None`` if it cannot be built or the CPU lacks AVX512-BF16."""
    return kernels.load(
        NAME,
        _SIGNATURES,
        "3x3 convolution",
        "kernels",
        usable=lambda lib: bool(lib.lt_conv3x3_available()),  # asked once, not per call
        needs=NEEDS,
    )


def _lib() -> ctypes.CDLL:
    lib = load_kernel()
    if lib is None:
        raise RuntimeError(f"3x3 convolution kernel: {kernels.status(NAME)}")
    kernels.set_threads(lib)
    return lib


def _check(status: int, what: str) -> None:
    if status == 1:
        raise MemoryError(f"3x3 convolution kernel: out of memory for the {what} workspace")
    if status != 0:
        raise RuntimeError(f"3x3 convolution kernel: {what} failed with status {status}")


def _strides(weight: torch.Tensor) -> tuple[int, int, int]:
    """Strides of a (C_out, C_in, 3, 3) weight's two channel dims and its 9 taps (elements)."""
    return weight.stride(0), weight.stride(1), weight.stride(3)


def _check_weight(op: str, weight: torch.Tensor, co: int | None, ci: int | None) -> None:
    check(op, "weight", weight, (torch.float32,), 4, channels_last=weight.dim() == 4
          and weight.is_contiguous(memory_format=_CL) and not weight.is_contiguous())  # fmt: skip
    if tuple(weight.shape[2:]) != (3, 3) or (co, ci) != (weight.shape[0], weight.shape[1]):
        raise KernelInputError(
            f"{op}: weight has shape {tuple(weight.shape)}; expected ({co}, {ci}, 3, 3)"
        )


def _check_act(op: str, name: str, t: torch.Tensor) -> None:
    check(op, name, t, (torch.bfloat16,), 4, channels_last=True)
    check_channels(op, t.shape[1])
    if t.numel() == 0:
        raise KernelInputError(f"{op}: {name} is empty {tuple(t.shape)}; use F.conv2d")


def _check_forward(op: str, x: torch.Tensor, weight: torch.Tensor, transpose: bool) -> int:
    """Checks a forward (or transposed) pass's inputs; returns the output channel count."""
    _check_act(op, "dy" if transpose else "x", x)
    co = weight.shape[1] if transpose else weight.shape[0]
    _check_weight(op, weight, *((x.shape[1], co) if transpose else (co, x.shape[1])))
    check_channels(op, co)
    return co


def _run_forward(
    x: torch.Tensor, weight: torch.Tensor, out_channels: int, transpose: int, add=None
) -> torch.Tensor:
    n, c, h, w = x.shape
    y = torch.empty((n, out_channels, h, w), dtype=torch.bfloat16, memory_format=_CL)
    status = _lib().lt_conv3x3_forward(
        x.data_ptr(), weight.data_ptr(), y.data_ptr(), None if add is None else add.data_ptr(),
        n, h, w, c, out_channels, transpose, *_strides(weight),
    )  # fmt: skip
    _check(status, "forward" if not transpose else "input-gradient")
    return y


def _empty_act(x: torch.Tensor, channels: int, h: int, w: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], channels, h, w), dtype=torch.bfloat16).contiguous(
        memory_format=_CL
    )


@torch.library.custom_op("longtail::conv3x3_forward", mutates_args=(), device_types="cpu")
def forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Kernel pass: ``conv2d(x, weight, padding=1)``, stride 1.

    ``x``: ``(N, C_in, H, W)`` bf16 channels-last; ``weight``: ``(C_out, C_in, 3, 3)`` fp32
    (rounded to bf16 as autocast does). Returns ``(N, C_out, H, W)`` bf16 channels-last.
    """
    co = _check_forward("longtail::conv3x3_forward", x, weight, False)
    return _run_forward(x, weight, co, 0)


@forward.register_fake
def _(x, weight):
    co = _check_forward("longtail::conv3x3_forward", x, weight, False)
    return _empty_act(x, co, x.shape[2], x.shape[3])


@torch.library.custom_op("longtail::conv3x3_input_grad", mutates_args=(), device_types="cpu")
def input_grad(
    dy: torch.Tensor, weight: torch.Tensor, add: torch.Tensor | None = None
) -> torch.Tensor:
    """Kernel pass: the gradient ``(N, C_in, H, W)`` of :func:`forward`'s input, given ``dy``
    ``(N, C_out, H, W)`` bf16 channels-last; bf16 channels-last. ``add`` (shaped like the
    result, bf16 channels-last): another branch's gradient for the same input, summed in before
    the one rounding."""
    ci = _check_forward("longtail::conv3x3_input_grad", dy, weight, True)
    if add is not None:
        check("longtail::conv3x3_input_grad", "add", add, (torch.bfloat16,), 4, True,
              (dy.shape[0], ci, dy.shape[2], dy.shape[3]))  # fmt: skip
    return _run_forward(dy, weight, ci, 1, add)


@input_grad.register_fake
def _(dy, weight, add=None):
    ci = _check_forward("longtail::conv3x3_input_grad", dy, weight, True)
    return _empty_act(dy, ci, dy.shape[2], dy.shape[3])


def _check_weight_grad(x, dy, weight, stride) -> None:
    op = "longtail::conv3x3_weight_grad"
    if stride not in (1, 2):
        raise KernelInputError(f"{op}: stride {stride}; the kernel does 1 or 2")
    _check_act(op, "x", x)
    _check_act(op, "dy", dy)
    n, ci, h, w = x.shape
    expected = (n, weight.shape[0], (h - 1) // stride + 1, (w - 1) // stride + 1)
    if tuple(dy.shape) != expected:
        raise KernelInputError(f"{op}: dy has shape {tuple(dy.shape)}; expected {expected}")
    _check_weight(op, weight, weight.shape[0], ci)


@torch.library.custom_op("longtail::conv3x3_weight_grad", mutates_args=(), device_types="cpu")
def weight_grad(
    x: torch.Tensor, dy: torch.Tensor, weight: torch.Tensor, stride: int = 1
) -> torch.Tensor:
    """Kernel pass: the fp32 gradient of a 3x3, padding-1 convolution's weight.

    ``x``: ``(N, C_in, H, W)``, ``dy``: ``(N, C_out, H', W')`` (``H' = (H - 1) // stride + 1``),
    both bf16 channels-last; ``stride`` 1 or 2. Returns a tensor like ``weight``
    ``(C_out, C_in, 3, 3)``, same strides, so autograd keeps it without a copy.
    """
    _check_weight_grad(x, dy, weight, stride)
    n, c, h, w = x.shape
    dw = torch.empty_like(weight)
    status = _lib().lt_conv3x3_weight_grad(
        x.data_ptr(), dy.data_ptr(), dw.data_ptr(), n, h, w, c, weight.shape[0], stride,
        *_strides(dw),
    )  # fmt: skip
    _check(status, "weight-gradient")
    return dw


@weight_grad.register_fake
def _(x, dy, weight, stride=1):
    _check_weight_grad(x, dy, weight, stride)
    return torch.empty_like(weight)


def _forward_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _forward_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    dy = dy.to(torch.bfloat16).contiguous(memory_format=_CL)
    dx = input_grad(dy, weight) if ctx.needs_input_grad[0] else None
    dw = weight_grad(x, dy, weight) if ctx.needs_input_grad[1] else None
    return dx, dw


forward.register_autograd(_forward_backward, setup_context=_forward_setup)


# PyTorch's own convolution for each pass, the autotune's baseline (bf16 like autocast's).
def _torch_forward(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    return F.conv2d(x, weight.to(torch.bfloat16), stride=stride, padding=1)


def _torch_backward(dy, x, weight, stride: int, which: int) -> torch.Tensor:
    mask = [which == 0, which == 1, False]
    s = [stride] * 2
    return torch.ops.aten.convolution_backward(
        dy, x, weight.to(torch.bfloat16), None, s, [1, 1], [1, 1], False, [0, 0], 1, mask
    )[which]


def _torch_input_grad(dy, x, weight, stride: int, add=None) -> torch.Tensor:
    dx = _torch_backward(dy, x, weight, stride, 0)
    return dx if add is None else dx + add


def _torch_weight_grad(dy, x, weight, stride: int) -> torch.Tensor:
    return _torch_backward(dy, x, weight, stride, 1).float()


def _use_kernel(mode: str, what: str, x: torch.Tensor, co: int, stride: int, kernel, pytorch):
    """Whether pass ``what`` of this shape runs in the kernel: always under ``"on"``, else as
    :func:`autotune.choose` decides between the two zero-argument callables."""
    if mode == "on":
        return True
    key = _key(what, x, co, stride)
    if torch.compiler.is_compiling():
        return autotune.lookup(key) == "kernel"
    return autotune.choose(key, {"kernel": kernel, autotune.BASELINE: pytorch}) == "kernel"


class _Conv3x3(torch.autograd.Function):
    """Eager path: each pass in the kernel or in oneDNN, as ``mode`` and the autotune say.
    Stride 2: the forward and input gradient always in oneDNN (the kernel does stride 1)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, stride: int, mode: str):
        weight = weight.detach()  # contiguous or channels-last: the kernel takes its strides
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.mode = stride, mode
        return _forward_pass(x, weight, stride, mode)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dy = dy.to(torch.bfloat16).contiguous(memory_format=_CL)
        dx, dw = _backward(ctx, x, weight, dy, None, ctx.stride, ctx.needs_input_grad)
        return dx, dw, None, None


def _forward_pass(x: torch.Tensor, weight: torch.Tensor, stride: int, mode: str) -> torch.Tensor:
    """The forward in the kernel or in oneDNN, as ``mode`` and the autotune say."""
    if stride == 1 and _use_kernel(
        mode, "forward", x, weight.shape[0], 1,
        lambda: forward(x, weight), lambda: _torch_forward(x, weight, 1),
    ):  # fmt: skip
        return forward(x, weight)
    return _torch_forward(x, weight, stride)


def _backward(ctx, x, weight, dy, add, stride, needs):
    """Input gradient (plus ``add``) and fp32 weight gradient, each pass where it is faster."""
    dx = dw = None
    co, s = weight.shape[0], stride
    if needs[0]:
        if stride == 1 and _use_kernel(
            ctx.mode, "input_grad", x, co, 1,
            lambda: input_grad(dy, weight, add), lambda: _torch_input_grad(dy, x, weight, 1, add),
        ):  # fmt: skip
            dx = input_grad(dy, weight, add)
        else:
            dx = _torch_input_grad(dy, x, weight, s, add)
    if needs[1]:
        if _use_kernel(
            ctx.mode, "weight_grad", x, co, s,
            lambda: weight_grad(x, dy, weight, s), lambda: _torch_weight_grad(dy, x, weight, s),
        ):  # fmt: skip
            dw = weight_grad(x, dy, weight, s)
        else:
            dw = _torch_weight_grad(dy, x, weight, s)
    return dx, dw


class _Conv3x3Fork(torch.autograd.Function):
    """Stride 1: ``(conv(x), x)``; the gradient of the second output is added to the first's
    input gradient inside the kernel instead of by a separate autograd add. (An output that is
    an input cannot be a custom op's, so this stays an autograd.Function over the ops.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, mode: str):
        weight = weight.detach()
        ctx.save_for_backward(x, weight)
        ctx.set_materialize_grads(False)
        ctx.mode = mode
        return _forward_pass(x, weight, 1, mode), x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor | None, dres: torch.Tensor | None):
        x, weight = ctx.saved_tensors
        if dy is None:  # only the identity branch reached the loss
            return dres, None, None
        dy = dy.to(torch.bfloat16).contiguous(memory_format=_CL)
        if dres is not None:
            dres = dres.to(torch.bfloat16).contiguous(memory_format=_CL)
        dx, dw = _backward(ctx, x, weight, dy, dres, 1, ctx.needs_input_grad)
        return dx, dw, None


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
        and kernels.ready(NAME, load_kernel)
    )


def _pass_keys(conv: nn.Conv2d, x: torch.Tensor) -> list[str]:
    """Autotune keys of the passes the kernel could serve for ``conv`` on ``x``."""
    s = conv.stride[0]
    whats = ("forward", "input_grad", "weight_grad") if s == 1 else ("weight_grad",)
    return [_key(what, x, conv.out_channels, s) for what in whats]


def _key(what: str, x: torch.Tensor, co: int, stride: int) -> str:
    """Autotune key of pass ``what`` on input ``x`` with ``co`` output channels."""
    return f"{NAME}.{what}|{'x'.join(map(str, x.shape))}->{co}|stride={stride}"


def _all_pytorch(conv: nn.Conv2d, x: torch.Tensor, mode: str) -> bool:
    """Under ``"auto"``: every pass of this shape already decided for PyTorch, so ``conv(x)``
    runs as is, with autograd's single backward call, not through :class:`_Conv3x3` (whose
    per-pass wrapper and split backward cost ~8 ms of a ~110 ms ResNet-32 step on an AMX Xeon,
    where oneDNN wins every pass; docs/RESULTS.md, "Kernels chosen by measurement")."""
    return mode == "auto" and autotune.memo(
        (NAME, x.shape, conv.out_channels, conv.stride[0]),
        lambda: all(autotune.cached(k) == autotune.BASELINE for k in _pass_keys(conv, x)),
    )


def _compiled_all_kernel(conv: nn.Conv2d, x: torch.Tensor, mode: str) -> bool:
    """Under torch.compile: the kernel op (whose autograd runs the kernel's backward passes)
    when ``mode`` is on or all three passes were decided for the kernel in eager runs."""
    co = conv.out_channels
    return conv.stride == (1, 1) and all(
        _use_kernel(mode, what, x, co, 1, None, None)
        for what in ("forward", "input_grad", "weight_grad")
    )


def conv3x3_fork(
    conv: nn.Conv2d, x: torch.Tensor, kernels: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(conv(x), x)`` for a residual block whose input also feeds the identity shortcut.

    Shapes as :func:`conv3x3`. On the kernel path (stride 1, eager) the gradient reaching the
    returned ``x`` is summed into the convolution's input gradient in the same pass, which saves
    autograd's separate add of the two branch gradients (one read and write of the activation).
    Otherwise this is ``(conv3x3(conv, x, kernels), x)``.
    """
    if kernels != "off" and not torch.compiler.is_compiling() and _applies(conv, x):
        if _all_pytorch(conv, x, kernels):
            return conv(x), x  # what conv3x3 would do, without asking again
        if conv.stride == (1, 1):
            return _Conv3x3Fork.apply(x, conv.weight, kernels)
    return conv3x3(conv, x, kernels), x


def conv3x3(conv: nn.Conv2d, x: torch.Tensor, kernels: str = "auto") -> torch.Tensor:
    """``conv(x)``, through the 3x3 bf16 CPU kernel where it applies and (``kernels="auto"``)
    where it was measured faster on this machine, pass by pass.

    ``x``: ``(N, C_in, H, W)``; returns ``(N, C_out, H', W')``. The kernel path needs a plain
    ``nn.Conv2d`` (3x3, stride 1 or 2, padding 1, no bias, fp32 weight), ``C_in`` and ``C_out``
    multiples of 16, ``x`` channels-last bf16 on CPU under ``torch.autocast("cpu",
    dtype=torch.bfloat16)``; its gradient for ``conv.weight`` is fp32. Otherwise, or with
    ``kernels="off"``, this is ``conv(x)``.
    """
    if kernels == "off" or not _applies(conv, x):
        return conv(x)
    if torch.compiler.is_compiling():
        return forward(x, conv.weight) if _compiled_all_kernel(conv, x, kernels) else conv(x)
    if _all_pytorch(conv, x, kernels):
        return conv(x)
    return _Conv3x3.apply(x, conv.weight, conv.stride[0], kernels)

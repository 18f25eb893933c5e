"""The C kernels as PyTorch custom ops: ``opcheck`` on every op, fake (meta) shapes, input
checks that raise before C sees a pointer, and the thread count taken from PyTorch."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from longtail.core.errors import KernelInputError
from longtail.models import conv3x3, fused_bn, kernels

CL = torch.channels_last
OPS = ("bn_relu_forward", "bn_relu_backward", "conv3x3_forward", "conv3x3_input_grad")


def bn_args(residual: bool, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 16, 5, 6, generator=g) + 0.3).to(dtype).contiguous(memory_format=CL)
    r = torch.randn(x.shape, generator=g).to(dtype).contiguous(memory_format=CL)
    w, b = torch.rand(16, generator=g) + 0.5, torch.rand(16, generator=g) - 0.5
    return x, (r if residual else None), w, b, 1e-5


def conv_args(stride: int = 1):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 6, 7, generator=g).bfloat16().contiguous(memory_format=CL)
    w = torch.randn(32, 16, 3, 3, generator=g) * 0.1
    ho, wo = (6 - 1) // stride + 1, (7 - 1) // stride + 1
    dy = torch.randn(2, 32, ho, wo, generator=g).bfloat16().contiguous(memory_format=CL)
    return x, w, dy


def test_every_op_is_registered_under_longtail():
    for name in (*OPS, "conv3x3_weight_grad"):
        assert hasattr(torch.ops.longtail, name), name


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_fused_bn_ops(residual, dtype):
    assert fused_bn.load_kernel() is not None, "the fused BatchNorm kernel failed to build"
    args = bn_args(residual, dtype)
    torch.library.opcheck(fused_bn.bn_relu_forward, args)
    y, stats = fused_bn.bn_relu_forward(*args)
    dy = torch.randn_like(y).contiguous(memory_format=CL)
    saved_y = y if residual else y.new_empty(0)
    torch.library.opcheck(fused_bn.bn_relu_backward, (dy, args[0], saved_y, stats))


@pytest.fixture
def conv_lib():
    if conv3x3.load_kernel() is None:
        pytest.skip(f"3x3 convolution kernel: {kernels.status('conv3x3')}")


def test_opcheck_conv_ops(conv_lib):
    x, w, dy = conv_args()
    torch.library.opcheck(conv3x3.forward, (x, w))
    torch.library.opcheck(conv3x3.input_grad, (dy, w))
    torch.library.opcheck(conv3x3.input_grad, (dy, w, torch.randn_like(x)))
    for stride in (1, 2):
        x, w, dy = conv_args(stride)
        torch.library.opcheck(conv3x3.weight_grad, (x, dy, w, stride))


def test_conv_fake_shapes_need_no_kernel():
    """What torch.compile / export see: shapes and layouts, on any CPU."""
    with FakeTensorMode():
        x, w, dy = conv_args()
        y = conv3x3.forward(x, w)
        dx = conv3x3.input_grad(dy, w)
        x2, _, dy2 = conv_args(2)
        dw = conv3x3.weight_grad(x2, dy2, w, 2)
    assert y.shape == (2, 32, 6, 7) and y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=CL) and dx.shape == x.shape
    assert dw.shape == w.shape and dw.dtype == torch.float32


def test_conv_kernel_unavailable_reason_names_the_instruction_set():
    if conv3x3.load_kernel() is not None:
        assert kernels.status("conv3x3") == "loaded"
    else:
        assert "needs AVX512-BF16" in kernels.status("conv3x3") or "build" in kernels.status(
            "conv3x3"
        )


@pytest.mark.parametrize(
    "bad,match",
    [
        ("fp16", "dtype torch.float16"),
        ("nchw", "not channels-last contiguous"),
        ("channels", "12 channels; the kernel needs a multiple of 16"),
        ("weight", r"weight has shape \(15,\)"),
        ("residual", r"residual has shape"),
        ("weight dtype", "weight has dtype torch.float64"),
        ("meta", "is on meta"),
    ],
)
def test_fused_bn_op_rejects_bad_inputs_with_a_clear_error(bad, match):
    x, r, w, b, eps = bn_args(True)
    if bad == "fp16":
        x = x.half()
    elif bad == "nchw":
        x = x.contiguous()
    elif bad == "channels":
        x = x[:, :12].contiguous(memory_format=CL)
    elif bad == "weight":
        w = w[:15]
    elif bad == "residual":
        r = r[:2]
    elif bad == "weight dtype":
        w = w.double()
    elif bad == "meta":
        x = x.to("meta")
    with pytest.raises(KernelInputError, match=match):
        fused_bn.bn_relu_forward(x, r, w, b, eps)


@pytest.mark.parametrize(
    "bad,match",
    [
        ("fp32 x", "x has dtype torch.float32"),
        ("nchw x", "not channels-last contiguous"),
        ("weight shape", r"weight has shape \(32, 8, 3, 3\)"),
        ("empty", "is empty"),
        ("stride 3", "stride 3"),
    ],
)
def test_conv_ops_reject_bad_inputs_before_the_kernel(bad, match):
    """These checks come first, so they hold on CPUs without the kernel too."""
    x, w, dy = conv_args()
    with pytest.raises(KernelInputError, match=match):
        if bad == "fp32 x":
            conv3x3.forward(x.float(), w)
        elif bad == "nchw x":
            conv3x3.forward(x.contiguous(), w)
        elif bad == "weight shape":
            conv3x3.forward(x, w[:, :8].contiguous())
        elif bad == "empty":
            conv3x3.forward(x[:0], w)
        else:
            conv3x3.weight_grad(x, dy, w, 3)


def test_kernel_threads_follow_torch():
    lib = fused_bn.load_kernel()
    assert lib is not None
    n = torch.get_num_threads()
    try:
        for want in (1, 2):
            torch.set_num_threads(want)
            kernels.set_threads(lib)
            assert lib.lt_max_threads() == want
    finally:
        torch.set_num_threads(n)

"""The 3x3 bf16 convolution kernel against PyTorch's convolution in float64."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.models import build_model, conv3x3
from longtail.models.conv3x3 import conv3x3 as conv_fn

CL = torch.channels_last
BF16_CPU = (
    "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
)


@pytest.fixture(scope="module")
def lib():
    """On an AVX512-BF16 CPU with a compiler (CI's machine) the kernel must really load."""
    if not BF16_CPU:
        pytest.skip("this CPU has no AVX512-BF16")
    lib = conv3x3.load_kernel()
    assert lib is not None, "the 3x3 convolution kernel failed to build"
    return lib


def bf16_data(n, ci, co, h, w, seed=0, stride=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, ci, h, w, generator=g).bfloat16().contiguous(memory_format=CL)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    dy = torch.randn(n, co, ho, wo, generator=g).bfloat16().contiguous(memory_format=CL)
    weight = torch.randn(co, ci, 3, 3, generator=g) * 0.1
    return x, dy, weight


def make_conv(weight, stride=1, memory_format=torch.contiguous_format) -> nn.Conv2d:
    conv = nn.Conv2d(weight.shape[1], weight.shape[0], 3, stride, 1, bias=False)
    conv = conv.to(memory_format=memory_format)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


def through_kernel(x, weight, dy, stride=1, memory_format=torch.contiguous_format):
    """Output and gradients (x, weight) of ``conv3x3`` under bf16 autocast."""
    conv = make_conv(weight, stride, memory_format)
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv_fn(conv, x, "on")
    y.backward(dy)
    return y, x.grad, conv.weight.grad


# (N, C_in, C_out, H, W, stride): ResNet-32's widths and its two stride-2 layers, Fashion-MNIST's
# odd sizes (28 -> 14 -> 7), one-pixel and non-square images, width changes.
SHAPES = [
    (4, 16, 16, 32, 32, 1),
    (4, 32, 32, 16, 16, 1),
    (4, 64, 64, 8, 8, 1),
    (3, 16, 16, 28, 28, 1),
    (3, 64, 64, 7, 7, 1),
    (2, 32, 32, 1, 1, 1),
    (2, 16, 32, 5, 11, 1),
    (2, 48, 16, 3, 2, 1),
    (4, 16, 32, 32, 32, 2),
    (4, 32, 64, 16, 16, 2),
    (3, 16, 32, 28, 28, 2),
    (3, 32, 64, 14, 14, 2),
    (2, 16, 16, 7, 5, 2),
    (2, 32, 16, 1, 1, 2),
    (2, 16, 48, 2, 3, 2),
]


@pytest.mark.parametrize("n,ci,co,h,w,stride", SHAPES)
def test_all_three_passes_match_float64(lib, n, ci, co, h, w, stride):
    x, dy, weight = bf16_data(n, ci, co, h, w, seed=ci + h, stride=stride)
    y, dx, dw = through_kernel(x, weight, dy, stride)
    assert y.dtype == dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    assert y.is_contiguous(memory_format=CL) and dx.is_contiguous(memory_format=CL)
    w64 = weight.bfloat16().double()  # what autocast feeds the convolution
    y64 = F.conv2d(x.double(), w64, stride=stride, padding=1)
    dx64 = torch.nn.grad.conv2d_input(x.shape, w64, dy.double(), stride=stride, padding=1)
    dw64 = torch.nn.grad.conv2d_weight(
        x.double(), weight.shape, dy.double(), stride=stride, padding=1
    )
    # bf16 outputs: within one bf16 rounding (2^-8 relative) of the exact value, plus fp32
    # accumulation noise relative to the largest value; dw is fp32 throughout.
    for got, exact in ((y, y64), (dx, dx64)):
        err = (got.double() - exact).abs()
        assert (err <= 2**-8 * exact.abs() + 1e-5 * exact.abs().max()).all()
    assert (dw.double() - dw64).abs().max() <= 1e-5 * dw64.abs().max()


def test_no_input_gradient_when_not_needed(lib):
    x, dy, weight = bf16_data(2, 16, 16, 6, 6)
    conv = nn.Conv2d(16, 16, 3, 1, 1, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = conv_fn(conv, x, "on")
    assert y.grad_fn is not None and "Conv3x3" in type(y.grad_fn).__name__
    y.backward(dy)
    assert conv.weight.grad is not None and x.grad is None


@pytest.mark.parametrize(
    "case",
    ["no autocast", "fp32 input", "nchw", "stride 3", "bias", "8 channels", "fast off", "empty"],
)
def test_anything_else_is_plain_conv2d(case):
    """Outside the kernel's cases conv3x3 is exactly ``conv(x)``, the same autograd graph."""
    ci = 8 if case == "8 channels" else 16
    conv = nn.Conv2d(ci, 16, 3, 3 if case == "stride 3" else 1, 1, bias=case == "bias")
    x = torch.randn(0 if case == "empty" else 2, ci, 6, 6)
    if case != "fp32 input":
        x = x.bfloat16()
    if case != "nchw":
        x = x.contiguous(memory_format=CL)
    mode = "off" if case == "fast off" else "on"
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case != "no autocast"):
        if case == "no autocast":
            conv = conv.bfloat16()
        y = conv_fn(conv, x, mode)
        expected = conv(x)
    assert "Conv3x3" not in type(y.grad_fn).__name__
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_resnet32_training_step_same_as_onednn(lib):
    """A whole bf16 step with and without the kernel: same loss, same gradients up to bf16.

    bf16 autocast alone puts a freshly initialised ResNet-32's conv gradients 10-40% (relative
    norm) away from float64, whichever convolution computes them; so each path is compared with
    float64 and must be no further from it than oneDNN's path is (plus 2 points).
    """
    torch.manual_seed(0)
    base = build_model("resnet32", 10).to(memory_format=CL).train()
    x = torch.randn(32, 3, 32, 32).contiguous(memory_format=CL)
    target = torch.randint(0, 10, (32,))
    ref = copy.deepcopy(base).double()
    ref.kernels = "off"
    F.cross_entropy(ref(x.double()), target).backward()

    def step(fast: bool) -> tuple[float, nn.Module]:
        model = copy.deepcopy(base)
        model.kernels = {"fused_bn": "on", "conv3x3": "on" if fast else "off"}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), target)
        loss.backward()
        return loss.item(), model

    (loss_a, a), (loss_b, b) = step(True), step(False)
    assert abs(loss_a - loss_b) < 1e-2 * abs(loss_b)
    assert a.kernels == "on" and b.kernels == {"fused_bn": "on", "conv3x3": "off"}
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), ref.parameters(), strict=True):
        if p.dim() == 4:
            err_fast = float((p.grad.double() - r.grad).norm() / r.grad.norm())
            err_onednn = float((q.grad.double() - r.grad).norm() / r.grad.norm())
            assert err_fast <= err_onednn + 0.02, name


def test_channels_last_weight_gives_the_same_results(lib):
    """``model.to(memory_format=channels_last)`` makes conv weights channels-last: the kernel
    reads them in place and returns their gradient with the same strides."""
    x, dy, weight = bf16_data(2, 32, 16, 6, 7)
    y, dx, dw = through_kernel(x, weight, dy)
    y_cl, dx_cl, dw_cl = through_kernel(x, weight, dy, memory_format=CL)
    assert dw_cl.stride() == weight.contiguous(memory_format=CL).stride() != weight.stride()
    torch.testing.assert_close(y_cl, y, rtol=0, atol=0)
    torch.testing.assert_close(dx_cl, dx, rtol=0, atol=0)
    torch.testing.assert_close(dw_cl, dw, rtol=0, atol=0)


@pytest.mark.parametrize("use", ["both", "conv only", "identity only"])
def test_fork_sums_both_branch_gradients_in_the_kernel(lib, use):
    """``conv3x3_fork``: ``(conv(x), x)``; x's gradient is the conv branch's plus the identity
    branch's, summed inside the input-gradient kernel (one bf16 rounding)."""
    x, dy, weight = bf16_data(3, 32, 32, 9, 10, seed=5)
    dres = torch.randn(x.shape, generator=torch.Generator().manual_seed(6)).bfloat16()
    conv = make_conv(weight)
    xg = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, r = conv3x3.conv3x3_fork(conv, xg, "on")
    assert "Fork" in type(y.grad_fn).__name__ and r.data_ptr() == xg.data_ptr()
    torch.testing.assert_close(r, x, rtol=0, atol=0)
    outputs = {"both": [y, r], "conv only": [y], "identity only": [r]}[use]
    grads = {"both": [dy, dres], "conv only": [dy], "identity only": [dres]}[use]
    torch.autograd.backward(outputs, grads)
    w64 = weight.bfloat16().double()
    expected = torch.zeros(x.shape, dtype=torch.float64)
    if use != "identity only":
        expected += torch.nn.grad.conv2d_input(x.shape, w64, dy.double(), padding=1)
        dw64 = torch.nn.grad.conv2d_weight(x.double(), weight.shape, dy.double(), padding=1)
        assert (conv.weight.grad.double() - dw64).abs().max() <= 1e-5 * dw64.abs().max()
    else:
        assert conv.weight.grad is None
    if use != "conv only":
        expected += dres.double()
    err = (xg.grad.double() - expected).abs()
    assert (err <= 2**-8 * expected.abs() + 1e-5 * expected.abs().max()).all()


def test_fork_outside_the_kernel_returns_x_itself():
    conv = nn.Conv2d(16, 16, 3, 1, 1, bias=False)
    x = torch.randn(2, 16, 5, 5)  # fp32, no autocast: PyTorch's convolution
    y, r = conv3x3.conv3x3_fork(conv, x)
    assert r is x
    torch.testing.assert_close(y, conv(x), rtol=0, atol=0)


def test_zero_width_image_gets_pytorchs_error_not_a_crash():
    conv = nn.Conv2d(16, 16, 3, 1, 1, bias=False)
    x = torch.randn(2, 16, 1, 0).bfloat16().contiguous(memory_format=CL)
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="Kernel"):
        conv_fn(conv, x, "on")


def graph_nodes(t: torch.Tensor) -> set[str]:
    """Names of the autograd nodes ``t`` was computed through."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("kernel_faster", [False, True])
def test_auto_runs_each_pass_where_the_timer_ranks_it_first(
    lib, monkeypatch, tmp_path, kernel_faster
):
    """ResNet-32 under kernels=auto and bf16 autocast, an injected timer: every convolution pass
    (forward, input gradient, weight gradient, per shape) is timed on real tensors, and the
    kernel runs only where it was ranked faster; the training step's loss is the same."""
    from longtail.models import autotune

    monkeypatch.setenv("LONGTAIL_CACHE_DIR", str(tmp_path))
    autotune.forget()
    timed: list[str] = []

    def timer(name, fn):
        fn()
        timed.append(name)
        kernel, pytorch = (1.0, 2.0) if kernel_faster else (2.0, 1.0)
        return pytorch if name == "pytorch" else kernel  # "kernel", or "kernels": a whole step

    calls: list[int] = []  # every kernel pass fetches the library through _lib()
    real_lib = conv3x3._lib
    monkeypatch.setattr(conv3x3, "_lib", lambda: calls.append(1) or real_lib())
    autotune.use_timer(timer)
    try:
        torch.manual_seed(0)
        model = build_model("resnet32", 10, kernels="auto").to(memory_format=CL).train()
        ref = copy.deepcopy(model)
        ref.kernels = {"conv3x3": "off", "fused_bn": "auto"}
        x = torch.randn(8, 3, 16, 16).contiguous(memory_format=CL)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            table = autotune.tune_model(model, x)
        assert not autotune.apply_step_verdict(model, table)
        passes = {k.split("|")[0] for k in table if k.startswith("conv3x3.")}
        assert passes == {"conv3x3.forward", "conv3x3.input_grad", "conv3x3.weight_grad"}
        conv_keys = [k for k in table if k.startswith("conv3x3.")]
        assert {table[k].choice for k in conv_keys} == {"kernel" if kernel_faster else "pytorch"}
        calls.clear()
        losses = []
        for m in (model, ref):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(m(x).float(), torch.arange(8))
            if m is model:
                nodes = graph_nodes(loss)
            loss.backward()
            losses.append(loss.item())
        assert bool(calls) == kernel_faster
        # where PyTorch won every pass, autograd records PyTorch's own convolution node (one
        # backward call for both gradients), not the per-pass wrapper
        wrapped = {"_Conv3x3Backward", "_Conv3x3ForkBackward"} & nodes
        assert bool(wrapped) == kernel_faster, nodes
        assert abs(losses[0] - losses[1]) < 1e-2 * abs(losses[1])
    finally:
        autotune.use_timer(None)
        autotune.forget()

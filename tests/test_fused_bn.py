"""The fused BatchNorm(+residual)+ReLU CPU kernel against PyTorch's own ops in float64."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.models import build_model, fused_bn, kernels
from longtail.models.fused_bn import bn_relu

CL = torch.channels_last


def make_bn(c: int, seed: int = 0) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.rand(c, generator=g) - 0.5)
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


def run(bn, x, res, gy, fused):
    """Outputs and gradients of relu(bn(x) + res) in x's dtype, returned in float64."""
    x = x.detach().clone().requires_grad_()
    res = None if res is None else res.detach().clone().requires_grad_()
    bn.zero_grad(set_to_none=True)
    y = bn_relu(bn, x, res, kernels="on" if fused else "off")
    y.backward(gy.to(y.dtype))
    out = {"y": y, "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad}
    out |= {"rm": bn.running_mean, "rv": bn.running_var}
    if res is not None:
        out["dres"] = res.grad
    return {k: v.detach().double() for k, v in out.items()}


def reference(bn, x, res, gy):
    """The same computation with PyTorch's ops in float64."""
    bn64 = copy.deepcopy(bn).double()
    x64 = x.detach().double().contiguous()
    r64 = None if res is None else res.detach().double().contiguous()
    return run(bn64, x64, r64, gy.double(), fused=False)


def data(c, hw, residual, dtype, seed=0, offset=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(8, c, hw, hw, generator=g) * 2 + offset
    r = torch.randn(8, c, hw, hw, generator=g) if residual else None
    gy = torch.randn(8, c, hw, hw, generator=g)
    cast = lambda t: None if t is None else t.to(dtype).contiguous(memory_format=CL)  # noqa: E731
    return cast(x), cast(r), gy


def rel_err(a: torch.Tensor, b: torch.Tensor, keep: torch.Tensor | None = None) -> float:
    d = (a - b).abs()
    if keep is not None:
        d = d[keep]
    return float(d.max() / b.abs().max())


@pytest.fixture(scope="module", autouse=True)
def kernel():
    """CI has a C compiler: the fused path must really be built, not silently skipped."""
    lib = fused_bn.load_kernel()
    assert lib is not None, "the fused BatchNorm kernel failed to build"
    return lib


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("c,hw", [(16, 12), (32, 6), (64, 3)])
def test_fp32_matches_float64_reference(c, hw, residual):
    x, r, gy = data(c, hw, residual, torch.float32, seed=c)
    bn = make_bn(c)
    ref = reference(bn, x, r, gy)
    got = run(copy.deepcopy(bn), x, r, gy, fused=True)
    # Elements whose pre-ReLU value is within 1e-4 of 0 may flip their ReLU mask by rounding.
    z = F.batch_norm(x.double(), None, None, bn.weight.double(), bn.bias.double(), training=True)
    keep = (z + (0 if r is None else r.double())).abs() > 1e-4
    assert rel_err(got["y"], ref["y"]) < 1e-5
    for k in ["dx"] + (["dres"] if residual else []):
        assert rel_err(got[k], ref[k], keep) < 1e-4, k
    for k in ("dw", "db", "rm", "rv"):
        assert rel_err(got[k], ref[k]) < 1e-4, k


@pytest.mark.parametrize("residual", [False, True])
def test_bf16_no_less_accurate_than_pytorch_bf16(residual):
    x, r, gy = data(32, 8, residual, torch.bfloat16, seed=3)
    bn = make_bn(32, seed=1)
    ref = reference(bn, x, r, gy)
    native = run(copy.deepcopy(bn), x, r, gy, fused=False)
    fused = run(copy.deepcopy(bn), x, r, gy, fused=True)
    for k in ref:
        e_native, e_fused = rel_err(native[k], ref[k]), rel_err(fused[k], ref[k])
        # bf16 has 8 bits of mantissa; PyTorch rounds after BN and again after the add
        assert e_fused <= max(1.5 * e_native, 1e-2), (k, e_fused, e_native)
    assert fused["y"].dtype == torch.float64  # (converted by run); the op itself returns bf16
    assert bn_relu(copy.deepcopy(bn), x, r, kernels="on").dtype == torch.bfloat16


def test_large_mean_keeps_variance_accurate():
    """Sums are taken around the first pixel, so |mean| >> std does not cancel the variance."""
    x, _, gy = data(16, 8, False, torch.float32, offset=1000.0)
    bn = make_bn(16)
    ref = reference(bn, x, None, gy)
    got = run(copy.deepcopy(bn), x, None, gy, fused=True)
    assert rel_err(got["rv"], ref["rv"]) < 1e-4
    assert rel_err(got["y"], ref["y"]) < 1e-3


def test_running_statistics_and_cumulative_momentum():
    x, r, _ = data(16, 4, True, torch.float32)
    for momentum in (0.1, None):
        a, b = make_bn(16), make_bn(16)
        a.momentum = b.momentum = momentum
        with torch.no_grad():
            for i in range(3):
                bn_relu(a, x * (i + 1), r, kernels="off")
                bn_relu(b, x * (i + 1), r, kernels="on")
        assert int(b.num_batches_tracked) == int(a.num_batches_tracked) == 3
        torch.testing.assert_close(b.running_mean, a.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(b.running_var, a.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case", ["eval", "nchw", "channels_not_multiple_of_16", "sync_bn_type", "fp16", "one_pixel"]
)
def test_cases_the_kernel_does_not_cover_fall_back_to_pytorch(case):
    c = 8 if case == "channels_not_multiple_of_16" else 16
    dtype = torch.float16 if case == "fp16" else torch.float32
    x, r, _ = data(c, 4, True, dtype)
    if case == "one_pixel":  # PyTorch's own error ("more than 1 value per channel"), not NaNs
        x, r = x[:1, :, :1, :1], r[:1, :, :1, :1]
        assert not fused_bn._fusable(make_bn(c), x, r)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            bn_relu(make_bn(c), x, r)
        return
    if case == "nchw":
        x, r = x.contiguous(), r.contiguous()
    bn = make_bn(c)
    if case == "eval":
        bn.eval()
    if case == "sync_bn_type":  # a BatchNorm2d subclass is not the plain module the kernel mirrors
        bn.__class__ = type("MyBN", (nn.BatchNorm2d,), {})
    assert not fused_bn._fusable(bn, x, r)
    expected = F.relu(copy.deepcopy(bn)(x) + r)
    torch.testing.assert_close(bn_relu(bn, x, r), expected)


def test_resnet32_training_step_matches_unfused():
    torch.manual_seed(0)
    a = build_model("resnet32", 10, kernels="on").to(memory_format=CL)
    b = copy.deepcopy(a)
    b.kernels = {"fused_bn": "off", "conv3x3": "on"}
    blocks = [m for m in b.modules() if hasattr(m, "kernels") and m is not b]
    assert blocks and all(m.kernels["fused_bn"] == "off" for m in blocks)
    x = torch.randn(16, 3, 16, 16).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (16,))
    for model in (a, b):
        model.train()
        F.cross_entropy(model(x), y).backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
    for (name, s), t in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(s, t, rtol=1e-4, atol=1e-6, msg=name)
    a.eval()
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)


def test_kernel_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGTAIL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(kernels, "_libs", {})
    assert fused_bn.load_kernel() is not None
    built = list((tmp_path / "kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"  # no temp file left behind
    kernels.forget("fused_bn")

    def no_compiler(*args, **kwargs):
        raise AssertionError("the cached kernel should have been reused")

    monkeypatch.setattr(kernels.subprocess, "run", no_compiler)
    assert fused_bn.load_kernel() is not None


def test_without_a_compiler_it_warns_once_and_computes_the_same(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGTAIL_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "longtail-no-such-compiler")
    monkeypatch.setattr(kernels, "_libs", {})
    monkeypatch.setattr(kernels, "_failed", {})
    x, r, _ = data(16, 4, True, torch.float32)
    bn = make_bn(16)
    with pytest.warns(RuntimeWarning, match="could not be built.*kernels=off"):
        y = bn_relu(copy.deepcopy(bn), x, r, kernels="on")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn_relu(copy.deepcopy(bn), x, r, kernels="on")  # no second warning
    torch.testing.assert_close(y, F.relu(bn(x) + r))
    assert not list((tmp_path / "kernels").glob("*.so"))

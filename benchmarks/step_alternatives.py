"""Alternatives for a ResNet-32 bf16 training step that were measured and not adopted.

    python benchmarks/step_alternatives.py [--rounds 6]
    OMP_WAIT_POLICY=ACTIVE python benchmarks/step_alternatives.py --only step   # libgomp's wait
    GOMP_SPINCOUNT=0 python benchmarks/step_alternatives.py --only step

Kept so that the next machine can measure them again (docs/RESULTS.md, issue 16):

1. ``wgrad``: a 3x3 convolution's weight gradient as nine bf16 GEMMs, one per tap, over a
   zero-padded pixel grid (each tap a contiguous row slice, so no im2col copy), against oneDNN's
   ``convolution_backward``, on ResNet-32's three stride-1 shapes at batch 128; the largest
   error of each against a float64 reference is printed too;
2. ``step``: the bare training step (forward, cross-entropy, backward, SGD with momentum 0.9 and
   weight decay) with ``torch.optim.SGD``'s default for-loop against ``fused=True``, in
   interleaved blocks of 20 steps; run it under the two environment variables above to see
   libgomp's wait policy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from longtail.core.runtime import make_runtime
from longtail.models import autotune, build_model
from longtail.models.doctor import cpu_report

CL = torch.channels_last


def median_ms(fn, n: int = 30) -> float:
    """Median milliseconds per call after 5 warm-up calls."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def weight_grad_gemm(x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """Weight gradient ``(O, C, 3, 3)`` of a stride-1, padding-1 3x3 convolution from its input
    ``x`` ``(N, C, H, W)`` and output gradient ``dy`` ``(N, O, H, W)`` (bf16, channels-last)."""
    n, c, h, w = x.shape
    o = dy.shape[1]
    hp, wp = h + 2, w + 2
    rows = n * hp * wp
    xp = x.new_zeros(rows + 2 * wp + 2, c)  # the padded input, pixels as rows, room for taps
    xp[:rows].view(n, hp, wp, c)[:, 1 : h + 1, 1 : w + 1].copy_(x.permute(0, 2, 3, 1))
    dyt = dy.new_zeros(o, n, hp, wp)  # dy on the same grid, zero outside the image, transposed
    dyt[:, :, :h, :w].copy_(dy.permute(1, 0, 2, 3))
    dyt = dyt.view(o, rows)
    out = torch.empty(3, 3, o, c, dtype=x.dtype)
    for kh in range(3):
        for kw in range(3):
            off = kh * wp + kw
            torch.mm(dyt, xp[off : off + rows], out=out[kh, kw])
    return out.permute(2, 3, 0, 1)


def wgrad() -> None:
    for c, hw in ((16, 32), (32, 16), (64, 8)):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(128, c, hw, hw, generator=g).bfloat16().contiguous(memory_format=CL)
        dy = torch.randn(128, c, hw, hw, generator=g).bfloat16().contiguous(memory_format=CL)
        wt = (torch.randn(c, c, 3, 3, generator=g) * 0.1).bfloat16()

        def onednn(x=x, dy=dy, wt=wt):
            return torch.ops.aten.convolution_backward(
                dy, x, wt, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
            )[1]

        ref = torch.ops.aten.convolution_backward(
            dy.double(), x.double(), wt.double(), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
            [False, True, False],
        )[1]  # fmt: skip
        scale = ref.abs().max()
        err_o = float((onednn().double() - ref).abs().max() / scale)
        err_g = float((weight_grad_gemm(x, dy).double() - ref).abs().max() / scale)
        t_o, t_g = median_ms(onednn), median_ms(lambda x=x, dy=dy: weight_grad_gemm(x, dy))
        print(
            f"wgrad {c} ch {hw}x{hw}: oneDNN {t_o:.3f} ms, nine GEMMs {t_g:.3f} ms "
            f"(max error / max |ref|: {err_o:.2e}, {err_g:.2e})"
        )


def step(rounds: int) -> None:
    rt = make_runtime("cpu", "auto", channels_last=True, bf16_faster=autotune.bf16_faster)
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=CL)
    y = torch.randint(0, 10, (128,))

    def make(**kw):
        torch.manual_seed(0)
        model = build_model("resnet32", 10, kernels="auto").to(memory_format=CL).train()
        autotune.apply_step_verdict(model, autotune.tune_model(model, x, rt.autocast()))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4, **kw)

        def one():
            with rt.autocast():
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return one

    variants = {"for-loop SGD": make(), "fused SGD": make(fused=True)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn in variants.values():
        for _ in range(5):
            fn()
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(20):
                fn()
            times[name].append((time.perf_counter() - t0) / 20 * 1e3)
    for name, t in times.items():
        print(f"step, {name}: {statistics.median(t):.2f} ms (blocks {min(t):.1f}-{max(t):.1f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=6, help="interleaved blocks of 20 steps")
    ap.add_argument("--only", choices=("wgrad", "step"), help="one of the two measurements")
    a = ap.parse_args()
    print("\n".join(cpu_report()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if a.only in (None, "wgrad"):
        wgrad()
    if a.only in (None, "step"):
        step(a.rounds)


if __name__ == "__main__":
    main()

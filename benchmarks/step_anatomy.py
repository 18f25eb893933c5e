"""Where a ResNet-32 bf16 training step spends its time on this CPU.

    python benchmarks/step_anatomy.py [--rounds 4] [--skip-compile]

Random 32x32x3 data, batch 128, SGD momentum 0.9; every comparison is interleaved in one process
(medians of ``--rounds`` trials) so a slow spell of the machine hits all variants alike:

1. layout x precision: NCHW / channels-last, fp32 / bf16 autocast, and channels-last bf16 with
   longtail's 3x3 convolution kernel and/or fused BatchNorm+ReLU kernel switched off;
2. eager vs ``torch.compile`` (channels-last bf16);
3. thread scaling: 1 thread at batch 64 vs all threads at batch 128;
4. the convolutions alone: each pass (forward, input gradient, weight gradient) of each of
   ResNet-32's convolution shapes, oneDNN vs the kernel, summed over the network's layers, as
   GFLOP/s and as a share of the bf16 matmul peak measured in the same run;
5. BatchNorm + ReLU forward and backward on one activation of each stage (memory-bound part),
   PyTorch's ops vs the fused kernel.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.core.runtime import retain_freed_memory
from longtail.models import build_model, conv3x3
from longtail.models.fused_bn import bn_relu

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import GFLOP_PER_IMAGE, matmul_peak  # noqa: E402

BATCH = 128
ON = "channels-last bf16, both kernels on"  # forced on: compare it with the rows below


def make_step(
    channels_last: bool,
    bf16: bool,
    compiled: bool = False,
    batch: int = BATCH,
    fused: bool = True,
    fast_conv: bool = True,
):
    """A closure running one SGD step of ResNet-32 on fixed random data."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model("resnet32", 10).to(memory_format=fmt)
    model.kernels = {"fused_bn": "on" if fused else "off", "conv3x3": "on" if fast_conv else "off"}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    net = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(4):
        step()
    return step


def interleaved(steps: dict, rounds: int, n: int = 8, batch: dict | None = None) -> dict:
    """Median img/s of each closure over ``rounds`` interleaved trials of ``n`` steps.

    ``batch[name] = (images per step, threads)`` for closures not at ``BATCH`` on all threads.
    """
    rates: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for k, step in steps.items():
            threads = (batch or {}).get(k, (BATCH, torch.get_num_threads()))
            saved = torch.get_num_threads()
            torch.set_num_threads(threads[1])
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            rates[k].append(n * threads[0] / (time.perf_counter() - t0))
            torch.set_num_threads(saved)
    return {k: statistics.median(v) for k, v in rates.items()}


# ResNet-32's convolutions on 32x32 inputs: (C_in, C_out, input side, stride, layers).
CONVS = [(3, 16, 32, 1, 1), (16, 16, 32, 1, 10), (16, 32, 32, 2, 1), (32, 32, 16, 1, 9),
         (32, 64, 16, 2, 1), (64, 64, 8, 1, 9)]  # fmt: skip


def conv_pass_ms(ci: int, co: int, side: int, stride: int, reps: int = 15) -> dict[str, float]:
    """Median ms of each pass of one bf16 channels-last convolution, batch 128, oneDNN vs the
    kernel (interleaved). Keys ``onednn fwd|dx|dw`` and ``kernel fwd|dx|dw``; a pass the kernel
    leaves to oneDNN (stride 2 forward and input gradient, the 3-channel stem) is absent."""
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(BATCH, ci, side, side, generator=g).bfloat16().contiguous(memory_format=cl)
    w32 = torch.randn(co, ci, 3, 3, generator=g).contiguous(memory_format=cl)
    w = w32.bfloat16()
    out = (side - 1) // stride + 1
    dy = torch.randn(BATCH, co, out, out, generator=g).bfloat16().contiguous(memory_format=cl)
    s = [stride, stride]

    def onednn_grad(mask):
        return lambda: torch.ops.aten.convolution_backward(
            dy, x, w, None, s, [1, 1], [1, 1], False, [0, 0], 1, mask
        )

    passes = {
        "onednn fwd": lambda: F.conv2d(x, w, stride=stride, padding=1),
        "onednn dx": onednn_grad([True, False, False]),
        "onednn dw": onednn_grad([False, True, False]),
    }
    if ci % 16 == 0 and conv3x3.load_kernel() is not None:
        if stride == 1:
            passes["kernel fwd"] = lambda: conv3x3.forward(x, w32)
            passes["kernel dx"] = lambda: conv3x3.input_grad(dy, w32)
        passes["kernel dw"] = lambda: conv3x3.weight_grad(x, dy, w32, stride)
    times: dict[str, list[float]] = collections.defaultdict(list)
    for i in range(reps + 2):
        for k, f in passes.items():
            t0 = time.perf_counter()
            f()
            if i >= 2:
                times[k].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def bn_relu_ms(channels: int, side: int, reps: int = 30) -> dict[str, float]:
    """Median ms of BatchNorm + ReLU, bf16 channels-last, batch 128: PyTorch's BN forward, ReLU
    and their backward, and the fused kernel's forward and backward (interleaved)."""
    bn = nn.BatchNorm2d(channels)
    x = torch.randn(BATCH, channels, side, side).bfloat16()
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn_like(x)
    times: dict[str, list[float]] = collections.defaultdict(list)
    for i in range(reps + 3):
        t0 = time.perf_counter()
        y = bn(x)
        t1 = time.perf_counter()
        z = F.relu(y, inplace=True)
        t2 = time.perf_counter()
        z.backward(g)
        t3 = time.perf_counter()
        x.grad = None
        z = bn_relu(bn, x, kernels="on")
        t4 = time.perf_counter()
        z.backward(g)
        t5 = time.perf_counter()
        x.grad = None
        if i >= 3:
            for k, t in zip(
                ("bn", "relu", "bwd", "fused fwd", "fused bwd"),
                (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4),
                strict=True,
            ):
                times[k].append(1e3 * t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--skip-compile", action="store_true")
    a = ap.parse_args()
    retain_freed_memory()  # as make_runtime() does for every CPU run
    n_threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {n_threads} threads, batch {BATCH}")
    peak = matmul_peak()
    print(f"bf16 matmul peak: {peak:.1f} GFLOP/s")

    print("\n1. layout x precision (img/s, median of interleaved trials)")
    modes = {
        "NCHW fp32": make_step(False, False),
        "channels-last fp32": make_step(True, False),
        "NCHW bf16": make_step(False, True),
        ON: make_step(True, True),
        "  same, conv kernel off": make_step(True, True, fast_conv=False),
        "  same, BN unfused": make_step(True, True, fused=False),
        "  same, both off": make_step(True, True, fused=False, fast_conv=False),
    }
    mode_rates = interleaved(modes, a.rounds)
    for k, r in mode_rates.items():
        print(f"   {k:40s} {r:7.1f}   {100 * r * GFLOP_PER_IMAGE / peak:5.1f} % of peak")
    step_ms = 1e3 * BATCH / mode_rates[ON]

    if not a.skip_compile:
        print("\n2. eager vs torch.compile (channels-last bf16)")
        both = {"eager": modes[ON], "compiled": make_step(True, True, True)}
        for k, r in interleaved(both, a.rounds).items():
            print(f"   {k:20s} {r:7.1f}")

    print("\n3. thread scaling (channels-last bf16)")
    scale = {f"{n_threads} threads, batch {BATCH}": modes[ON]}
    one = f"1 thread, batch {BATCH // 2}"
    scale[one] = make_step(True, True, batch=BATCH // 2)
    rates = interleaved(scale, a.rounds, batch={one: (BATCH // 2, 1)})
    for k, r in rates.items():
        print(f"   {k:20s} {r:7.1f}")
    print(f"   scaling efficiency {rates[next(iter(rates))] / (n_threads * rates[one]):.0%}")

    print("\n4. convolutions per pass, bf16 channels-last, batch 128 (median ms, oneDNN / kernel)")
    print(f"   {'C_in->C_out side stride':26s} layers   forward       input grad    weight grad")
    totals = {"onednn": 0.0, "kernel": 0.0}
    flop = 0.0
    for ci, co, side, stride, layers in CONVS:
        t = conv_pass_ms(ci, co, side, stride)
        passes = ("fwd", "dw") if ci == 3 else ("fwd", "dx", "dw")  # the stem needs no dx
        out = (side - 1) // stride + 1
        flop += layers * len(passes) * 2 * BATCH * out * out * ci * co * 9
        cells = []
        for p in ("fwd", "dx", "dw"):
            if p not in passes:
                cells.append(f"{'-':13s}")
                continue
            ours = t.get(f"kernel {p}", t[f"onednn {p}"])  # what the fast step runs
            totals["onednn"] += layers * t[f"onednn {p}"]
            totals["kernel"] += layers * ours
            k = f"{t[f'kernel {p}']:.2f}" if f"kernel {p}" in t else "="
            cells.append(f"{t[f'onednn {p}']:5.2f} / {k:5s}")
        name = f"{ci:2d}->{co:2d} {side:2d}x{side:<2d} s{stride}"
        print(f"   {name:26s} {layers:6d}   " + " ".join(cells))
    for k, total in totals.items():
        gflops = flop / 1e9 / (total / 1e3)
        print(
            f"   {k:6s}: all convolutions of a step {total:5.1f} ms = {gflops:4.0f} GFLOP/s = "
            f"{100 * gflops / peak:3.0f} % of peak"
        )
    conv_ms = totals["kernel"] if conv3x3.load_kernel() is not None else totals["onednn"]
    print(
        f"   the whole step takes {step_ms:.1f} ms, so {step_ms - conv_ms:.1f} ms "
        f"({100 * (1 - conv_ms / step_ms):.0f} %) is everything else"
    )
    need = 0.55 * peak / GFLOP_PER_IMAGE
    print(
        f"   55 % of peak = {need:.0f} img/s = a {1e3 * BATCH / need:.0f} ms step, leaving "
        f"{1e3 * BATCH / need - conv_ms:.0f} ms beside the convolutions"
    )

    print("\n5. BatchNorm + ReLU on one activation, bf16 channels-last (median ms)")
    for c, side in ((16, 32), (32, 16), (64, 8)):
        t = bn_relu_ms(c, side)
        mb = BATCH * c * side * side * 2 / 1e6
        print(
            f"   {c:2d} x {side:2d}x{side:<2d} ({mb:4.1f} MB): PyTorch BN fwd {t['bn']:.2f} + ReLU "
            f"{t['relu']:.2f} + backward {t['bwd']:.2f} = {t['bn'] + t['relu'] + t['bwd']:.2f} ms; "
            f"fused {t['fused fwd']:.2f} + {t['fused bwd']:.2f} = "
            f"{t['fused fwd'] + t['fused bwd']:.2f} ms"
        )


if __name__ == "__main__":
    main()

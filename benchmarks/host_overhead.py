"""What a ResNet-32 bf16 training step spends outside the convolutions and BatchNorm kernels.

    python benchmarks/host_overhead.py [--rounds 10]

Three figures, each a median over interleaved rounds in one process (a slow spell of the machine
hits every variant alike):

1. the batch augmentation of the in-memory loader: ``random_crop_flip`` (pad 4, flip) then
   ``normalize`` to channels-last float32, per 128 x 3 x 32 x 32 uint8 batch;
2. the per-call routing of ``kernels=auto`` (which op runs a convolution or a BatchNorm, from
   the autotune's decisions), timed on one decided 16-channel 32 x 32 layer;
3. the ResNet-32 forward at batch 128 under bf16 autocast, as routed, against the same model
   whose layers call the decided ops directly (no routing): the difference is what routing costs
   per forward, Python and the gaps it leaves between kernels together.

Prints the CPU (model, flags) and torch version first; run it twice, on two commits, to compare.
"""

from __future__ import annotations

import argparse
import statistics
import time
import timeit

import torch

from longtail.core.runtime import make_runtime
from longtail.data.augment import normalize, random_crop_flip
from longtail.models import autotune, build_model, conv3x3, fused_bn, resnet_cifar
from longtail.models.doctor import cpu_report

CL = torch.channels_last


def per_call_us(fn, number: int = 5000) -> float:
    """Median microseconds per call of ``fn`` over 5 timeit repeats."""
    return statistics.median(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help="interleaved rounds; medians reported")
    a = ap.parse_args()
    print("\n".join(cpu_report()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (128, 3, 32, 32), dtype=torch.uint8, generator=g)
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
    crop = per_call_us(lambda: random_crop_flip(images, 4, True, g), 400)
    cropped = random_crop_flip(images, 4, True, g)
    norm = per_call_us(lambda: normalize(cropped, mean, std, channels_last=True), 400)
    print(f"augmentation per batch: crop+flip {crop / 1e3:.3f} ms, normalize {norm / 1e3:.3f} ms")

    rt = make_runtime("cpu", "auto", channels_last=True, bf16_faster=autotune.bf16_faster)
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=CL)
    model = build_model("resnet32", 10, kernels="auto").to(memory_format=CL).train()
    autotune.apply_step_verdict(model, autotune.tune_model(model, x, rt.autocast()))
    block = model.layers[1]
    h = torch.randn(128, 16, 32, 32).bfloat16().contiguous(memory_format=CL).requires_grad_()
    with rt.autocast():
        conv_us = per_call_us(lambda: conv3x3._all_pytorch(block.conv1, h, "auto"))
        applies_us = per_call_us(lambda: conv3x3._applies(block.conv1, h))
        bn_us = per_call_us(lambda: fused_bn._decide(block.bn1, h, None))
        fusable_us = per_call_us(lambda: fused_bn._fusable(block.bn1, h, None))
    print(
        f"routing per call: convolution {applies_us:.2f} us applies + {conv_us:.2f} us decided; "
        f"BatchNorm {fusable_us:.2f} us fusable + {bn_us:.2f} us decided"
    )

    routed = (resnet_cifar.conv3x3, resnet_cifar.conv3x3_fork, resnet_cifar.bn_relu)
    choice: dict[torch.nn.Module, str] = {}  # each BatchNorm layer's decision, noted once
    real_decide = fused_bn._decide

    def noting(bn, t, residual):
        choice[bn] = real_decide(bn, t, residual)
        return choice[bn]

    fused_bn._decide = noting
    with rt.autocast():
        model(x)
    fused_bn._decide = real_decide

    def direct_bn(bn, t, residual=None, kernels="auto"):
        if choice.get(bn) == "kernel":
            return fused_bn._kernel_path(bn, t, residual)
        return fused_bn._pytorch_path(bn, t, residual)

    direct = (
        lambda conv, t, kernels="auto": conv(t),
        lambda conv, t, kernels="auto": (conv(t), t),
        direct_bn,
    )
    decided = {k: d.choice for k, d in autotune.used().items() if k.startswith("conv3x3.")}
    if model.kernels != "off" and any(c != autotune.BASELINE for c in decided.values()):
        print("some convolution pass runs in the kernel here: the direct variant does not apply")
        return
    times: dict[str, list[float]] = {"routed": [], "direct": []}
    for _ in range(a.rounds):
        for name, fns in (("routed", routed), ("direct", direct)):
            resnet_cifar.conv3x3, resnet_cifar.conv3x3_fork, resnet_cifar.bn_relu = fns
            with rt.autocast():
                model(x)
                t0 = time.perf_counter()
                for _ in range(10):
                    model(x)
            times[name].append((time.perf_counter() - t0) / 10 * 1e3)
    resnet_cifar.conv3x3, resnet_cifar.conv3x3_fork, resnet_cifar.bn_relu = routed
    r, d = statistics.median(times["routed"]), statistics.median(times["direct"])
    print(f"forward, batch 128: routed {r:.2f} ms, direct {d:.2f} ms, routing {r - d:.2f} ms")


if __name__ == "__main__":
    main()

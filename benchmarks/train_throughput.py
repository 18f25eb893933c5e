"""Stage-1 training throughput: longtail's ResNet-32 step vs the loop the public LT repos use.

    python benchmarks/train_throughput.py [--steps 40] [--batch-size 128]

Both loops train ResNet-32 on the same random 32x32x3 uint8 data, batch 128, SGD momentum 0.9.
Reference: torchvision Dataset with per-sample PIL RandomCrop(32, 4) / RandomHorizontalFlip /
ToTensor / Normalize, DataLoader with 2 workers, NCHW fp32 (as LDAM-DRW / classifier-balancing).
longtail: uint8 tensor in memory, whole-batch crop + flip, channels_last, bf16 autocast where
``precision=auto`` timed it faster than fp32 here (:func:`longtail.models.autotune.bf16_faster`),
C kernels under ``kernels=auto`` (each pass where timed faster here).
Plain PyTorch: the same loop with ``kernels=off`` (no custom kernels), to check longtail is never
slower than PyTorch itself. Also measures the machine's matmul peak in that precision in the
same run and reports the step's share of it (ResNet-32: 0.41 GFLOP per training
image, forward + backward). Prints the CPU model and flags first; the last two lines are
``vs plain pytorch <ratio>`` and ``speedup <ratio>`` (longtail / reference).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from longtail.core.runtime import make_runtime
from longtail.data.datasets import ImageDataset
from longtail.data.loader import BatchLoader
from longtail.models import autotune, build_model
from longtail.models.doctor import cpu_report, matmul_peak

GFLOP_PER_IMAGE = 0.41
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class PILDataset(torch.utils.data.Dataset):
    """The reference: one PIL image per __getitem__, per-sample transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        from torchvision import transforms as T

        self.images, self.labels = images, labels
        self.tf = T.Compose(
            [
                T.RandomCrop(32, padding=4),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(MEAN, STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.tf(Image.fromarray(self.images[i])), int(self.labels[i])


def sgd_step(model, opt, x, y, autocast):
    with autocast:
        loss = F.cross_entropy(model(x).float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def reference_rate(images, labels, steps: int, bs: int) -> float:
    model = build_model("resnet32", 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    dl = torch.utils.data.DataLoader(
        PILDataset(images, labels),
        batch_size=bs,
        shuffle=True,
        num_workers=2,
        drop_last=True,
        persistent_workers=True,
    )
    it, done, t0 = iter(dl), 0, None
    model.train()
    for i in range(steps + 5):
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(dl)
            x, y = next(it)
        if i == 5:
            t0 = time.perf_counter()
        sgd_step(model, opt, x, y, torch.autocast("cpu", enabled=False))
        done += len(y) if i >= 5 else 0
    return done / (time.perf_counter() - t0)


def longtail_rate(
    images, labels, steps: int, bs: int, kernels: str, compile: bool = False
) -> tuple[float, str]:
    rt = make_runtime("cpu", "auto", channels_last=True, bf16_faster=autotune.bf16_faster)
    x_u8 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    ds = ImageDataset(
        labels=labels, classes=[str(i) for i in range(10)], images=x_u8, mean=MEAN, std=STD
    )
    loader = BatchLoader(ds, bs, rt.device, train=True, padding=4, channels_last=True)
    model = build_model("resnet32", 10, kernels=kernels).to(memory_format=torch.channels_last)
    if kernels == "auto":  # as stage 1 does: per pass, then the whole step (cached per machine)
        example = torch.randn(bs, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        autotune.apply_step_verdict(model, autotune.tune_model(model, example, rt.autocast()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
    model.train()
    net = torch.compile(model) if compile else model  # the custom ops stay single graph nodes
    rng = np.random.default_rng(0)
    done, t0, i = 0, None, 0
    while i < steps + 5:  # the 5 untimed warm-up steps include torch.compile's compilation
        for x, y in loader.batches(rng.permutation(len(labels)), drop_last=True):
            if i == 5:
                t0 = time.perf_counter()
            sgd_step(net, opt, x, y, rt.autocast())
            done += len(y) if i >= 5 else 0
            i += 1
            if i >= steps + 5:
                break
    return done / (time.perf_counter() - t0), rt.precision


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved trials; medians reported")
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time both longtail loops under torch.compile (compilation is not timed)",
    )
    a = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (a.images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, a.images).astype(np.int64)
    print("\n".join(cpu_report()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bf16 = autotune.bf16_faster()  # precision=auto's choice: the peak of that dtype
    peak_args = (torch.bfloat16, 2048, 20) if bf16 else (torch.float32, 1024, 5)
    rates: dict[str, list[float]] = {"peak": [], "reference": [], "plain": [], "longtail": []}
    compiled: dict[str, list[float]] = {"plain": [], "longtail": []}
    for trial in range(a.repeats):  # interleaved, so a slow spell of the machine hits all
        rates["peak"].append(matmul_peak(*peak_args))
        rates["reference"].append(reference_rate(images, labels, a.steps, a.batch_size))
        rate, precision = longtail_rate(images, labels, a.steps, a.batch_size, "off")
        rates["plain"].append(rate)
        rate, precision = longtail_rate(images, labels, a.steps, a.batch_size, "auto")
        rates["longtail"].append(rate)
        print(
            f"trial {trial + 1}: peak {rates['peak'][-1]:.1f} GFLOP/s, reference "
            f"{rates['reference'][-1]:.1f} img/s, plain pytorch {rates['plain'][-1]:.1f} img/s, "
            f"longtail {rate:.1f} img/s"
        )
        if a.compile:
            for name, mode in (("plain", "off"), ("longtail", "auto")):
                rate, _ = longtail_rate(images, labels, a.steps, a.batch_size, mode, compile=True)
                compiled[name].append(rate)
            print(
                f"  torch.compile: plain pytorch {compiled['plain'][-1]:.1f} img/s, "
                f"longtail {compiled['longtail'][-1]:.1f} img/s"
            )
    peak, ref, plain, ours = (statistics.median(rates[k]) for k in rates)
    dtype = str(peak_args[0])[6:]
    print(f"{dtype} matmul peak: {peak:.1f} GFLOP/s (median of {a.repeats})")
    print(f"reference (PIL per-sample, DataLoader x2, NCHW fp32): {ref:.1f} img/s (median)")
    print(f"plain pytorch (uint8 batch aug, channels_last, {precision}, kernels=off): {plain:.1f}")
    share = ours * GFLOP_PER_IMAGE / peak
    print(
        f"longtail (uint8 batch aug, channels_last, {precision}, kernels=auto): {ours:.1f} img/s, "
        f"{ours * GFLOP_PER_IMAGE:.1f} GFLOP/s = {100 * share:.1f}% of the {dtype} matmul peak"
    )
    if a.compile:
        cplain, cours = (statistics.median(compiled[k]) for k in ("plain", "longtail"))
        print(
            f"torch.compile (median): plain pytorch {cplain:.1f} img/s ({cplain / plain:.2f}x "
            f"eager), longtail {cours:.1f} img/s ({cours / ours:.2f}x eager)"
        )
    for key, d in autotune.used().items():
        times = ", ".join(f"{n} {1e3 * t:.3f} ms" for n, t in sorted(d.seconds.items()))
        print(f"  {key}: {d.choice} ({times})")
    print(f"vs plain pytorch {ours / plain:.2f}")
    print(f"speedup {ours / ref:.2f}")


if __name__ == "__main__":
    main()

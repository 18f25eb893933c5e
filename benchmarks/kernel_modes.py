"""Training-loop throughput of ResNet-32 under each kernel switch, in the same run.

    python benchmarks/kernel_modes.py [--rounds 3] [--steps 30]

Per round, ``kernels=auto``, ``on`` and ``off`` (plain PyTorch) each train ``--steps`` timed steps
(after 5 untimed) of :func:`train_throughput.longtail_rate` (batch 128, 32x32x3 random uint8
images, channels-last, bf16 where native); prints img/s and the ratios to ``off``. ``auto``
should match the better of the other two: it checks whether its own bookkeeping costs speed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from longtail.models.doctor import cpu_report  # noqa: E402
from train_throughput import longtail_rate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30)
    a = ap.parse_args()
    print("\n".join(cpu_report()[:2]))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4000, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 4000).astype(np.int64)
    for r in range(a.rounds):
        rate = {m: longtail_rate(images, labels, a.steps, 128, m)[0] for m in ("auto", "on", "off")}
        ratios = ", ".join(f"{m}/off {rate[m] / rate['off']:.3f}" for m in ("auto", "on"))
        rates = ", ".join(f"{m} {v:.1f}" for m, v in rate.items())
        print(f"round {r + 1}: {rates} img/s; {ratios}", flush=True)


if __name__ == "__main__":
    main()

"""``longtail doctor``: this machine's CPU facts and which kernel each ResNet-32 pass uses, why.

Prints the CPU (model, the instruction sets the kernels care about), the torch build and thread
count, whether a C compiler with OpenMP is found, the bf16 matmul peak, each C kernel's state,
and, per kernel pass and shape, the autotuned choice with both timings (seconds per call).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from longtail.core.runtime import cpu_supports_bf16
from longtail.models import autotune, conv3x3, fused_bn, kernels
from longtail.models.registry import build_model

ISAS = [("AMX", "amx_bf16"), ("AVX512-BF16", "avx512_bf16"), ("AVX512F", "avx512f")]
ISAS += [("AVX2", "avx2"), ("ARM NEON/ASIMD", "asimd")]


def matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int = 2048, reps: int = 20) -> float:
    """Best sustained GFLOP/s of an ``n x n`` matmul in ``dtype`` (3 rounds of ``reps``)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def compiler_report() -> str:
    """The C compiler (``$CC``, default ``cc``) and whether it builds an OpenMP program."""
    cc = shlex.split(os.environ.get("CC") or "cc")
    path = shutil.which(cc[0])
    if path is None:
        return f"{cc[0]}: not found (install gcc, or set $CC); kernels fall back to PyTorch"
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True).stdout
    src = "#include <omp.h>\nint main(void) { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "t.c").write_text(src)
        ok = subprocess.run(
            [*cc, "-fopenmp", str(Path(d) / "t.c"), "-o", str(Path(d) / "t")], capture_output=True
        )
    omp = "OpenMP yes" if ok.returncode == 0 else "OpenMP NOT found (-fopenmp failed)"
    return f"{path} ({version.splitlines()[0] if version else '?'}), {omp}"


def cpu_report() -> list[str]:
    """CPU model and the instruction sets the kernels and oneDNN use, one line each."""
    line = kernels.cpu_flags().split(":", 1)[-1].strip()
    flags = set(line.split())
    isa = ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for name, flag in ISAS)
    return [f"CPU: {kernels.cpu_model()}", f"  {isa}", f"  flags: {line}"]


def precision_report() -> str:
    """``precision=auto``'s choice on this CPU and the timings it rests on (one line)."""
    bf16 = autotune.bf16_faster()
    d = autotune.precision_decision()
    if d is None:  # oneDNN has no bf16 here: nothing was timed
        return "precision auto: fp32"
    t = d.seconds
    return (
        f"precision auto: {'bf16' if bf16 else 'fp32'} (a 3x3 convolution forward + backward: "
        f"bf16 {1e3 * t[autotune.BF16]:.2f} ms, fp32 {1e3 * t[autotune.BASELINE]:.2f} ms)"
    )


def tune_report(
    batch_size: int = 128, image_size: int = 32, channels: int = 3, retune: bool = False
) -> list[str]:
    """Autotune ResNet-32 on one training step of random ``(B, C, H, W)`` channels-last data
    (bf16 autocast where it was timed faster than fp32, as ``precision=auto`` does); one line per
    kernel pass and shape. ``retune``: forget this machine's cached decisions first."""
    if retune:
        autotune.cache_file().unlink(missing_ok=True)
        autotune.forget()
    bf16 = autotune.bf16_faster()
    model = build_model("resnet32", 10, channels, kernels="auto")
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch_size, channels, image_size, image_size)
    x = x.contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    table = autotune.tune_model(model, x, autocast)
    lines = [
        f"autotune (ResNet-32, batch {tuple(x.shape)}, {'bf16' if bf16 else 'fp32'}; "
        f"cache {autotune.cache_file()}):"
    ]
    if not table:
        lines.append("  no kernel applies at this precision and shape: PyTorch's ops throughout")
    for key, d in table.items():
        times = ", ".join(f"{n} {1e3 * s:.3f} ms" for n, s in sorted(d.seconds.items()))
        flag = ", disturbed: not cached" if d.noisy else ""
        lines.append(f"  {key}: {d.choice:<7} ({times}{flag})")
    if autotune.apply_step_verdict(model, table):
        lines.append("  => kernels off at this shape: the whole step is faster with PyTorch's ops")
    return lines


def report(
    batch_size: int = 128, image_size: int = 32, channels: int = 3, retune: bool = False
) -> str:
    """The whole ``longtail doctor`` text (takes a few seconds; longer the first time)."""
    lines = cpu_report()
    bf16 = autotune.bf16_faster()
    lines.append(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"oneDNN bf16 {'yes' if cpu_supports_bf16() else 'no'}; {precision_report()}"
    )
    lines.append(f"C compiler: {compiler_report()}")
    peak_dtype = torch.bfloat16 if bf16 else torch.float32
    n, reps = (2048, 20) if bf16 else (1024, 5)
    peak = matmul_peak(peak_dtype, n, reps)
    lines.append(f"{str(peak_dtype)[6:]} matmul peak: {peak:.1f} GFLOP/s")
    fused_bn.load_kernel()
    conv3x3.load_kernel()
    for name in (fused_bn.NAME, conv3x3.NAME):
        lines.append(f"kernel {name}: {kernels.status(name)}")
    lines.append(f"kernels switch: {autotune.resolve_mode(None)} (config kernels, ${autotune.ENV})")
    lines += tune_report(batch_size, image_size, channels, retune)
    return "\n".join(lines)

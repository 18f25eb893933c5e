"""Device, precision, seeding and distributed-process facts for one run."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

from longtail.core.errors import LongtailError

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # precision -> autocast


@dataclass
class Runtime:
    """Where and how a run computes.

    ``dtype`` is the autocast dtype (``None`` for fp32); ``rank``/``world_size`` come from
    torchrun's environment when it launched the process.
    """

    device: torch.device
    dtype: torch.dtype | None
    channels_last: bool
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed-precision context (a no-op in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def precision(self) -> str:
        return next(k for k, v in _DTYPES.items() if v == self.dtype)


def cpu_supports_bf16() -> bool:
    """True when oneDNN runs bf16 on this CPU: natively with AVX512-BF16 / AMX, emulated (often
    slower than fp32) on other AVX512 CPUs."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_precision(device_type: str, cuda_bf16: bool, cpu_bf16: bool) -> str:
    """What ``precision=auto`` means: ``bf16`` on a CUDA GPU with bf16 and on a CPU where it
    was measured faster than fp32 (``cpu_bf16``), ``fp16`` (with a gradient scaler) on other
    GPUs, else ``fp32``. Other devices (e.g. ``mps``) stay in ``fp32``."""
    if device_type == "cuda":
        return "bf16" if cuda_bf16 else "fp16"
    if device_type == "cpu" and cpu_bf16:
        return "bf16"
    return "fp32"


def world_size_from_env() -> int:
    """The number of processes torchrun launched (``$WORLD_SIZE``; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", 1))


def make_runtime(
    device: str = "auto",
    precision: str = "auto",
    channels_last: bool = True,
    *,
    bf16_faster: Callable[[], bool] | None = None,
) -> Runtime:
    """Resolve ``auto`` choices: CUDA when present, bf16 where the hardware runs it fast.

    ``bf16_faster``: on a CPU whose oneDNN has bf16, ``precision=auto`` is bf16 only if this
    measurement says bf16 autocast is faster than fp32 here
    (:func:`longtail.models.autotune.bf16_faster`, what stages 1 and 2 pass); ``None``: oneDNN's
    support alone decides (it reports bf16 on CPUs that only emulate it)."""
    rank = int(os.environ.get("RANK", 0))
    world = world_size_from_env()
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and world > 1:
        device = f"cuda:{local}"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LongtailError(
                f"device {device!r} asked for but CUDA is not available; use device=cpu"
            )
        torch.cuda.set_device(dev)
    if precision == "auto":
        precision = choose_precision(
            dev.type,
            cuda_bf16=dev.type == "cuda" and torch.cuda.is_bf16_supported(),
            cpu_bf16=dev.type == "cpu"
            and cpu_supports_bf16()
            and (bf16_faster is None or bf16_faster()),
        )
    if precision == "fp16" and dev.type != "cuda":
        raise LongtailError("precision=fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    dtype = _DTYPES[precision]
    if dev.type == "cpu":
        retain_freed_memory()
    return Runtime(dev, dtype, channels_last, rank, world, local)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def retain_freed_memory() -> bool:
    """Let glibc's malloc reuse freed activation buffers instead of unmapping them every step.

    By default glibc serves blocks over ~128 KiB-32 MiB with fresh ``mmap`` pages and returns
    them on ``free``, so each CPU training step page-faults on every activation it writes (3-4k
    faults per ResNet-32 step). Raising the mmap threshold to 32 MiB and the trim threshold to
    1 GiB keeps the memory in the process, which stays at its peak size. Worth ~10 % of a
    step with the fused BatchNorm kernel (docs/RESULTS.md). Returns whether it applied (Linux
    with glibc only); safe to call more than once.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def init_distributed(rt: Runtime) -> Runtime:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU); returns ``rt`` with rank
    0's precision (:func:`agree_on_precision`), ``rt`` itself outside torchrun."""
    if rt.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if rt.device.type == "cuda" else "gloo")
    return agree_on_precision(rt)


def agree_on_precision(rt: Runtime) -> Runtime:
    """``rt`` with rank 0's autocast dtype (a collective under an initialised process group:
    every rank calls it; ``rt`` itself without one).

    ``precision=auto`` on a CPU is timed by each process (:func:`make_runtime`'s
    ``bf16_faster``); a timing disturbed on one rank must not leave the ranks training in
    different precisions, so rank 0 decides, as it does for the kernels.
    """
    if not (rt.distributed and dist.is_available() and dist.is_initialized()):
        return rt
    box: list[object] = [rt.precision]
    dist.broadcast_object_list(box, src=0)
    return replace(rt, dtype=_DTYPES[str(box[0])])


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False

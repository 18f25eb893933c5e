"""Choose between a custom kernel and PyTorch's own op by timing both on this machine.

Like ``torch.backends.cudnn.benchmark``: the first time a kernel pass meets a shape, :func:`choose`
runs every candidate on the real tensors for a fraction of a second and keeps the fastest, where a
custom kernel must beat the ``"pytorch"`` baseline by :data:`MARGIN` (a tie goes to PyTorch). The
decision is kept in memory and in ``autotune-<machine>.json`` next to the built kernels
(:func:`longtail.models.kernels.cache_dir`), where ``<machine>`` hashes the CPU model and flags, the
torch version and the kernel sources (:func:`machine_id`), so a later run on the same machine starts
without timing anything. Keys also carry the thread count, which changes the answer.

Under torchrun, rank 0 decides and :func:`broadcast` gives every rank its decisions (call it on all
ranks at the same point, e.g. after rank 0 ran one training step of a copy of the model with
:func:`tune_model`); shapes met later only on some ranks are decided by each rank itself.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from longtail.core.errors import LongtailError
from longtail.core.runtime import cpu_supports_bf16
from longtail.models import kernels

T = TypeVar("T")

MARGIN = 0.05  # a custom kernel must take < (1 - MARGIN) of the baseline's time
SECONDS = 0.1  # timing budget per candidate
# A timing whose median call took more than NOISY x its fastest call was taken while other work
# had the cores (2026-12-03: decisions cached during such a spell timed a 4 ms pass at 1,000 ms
# and switched the kernels off for good); it is used for this run only, never cached.
NOISY = 1.5
BASELINE = "pytorch"
MODES = ("auto", "on", "off")
ENV = "LONGTAIL_KERNELS"

# timer(name, fn) -> seconds per call of fn (it must call fn: the candidates are real work)
Timer = Callable[[str, Callable[[], object]], float]


@dataclass(frozen=True)
class Decision:
    """What :func:`choose` picked for one key, and every candidate's seconds per call.

    ``noisy``: the timings were disturbed (median call > :data:`NOISY` x the fastest), so the
    decision holds for this process only and is not written to the cache file."""

    choice: str
    seconds: dict[str, float]
    noisy: bool = False


_lock = threading.Lock()
_decisions: dict[str, Decision] = {}
_loaded_from: Path | None = None
_timer: Timer | None = None  # set by tests (use_timer) to decide without wall-clock noise
_used: set[str] = set()  # full keys asked for by this process
_latest: dict[str, str] = {}  # key -> choice at this process's thread count (a plain dict
# that torch.compile can read while tracing; see lookup)
_recorders: list[set[str]] = []  # open tune_model() calls collecting the keys they meet
_collecting = 0  # > 0 while tune_model's first step collects keys: memo steps aside
_version = 0  # bumped whenever the decisions held in memory may have changed (see memo)
_memo: dict[tuple, object] = {}
_memo_for: tuple | None = None  # the (version, threads, $LONGTAIL_CACHE_DIR) _memo was filled under


def resolve_mode(mode: str | None = None) -> str:
    """The kernel switch in force: ``$LONGTAIL_KERNELS`` if set, else ``mode`` (default auto).

    ``auto``: use a kernel only where :func:`choose` measured it faster than PyTorch here;
    ``on``: wherever it applies; ``off``: never.
    """
    env = os.environ.get(ENV)
    value = (env if env else mode or "auto").strip().lower()
    if value not in MODES:
        source = f"${ENV}" if env else "kernels"
        raise LongtailError(f"{source}={value!r}; choose one of {', '.join(MODES)}")
    return value


@functools.cache
def machine_id() -> str:
    """Hash of CPU model + flags, torch version and the C kernel sources (16 hex digits).

    Computed once per process: every kernel call under ``kernels=auto`` asks :func:`choose`,
    which once re-read /proc/cpuinfo and the sources each time (~0.3 ms a call, ~40 ms of a
    ResNet-32 training step: the kernels then lost the whole-step check they should win)."""
    h = hashlib.sha256()
    for part in (kernels.cpu_model(), kernels.cpu_flags(), torch.__version__):
        h.update(part.encode() + b"\0")
    for src in sorted(Path(kernels.__file__).parent.glob("*.c")):
        h.update(src.read_bytes())
    return h.hexdigest()[:16]


def cache_file() -> Path:
    """Where this machine's decisions are kept: ``<kernel cache>/autotune-<machine_id>.json``."""
    return _cache_file(kernels.cache_dir(), machine_id())


@functools.cache
def _cache_file(folder: Path, machine: str) -> Path:
    return folder / f"autotune-{machine}.json"


def _read(path: Path) -> dict[str, Decision]:
    try:
        raw = json.loads(path.read_text())
        return {k: Decision(v["choice"], dict(v["seconds"])) for k, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # missing or damaged: decide again


def _load() -> None:
    """Read the cache file once per location (tests move it with ``$LONGTAIL_CACHE_DIR``)."""
    global _loaded_from
    path = cache_file()
    if _loaded_from != path:
        _decisions.clear()
        _decisions.update(_read(path))
        _loaded_from = path
        _changed()


def _changed() -> None:
    """Invalidate :func:`memo` (the caller holds ``_lock``)."""
    global _version
    _version += 1


def _save() -> None:
    """Merge this process's decisions into the cache file, atomically (temp file + rename)."""
    path = cache_file()
    merged = _read(path) | {k: d for k, d in _decisions.items() if not d.noisy}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({k: asdict(v) for k, v in sorted(merged.items())}, f, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def full_key(key: str) -> str:
    """``key`` with the thread count the timings were taken with."""
    return f"{key}|threads={torch.get_num_threads()}"


def time_interleaved(
    candidates: dict[str, Callable[[], object]], seconds: float = SECONDS
) -> dict[str, float]:
    """Seconds per call of each candidate, the median of rounds that call each in turn (one
    warm-up round first) until ``seconds`` per candidate are spent: a slow spell of a shared
    machine then slows all of them, not only the one timed during it."""
    return _timed_rounds(candidates, seconds)[0]


def _timed_rounds(
    candidates: dict[str, Callable[[], object]], seconds: float = SECONDS
) -> tuple[dict[str, float], float]:
    """:func:`time_interleaved`'s medians and their spread: the largest median / fastest call
    ratio over the candidates (1.0 on an undisturbed machine)."""
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    end = time.perf_counter() + seconds * len(candidates)
    while min(len(t) for t in times.values()) < 3 or time.perf_counter() < end:
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(t) for name, t in times.items()}
    spread = max(medians[name] / max(min(t), 1e-12) for name, t in times.items())
    return medians, spread


def choose(
    key: str,
    candidates: dict[str, Callable[[], object]],
    timer: Timer | None = None,
    margin: float = MARGIN,
) -> str:
    """Name of the candidate to use for ``key`` (e.g. a kernel pass and its input shapes).

    ``candidates`` maps names to zero-argument callables doing the same work on the real
    tensors, without side effects; one must be ``"pytorch"``. A cached decision is returned as
    is; otherwise each is timed by ``timer`` (default: :func:`time_interleaved`), and the fastest
    non-baseline candidate wins only if its time is below ``(1 - margin)`` of the baseline's.
    A wall-clock timing disturbed by other work (see :data:`NOISY`) decides for this process
    only; the next process times again.
    """
    if BASELINE not in candidates:
        raise LongtailError(f"autotune {key!r}: candidates {sorted(candidates)} lack {BASELINE!r}")
    known = cached(key)
    if known in candidates:
        return known
    k = full_key(key)
    with _lock:
        _record(k)
    timer = timer or _timer
    noisy = False
    if timer is None:
        seconds, spread = _timed_rounds(candidates)
        noisy = spread > NOISY
    else:
        seconds = {name: float(timer(name, fn)) for name, fn in candidates.items()}
    best = min((n for n in seconds if n != BASELINE), key=seconds.__getitem__, default=BASELINE)
    choice = best if seconds[best] < (1 - margin) * seconds[BASELINE] else BASELINE
    with _lock:
        _decisions[k] = Decision(choice, seconds, noisy)
        _latest[key] = choice
        _changed()
        _save()
    return choice


def cached(key: str) -> str | None:
    """The decision for ``key`` at this thread count if one is known (this process or the cache
    file), without timing; ``None``: :func:`choose` would time. Lets a caller skip building
    costly candidates (copies of the real tensors) on every call once a shape is decided."""
    k = full_key(key)
    with _lock:
        _load()
        d = _decisions.get(k)
        if d is None:
            return None
        _record(k)
        _latest[key] = d.choice
        return d.choice


def memo(site: tuple, compute: Callable[[], T]) -> T:
    """``compute()``, remembered for ``site`` while the decisions held in this process, the
    thread count and ``$LONGTAIL_CACHE_DIR`` stay the same; always computed while
    :func:`tune_model`'s first step collects the keys it meets (its whole-step timing then pays
    the routing a training step pays).

    For the kernels' per-call routing: building a convolution's three pass keys and looking
    each up took ~14 us per call, and routing a ResNet-32 bf16 forward of 128 images cost 3.0 ms
    more than calling the decided ops directly; remembered, ~2 us and 1.0-1.5 ms (2-core AMX
    Xeon, 2026-12-06, ``benchmarks/host_overhead.py``). ``site`` holds what ``compute`` depends
    on besides the decisions (shapes, dtype, ...).
    """
    global _memo_for
    if _collecting:
        return compute()
    # $LONGTAIL_CACHE_DIR moves the cache (tests do, to decide afresh); a change of $HOME or
    # $XDG_CACHE_HOME alone is noticed at the next decision (kernels.cache_dir costs 1.7 us).
    token = (_version, torch.get_num_threads(), os.environ.get("LONGTAIL_CACHE_DIR"))
    if token != _memo_for:
        _memo.clear()
        _memo_for = token
    try:
        return _memo[site]  # type: ignore[return-value]
    except KeyError:
        value = compute()
        if _version != token[0]:  # compute() read the cache file or decided: its value is the
            _memo.clear()  # new state's, the older entries are not
            _memo_for = (_version, *token[1:])
        _memo[site] = value
        return value


def _record(k: str) -> None:
    """Note that full key ``k`` was asked for (:func:`used`, open :func:`tune_model` calls);
    the caller holds ``_lock``."""
    _used.add(k)
    for met in _recorders:
        met.add(k)


def lookup(key: str) -> str | None:
    """The candidate decided for ``key`` in this process (by :func:`choose` or :func:`install`),
    without timing anything; ``None``: not decided yet. Traceable by ``torch.compile``."""
    return _latest.get(key)


def decisions() -> dict[str, Decision]:
    """Every decision known to this process (the cache file's and the new ones), by full key."""
    with _lock:
        _load()
        return dict(_decisions)


def install(table: dict[str, Decision]) -> None:
    """Adopt decisions made elsewhere (rank 0), replacing this process's for the same keys."""
    threads = f"|threads={torch.get_num_threads()}"
    with _lock:
        _load()
        _decisions.update(table)
        for k, d in table.items():
            if k.endswith(threads):
                _latest[k.removesuffix(threads)] = d.choice
        _changed()


def forget() -> None:
    """Drop the decisions held in memory; the next :func:`choose` rereads the cache file."""
    global _loaded_from
    with _lock:
        _decisions.clear()
        _latest.clear()
        _loaded_from = None
        _changed()


def use_timer(timer: Timer | None) -> None:
    """Time every later :func:`choose` with ``timer`` (``None``: the wall clock again)."""
    global _timer
    _timer = timer


def broadcast(table: dict[str, Decision], src: int = 0) -> dict[str, Decision]:
    """Rank ``src``'s ``table`` on every rank (a collective: all ranks call it), installed.

    Without an initialised process group this installs and returns ``table`` itself.
    """
    if dist.is_available() and dist.is_initialized():
        box: list[object] = [table if dist.get_rank() == src else None]
        dist.broadcast_object_list(box, src=src)
        table = box[0]  # type: ignore[assignment]
    install(table)
    return table


STEP = "kernels"  # the candidate name of a whole step with the per-pass choices
# bf16 autocast against fp32 (the baseline): one 3x3 convolution of a ResNet's middle stage
PRECISION = "precision|conv3x3|32x64x16x16|forward+backward"
BF16 = "bf16"


def bf16_faster(timer: Timer | None = None) -> bool:
    """Whether bf16 autocast trains faster than fp32 on this CPU: a 3x3 convolution (batch 32,
    64 channels, 16x16, channels-last), forward and backward, timed both ways; decided like a
    kernel pass (:func:`choose`: bf16 must win by :data:`MARGIN`; cached per machine and thread
    count). What ``precision=auto`` asks on a CPU (``make_runtime(..., bf16_faster=...)``).

    ``False`` without a question where oneDNN has no bf16 at all. oneDNN reports bf16 on every
    AVX512 CPU, but without AVX512-BF16 or AMX it emulates it: on an Ice Lake Xeon (2026-12-06,
    docs/RESULTS.md) a ResNet-32 step ran 2x slower in bf16 than in fp32.
    """
    if not cpu_supports_bf16():
        return False
    known = cached(PRECISION)  # decided: no tensors to build
    if known is not None:
        return known == BF16
    x = torch.randn(32, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w.requires_grad_()

    def conv(bf16: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = F.conv2d(x, w, padding=1)
            y.float().sum().backward()
            x.grad = w.grad = None

        return run

    return choose(PRECISION, {BASELINE: conv(False), BF16: conv(True)}, timer) == BF16


def precision_decision() -> Decision | None:
    """The timings :func:`bf16_faster` decides by on this machine and thread count, timed in
    this process or read from the cache file (``None``: never timed, e.g. no bf16 in oneDNN);
    for run.json and ``longtail doctor``."""
    return decisions().get(full_key(PRECISION))


def tune_model(
    model: nn.Module,
    example: torch.Tensor,
    autocast: AbstractContextManager | None = None,
) -> dict[str, Decision]:
    """Decide every kernel pass ``model`` meets in one training step on ``example``, then
    check the step as a whole.

    ``example``: an input batch ``(B, C, H, W)`` of the real shape, dtype and layout. The step
    (forward, backward of the logits' sum) runs on deep copies in training mode, so ``model``'s
    weights, gradients and BatchNorm statistics are untouched. If some pass chose a kernel, a
    whole step with those choices (candidate ``"kernels"``) is timed against one with
    ``kernels="off"`` (``"pytorch"``): passes timed alone can each win while the step loses (e.g.
    two OpenMP runtimes taking turns). Returns the decisions met, by full key; apply the step's
    verdict with :func:`apply_step_verdict`.
    """
    global _collecting
    met: set[str] = set()
    _recorders.append(met)
    try:
        step = _step(copy.deepcopy(model), example, autocast)
        _collecting += 1
        try:
            step()
        finally:
            _collecting -= 1
        table = decisions()
        if any(table[k].choice != BASELINE for k in met) and hasattr(model, "kernels"):
            plain = copy.deepcopy(model)
            plain.kernels = "off"
            key = f"step|{type(model).__name__}|{'x'.join(map(str, example.shape))}"
            key += f"|{str(example.dtype)[6:]}|autocast={_autocast_dtype(autocast)}"
            choose(key, {STEP: step, BASELINE: _step(plain, example, autocast)})
    finally:
        _recorders.remove(met)
    table = decisions()
    return {k: table[k] for k in sorted(met)}


def _autocast_dtype(autocast: AbstractContextManager | None) -> str:
    """``bfloat16`` / ``float16`` for an enabled ``torch.autocast``, else ``off``: a step's key
    must tell bf16 from fp32 (the same example tensor, another computation)."""
    if isinstance(autocast, torch.autocast) and autocast._enabled:
        return str(autocast.fast_dtype)[6:]
    return "off"


def _step(model: nn.Module, example: torch.Tensor, autocast) -> Callable[[], None]:
    """One forward + backward of ``model`` (a copy, in training mode) on ``example``."""
    model.train()
    x = example.detach().clone()

    def run() -> None:
        with autocast or nullcontext():
            out = model(x)
        out.float().sum().backward()
        model.zero_grad(set_to_none=True)

    return run


def apply_step_verdict(model: nn.Module, table: dict[str, Decision]) -> bool:
    """Turn ``model``'s kernels off if ``table`` (from :func:`tune_model`) holds a whole-step
    check that PyTorch's ops won; returns whether it did."""
    lost = any(k.startswith("step|") and d.choice == BASELINE for k, d in table.items())
    if lost:
        model.kernels = "off"
    return lost


def used() -> dict[str, Decision]:
    """The decisions this process has asked for so far (cached or new), by full key."""
    table = decisions()
    return {k: table[k] for k in sorted(_used) if k in table}

"""Build and load longtail's C kernels (``fused_bn.c``, ``conv3x3.c``) on first use.

Each source in this folder is compiled with the system C compiler (``$CC``, default ``cc``;
``-O3 -march=native -fopenmp``) into ``$LONGTAIL_CACHE_DIR/kernels`` (default
``~/.cache/longtail/kernels``), keyed by the source, the flags and the CPU's feature flags, and
loaded with ctypes. A kernel that cannot be built warns once and :func:`load` returns ``None``;
the callers then compute with PyTorch's own ops. A kernel whose instruction set this CPU lacks
compiles to a stub that its ``usable`` check turns down quietly; :func:`status` says why.
Every source exports ``lt_set_threads(n)``; :func:`set_threads` passes it PyTorch's thread count
before each call, since the library may link another OpenMP runtime than PyTorch's.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
_lock = threading.Lock()
_libs: dict[str, ctypes.CDLL] = {}
_failed: dict[str, str] = {}
_THREADS: tuple[object, list[object]] = (None, [ctypes.c_int])


def cache_dir() -> Path:
    """Kernel folder: ``$LONGTAIL_CACHE_DIR/kernels``, else ``~/.cache/longtail/kernels``."""
    env = os.environ
    return _cache_dir(env.get("LONGTAIL_CACHE_DIR"), env.get("XDG_CACHE_HOME"), env.get("HOME"))


@functools.lru_cache(maxsize=16)
def _cache_dir(longtail: str | None, xdg: str | None, home: str | None) -> Path:
    """:func:`cache_dir` for these environment values (asked on every autotune look-up: ~1 µs
    instead of ~6 µs for building the path again)."""
    root = longtail or os.path.join(xdg or os.path.expanduser("~/.cache"), "longtail")
    return Path(root) / "kernels"


def cpu_flags() -> str:
    """The CPU's feature flags: a kernel built with -march=native only runs where they match."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


Signatures = dict[str, tuple[object, list[object]]]


def _build(name: str, signatures: Signatures) -> ctypes.CDLL:
    source = Path(__file__).with_name(f"{name}.c")
    compiler = shlex.split(os.environ.get("CC") or "cc")
    key = hashlib.sha256(
        source.read_bytes() + " ".join([*compiler, *_FLAGS, cpu_flags()]).encode()
    ).hexdigest()[:16]
    out = cache_dir() / f"{name}-{key}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{name}-", suffix=".so")
        os.close(fd)
        try:
            proc = subprocess.run(
                [*compiler, *_FLAGS, "-o", tmp, str(source)], capture_output=True, text=True
            )
            if proc.returncode != 0:
                raise RuntimeError(f"{compiler[0]} failed: {proc.stderr.strip()[-500:]}")
            os.replace(tmp, out)  # atomic: concurrent builders each publish a whole file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    common = {"lt_set_threads": _THREADS, "lt_max_threads": (ctypes.c_int, [])}
    for fn, (restype, argtypes) in (signatures | common).items():
        getattr(lib, fn).restype = restype
        getattr(lib, fn).argtypes = argtypes
    return lib


def load(
    name: str,
    signatures: Signatures,
    what: str,
    switch: str,
    usable: Callable[[ctypes.CDLL], bool] | None = None,
    needs: str = "",
) -> ctypes.CDLL | None:
    """Kernel library ``name`` (``models/<name>.c``), built on first call.

    ``signatures`` maps each function to ``(restype, argtypes)`` (ctypes types).
    Returns ``None`` after one ``RuntimeWarning`` naming ``what`` the kernel does and the config
    ``switch`` that turns it off, if it cannot be built. ``usable(lib)``, asked once after the
    build, can turn the library down without a warning (e.g. the CPU lacks the instruction set
    ``needs`` names); :func:`load` then returns ``None`` from then on.
    """
    lib = _libs.get(name)
    if lib is not None or name in _failed:
        return lib
    with _lock:
        if name not in _libs and name not in _failed:
            try:
                lib = _build(name, signatures)
                if usable is None or usable(lib):
                    _libs[name] = lib
                else:
                    _failed[name] = f"not available on this CPU (needs {needs or 'another CPU'})"
            except (OSError, RuntimeError) as e:
                _failed[name] = str(e)
                warnings.warn(
                    f"longtail: the {what} CPU kernel could not be built ({e}); training uses "
                    "PyTorch's own ops instead (slower on CPU, same results). Install a C "
                    f"compiler with OpenMP (e.g. gcc) or set {switch}=off to silence this.",
                    RuntimeWarning,
                    stacklevel=4,
                )
    return _libs.get(name)


def ready(name: str, load_it: Callable[[], ctypes.CDLL | None]) -> bool:
    """Whether kernel ``name`` can run: built on first call (``load_it``) in eager mode; while
    ``torch.compile`` traces, only a look-up (the build's lock and ctypes are not traceable)."""
    if torch.compiler.is_compiling():
        return name in _libs
    return load_it() is not None


def status(name: str) -> str:
    """``"loaded"``, ``"not built yet"``, or why :func:`load` returned ``None`` for ``name``."""
    if name in _libs:
        return "loaded"
    return _failed.get(name, "not built yet")


def set_threads(lib: ctypes.CDLL) -> None:
    """Make ``lib``'s next parallel region use ``torch.get_num_threads()`` threads."""
    lib.lt_set_threads(torch.get_num_threads())


def forget(name: str) -> None:
    """Drop the loaded or failed state of ``name`` so the next :func:`load` builds again."""
    with _lock:
        _libs.pop(name, None)
        _failed.pop(name, None)

"""Parsers fuzzed with hypothesis: any input gives data or a LongtailError, nothing else."""

from __future__ import annotations

import contextlib
import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longtail.core.errors import LongtailError
from longtail.data.datasets import load_cifar, read_idx, read_list_file

# No wall-clock deadline: on a busy 2-core machine a 2 s deadline failed parses that take
# milliseconds when quiet. Pathological inputs found by the fuzzer (a huge pickle memo) have their
# own regression tests below, which fail on the error they raise, not on time.
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


_SCRATCH: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def _scratch(tmp_path_factory):
    """One folder for the whole module, overwritten by every example (hundreds of examples made a
    new folder each and left 20,000 of them in /tmp)."""
    _SCRATCH.append(tmp_path_factory.mktemp("fuzz"))
    yield
    _SCRATCH.pop()


def _write(data: bytes, name: str) -> Path:
    p = _SCRATCH[-1] / name
    p.write_bytes(data)
    return p


@FUZZ
@given(st.binary(max_size=300))
def test_idx_random_bytes(data: bytes) -> None:
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        raw = gzip.compress(data) if name.endswith(".gz") and len(data) % 2 else data
        try:
            arr = read_idx(_write(raw, name))
        except LongtailError:
            continue
        assert arr.dtype == np.uint8


@FUZZ
@given(
    st.lists(st.integers(0, 6), min_size=1, max_size=4),
    st.integers(0, 200),
    st.booleans(),
)
def test_idx_valid_header_any_body(dims: list[int], body_len: int, gz: bool) -> None:
    header = bytes([0, 0, 8, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)
    data = header + bytes(body_len)
    path = _write(gzip.compress(data) if gz else data, "f-idx" + (".gz" if gz else ""))
    expected = int(np.prod(dims))
    try:
        arr = read_idx(path)
    except LongtailError as e:
        assert body_len != expected, e
        return
    assert body_len == expected and list(arr.shape) == dims


LINE = st.one_of(
    st.text(max_size=40),
    st.builds(lambda p, n: f"{p} {n}", st.text(min_size=1, max_size=10), st.integers(-5, 20)),
    st.builds(lambda p, n: f"{p},{n}", st.text(min_size=1, max_size=10), st.integers(-5, 20)),
)


@FUZZ
@given(st.lists(LINE, max_size=12), st.sampled_from([None, 5, 20]))
def test_list_file_any_text(lines: list[str], num_classes: int | None) -> None:
    path = _write("\n".join(lines).encode("utf-8", "surrogatepass"), "list.txt")
    try:
        paths, labels = read_list_file(path, "/data", num_classes)
    except LongtailError as e:
        assert str(e)
        return
    assert len(paths) == len(labels) > 0
    assert all(y >= 0 and (num_classes is None or y < num_classes) for y in labels)


@FUZZ
@given(st.binary(max_size=200))
def test_list_file_any_bytes(data: bytes) -> None:
    with contextlib.suppress(LongtailError):
        read_list_file(_write(data, "list.txt"), "/data")


PICKLABLE = st.recursive(
    st.none() | st.integers() | st.binary(max_size=20) | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.binary(max_size=8), kids),
    max_leaves=10,
)


def _cifar_root(meta: bytes, batch: bytes) -> Path:
    root = _SCRATCH[-1]
    base = root / "cifar-10-batches-py"
    base.mkdir(exist_ok=True)
    (base / "batches.meta").write_bytes(meta)
    (base / "test_batch").write_bytes(batch)
    return root


@FUZZ
@given(st.binary(max_size=300))
def test_cifar_pickle_random_bytes(data: bytes) -> None:
    good_meta = pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, protocol=2)
    for meta, batch in ((data, data), (good_meta, data)):
        with contextlib.suppress(LongtailError):
            load_cifar(_cifar_root(meta, batch), "test", 10)


def test_cifar_pickle_with_a_huge_memo_index_is_refused_not_allocated() -> None:
    """Six bytes (found by the fuzzer) ask pickle for a 1.4-billion-entry memo: ~12 GB, a minute."""
    hostile = b"\x8fr\x00\x00\xbdV"  # EMPTY_SET, LONG_BINPUT 1455226880
    good_meta = pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, protocol=2)
    with pytest.raises(LongtailError, match=r"test_batch: not a readable CIFAR pickle.*memo index"):
        load_cifar(_cifar_root(good_meta, hostile), "test", 10)


def test_cifar_pickle_cannot_run_code(tmp_path) -> None:
    marker = tmp_path / "pwned"

    class Payload:  # unpickling calls open(marker, "w"): a file appears if code ran
        def __reduce__(self):
            return (open, (str(marker), "w"))

    batch = pickle.dumps({b"data": Payload(), b"labels": [0]}, protocol=2)
    good_meta = pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, protocol=2)
    with pytest.raises(LongtailError, match=r"refusing global (io|builtins)\.open"):
        load_cifar(_cifar_root(good_meta, batch), "test", 10)
    assert not marker.exists()


@FUZZ
@given(PICKLABLE, st.dictionaries(st.sampled_from([b"data", b"labels"]), PICKLABLE, min_size=2))
def test_cifar_batch_keys_with_any_values(names: object, batch: dict) -> None:
    meta = {b"label_names": names if isinstance(names, list) else [b"x"] * 10}
    root = _cifar_root(pickle.dumps(meta, protocol=2), pickle.dumps(batch, protocol=2))
    try:
        ds = load_cifar(root, "test", 10)
    except LongtailError:
        return
    assert len(ds) == len(batch[b"labels"])


@FUZZ
@given(PICKLABLE, PICKLABLE)
def test_cifar_pickle_wrong_structure(meta_obj: object, batch_obj: object) -> None:
    root = _cifar_root(pickle.dumps(meta_obj, protocol=2), pickle.dumps(batch_obj, protocol=2))
    try:
        ds = load_cifar(root, "test", 10)
    except LongtailError:
        return
    assert ds.images.shape[1:] == (3, 32, 32)

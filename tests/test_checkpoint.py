"""Crash-safe files: atomic writes, checksummed checkpoints, keep-newest-two, corrupt detection."""

from __future__ import annotations

import hashlib
import io
import os
import re

import pytest
import torch

from longtail.core.checkpoint import (
    delete_checkpoints,
    list_checkpoints,
    load_latest_checkpoint,
    save_checkpoint,
)
from longtail.core.errors import LongtailError
from longtail.core.io import atomic_torch_save, atomic_write_bytes, verified_load
from longtail.core.rundir import RunDir


def state(tag: int) -> dict:
    g = torch.Generator().manual_seed(tag)
    return {"tag": tag, "w": torch.randn(64, 8, generator=g), "opt": {"step": tag, "lr": 0.1}}


def assert_state_equal(got: dict, tag: int) -> None:
    want = state(tag)
    assert got["tag"] == tag and got["opt"] == want["opt"]
    assert torch.equal(got["w"], want["w"])


def temp_files(folder) -> list[str]:
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or p.name.startswith(".")]


def test_roundtrip_and_sidecar_digest(tmp_path):
    path = tmp_path / "sub" / "state.pt"
    digest = atomic_torch_save(state(1), path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "sub" / "state.pt.sha256").read_text().strip() == digest
    assert_state_equal(verified_load(path), 1)
    assert temp_files(tmp_path / "sub") == []


def test_truncated_file_is_detected(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save(state(1), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LongtailError, match=re.escape(str(path))):
        verified_load(path)


def test_truncated_file_without_sidecar_is_detected(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save(state(1), path)
    (tmp_path / "state.pt.sha256").unlink()
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(LongtailError, match=re.escape(str(path))):
        verified_load(path)


def test_flipped_byte_is_detected(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save(state(1), path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(LongtailError, match="corrupt") as e:
        verified_load(path)
    assert str(path) in str(e.value)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(LongtailError, match="not found") as e:
        verified_load(path)
    assert str(path) in str(e.value)


def test_save_checkpoint_keeps_newest_two(tmp_path):
    for epoch, step in [(0, 10), (1, 5), (9, 0), (10, 3)]:
        save_checkpoint(state(epoch), tmp_path, epoch, step)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "ckpt-0009-0000000.pt",
        "ckpt-0009-0000000.pt.sha256",
        "ckpt-0010-0000003.pt",
        "ckpt-0010-0000003.pt.sha256",
    ]
    assert_state_equal(load_latest_checkpoint(tmp_path), 10)


def test_delete_checkpoints_only_of_a_finished_run(tmp_path):
    rd = RunDir(tmp_path)
    for epoch in (1, 2):
        save_checkpoint(state(epoch), tmp_path, epoch, 0)
    atomic_torch_save(state(0), rd.branch_path)
    atomic_torch_save(state(2), rd.model_path("final"))
    # not finished (no stage1.json): a resume continues from these, so they stay
    with pytest.raises(LongtailError, match="has not finished stage 1"):
        delete_checkpoints(tmp_path)
    assert len(list_checkpoints(tmp_path)) == 2
    rd.stage1_path.write_text('{"final": {}}')
    final = rd.model_path("final").name
    kept = {final, f"{final}.sha256", rd.stage1_path.name}  # the model keeps its checksum
    sizes = sum(p.stat().st_size for p in tmp_path.iterdir() if p.name not in kept)
    assert delete_checkpoints(tmp_path) == sizes > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert rd.finished and delete_checkpoints(tmp_path) == 0


def test_list_checkpoints_orders_by_epoch_then_step(tmp_path):
    for name in ["ckpt-2-5.pt", "ckpt-10-0.pt", "ckpt-2-40.pt", "other.pt"]:
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "ckpt-2-5.pt",
        "ckpt-2-40.pt",
        "ckpt-10-0.pt",
    ]


def test_load_latest_on_empty_dir_is_none(tmp_path):
    assert load_latest_checkpoint(tmp_path) is None


def test_corrupt_newest_names_previous_checkpoint(tmp_path):
    prev = save_checkpoint(state(1), tmp_path, 1, 0)
    newest = save_checkpoint(state(2), tmp_path, 2, 0)
    newest.write_bytes(newest.read_bytes()[:-10])
    with pytest.raises(LongtailError) as e:
        load_latest_checkpoint(tmp_path)
    msg = str(e.value)
    assert str(newest) in msg and str(prev) in msg
    newest.unlink()  # the advice in the message: delete the bad file to resume
    assert_state_equal(load_latest_checkpoint(tmp_path), 1)


def test_corrupt_only_checkpoint_is_named(tmp_path):
    only = save_checkpoint(state(1), tmp_path, 1, 0)
    only.write_bytes(b"garbage")
    with pytest.raises(LongtailError, match=re.escape(str(only))):
        load_latest_checkpoint(tmp_path)


def test_unpicklable_object_leaves_earlier_file_intact(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save(state(1), path)
    with pytest.raises(Exception, match="pickle"):
        atomic_torch_save({"fn": lambda x: x}, path)
    assert_state_equal(verified_load(path), 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt", "state.pt.sha256"]


def test_failed_write_removes_temp_and_keeps_earlier_file(tmp_path):
    path = tmp_path / "data.bin"
    atomic_write_bytes(path, b"old contents")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # fails inside the temp-file write
    assert path.read_bytes() == b"old contents"
    assert temp_files(tmp_path) == []


def test_overwrite_replaces_contents_atomically(tmp_path):
    path = tmp_path / "state.pt"
    atomic_torch_save(state(1), path)
    atomic_torch_save(state(2), path)
    assert_state_equal(verified_load(path), 2)
    assert temp_files(tmp_path) == []


class _Payload:
    """Pickles as a call to ``os.system`` that touches ``marker`` when unpickled."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_a_planted_pickle_in_a_run_directory_is_refused_and_never_runs(tmp_path):
    """Guards: verified_load unpickled with weights_only=False, so a checkpoint with a valid
    checksum dropped into a shared run directory ran its code (here os.system) on --resume."""
    marker = tmp_path / "code ran"
    save_checkpoint(state(1), tmp_path, 1, 0)
    buf = io.BytesIO()
    torch.save({**state(2), "rng": _Payload(marker)}, buf)  # bypasses atomic_torch_save's check
    planted = RunDir(tmp_path).checkpoint_path(2, 0)
    planted.write_bytes(buf.getvalue())
    planted.with_name(planted.name + ".sha256").write_text(
        hashlib.sha256(buf.getvalue()).hexdigest() + "\n"
    )
    with pytest.raises(LongtailError, match=r"pickled Python object \(posix\.system\).*retrain"):
        verified_load(planted)
    with pytest.raises(LongtailError, match=re.escape(str(planted))):
        load_latest_checkpoint(tmp_path)
    assert not marker.exists()


def test_save_refuses_objects_that_would_need_pickle_to_load(tmp_path):
    """Guards: a checkpoint holding e.g. numpy's RNG state (a tuple with an ndarray) saved fine
    and then failed only at --resume, once loading uses weights_only=True."""
    import numpy as np

    path = tmp_path / "state.pt"
    with pytest.raises(TypeError, match=r"state\['rng'\]\[1\] is a numpy.ndarray.*pickle"):
        atomic_torch_save({"rng": np.random.RandomState(0).get_state()}, path)
    assert not path.exists()
    ok = {"t": torch.get_rng_state(), "n": None, "x": [1, 2.5, "s", (True, b"b")], 3: {"k": 1}}
    atomic_torch_save(ok, path)
    got = verified_load(path)
    assert torch.equal(got["t"], ok["t"]) and got[3] == {"k": 1} and got["x"] == ok["x"]

"""Crash safety: a run killed with SIGKILL mid-epoch resumes to the bit-identical result."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from longtail.train.checkpoint import list_checkpoints, verified_load

OVERRIDES = [
    "precision=fp32",
    "deterministic=true",
    "optim.epochs=6",
    "optim.batch_size=16",
    "checkpoint_every_steps=5",
    "swa.start=3",
    "swa.every_steps=4",
    "swa.swag_rank=4",
]


def _train(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "longtail", "train", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _kill_mid_epoch(proc: subprocess.Popen, run: Path, timeout: float = 240.0) -> str:
    """SIGKILL ``proc`` as soon as a mid-epoch checkpoint of epoch >= 2 exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for ck in list_checkpoints(run):
            epoch, step = map(int, re.findall(r"\d+", ck.name))
            if epoch >= 2 and step > 0:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return ck.name
        time.sleep(0.002)
    raise AssertionError(f"no mid-epoch checkpoint appeared; exit {proc.poll()}")


def _states(run: Path) -> dict[str, dict]:
    out = {name: verified_load(run / f"{name}.pt") for name in ("model_final", "model_swa")}
    out["swag"] = verified_load(run / "swag.pt")
    return out


def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(tmp_path: Path) -> None:
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = _train(["digits_lt", *OVERRIDES, "--out", str(killed)])
    seen = _kill_mid_epoch(proc, killed)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model_final.pt").exists(), f"finished before the kill ({seen})"

    resumed = _train(["--resume", str(killed)])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out.decode()
    ref = _train(["digits_lt", *OVERRIDES, "--out", str(clean)])
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out.decode()

    a, b = _states(killed), _states(clean)
    for name in ("model_final", "model_swa"):
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name}.{k} differs after resume"
    assert a["swag"]["n"] == b["swag"]["n"] > 0
    for k in ("mean", "sq_mean", "deviations"):
        assert torch.equal(a["swag"][k], b["swag"][k]), f"swag.{k} differs after resume"
    rows = (killed / "metrics.csv").read_text().strip().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, 7))

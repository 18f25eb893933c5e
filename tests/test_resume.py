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

from longtail.core.checkpoint import list_checkpoints
from longtail.core.io import verified_load

SWA_START = 3  # 0-based epoch: the lr anneals to swa.lr over one epoch, then snapshots are taken
OVERRIDES = [
    "precision=fp32",
    "deterministic=true",
    "optim.epochs=6",
    "optim.batch_size=16",
    "checkpoint_every_steps=5",
    f"swa.start={SWA_START}",
    "swa.anneal_epochs=1",
    "swa.every_steps=4",
    "swa.swag_rank=4",
]


def _train(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "longtail", "train", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _kill_inside_swa(proc: subprocess.Popen, run: Path, timeout: float = 240.0) -> Path:
    """SIGKILL ``proc`` once a mid-epoch checkpoint exists from an epoch after ``swa.start``.

    The kill lands a few steps later on a busy machine, and the run may have written newer
    checkpoints by then: those are removed, so the resume always starts from the first such
    checkpoint, whatever the timing.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        for ck in list_checkpoints(run):
            epoch, step = map(int, re.findall(r"\d+", ck.name))
            if epoch > SWA_START and step > 0:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                for newer in list_checkpoints(run)[list_checkpoints(run).index(ck) + 1 :]:
                    newer.unlink()
                    Path(f"{newer}.sha256").unlink()
                return ck
        time.sleep(0.002)
    raise AssertionError(f"no mid-epoch checkpoint inside SWA appeared; exit {proc.poll()}")


def _states(run: Path) -> dict[str, dict]:
    out = {name: verified_load(run / f"{name}.pt") for name in ("model_final", "model_swa")}
    out["swag"] = verified_load(run / "swag.pt")
    return out


def test_sigkill_mid_epoch_inside_swa_then_resume_is_bitwise_equal(tmp_path: Path) -> None:
    """Guards the restore of the SWA average and the SWAG moments and deviations: the kill lands
    after snapshots were taken, so a resume that lost or re-initialised them would differ."""
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    proc = _train(["digits_lt", *OVERRIDES, "--out", str(killed)])
    seen = _kill_inside_swa(proc, killed)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model_final.pt").exists(), f"finished before the kill ({seen.name})"
    assert list_checkpoints(killed)[-1] == seen
    at_kill = verified_load(seen)
    assert at_kill["swag"]["n"] > 0 and at_kill["swa_model"] is not None, "killed before SWA"

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

"""Two CPU processes with gloo under torchrun: sharded samplers, DDP + synchronised BN, SWAG."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from longtail.core.checkpoint import list_checkpoints
from longtail.core.io import verified_load
from longtail.data.samplers import SAMPLERS, make_sampler

HERE = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# tiny digits (13 images per class -> 2 steps of 64 per epoch), no augmentation so both runs see
# identical pixels; NCHW fp32 and a small lr (see docs/DISTRIBUTED.md on fp32 drift). Digits, not
# Fashion-MNIST: each of the three runs then evaluates 360 test images, not 10,000 (5 s, not 30)
RUN = [
    "digits_lt",
    "precision=fp32",
    "channels_last=false",
    "sync_bn=true",
    "data.padding=0",
    "data.flip=false",
    "data.val_per_class=0",
    "data.imbalance=1",
    "data.n_max=13",
    "optim.batch_size=64",
    "optim.epochs=2",
    "optim.lr=0.0005",
    "optim.warmup_epochs=0",
    "swa.start=1",
    "swa.anneal_epochs=0.5",
    "swa.lr=0.0005",
    "swa.every_steps=1",
    "swa.swag_rank=2",
    "checkpoint_every_steps=3",  # global step 3 = step 1 of epoch 2: a mid-epoch checkpoint
]


def _torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """Run ``args`` under torchrun; every worker must exit 0. No retry: a worker that died of
    SIGABRT at exit ("terminate called without an active exception") was a process group
    outliving interpreter shutdown, fixed by ``shutdown_distributed`` (docs/DISTRIBUTED.md)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *args,
    ]
    out = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _longtail(*args: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "longtail", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _max_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the learnable parameters."""
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if "running" not in k)


def _stats_close(a: dict, b: dict) -> bool:
    """BatchNorm running statistics agree: they are sums of ~10^5 activations that two
    processes add in another order than one, so they get a relative tolerance."""
    keys = [k for k in a if "running_" in k]
    return bool(keys) and all(torch.allclose(a[k], b[k], rtol=1e-3, atol=2e-4) for k in keys)


@pytest.fixture(scope="module")
def worker_result(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("dist")
    _torchrun(2, str(HERE / "dist_worker.py"), str(d / "out.json"), str(d / "swag.pt"))
    return json.loads((d / "out.json").read_text())


@pytest.mark.parametrize("name", SAMPLERS)
def test_two_process_shards_are_disjoint_and_cover_the_draw(worker_result, name) -> None:
    from dist_worker import LABELS

    shards = worker_result["shards"][name]
    assert worker_result["world_size"] == len(shards) == 2
    assert len(shards[0]) == len(shards[1])
    draw = make_sampler(name, LABELS, seed=3, total_epochs=4).epoch_indices(1)
    # rank r holds draw positions r, r + 2, ...: the positions are disjoint and interleave back
    merged = np.empty(len(shards[0]) * 2, dtype=np.int64)
    merged[0::2], merged[1::2] = shards[0], shards[1]
    assert np.array_equal(merged[: len(draw)], draw)
    assert Counter(shards[0]) + Counter(shards[1]) - Counter(merged[len(draw) :].tolist()) == (
        Counter(draw.tolist())
    )


def test_two_process_swag_state_identical_on_reload(worker_result) -> None:
    assert worker_result["swag_equal"] == [True, True]


def test_every_rank_computes_in_rank_0s_precision(worker_result) -> None:
    # rank 0 timed bf16 faster, rank 1 did not: both train in bf16
    assert worker_result["precision"] == [["bf16", "bf16"], ["fp32", "bf16"]]


def test_ddp_sync_bn_matches_single_process_run(tmp_path) -> None:
    two, one = tmp_path / "two", tmp_path / "one"
    _torchrun(2, "-m", "longtail", "train", *RUN, "--out", str(two))
    _longtail("train", *RUN, "--out", str(one))
    rows = (one / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in rows[1:]] == ["2", "4"]  # 2 steps per epoch in both
    assert (two / "metrics.csv").read_text().splitlines()[-1].split(",")[1] == "4"
    for name in ("model_final.pt", "model_swa.pt"):
        a, b = verified_load(one / name), verified_load(two / name)
        assert _max_diff(a, b) < 1e-5, name
        assert _stats_close(a, b), name
    s1, s2 = verified_load(one / "swag.pt"), verified_load(two / "swag.pt")
    assert s1["n"] == s2["n"] == 2
    for k in ("mean", "sq_mean", "deviations"):
        assert (s1[k] - s2[k]).abs().max().item() < 1e-5, k

    # resume with a different number of processes, mid-epoch and inside SWA: the 2-process run
    # from its checkpoint after step 1 of epoch 2 (sampler.shard(start=64) on one process),
    # continued by a single process, ends where the uninterrupted run ended
    for f in ("model_final.pt", "model_swa.pt", "swag.pt", "stage1.json"):
        (two / f).unlink()
    last = list_checkpoints(two)[-1]
    last.unlink()
    Path(f"{last}.sha256").unlink()
    mid = verified_load(list_checkpoints(two)[-1])
    assert (mid["epoch"], mid["step_in_epoch"], mid["swag"]["n"]) == (1, 1, 1)
    _longtail("train", "--resume", str(two))
    for name in ("model_final.pt", "model_swa.pt"):
        assert _max_diff(verified_load(one / name), verified_load(two / name)) < 1e-5, name
    s2 = verified_load(two / "swag.pt")
    assert s2["n"] == s1["n"] == 2
    for k in ("mean", "sq_mean", "deviations"):
        assert (s1[k] - s2[k]).abs().max().item() < 1e-5, k


def test_stage2_under_torchrun_matches_one_process(swa_run, tmp_path) -> None:
    """Stage 2 on two processes: features sharded and gathered, BatchNorm re-estimated for every
    SWAG sample on sharded batches and averaged; every method close to the one-process result."""
    one, two = tmp_path / "one", tmp_path / "two"
    for d in (one, two):
        shutil.copytree(swa_run.dir, d, ignore=shutil.ignore_patterns("features", "results*"))
    _longtail("classify", str(one), "--method", "all")
    _torchrun(2, "-m", "longtail", "classify", str(two), "--method", "all")
    r1 = json.loads((one / "results.json").read_text())["methods"]
    r2 = json.loads((two / "results.json").read_text())["methods"]
    assert r1.keys() == r2.keys() and {"srepr", "swag_bma", "crt", "ncm"} <= r1.keys()
    n_test = 300
    for m in ("joint", "ncm", "crt", "tau", "lws"):  # same features: same heads
        assert abs(r1[m]["accuracy"] - r2[m]["accuracy"]) <= 1 / n_test, m
        assert r1[m]["nll"] == pytest.approx(r2[m]["nll"], rel=1e-3), m
    for m in ("srepr", "srepr_ce", "swag_bma"):  # BN statistics re-estimated across 2 shards
        assert abs(r1[m]["accuracy"] - r2[m]["accuracy"]) <= 4 / n_test, m
        assert r1[m]["nll"] == pytest.approx(r2[m]["nll"], rel=0.05), m


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_shutdown_distributed_joins_every_gloo_thread(tmp_path) -> None:
    """One gloo process, a DDP wrapper caught in a reference cycle and the BatchNorm group, as a
    training run leaves them. Guards the SIGABRT at exit ("terminate called without an active
    exception"): groups that survive destroy_process_group keep gloo threads into interpreter
    shutdown. After shutdown_distributed the process has exactly the threads it had before."""
    import torch.distributed as dist
    import torch.nn as nn

    from longtail.core import distributed

    torch.randn(64, 64) @ torch.randn(64, 64)  # start PyTorch's own threads first
    nn.Linear(2, 2)(torch.randn(3, 2)).sum().backward()
    before = _threads()
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        distributed._bn_group()
        net = nn.parallel.DistributedDataParallel(nn.Linear(2, 2))
        cycle: list = [net]
        cycle.append(cycle)
        net(torch.randn(3, 2)).sum().backward()
        gathered = [None]
        dist.all_gather_object(gathered, 1)
        assert gathered == [1] and _threads() > before  # gloo started its threads
        del net, cycle
    finally:
        distributed.shutdown_distributed()
    assert not dist.is_initialized()
    assert _threads() == before

"""Shared tiny stage-1 runs on digits-LT (CPU, fp32), trained once per test session.

``swa_run``: 6 epochs, SWA/SWAG from epoch 3 with a snapshot every 2 steps (rank 5).
``plain_run``: 3 epochs with ``swa.enabled=false``.
Tests may read these run directories and run stage 2 in them (which adds ``features/`` and
``results.json``); they must not retrain into them.

``fitted``: one ``longtail fit`` on a long-tailed Fashion-MNIST PNG folder
(:mod:`fashion_images`), shared by test_fit_predict.py and test_export.py; read it, never refit
into it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from fashion_images import Fitted, fit_tree
from longtail.config import load_config
from longtail.data.datasets import FASHION_MNIST_ROOT, fashion_mnist_available
from longtail.train.loop import Stage1

# The test machine's cores are shared with other work: one intra-op thread avoids the heavy
# oversubscription slowdown (a tiny run is ~6x faster than with 2 contended threads).
torch.set_num_threads(1)

# Tests that read the real Fashion-MNIST files carry ``@pytest.mark.fashion_mnist``. Without the
# data they skip locally with this reason; under CI (CI=true) they fail, so a missing install
# step can never hide behind a skip.
FASHION_MNIST_REASON = (
    f"needs Fashion-MNIST in {FASHION_MNIST_ROOT}: `make test` installs it on Debian/Ubuntu "
    "as root (apt-get install dataset-fashion-mnist); elsewhere put the four IDX files there"
)


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"fashion_mnist: {FASHION_MNIST_REASON}")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("fashion_mnist") is None or fashion_mnist_available():
        return
    if _on_ci():
        pytest.fail(f"CI=true and the test {FASHION_MNIST_REASON}", pytrace=False)
    pytest.skip(FASHION_MNIST_REASON)


TINY = [
    "device=cpu",
    "optim.epochs=6",
    "swa.start=3",
    "swa.anneal_epochs=1",  # snapshots from epoch 4.0, once the lr is swa.lr
    "swa.every_steps=2",
    "swa.swag_rank=5",
    "precision=fp32",
    "kernels=on",  # the kernels where they apply, as before autotuning; no timing in tiny runs
    "stage2.srepr_samples=3",
    "stage2.epochs=5",
    "stage2.srepr_epochs=5",
    "stage2.lws_epochs=3",
]
NO_SWA = [*TINY, "optim.epochs=3", "swa.enabled=false"]


@dataclass
class TinyRun:
    dir: Path
    cfg: DictConfig
    overrides: list[str]
    results: dict  # what Stage1.fit() returned
    seconds: float


def _train(tmp_path_factory: pytest.TempPathFactory, name: str, overrides: list[str]) -> TinyRun:
    out = tmp_path_factory.mktemp(name) / "run"
    cfg = load_config("digits_lt", overrides)
    t0 = time.perf_counter()
    results = Stage1(cfg, out).fit()
    return TinyRun(out, cfg, list(overrides), results, time.perf_counter() - t0)


@pytest.fixture(scope="session")
def swa_run(tmp_path_factory) -> TinyRun:
    return _train(tmp_path_factory, "swa_run", TINY)


@pytest.fixture(scope="session")
def plain_run(tmp_path_factory) -> TinyRun:
    return _train(tmp_path_factory, "plain_run", NO_SWA)


@pytest.fixture(scope="session")
def fitted(tmp_path_factory) -> Fitted:
    """One `longtail fit` through the CLI, in process (Fashion-MNIST PNG folder)."""
    # only tests marked fashion_mnist use it: pytest_runtest_setup above has already skipped
    # (or, under CI, failed) them when the data is missing
    return fit_tree(tmp_path_factory.mktemp("fit"))

"""The ``longtail`` command: in process through ``longtail.cli.main`` and once as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from longtail.cli import main
from longtail.core.runtime import cpu_supports_bf16

METHOD_ROWS = ["joint", "ncm", "crt", "tau", "lws", "logit_adjust", "srepr", "srepr_ce", "swag_bma"]
TINY_CLI = [
    "device=cpu",
    "precision=fp32",
    "optim.epochs=2",
    "swa.start=1",
    "swa.anneal_epochs=0.5",
    "swa.every_steps=3",
    "swa.swag_rank=2",
    "swa.bn_batches=2",
    "stage2.epochs=2",
    "stage2.lws_epochs=1",
    "stage2.srepr_samples=2",
    "stage2.srepr_epochs=2",
    "stage2.srepr_alpha_grid=[0.5]",
    "stage2.srepr_bn_images=128",
]


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``longtail ARGV`` run in process."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors exit from inside main
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str) -> str:
    assert code == 2, (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "error:" in lines[0]
    return lines[0]


# ------------------------------------------------------------------ data summary
@pytest.mark.fashion_mnist
def test_data_summary_fashion_mnist_prints_counts_and_writes_png(tmp_path, capsys):
    png = tmp_path / "hist.png"
    code, out, err = run_main(
        ["data", "summary", "--dataset", "fashion-mnist", "--imbalance", "100", "--out", str(png)],
        capsys,
    )
    assert code == 0, err
    assert "per-class counts: 6000 3596 2156 1292 774 464 278 166 100 60\n" in out
    assert "total: 14,886" in out
    assert "imbalance factor 100 " in out
    assert f"histogram: {png}" in out
    assert png.stat().st_size > 0
    with Image.open(png) as im:
        assert im.format == "PNG"
        assert im.width > 100 and im.height > 100
        im.verify()


# ------------------------------------------------------------------ user errors
def test_unknown_dataset_lists_the_known_ones(capsys):
    line = assert_one_line_error(*run_main(["data", "summary", "--dataset", "mnits"], capsys))
    assert "unknown dataset 'mnits'" in line
    for known in ["digits", "fashion-mnist", "cifar10", "cifar100"]:
        assert known in line


@pytest.mark.parametrize(
    ("flag", "value"), [("--imbalance", "0.5"), ("--seed", "1.5"), ("--seed", "-1")]
)
def test_bad_numbers_are_one_line_usage_errors(flag, value, capsys):
    line = assert_one_line_error(
        *run_main(["data", "summary", "--dataset", "digits", flag, value], capsys)
    )
    assert f"argument {flag}" in line and repr(value) in line


def test_missing_cifar10_root_names_the_path_and_layout(tmp_path, capsys):
    root = tmp_path / "no-cifar-here"
    line = assert_one_line_error(
        *run_main(["data", "summary", "--dataset", "cifar10", "--root", str(root)], capsys)
    )
    assert repr(str(root)) in line
    assert str(root / "cifar-10-batches-py") in line
    for f in ["data_batch_1", "data_batch_5", "test_batch", "batches.meta"]:
        assert f in line
    line = assert_one_line_error(*run_main(["data", "summary", "--dataset", "cifar10"], capsys))
    assert "needs --root DIR" in line


def test_train_with_an_unknown_key_suggests_the_close_one(tmp_path, capsys):
    out = tmp_path / "never"
    line = assert_one_line_error(
        *run_main(["train", "digits_lt", "optim.lrr=0.05", "--out", str(out)], capsys)
    )
    assert "unknown config key 'optim.lrr'; did you mean 'optim.lr'?" in line
    assert not out.exists()


def test_train_resume_with_a_changed_key_is_refused(swa_run, capsys):
    # `train --resume RUN key=value`: the override must not be mistaken for the CONFIG
    line = assert_one_line_error(
        *run_main(["train", "--resume", str(swa_run.dir), "optim.lr=0.05"], capsys)
    )
    assert "different config" in line and "optim.lr: 0.1 != 0.05" in line


def test_train_into_an_existing_run_is_refused(swa_run, capsys):
    argv = ["train", "digits_lt", *swa_run.overrides, "--out", str(swa_run.dir)]
    line = assert_one_line_error(*run_main(argv, capsys))
    assert "already holds a training run" in line and "--resume" in line


def test_subprocess_error_exits_2_with_one_line(tmp_path):
    exe = Path(sys.executable).with_name("longtail")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "longtail"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run(
        [*cmd, "data", "summary", "--dataset", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert p.returncode == 2
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("longtail: error: unknown dataset 'nope'; known: ")
    assert "digits" in lines[0] and "fashion-mnist" in lines[0]
    assert not list(tmp_path.iterdir())  # no stray PNG or run directory


# ------------------------------------------------------------------ train + classify
def test_train_then_classify_prints_every_method(tmp_path, capsys):
    run = tmp_path / "cli-run"
    code, out, err = run_main(["train", "digits_lt", *TINY_CLI, "--out", str(run)], capsys)
    assert code == 0, err
    assert "final model, test: accuracy" in out and "swa model, test: accuracy" in out
    assert f"run directory: {run}" in out
    assert (run / "swag.pt").is_file()

    code, out, err = run_main(["classify", str(run)], capsys)
    assert code == 0, err
    lines = out.splitlines()
    header = next(line for line in lines if line.startswith("method"))
    assert header.split() == [
        "method",
        *["acc", "many", "med", "few", "NLL", "ECE", "Brier"],
        *["T", "NLL(ts)", "ECE(ts)", "Brier(ts)"],
    ]
    results = json.loads((run / "results.json").read_text())["methods"]
    assert list(results) == METHOD_ROWS
    for name in METHOD_ROWS:
        row = next(line.split() for line in lines if line.split()[:1] == [name])
        assert float(row[1]) == pytest.approx(100 * results[name]["accuracy"], abs=0.006)
        ts = results[name]["ts"]
        assert float(row[-1]) == pytest.approx(ts["brier"], abs=6e-4)
        assert float(row[-2]) == pytest.approx(100 * ts["ece"], abs=0.006)
    assert f"results: {run / 'results.json'}" in out


def test_doctor_names_the_cpu_the_kernels_and_each_choice(tmp_path, monkeypatch, capsys):
    """`longtail doctor` on a tiny shape, with an injected timer (the kernel ranked slower):
    the CPU, compiler, kernel and autotune lines, and the choice it prints is PyTorch's op with
    both timings."""
    from longtail.models import autotune, kernels

    monkeypatch.setenv("LONGTAIL_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("LONGTAIL_KERNELS", raising=False)
    autotune.forget()

    def kernel_slower(name, fn):
        fn()
        # bf16 ranked slower too: the doctor then measures the fp32 peak (a bf16 peak on a
        # CPU that only emulates bf16 took 30 s; the bf16 choice: test_precision.py)
        return {"kernel": 0.002, "pytorch": 0.001, "bf16": 0.003}[name]

    autotune.use_timer(kernel_slower)
    try:
        argv = ["doctor", "--batch-size", "4", "--image-size", "8"]
        code, out, _ = run_main(argv, capsys)
    finally:
        autotune.use_timer(None)
        autotune.forget()
    assert code == 0
    assert f"CPU: {kernels.cpu_model()}" in out
    assert "AMX " in out and "AVX512-BF16 " in out and "AVX2 " in out
    assert f"torch {torch.__version__}, {torch.get_num_threads()} threads" in out
    assert "C compiler: " in out and "matmul peak: " in out
    # precision=auto's choice: bf16 was timed slower (where oneDNN has bf16 to time)
    if cpu_supports_bf16():
        assert "oneDNN bf16 yes; precision auto: fp32 (a 3x3 convolution" in out
        assert "bf16 3.00 ms, fp32 1.00 ms)" in out and "float32 matmul peak" in out
    else:
        assert "oneDNN bf16 no; precision auto: fp32\n" in out
    assert f"kernel fused_bn: {kernels.status('fused_bn')}" in out
    assert f"kernel conv3x3: {kernels.status('conv3x3')}" in out
    rows = [r for r in out.splitlines() if r.startswith("  fused_bn|") or r.startswith("  conv3x3")]
    assert rows and all("pytorch (kernel 2.000 ms, pytorch 1.000 ms)" in r for r in rows)

"""The Python examples in the README and docs/METHODS.md run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    # the plain-onnxruntime example needs a fitted bundle: test_export.py runs it on one
    blocks = [b for b in blocks if "onnxruntime" not in b]
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "[143 111  86  66  51  40  31  24  18  14]" in out
    assert all(m in out for m in ("crt", "tau", "srepr"))
    assert (tmp_path / "runs" / "nb-digits" / "results.json").is_file()


def test_methods_fused_bn_example_runs(capsys) -> None:
    """docs/METHODS.md's "Speed on CPU" example: fused and plain BatchNorm agree."""
    methods = README.parent / "docs" / "METHODS.md"
    blocks = re.findall(r"```python\n(.*?)```", methods.read_text(), flags=re.S)
    (code,) = [b for b in blocks if 'kernels = "off"' in b]
    exec(compile(code, str(methods), "exec"), {"__name__": "methods"})
    diff = float(capsys.readouterr().out.split("(")[1].split(",")[0])
    assert 0 < diff < 1e-4  # not identical (different kernels), equal up to fp32 rounding


def test_methods_fast_conv_example_runs(capsys) -> None:
    """docs/METHODS.md's "Speed on CPU" example: kernel and oneDNN convolutions agree to bf16."""
    methods = README.parent / "docs" / "METHODS.md"
    blocks = re.findall(r"```python\n(.*?)```", methods.read_text(), flags=re.S)
    (code,) = [b for b in blocks if '"conv3x3": "off"' in b]
    exec(compile(code, str(methods), "exec"), {"__name__": "methods"})
    rel = float(capsys.readouterr().out.strip())
    assert rel < 0.02  # 31 layers of bf16 rounding, not a different function
    from longtail.models import conv3x3, kernels

    if conv3x3.load_kernel() is not None:  # the kernel ran: two different code paths
        assert rel > 0, "kernel and oneDNN outputs are identical: the kernel did not run"
    else:  # without AVX512-BF16 both lines run oneDNN (the allowed skip of test_conv3x3.py)
        assert kernels.status("conv3x3").startswith("not available on this CPU"), rel

"""The README's Python example runs as written (in a scratch directory)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "[143 111  86  66  51  40  31  24  18  14]" in out
    assert all(m in out for m in ("crt", "tau", "srepr"))
    assert (tmp_path / "runs" / "nb-digits" / "results.json").is_file()

"""Progress bars: drawn on a terminal (or when forced), never in logs or on non-zero ranks."""

from __future__ import annotations

import re

import pytest

from conftest import TINY
from longtail.config import load_config
from longtail.core.progress import ENV, bars_enabled, progress
from longtail.train.loop import Stage1


@pytest.mark.parametrize(
    ("value", "is_main", "expected"),
    [("1", True, True), ("on", True, True), ("0", True, False), ("1", False, False)],
)
def test_environment_forces_bars_on_or_off_and_ranks_stay_quiet(
    monkeypatch, value, is_main, expected
):
    monkeypatch.setenv(ENV, value)
    assert bars_enabled(is_main) is expected


def test_without_a_terminal_bars_are_off(monkeypatch, capsys):
    monkeypatch.delenv(ENV, raising=False)
    assert bars_enabled(True) is False  # pytest's captured stderr is not a terminal
    assert sum(progress(range(5), desc="quiet")) == 10
    assert capsys.readouterr().err == ""


def _train_one_epoch(tmp_path, monkeypatch, capsys, value: str) -> tuple[str, str]:
    monkeypatch.setenv(ENV, value)
    cfg = load_config("digits_lt", [*TINY, "optim.epochs=2", "swa.enabled=false"])
    Stage1(cfg, tmp_path / value).fit()
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_training_bar_shows_steps_speed_loss_and_the_run_eta(tmp_path, monkeypatch, capsys):
    out, err = _train_one_epoch(tmp_path, monkeypatch, capsys, "1")
    assert re.search(r"epoch 2/2: .*\d+/\d+ ", err), err[-500:]
    assert re.search(r"loss=\d+\.\d{3} lr=\S+ img/s=\d+ run ETA \d\d:\d\d", err), err[-500:]
    # the per-epoch summary lines stay on stdout for logs
    assert len(re.findall(r"^epoch=\d+ ", out, flags=re.M)) == 2


def test_training_in_a_log_prints_only_the_epoch_lines(tmp_path, monkeypatch, capsys):
    out, err = _train_one_epoch(tmp_path, monkeypatch, capsys, "0")
    assert "run ETA" not in err and "epoch 1/2" not in err
    assert len(re.findall(r"^epoch=\d+ ", out, flags=re.M)) == 2

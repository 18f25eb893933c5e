"""``swa.start``: a whole epoch number or a fraction of the epochs, nothing in between."""

from __future__ import annotations

import pytest

from longtail.config import load_config
from longtail.errors import LongtailError
from longtail.train.schedules import swa_start_epoch


@pytest.mark.parametrize(("start", "epochs", "expected"), [(0.75, 16, 12), (10, 16, 10), (0, 4, 0)])
def test_swa_start_epoch(start: float, epochs: int, expected: int) -> None:
    cfg = load_config("digits_lt", [f"swa.start={start}", f"optim.epochs={epochs}"])
    assert swa_start_epoch(cfg) == expected


@pytest.mark.parametrize("start", ["3.5", "16", "20"])
def test_swa_start_out_of_shape_is_refused(start: str) -> None:
    cfg = load_config("digits_lt", [f"swa.start={start}", "optim.epochs=16"])
    with pytest.raises(LongtailError, match="swa.start"):
        swa_start_epoch(cfg)


def test_no_swa_means_no_start() -> None:
    assert swa_start_epoch(load_config("digits_lt", ["swa.enabled=false"])) is None

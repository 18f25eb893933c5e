"""Plain-text comparison tables of per-method results."""

from __future__ import annotations

import math

COLUMNS = (
    ("accuracy", "acc"),
    ("many", "many"),
    ("medium", "med"),
    ("few", "few"),
    ("nll", "NLL"),
    ("ece", "ECE"),
    ("brier", "Brier"),
)
PERCENT = {"accuracy", "many", "medium", "few", "ece"}


def _fmt(key: str, v: float | None, std: float | None = None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    scale = 100.0 if key in PERCENT else 1.0
    text = f"{v * scale:.2f}" if scale == 100 else f"{v:.3f}"
    if std is not None:
        text += f"±{std * scale:.2f}" if scale == 100 else f"±{std:.3f}"
    return text


def format_table(rows: dict[str, dict], calibrated: bool = False) -> str:
    """A fixed-width table: one row per method, accuracy / shot splits / ECE in percent.

    ``rows[name]`` holds the metric keys (and ``<key>_std`` for mean ± std); with
    ``calibrated``, NLL / ECE / Brier after temperature scaling are appended (``ts`` entry).
    """
    head = ["method"] + [h for _, h in COLUMNS]
    if calibrated:
        head += ["T", "NLL(ts)", "ECE(ts)", "Brier(ts)"]
    lines = [head]
    for name, r in rows.items():
        line = [name] + [_fmt(k, r.get(k), r.get(f"{k}_std")) for k, _ in COLUMNS]
        if calibrated:
            ts = r.get("ts") or {}
            t = ts.get("temperature")
            line += [
                f"{t:.2f}" if t is not None else "-",
                _fmt("nll", ts.get("nll")),
                _fmt("ece", ts.get("ece")),
                _fmt("brier", ts.get("brier")),
            ]
        lines.append(line)
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in lines
    ]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)

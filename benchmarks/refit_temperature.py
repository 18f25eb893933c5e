"""Which hold-out, and which weighting of it, gives the re-fit a temperature that fits it?

    python benchmarks/refit_temperature.py TEST_DIR FIT_DIR [FIT_DIR ...] [--json OUT]

Until 2026-12-07 ``longtail fit`` deployed its re-fit at the temperature stage 2 fitted on the
selection run's *validation* split (its mean NLL, every image weighted alike); it now uses the
``pool_bal`` rule below (:func:`longtail.fit.select.balanced_temperature`). The benchmark's test
folder is class-balanced, the hold-outs are long-tailed like the folder, and the
logit-adjusted loss and the post-hoc adjustments aim their probabilities at the balanced
distribution. This script refits the temperature of each ``--ensemble`` bundle's selection
run (its second network: same backbone, head and mirror setting as the deployed method) four
ways from the same hold-out logits:

- ``val``: validation, mean NLL (the bundle's ``T`` for bundles written before the change,
  checked against a refit within 1 %),
- ``val_bal``: validation, class-balanced NLL (each class's images weigh ``1 / n_c``),
- ``pool``: validation + internal test split (the images that chose the recipe), mean NLL,
- ``pool_bal``: validation + internal test, class-balanced NLL,

and prints, for the re-fit and for the selection run, the top-1 ECE on ``TEST_DIR`` (the
balanced folder of ``benchmarks/fit_folder.py``, its own scoring) at each temperature and at
the test-optimal one (read only, to judge the rules; it chooses nothing). Accuracy does not
depend on the temperature. docs/RESULTS.md (issue 19) quotes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fit_folder import CLASSES, raw_logits, score_probabilities, scoring_args
from longtail.evaluate.calibration import class_balanced_weights, fit_temperature
from longtail.fit.bundle import load_bundle, members

RULES = ("val", "val_bal", "pool", "pool_bal")


def load_split(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, C, S, S)`` in [0, 1] and labels ``(N,)`` of a fit's ``data/*.pt`` split."""
    d = torch.load(path, weights_only=False)
    return d["images"].float().div(255.0), d["labels"].long()


def temperatures(holdout: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """The four rules' temperatures from ``{"val": (logits, y), "test": (logits, y)}``."""
    lv, yv = holdout["val"]
    lp = torch.cat([lv, holdout["test"][0]])
    yp = torch.cat([yv, holdout["test"][1]])
    return {
        "val": fit_temperature(lv, yv),
        "val_bal": fit_temperature(lv, yv, weights=class_balanced_weights(yv)),
        "pool": fit_temperature(lp, yp),
        "pool_bal": fit_temperature(lp, yp, weights=class_balanced_weights(yp)),
    }


def one_fit(fit_dir: Path, x_test: torch.Tensor, truth: np.ndarray) -> dict:
    """Each rule's temperature and the test folder's ECE of the re-fit and the selection run."""
    b = load_bundle(fit_dir / "bundle")
    names = b.meta.get("ensemble") or []
    nets = members(b.model)
    if names[:2] != ["re-fit", "selection run"]:
        raise SystemExit(f"{fit_dir}: not an --ensemble bundle of the re-fit and the selection run")
    refit, sel = nets[0], nets[1]
    order = [b.meta["classes"].index(c) for c in CLASSES]
    holdout = {s: load_split(fit_dir / "data" / f"{s}.pt") for s in ("val", "test")}
    held = {s: (raw_logits(sel, xs), ys) for s, (xs, ys) in holdout.items()}
    ts = temperatures(held)
    deployed = float(sel.temperature)
    # the bundle's own rule, recomputed (stage 2 fitted it on cached bf16 features: ~0.1 %)
    rule = min(("val", "pool_bal"), key=lambda r: abs(ts[r] - deployed))
    if abs(ts[rule] - deployed) > 1e-2 * deployed:
        raise SystemExit(f"{fit_dir}: the bundle's T {deployed:.4f} is none of {ts}")
    ts[rule] = deployed  # exactly the bundle's, so that its ECE is fit_folder.py's figure
    out = {"fit": str(fit_dir), "method": b.meta["method"], "temperatures": ts}
    y = torch.as_tensor(truth)
    for name, net in (("re-fit", refit), ("selection run", sel)):
        z = raw_logits(net, x_test)[:, order]
        t_opt = fit_temperature(z, y)

        def ece(t: float, z: torch.Tensor = z) -> float:
            return score_probabilities(torch.softmax(z / t, dim=1).numpy(), truth)["ece"]

        out[name] = {
            "ece": {r: ece(t) for r, t in ts.items()},
            "test_optimal_temperature": t_opt,
            "ece_at_test_optimal": ece(t_opt),
        }
    return out


def main() -> None:
    a, x_test, truth = scoring_args(__doc__, "`longtail fit --ensemble` folders")
    rows = []
    head = "fit | method | T: " + " / ".join(RULES) + " / test-opt (re-fit) | ECE % re-fit: "
    print(head + " / ".join(RULES) + " / at opt | ECE % selection run: same")
    for d in a.fit_dirs:
        r = one_fit(d, x_test, truth)
        rows.append(r)
        ts = " / ".join(f"{r['temperatures'][k]:.3f}" for k in RULES)
        e = {
            n: " / ".join(f"{100 * r[n]['ece'][k]:.2f}" for k in RULES)
            for n in ("re-fit", "selection run")
        }
        print(
            f"{d} | {r['method']} | {ts} / {r['re-fit']['test_optimal_temperature']:.3f} | "
            f"{e['re-fit']} / {100 * r['re-fit']['ece_at_test_optimal']:.2f} | "
            f"{e['selection run']} / {100 * r['selection run']['ece_at_test_optimal']:.2f}"
        )
    for n in ("re-fit", "selection run"):
        means = " / ".join(f"{100 * np.mean([r[n]['ece'][k] for r in rows]):.2f}" for k in RULES)
        print(f"mean ECE % of the {n} over {len(rows)} fits ({' / '.join(RULES)}): {means}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

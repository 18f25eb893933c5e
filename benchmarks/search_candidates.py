"""Does the search's hold-out pick the candidate that is best on unseen data?

    python benchmarks/search_candidates.py TEST_DIR FIT_DIR [FIT_DIR ...] [--json OUT]

``longtail fit`` trains its candidates (``FIT_DIR/search/mixup<a>-e<E>``) on the selection
split and chooses one by its hold-out balanced accuracy (docs/METHODS.md, "Search"). This script
scores every candidate's SWA network with its own linear classifier (the joint head; with the
logit-adjusted loss, ``fit``'s default, that classifier is already aimed at balanced accuracy),
mirror-averaged when the fit's bundle is, on ``TEST_DIR`` (the balanced test folder of
``benchmarks/fit_folder.py``), next to the candidate's hold-out score and bootstrap sd from
``fit.json``. It reads only: the test folder judges the search's rule, it chooses nothing in a
fit. Accuracy does not depend on a temperature, so none is applied. docs/RESULTS.md (issue 19,
"The long schedule within the hold-out's noise") quotes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from fit_folder import CLASSES, raw_logits, score_probabilities, scoring_args
from longtail.fit.bundle import DeployedClassifier, load_bundle, members
from longtail.models.registry import build_model


def candidate_network(fit_dir: Path, name: str, meta: dict, mirror: bool) -> DeployedClassifier:
    """Candidate ``name``'s SWA network and joint classifier as a deployed module (T = 1)."""
    p = meta["preprocessing"]
    net = build_model(meta["backbone"]["name"], len(meta["classes"]), p["channels"], kernels="off")
    state = torch.load(fit_dir / "search" / name / "model_swa.pt", weights_only=False)
    net.load_state_dict(state)
    net.eval()
    return DeployedClassifier(net, net.classifier, 1.0, p["mean"], p["std"], mirror=mirror).eval()


def one_fit(fit_dir: Path, x: torch.Tensor, truth: np.ndarray) -> dict:
    """Every candidate of one fit: rung, chosen method, hold-out score and sd, test score."""
    b = load_bundle(fit_dir / "bundle")
    mirror = bool(members(b.model)[-1].mirror)
    f = json.loads((fit_dir / "fit.json").read_text())
    order = [b.meta["classes"].index(c) for c in CLASSES]
    rows = []
    for c in f["candidates"]:
        net = candidate_network(fit_dir, c["name"], b.meta, mirror)
        s = score_probabilities(torch.softmax(raw_logits(net, x)[:, order], 1).numpy(), truth)
        hold = c.get("val_and_test", c["val"])
        rows.append(
            {
                "name": c["name"],
                "rung": c["rung"],
                "method": c["method"],
                "holdout": hold["balanced_accuracy"],
                "gap_to_chosen": c["gap_to_best"]["gap"],
                "gap_sd": c["gap_to_best"]["std"],
                "test_joint": s["balanced_accuracy"],
            }
        )
    return {"fit": str(fit_dir), "chosen": f["recipe"], "mirror": mirror, "candidates": rows}


def main() -> None:
    a, x, truth = scoring_args(__doc__, "`longtail fit` output folders")
    out = []
    print("fit | candidate | rung | method | hold-out % (gap to chosen ± sd) | test, joint head %")
    for d in a.fit_dirs:
        r = one_fit(d, x, truth)
        out.append(r)
        for c in r["candidates"]:
            star = "*" if c["name"] == r["chosen"] else " "
            print(
                f"{d} | {c['name']}{star} | {c['rung']} | {c['method']} | "
                f"{100 * c['holdout']:.2f} ({100 * c['gap_to_chosen']:+.2f} ± "
                f"{100 * c['gap_sd']:.2f}) | {100 * c['test_joint']:.2f}"
            )
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

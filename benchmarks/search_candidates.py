"""Does the search's hold-out pick the candidate that is best on unseen data?

    python benchmarks/search_candidates.py TEST_DIR FIT_DIR [FIT_DIR ...] [--json OUT]

``longtail fit`` trains its candidates (``FIT_DIR/search/mixup<a>-e<E>``) on the selection
split and chooses one by its hold-out balanced accuracy against the search's default, rung 2's
strongest mixup (docs/METHODS.md, "Search"). This script
scores every candidate's SWA network with its own linear classifier (the joint head; with the
logit-adjusted loss, ``fit``'s default, that classifier is already aimed at balanced accuracy),
mirror-averaged when the fit's bundle is, on ``TEST_DIR`` (the balanced test folder of
``benchmarks/fit_folder.py``), next to the candidate's hold-out score and bootstrap sd from
``fit.json``. It reads only: the test folder judges the search's rule, it chooses nothing in a
fit. Accuracy does not depend on a temperature, so none is applied. docs/RESULTS.md (issue 19,
"The long schedule within the hold-out's noise") quotes it.

``TEST_DIR`` may also be a development folder (``benchmarks/dev_folder.py``: training images
that no benchmark fit trains on), the one to judge a rule by before it becomes the default. The
last table replays the search's rule on each fit (``search.search_default``,
``search.overturns``): the default, the hold-out's best, the best's lead over the default ±
its bootstrap sd (from ``fit.json``, where the fit chose one of the two), and the score of
what the fit chose and of what the rule chooses.

    python benchmarks/search_candidates.py --replay OUT.json [OUT.json ...]   # no re-scoring
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from fit_folder import CLASSES, raw_logits, score_probabilities, scoring_args
from longtail.fit.bundle import DeployedClassifier, load_bundle, members
from longtail.fit.search import Candidate, choose_candidate, overturns, search_default
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
                "mixup_alpha": c["mixup_alpha"],
                "rung": c["rung"],
                "method": c["method"],
                "holdout": hold["balanced_accuracy"],
                "gap_to_chosen": c["gap_to_best"]["gap"],
                "gap_sd": c["gap_to_best"]["std"],
                "test_joint": s["balanced_accuracy"],
            }
        )
    return {"fit": str(fit_dir), "chosen": f["recipe"], "mirror": mirror, "candidates": rows}


def replay(fit: dict) -> dict | None:
    """The search's rule on one fit's rows (:func:`one_fit`): ``None`` without a rung 2, else
    the default, the hold-out's best, the best's lead over the default and its sd (``None``
    when the fit chose neither, so ``fit.json`` holds no gap between them), and the rule's pick
    (fractions)."""
    rows = fit["candidates"]
    as_cand = {
        r["name"]: Candidate(  # name: mixup<alpha>-e<epochs> (older JSON has no mixup_alpha)
            r["name"],
            r.get("mixup_alpha", float(r["name"][5:].split("-e")[0])),
            int(r["name"].split("-e")[1]),
            r["rung"],
            val={"balanced_accuracy": r["holdout"]},
        )
        for r in rows
    }
    default = search_default(list(as_cand.values()))
    if default is None:
        return None
    by = {r["name"]: r for r in rows}
    top = by[choose_candidate(list(as_cand.values())).name]
    d, chosen = by[default.name], by[fit["chosen"]]
    lead = sd = None
    if chosen is d:  # gaps are to the chosen: chosen - top
        lead, sd = -top["gap_to_chosen"], top["gap_sd"]
    elif chosen is top:  # chosen - default
        lead, sd = d["gap_to_chosen"], d["gap_sd"]
    pick = d
    if lead is not None:
        cand = as_cand[top["name"]]
        cand.gap = (-lead, sd)
        pick = top if overturns(cand) else d
    return {
        "fit": fit["fit"],
        "default": d["name"],
        "top": top["name"],
        "lead": lead,
        "sd": sd,
        "chosen": chosen["name"],
        "chosen_score": chosen["test_joint"],
        "rule": pick["name"] if lead is not None else None,
        "rule_score": pick["test_joint"] if lead is not None else None,
        "best_score": max(r["test_joint"] for r in rows),
    }


def print_replay(fits: list[dict]) -> None:
    """:func:`replay` of every fit as a table, and the mean change of the chosen score."""
    print("fit | default | hold-out best | lead ± sd | chosen (score) | rule (score) | best")
    changes = []
    for f in fits:
        r = replay(f)
        if r is None:
            continue
        lead = "n/a" if r["lead"] is None else f"{100 * r['lead']:+.2f} ± {100 * r['sd']:.2f}"
        rule = "n/a" if r["rule"] is None else f"{r['rule']} ({100 * r['rule_score']:.2f})"
        if r["rule"] is not None:
            changes.append(r["rule_score"] - r["chosen_score"])
        print(
            f"{r['fit']} | {r['default']} | {r['top']} | {lead} | {r['chosen']} "
            f"({100 * r['chosen_score']:.2f}) | {rule} | {100 * r['best_score']:.2f}"
        )
    moved = [c for c in changes if c != 0]
    print(
        f"rule against the fits' choices: {len(moved)} of {len(changes)} changed, "
        f"{sum(c > 0 for c in moved)} up; mean change {100 * np.mean(changes):+.2f} points"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--replay":
        print_replay([f for p in sys.argv[2:] for f in json.loads(Path(p).read_text())])
        return
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
    print()
    print_replay(out)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

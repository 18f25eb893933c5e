"""Has stage 1 memorised its training set? Per-class feature norms, train against test.

    python benchmarks/feature_norms.py RUN_DIR [--backbone swa|final]

Reads the features stage 2 cached in ``RUN_DIR/features/<backbone>.pt`` (run ``longtail
classify RUN_DIR`` first) and the backbone's own linear classifier, and prints per class: the
training count, the joint classifier's accuracy on the un-augmented training images and on the
test images, and the mean L2 norm of the penultimate features of each split. A backbone that
classifies (nearly) every training image correctly and whose rare classes' training features are
much longer than their test features is in the regime where heads re-trained on training features
(cRT, LWS, SRepr) see features unlike the test images' (issue 18's diagnosis on CIFAR-10-LT).
"""

from __future__ import annotations

import argparse

import torch

from longtail.core.io import verified_load
from longtail.core.rundir import RunDir


def per_class(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor, c: int):
    """Per class of ``c``: count, accuracy of ``z @ w.T + b`` and mean feature norm.

    ``z``: features ``(N, d)``; ``y``: labels ``(N,)``; ``w``: ``(c, d)``; ``b``: ``(c,)``.
    """
    pred = (z.float() @ w.T + b).argmax(1)
    norms = z.float().norm(dim=1)
    rows = []
    for k in range(c):
        m = y == k
        n = int(m.sum())
        acc = float((pred[m] == k).float().mean()) if n else float("nan")
        rows.append((n, acc, float(norms[m].mean()) if n else float("nan")))
    overall = float((pred == y).float().mean())
    return rows, overall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--backbone", default="swa", choices=("swa", "final"))
    a = ap.parse_args()
    run = RunDir(a.run_dir)
    feats = verified_load(run.feature_path(a.backbone))
    state = verified_load(run.model_path(a.backbone))
    w, b = state["classifier.weight"].float(), state["classifier.bias"].float()
    c = w.shape[0]
    table = {s: per_class(*feats[s], w, b, c) for s in ("train", "test") if s in feats}
    print(f"{run.path} backbone={a.backbone}")
    for s, (_, overall) in table.items():
        print(f"{s} accuracy (joint classifier, un-augmented images): {100 * overall:.2f} %")
    print("class  n_train  train_acc  test_acc  norm_train  norm_test  ratio")
    for k in range(c):
        (n, tr_acc, tr_norm), (_, te_acc, te_norm) = table["train"][0][k], table["test"][0][k]
        print(
            f"{k:5d}  {n:7d}  {100 * tr_acc:9.2f}  {100 * te_acc:8.2f}  {tr_norm:10.2f}  "
            f"{te_norm:9.2f}  {tr_norm / te_norm:5.2f}"
        )


if __name__ == "__main__":
    main()

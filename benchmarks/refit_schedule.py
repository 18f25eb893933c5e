"""Does the re-fit's calibration depend on its schedule? Train a fit's re-fit again at the
selection run's number of optimizer steps, and score both re-fits on a test folder.

    python benchmarks/refit_schedule.py FIT_DIR TEST_DIR --out OUT [--schedule steps|epochs]

``longtail fit`` re-trains the chosen recipe on every labelled image for the selection run's
number of *epochs* (about a third more steps, since the hold-outs join the training set) and
deploys it with the temperature fitted on the selection run's hold-out. ``--schedule steps``
trains the same recipe (seed, batch, lr, mixup, SWA over the last quarter, the chosen method
with the bundle's pins, its temperature and mirror averaging) for ``round(E * n_selection /
n_all)`` epochs instead, so the re-fit takes as many steps as the selection run;
``--schedule epochs`` repeats the bundle's own schedule (a check that a re-fit is reproducible:
its figures should equal the bundle's). The first network of the bundle must be the re-fit
(every single-network bundle; an ``--ensemble`` bundle lists it first).

Prints, for the bundle's re-fit and the new one, the balanced accuracy and top-1 ECE on
``TEST_DIR`` (a folder of class subfolders named as the fit's classes, e.g. the balanced test
folder of ``benchmarks/fit_folder.py``), the deployed temperature ``T`` and the temperature
that would minimise the NLL on the test folder (read only: it judges the transfer of ``T``,
it chooses nothing). docs/RESULTS.md (issue 19) quotes it.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from fit_folder import top1_ece  # the figures of fit_folder.py, scored alike
from longtail.classify.run import Stage2
from longtail.evaluate.calibration import fit_temperature
from longtail.fit.bundle import DeployedClassifier, load_bundle, members
from longtail.fit.images import list_image_inputs
from longtail.train.loop import Stage1
from longtail.train.schedules import swa_collect_from


def schedule(cfg, epochs: int) -> None:
    """Set ``cfg``'s epochs and what ``longtail.fit.plan.recipe`` derives from them (warm-up,
    SWA over the last quarter, the anneal into it) in place."""
    start = min(max(int(round(0.75 * epochs)), 0), epochs - 1)
    cfg.optim.epochs = epochs
    cfg.optim.warmup_epochs = min(5.0, epochs / 10)
    cfg.swa.start = float(start)
    cfg.swa.anneal_epochs = min(5.0, max((epochs - start) / 2, 0.5))
    swa_collect_from(cfg)  # raises if SWA would get no snapshot


def score(net: torch.nn.Module, x: torch.Tensor, truth: np.ndarray, t: float) -> dict:
    """Balanced accuracy, top-1 ECE and test-optimal temperature of ``net`` (calibrated logits
    at temperature ``t``) on images ``x`` ``(N, C, S, S)`` in ``[0, 1]`` with labels ``truth``
    ``(N,)`` (indices into the bundle's classes)."""
    with torch.no_grad():
        raw = torch.cat([net.logits(c) for c in x.split(256)]) * t
    prob = torch.softmax(raw / t, dim=1)
    pred = prob.argmax(1).numpy()
    per_class = [float((pred[truth == c] == c).mean()) for c in np.unique(truth)]
    return {
        "balanced_accuracy": float(np.mean(per_class)),
        "ece": float(top1_ece(prob.max(1).values.numpy(), pred == truth)),
        "temperature": t,
        "test_optimal_temperature": fit_temperature(raw, torch.as_tensor(truth)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fit_dir", type=Path, help="a `longtail fit --out` folder (re-fitted)")
    p.add_argument("test_dir", type=Path, help="class subfolders of test images")
    p.add_argument("--out", type=Path, required=True, help="run folder for the new re-fit")
    p.add_argument("--schedule", choices=("steps", "epochs"), default="steps")
    a = p.parse_args()

    meta = json.loads((a.fit_dir / "bundle" / "bundle.json").read_text())
    if not meta.get("refit"):
        raise SystemExit(f"{a.fit_dir}: its bundle is not a re-fit (fit --no-refit)")
    sizes = {
        d: json.loads((a.fit_dir / d / "meta.json").read_text())["sizes"]["train"]
        for d in ("data", "data-all")
    }
    cfg = OmegaConf.load(a.fit_dir / "run" / "config.yaml")
    e = int(cfg.optim.epochs)
    e2 = max(2, round(e * sizes["data"] / sizes["data-all"])) if a.schedule == "steps" else e
    schedule(cfg, e2)
    print(
        f"{a.fit_dir}: re-fit {e} epochs on {sizes['data-all']:,} images; new: {e2} epochs "
        f"(selection run: {e} epochs on {sizes['data']:,})"
    )
    if not (a.out / "stage1.json").exists():
        Stage1(cfg, a.out).fit()
    method = meta["method"]
    s2 = Stage2(a.out, overrides=list(meta["pins"]))
    s2.run([method])
    t = float(meta["temperature"])
    prep = meta["preprocessing"]
    new = DeployedClassifier(
        copy.deepcopy(s2.model).float().cpu().to(memory_format=torch.contiguous_format),
        copy.deepcopy(s2.heads[method]).float().cpu(),
        t,
        prep["mean"],
        prep["std"],
        mirror=bool(meta["mirror"]["used"]),
    ).eval()
    bundle = load_bundle(a.fit_dir / "bundle")
    old = members(bundle.model)[0].eval()
    paths = list_image_inputs([str(a.test_dir)])
    truth = np.array([meta["classes"].index(Path(q).parent.name) for q in paths])
    x = torch.stack([bundle.decode(q) for q in paths]).float().div(255.0)
    res = {"method": method, "epochs": {"bundle": e, "new": e2}, "images": sizes}
    for name, net in (("bundle", old), ("new", new)):
        s = res[name] = score(net, x, truth, t)
        print(
            f"  {name} re-fit ({res['epochs'][name]} epochs, {method}): balanced acc "
            f"{100 * s['balanced_accuracy']:.2f} %, ECE {100 * s['ece']:.2f} %, T {t:.3f} "
            f"(test-optimal {s['test_optimal_temperature']:.3f})"
        )
    (a.out / "compare.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

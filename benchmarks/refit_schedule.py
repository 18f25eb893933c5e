"""Does the re-fit's calibration depend on its schedule? Train a fit's re-fit again at the
selection run's number of optimizer steps, and score both re-fits on a test folder.

    python benchmarks/refit_schedule.py FIT_DIR TEST_DIR --out OUT [--schedule steps|epochs]

``longtail fit`` re-trains the chosen recipe on every labelled image for the selection run's
number of *epochs* (about a third more steps, since the hold-outs join the training set) and
deploys it with the temperature fitted on the selection run's hold-out. ``--schedule steps``
trains the same recipe (seed, batch, lr, mixup, SWA over the last quarter, the chosen method
with the bundle's pins, its temperature and mirror averaging) for ``round(E * n_selection /
n_all)`` epochs instead, so the re-fit takes as many steps as the selection run (warm-up, SWA
start and anneal as :func:`longtail.fit.plan.recipe` derives them for those epochs; the SWA
snapshot interval stays the re-fit's); ``--schedule epochs`` repeats the bundle's own
schedule (a check that a re-fit is reproducible: its figures should equal the bundle's). The
first network of the bundle must be the re-fit (every single-network bundle; an
``--ensemble`` bundle lists it first).

Prints, for the bundle's re-fit and the new one, the balanced accuracy and top-1 ECE on
``TEST_DIR`` (the balanced test folder of ``benchmarks/fit_folder.py``, scored by its own
functions), the deployed temperature ``T`` and the temperature
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

from fit_folder import CLASSES, raw_logits, score_probabilities, test_images
from longtail.classify.run import Stage2
from longtail.evaluate.calibration import fit_temperature
from longtail.fit.bundle import DeployedClassifier, load_bundle, members
from longtail.fit.images import Header
from longtail.fit.plan import plan_input, recipe
from longtail.train.loop import Stage1
from longtail.train.schedules import swa_collect_from


def schedule(cfg, epochs: int, n_train: int, channels: int) -> None:
    """Set ``cfg``'s epochs and the warm-up, SWA start and anneal that ``fit``'s recipe
    (:func:`longtail.fit.plan.recipe` for ``n_train`` selection images of ``channels``
    channels) derives from them, in place; raises if the recipe's lr is not ``cfg``'s (another
    plan than the fit's)."""
    mode = "L" if channels == 1 else "RGB"
    plan = plan_input(
        [Header(cfg.data.image_size, cfg.data.image_size, mode)],
        weights_path=cfg.model.weights_path,
    )
    r = recipe(n_train, plan, epochs=epochs, batch_size=int(cfg.optim.batch_size))
    if abs(r["optim"]["lr"] - float(cfg.optim.lr)) > 1e-12:
        raise SystemExit(f"recipe lr {r['optim']['lr']} != the re-fit's {cfg.optim.lr}")
    cfg.optim.epochs = epochs
    cfg.optim.warmup_epochs = r["optim"]["warmup_epochs"]
    cfg.swa.start = r["swa"]["start"]
    cfg.swa.anneal_epochs = r["swa"]["anneal_epochs"]
    swa_collect_from(cfg)  # raises if SWA would get no snapshot


def score(
    net: torch.nn.Module, x: torch.Tensor, truth: np.ndarray, order: list[int], t: float
) -> dict:
    """``fit_folder.score_probabilities`` (balanced accuracy, per class, ECE) of ``net``
    (deployed at temperature ``t``) on images ``x`` ``(N, C, S, S)`` in ``[0, 1]``
    with labels ``truth`` ``(N,)`` (indices into CLASSES; ``order`` maps the bundle's classes
    to CLASSES), and the test-optimal temperature."""
    assert abs(float(net.temperature) - t) <= 1e-6 * t
    raw = raw_logits(net, x)[:, order]
    s = score_probabilities(torch.softmax(raw / t, dim=1).numpy(), truth)
    return {
        **s,
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
    schedule(cfg, e2, sizes["data"], int(meta["preprocessing"]["channels"]))
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
    x, truth = test_images(bundle, a.test_dir)
    order = [meta["classes"].index(c) for c in CLASSES]  # as fit_folder.score_members
    res = {"method": method, "epochs": {"bundle": e, "new": e2}, "images": sizes}
    for name, net in (("bundle", old), ("new", new)):
        s = res[name] = score(net, x, truth, order, t)
        print(
            f"  {name} re-fit ({res['epochs'][name]} epochs, {method}): balanced acc "
            f"{100 * s['balanced_accuracy']:.2f} %, ECE {100 * s['ece']:.2f} %, T {t:.3f} "
            f"(test-optimal {s['test_optimal_temperature']:.3f})"
        )
    (a.out / "compare.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

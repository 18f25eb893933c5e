"""``longtail fit`` / ``longtail predict`` on a small real-image folder (Fashion-MNIST PNGs).

One fit (the session fixture ``fitted`` of conftest.py, ~10-20 s on one thread) on a
long-tailed ImageFolder with awkward files; the other tests read its output or exercise the data
step alone (no training).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fashion_images import (
    CLASSES,
    COUNTS,
    _file_name,
    fashion_mnist,
    run_main,
    write_tree,
)
from longtail.config import load_config
from longtail.core.errors import LongtailError
from longtail.core.io import verified_load
from longtail.data.prepare import prepare_data
from longtail.fit.bundle import load_bundle, members
from longtail.fit.images import decode
from longtail.fit.ingest import prepare_user_data
from longtail.fitting import ENSEMBLE_SEED_OFFSET

pytestmark = pytest.mark.fashion_mnist


def test_fit_writes_bundle_report_and_user_dataset(fitted):
    out = fitted.out
    for f in ("bundle.json", "model.pt", "model.ts", "model.onnx", "check.pt"):
        assert (out / "bundle" / f).is_file(), f
    assert (out / "report.html").is_file()
    meta = json.loads((out / "bundle" / "bundle.json").read_text())
    assert meta["classes"] == sorted(CLASSES)
    assert meta["method"] in meta["methods"] and "swag_bma" not in meta["methods"]
    for fmt in ("torchscript", "onnx"):
        assert meta["exports"][fmt]["max_abs_diff"] <= 1e-4, meta["exports"][fmt]
        assert meta["exports"][fmt]["checked_images"] == 32  # real validation images
    assert meta["temperature"] > 0
    assert meta["preprocessing"]["size"] == 28 and meta["preprocessing"]["channels"] == 1
    assert meta["data"]["skipped_files"] == 2
    # the chosen method is within one bootstrap sd of the best hold-out balanced accuracy (the
    # re-fit trains on the internal test split, so it chooses with validation), and no simpler
    # method is (SIMPLER_FIRST order)
    from longtail.fit.select import SIMPLER_FIRST

    gaps = {m: v["gap_to_best"] for m, v in meta["methods"].items()}
    best = max(v["val_and_test"]["balanced_accuracy"] for v in meta["methods"].values())
    assert min(g["gap"] for g in gaps.values()) == pytest.approx(0.0, abs=1e-12)
    assert gaps[meta["method"]]["gap"] <= gaps[meta["method"]]["std"]
    for simpler in SIMPLER_FIRST[: SIMPLER_FIRST.index(meta["method"])]:
        assert gaps[simpler]["gap"] > gaps[simpler]["std"], simpler
    chosen_val = meta["methods"][meta["method"]]["val_and_test"]["balanced_accuracy"]
    assert best - chosen_val == pytest.approx(gaps[meta["method"]]["gap"], abs=1e-9)
    # the search tried the three mixup strengths at the given 4 epochs, then re-fitted
    summary = json.loads((out / "fit.json").read_text())
    assert [c["mixup_alpha"] for c in summary["candidates"]] == [0.2, 0.0, 1.0]
    assert {c["epochs"] for c in summary["candidates"]} == {4} and summary["refit"]
    # the hook: the materialised splits are an ordinary dataset for stages 1 and 2
    splits = prepare_data("user", root=str(out / "data"))
    assert splits.train.images.shape[1:] == (1, 28, 28)
    sizes = meta["data"]["sizes"]
    got = (len(splits.train), len(splits.val), len(splits.test))
    assert got == (sizes["train"], sizes["val"], sizes["test"])
    assert sum(sizes.values()) == sum(COUNTS) + 2  # + the RGBA and the odd-sized image
    assert splits.info["imbalance"] == pytest.approx(
        max(splits.train.counts()) / min(splits.train.counts())
    )


def test_fit_prints_profile_skipped_files_and_methods(fitted):
    text = fitted.stdout
    assert "10 classes, 488 images; imbalance factor 10" in text
    assert "shot splits" in text
    assert "skipped 2 file(s)" in text and "corrupt ü.png" in text and "notes.txt" in text
    for m in ("joint", "ncm", "crt", "tau", "lws", "srepr", "srepr_ce"):
        assert f"\n{m}" in text
    assert "* chosen:" in text and "bundle:" in text
    # the chosen method measured again with mirror averaging, and the verdict
    verdict = r"mirror averaging \(\w+\): hold-out balanced accuracy [\d.]+ -> [\d.]+ %"
    assert re.search(verdict, text)


def test_predict_folder_beats_chance_and_torchscript_matches(fitted, capsys):
    out, truth = fitted.out, fitted.truth
    argv = ["predict", str(out), str(fitted.heldout), "--top-k", "10", "--batch-size", "32"]
    code, stdout, err = run_main(argv, capsys)
    assert code == 0, err
    res = json.loads(stdout)
    preds = res["predictions"]
    assert len(preds) == len(truth)
    assert [s["path"] for s in res["skipped"]] == [str(fitted.heldout / "README.txt")]
    for p in preds:
        assert sum(t["probability"] for t in p["top_k"]) == pytest.approx(1.0, abs=1e-4)
        assert p["label"] == p["top_k"][0]["label"]
    acc = float(np.mean([p["label"] == truth[p["path"]] for p in preds]))
    print(f"held-out accuracy {acc:.3f} on {len(preds)} images; fit {fitted.seconds:.1f} s")
    assert acc >= 0.4, acc  # chance 0.10; measured 0.58-0.63 over 5 data / training seeds

    # the TorchScript file alone reproduces the bundle's probabilities
    bundle = load_bundle(out)
    paths = sorted(truth)[:16]
    x = torch.stack([decode(p, bundle.preprocessing) for p in paths]).float() / 255
    ts = torch.jit.load(str(out / "bundle" / "model.ts"))
    with torch.no_grad():
        assert (ts(x) - bundle.probabilities(x)).abs().max().item() < 1e-5
    by_path = {p["path"]: p for p in preds}
    ref = bundle.probabilities(x)
    for i, p in enumerate(paths):
        assert by_path[p]["probability"] == pytest.approx(ref[i].max().item(), abs=1e-6)


def test_torchscript_loads_without_longtail(fitted, tmp_path):
    ts_path = fitted.out / "bundle" / "model.ts"
    x = torch.rand(3, 1, 28, 28)
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys; sys.modules['longtail'] = None\n"  # any import of longtail now fails
        "import torch\n"
        f"m = torch.jit.load({str(ts_path)!r})\n"
        f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'p.pt')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    want = load_bundle(fitted.out).probabilities(x)
    assert (torch.load(tmp_path / "p.pt") - want).abs().max().item() < 1e-5


def test_predict_csv_and_strict(fitted, capsys):
    one = fitted.tree / CLASSES[3] / _file_name(1)
    code, stdout, _ = run_main(["predict", str(fitted.out), str(one), "--format", "csv"], capsys)
    assert code == 0
    rows = stdout.strip().splitlines()
    assert rows[0].startswith("path,label,probability,label_2") and len(rows) == 2
    assert rows[1].startswith(f"{one},")
    argv = ["predict", str(fitted.out), str(fitted.tree / CLASSES[2]), "--strict"]
    code, stdout, err = run_main(argv, capsys)
    assert code == 2 and stdout == ""
    assert "notes.txt" in err and "Traceback" not in err


def test_fit_strict_fails_before_training(fitted, tmp_path, capsys):
    argv = ["fit", str(fitted.tree), "--out", str(tmp_path / "o"), "--strict"]
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert "--strict" in err and "notes.txt" in err
    assert not (tmp_path / "o").exists()


def test_fit_refuses_a_used_out_dir(fitted, capsys):
    code, _, err = run_main(["fit", str(fitted.tree), "--out", str(fitted.out)], capsys)
    assert code == 2 and "not an empty folder" in err


# ------------------------------------------------------------------ the data step alone
def test_csv_input_names_ints_and_relative_paths(tmp_path):
    tree = tmp_path / "imgs"
    write_tree(tree, counts=[30, 20, 12], seed=1)
    lines_names, lines_ints = ["path,label"], []
    for c in range(3):
        for f in sorted((tree / CLASSES[c]).iterdir()):
            rel = f.relative_to(tmp_path).as_posix()
            lines_names.append(f'"{rel}",{CLASSES[c]}')
            lines_ints.append(f"{rel} {c}")
    lines_names.append("imgs/missing file.png,Trouser")
    (tmp_path / "labels.csv").write_text("\n".join(lines_names) + "\n", encoding="utf-8")
    (tmp_path / "labels.txt").write_text("\n".join(lines_ints) + "\n", encoding="utf-8")
    logs: list[str] = []
    a = prepare_user_data(tmp_path / "labels.csv", tmp_path / "a", log=logs.append)
    b = prepare_user_data(tmp_path / "labels.txt", tmp_path / "b", log=lambda s: None)
    assert a.classes == sorted(CLASSES[:3])
    assert b.classes == ["0", "1", "2"]
    # the same images either way (CSV classes sort by name, integer labels by number)
    assert sum(len(d) for d in a.splits.values()) == 62 + 2
    assert sum(len(d) for d in b.splits.values()) == 62 + 2
    assert sorted(a.splits["train"].counts()) == sorted(b.splits["train"].counts())
    reasons = {Path(s.path).name: s.reason for s in a.skipped}
    assert reasons["missing file.png"] == "file not found"
    assert "corrupt ü.png" in reasons and "notes.txt" in reasons
    assert any("missing file.png" in line for line in logs)
    # two materialised user datasets in one process stay independent
    ta = prepare_data("user", root=str(tmp_path / "a"))
    tb = prepare_data("user", root=str(tmp_path / "b"))
    assert ta.train.classes != tb.train.classes


def test_class_with_one_image_is_reported_and_excluded(tmp_path):
    tree = tmp_path / "imgs"
    write_tree(tree, counts=[25, 20, 1], seed=2, extras=False)
    logs: list[str] = []
    d = prepare_user_data(tree, tmp_path / "out", log=logs.append)
    assert d.excluded == {CLASSES[2]: 1}
    assert CLASSES[2] not in d.classes and len(d.classes) == 2
    assert any(f"excluded class {CLASSES[2]!r}: 1 usable image" in line for line in logs)


def test_fewer_than_two_usable_classes_is_an_error(tmp_path):
    tree = tmp_path / "imgs"
    write_tree(tree, counts=[25, 1], seed=3, extras=False)
    with pytest.raises(LongtailError, match="only 1 class"):
        prepare_user_data(tree, tmp_path / "out", log=lambda s: None)


def test_strict_data_step_names_the_bad_files(tmp_path):
    tree = tmp_path / "imgs"
    write_tree(tree, counts=[10, 10, 10], seed=4)
    with pytest.raises(LongtailError, match="notes.txt"):
        prepare_user_data(tree, tmp_path / "out", strict=True, log=lambda s: None)


def test_fit_trains_stage_1_with_the_logit_adjusted_loss(fitted):
    """Both networks (selection run and re-fit) train on cross-entropy of ``logits + log
    prior``, each with its own training counts, and the recipe line says so. Guards: the
    loss falling back to cross-entropy, or the re-fit losing it."""
    summary = json.loads((fitted.out / "fit.json").read_text())
    for run in (fitted.out / "run", Path(summary["selection_run_dir"])):
        cfg = load_config(run / "config.yaml")
        assert (cfg.loss.name, cfg.loss.tau) == ("logit_adjusted", 1.0)
    assert "logit-adjusted loss (tau 1)" in fitted.stdout


def test_bundle_is_the_chosen_head_on_the_stage2_features(fitted):
    """The deployed network = the mean over its two members (the re-fit in OUT/run, the
    selection run) of SWA features -> chosen head -> temperature, each from its own run's
    cached stage-2 features."""
    bundle = load_bundle(fitted.out)
    summary = json.loads((fitted.out / "fit.json").read_text())
    assert summary["ensemble"] and bundle.meta["ensemble"] == ["re-fit", "selection run"]
    runs = [fitted.out / "run", Path(summary["selection_run_dir"])]
    nets = members(bundle.model)
    assert len(nets) == 2 and summary["run_dir"] == str(runs[0])
    # the re-fit's seed is offset from the selection run's: another initialisation
    seeds = [load_config(r / "config.yaml").seed for r in runs]
    assert seeds[0] == seeds[1] + ENSEMBLE_SEED_OFFSET
    val = torch.load(fitted.out / "data" / "val.pt", weights_only=True)
    x = val["images"].float() / 255
    probs = []
    with torch.no_grad():
        for m, run in zip(nets, runs, strict=True):
            zv, _ = verified_load(run / "features" / "swa.pt")["val"]
            if m.mirror:  # the hold-out chose mirror averaging: the mirror images' features too
                zv = 0.5 * (zv + m.backbone.features(((x - m.mean) / m.std).flip(3)))
            probs.append(torch.softmax(m.head(zv) / bundle.meta["temperature"], dim=1))
        got = bundle.probabilities(x)
    assert (got - 0.5 * (probs[0] + probs[1])).abs().max().item() < 1e-4
    # two different networks: the average is neither member alone
    assert min((got - p).abs().max().item() for p in probs) > 1e-3


def test_given_val_and_test_splits_map_class_names(tmp_path):
    write_tree(tmp_path / "train", counts=[20, 15, 10], seed=5, extras=False)
    write_tree(tmp_path / "test", counts=[3, 3, 3], seed=6, extras=False)
    rows = [
        f"{p.relative_to(tmp_path).as_posix()},{p.parent.name}"
        for p in sorted((tmp_path / "test").rglob("*.png"))
    ]
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    d = prepare_user_data(
        tmp_path / "train",
        tmp_path / "o",
        val=tmp_path / "val.csv",
        test=tmp_path / "test",
        log=lambda s: None,
    )
    assert len(d.splits["train"]) == 45 and len(d.splits["val"]) == len(d.splits["test"]) == 9
    assert d.splits["val"].counts().tolist() == [3, 3, 3]
    assert d.origins["val"].startswith("given") and d.origins["test"].startswith("given")
    (tmp_path / "test" / "Elephant").mkdir()
    Image.new("L", (28, 28)).save(tmp_path / "test" / "Elephant" / "e.png")
    with pytest.raises(LongtailError, match="Elephant"):
        prepare_user_data(
            tmp_path / "train", tmp_path / "o2", test=tmp_path / "test", log=lambda s: None
        )


def test_plan_rules(tmp_path):
    from torchvision.models import resnet as tvr

    from longtail.fit.images import Header
    from longtail.fit.plan import infer_torchvision_arch, plan_input, recipe

    small = plan_input([Header(32, 32, "RGB")] * 10)
    assert (small.model, small.size, small.channels, small.in_memory) == ("resnet32", 32, 3, True)
    mid = plan_input([Header(120, 100, "L")] * 10)
    assert (mid.model, mid.size, mid.channels, mid.in_memory) == ("resnet10", 112, 1, False)
    assert mid.resize_to == 128
    big = plan_input([Header(500, 375, "RGB")] * 10)
    assert (big.model, big.size, big.resize_to) == ("resnet50", 224, 256)
    w = tmp_path / "r10.pth"
    torch.save(tvr.ResNet(tvr.BasicBlock, [1, 1, 1, 1]).state_dict(), w)
    assert infer_torchvision_arch(str(w)) == "resnet10"
    ft = plan_input([Header(28, 28, "L")] * 10, weights_path=str(w))
    assert (ft.model, ft.size, ft.channels, ft.in_memory) == ("resnet10", 112, 3, False)
    few, many = recipe(400, small), recipe(20_000, small)
    assert few["loss"]["mixup_alpha"] == 0.2 and many["loss"]["mixup_alpha"] == 0.0
    assert few["optim"]["weight_decay"] > many["optim"]["weight_decay"]
    assert recipe(400, ft)["optim"]["lr"] < recipe(400, small)["optim"]["lr"]
    r = recipe(40, small, epochs=2)
    assert r["optim"]["batch_size"] <= 40 and r["swa"]["start"] == 1.0


def test_streamed_images_fit_and_predict_alike(tmp_path):
    """Images above 64 px stream from disk; predict decodes exactly like training's eval."""
    from longtail.data.streaming import build_transform, pil_to_rgb
    from longtail.fit import predict
    from longtail.fitting import fit

    ds = fashion_mnist("train")
    x, y = ds.images.numpy()[:, 0], ds.labels.numpy()
    for c, n in enumerate([30, 15]):
        d = tmp_path / "tree" / f"class {c}"
        d.mkdir(parents=True)
        for j, i in enumerate(np.flatnonzero(y == c)[:n]):
            Image.fromarray(x[i]).resize((90, 80)).convert("RGB").save(d / f"ê {j}.jpg")
    with contextlib.redirect_stdout(io.StringIO()):
        r = fit(
            tmp_path / "tree",
            tmp_path / "out",
            image_size=72,
            overrides=[
                "device=cpu",
                "precision=fp32",
                "optim.epochs=2",
                "loss.mixup_alpha=0.2",
                "stage2.srepr_samples=2",
                "data.num_workers=0",
                "stage2.srepr_alpha_grid=[0.5]",
            ],
        )
    assert not r.data.plan.in_memory and r.data.splits["train"].paths
    prep = r.bundle.preprocessing
    assert (prep.size, prep.channels, prep.resize_to) == (72, 3, 82)
    p = r.data.splits["val"].paths[0]
    with Image.open(p) as img:
        want = build_transform(False, 72, 3)(pil_to_rgb(img, 3))
    assert torch.equal(decode(p, prep), want)
    preds, skipped = predict(tmp_path / "out", [tmp_path / "tree" / "class 1"])
    assert len(preds) == 15 and not skipped
    assert r.bundle.meta["exports"]["torchscript"]["max_abs_diff"] < 1e-5
    # torchvision ResNet-10 through ONNX; onnxruntime's Pillow-only decoding resizes 90x80 JPEGs
    assert r.bundle.meta["exports"]["onnx"]["max_abs_diff"] <= 1e-4
    onnx_preds, _ = predict(tmp_path / "out", [tmp_path / "tree" / "class 1"], runtime="onnx")
    assert [p.label for p in onnx_preds] == [p.label for p in preds]
    diffs = [abs(a.probability - b.probability) for a, b in zip(onnx_preds, preds, strict=True)]
    assert max(diffs) < 0.01  # resize rounding only (pixels within 1 level)


# ------------------------------------------------------------------ config before files
CHEAP_FIT = [
    "device=cpu",
    "precision=fp32",
    "optim.epochs=1",
    "loss.mixup_alpha=0",
    "stage2.srepr_samples=2",
    "stage2.srepr_alpha_grid=[0.5]",
]


def test_bad_override_fails_before_any_file_then_the_fixed_command_runs(tmp_path, capsys):
    """Guards: fit read raw override strings and resolved its config only after every image was
    decoded into OUT/data, so a mistyped key (or a swa.start the recipe's epochs reject) was
    reported late and the retry with the same --out was refused (folder not empty)."""
    tree = tmp_path / "tree"
    write_tree(tree, counts=[14, 10, 8], extras=False)
    out = tmp_path / "out"
    argv = ["fit", str(tree), "--out", str(out), *CHEAP_FIT]
    for bad, named in [("optim.epoch=1", "'optim.epoch'"), ("swa.start=2.5", "swa.start=2.5")]:
        code, _, err = run_main([*argv, bad], capsys)
        assert code == 2, bad
        assert err.startswith("longtail: error: ") and len(err.strip().splitlines()) == 1
        assert named in err
        assert not out.exists(), bad
    code, _, err = run_main([*argv, "--no-ensemble"], capsys)
    assert code == 0, err
    assert (out / "bundle" / "model.pt").is_file() and (out / "fit.json").is_file()
    # --no-ensemble: the re-fit alone, from the selection run's seed
    bundle, summary = load_bundle(out), json.loads((out / "fit.json").read_text())
    assert len(members(bundle.model)) == 1 and bundle.meta["ensemble"] is None
    assert summary["refit"] and not summary["ensemble"]
    runs = [out / "run", Path(summary["selection_run_dir"])]
    assert len({load_config(r / "config.yaml").seed for r in runs}) == 1


@pytest.mark.parametrize(
    ("bad", "world_size", "named", "fix"),
    [
        # the tree's 32 images leave 23 to train on after the test and validation hold-outs
        ("optim.batch_size=64", 1, "optim.batch_size=64 exceeds the 23 training images", "=23"),
        # the recipe's own batch (16 for 23 images) among 3 torchrun processes
        (None, 3, "optim.batch_size=16 (the global batch) must be divisible by the 3", "=15"),
        # SWA would reach swa.lr only after the last of CHEAP_FIT's epochs
        ("swa.anneal_epochs=50", 1, "swa.anneal_epochs=50.0", "train longer"),
    ],
)
def test_a_config_stage_1_would_refuse_fails_before_any_file(
    tmp_path, capsys, monkeypatch, bad, world_size, named, fix
):
    """Guards: stage 1's checks of the batch (larger than the training set, not divisible by
    the world size) and of when SWA collects ran only after fit had decoded every image into
    OUT/data, so the retry with the same --out was refused (folder not empty). Now fit runs
    them on the resolved config first."""
    tree = tmp_path / "tree"
    write_tree(tree, counts=[14, 10, 8], extras=False)
    out = tmp_path / "out"
    monkeypatch.setenv("WORLD_SIZE", str(world_size))  # what torchrun sets; read by fit
    argv = ["fit", str(tree), "--out", str(out), *CHEAP_FIT, *([bad] if bad else [])]
    code, stdout, err = run_main(argv, capsys)
    assert code == 2
    assert err.startswith("longtail: error: ") and len(err.strip().splitlines()) == 1
    assert named in err
    assert fix in err.split(named, 1)[1]  # and a way out
    assert "training split:" in stdout  # refused on the resolved config, after reading the data
    assert not out.exists()

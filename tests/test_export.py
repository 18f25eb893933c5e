"""Deployable files: ONNX, pt2 and TorchScript exports of real bundles, checked.

The fitted bundle is the session fixture ``fitted`` of conftest.py (``longtail fit`` on a
long-tailed Fashion-MNIST PNG folder, which writes ``model.onnx``); bundles with other heads are
built from its backbone and cached features instead of fitting again. Every comparison runs on
the fit's held-out Fashion-MNIST *test* images (150 PNGs, never trained on).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from fashion_images import run_main
from longtail.classify import methods
from longtail.classify.heads import head_spec
from longtail.classify.srepr import train_srepr
from longtail.core.io import verified_load
from longtail.fit.bundle import (
    DeployedClassifier,
    DeployedEnsemble,
    load_bundle,
    members,
    save_bundle,
)
from longtail.fit.export import ExportError, export_model, nonstandard_ops
from longtail.fit.images import Preprocessing, decode, decode_array
from longtail.fit.predict import load_classifier, predict

pytestmark = pytest.mark.fashion_mnist
README = Path(__file__).resolve().parents[1] / "README.md"
NO_TORCH = "import sys; sys.modules['torch'] = None  # any import of torch now fails\n"


def _single(spec: dict) -> dict:
    """One member's spec from a fitted bundle's (an ensemble's top level is its first member)."""
    return {k: v for k, v in spec.items() if k != "members"}


def _heldout_images(fitted, bundle) -> tuple[list[str], torch.Tensor]:
    paths = sorted(fitted.truth)
    x = torch.stack([decode(p, bundle.preprocessing) for p in paths]).float() / 255
    return paths, x


def test_fitted_bundle_onnx_and_pt2_match_pytorch(fitted, tmp_path, capsys):
    bundle = load_bundle(fitted.out)
    paths, x = _heldout_images(fitted, bundle)
    want = bundle.probabilities(x).numpy()

    # model.onnx from `fit`: onnxruntime alone, every held-out image, dynamic batch
    onnx_file = bundle.dir / "model.onnx"
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    (inp,), (out,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, out.name) == ("images", "tensor(float)", "probabilities")
    assert not isinstance(inp.shape[0], int)  # any batch size
    got = np.concatenate(
        [sess.run(None, {"images": x[i : i + 64].numpy()})[0] for i in (0, 64, 128)]
    )
    assert got.shape == want.shape == (150, 10)
    assert np.abs(got - want).max() <= 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()
    model = onnx.load(str(onnx_file))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"} and not model.functions
    assert bundle.meta["exports"]["onnx"]["max_abs_diff"] <= 1e-4

    # pt2 through the CLI, written outside the bundle (bundle.json untouched)
    pt2 = tmp_path / "clf.pt2"
    argv = ["export", str(fitted.out), "--format", "pt2", "--dynamic-batch", "--out", str(pt2)]
    code, stdout, err = run_main(argv, capsys)
    assert code == 0, err
    assert "pt2:" in stdout and "checked on 32 validation images" in stdout
    assert "pt2" not in json.loads((bundle.dir / "bundle.json").read_text())["exports"]
    program = torch.export.load(str(pt2))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert nonstandard_ops(program) == [] and all(o.startswith("aten.") for o in ops), ops
    assert "aten.conv2d.default" in ops and "aten.softmax.int" in ops  # the whole network
    with torch.no_grad():
        got_pt2 = program.module()(x).numpy()
    assert np.abs(got_pt2 - want).max() <= 1e-4
    assert (got_pt2.argmax(1) == want.argmax(1)).all()


def test_kernels_switched_on_still_export_standard_ops(fitted):
    """The rebuilt network with its kernels forced on: torch.export still records ATen ops only
    (guards against a kernel's ctypes call or custom op leaking into an exported graph)."""
    model = load_bundle(fitted.out).model
    for m in members(model):
        m.backbone.kernels = "on"
    x = torch.rand(4, 1, 28, 28)
    program = torch.export.export(
        model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},)
    )
    assert nonstandard_ops(program) == []
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert all(o.startswith("aten.") for o in ops), ops


def test_predict_runtime_onnx_equals_torch(fitted, capsys):
    res = {}
    for runtime in ("torch", "onnx"):
        argv = ["predict", str(fitted.out), str(fitted.heldout), "--top-k", "3", "--runtime"]
        code, stdout, err = run_main([*argv, runtime], capsys)
        assert code == 0, err
        res[runtime] = json.loads(stdout)
    t, o = res["torch"]["predictions"], res["onnx"]["predictions"]
    assert len(t) == len(o) == len(fitted.truth)
    assert res["onnx"]["skipped"] == res["torch"]["skipped"]  # the README.txt
    for a, b in zip(t, o, strict=True):
        assert a["path"] == b["path"] and a["label"] == b["label"]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-4)


def test_onnx_runtime_needs_no_torch(fitted, tmp_path):
    out = tmp_path / "p.json"
    code = (
        NO_TORCH + "import json\n"
        "from longtail.fit.predict import predict\n"
        f"preds, skipped = predict({str(fitted.out)!r}, [{str(fitted.heldout)!r}], "
        "runtime='onnx')\n"
        f"json.dump([p.to_json() for p in preds], open({str(out)!r}, 'w'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    got = json.loads(out.read_text())
    want, _ = predict(fitted.out, [fitted.heldout])
    assert [g["label"] for g in got] == [w.label for w in want]
    assert (
        np.abs(np.array([g["probability"] for g in got]) - [w.probability for w in want]).max()
        <= 1e-4
    )


def test_readme_onnx_snippet_runs_without_torch(fitted):
    """README's plain-onnxruntime example, on a fitted bundle and a held-out image."""
    (code,) = [
        b
        for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
        if "onnxruntime" in b
    ]
    bundle = load_bundle(fitted.out)
    image = sorted(fitted.truth)[7]
    code = code.replace("fits/mine/bundle/", f"{bundle.dir}/").replace("photo.jpg", image)
    r = subprocess.run(
        [sys.executable, "-c", NO_TORCH + code],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    *label, prob = r.stdout.split()
    x = decode(image, bundle.preprocessing).float().unsqueeze(0) / 255
    want = bundle.probabilities(x)[0]
    assert " ".join(label) == bundle.classes[int(want.argmax())]
    assert float(prob) == pytest.approx(float(want.max()), abs=1e-4)


def _head(name: str, run: Path, backbone: torch.nn.Module) -> torch.nn.Module:
    z, y = verified_load(run / "features" / "swa.pt")["train"]
    w, b = backbone.classifier.weight.detach(), backbone.classifier.bias.detach()
    if name == "ncm":
        return methods.ncm(z, y, 10)
    if name == "tau":
        return methods.tau_normalize(w, 1.0)
    if name == "lws":
        return methods.lws(w, b, z, y, epochs=2)
    (bank_file,) = (run / "features").glob("swag-*.pt")  # the fit's SWAG feature banks
    bank = verified_load(bank_file)["train"][0]
    return train_srepr(z, bank, y, 10, epochs=2)


@pytest.mark.parametrize("name", ["ncm", "tau", "lws", "srepr"])
def test_bundle_with_each_head_exports_to_onnx(fitted, tmp_path, name):
    fit_bundle = load_bundle(fitted.out)
    backbone = members(fit_bundle.model)[0].backbone
    # the selection run ran every method (the re-fit in OUT/run only the chosen one), so its
    # features and SWAG banks are there; the heads' shapes are the bundle backbone's
    selection = Path(json.loads((fitted.out / "fit.json").read_text())["selection_run_dir"])
    head = _head(name, selection, backbone)
    prep = fit_bundle.preprocessing
    mirror = members(fit_bundle.model)[0].mirror  # as the fit chose it on its hold-out
    model = DeployedClassifier(backbone, head, 1.7, prep.mean, prep.std, mirror=mirror)
    spec = {**_single(fit_bundle.meta["spec"]), "head": head_spec(head)}
    meta = {k: fit_bundle.meta[k] for k in ("classes", "preprocessing")}
    check = fit_bundle.check_images()
    b = save_bundle(
        tmp_path / name,
        model,
        spec=spec,
        meta=meta,
        check_inputs=check,
        formats=("onnx",),
        log=print,
    )
    assert b.meta["exports"]["onnx"]["max_abs_diff"] <= 1e-4
    paths, x = _heldout_images(fitted, b)
    want = b.probabilities(x).numpy()
    got = load_classifier(b.dir, "onnx").probabilities(x.numpy())
    assert np.abs(got - want).max() <= 1e-4
    assert (got.argmax(1) == want.argmax(1)).all()


class _Drifts(torch.nn.Module):
    """Softmax whose exported graph adds 0.01: a file that disagrees with the network."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(x.flatten(1), dim=1)
        return p + 0.01 if torch.compiler.is_exporting() else p


def test_failed_check_removes_the_file(tmp_path):
    f = tmp_path / "m.pt2"
    f.write_bytes(b"an older export")
    with pytest.raises(ExportError, match=r"up to 0\.01 away .* the file was removed"):
        export_model(_Drifts(), "pt2", f, check_images=torch.rand(6, 1, 2, 2))
    assert not f.exists()


@torch.library.custom_op("longtail_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class _Custom(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(_twice(x).flatten(1), dim=1)


def test_custom_operator_is_refused(tmp_path):
    with pytest.raises(ExportError, match="non-standard operators longtail_test.twice"):
        export_model(_Custom(), "onnx", tmp_path / "m.onnx", check_images=torch.rand(4, 1, 2, 2))
    assert not (tmp_path / "m.onnx").exists()


def test_fixed_batch_export_and_missing_onnx_file(fitted, tmp_path, capsys):
    bundle = load_bundle(fitted.out)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bundle.json").write_text((bundle.dir / "bundle.json").read_text())
    argv = ["predict", str(tmp_path / "b"), str(fitted.heldout), "--runtime", "onnx"]
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "model.onnx" in err and "longtail export" in err
    # a fixed batch of 5 (the CLI's default is 1): the 32 check images run as 7 padded chunks
    x = bundle.check_images()
    r = export_model(
        bundle.model, "pt2", tmp_path / "m.pt2", check_images=x, dynamic_batch=False, batch_size=5
    )
    assert r["input"]["shape"] == [5, 1, 28, 28] and r["checked_images"] == 32
    assert r["max_abs_diff"] <= 1e-4 and r["top1_agreement"] == 1.0
    m = torch.export.load(str(tmp_path / "m.pt2")).module()
    with pytest.raises(Exception):  # noqa: B017 - the fixed batch is a guard of the program
        m(x[:3])


def test_pillow_preprocessing_matches_torchvision(tmp_path):
    """The ONNX runtime decodes with Pillow alone; torchvision's antialiased resize is built to
    match it (pixels within 1 level, identical without a resize)."""
    rng = np.random.RandomState(0)
    smooth = np.kron(rng.randint(0, 256, (20, 30, 3)), np.ones((6, 6, 1))).astype(np.uint8)
    cases = [((120, 180), 3, 82, 72), ((28, 28), 1, 28, 28), ((37, 23), 1, 28, 28)]
    for (h, w), c, resize_to, size in cases:
        img = Image.fromarray(smooth[:h, :w]).convert("L" if c == 1 else "RGB")
        f = tmp_path / f"{h}x{w}.png"
        img.save(f)
        prep = Preprocessing(size, c, resize_to, (0.5,) * c, (0.25,) * c)
        a = decode_array(str(f), prep)
        t = decode(str(f), prep).numpy()
        assert a.shape == t.shape == (c, size, size) and a.dtype == np.uint8
        diff = np.abs(a.astype(int) - t).max()
        assert diff <= 1 if (h, w) != (28, 28) else diff == 0, ((h, w), diff)


def test_mirror_averaged_bundle_is_mirror_invariant_and_exports(fitted, tmp_path):
    """A bundle with ``mirror``: the head on the mean of the image's and its mirror image's
    features, identical for an image and its mirror image, kept through model.pt, ONNX and
    TorchScript; without it, not invariant (the images are not symmetric)."""
    fit_bundle = load_bundle(fitted.out)
    m = members(fit_bundle.model)[0]
    prep = fit_bundle.preprocessing
    meta = {k: fit_bundle.meta[k] for k in ("classes", "preprocessing")}
    _, x = _heldout_images(fitted, fit_bundle)
    probs = {}
    for mirror in (True, False):
        model = DeployedClassifier(m.backbone, m.head, 1.3, prep.mean, prep.std, mirror=mirror)
        b = save_bundle(
            tmp_path / f"mirror-{mirror}",
            model,
            spec={**_single(fit_bundle.meta["spec"]), "mirror": mirror},
            meta=meta,
            check_inputs=fit_bundle.check_images(),
            log=print,
        )
        assert b.model.mirror == mirror
        assert {f: r["max_abs_diff"] <= 1e-4 for f, r in b.meta["exports"].items()} == {
            "onnx": True,
            "torchscript": True,
        }
        onnx_p = load_classifier(b.dir, "onnx").probabilities(x.flip(3).numpy())
        probs[mirror] = b.probabilities(x), b.probabilities(x.flip(3)), onnx_p
    with torch.no_grad():
        xn = (x - m.mean) / m.std
        z = 0.5 * (m.backbone.features(xn) + m.backbone.features(xn.flip(3)))
        want = torch.softmax(m.head(z) / 1.3, dim=1)
    got, got_mirror, onnx_mirror = probs[True]
    assert (got - want).abs().max().item() < 1e-5
    assert (got - got_mirror).abs().max().item() < 1e-5  # mirror-invariant
    assert np.abs(onnx_mirror - got.numpy()).max() <= 1e-4
    plain, plain_mirror, onnx_plain_mirror = probs[False]
    assert (plain - plain_mirror).abs().max().item() > 1e-3
    assert np.abs(onnx_plain_mirror - plain_mirror.numpy()).max() <= 1e-4


def test_an_ensemble_of_one_network_is_refused(fitted):
    m = members(load_bundle(fitted.out).model)[0]
    with pytest.raises(ValueError, match="at least 2 members, got 1"):
        DeployedEnsemble([m])

"""A stage-2 method from outside the package (issue 17, item 2): registered, run through
``longtail classify``, reported, scored by ``fit``'s choice and bundled, with no file of longtail
edited.

The toy method is defined here: a post-hoc prior correction of the joint classifier (logit
adjustment, Menon et al. 2021), logits ``z W^T + b - tau log(pi)`` with ``pi`` the training
class frequencies and ``tau`` chosen on the validation split. Its head is a ``Head`` subclass of
this file, so the bundle saves and rebuilds it without knowing it. Every number is checked
against a float64 NumPy recomputation from the run's cached features and joint weights.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.classify import registry
from longtail.classify.heads import Head, LinearHead, build_head, head_spec
from longtail.classify.registry import Stage2Context, Stage2Method
from longtail.classify.run import classify
from longtail.cli import main
from longtail.core.errors import LongtailError
from longtail.core.io import verified_load
from longtail.evaluate.metrics import accuracy
from longtail.fit.bundle import DeployedClassifier, load_bundle, save_bundle
from longtail.fit.images import Preprocessing
from longtail.fit.select import score_methods
from longtail.models import build_model
from test_cli import run_main

NAME = "prior_corrected"
TAUS = (0.0, 0.5, 1.0, 1.5, 2.0)


# ------------------------------------------------------------------ the toy method
class PriorCorrectedHead(Head):
    """``z W^T + b - shift`` with ``shift = tau log(pi)`` ``(C,)``; W ``(C, d)``, b ``(C,)``."""

    kind = "test_prior_corrected"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, shift: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())
        self.register_buffer("shift", shift.detach().float().clone())

    def spec(self) -> dict:
        return {"kind": self.kind}

    @classmethod
    def from_spec(cls, spec: dict, num_classes: int, dim: int) -> PriorCorrectedHead:
        z = torch.zeros(num_classes)
        return cls(torch.zeros(num_classes, dim), z, z)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z.float(), self.weight, self.bias - self.shift)


def fit_prior_corrected(ctx: Stage2Context) -> nn.Module:
    """tau from TAUS by validation accuracy (the first of equals)."""
    counts = ctx.train_labels.bincount(minlength=ctx.num_classes).double()
    log_prior = (counts / counts.sum()).log().float()
    zv, yv = ctx.val()
    best = None
    for tau in TAUS:
        head = PriorCorrectedHead(ctx.joint_weight, ctx.joint_bias, tau * log_prior)
        acc = accuracy(head(zv), yv)
        if best is None or acc > best[0]:
            best = (acc, tau, head)
    ctx.info["tau"] = best[1]
    return best[2]


def _describe(infos: list[dict]) -> str:
    return "τ = " + ", ".join(f"{i['tau']:g}" for i in infos if "tau" in i) + " (val accuracy)"


PRIOR_CORRECTED = Stage2Method(
    NAME,
    fit_prior_corrected,
    "prior-corrected joint",
    needs_val=True,
    plot_weight_norms=True,
    describe=_describe,
)


# ------------------------------------------------------------------ the same, by hand
def _by_hand(run: Path) -> dict:
    """tau, test predictions and test NLL of the toy method in float64 NumPy."""
    feats = verified_load(run / "features" / "swa.pt")
    state = verified_load(run / "model_swa.pt")
    w = state["classifier.weight"].double().numpy()
    b = state["classifier.bias"].double().numpy()
    ytr = feats["train"][1].numpy()
    log_prior = np.log(np.bincount(ytr, minlength=w.shape[0]) / len(ytr))

    def logits(split: str, tau: float) -> np.ndarray:
        return feats[split][0].double().numpy() @ w.T + b - tau * log_prior

    yv, yt = feats["val"][1].numpy(), feats["test"][1].numpy()
    val_acc = [float((logits("val", t).argmax(1) == yv).mean()) for t in TAUS]
    tau = TAUS[int(np.argmax(val_acc))]  # the first of equals, as the method
    lt = logits("test", tau)
    shifted = lt - lt.max(1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    return {
        "tau": tau,
        "val_acc": val_acc,
        "accuracy": float((lt.argmax(1) == yt).mean()),
        "nll": float(-logp[np.arange(len(yt)), yt].mean()),
    }


@pytest.fixture
def toy():
    """The toy method registered from here, and removed again (other tests list `all`)."""
    registry.register(PRIOR_CORRECTED)
    yield PRIOR_CORRECTED
    registry.unregister(NAME)


@pytest.fixture
def run_copy(swa_run, tmp_path) -> Path:
    """A private copy of the shared SWA run (stage 2 writes results and caches into it)."""
    return Path(shutil.copytree(swa_run.dir, tmp_path / "run"))


def _md_row(md: str, name: str) -> list[str]:
    line = next(x for x in md.splitlines() if x.startswith(f"| {name} |"))
    return [c.strip().strip("*") for c in line.strip("|").split("|")]


# ------------------------------------------------------------------ through the CLI
def test_a_registered_method_runs_through_classify_and_the_report(toy, run_copy, capsys):
    """Guards: classify, the results file or the report listing method names of their own
    (the toy method would be unknown, missing, or without its numbers and its choice line)."""
    code, out, err = run_main(["classify", str(run_copy), "--method", "joint", NAME], capsys)
    assert code == 0, err
    want = _by_hand(run_copy)
    assert len(set(want["val_acc"])) > 1  # tau matters on this run: the choice is a real one
    results = json.loads((run_copy / "results.json").read_text())["methods"]
    assert list(results) == ["joint", NAME]
    r = results[NAME]
    assert r["info"] == {"tau": want["tau"]}
    assert r["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
    assert r["nll"] == pytest.approx(want["nll"], rel=1e-5)
    assert r["val"]["accuracy"] == pytest.approx(max(want["val_acc"]), abs=1e-12)
    assert r["ts"]["temperature"] > 0 and len(r["per_class"]) == 10
    w = verified_load(run_copy / "model_swa.pt")["classifier.weight"]
    assert r["weight_norm"] == pytest.approx(w.norm(dim=1).tolist(), rel=1e-6)
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == [NAME])
    assert float(row[1]) == pytest.approx(100 * want["accuracy"], abs=0.006)

    code, out, err = run_main(["report", str(run_copy)], capsys)
    assert code == 0, err
    md = (run_copy / "report.md").read_text()
    cells = _md_row(md, NAME)
    assert float(cells[1]) == pytest.approx(100 * want["accuracy"], abs=0.006)
    assert float(cells[5]) == pytest.approx(want["nll"], abs=6e-4)
    assert f"- prior-corrected joint: τ = {want['tau']:g} (val accuracy)" in md
    html = (run_copy / "report.html").read_text()
    assert f'<th scope="row">{NAME}</th>' in html


def test_a_plugin_file_given_with_plugin_registers_the_method(run_copy, tmp_path, capsys):
    """``longtail classify --plugin FILE``: the file (user code, outside the package)
    registers the method when loaded. Guards: ``--plugin`` not loaded before ``--method`` is
    checked, or loaded as something other than a module."""
    plugin = tmp_path / "my_methods.py"
    plugin.write_text(
        "from longtail.classify.registry import register\n"
        "from test_stage2_registry import PRIOR_CORRECTED\n\n"
        "register(PRIOR_CORRECTED)\n"
    )
    try:
        argv = ["classify", str(run_copy), "--plugin", str(plugin), "--method", NAME]
        code, _, err = run_main(argv, capsys)
    finally:
        registry.unregister(NAME)
    assert code == 0, err
    results = json.loads((run_copy / "results.json").read_text())["methods"]
    assert list(results) == [NAME]
    assert results[NAME]["accuracy"] == pytest.approx(_by_hand(run_copy)["accuracy"], abs=1e-12)


def test_plugins_from_the_environment_and_missing_plugins(tmp_path, monkeypatch, capsys):
    """``$LONGTAIL_PLUGINS`` registers without any option; a plugin that does not exist is a
    one-line error naming it."""
    plugin = tmp_path / "env_methods.py"
    plugin.write_text(
        "from longtail.classify.registry import register\n"
        "from test_stage2_registry import PRIOR_CORRECTED\n\n"
        "register(PRIOR_CORRECTED)\n"
    )
    monkeypatch.setenv("LONGTAIL_PLUGINS", str(plugin))
    try:
        assert registry.resolve(["all"])[-1] == NAME
    finally:
        registry.unregister(NAME)
    monkeypatch.delenv("LONGTAIL_PLUGINS")
    code, out, err = run_main(["classify", str(tmp_path), "--plugin", "no_such_plugin_mod"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "plugin 'no_such_plugin_mod' cannot be imported" in err


# ------------------------------------------------------------------ the config key
def test_stage2_methods_is_what_classify_runs_without_method(toy, run_copy):
    """Guards: ``stage2.methods`` accepted and never read (the issue), or read without checking
    its names against the registry."""
    res = classify(run_copy, None, [f"stage2.methods=[joint,{NAME}]"], log=lambda *_: None)
    assert list(res["methods"]) == ["joint", NAME]
    with pytest.raises(LongtailError, match="unknown method 'bogus' in stage2.methods") as e:
        classify(run_copy, None, ["stage2.methods=[joint,bogus]"], log=lambda *_: None)
    assert NAME in str(e.value) and "crt" in str(e.value)


# ------------------------------------------------------------------ the registry itself
def test_registry_order_requirements_and_bad_registrations(toy):
    """``all`` is every registered method in order (the toy last); SRepr brings its ablation and
    its model average; a required method runs first. Guards: duplicates silently replacing a
    method, and names that ``--method`` could not take."""
    names = registry.resolve(["all"])
    builtin = ["joint", "ncm", "crt", "tau", "lws", "logit_adjust", "srepr", "srepr_ce"]
    assert names[:9] == [*builtin, "swag_bma"]
    assert names[9:] == [NAME]
    assert registry.resolve(["swag_bma"]) == ["srepr", "srepr_ce", "swag_bma"]
    assert registry.resolve([NAME, "joint", NAME]) == [NAME, "joint"]
    assert registry.without_swag(names) == [*builtin[:6], NAME]
    with pytest.raises(LongtailError, match="already registered"):
        registry.register(PRIOR_CORRECTED)
    with pytest.raises(LongtailError, match="'all'"):
        Stage2Method("all", fit_prior_corrected)
    with pytest.raises(LongtailError, match="deployable=False"):
        Stage2Method("avg", fit_prior_corrected, needs_swag=True, inputs="swag")
    with pytest.raises(LongtailError, match="unknown method 'nope'; choose from joint, ncm"):
        registry.get("nope")


def test_fit_scores_the_deployable_methods_the_registry_names(toy):
    """``fit``'s choice reads ``deployable`` from the registry: the toy head is scored, the
    SWAG model average is not. Guards: a list of deployable names of its own in fit/select."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    z = torch.randn(60, 4, generator=g) + 2 * F.one_hot(y, 4).float()
    feats = {"val": (z[:30], y[:30]), "test": (z[30:], y[30:])}
    w, b = torch.eye(3, 4), torch.zeros(3)
    shift = 0.5 * torch.log(torch.tensor([0.5, 0.3, 0.2]))
    heads = {"joint": LinearHead(w, b), NAME: PriorCorrectedHead(w, b, shift)}
    heads["swag_bma"] = heads["joint"]
    scores = score_methods(heads, feats, np.array([50, 30, 20]), many=40, few=25)
    assert [s.name for s in scores] == ["joint", NAME]
    got = scores[1].val["accuracy"]
    assert got == pytest.approx(accuracy(heads[NAME](z[:30]), y[:30]))


def test_the_bundle_saves_and_rebuilds_a_head_defined_outside_the_package(tmp_path):
    """Heads own their save / load: the bundle stores the toy head's spec and rebuilds it from
    the spec alone. Guards: a bundle that switches on the head classes it knows."""
    torch.manual_seed(0)
    backbone = build_model("resnet32", 3, 1).eval()
    d = backbone.feature_dim
    g = torch.Generator().manual_seed(1)
    head = PriorCorrectedHead(
        torch.randn(3, d, generator=g), torch.randn(3, generator=g), torch.randn(3, generator=g)
    )
    assert head_spec(head) == {"kind": "test_prior_corrected"}
    empty = build_head(head_spec(head), 3, d)
    assert type(empty) is PriorCorrectedHead and empty.weight.shape == (3, d)
    model = DeployedClassifier(backbone, head, 1.3, (0.5,), (0.25,))
    prep = Preprocessing(8, 1, 8, (0.5,), (0.25,))
    spec = {
        "backbone": "resnet32",
        "num_classes": 3,
        "channels": 1,
        "feature_dim": int(d),
        "head": head_spec(head),
    }
    meta = {"classes": ["a", "b", "c"], "preprocessing": prep.to_json(), "temperature": 1.3}
    x = torch.rand(4, 1, 8, 8, generator=g)
    save_bundle(
        tmp_path / "b", model, spec=spec, meta=meta, check_inputs=x, formats=(), log=lambda *_: None
    )
    loaded = load_bundle(tmp_path / "b")
    assert type(loaded.model.head) is PriorCorrectedHead
    torch.testing.assert_close(loaded.model.head.shift, head.shift)
    with torch.no_grad():
        torch.testing.assert_close(loaded.probabilities(x), model(x), rtol=0, atol=1e-6)
    saved = json.loads((tmp_path / "b" / "bundle.json").read_text())
    assert saved["spec"]["head"] == {"kind": "test_prior_corrected"}


def test_a_head_without_a_kind_of_its_own_is_not_bundled():
    """A LinearHead subclass with another forward would be rebuilt as a plain LinearHead:
    refused. Guards: ``head_spec`` trusting an inherited kind."""

    class Doubled(LinearHead):
        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(z)

    with pytest.raises(LongtailError, match=re.escape("cannot bundle a head of type Doubled")):
        head_spec(Doubled(torch.eye(2), None))
    with pytest.raises(LongtailError, match="unknown head kind 'nope'"):
        build_head({"kind": "nope"}, 2, 2)


def test_a_dataset_from_a_plugin_reaches_data_summary_and_train(tmp_path, capsys):
    """A dataset registered by a plugin file is known to every command that loads data, by
    ``--plugin`` or ``$LONGTAIL_PLUGINS``: ``longtail data summary`` counts its images and
    ``longtail train`` trains on it (one tiny epoch)."""
    plugin = tmp_path / "half_digits.py"
    plugin.write_text(
        "from longtail.data.datasets import load_digits_split, register_dataset\n"
        "def half(split, **_):\n"
        "    if split == 'val':\n"
        "        return None\n"
        "    ds = load_digits_split(split)\n"
        "    return ds.subset(range(0, len(ds), 2))\n"
        "register_dataset('half-digits', half)\n"
    )
    args = ["data", "summary", "--dataset", "half-digits", "--imbalance", "1"]
    assert main([*args, "--plugin", str(plugin), "--out", str(tmp_path / "h.png")]) == 0
    out = capsys.readouterr().out
    from longtail.data.datasets import load_digits_split

    n_half = len(range(0, len(load_digits_split("train")), 2))
    n_test = len(range(0, len(load_digits_split("test")), 2))
    assert "dataset half-digits: 10 classes" in out and f"test {n_test}\n" in out
    run = tmp_path / "run"
    tiny = ["optim.epochs=1", "swa.enabled=false", "precision=fp32", "data.dataset=half-digits"]
    code = main(["train", "digits_lt", *tiny, "--out", str(run), "--plugin", str(plugin)])
    assert code == 0 and (run / "model_final.pt").is_file()
    counts = json.loads((run / "run.json").read_text())["data"]["train_counts"]
    assert 0 < sum(counts) <= n_half

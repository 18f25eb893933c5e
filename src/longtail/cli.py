"""The ``longtail`` command: a thin shell over the Python API.

    longtail data summary --dataset fashion-mnist --imbalance 100
    longtail train configs/fashion_mnist_lt.yaml optim.epochs=10 --out runs/fm
    longtail classify runs/fm --method all [--plugin my_methods]
    longtail report runs/fm [runs/fm-seed1 ...] [--out DIR]
    longtail fit MY_IMAGES/ --out fits/mine
    longtail predict fits/mine photo.jpg folder/ --top-k 3 [--runtime onnx]
    longtail export fits/mine --format onnx|pt2|torchscript [--dynamic-batch]
    longtail demo
    longtail doctor [--retune]

User errors print one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from longtail.core.errors import LongtailError
from longtail.data.longtail import _check_imbalance, _check_seed


def _argtype(check):
    """An argparse ``type=`` from a validator of the data layer (one source of the rules)."""

    def parse(text: str):
        try:
            return check(text)
        except LongtailError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


_seed = _argtype(_check_seed)
_imbalance = _argtype(_check_imbalance)


def _is_main_process() -> bool:
    """False on torchrun ranks other than 0, which stay quiet."""
    return int(os.environ.get("RANK", "0")) == 0


def _load_plugins(a: argparse.Namespace) -> None:
    """Import ``$LONGTAIL_PLUGINS`` and the ``--plugin`` modules (they register stage-2 methods,
    heads or datasets of the user's own), before any command looks a name up."""
    from longtail.classify.plugins import load_env_plugins, load_plugins

    load_env_plugins()
    if getattr(a, "plugin", None):
        load_plugins(a.plugin)


def cmd_data_summary(a: argparse.Namespace) -> int:
    from longtail.data.longtail import imbalance_factor
    from longtail.data.prepare import prepare_data
    from longtail.data.shots import shot_splits
    from longtail.evaluate.plots import class_count_histogram

    s = prepare_data(
        a.dataset,
        root=a.root,
        imbalance=a.imbalance,
        profile=a.profile,
        seed=a.seed,
        val_per_class=a.val_per_class,
        list_dir=a.list_dir,
    )
    counts = s.train.counts()
    shots = shot_splits(counts, a.many, a.few).sizes()
    print(
        f"dataset {a.dataset}: {s.train.num_classes} classes, train {len(s.train):,} images, "
        f"val {s.info['val_size']:,}, test {len(s.test):,}"
    )
    print(f"imbalance factor {imbalance_factor(counts):.4g} (profile {a.profile}, seed {a.seed})")
    print("per-class counts:", " ".join(str(int(c)) for c in counts))
    print(f"total: {int(counts.sum()):,}")
    print(
        f"shot splits: many (> {a.many}) {shots['many']}, medium {shots['medium']}, "
        f"few (< {a.few}) {shots['few']} classes"
    )
    out = Path(a.out or f"{a.dataset}_lt{a.imbalance:g}_counts.png")
    class_count_histogram(
        counts,
        out,
        classes=s.train.classes,
        title=f"{a.dataset} IF {a.imbalance:g}",
        many=a.many,
        few=a.few,
    )
    print(f"histogram: {out}")
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from longtail.config import load_config
    from longtail.core.rundir import RunDir
    from longtail.train import Stage1

    if a.config and "=" in a.config and not Path(a.config).is_file():
        # `train --resume RUN key=value`: argparse gave the first override to CONFIG
        a.overrides, a.config = [a.config, *a.overrides], None
    if a.resume:
        run_dir = Path(a.resume)
        config = a.config or RunDir(run_dir).config_path
        if a.out and Path(a.out) != run_dir:
            raise LongtailError("--resume RUN_DIR continues in RUN_DIR; drop --out")
    else:
        if not a.config:
            raise LongtailError("train needs a CONFIG (e.g. configs/digits_lt.yaml)")
        if not a.out:
            raise LongtailError("train needs --out RUN_DIR (where checkpoints and logs go)")
        run_dir, config = Path(a.out), a.config
    cfg = load_config(config, a.overrides)
    results = Stage1(cfg, run_dir, resume=bool(a.resume)).fit()
    if not _is_main_process():
        return 0
    for k in ("final", "swa"):
        if k in results:
            r = results[k]
            print(
                f"{k} model, test: accuracy {100 * r['accuracy']:.2f}%  nll {r['nll']:.4f}  "
                f"ece {100 * r['ece']:.2f}%"
            )
    print(f"run directory: {run_dir}")
    return 0


def cmd_classify(a: argparse.Namespace) -> int:
    from longtail.classify.run import classify, results_table
    from longtail.core.rundir import RunDir

    res = classify(a.run_dir, a.method, a.overrides)  # --method None: stage2.methods
    if not _is_main_process():
        return 0
    print(results_table(res))
    run = RunDir(a.run_dir)  # the file classify wrote: named by the config it resolved
    print(f"results: {run.results_path(run.config(a.overrides).stage2.backbone)}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from longtail.classify.run import classify, results_table
    from longtail.config import load_config
    from longtail.core.rundir import RunDir
    from longtail.train import Stage1

    out = Path(a.out)
    run = RunDir(out)
    cfg = load_config("digits_lt", a.overrides)
    if run.stopped_before_first_checkpoint:
        shutil.rmtree(out)
    done = run.finished
    resume = run.resumable and not done
    if not done:
        print(f"stage 1: ResNet-32 on digits-LT (IF {cfg.data.imbalance:g}) with SWA/SWAG -> {out}")
        Stage1(cfg, out, resume=resume).fit()
    print("stage 2: every classifier-learning method on the cached features")
    res = classify(out)
    print(results_table(res))
    print(f"results: {run.results_path()}")
    from longtail.evaluate.report import write_report

    html_path, _ = write_report([out])
    print(f"report: {html_path}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from longtail.evaluate.report import write_report

    html_path, md_path = write_report(a.run_dirs, a.out)
    print(f"report: {html_path}")
    print(f"markdown: {md_path}")
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    from longtail.models.doctor import report

    print(report(a.batch_size, a.image_size, a.channels, a.retune))
    return 0


def cmd_sweep(a: argparse.Namespace) -> int:
    from longtail.sweep import sweep

    sweep(
        a.recipe,
        a.seeds,
        a.out,
        overrides=a.overrides,
        methods=tuple(a.method) if a.method else None,
        vary_subset=a.vary_subset,
        sgd_baseline=a.sgd_baseline,
    )
    return 0


def cmd_fit(a: argparse.Namespace) -> int:
    from longtail.fitting import fit

    r = fit(
        a.root,
        a.out,
        val=a.val_dir,
        test=a.test_dir,
        epochs=a.epochs,
        image_size=a.image_size,
        weights=a.weights,
        overrides=a.overrides,
        strict=a.strict,
        refit=a.refit,
        ensemble=a.ensemble,
        **({} if a.budget is None else {"budget": a.budget}),
    )
    m = r.chosen.test
    print(
        f"chosen: recipe {r.recipe.name}, method {r.chosen.name}; held-out test accuracy "
        f"{100 * m['accuracy']:.2f}% (balanced {100 * m['balanced_accuracy']:.2f}%), NLL "
        f"{m['nll_ts']:.3f} calibrated (selection run"
        + ("; the bundle is its re-fit on more images, see fit.json)" if r.refit else ")")
    )
    print(f"bundle: {r.bundle.dir}")
    return 0


def cmd_predict(a: argparse.Namespace) -> int:
    from longtail.fit.predict import (
        expand_inputs,
        load_classifier,
        predict_paths,
        write_csv,
        write_json,
    )

    bundle = load_classifier(a.bundle, a.runtime)
    paths = expand_inputs(a.inputs)
    skipped = []
    preds = predict_paths(
        bundle,
        paths,
        top_k=a.top_k,
        batch_size=a.batch_size,
        strict=a.strict,
        on_skip=skipped.append,
        progress=True,
    )
    if a.format == "json":
        n = write_json(preds, skipped, sys.stdout, str(bundle.dir))
    else:
        n = write_csv(preds, sys.stdout, min(a.top_k, len(bundle.classes)))
    if skipped:
        print(f"skipped {len(skipped)} file(s) that are not readable images:", file=sys.stderr)
        for b in skipped:
            print(f"  {b.path}: {b.reason}", file=sys.stderr)
    print(f"predicted {n} image(s)", file=sys.stderr)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from longtail.fit.bundle import load_bundle

    bundle = load_bundle(a.bundle)
    r = bundle.export(
        a.format,
        a.out,
        opset=a.opset,
        dynamic_batch=a.dynamic_batch,
        batch_size=a.batch_size,
        check_images=a.check_images or None,
    )
    batch = r["input"]["shape"][0]
    print(
        f"{a.format}: {Path(a.out) if a.out else bundle.dir / r['file']} ({r['method']}; input "
        f"{r['input']['name']} float32 in [0, 1], batch {batch}); checked on "
        f"{r['checked_images']} validation images: max |dp| {r['max_abs_diff']:.2g}, top-1 "
        f"agrees on {100 * r['top1_agreement']:.0f}%"
    )
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``--help`` still shows the usage)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``longtail`` command."""
    p = _Parser(prog="longtail", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    # the commands that look up datasets, stage-2 methods or heads take plugins of the user's own
    plugin = argparse.ArgumentParser(add_help=False)
    plugin.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="module (or .py file) registering datasets, stage-2 methods or heads of your own; "
        "repeatable; also $LONGTAIL_PLUGINS (comma-separated)",
    )

    data = sub.add_parser("data", help="inspect datasets").add_subparsers(
        dest="sub", required=True, parser_class=_Parser
    )
    s = data.add_parser(
        "summary", help="per-class counts, shot splits, histogram PNG", parents=[plugin]
    )
    s.add_argument("--dataset", required=True)
    s.add_argument("--imbalance", type=_imbalance, default=100.0)
    s.add_argument("--profile", default="exp", choices=["exp", "step"])
    s.add_argument("--seed", type=_seed, default=0)
    s.add_argument("--root", default=None)
    s.add_argument("--list-dir", default=None)
    s.add_argument("--val-per-class", type=int, default=0)
    s.add_argument("--many", type=int, default=100)
    s.add_argument("--few", type=int, default=20)
    s.add_argument("--out", default=None, help="histogram PNG path")
    s.set_defaults(fn=cmd_data_summary)

    t = sub.add_parser(
        "train", help="stage 1: representation learning (+ SWA / SWAG)", parents=[plugin]
    )
    t.add_argument("config", nargs="?", help="YAML recipe, e.g. configs/cifar10_lt.yaml")
    t.add_argument("overrides", nargs="*", help="key=value, e.g. optim.epochs=10")
    t.add_argument("--out", help="run directory")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run")
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser(
        "classify", help="stage 2: classifier learning on a stage-1 run", parents=[plugin]
    )
    c.add_argument("run_dir")
    c.add_argument("overrides", nargs="*", help="key=value, e.g. stage2.epochs=20")
    c.add_argument(
        "--method",
        nargs="+",
        default=None,
        help="registered stage-2 methods (joint ncm crt tau lws srepr, and any of your "
        "plugins), or all; default: the config's stage2.methods",
    )
    c.set_defaults(fn=cmd_classify)

    r = sub.add_parser(
        "report", help="HTML + Markdown report of one or more classified runs", parents=[plugin]
    )
    r.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="several: mean ± std (seeds)")
    r.add_argument("--out", default=None, help="output folder (default: the first RUN_DIR)")
    r.set_defaults(fn=cmd_report)

    w = sub.add_parser(
        "sweep", help="stage 1 per seed + every stage-2 method, mean ± std", parents=[plugin]
    )
    w.add_argument("recipe", help="YAML recipe or shipped recipe name")
    w.add_argument("overrides", nargs="*", help="key=value, applied to every seed")
    w.add_argument("--seeds", type=_seed, nargs="+", default=[0, 1, 2])
    w.add_argument("--out", required=True, help="folder for seed<N>/ runs and the report")
    w.add_argument("--method", nargs="+", default=None, help="default: the config's stage2.methods")
    subset = w.add_mutually_exclusive_group()
    subset.add_argument(
        "--vary-subset",
        dest="vary_subset",
        action="store_true",
        default=None,
        help="draw the long-tailed subset with each seed (data.subset_seed = seed); the default "
        "unless an override sets data.subset_seed",
    )
    subset.add_argument(
        "--fixed-subset",
        dest="vary_subset",
        action="store_false",
        help="keep one long-tailed subset (data.subset_seed) for every seed",
    )
    w.add_argument(
        "--no-sgd-baseline",
        dest="sgd_baseline",
        action="store_false",
        help="skip the SGD baseline run per seed (seed<N>-sgd: SWA off, lr annealed to 0)",
    )
    w.set_defaults(fn=cmd_sweep)

    f = sub.add_parser(
        "fit", help="your own images: train, calibrate, choose, bundle", parents=[plugin]
    )
    f.add_argument("root", help="ImageFolder tree ROOT/<class>/<image>, or a CSV / list file")
    f.add_argument("overrides", nargs="*", help="key=value, e.g. optim.epochs=20")
    f.add_argument("--out", required=True, help="new output folder (bundle, report, run)")
    f.add_argument("--val-dir", default=None, help="your validation images (folder or CSV)")
    f.add_argument("--test-dir", default=None, help="your test images (folder or CSV)")
    f.add_argument("--epochs", type=int, default=None, help="stage-1 epochs")
    f.add_argument("--image-size", type=int, default=None, help="network input side, px")
    f.add_argument("--weights", default=None, help="torchvision ResNet weights to fine-tune")
    f.add_argument("--strict", action="store_true", help="fail on unreadable files")
    f.add_argument(
        "--budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="time for the whole fit, recipe search and re-fit included (default 15)",
    )
    f.add_argument(
        "--no-refit",
        dest="refit",
        action="store_false",
        help="bundle the selection run instead of re-training on every labelled image",
    )
    f.add_argument(
        "--ensemble",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="bundle the average of the re-fit and the selection run (default; twice the "
        "prediction time; the measurement it rests on: docs/METHODS.md); --no-ensemble: the "
        "re-fit alone",
    )
    f.set_defaults(fn=cmd_fit)

    q = sub.add_parser(
        "predict", help="calibrated labels for images, from a fit's bundle", parents=[plugin]
    )
    q.add_argument("bundle", metavar="DIR", help="the --out folder of `longtail fit`")
    q.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    q.add_argument("--top-k", type=int, default=5)
    q.add_argument("--format", choices=["json", "csv"], default="json")
    q.add_argument("--batch-size", type=int, default=64)
    q.add_argument("--strict", action="store_true", help="fail on unreadable files")
    q.add_argument(
        "--runtime",
        choices=["torch", "onnx"],
        default="torch",
        help="torch: model.pt; onnx: model.onnx with onnxruntime, numpy and Pillow only",
    )
    q.set_defaults(fn=cmd_predict)

    e = sub.add_parser(
        "export", help="write a bundle's network as ONNX, pt2 or TorchScript", parents=[plugin]
    )
    e.add_argument("bundle", metavar="DIR", help="the --out folder of `longtail fit`")
    e.add_argument("--format", required=True, choices=["onnx", "pt2", "torchscript"])
    e.add_argument("--out", default=None, help="file to write (default DIR/bundle/model.<ext>)")
    e.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20; >= 18)")
    batch = e.add_mutually_exclusive_group()
    batch.add_argument(
        "--dynamic-batch", action="store_true", help="any batch size (default: a fixed one)"
    )
    batch.add_argument("--batch-size", type=int, default=1, help="the fixed batch size (default 1)")
    e.add_argument(
        "--check-images",
        nargs="+",
        default=None,
        metavar="IMAGE_OR_FOLDER",
        help="validation images to check on (default: the bundle's check.pt)",
    )
    e.set_defaults(fn=cmd_export)

    d = sub.add_parser(
        "demo", help="the whole pipeline on digits-LT, on CPU in about a minute", parents=[plugin]
    )
    d.add_argument("overrides", nargs="*")
    d.add_argument("--out", default="runs/demo")
    d.set_defaults(fn=cmd_demo)

    o = sub.add_parser("doctor", help="CPU, compiler, and which kernel each pass uses here (why)")
    o.add_argument("--batch-size", type=int, default=128, help="the shape to autotune for")
    o.add_argument("--image-size", type=int, default=32)
    o.add_argument("--channels", type=int, default=3)
    o.add_argument("--retune", action="store_true", help="forget cached decisions, time again")
    o.set_defaults(fn=cmd_doctor)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value after an option (`fit ROOT --out DIR a=b`): argparse leaves them over
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        _load_plugins(args)
        return int(args.fn(args) or 0)
    except LongtailError as e:
        print(f"longtail: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "longtail: interrupted; the last checkpoint is intact (use --resume)", file=sys.stderr
        )
        return 130
    finally:
        from longtail.core.distributed import shutdown_distributed

        shutdown_distributed()


if __name__ == "__main__":
    raise SystemExit(main())

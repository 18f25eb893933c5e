"""Typed configuration: YAML recipes + ``key=value`` overrides, validated against a schema.

A recipe in ``configs/`` is merged over the defaults below; unknown keys are rejected with the
closest valid key suggested, and wrong types name the key path.
"""

from __future__ import annotations

import difflib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from longtail.core.errors import LongtailError


@dataclass
class DataConfig:
    dataset: str = "digits"
    root: str | None = None
    list_dir: str | None = None
    download: bool = False
    imbalance: float | None = 10.0  # n_max / n_min; null keeps the training set as it is
    profile: str = "exp"
    subset_seed: int = 0
    n_max: int | None = None
    val_per_class: int = 20
    padding: int = 4  # random-crop padding, in-memory data
    flip: bool = True
    erasing: float = 0.0  # random erasing probability per training image (Zhong et al. 2020)
    image_size: int = 224  # crop side for file-backed data
    color_jitter: float = 0.0
    num_workers: int = 2
    many_shot: int = 100
    few_shot: int = 20


@dataclass
class ModelConfig:
    name: str = "resnet32"
    weights_path: str | None = None


@dataclass
class OptimConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 2e-4
    warmup_epochs: float = 5.0
    schedule: str = "step"  # step | cosine | constant
    milestones: list[float] = field(default_factory=lambda: [160.0, 180.0])
    gamma: float = 0.1
    grad_clip: float = 0.0


@dataclass
class LossConfig:
    name: str = "ce"  # ce | logit_adjusted (= balanced_softmax at tau 1)
    tau: float = 1.0
    mixup_alpha: float = 0.0
    label_smoothing: float = 0.0


@dataclass
class SamplerConfig:
    name: str = "instance"  # instance | class_balanced | sqrt | q | progressive
    q: float = 0.5


@dataclass
class SWAConfig:
    enabled: bool = True
    start: float = 0.75  # epoch, or a fraction of the epochs when < 1
    lr: float = 0.01
    anneal_epochs: float = 5.0  # cosine from the schedule's lr to swa.lr, then constant
    every_steps: int = 0  # 0: average once per epoch
    swag_rank: int = 20  # K deviation columns; 0: SWA only (no SWAG)
    bn_batches: int = 0  # batches for BN re-estimation; 0: the whole training set


@dataclass
class Stage2Config:
    # what `longtail classify` runs without --method: names of longtail.classify.registry
    # (plugins' included), or all (every registered method); checked when classify reads it
    methods: list[str] = field(default_factory=lambda: ["all"])
    backbone: str = "auto"  # auto (SWA when available) | swa | final
    batch_size: int = 512
    epochs: int = 10
    lr: float = 0.2
    weight_decay: float = 5e-4
    lws_epochs: int = 5
    tau_grid: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(21)])
    # post-hoc logit adjustment's tau (Menon et al. 2021), chosen on validation
    logit_adjust_grid: list[float] = field(
        default_factory=lambda: [round(0.25 * i, 2) for i in range(13)]
    )
    ncm_metric: str = "sqeuclidean"  # -|z-mu|^2 (Kang's code) | euclidean (-|z-mu|) | cosine
    srepr_samples: int = 8  # M SWAG samples
    srepr_scale: float = 0.5
    srepr_alpha: float = 0.5  # weight of the self-distillation term (when the grid is empty)
    srepr_alpha_grid: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    srepr_temperature: float = 2.0  # distillation T (when the grid is empty)
    # chosen with alpha on validation (builtin.SREPR_RULE): 2 is the paper's fixed value
    srepr_temperature_grid: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    srepr_weighting: str = "none"  # none | confidence
    srepr_epochs: int = 10
    srepr_bn_images: int = 2048  # images for each sample's BN re-estimation; 0: all
    aug_views: int = 0  # >0: cRT/LWS/NCM train on this many augmented feature views
    calibrate: bool = True  # also report temperature-scaled figures (T fitted on val)


@dataclass
class Config:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: bool = True
    compile: bool = False  # torch.compile the step: 1.02-1.04x eager on a 2-core CPU (RESULTS.md)
    kernels: str = "auto"  # C kernels (ResNet-32, CPU): auto (where timed faster here) | on | off
    sync_bn: bool = False  # SyncBatchNorm under torchrun (DDP)
    deterministic: bool = False
    checkpoint_every_steps: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    swa: SWAConfig = field(default_factory=SWAConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)


CHOICES = {
    "data.profile": ("exp", "step"),
    "optim.schedule": ("step", "cosine", "constant"),
    "loss.name": ("ce", "logit_adjusted", "balanced_softmax"),
    "sampler.name": ("instance", "class_balanced", "sqrt", "q", "progressive"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "kernels": ("auto", "on", "off"),
    "stage2.backbone": ("auto", "swa", "final"),
    "stage2.ncm_metric": ("sqeuclidean", "euclidean", "cosine"),  # heads.NCM_METRICS
    "stage2.srepr_weighting": ("none", "confidence"),
}


# Replaced by ``kernels``; still read so older recipes and run directories load.
DEPRECATED = ("fused_bn", "fast_conv")
# Keys that never had an effect and were removed; every config.yaml written before still has
# them, so they are dropped on loading with a DeprecationWarning instead of being refused.
RETIRED = ("log_every_steps",)


def _plain(node: Any) -> DictConfig:
    """A mutable copy of a loaded mapping (a dict or a DictConfig)."""
    return OmegaConf.create(OmegaConf.to_container(node) if OmegaConf.is_config(node) else node)


def _migrate(node: Any, where: str) -> Any:
    """Read ``kernels: on`` / ``off`` as words (YAML 1.1 makes them booleans), and drop the old
    kernel keys from a loaded mapping: ``false`` becomes ``kernels: off`` (the user turned a
    kernel off; ``kernels`` has no per-kernel setting), ``true`` (their old default) is dropped
    so ``kernels`` keeps its value; the :data:`RETIRED` keys are dropped. A DeprecationWarning
    names each change."""
    if not isinstance(node, (dict, DictConfig)):
        return node
    if isinstance(node.get("kernels"), bool):
        node = _plain(node)
        node["kernels"] = "on" if node["kernels"] else "off"
    retired = [k for k in RETIRED if k in node]
    if retired:
        node = _plain(node)
        for key in retired:
            del node[key]
        warnings.warn(
            f"{where}: config key(s) {', '.join(retired)} are no longer used (they had no "
            "effect) and are ignored; delete them from the file",
            DeprecationWarning,
            stacklevel=3,
        )
    if not any(k in node for k in DEPRECATED):
        return node
    node = _plain(node)
    off = False
    for key in DEPRECATED:
        if key in node:
            off |= str(node[key]).lower() in ("false", "0", "no", "off")
            del node[key]
    if off:
        node["kernels"] = "off"
    warnings.warn(
        f"{where}: config keys fused_bn / fast_conv are deprecated; use kernels: auto | on | off "
        f"(read as kernels={'off' if off else 'unchanged'})",
        DeprecationWarning,
        stacklevel=3,
    )
    return node


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node:
            path = f"{prefix}{k}"
            keys.append(path)
            keys += _all_keys(node[k], path + ".")
    return keys


def _unknown_key_error(bad: str) -> LongtailError:
    valid = _all_keys(OmegaConf.structured(Config))
    close = difflib.get_close_matches(bad, valid, n=1, cutoff=0.5)
    if not close:  # compare the last component, e.g. "lr" under another section
        leaf = bad.rsplit(".", 1)[-1]
        close = [k for k in valid if k.rsplit(".", 1)[-1] == leaf][:1]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return LongtailError(f"unknown config key {bad!r}{hint}")


def _merge(base: DictConfig, other: Any) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        raise _unknown_key_error(str(e.full_key or e.key)) from None
    except (ValidationError, OmegaConfBaseException) as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise LongtailError(f"bad value for config key {key!r}: {msg}") from None


RECIPES = Path(__file__).resolve().parent / "configs"


def available_recipes() -> list[str]:
    """Names of the recipes shipped in ``longtail/configs`` (``configs/`` in the repo)."""
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def find_recipe(path: str | os.PathLike) -> Path:
    """A YAML path as given, or a shipped recipe by name (``cifar10_lt`` or ``cifar10_lt.yaml``)."""
    p = Path(path)
    if p.is_file():
        return p
    bundled = RECIPES / f"{p.stem}.yaml"
    if p.parent in (Path("."), Path("configs")) and bundled.is_file():
        return bundled
    raise LongtailError(
        f"config file {str(path)!r} not found; shipped recipes: {', '.join(available_recipes())}"
    )


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    base: dict | None = None,
) -> DictConfig:
    """Defaults <- optional ``base`` dict <- YAML file at ``path`` <- ``key=value`` overrides."""
    cfg = OmegaConf.structured(Config)
    if base:
        cfg = _merge(cfg, _migrate(base, "base"))
    if path is not None:
        p = find_recipe(path)
        try:
            loaded = OmegaConf.load(p)
        except Exception as e:  # noqa: BLE001 - any YAML error is a user error
            raise LongtailError(f"{p}: not valid YAML ({e})") from None
        cfg = _merge(cfg, _migrate(loaded, str(p)))
    for item in overrides or []:
        if "=" not in item:
            raise LongtailError(f"override {item!r} must look like key=value, e.g. optim.lr=0.05")
        key = item.split("=", 1)[0].strip()
        if key in (*DEPRECATED, *RETIRED, "kernels"):
            cfg = _merge(cfg, _migrate(OmegaConf.from_dotlist([item]), f"override {item!r}"))
            continue
        if OmegaConf.select(cfg, key, default="__missing__") == "__missing__":
            raise _unknown_key_error(key)
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]))
    validate(cfg)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Check choices and ranges that the type schema cannot express."""
    for key, allowed in CHOICES.items():
        val = OmegaConf.select(cfg, key)
        if val not in allowed:
            raise LongtailError(
                f"config key {key!r} is {val!r}; choose one of {', '.join(allowed)}"
            )
    checks = [
        ("optim.epochs", cfg.optim.epochs >= 1, ">= 1"),
        ("optim.batch_size", cfg.optim.batch_size >= 1, ">= 1"),
        ("optim.lr", cfg.optim.lr > 0, "> 0"),
        ("data.erasing", 0 <= cfg.data.erasing <= 1, "in [0, 1] (a probability per image)"),
        ("data.imbalance", cfg.data.imbalance is None or cfg.data.imbalance >= 1, ">= 1"),
        ("seed", cfg.seed >= 0, ">= 0"),
        ("data.subset_seed", cfg.data.subset_seed >= 0, ">= 0"),
        ("swa.swag_rank", cfg.swa.swag_rank == 0 or cfg.swa.swag_rank >= 2, "0 or >= 2"),
        ("stage2.srepr_alpha", 0 <= cfg.stage2.srepr_alpha <= 1, "in [0, 1]"),
        ("stage2.srepr_samples", cfg.stage2.srepr_samples >= 1, ">= 1"),
    ]
    for key, ok, need in checks:
        if not ok:
            raise LongtailError(
                f"config key {key!r} = {OmegaConf.select(cfg, key)!r}; must be {need}"
            )


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML text."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def diff_configs(a: DictConfig, b: DictConfig, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two configs (for resume compatibility)."""
    fa = {k: OmegaConf.select(a, k) for k in _all_keys(a)}
    fb = {k: OmegaConf.select(b, k) for k in _all_keys(b)}
    out = []
    for k in sorted(set(fa) | set(fb)):
        if any(k == i or k.startswith(i + ".") for i in ignore):
            continue
        va, vb = fa.get(k), fb.get(k)
        if isinstance(va, DictConfig) or isinstance(vb, DictConfig):
            continue
        if OmegaConf.is_config(va):
            va = OmegaConf.to_container(va)
        if OmegaConf.is_config(vb):
            vb = OmegaConf.to_container(vb)
        if va != vb:
            out.append(f"{k}: {va!r} != {vb!r}")
    return out

"""The rules ``longtail fit`` applies: input size, backbone, storage and the base training recipe.

Every choice is a plain function of a few data statistics (image sizes and modes, the number of
training images), so it is printed, recorded in ``fit.json`` and overridable with ``key=value``.
``fit`` searches the epochs and the mixup strength on validation (:mod:`longtail.fit.search`)
and passes them in; the defaults below apply to a caller of :func:`recipe` that does not.

Input (:func:`plan_input`), from the median shorter side ``s`` of the training images:

- ``s <= 64``: ResNet-32 at ``s`` px (the images' own size), decoded once into an in-memory uint8
  tensor (batch augmentation: random crop with ``round(S/8)`` px padding + flip), unless that
  tensor would exceed 4 GiB, in which case the images stream from disk;
- ``64 < s <= 160``: torchvision ResNet-10 at 112 px, streamed (RandomResizedCrop + flip);
- ``s > 160``: torchvision ResNet-50 at 224 px, streamed.
- A torchvision weights file (``--weights``, ``model.weights_path``) fixes the architecture (read
  from the file: ResNet-10 / 50 / 152 or ResNeXt-50 32x4d), RGB input and 112 px (``s <= 160``)
  or 224 px, and fine-tunes with a 10x smaller learning rate.
- One channel when most images are grayscale (and no pretrained weights), else RGB.

Recipe (:func:`recipe`), from the number of training images ``N``:

- batch ``B = clamp(2^floor(log2(N / 10)), 16, 128)`` (at most ``N``); SGD, Nesterov momentum
  0.9, lr ``0.1 B / 128`` (fine-tuning: ``0.01 B / 128``), cosine schedule, warm-up
  ``min(5, epochs / 10)``;
- epochs ``clamp(ceil(100,000 / N), 30, 200)`` (at least ~100k images seen);
- **regularisation scaled to the data size**: ``N < 5,000``: mixup alpha 0.2 and weight decay
  5e-4; otherwise no mixup and weight decay 2e-4 (the CIFAR-LT recipe);
- the **logit-adjusted loss** (``loss.name=logit_adjusted``, tau 1: Menon et al. 2021, Balanced
  Softmax): cross-entropy on ``logits + log prior`` of the training counts, so the network's own
  logits model the class-balanced posterior; on balanced data it is plain cross-entropy. Rests
  on docs/RESULTS.md (issue 19, "The logit-adjusted loss in `fit`"): on the long-tailed
  Fashion-MNIST folders, paired against cross-entropy, it raised the bundle's balanced accuracy
  by 1.1 (IF 50) and 3.7 points (IF 100) on average, on 5 of 6 fits, at a lower mean ECE;
  ``loss.name=ce`` restores cross-entropy;
- SWA / SWAG from epoch ``round(0.75 epochs)`` (0-based, at most the last one), ``swa.lr = lr /
  10``; when fewer than 10 epochs are averaged, a snapshot every ``k`` steps so that about 20
  snapshots feed SWA / SWAG;
- stage 2: batch ``clamp(2^floor(log2(N / 4)), 32, 512)``, temperature scaling on validation.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from longtail.core.errors import LongtailError
from longtail.fit.images import SINGLE_CHANNEL_MODES, Header

SMALL_SIDE = 64
MEDIUM_SIDE = 160
MEMORY_LIMIT_BYTES = 4 * 2**30
SMALL_DATA = 5000
SWA_START = 0.75
TORCHVISION_MODELS = ("resnet10", "resnet50", "resnet152", "resnext50_32x4d")


@dataclass
class InputPlan:
    """How images enter the network, and which network.

    Attributes:
        size: side ``S`` of the square input; ``resize_to``: shorter side before the crop.
        channels: 1 or 3; ``in_memory``: decode once into ``(N, C, S, S)`` uint8.
        model: registry name (``longtail.models``); ``weights_path``: torchvision weights.
        typical_side: the median shorter side of the training images, in px.
        reasons: one line per choice, for the log.
    """

    size: int
    resize_to: int
    channels: int
    in_memory: bool
    model: str
    weights_path: str | None
    typical_side: int
    reasons: list[str] = field(default_factory=list)


def infer_torchvision_arch(weights_path: str) -> str:
    """The backbone a torchvision ResNet state dict belongs to (by its keys and shapes).

    Raises:
        LongtailError: not a readable state dict, or an architecture the registry lacks.
    """
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means an unusable file
        # user errors are one line: torch.load's messages run over several
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LongtailError(f"--weights {weights_path!r}: not a readable state dict ({why})") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "conv1.weight" not in state:
        raise LongtailError(
            f"--weights {weights_path!r}: expected a torchvision ResNet state dict "
            "(keys conv1.weight, layer1.0..., fc.weight)"
        )
    blocks3 = len({k.split(".")[1] for k in state if k.startswith("layer3.")})
    if "layer1.0.conv3.weight" in state:  # bottleneck blocks
        if blocks3 == 36:
            return "resnet152"
        if blocks3 == 6:
            grouped = (
                state["layer1.0.conv2.weight"].shape[1] != state["layer1.0.conv1.weight"].shape[0]
            )
            return "resnext50_32x4d" if grouped else "resnet50"
    elif blocks3 == 1:
        return "resnet10"
    raise LongtailError(
        f"--weights {weights_path!r}: a ResNet with {blocks3} blocks in layer3, which longtail "
        f"has no backbone for; supported: {', '.join(TORCHVISION_MODELS)}"
    )


def plan_input(
    headers: list[Header],
    image_size: int | None = None,
    weights_path: str | None = None,
    model: str | None = None,
) -> InputPlan:
    """Choose input size, channels, storage and backbone from the training images' headers.

    Args:
        headers: ``(width, height, mode)`` of every usable training image.
        image_size: force the input side ``S``.
        weights_path: a torchvision weights file to fine-tune from.
        model: force the backbone (a ``longtail.models`` name).
    """
    if not headers:
        raise LongtailError("no readable training image")
    side = int(statistics.median(min(h.width, h.height) for h in headers))
    reasons = [f"median shorter image side {side} px"]
    if weights_path:
        arch = infer_torchvision_arch(weights_path)
        if model and model != arch:
            raise LongtailError(f"--weights holds a {arch}, but model.name={model}")
        model = arch
        reasons.append(f"fine-tuning {arch} from {weights_path}")
    if model is None:
        s = image_size or side
        model = "resnet32" if s <= SMALL_SIDE else "resnet10" if s <= MEDIUM_SIDE else "resnet50"
        reasons.append(
            f"backbone {model} (rule: <= {SMALL_SIDE} px ResNet-32, <= {MEDIUM_SIDE} "
            "px ResNet-10, else ResNet-50)"
        )
    if image_size is None:
        if model == "resnet32":
            image_size = min(side, SMALL_SIDE)
        else:
            image_size = 112 if side <= MEDIUM_SIDE else 224
        reasons.append(f"input {image_size} px")
    else:
        reasons.append(f"input {image_size} px (given)")
    if image_size < 4:
        raise LongtailError(f"input size {image_size} px is too small (images of {side} px?)")
    gray = sum(h.mode in SINGLE_CHANNEL_MODES for h in headers) / len(headers)
    channels = 1 if gray > 0.5 and not weights_path else 3
    reasons.append(
        f"{'grayscale' if channels == 1 else 'RGB'} input ({100 * gray:.0f} % single-channel "
        "images" + (", pretrained weights need RGB" if weights_path and gray > 0.5 else "") + ")"
    )
    nbytes = len(headers) * channels * image_size**2
    in_memory = image_size <= SMALL_SIDE and nbytes <= MEMORY_LIMIT_BYTES
    if in_memory:
        reasons.append(f"decoded once into memory ({nbytes / 2**20:.1f} MiB uint8)")
    else:
        why = "large images" if image_size > SMALL_SIDE else f"{nbytes / 2**30:.1f} GiB > 4 GiB"
        reasons.append(f"streamed from disk ({why})")
    resize_to = image_size if in_memory else int(round(image_size * 8 / 7))
    return InputPlan(image_size, resize_to, channels, in_memory, model, weights_path, side, reasons)


def _pow2(x: float, lo: int, hi: int) -> int:
    return int(min(max(2 ** math.floor(math.log2(max(x, 1.0))), lo), hi))


def recipe(
    n_train: int,
    plan: InputPlan,
    *,
    epochs: int | None = None,
    batch_size: int | None = None,
    swa_start: float = SWA_START,
) -> dict:
    """Stage-1 / stage-2 config values for ``n_train`` training images (see the module doc).

    ``epochs`` and ``batch_size``, when the user set them, feed the derived values (warm-up,
    SWA snapshot interval, learning rate) instead of the defaults.
    """
    small = n_train < SMALL_DATA
    batch = batch_size or min(_pow2(n_train / 10, 16, 128), _pow2(n_train, 2, 128))
    epochs = epochs or int(min(max(math.ceil(100_000 / max(n_train, 1)), 30), 200))
    lr = (0.01 if plan.weights_path else 0.1) * batch / 128
    start = int(round(swa_start * epochs)) if swa_start < 1 else int(swa_start)
    start = min(max(start, 0), epochs - 1)
    swa_epochs = epochs - start
    steps = max(n_train // batch, 1)
    every = 0 if swa_epochs >= 10 else max(1, swa_epochs * steps // 20)
    return {
        "optim": {
            "epochs": epochs,
            "batch_size": batch,
            "lr": lr,
            "nesterov": True,
            "weight_decay": 5e-4 if small else 2e-4,
            "warmup_epochs": min(5.0, epochs / 10),
            "schedule": "cosine",
            "milestones": [],
        },
        "loss": {"name": "logit_adjusted", "tau": 1.0, "mixup_alpha": 0.2 if small else 0.0},
        "swa": {
            "enabled": True,
            "start": float(start),  # an epoch number (0: from the start)
            "lr": lr / 10,
            "anneal_epochs": min(5.0, max(swa_epochs / 2, 0.5)),
            "every_steps": every,
            "bn_batches": 0 if n_train <= 50_000 else math.ceil(20_000 / batch),
        },
        "stage2": {"batch_size": _pow2(n_train / 4, 32, 512), "calibrate": True},
    }


def recipe_summary(cfg, n_train: int) -> str:
    """One line describing the final recipe ``cfg`` (a config or :func:`recipe`'s dict)."""
    o, s = cfg["optim"], cfg["swa"]
    epochs, start = int(o["epochs"]), float(s["start"])
    first = int(round(start * epochs)) if start < 1 else int(start)
    snap = f"every {s['every_steps']} step(s)" if s["every_steps"] else "every epoch"
    reg = "small data" if n_train < SMALL_DATA else "enough data"
    return (
        f"{epochs} epochs, batch {o['batch_size']}, lr {o['lr']:.3g} cosine, weight decay "
        f"{o['weight_decay']:g} and mixup alpha {cfg['loss']['mixup_alpha']:g} ({reg}: "
        f"{n_train:,} training images vs {SMALL_DATA:,}); {_loss_text(cfg['loss'])}; SWA/SWAG "
        f"from epoch {first + 1}, snapshots {snap}"
    )


def _loss_text(loss: Mapping[str, Any]) -> str:
    """``loss.name`` (and ``tau``) as words for :func:`recipe_summary`."""
    name = loss.get("name", "ce")
    if name == "ce":
        return "cross-entropy loss"
    return f"{name.replace('_', '-')} loss (tau {float(loss.get('tau', 1.0)):g})"

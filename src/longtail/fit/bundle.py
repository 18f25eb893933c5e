"""The model bundle: one deployable network plus everything needed to feed and read it.

``BUNDLE_DIR/`` holds

- ``model.pt``: the :class:`DeployedClassifier` state dict and how to rebuild it (backbone name,
  classes, channels, head kind), written with a ``.sha256`` beside it;
- ``model.ts``: the same network as TorchScript, loadable with plain ``torch.jit.load`` (no
  longtail needed); checked at export time against the bundle (max abs difference of the
  probabilities, recorded in ``bundle.json``);
- ``bundle.json``: class names, preprocessing (:class:`longtail.fit.images.Preprocessing`), the
  temperature, the chosen stage-2 method, validation / test metrics, the export check.

The network takes float32 images ``(B, C, S, S)`` in ``[0, 1]`` (resized and cropped as the
preprocessing says), normalises them itself, and returns calibrated probabilities
``softmax(head(features(x)) / T)`` of shape ``(B, K)``: one forward pass.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from longtail.classify.heads import LinearHead, NCMHead, ScaledHead
from longtail.errors import LongtailError
from longtail.fit.images import Preprocessing
from longtail.models import build_model
from longtail.train.checkpoint import atomic_torch_save, atomic_write_json

FORMAT = "longtail-bundle/1"
BUNDLE_JSON = "bundle.json"
WEIGHTS = "model.pt"
TORCHSCRIPT = "model.ts"
EXPORT_TOLERANCE = 1e-5


class DeployedClassifier(nn.Module):
    """SWA backbone features -> stage-2 head -> temperature, as one module.

    ``forward(x)``: images ``(B, C, S, S)`` float in ``[0, 1]`` -> probabilities ``(B, K)``;
    ``logits(x)``: the calibrated logits ``head(features) / T`` ``(B, K)``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        temperature: float,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    @torch.jit.export
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated logits ``(B, K)`` of images ``(B, C, S, S)`` in ``[0, 1]``."""
        z = self.backbone.features((x - self.mean) / self.std)
        return self.head(z).float() / self.temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities ``(B, K)`` of images ``(B, C, S, S)`` in ``[0, 1]``."""
        return torch.softmax(self.logits(x), dim=1)


def head_spec(head: nn.Module) -> dict:
    """How to rebuild a stage-2 head (its tensors come from the state dict)."""
    if isinstance(head, NCMHead):
        return {"kind": "ncm", "metric": head.metric}
    if isinstance(head, ScaledHead):
        return {"kind": "scaled", "bias": head.b0 is not None}
    if isinstance(head, LinearHead):
        return {"kind": "linear", "bias": head.bias is not None}
    raise LongtailError(f"cannot bundle a head of type {type(head).__name__}")


def build_head(spec: dict, num_classes: int, dim: int) -> nn.Module:
    """An empty head of the kind ``spec`` names, ready for ``load_state_dict``."""
    w, b = torch.zeros(num_classes, dim), torch.zeros(num_classes)
    kind = spec["kind"]
    if kind == "ncm":
        return NCMHead(w, torch.zeros(dim), spec["metric"])
    if kind == "scaled":
        return ScaledHead(w, b if spec["bias"] else None)
    if kind == "linear":
        return LinearHead(w, b if spec["bias"] else None)
    raise LongtailError(f"unknown head kind {kind!r} in the bundle")


@dataclass
class Bundle:
    """A loaded bundle: the network (CPU, eval mode) and its ``bundle.json``."""

    dir: Path
    model: DeployedClassifier
    meta: dict

    @property
    def classes(self) -> list[str]:
        """Class names, index = output column."""
        return list(self.meta["classes"])

    @property
    def preprocessing(self) -> Preprocessing:
        """How files become the network's input."""
        return Preprocessing.from_json(self.meta["preprocessing"])

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` calibrated probabilities of float images ``(B, C, S, S)`` in ``[0, 1]``."""
        return self.model(x.float())


def _load_weights(path: Path) -> dict:
    """``model.pt``, checksum verified, unpickled with ``weights_only=True`` (tensors, plain
    containers and strings only: a bundle from elsewhere cannot run code)."""
    if not path.is_file():
        raise LongtailError(f"{str(path)!r} not found: the bundle is incomplete")
    data = path.read_bytes()
    side = Path(f"{path}.sha256")
    if side.is_file() and hashlib.sha256(data).hexdigest() != side.read_text().strip():
        raise LongtailError(f"{str(path)!r} is corrupt or truncated (checksum mismatch)")
    try:
        saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a bad file
        # user errors are one line: torch.load's messages run over several
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LongtailError(f"{str(path)!r} cannot be read: {why}") from e
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise LongtailError(f"{str(path)!r} is not a {FORMAT} weights file")
    return saved


def _rebuild(spec: dict, state: dict) -> DeployedClassifier:
    backbone = build_model(spec["backbone"], spec["num_classes"], spec["channels"])
    head = build_head(spec["head"], spec["num_classes"], spec["feature_dim"])
    c = spec["channels"]
    model = DeployedClassifier(backbone, head, 1.0, (0.0,) * c, (1.0,) * c)
    model.load_state_dict(state)
    return model.eval()


def _to_torchscript(model: DeployedClassifier, example: torch.Tensor) -> tuple[object, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream, still loadable
        try:
            return torch.jit.script(model), "script"
        except Exception:  # noqa: BLE001 - fall back to tracing whatever scripting rejects
            return torch.jit.trace(model, example), "trace"


def save_bundle(
    out: str | os.PathLike,
    model: DeployedClassifier,
    spec: dict,
    meta: dict,
    check_inputs: torch.Tensor,
) -> Bundle:
    """Write ``model.pt``, ``model.ts`` and ``bundle.json`` into ``out``.

    The TorchScript file is loaded back and compared with the bundle rebuilt from ``model.pt``
    on ``check_inputs`` (float ``(B, C, S, S)`` in ``[0, 1]``, e.g. validation images).

    Args:
        model: the network (moved to the CPU in float32).
        spec: ``backbone``, ``num_classes``, ``channels``, ``feature_dim``, ``head`` (from
            :func:`head_spec`).
        meta: the JSON part (classes, preprocessing, temperature, method, metrics, ...).

    Raises:
        LongtailError: the exported network disagrees with the bundle by more than 1e-5.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu().eval()
    x = check_inputs.float().cpu().contiguous()
    atomic_torch_save(
        {"format": FORMAT, "spec": spec, "state_dict": model.state_dict()}, out / WEIGHTS
    )
    rebuilt = _rebuild(spec, _load_weights(out / WEIGHTS)["state_dict"])
    ts, how = _to_torchscript(model, x[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ts.save(str(out / TORCHSCRIPT))
        loaded = torch.jit.load(str(out / TORCHSCRIPT), map_location="cpu")
    with torch.no_grad():
        p_model, p_bundle, p_ts = model(x), rebuilt(x), loaded(x)
    diff = float((p_ts - p_bundle).abs().max())
    diff_memory = float((p_bundle - p_model).abs().max())
    if not diff <= EXPORT_TOLERANCE or not diff_memory <= EXPORT_TOLERANCE:
        raise LongtailError(
            f"export check failed: TorchScript vs bundle max |dp| = {diff:.3g}, bundle vs "
            f"trained network {diff_memory:.3g} (tolerance {EXPORT_TOLERANCE:g})"
        )
    meta = {
        "format": FORMAT,
        **meta,
        "spec": spec,
        "files": {"weights": WEIGHTS, "torchscript": TORCHSCRIPT},
        "export": {
            "format": "torchscript",
            "method": how,
            "file": TORCHSCRIPT,
            "checked_images": int(x.shape[0]),
            "max_abs_diff": diff,
            "tolerance": EXPORT_TOLERANCE,
            "usage": (
                "m = torch.jit.load('model.ts'); probs = m(x)  # x float32 (B, C, S, S) in [0, 1],"
                " resized and cropped as 'preprocessing' says; m.logits(x) gives calibrated logits"
            ),
        },
    }
    atomic_write_json(out / BUNDLE_JSON, meta)
    return Bundle(out, rebuilt, meta)


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Open a bundle folder (``FIT_DIR/bundle``, or ``FIT_DIR`` itself).

    Raises:
        LongtailError: no ``bundle.json`` / ``model.pt``, or files that do not match.
    """
    p = Path(path).expanduser()
    if not (p / BUNDLE_JSON).is_file() and (p / "bundle" / BUNDLE_JSON).is_file():
        p = p / "bundle"
    if not (p / BUNDLE_JSON).is_file():
        raise LongtailError(
            f"{str(path)!r} holds no model bundle ({BUNDLE_JSON}); give the --out folder of "
            "`longtail fit` or its bundle/ sub-folder"
        )
    try:
        meta = json.loads((p / BUNDLE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LongtailError(f"{p / BUNDLE_JSON}: unreadable ({e})") from e
    if meta.get("format") != FORMAT:
        raise LongtailError(f"{p / BUNDLE_JSON}: not a {FORMAT} bundle")
    saved = _load_weights(p / WEIGHTS)
    model = _rebuild(saved["spec"], saved["state_dict"])
    return Bundle(p, model, meta)

"""The model bundle: one deployable network plus everything needed to feed and read it.

``BUNDLE_DIR/`` holds

- ``model.pt``: the :class:`DeployedClassifier` state dict and how to rebuild it (backbone name,
  classes, channels, head kind), written with a ``.sha256`` beside it;
- ``model.onnx``: the same network as ONNX (standard operators, dynamic batch), runnable with
  onnxruntime and no PyTorch (:mod:`longtail.fit.onnx_runtime`);
- ``model.ts``: the same network as TorchScript, loadable with plain ``torch.jit.load``;
- ``model.pt2`` (``longtail export --format pt2``): a ``torch.export`` ExportedProgram;
- ``check.pt``: the validation images (uint8) every export is checked on;
- ``bundle.json``: class names, preprocessing (:class:`longtail.fit.images.Preprocessing`), the
  temperature, the chosen stage-2 method, validation / test metrics, and one record per export
  (``exports``: file, input / output, the check's max abs difference; :mod:`longtail.fit.export`).

The network takes float32 images ``(B, C, S, S)`` in ``[0, 1]`` (uint8 / 255, resized and
cropped as the preprocessing says), normalises them itself, and returns calibrated probabilities
``softmax(head(features(x)) / T)`` of shape ``(B, K)``: one forward pass. A bundle of ``longtail
fit`` with a re-fit averages two such networks (:class:`DeployedEnsemble`: the re-fit and the
selection run, each with its temperature; ``spec["members"]``). Every exported file takes and
returns the same.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from longtail.classify.heads import build_head
from longtail.core.errors import LongtailError
from longtail.core.io import atomic_torch_save, atomic_write_json
from longtail.fit.export import FILES, export_model
from longtail.fit.images import (
    BUNDLE_JSON,
    BadFile,
    BundleMeta,
    decode,
    find_bundle,
    list_image_inputs,
)
from longtail.models import build_model

FORMAT = "longtail-bundle/1"
WEIGHTS = "model.pt"
CHECK_IMAGES = "check.pt"
CHECK_FORMAT = "longtail-check-images/1"
FIT_EXPORTS = ("onnx", "torchscript")  # what `longtail fit` writes
REBUILD_TOLERANCE = 1e-5  # model.pt reloaded vs the trained network (same code, same kernels)


class DeployedClassifier(nn.Module):
    """SWA backbone features -> stage-2 head -> temperature, as one module.

    ``forward(x)``: images ``(B, C, S, S)`` float in ``[0, 1]`` -> probabilities ``(B, K)``;
    ``logits(x)``: the calibrated logits ``head(features) / T`` ``(B, K)``. With ``mirror``
    the features are the mean of the image's and its left-right mirror image's (two backbone
    passes).
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        temperature: float,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        mirror: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.mirror = bool(mirror)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    @torch.jit.export
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated logits ``(B, K)`` of images ``(B, C, S, S)`` in ``[0, 1]``."""
        x = (x - self.mean) / self.std
        z = self.backbone.features(x)
        if self.mirror:
            z = 0.5 * (z + self.backbone.features(x.flip(3)))
        return self.head(z).float() / self.temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities ``(B, K)`` of images ``(B, C, S, S)`` in ``[0, 1]``."""
        return torch.softmax(self.logits(x), dim=1)


class DeployedEnsemble(nn.Module):
    """The mean of its members' calibrated probabilities, as one module.

    ``forward(x)``: images ``(B, C, S, S)`` float in ``[0, 1]`` -> ``(1/M) sum_m p_m(x)``
    ``(B, K)``, each member a :class:`DeployedClassifier` with its own backbone, head,
    temperature and mirror setting (``longtail fit``: the re-fit and the selection run).
    """

    def __init__(self, members: list[DeployedClassifier]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.size = len(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Averaged probabilities ``(B, K)`` of images ``(B, C, S, S)`` in ``[0, 1]``."""
        p = torch.zeros(0)
        for i, m in enumerate(self.members):
            p = m(x) if i == 0 else p + m(x)
        return p / self.size


Deployed = DeployedClassifier | DeployedEnsemble


def members(model: Deployed) -> list[DeployedClassifier]:
    """The single networks a deployed model averages (itself when it is one)."""
    return list(model.members) if isinstance(model, DeployedEnsemble) else [model]


@dataclass
class Bundle(BundleMeta):
    """A loaded bundle: the network (CPU, eval mode) and its ``bundle.json``."""

    dir: Path
    model: Deployed
    meta: dict

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` calibrated probabilities of float images ``(B, C, S, S)`` in ``[0, 1]``."""
        return self.model(x.float())

    @cached_property
    def _transform(self) -> Callable:
        return self.preprocessing.transform()

    def decode(self, path: str) -> torch.Tensor | BadFile:
        """uint8 ``(C, S, S)`` pixels of one file by the preprocessing, or why it is unreadable."""
        return decode(path, self.preprocessing, self._transform)

    def predict_uint8(self, x: np.ndarray) -> np.ndarray:
        """``(B, K)`` probabilities (numpy) of uint8 images ``(B, C, S, S)`` (divided by 255)."""
        return self.probabilities(torch.from_numpy(x).float().div_(255.0)).numpy()

    def check_images(self) -> torch.Tensor:
        """The validation images exports are checked on, float ``(N, C, S, S)`` in ``[0, 1]``.

        Raises:
            LongtailError: ``check.pt`` missing (a bundle from an older longtail): pass images.
        """
        f = self.dir / CHECK_IMAGES
        if not f.is_file():
            raise LongtailError(
                f"{str(f)!r} not found (bundles written before exports were checked lack it); "
                "give validation images to check the export on with --check-images FOLDER"
            )
        saved = _load_checked(f, CHECK_FORMAT)
        return saved["images"].float().div(255.0)

    def export(
        self,
        fmt: str,
        out: str | os.PathLike | None = None,
        *,
        opset: int | None = None,
        dynamic_batch: bool = True,
        batch_size: int = 1,
        check_images: list[str] | None = None,
    ) -> dict:
        """Write the network as ``fmt`` (``onnx``, ``pt2``, ``torchscript``) and check it
        (:func:`longtail.fit.export.export_model`). The Python face of ``longtail export``.

        Args:
            out: the file (default ``BUNDLE/model.<ext>``); files inside the bundle folder are
                recorded in ``bundle.json``'s ``exports``.
            check_images: image files / folders to check on instead of ``check.pt``.

        Returns:
            The export's record (file, input / output, ``max_abs_diff``).
        """
        if fmt not in FILES:
            raise LongtailError(f"unknown format {fmt!r}; choose one of {', '.join(FILES)}")
        x = self._decode_all(check_images) if check_images else self.check_images()
        path = Path(out).expanduser() if out else self.dir / FILES[fmt]
        record = export_model(
            self.model,
            fmt,
            path,
            check_images=x,
            opset=opset,
            dynamic_batch=dynamic_batch,
            batch_size=batch_size,
        )
        if path.resolve().parent == self.dir.resolve():
            self.meta.setdefault("exports", {})[fmt] = record
            self.meta.setdefault("files", {})[fmt] = path.name
            atomic_write_json(self.dir / BUNDLE_JSON, self.meta)
        return record

    def _decode_all(self, inputs: list[str], limit: int = 64) -> torch.Tensor:
        try:
            paths = list_image_inputs(inputs)
        except FileNotFoundError as e:
            raise LongtailError(f"--check-images {str(e)!r} not found") from None
        pix = [p for p in map(self.decode, paths[: 4 * limit]) if isinstance(p, torch.Tensor)]
        if not pix:
            raise LongtailError(f"--check-images {inputs}: no readable images")
        return torch.stack(pix[:limit]).float().div(255.0)


def _load_checked(path: Path, fmt: str) -> dict:
    """A bundle's torch file, checksum verified, unpickled with ``weights_only=True`` (tensors,
    plain containers and strings only: a bundle from elsewhere cannot run code)."""
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
    if not isinstance(saved, dict) or saved.get("format") != fmt:
        raise LongtailError(f"{str(path)!r} is not a {fmt} file")
    return saved


def _build(spec: dict) -> Deployed:
    """An untrained network of ``spec``'s shape (one network, or ``members``: an ensemble)."""
    if "members" in spec:
        return DeployedEnsemble([_build(s) for s in spec["members"]])
    backbone = build_model(spec["backbone"], spec["num_classes"], spec["channels"])
    head = build_head(spec["head"], spec["num_classes"], spec["feature_dim"])
    c = spec["channels"]
    mirror = bool(spec.get("mirror", False))  # bundles before mirror averaging lack the key
    return DeployedClassifier(backbone, head, 1.0, (0.0,) * c, (1.0,) * c, mirror=mirror)


def _rebuild(spec: dict, state: dict) -> Deployed:
    model = _build(spec)
    model.load_state_dict(state)
    return model.eval()


def save_bundle(
    out: str | os.PathLike,
    model: Deployed,
    *,
    spec: dict,
    meta: dict,
    check_inputs: torch.Tensor,
    formats: tuple[str, ...] = FIT_EXPORTS,
    log: Callable[[str], None] = print,
) -> Bundle:
    """Write ``model.pt``, ``check.pt``, ``bundle.json`` and one file per export format.

    ``model.pt`` is read back and compared with ``model`` on ``check_inputs`` (float ``(B, C,
    S, S)`` in ``[0, 1]``, validation images, kept as uint8 in ``check.pt``); then each format
    is exported and checked (:meth:`Bundle.export`). An export that fails (e.g. onnxruntime not
    installed) is logged and recorded in ``bundle.json`` with the reason; the bundle stays usable.

    Args:
        model: the network (moved to the CPU in float32).
        spec: ``backbone``, ``num_classes``, ``channels``, ``feature_dim``, ``head`` (from
            :func:`longtail.classify.heads.head_spec`), ``mirror`` (bool, optional); for a
            :class:`DeployedEnsemble`, ``members``: one such dict per member, in order.
        meta: the JSON part (classes, preprocessing, temperature, method, metrics, ...).

    Raises:
        LongtailError: the reloaded bundle disagrees with ``model`` by more than 1e-5.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu().eval()
    x = check_inputs.float().cpu().contiguous()
    atomic_torch_save(
        {"format": FORMAT, "spec": spec, "state_dict": model.state_dict()}, out / WEIGHTS
    )
    atomic_torch_save(
        {"format": CHECK_FORMAT, "images": x.mul(255.0).round().to(torch.uint8)}, out / CHECK_IMAGES
    )
    rebuilt = _rebuild(spec, _load_checked(out / WEIGHTS, FORMAT)["state_dict"])
    with torch.no_grad():
        diff = float((rebuilt(x) - model(x)).abs().max())
    if not diff <= REBUILD_TOLERANCE:
        raise LongtailError(
            f"bundle check failed: {WEIGHTS} reloaded vs the trained network max |dp| = "
            f"{diff:.3g} (tolerance {REBUILD_TOLERANCE:g})"
        )
    meta = {
        "format": FORMAT,
        **meta,
        "spec": spec,
        "files": {"weights": WEIGHTS, "check_images": CHECK_IMAGES},
        "exports": {},
    }
    atomic_write_json(out / BUNDLE_JSON, meta)
    bundle = Bundle(out, rebuilt, meta)
    for fmt in formats:
        try:
            bundle.export(fmt)
        except LongtailError as e:
            log(f"note: no {FILES[fmt]} in the bundle: {e}")
            meta["exports"][fmt] = {"format": fmt, "error": str(e)}
            atomic_write_json(out / BUNDLE_JSON, meta)
    return bundle


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Open a bundle folder (``FIT_DIR/bundle``, or ``FIT_DIR`` itself).

    Raises:
        LongtailError: no ``bundle.json`` / ``model.pt``, or files that do not match.
    """
    p = find_bundle(path)
    try:
        meta = json.loads((p / BUNDLE_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LongtailError(f"{p / BUNDLE_JSON}: unreadable ({e})") from e
    if meta.get("format") != FORMAT:
        raise LongtailError(f"{p / BUNDLE_JSON}: not a {FORMAT} bundle")
    saved = _load_checked(p / WEIGHTS, FORMAT)
    model = _rebuild(saved["spec"], saved["state_dict"])
    return Bundle(p, model, meta)

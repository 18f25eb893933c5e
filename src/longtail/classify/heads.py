"""Classifier heads on cached features ``(N, d)`` -> logits ``(N, C)``, and their training.

Every head here is a :class:`Head`: besides ``forward`` it says how to rebuild itself
(:meth:`Head.spec`, :meth:`Head.from_spec`), so a model bundle can save and reload any of them
(its tensors travel in the state dict) without knowing the kinds. A head class defined outside
longtail becomes bundleable the same way: subclass :class:`Head` with its own ``kind``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.classify.plugins import load_env_plugins
from longtail.core.errors import LongtailError
from longtail.data.samplers import make_sampler

NCM_METRICS = ("sqeuclidean", "euclidean", "cosine")
"""The scores :class:`NCMHead` knows; ``stage2.ncm_metric`` takes these names."""

_KINDS: dict[str, type[Head]] = {}


class Head(nn.Module):
    """A stage-2 head a bundle can save and rebuild: features ``(N, d)`` -> logits ``(N, C)``.

    Subclasses set the class attribute ``kind`` (a name unique among heads; registered when the
    class is defined) and implement :meth:`spec` and :meth:`from_spec`.
    """

    kind = ""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if not kind:
            return
        known = _KINDS.get(kind)
        if known is not None and _qualname(known) != _qualname(cls):
            raise LongtailError(
                f"head kind {kind!r} of {_qualname(cls)} is taken by {_qualname(known)}: give "
                "the class another kind"
            )
        _KINDS[kind] = cls

    def spec(self) -> dict:
        """How to rebuild this head empty (JSON-ready; ``kind`` plus constructor options)."""
        raise NotImplementedError

    @classmethod
    def from_spec(cls, spec: dict, num_classes: int, dim: int) -> Head:
        """An empty head of ``spec`` for ``C = num_classes`` and features of width ``d = dim``,
        ready for ``load_state_dict``."""
        raise NotImplementedError


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def head_spec(head: nn.Module) -> dict:
    """How to rebuild ``head`` (:meth:`Head.spec`), checked to name the head's own class.

    Raises:
        LongtailError: the head is not a :class:`Head` with a kind of its own.
    """
    kind = type(head).__dict__.get("kind") if isinstance(head, Head) else None
    if not kind or _KINDS.get(kind) is not type(head):
        raise LongtailError(
            f"cannot bundle a head of type {type(head).__name__}: a bundleable head subclasses "
            "longtail.classify.heads.Head with its own kind, spec() and from_spec()"
        )
    spec = head.spec()
    if spec.get("kind") != kind:
        raise LongtailError(f"{type(head).__name__}.spec() must name kind {kind!r}")
    return spec


def build_head(spec: dict, num_classes: int, dim: int) -> Head:
    """An empty head of the kind ``spec`` names (:meth:`Head.from_spec`), for ``load_state_dict``.

    Raises:
        LongtailError: no head class of that kind is defined (e.g. a plugin's, not loaded).
    """
    if spec.get("kind", "") not in _KINDS:
        load_env_plugins()  # a plugin's head class is defined when its module is imported
    cls = _KINDS.get(spec.get("kind", ""))
    if cls is None:
        raise LongtailError(
            f"unknown head kind {spec.get('kind')!r} in the bundle; known: {', '.join(_KINDS)} "
            "(a plugin's head: load the plugin that defines it with --plugin or "
            "$LONGTAIL_PLUGINS)"
        )
    return cls.from_spec(spec, num_classes, dim)


class LinearHead(Head):
    """``z W^T + b``; ``weight`` ``(C, d)``, ``bias`` ``(C,)`` (may be ``None``)."""

    kind = "linear"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone().float())
        self.bias = nn.Parameter(bias.detach().clone().float()) if bias is not None else None

    @classmethod
    def fresh(cls, dim: int, num_classes: int, seed: int = 0) -> LinearHead:
        """A re-initialised head (PyTorch's default Linear initialisation, seeded)."""
        g = torch.Generator().manual_seed(seed)
        bound = 1 / math.sqrt(dim)
        w = (torch.rand(num_classes, dim, generator=g) * 2 - 1) * bound
        b = (torch.rand(num_classes, generator=g) * 2 - 1) * bound
        return cls(w, b)

    def spec(self) -> dict:
        return {"kind": self.kind, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict, num_classes: int, dim: int) -> LinearHead:
        b = torch.zeros(num_classes) if spec["bias"] else None
        return cls(torch.zeros(num_classes, dim), b)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z.float(), self.weight, self.bias)


class ScaledHead(Head):
    """LWS: fixed ``W, b`` and a learnable per-class scale ``f`` ``(C,)``: ``f * (z W^T + b)``."""

    kind = "scaled"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("w0", weight.detach().clone().float())
        self.register_buffer("b0", bias.detach().clone().float() if bias is not None else None)
        self.scale = nn.Parameter(torch.ones(weight.shape[0]))

    @property
    def weight(self) -> torch.Tensor:
        """Effective weights ``f_i * w_i`` ``(C, d)`` (for weight-norm plots)."""
        return self.w0 * self.scale.detach().unsqueeze(1)

    def spec(self) -> dict:
        return {"kind": self.kind, "bias": self.b0 is not None}

    @classmethod
    def from_spec(cls, spec: dict, num_classes: int, dim: int) -> ScaledHead:
        b = torch.zeros(num_classes) if spec["bias"] else None
        return cls(torch.zeros(num_classes, dim), b)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(z.float(), self.w0, self.b0)


class NCMHead(Head):
    """Nearest class mean on ``z' = normalize(z - center)`` as in Kang et al.; features ``(N, d)``
    to logits ``(N, C)``: ``-||z' - mu_c||^2`` (``sqeuclidean``, Kang's code and the default),
    ``-||z' - mu_c||`` (``euclidean``, this project's default before; kept so bundles calibrated
    on it load unchanged) or ``cos(z', mu_c)`` (``cosine``). The metrics rank classes alike and
    differ in the logits' scale, so in NLL and ECE before temperature scaling."""

    kind = "ncm"

    def __init__(self, centroids: torch.Tensor, center: torch.Tensor, metric: str = "sqeuclidean"):
        super().__init__()
        if metric not in NCM_METRICS:
            raise ValueError(f"NCM metric {metric!r}: choose one of {', '.join(NCM_METRICS)}")
        self.register_buffer("centroids", centroids.float())
        self.register_buffer("center", center.float())
        self.metric = metric

    @property
    def weight(self) -> torch.Tensor:
        return self.centroids

    def spec(self) -> dict:
        return {"kind": self.kind, "metric": self.metric}

    @classmethod
    def from_spec(cls, spec: dict, num_classes: int, dim: int) -> NCMHead:
        return cls(torch.zeros(num_classes, dim), torch.zeros(dim), spec["metric"])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        zn = F.normalize(z.float() - self.center, dim=1)
        if self.metric == "cosine":
            return zn @ F.normalize(self.centroids, dim=1).t()
        if self.metric == "sqeuclidean":  # expanded: one matmul, exact, exports to ONNX
            sq = (zn * zn).sum(1, keepdim=True) + (self.centroids**2).sum(1)
            return (2 * zn @ self.centroids.t() - sq).clamp_max(0.0)
        return -torch.cdist(zn, self.centroids, compute_mode="use_mm_for_euclid_dist")


def train_head(
    head: nn.Module,
    params: list[nn.Parameter],
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    sampler: str = "class_balanced",
    seed: int = 0,
) -> nn.Module:
    """Mini-batch SGD (momentum 0.9, cosine lr to 0) over epochs of ``N`` sampled indices.

    ``loss_fn(head, idx (B,) int64, y (B,))`` computes the batch loss from example indices, so
    callers decide which feature view each example uses.
    """
    s = make_sampler(sampler, labels.numpy(), seed=seed)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = len(labels)
    steps = max(epochs * math.ceil(n / batch_size), 1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    torch.manual_seed(seed)
    head.train()
    for e in range(epochs):
        idx = torch.from_numpy(s.epoch_indices(e))
        for i in range(0, n, batch_size):
            b = idx[i : i + batch_size]
            loss = loss_fn(head, b, labels[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    head.eval()
    return head


def pick_view(bank: torch.Tensor, idx: torch.Tensor, generator: torch.Generator | None = None):
    """Features of examples ``idx`` ``(B,)``: from ``(N, d)`` directly, or from a random view
    per example of a ``(V, N, d)`` bank."""
    if bank.dim() == 2:
        return bank[idx].float()
    v = torch.randint(0, bank.shape[0], (len(idx),), generator=generator)
    return bank[v, idx].float()

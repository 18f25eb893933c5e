"""Classifier heads on cached features ``(N, d)`` -> logits ``(N, C)``, and their training."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.data.samplers import make_sampler


class LinearHead(nn.Module):
    """``z W^T + b``; ``weight`` ``(C, d)``, ``bias`` ``(C,)`` (may be ``None``)."""

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

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.linear(z.float(), self.weight, self.bias)


class ScaledHead(nn.Module):
    """LWS: fixed ``W, b`` and a learnable per-class scale ``f`` ``(C,)``: ``f * (z W^T + b)``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("w0", weight.detach().clone().float())
        self.register_buffer("b0", bias.detach().clone().float() if bias is not None else None)
        self.scale = nn.Parameter(torch.ones(weight.shape[0]))

    @property
    def weight(self) -> torch.Tensor:
        """Effective weights ``f_i * w_i`` ``(C, d)`` (for weight-norm plots)."""
        return self.w0 * self.scale.detach().unsqueeze(1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(z.float(), self.w0, self.b0)


class NCMHead(nn.Module):
    """Nearest class mean: ``-||z' - mu_c||`` (euclidean) or ``cos(z', mu_c)`` (cosine), with
    ``z' = normalize(z - center)`` as in Kang et al."""

    def __init__(self, centroids: torch.Tensor, center: torch.Tensor, metric: str = "euclidean"):
        super().__init__()
        self.register_buffer("centroids", centroids.float())
        self.register_buffer("center", center.float())
        self.metric = metric

    @property
    def weight(self) -> torch.Tensor:
        return self.centroids

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        zn = F.normalize(z.float() - self.center, dim=1)
        if self.metric == "cosine":
            return zn @ F.normalize(self.centroids, dim=1).t()
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

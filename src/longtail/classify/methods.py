"""The stage-2 methods of Kang et al. (2020) on cached features.

Each function takes training features ``z`` ``(N, d)`` (or ``(V, N, d)`` augmented views) and
labels ``(N,)`` and returns a head mapping features to logits ``(N, C)``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from longtail.classify.heads import LinearHead, NCMHead, ScaledHead, pick_view, train_head
from longtail.evaluate.metrics import accuracy, nll


def ncm(z: torch.Tensor, y: torch.Tensor, num_classes: int, metric: str = "sqeuclidean") -> NCMHead:
    """Class centroids ``(C, d)`` of centred, L2-normalised training features ``z`` ``(N, d)``
    (or views ``(V, N, d)``, averaged) with labels ``(N,)``: Kang's NCM. ``metric`` as
    :class:`~longtail.classify.heads.NCMHead`'s (the default, ``sqeuclidean``, is Kang's)."""
    z = z.float().mean(0) if z.dim() == 3 else z.float()
    center = z.mean(0)
    zn = F.normalize(z - center, dim=1)
    cents = torch.zeros(num_classes, z.shape[1])
    cents.index_add_(0, y, zn)
    cents /= torch.bincount(y, minlength=num_classes).clamp_min(1).unsqueeze(1).float()
    return NCMHead(cents, center, metric)


def crt(
    z: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    epochs: int = 10,
    lr: float = 0.2,
    weight_decay: float = 5e-4,
    batch_size: int = 512,
    seed: int = 0,
) -> LinearHead:
    """Classifier re-training: a fresh linear head trained with class-balanced sampling."""
    head = LinearHead.fresh(z.shape[-1], num_classes, seed)
    g = torch.Generator().manual_seed(seed)

    def loss(h, idx, yb):
        return F.cross_entropy(h(pick_view(z, idx, g)), yb)

    return train_head(
        head,
        list(head.parameters()),
        loss,
        y,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
    )


def tau_normalize(weight: torch.Tensor, tau: float) -> LinearHead:
    """``w_i / ||w_i||^tau``, bias dropped."""
    norms = weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return LinearHead(weight / norms.pow(tau), None)


def tau_norm(
    weight: torch.Tensor, val_z: torch.Tensor, val_y: torch.Tensor, grid: list[float]
) -> tuple[LinearHead, float, list[dict]]:
    """Pick tau on the validation split (best accuracy, ties by NLL); never looks at test.

    Returns the head, the chosen tau and the sweep ``[{tau, val_acc, val_nll}]``.
    """
    sweep = []
    for tau in grid:
        logits = tau_normalize(weight, tau)(val_z)
        sweep.append(
            {"tau": float(tau), "val_acc": accuracy(logits, val_y), "val_nll": nll(logits, val_y)}
        )
    best = _best_on_validation(sweep)
    return tau_normalize(weight, best["tau"]), best["tau"], sweep


def _best_on_validation(sweep: list[dict]) -> dict:
    """The row with the best validation accuracy, ties broken by the lower validation NLL."""
    return max(sweep, key=lambda r: (round(r["val_acc"], 10), -r["val_nll"]))


def logit_adjust(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    counts: torch.Tensor,
    val_z: torch.Tensor,
    val_y: torch.Tensor,
    grid: list[float],
) -> tuple[LinearHead, float, list[dict]]:
    """Post-hoc logit adjustment (Menon et al. 2021): ``logits - tau * log(prior)``.

    ``weight`` ``(C, d)`` and ``bias`` ``(C,)`` of the joint classifier, ``counts`` ``(C,)``
    training images per class (the prior is ``counts / counts.sum()``; an empty class counts as
    one image), ``val_z`` ``(N, d)``, ``val_y`` ``(N,)``. The adjustment is a bias shift, so the
    head stays one linear layer. ``tau`` is chosen on the validation split like τ-norm's (best
    accuracy, ties by NLL). Returns the head, ``tau`` and the sweep ``[{tau, val_acc, val_nll}]``.
    """
    prior = counts.double().clamp_min(1.0)
    log_prior = (prior / prior.sum()).log().float()
    b = bias.detach().float() if bias is not None else torch.zeros(weight.shape[0])
    sweep = []
    for tau in grid:
        logits = LinearHead(weight, b - float(tau) * log_prior)(val_z)
        sweep.append(
            {"tau": float(tau), "val_acc": accuracy(logits, val_y), "val_nll": nll(logits, val_y)}
        )
    best = _best_on_validation(sweep)
    return LinearHead(weight, b - best["tau"] * log_prior), best["tau"], sweep


def lws(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor,
    y: torch.Tensor,
    epochs: int = 5,
    lr: float = 0.2,
    weight_decay: float = 5e-4,
    batch_size: int = 512,
    seed: int = 0,
) -> ScaledHead:
    """Learnable weight scaling: per-class scales on the frozen joint classifier, CB sampling.

    The scales ``(C,)`` start at 1 and take ``weight_decay`` like every parameter in Kang et al.'s
    code (5e-4 there and in :class:`~longtail.config.Stage2Config`)."""
    head = ScaledHead(weight, bias)
    g = torch.Generator().manual_seed(seed)

    def loss(h, idx, yb):
        return F.cross_entropy(h(pick_view(z, idx, g)), yb)

    return train_head(
        head,
        [head.scale],
        loss,
        y,
        epochs=epochs,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
    )


def weight_norms(head: torch.nn.Module) -> np.ndarray | None:
    """Per-class L2 norm of a head's (effective) weights ``(C,)``; ``None`` without weights."""
    w = getattr(head, "weight", None)
    return None if w is None else w.detach().float().norm(dim=1).numpy()

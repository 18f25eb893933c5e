"""Temperature scaling (Guo et al. 2017), the optional post-hoc calibration baseline.

See docs/METHODS.md, section "Stage 2" (**Calibration**).

Fit one scalar temperature ``T > 0`` on held-out *validation* logits by minimising the NLL of
``softmax(logits / T)``; at test time divide the logits by ``T``. Dividing by a positive scalar
never changes the argmax, so accuracy is unchanged; only NLL / ECE / Brier move. Never fit ``T`` on
the test set.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["T_MAX", "T_MIN", "apply_temperature", "class_balanced_weights", "fit_temperature"]

#: Bounds the fitted temperature is clamped into.
T_MIN = 0.05
T_MAX = 100.0


def _nll_at(z: Tensor, y: Tensor, log_t: Tensor, w: Tensor | None = None) -> Tensor:
    """Mean NLL (nats) of ``softmax(z / exp(log_t))``; ``z`` (N, C) float64, ``y`` (N,) int64;
    with ``w`` (N,) float64 summing to 1, the ``w``-weighted mean."""
    if w is None:
        return torch.nn.functional.cross_entropy(z * torch.exp(-log_t), y)
    return (w * torch.nn.functional.cross_entropy(z * torch.exp(-log_t), y, reduction="none")).sum()


def class_balanced_weights(labels: Tensor) -> Tensor:
    """Weights ``(N,)`` ``1 / n_{y_i}`` (``n_c``: the images of class ``c`` among ``labels``
    ``(N,)``), so that every class present weighs alike in a weighted mean: the NLL they give
    :func:`fit_temperature` estimates the NLL on a class-balanced sample of the same classes."""
    y = torch.as_tensor(labels).long()
    return 1.0 / torch.bincount(y).double()[y]


def _golden_section(
    z: Tensor, y: Tensor, lo: float, hi: float, iters: int, w: Tensor | None = None
) -> float:
    """Minimise the NLL over ``log T`` in ``[lo, hi]`` by golden-section search.

    The NLL is convex in ``1 / T`` (log-sum-exp of a linear map minus a linear term), hence
    unimodal in ``log T``, so golden-section search finds the constrained minimiser.
    """
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0

    def f(v: float) -> float:
        return float(_nll_at(z, y, torch.tensor(v, dtype=torch.float64), w))

    a, b = lo, hi
    c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - inv_phi * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + inv_phi * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def fit_temperature(
    logits: Tensor, labels: Tensor, max_iter: int = 100, weights: Tensor | None = None
) -> float:
    """Fit the temperature ``T`` that minimises the mean NLL of ``softmax(logits / T)``.

    Optimises ``log T`` (so ``T`` stays positive) from ``T = 1`` with ``torch.optim.LBFGS``
    (strong-Wolfe line search) in float64 on the CPU. If L-BFGS produces a non-finite value or a
    worse NLL than the golden-section search over the allowed range, the golden-section answer is
    used instead. The result is clamped into ``[T_MIN, T_MAX] = [0.05, 100]``; since the NLL is
    unimodal in ``log T`` the clamped value is the constrained optimum (e.g. ``T_MIN`` when every
    validation example is classified correctly, where the unconstrained optimum is ``T -> 0``).

    Args:
        logits: ``(N, C)`` raw validation-set logits, any float dtype (float16/bfloat16 accepted)
            and device. Detached; gradients never flow back.
        labels: ``(N,)`` int64 validation labels in ``[0, C)``.
        max_iter: maximum number of L-BFGS iterations.
        weights: ``(N,)`` non-negative per-example weights (any scale; e.g.
            :func:`class_balanced_weights`): minimise the weighted mean NLL instead. ``None``:
            every example alike.

    Returns:
        The temperature ``T`` (dimensionless, ``> 0``) as a Python float.

    Raises:
        ValueError: on empty input, mismatched shapes, labels out of range or non-finite logits.
    """
    if not isinstance(logits, Tensor):
        logits = torch.as_tensor(logits)
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, C), got {tuple(logits.shape)}")
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(
            f"cannot fit a temperature on empty logits of shape {tuple(logits.shape)}: "
            "the validation split has no examples"
        )
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if labels.ndim != 1 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"labels must have shape ({logits.shape[0]},) to match the logits, "
            f"got {tuple(labels.shape)}"
        )
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    w = None
    if weights is not None:
        w = torch.as_tensor(weights).detach().to("cpu", torch.float64)
        if w.shape != (logits.shape[0],):
            raise ValueError(
                f"weights must have shape ({logits.shape[0]},) to match the logits, "
                f"got {tuple(w.shape)}"
            )
        if not torch.isfinite(w).all() or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(
                "weights must be finite, non-negative and not all zero "
                f"(got min {float(w.min()):g}, sum {float(w.sum()):g})"
            )
        w = w / w.sum()
    z = logits.detach().to("cpu", torch.float64)
    y = labels.detach().to("cpu", torch.int64)
    if not torch.isfinite(z).all():
        raise ValueError("logits contain NaN or infinite values")
    if int(y.min()) < 0 or int(y.max()) >= z.shape[1]:
        raise ValueError(
            f"labels must lie in [0, {z.shape[1]}), got [{int(y.min())}, {int(y.max())}]"
        )

    lo, hi = math.log(T_MIN), math.log(T_MAX)
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    # Tolerances well below the float32 defaults: the objective is evaluated in float64.
    optimizer = torch.optim.LBFGS(
        [log_t],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = _nll_at(z, y, log_t, w)
        loss.backward()
        return loss

    optimizer.step(closure)
    candidate = min(max(float(log_t.detach()), lo), hi) if math.isfinite(log_t.item()) else None

    # Safety net: golden-section search over the allowed range (cheap: one NLL per iteration).
    fallback = _golden_section(z, y, lo, hi, iters=80, w=w)
    with torch.no_grad():
        f_fallback = float(_nll_at(z, y, torch.tensor(fallback, dtype=torch.float64), w))
        if candidate is not None:
            f_candidate = float(_nll_at(z, y, torch.tensor(candidate, dtype=torch.float64), w))
    if candidate is None or not math.isfinite(f_candidate) or f_fallback < f_candidate - 1e-12:
        candidate = fallback
    # Clamp in log space and return the bounds exactly (exp(log(0.05)) is not exactly 0.05).
    if candidate <= lo:
        return T_MIN
    if candidate >= hi:
        return T_MAX
    return math.exp(candidate)


def apply_temperature(logits: Tensor, T: float) -> Tensor:
    """Temperature-scale logits: ``logits / T``.

    Args:
        logits: ``(N, C)`` (or any shape) raw logits.
        T: temperature, a finite float ``> 0`` (e.g. from :func:`fit_temperature`).

    Returns:
        ``logits / T``, same shape, dtype and device as ``logits``. Apply softmax yourself to get
        calibrated probabilities. The argmax (and so accuracy) is unchanged.
    """
    T = float(T)
    if not math.isfinite(T) or T <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {T}")
    return logits / T

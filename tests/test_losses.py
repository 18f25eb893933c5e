"""Stage-1 losses (docs/METHODS.md, "Stage 1"): CE, logit adjustment / Balanced Softmax, mixup."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from longtail.train.losses import make_loss, mixup

COUNTS = np.array([100, 50, 10, 5])  # prior = counts / 165


def batch(seed: int = 0, b: int = 6, c: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * 3, torch.randint(0, c, (b,), generator=g)


def hand_log_prior() -> torch.Tensor:
    return torch.tensor([math.log(c / 165) for c in (100, 50, 10, 5)])


def test_ce_equals_cross_entropy():
    logits, y = batch()
    loss = make_loss("ce", COUNTS)(logits, y)
    assert torch.equal(loss, F.cross_entropy(logits, y))


def test_ce_passes_label_smoothing():
    logits, y = batch()
    loss = make_loss("ce", COUNTS, label_smoothing=0.1)(logits, y)
    assert torch.allclose(loss, F.cross_entropy(logits, y, label_smoothing=0.1))
    assert not torch.allclose(loss, F.cross_entropy(logits, y))


def test_logit_adjusted_equals_ce_on_shifted_logits():
    logits, y = batch()
    tau = 1.5
    loss = make_loss("logit_adjusted", COUNTS, tau=tau)(logits, y)
    want = F.cross_entropy(logits + tau * hand_log_prior(), y)
    assert torch.allclose(loss, want, atol=1e-6)
    assert not torch.allclose(loss, F.cross_entropy(logits, y), atol=1e-3)


def test_balanced_softmax_equals_logit_adjusted_at_tau_one():
    logits, y = batch(1)
    a = make_loss("balanced_softmax", COUNTS, tau=1.0)(logits, y)
    b = make_loss("logit_adjusted", COUNTS, tau=1.0)(logits, y)
    assert torch.allclose(a, F.cross_entropy(logits + hand_log_prior(), y), atol=1e-6)
    assert torch.equal(a, b)


def test_logit_adjusted_with_uniform_counts_is_plain_ce():
    logits, y = batch(2)
    loss = make_loss("logit_adjusted", np.full(4, 37), tau=2.0)(logits, y)
    assert torch.allclose(loss, F.cross_entropy(logits, y), atol=1e-6)


def test_logit_adjusted_accepts_soft_targets():
    logits, _ = batch(3)
    g = torch.Generator().manual_seed(0)
    soft = torch.softmax(torch.randn(6, 4, generator=g), dim=1)
    loss = make_loss("logit_adjusted", COUNTS, tau=1.0)(logits, soft)
    want = -(soft * torch.log_softmax(logits + hand_log_prior(), dim=1)).sum(1).mean()
    assert torch.allclose(loss, want, atol=1e-6)


def test_zero_count_class_does_not_give_nan():
    logits, y = batch(4)
    loss = make_loss("logit_adjusted", np.array([10, 5, 1, 0]))(logits, y % 3)
    assert torch.isfinite(loss)


def mixed(seed: int, b: int = 8):
    """Mixup of ``b`` images with distinct labels ``0..b-1``: the one-hot targets are then
    exactly the mixing weights over the batch."""
    x = torch.randn(b, 3, 4, 4, generator=torch.Generator().manual_seed(100 + seed))
    y = torch.arange(b)
    xm, t = mixup(x, y, b, alpha=1.0, generator=torch.Generator().manual_seed(seed))
    return x, xm, t


def test_mixup_targets_are_convex_weights_summing_to_one():
    _, _, t = mixed(0)
    assert t.shape == (8, 8)
    assert (t >= 0).all() and (t <= 1).all()
    assert torch.allclose(t.sum(1), torch.ones(8), atol=1e-6)


def test_mixup_images_are_the_target_weighted_combination():
    x, xm, t = mixed(0)
    assert xm.shape == x.shape
    assert torch.allclose(xm.flatten(1), t @ x.flatten(1), atol=1e-5)


def test_mixup_uses_one_lambda_and_a_permutation():
    _, _, t = mixed(1)
    own = t.diagonal()
    moved = own < 1 - 1e-6  # rows mixed with another sample
    assert moved.any()
    lam = own[moved]
    assert torch.allclose(lam, lam[0].expand_as(lam), atol=1e-6)
    assert 0 < float(lam[0]) < 1
    # each row draws from one partner, and every sample is some row's partner
    partner = (t - torch.diag(own)).argmax(1)
    assert sorted(partner[moved].tolist() + torch.nonzero(~moved).flatten().tolist()) == list(
        range(8)
    )


def test_mixup_is_reproducible_from_the_generator():
    x, xm_a, t_a = mixed(5)
    _, xm_b, t_b = mixed(5)
    _, _, t_c = mixed(6)
    assert torch.equal(xm_a, xm_b) and torch.equal(t_a, t_b)
    assert not torch.equal(t_a, t_c)


def test_mixup_with_repeated_labels_keeps_valid_targets():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    xm, t = mixup(x, y, 3, alpha=0.4, generator=g)
    assert t.shape == (16, 3)
    assert torch.allclose(t.sum(1), torch.ones(16), atol=1e-6)
    assert (t >= 0).all()
    loss = make_loss("ce", np.ones(3))(xm @ torch.ones(2, 3), t)
    assert torch.isfinite(loss)

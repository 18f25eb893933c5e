"""SWAG posterior (docs/METHODS.md, "Stage 1"; Maddox et al. 2019).

Moments, sample covariance, state.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel

from longtail.train.swag import SWAG, flatten_parameters, load_flat_parameters

D = 8  # nn.Linear(3, 2): 6 weights + 2 biases
N_SNAPSHOTS = 30
N_DRAWS = 40_000


def snapshot_vectors(n: int = N_SNAPSHOTS, seed: int = 0) -> torch.Tensor:
    """``(n, D)`` float64 parameter vectors with correlated, unequal per-coordinate spread."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D, D, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, D)
    z = torch.randn(n, D, generator=g, dtype=torch.float64)
    # round to float32 so the model holds exactly these values
    return (1.0 + z @ mix.t()).float().double()


def collected(rank: int, thetas: torch.Tensor) -> SWAG:
    model = nn.Linear(3, 2)
    swag = SWAG(model, rank)
    for theta in thetas:
        load_flat_parameters(model, theta.float())
        swag.collect(model)
    return swag


def reference_moments(thetas: torch.Tensor, rank: int):
    """Mean, variance and deviation matrix computed directly (not by running updates)."""
    n = thetas.shape[0]
    mean = thetas.mean(0)
    var = (thetas**2).mean(0) - mean**2
    keep = range(max(0, n - rank), n) if rank >= 2 else range(0)
    devs = [thetas[i] - thetas[: i + 1].mean(0) for i in keep]
    dev = torch.stack(devs) if devs else torch.zeros(0, thetas.shape[1], dtype=torch.float64)
    return mean, var, dev


def sample_cov(swag: SWAG, scale: float, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    draws = torch.stack([swag.sample_vector(scale, g) for _ in range(N_DRAWS)]).double()
    return draws.mean(0), torch.cov(draws.t())


def assert_cov_close(got: torch.Tensor, want: torch.Tensor, n: int) -> None:
    """Entry-wise within 5 standard errors of a Gaussian sample covariance:
    ``Var(S_ij) = (S_ij^2 + S_ii S_jj) / (n - 1)``."""
    d = torch.diagonal(want)
    se = ((want**2 + d[:, None] * d[None, :]) / (n - 1)).sqrt()
    assert ((got - want).abs() <= 5 * se).all(), (got - want).abs() / se


def assert_mean_close(got: torch.Tensor, want: torch.Tensor, cov: torch.Tensor, n: int) -> None:
    se = (torch.diagonal(cov) / n).sqrt()
    assert ((got - want).abs() <= 5 * se).all()


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def perturb_(model: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_mean_matches_averaged_model():
    model = small_net()
    avg = AveragedModel(model)
    swag = SWAG(model, rank=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(7):
        perturb_(model, g)
        avg.update_parameters(model)
        swag.collect(model)
    assert swag.n == 7
    expected = flatten_parameters(avg.module).double()
    assert torch.allclose(swag.mean, expected, rtol=0, atol=1e-6)


def test_covers_all_parameters_including_batchnorm_affine():
    model = small_net()
    swag = SWAG(model)
    bn = model[1]
    assert swag.num_params == sum(p.numel() for p in model.parameters())
    assert swag.num_params == 4 * 3 * 9 + 4 + 2 * bn.num_features + 4 * 3 + 3


def test_moments_and_deviations_match_direct_computation():
    thetas = snapshot_vectors()
    swag = collected(5, thetas)
    mean, var, dev = reference_moments(thetas, 5)
    assert torch.allclose(swag.mean, mean, rtol=0, atol=1e-12)
    assert torch.allclose(swag.variance(), var, rtol=0, atol=1e-10)
    assert len(swag.deviations) == 5
    assert torch.allclose(torch.stack(swag.deviations).double(), dev, rtol=0, atol=1e-5)


def test_keeps_all_deviations_when_fewer_snapshots_than_rank():
    thetas = snapshot_vectors(6)
    swag = collected(20, thetas)
    _, _, dev = reference_moments(thetas, 20)
    assert len(swag.deviations) == 6
    assert torch.allclose(torch.stack(swag.deviations).double(), dev, rtol=0, atol=1e-5)


def test_low_rank_plus_diag_sample_covariance():
    rank, scale = 5, 0.5
    thetas = snapshot_vectors()
    swag = collected(rank, thetas)
    mean, var, dev = reference_moments(thetas, rank)
    k = dev.shape[0]
    want = scale * (torch.diag(var) + dev.t() @ dev / (k - 1))
    got_mean, got_cov = sample_cov(swag, scale)
    assert_mean_close(got_mean, mean, want, N_DRAWS)
    assert_cov_close(got_cov, want, N_DRAWS)


def test_diagonal_only_covariance():
    """Without a low-rank part the covariance is SWAG-Diagonal's: ``2 * scale * Sigma_diag``,
    i.e. ``Sigma_diag`` at the default scale 0.5, as Maddox et al.'s code samples SWAG-Diag at
    scale 1. Guards: ``scale * Sigma_diag`` (the halved variance rank < 2 used to get), and
    ``sqrt(scale)`` vs ``scale``."""
    scale = 0.3  # not 0.5, so that sqrt(2 scale) vs 2 scale matters
    thetas = snapshot_vectors()
    swag = collected(0, thetas)
    assert swag.deviations == []
    mean, var, _ = reference_moments(thetas, 0)
    want = 2 * scale * torch.diag(var)
    got_mean, got_cov = sample_cov(swag, scale, seed=2)
    assert_mean_close(got_mean, mean, want, N_DRAWS)
    assert_cov_close(got_cov, want, N_DRAWS)


def test_rank_one_is_diagonal_only():
    thetas = snapshot_vectors()
    rank0, rank1 = collected(0, thetas), collected(1, thetas)
    assert rank1.deviations == []
    for seed in range(3):
        a = rank0.sample_vector(0.5, torch.Generator().manual_seed(seed))
        assert torch.equal(a, rank1.sample_vector(0.5, torch.Generator().manual_seed(seed)))


def test_scale_zero_returns_exact_mean():
    swag = collected(5, snapshot_vectors())
    g = torch.Generator().manual_seed(0)
    out = swag.sample_vector(0.0, g)
    assert out.dtype == torch.float32
    assert torch.equal(out, swag.mean.float())


def test_variance_is_clamped_positive_for_constant_snapshots():
    model = nn.Linear(3, 2)
    swag = SWAG(model, rank=4)
    for _ in range(5):
        swag.collect(model)
    assert (swag.variance() >= 1e-30).all()
    out = swag.sample_vector(0.5, torch.Generator().manual_seed(0))
    assert torch.allclose(out, flatten_parameters(model), rtol=0, atol=1e-6)


def test_sample_before_collect_raises():
    with pytest.raises(RuntimeError, match="collect"):
        SWAG(nn.Linear(3, 2)).sample_vector()


def test_sample_into_channels_last_model_keeps_format_and_values():
    model = small_net().to(memory_format=torch.channels_last)
    conv = model[0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    swag = SWAG(model, rank=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        perturb_(model, g)
        swag.collect(model)

    swag.sample(model, 0.5, torch.Generator().manual_seed(7))
    expected = swag.sample_vector(0.5, torch.Generator().manual_seed(7))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(flatten_parameters(model), expected)

    # the same vector in an NCHW copy gives the same network
    ref = small_net()
    load_flat_parameters(ref, expected)
    assert torch.equal(ref[0].weight, conv.weight.contiguous())
    x = torch.randn(2, 3, 5, 5)
    model.eval()
    ref.eval()
    with torch.no_grad():
        out = model(x.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(out, ref(x), atol=1e-5)


def test_state_dict_roundtrip_gives_identical_samples():
    swag = collected(5, snapshot_vectors())
    buf = io.BytesIO()
    torch.save(swag.state_dict(), buf)
    buf.seek(0)
    restored = SWAG(nn.Linear(3, 2), rank=0)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    assert restored.rank == 5 and restored.n == N_SNAPSHOTS
    for seed in range(3):
        a = swag.sample_vector(0.5, torch.Generator().manual_seed(seed))
        b = restored.sample_vector(0.5, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)


def test_state_dict_roundtrip_diagonal_only():
    swag = collected(0, snapshot_vectors())
    restored = SWAG(nn.Linear(3, 2), rank=20)
    restored.load_state_dict(swag.state_dict())
    assert restored.deviations == [] and restored.rank == 0
    a = swag.sample_vector(1.0, torch.Generator().manual_seed(3))
    assert torch.equal(a, restored.sample_vector(1.0, torch.Generator().manual_seed(3)))


def test_load_state_dict_of_other_model_size_raises():
    swag = collected(5, snapshot_vectors())
    other = SWAG(nn.Linear(4, 2))
    with pytest.raises(ValueError, match="parameters"):
        other.load_state_dict(swag.state_dict())


def test_collect_from_other_model_size_raises():
    swag = SWAG(nn.Linear(3, 2))
    with pytest.raises(ValueError, match="parameters"):
        swag.collect(nn.Linear(4, 2))

"""Model registry and backbones (docs/METHODS.md, "Stage 1").

Parameter counts, feature shapes, memory layouts.
"""

from __future__ import annotations

import pytest
import torch

from longtail.core.errors import LongtailError
from longtail.models import available_models, build_model


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resnet32_params(num_classes: int, in_channels: int) -> int:
    """Hand count: 3x3 convs without bias, BN weight+bias, option-A (parameter-free) shortcuts."""
    stem = in_channels * 16 * 9 + 2 * 16
    stage1 = 5 * (2 * 16 * 16 * 9 + 2 * 2 * 16)
    stage2 = (16 * 32 * 9 + 32 * 32 * 9 + 2 * 2 * 32) + 4 * (2 * 32 * 32 * 9 + 2 * 2 * 32)
    stage3 = (32 * 64 * 9 + 64 * 64 * 9 + 2 * 2 * 64) + 4 * (2 * 64 * 64 * 9 + 2 * 2 * 64)
    return stem + stage1 + stage2 + stage3 + 64 * num_classes + num_classes


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_resnet32_parameter_count(in_channels, num_classes):
    model = build_model("resnet32", num_classes, in_channels)
    assert n_params(model) == resnet32_params(num_classes, in_channels)


def test_resnet32_exact_counts():
    assert n_params(build_model("resnet32", 10, 1)) == 463_866
    assert n_params(build_model("resnet32", 10, 3)) == 464_154


@pytest.mark.parametrize("shape", [(3, 3, 32, 32), (2, 1, 28, 28), (2, 1, 8, 8)])
def test_resnet32_features_are_64d(shape):
    torch.manual_seed(0)
    model = build_model("resnet32", 7, in_channels=shape[1]).eval()
    assert model.feature_dim == 64
    with torch.no_grad():
        x = torch.randn(shape)
        f = model.features(x)
        logits = model(x)
    assert f.shape == (shape[0], 64)
    assert logits.shape == (shape[0], 7)
    assert torch.allclose(logits, model.classifier(f), atol=1e-6)


def test_resnet32_features_vary_with_input():
    torch.manual_seed(0)
    model = build_model("resnet32", 10).eval()
    with torch.no_grad():
        f = model.features(torch.randn(2, 3, 32, 32))
    assert not torch.allclose(f[0], f[1])


def tv_counts(num_classes: int) -> dict[str, int]:
    """torchvision ImageNet totals with the 1000-way fc swapped for a ``num_classes`` head."""

    def head(d: int) -> int:
        return d * num_classes + num_classes

    fc1000 = 2048 * 1000 + 1000
    # ResNet-10 = BasicBlock x [1, 1, 1, 1]: stem conv+BN, 4 blocks (the last 3 with 1x1
    # downsample conv + BN), counted by hand.
    r10 = (3 * 64 * 49 + 128) + (2 * 64 * 64 * 9 + 256)
    for cin, c in ((64, 128), (128, 256), (256, 512)):
        r10 += cin * c * 9 + c * c * 9 + 4 * c + cin * c + 2 * c
    return {
        "resnet10": r10 + head(512),
        "resnet50": 25_557_032 - fc1000 + head(2048),
        "resnet152": 60_192_808 - fc1000 + head(2048),
        "resnext50_32x4d": 25_028_904 - fc1000 + head(2048),
    }


@pytest.mark.parametrize("name", ["resnet10", "resnet50", "resnet152", "resnext50_32x4d"])
def test_torchvision_backbone_parameter_counts(name):
    model = build_model(name, 10)
    assert n_params(model) == tv_counts(10)[name]
    assert model.feature_dim == (512 if name == "resnet10" else 2048)


def test_torchvision_one_input_channel_replaces_stem():
    model = build_model("resnet10", 10, in_channels=1)
    assert n_params(model) == tv_counts(10)["resnet10"] - 2 * 64 * 49
    with torch.no_grad():
        assert model.eval().features(torch.randn(2, 1, 64, 64)).shape == (2, 512)


@pytest.mark.parametrize(("name", "dim"), [("resnet10", 512), ("resnet50", 2048)])
def test_torchvision_features_and_forward(name, dim):
    torch.manual_seed(0)
    model = build_model(name, 5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        f = model.features(x)
        logits = model(x)
    assert f.shape == (2, dim)
    assert logits.shape == (2, 5)
    assert torch.allclose(logits, model.classifier(f), atol=1e-5)


def test_unknown_model_lists_known_names():
    with pytest.raises(LongtailError) as e:
        build_model("resnet18", 10)
    msg = str(e.value)
    assert "resnet18" in msg
    for name in ["resnet32", "resnet10", "resnet50", "resnet152", "resnext50_32x4d"]:
        assert name in msg
    assert set(available_models()) == {
        "resnet32",
        "resnet10",
        "resnet50",
        "resnet152",
        "resnext50_32x4d",
    }


def test_resnet32_rejects_weights_path():
    with pytest.raises(LongtailError, match="weights_path"):
        build_model("resnet32", 10, weights_path="some.pt")


@pytest.mark.parametrize(
    ("name", "shape"), [("resnet32", (4, 3, 32, 32)), ("resnet10", (2, 3, 64, 64))]
)
def test_channels_last_matches_nchw(name, shape):
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    x = torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        assert model.classifier.weight.is_contiguous()
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)

"""BatchNorm re-estimation weights each image equally, also with a short last batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.optim.swa_utils import update_bn

from longtail.data.datasets import load_fashion_mnist
from longtail.train.bn import refresh_bn

pytestmark = pytest.mark.fashion_mnist


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """67 Fashion-MNIST test images as float (67, 1, 28, 28) in [0, 1]."""
    return load_fashion_mnist(None, "test").images[:67].float() / 255


def test_statistics_are_weighted_by_batch_size(images):
    net = _net()
    sizes = (64, 3)  # a full batch and a short last one
    batches = [(b, None) for b in images.split(sizes)]
    refresh_bn(net, batches)
    with torch.no_grad():
        z = [net[0](b) for b, _ in batches]
    mean = torch.cat(z).mean((0, 2, 3))
    var = sum(n * v.var((0, 2, 3), unbiased=True) for n, v in zip(sizes, z, strict=True)) / 67
    bn = net[1]
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 2
    assert bn.momentum == 0.1 and not net.training
    # torch's update_bn weights the 3-image batch like the 64-image one: a different answer
    other = _net()
    update_bn(batches, other)
    assert (other[1].running_mean - mean).abs().max() > 1e-3


def test_one_pass_equals_the_statistics_of_all_images_at_once(images):
    split, whole = _net(), _net()
    refresh_bn(split, [(b, None) for b in images.split(16)])  # 16, 16, 16, 16, 3
    refresh_bn(whole, [(images, None)])
    torch.testing.assert_close(split[1].running_mean, whole[1].running_mean, rtol=1e-5, atol=1e-6)

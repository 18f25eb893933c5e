"""``longtail demo`` / ``sweep`` end to end, the user-error paths of the CLI, Ctrl-C, --weights.

Every run here uses the tiny digits-LT overrides of test_cli.py (2 epochs, CPU, fp32).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from longtail.models import build_model
from test_cli import assert_one_line_error, run_main


# ------------------------------------------------------------------ --weights
def test_weights_file_is_loaded_into_the_backbone(tmp_path):
    """Guards: ``weights_path`` read but not loaded (a randomly initialised backbone)."""
    from torchvision.models import resnet as tvr

    torch.manual_seed(1)
    net = tvr.ResNet(tvr.BasicBlock, [1, 1, 1, 1])
    w = tmp_path / "r10.pth"
    torch.save(net.state_dict(), w)
    model = build_model("resnet10", 4, 3, str(w))
    for key, value in net.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.body.state_dict()[key], value), key
    assert model.classifier.out_features == 4
    fresh = build_model("resnet10", 4, 3)
    assert not torch.equal(fresh.body.conv1.weight, net.conv1.weight)


def test_unusable_weights_files_are_one_line_errors(tmp_path, capsys):
    """``fit --weights`` with a text file, a state dict of something else, and a ResNet-18
    (which longtail has no backbone for). Guards: a traceback from torch.load, or a ResNet-18
    silently treated as a ResNet-10."""
    from torchvision.models import resnet as tvr

    tree = tmp_path / "imgs"
    rng = np.random.RandomState(0)
    for c in ("cat", "dog"):
        (tree / c).mkdir(parents=True)
        for j in range(6):
            Image.fromarray(rng.randint(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                tree / c / f"{j}.png"
            )
    text = tmp_path / "notes.pth"
    text.write_text("not weights\n")
    other = tmp_path / "other.pth"
    torch.save({"linear.weight": torch.zeros(2, 2)}, other)
    r18 = tmp_path / "r18.pth"
    torch.save(tvr.resnet18().state_dict(), r18)
    expect = {
        text: "not a readable state dict",
        other: "expected a torchvision ResNet state dict",
        r18: "2 blocks in layer3",
    }
    for i, (path, message) in enumerate(expect.items()):
        argv = ["fit", str(tree), "--out", str(tmp_path / f"out{i}"), "--weights", str(path)]
        line = assert_one_line_error(*run_main(argv, capsys))
        assert message in line and str(path) in line

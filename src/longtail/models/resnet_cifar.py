"""ResNet-32 for small images (He et al. 2016, CIFAR variant as in LDAM-DRW).

BasicBlock x [5, 5, 5] with widths 16 / 32 / 64, parameter-free "option A" shortcuts (stride-2
subsampling and zero channel padding), 64-d features after global average pooling. Every
BatchNorm is followed by a ReLU (after the residual add in a block's second half), which
:func:`~longtail.models.fused_bn.bn_relu` can compute in one fused CPU kernel; the blocks' 3x3
convolutions (16, 32, 64 channels) can go through :func:`~longtail.models.conv3x3.conv3x3`'s bf16
CPU kernel. The ``kernels`` switch (``auto`` | ``on`` | ``off``) says when.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.core.errors import LongtailError
from longtail.models.autotune import MODES
from longtail.models.conv3x3 import conv3x3, conv3x3_fork
from longtail.models.fused_bn import bn_relu

KERNELS = ("fused_bn", "conv3x3")  # the C kernels a CifarResNet can use


def exporting() -> bool:
    """Whether the model is being exported rather than run: TorchScript (``torch.jit.script`` /
    ``trace``) or ``torch.export`` (which ``torch.onnx.export(..., dynamo=True)`` uses).

    Exported graphs take the plain-PyTorch branch, so they hold only standard ATen ops: no
    ctypes kernel call (``fused_bn``, ``conv3x3``) and no custom autograd function. Callers
    test ``torch.jit.is_scripting() or exporting()``: TorchScript skips compiling the other
    branch only when it sees ``is_scripting()`` itself. ``torch.compile`` (``compile=true``
    training) keeps the training path; the kernels step aside by themselves there.
    """
    if torch.jit.is_scripting():  # TorchScript compiles this branch only
        return True
    return torch.jit.is_tracing() or torch.compiler.is_exporting()


class _SubsamplePad(torch.autograd.Function):
    """``x[:, :, ::2, ::2]`` zero-padded by ``pad`` channels on each side.

    Autograd's own backward of the strided slice returns an NCHW gradient whatever ``x``'s
    layout, and adding it to a channels-last gradient is ~20x slower than a same-layout add;
    this backward keeps ``x``'s memory format.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, pad: int) -> torch.Tensor:
        ctx.shape, ctx.pad = x.shape, pad
        cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        ctx.memory_format = torch.channels_last if cl else torch.contiguous_format
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        gx = torch.empty(
            ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.memory_format
        ).zero_()
        gx[:, :, ::2, ::2] = grad[:, ctx.pad : ctx.pad + ctx.shape[1]]
        return gx, None


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially by 2 and zero-pad the channels."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or exporting():  # plain ops only
            return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return _SubsamplePad.apply(x, self.pad)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = _PadShortcut(planes - in_planes)
        self.kernels = {k: "auto" for k in KERNELS}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or exporting():  # plain ops only
            out = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))
        if isinstance(self.shortcut, nn.Identity):  # x feeds conv1 and the shortcut
            out, residual = conv3x3_fork(self.conv1, x, self.kernels["conv3x3"])
        else:
            out, residual = conv3x3(self.conv1, x, self.kernels["conv3x3"]), self.shortcut(x)
        out = bn_relu(self.bn1, out, kernels=self.kernels["fused_bn"])
        out = conv3x3(self.conv2, out, self.kernels["conv3x3"])
        return bn_relu(self.bn2, out, residual, kernels=self.kernels["fused_bn"])


class CifarResNet(nn.Module):
    """CIFAR-style ResNet; ``features(x)``: ``(B, C_in, H, W)`` -> ``(B, 64)``.

    ``kernels``: when the C kernels (``fused_bn``: BatchNorm + ReLU in training, ``conv3x3``: bf16
    3x3 convolutions) replace PyTorch's ops where they apply: ``"auto"`` (default) where timed
    faster on this machine (``models/autotune.py``), ``"on"`` always, ``"off"`` never; settable
    later, for all (``model.kernels = "off"``) or per kernel (``{"conv3x3": "off", ...}``).
    """

    __jit_unused_properties__ = ["kernels"]  # noqa: RUF012 - TorchScript's hook

    def __init__(
        self,
        num_blocks: tuple[int, int, int] = (5, 5, 5),
        num_classes: int = 10,
        in_channels: int = 3,
        kernels: str | dict[str, str] = "auto",
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, in_planes = [], 16
        for i, (planes, n) in enumerate(zip((16, 32, 64), num_blocks, strict=True)):
            for j in range(n):
                layers.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.feature_dim = 64
        self.classifier = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)
        self.kernels = kernels

    @property
    def kernels(self) -> str | dict[str, str]:
        """The kernel switch: one mode for all kernels, else ``{kernel: mode}``."""
        modes = set(self._kernels.values())
        return modes.pop() if len(modes) == 1 else dict(self._kernels)

    @kernels.setter
    def kernels(self, value: str | dict[str, str]) -> None:
        table = dict.fromkeys(KERNELS, value) if isinstance(value, str) else dict(value)
        for name, mode in table.items():
            if name not in KERNELS or mode not in MODES:
                raise LongtailError(
                    f"kernels: {name}={mode!r}; kernels are {', '.join(KERNELS)}, "
                    f"modes {', '.join(MODES)}"
                )
        self._kernels = {k: table.get(k, "auto") for k in KERNELS}
        for m in self.modules():
            if isinstance(m, BasicBlock):
                m.kernels = dict(self._kernels)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, 64)`` of images ``(B, C_in, H, W)``."""
        if torch.jit.is_scripting() or exporting():  # plain ops only
            out = F.relu(self.bn1(self.conv1(x)))
        else:
            out = bn_relu(self.bn1, self.conv1(x), kernels=self._kernels["fused_bn"])
        out = self.layers(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.classifier(self.features(x))


def resnet32(
    num_classes: int = 10, in_channels: int = 3, kernels: str | dict[str, str] = "auto"
) -> CifarResNet:
    """ResNet-32 (0.46 M parameters); ``kernels`` as :class:`CifarResNet`'s."""
    return CifarResNet((5, 5, 5), num_classes, in_channels, kernels)

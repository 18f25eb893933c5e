"""ResNet-32 for small images (He et al. 2016, CIFAR variant as in LDAM-DRW).

BasicBlock x [5, 5, 5] with widths 16 / 32 / 64, parameter-free "option A" shortcuts (stride-2
subsampling and zero channel padding), 64-d features after global average pooling. Every
BatchNorm is followed by a ReLU (after the residual add in a block's second half), which
:func:`~longtail.models.fused_bn.bn_relu` computes in one fused CPU kernel when ``fused_bn`` is on;
the blocks' 3x3 convolutions (16, 32, 64 channels) go through
:func:`~longtail.models.conv3x3.conv3x3`'s bf16 CPU kernel when ``fast_conv`` is on.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from longtail.models.conv3x3 import conv3x3, conv3x3_fork
from longtail.models.fused_bn import bn_relu


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
        self.fused_bn = True
        self.fast_conv = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting() or exporting():  # plain ops only
            out = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))
        if isinstance(self.shortcut, nn.Identity):  # x feeds conv1 and the shortcut
            out, residual = conv3x3_fork(self.conv1, x, self.fast_conv)
        else:
            out, residual = conv3x3(self.conv1, x, self.fast_conv), self.shortcut(x)
        out = bn_relu(self.bn1, out, fused=self.fused_bn)
        out = conv3x3(self.conv2, out, self.fast_conv)
        return bn_relu(self.bn2, out, residual, fused=self.fused_bn)


class CifarResNet(nn.Module):
    """CIFAR-style ResNet; ``features(x)``: ``(B, C_in, H, W)`` -> ``(B, 64)``.

    ``fused_bn``: compute BatchNorm + ReLU with the fused CPU kernel where it applies (training on
    CPU, channels-last); ``fast_conv``: run 3x3 convolutions through longtail's bf16 CPU kernel
    where it applies (CPU bf16 autocast, channels-last, AVX512-BF16). Both settable later, e.g.
    ``model.fused_bn = False``.
    """

    __jit_unused_properties__ = ["fused_bn", "fast_conv"]  # noqa: RUF012 - TorchScript's hook

    def __init__(
        self,
        num_blocks: tuple[int, int, int] = (5, 5, 5),
        num_classes: int = 10,
        in_channels: int = 3,
        fused_bn: bool = True,
        fast_conv: bool = True,
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
        self.fused_bn = fused_bn
        self.fast_conv = fast_conv

    @property
    def fused_bn(self) -> bool:
        """Whether BatchNorm + ReLU may use the fused CPU kernel (``models/fused_bn.py``)."""
        return self._fused_bn

    @fused_bn.setter
    def fused_bn(self, on: bool) -> None:
        self._switch("fused_bn", on)

    @property
    def fast_conv(self) -> bool:
        """Whether 3x3 convolutions may use the bf16 CPU kernel (``models/conv3x3.py``)."""
        return self._fast_conv

    @fast_conv.setter
    def fast_conv(self, on: bool) -> None:
        self._switch("fast_conv", on)

    def _switch(self, name: str, on: bool) -> None:
        """Set a kernel switch here (``_<name>``, for the stem) and on every block."""
        setattr(self, f"_{name}", bool(on))
        for m in self.modules():
            if isinstance(m, BasicBlock):
                setattr(m, name, bool(on))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, 64)`` of images ``(B, C_in, H, W)``."""
        if torch.jit.is_scripting() or exporting():  # plain ops only
            out = F.relu(self.bn1(self.conv1(x)))
        else:
            out = bn_relu(self.bn1, self.conv1(x), fused=self._fused_bn)
        out = self.layers(out)
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)``."""
        return self.classifier(self.features(x))


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 (0.46 M parameters)."""
    return CifarResNet((5, 5, 5), num_classes, in_channels)

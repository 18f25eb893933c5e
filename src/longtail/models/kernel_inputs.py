"""Input checks shared by the C kernels' custom ops: a clear error instead of a bad pointer."""

from __future__ import annotations

import torch

from longtail.core.errors import KernelInputError

CL = torch.channels_last


def check(
    op: str,
    name: str,
    t: torch.Tensor,
    dtypes: tuple[torch.dtype, ...],
    dim: int | None = None,
    channels_last: bool = False,
    shape: tuple[int, ...] | None = None,
) -> None:
    """Raise :class:`KernelInputError` unless ``t`` is a CPU tensor the kernel can read.

    ``dtypes``: accepted dtypes; ``dim``: number of dims; ``channels_last``: a 4-d tensor
    contiguous in channels-last order (else plainly contiguous); ``shape``: exact shape.
    """
    where = f"{op}: {name}"
    if t.device.type != "cpu":
        raise KernelInputError(f"{where} is on {t.device}; the C kernels run on CPU tensors only")
    if t.dtype not in dtypes:
        ok = ", ".join(str(d) for d in dtypes)
        raise KernelInputError(f"{where} has dtype {t.dtype}; pass {ok} (e.g. {name}.to({ok}))")
    if dim is not None and t.dim() != dim:
        raise KernelInputError(f"{where} has shape {tuple(t.shape)}; expected {dim} dims")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise KernelInputError(f"{where} has shape {tuple(t.shape)}; expected {tuple(shape)}")
    if channels_last and not t.is_contiguous(memory_format=CL):
        raise KernelInputError(
            f"{where} is not channels-last contiguous (strides {t.stride()}); pass "
            f"{name}.contiguous(memory_format=torch.channels_last)"
        )
    if not channels_last and not t.is_contiguous():
        raise KernelInputError(
            f"{where} is not contiguous (strides {t.stride()}); pass {name}.contiguous()"
        )


def check_channels(op: str, c: int) -> None:
    """The kernels process channels in blocks of 16."""
    if c % 16:
        raise KernelInputError(f"{op}: {c} channels; the kernel needs a multiple of 16")

"""Distributed-training helpers on top of ``torch.distributed`` (torchrun, DDP).

PyTorch's ``nn.SyncBatchNorm`` only runs on GPUs; :class:`AllReduceBatchNorm2d` is the CPU/gloo
equivalent (batch statistics all-reduced with autograd-aware collectives), used automatically
when ``sync_bn=true`` on CPU. On GPUs ``nn.SyncBatchNorm`` is used.
"""

from __future__ import annotations

import gc
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.nn.functional import all_reduce as _all_reduce

_BN_GROUP = None


def _bn_group():
    """A process group of its own for BatchNorm statistics, so that their collectives never
    interleave with DDP's asynchronous gradient all-reduces on the default group."""
    global _BN_GROUP
    if _BN_GROUP is None:
        _BN_GROUP = dist.new_group(backend="gloo")
    return _BN_GROUP


def differentiable_all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks with a gradient (the backward pass all-reduces the incoming gradient)."""
    with warnings.catch_warnings():  # deprecated in favour of a private API; still supported
        warnings.simplefilter("ignore", FutureWarning)
        return _all_reduce(t, group=_bn_group())


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the current process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch across all ranks.

    Mean and (biased) variance are computed in two all-reduced passes, so the result equals
    single-process BatchNorm on the concatenated batch; gradients flow through the collectives.
    Running statistics use the unbiased global variance, as ``nn.BatchNorm2d`` does.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, C, H, W)`` -> normalised ``(B, C, H, W)``."""
        _, ws = world()
        if not self.training or ws == 1:
            return super().forward(x)
        xf = x.float()
        f64 = torch.float64  # sums accumulate in double: statistics as exact as cuDNN's
        count = torch.tensor([xf.numel() / xf.shape[1]], dtype=f64)
        total = differentiable_all_reduce(torch.cat([xf.sum((0, 2, 3), dtype=f64), count]))
        n = total[-1]
        mean = (total[:-1] / n).float()
        centred = xf - mean.view(1, -1, 1, 1)
        var = (differentiable_all_reduce((centred * centred).sum((0, 2, 3), dtype=f64)) / n).float()
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * float(n / (n - 1))
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(x.dtype)


def convert_sync_bn(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace BatchNorm2d layers with synchronised ones (``nn.SyncBatchNorm`` on GPU)."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = AllReduceBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine,
                child.track_running_stats,
            )  # fmt: skip
            new.load_state_dict(child.state_dict())
            new.to(child.weight.device if child.affine else device)
            setattr(model, name, new)
        else:
            convert_sync_bn(child, device)
    return model


def average_bn_buffers(model: nn.Module) -> None:
    """Average BatchNorm running statistics over ranks (after a sharded BN re-estimation)."""
    _, ws = world()
    if ws == 1:
        return
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            for buf in (m.running_mean, m.running_var):
                dist.all_reduce(buf)
                buf.div_(ws)


def gather_rows(local: torch.Tensor, total: int) -> torch.Tensor:
    """Reassemble a tensor sharded as ``full[rank::world]`` (rows) on every rank.

    ``local``: ``(ceil(total / W) or fewer, ...)`` rows of this rank; returns ``(total, ...)``.
    """
    rank, ws = world()
    if ws == 1:
        return local
    per = -(-total // ws)
    pad = torch.zeros((per - local.shape[0], *local.shape[1:]), dtype=local.dtype)
    mine = torch.cat([local, pad]) if pad.shape[0] else local
    parts = [torch.empty_like(mine) for _ in range(ws)]
    dist.all_gather(parts, mine.contiguous())
    full = torch.stack(parts, dim=1).reshape(per * ws, *local.shape[1:])  # row k*W + r
    return full[:total]


def shutdown_distributed() -> None:
    """Destroy every process group now, while the interpreter is fully alive (no-op without one).

    Why: a gloo process group that outlives ``destroy_process_group`` (because DDP, or this
    module's BatchNorm group, still holds it) keeps its worker threads until interpreter
    shutdown. A worker that then frees a finished collective's tensors must take the GIL to drop
    their Python objects; during finalization that ends the thread inside a ``noexcept`` frame and
    the process dies with SIGABRT, "terminate called without an active exception" (core dumps:
    ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllgatherWork`` -> ``decref`` -> ``take_gil`` ->
    ``PyThread_exit_thread`` while the main thread is in ``Py_FinalizeEx``; upstream:
    pytorch/pytorch#190489, reproduction in docs/DISTRIBUTED.md). Dropping every reference to the
    groups first lets ``destroy_process_group`` free them and join their threads here.
    """
    global _BN_GROUP
    if not (dist.is_available() and dist.is_initialized()):
        return
    _BN_GROUP = None
    gc.collect()  # DDP wrappers caught in reference cycles still hold the default group
    dist.destroy_process_group()
    gc.collect()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world()[1] > 1:
        dist.barrier()

"""SWAG: a Gaussian posterior over network weights from SGD snapshots (Maddox et al. 2019).

Over snapshots ``theta_1..theta_n`` keep the running ``mean``, the running second moment
``sq_mean`` and the last ``K`` deviations ``D = [theta_i - mean_i]`` (mean already updated).
A sample is ``mean + sqrt(scale) * (sqrt(clamp(sq_mean - mean^2, 1e-30)) * z1 + D^T z2 /
sqrt(K' - 1))`` with ``z1 ~ N(0, I_d)``, ``z2 ~ N(0, I_K')`` and ``K'`` the deviations held.
Its covariance is ``scale * (diag + D^T D / (K' - 1))``: ``scale = 0.5`` for low rank + diagonal.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def flatten_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters as one ``(d,)`` vector (works for channels-last weights)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@torch.no_grad()
def load_flat_parameters(model: nn.Module, vec: torch.Tensor) -> None:
    """Copy a ``(d,)`` vector into ``model``'s parameters, keeping their memory formats."""
    i = 0
    for p in model.parameters():
        n = p.numel()
        p.copy_(vec[i : i + n].view(p.shape))
        i += n


class SWAG:
    """Diagonal + rank-K posterior over all learnable parameters of a model.

    Args:
        model: the network whose ``parameters()`` (BN affine included) are tracked; ``d`` = their
            total number.
        rank: ``K``, the number of deviation columns kept (0 or 1: diagonal only).
    """

    def __init__(self, model: nn.Module, rank: int = 20):
        d = sum(p.numel() for p in model.parameters())
        self.rank = int(rank)
        self.n = 0
        self.mean = torch.zeros(d, dtype=torch.float64)
        self.sq_mean = torch.zeros(d, dtype=torch.float64)
        self.deviations: list[torch.Tensor] = []  # each (d,) float32

    @property
    def num_params(self) -> int:
        return self.mean.numel()

    def collect(self, model: nn.Module) -> None:
        """Add a snapshot of ``model``'s parameters to the running moments."""
        w = flatten_parameters(model).double().cpu()
        if w.numel() != self.num_params:
            raise ValueError(f"model has {w.numel()} parameters, SWAG tracks {self.num_params}")
        # in place: d is 58M for ResNet-152, where each float64 temporary is 0.5 GB
        self.n += 1
        self.mean.lerp_(w, 1.0 / self.n)  # mean += (w - mean) / n
        self.sq_mean.lerp_(w.square(), 1.0 / self.n)
        if self.rank >= 2:
            self.deviations.append(w.sub_(self.mean).float())
            if len(self.deviations) > self.rank:
                self.deviations.pop(0)

    def variance(self) -> torch.Tensor:
        """Diagonal variance ``(d,)``, clamped at 1e-30."""
        var = self.mean.square()
        return torch.sub(self.sq_mean, var, out=var).clamp_min_(1e-30)

    def sample_vector(
        self, scale: float = 0.5, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One weight vector ``(d,)`` float32 drawn from the posterior; ``scale=0``: the mean.

        ``scale`` multiplies Maddox et al.'s covariance ``(Sigma_diag + D D^T / (K - 1)) / 2``
        (their code: ``mean + sqrt(scale) * (sigma * z1 + D z2 / sqrt(K - 1))``, scale 0.5 for
        SWAG). With fewer than two deviation columns (``rank`` < 2, or a single snapshot) there is
        no low-rank part and the covariance is ``Sigma_diag`` alone (their SWAG-Diagonal, scale
        1): the diagonal noise is then ``sqrt(2 * scale) * sigma * z1``, so the default 0.5 keeps
        the variance SWAG gives each weight instead of halving it.
        """
        if self.n == 0:
            raise RuntimeError("SWAG has no snapshots: collect() was never called")
        if scale == 0:
            return self.mean.float()
        z1 = torch.randn(self.num_params, generator=generator, dtype=torch.float64)
        noise = self.variance().sqrt_().mul_(z1)
        del z1
        k = len(self.deviations)
        if k < 2:
            return noise.mul_((2 * scale) ** 0.5).add_(self.mean).float()
        z2 = torch.randn(k, generator=generator, dtype=torch.float64)
        # D^T z2 without a (K, d) float64 copy
        for z, dev in zip(z2.tolist(), self.deviations, strict=True):
            noise.add_(dev, alpha=z / (k - 1) ** 0.5)
        return noise.mul_(scale**0.5).add_(self.mean).float()

    def sample(
        self, model: nn.Module, scale: float = 0.5, generator: torch.Generator | None = None
    ) -> nn.Module:
        """Write a posterior sample into ``model``'s parameters in place and return it.

        BatchNorm running statistics are left as they are: refresh them with
        :func:`longtail.train.bn.refresh_bn` before using the sampled model.
        """
        p0 = next(model.parameters())
        vec = self.sample_vector(scale, generator).to(p0.device, p0.dtype)
        load_flat_parameters(model, vec)
        return model

    def state_dict(self) -> dict:
        """Tensors and counters to save with the checkpoint."""
        return {
            "n": self.n,
            "rank": self.rank,
            "mean": self.mean,
            "sq_mean": self.sq_mean,
            "deviations": torch.stack(self.deviations) if self.deviations else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        if state["mean"].numel() != self.num_params:
            raise ValueError(
                f"SWAG state has {state['mean'].numel()} parameters, model has {self.num_params}"
            )
        self.n, self.rank = int(state["n"]), int(state["rank"])
        self.mean, self.sq_mean = state["mean"].double(), state["sq_mean"].double()
        dev = state["deviations"]
        self.deviations = list(dev.float().unbind(0)) if dev is not None else []

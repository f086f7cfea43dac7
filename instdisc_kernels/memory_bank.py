"""``MemoryBank``: the N x D bank of InstDisc as an nn.Module buffer."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _validate, hugepages
from .ops.bank_update import bank_update_


def uniform_init(num_samples: int, dim: int, *, generator=None, dtype=torch.float32, device=None):
    """lemniscate's bank init: uniform(-s, s) with s = 1/sqrt(D/3) (drawn in float32), rows not normalised."""
    stdv = 1.0 / math.sqrt(dim / 3)
    mem = torch.rand(num_samples, dim, generator=generator, dtype=torch.float32, device=device)
    return (mem * (2 * stdv) - stdv).to(dtype)


class MemoryBank(nn.Module):
    """One feature per training image, a momentum average (docs/method.md#noise-contrastive-estimation-nce).

    init: "uniform" (lemniscate: U(-s, s), s = 1/sqrt(D/3), rows not normalised),
    "normal" (Gaussian rows, L2-normalised) or "zeros".
    A CPU bank of 8 MiB or more lives on 2 MiB pages where the OS allows it
    (instdisc_kernels/hugepages.py): fewer TLB misses for the kernels' random row reads.
    """

    def __init__(self, num_samples: int, dim: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, momentum: float = 0.5, init: str = "uniform",
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        _validate.check_positive_int(num_samples, "num_samples")
        _validate.check_positive_int(dim, "dim")
        _validate.check_momentum(momentum)
        if dtype not in _validate.FLOAT_DTYPES:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        if init == "uniform":
            mem = uniform_init(num_samples, dim, generator=generator, dtype=dtype, device=device)
        elif init == "normal":
            mem = torch.randn(num_samples, dim, generator=generator, device=device)
            mem = (mem / mem.norm(dim=1, keepdim=True)).to(dtype)
        elif init == "zeros":
            mem = torch.zeros(num_samples, dim, dtype=dtype, device=device)
        else:
            raise ValueError(f"init must be 'uniform', 'normal' or 'zeros', got {init!r}")
        self.momentum = float(momentum)
        self.register_buffer("memory", hugepages.empty_rows(num_samples, dim, dtype=dtype, device=mem.device).copy_(mem))

    @property
    def num_samples(self) -> int:
        return self.memory.shape[0]

    @property
    def dim(self) -> int:
        return self.memory.shape[1]

    def update(self, indices: torch.Tensor, features: torch.Tensor, *, backend: str = "auto",
               validate: bool = True) -> None:
        """V[y] <- normalize(m V[y] + (1-m) F); last occurrence wins on repeats."""
        bank_update_(self.memory, indices, features, self.momentum, backend=backend, validate=validate)

    def extra_repr(self):
        return f"num_samples={self.num_samples}, dim={self.dim}, dtype={self.memory.dtype}, momentum={self.momentum}"

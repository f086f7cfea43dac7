"""``InstDiscLoss``: an nn.Module owning the memory bank and Z."""
from __future__ import annotations

import torch
from torch import nn

from . import _validate
from .memory_bank import MemoryBank
from .ops.nce import nce_loss
from .ops.softmax import nonparametric_softmax_loss


class InstDiscLoss(nn.Module):
    """InstDisc loss with its memory bank.

    ``forward(features, indices) -> loss`` computes the loss against the old
    bank rows, then updates the bank (fused, in the same call).
    num_negatives=0 selects the exact non-parametric softmax (SPEC 1.2).
    z: "first-batch" (lemniscate), "ema" (moving average, factor z_ema) or a float.
    negatives: "per-sample" (K per row) or "shared" (one set of K for the batch, ops/nce_shared.py).
    """

    def __init__(self, num_samples, dim=128, *, num_negatives=4096, temperature=0.07, momentum=0.5,
                 z="first-batch", z_ema=0.99, proximal=0.0, bank_dtype=torch.float32, loss_type="nce",
                 backend="auto", device=None, generator=None, negatives="per-sample"):
        super().__init__()
        if negatives not in ("per-sample", "shared"):
            raise ValueError(f"negatives must be 'per-sample' or 'shared', got {negatives!r}")
        z_init = _validate.check_loss_config(
            num_samples=num_samples, dim=dim, num_negatives=num_negatives, temperature=temperature,
            momentum=momentum, z=z, z_ema=z_ema, proximal=proximal, loss_type=loss_type, backend=backend,
            bank_dtype=bank_dtype)
        self.bank = MemoryBank(num_samples, dim, dtype=bank_dtype, device=device, momentum=momentum,
                               generator=generator)
        self.register_buffer("z", torch.tensor([z_init], dtype=torch.float32, device=device))
        self.num_negatives = num_negatives
        self.temperature = float(temperature)
        self.z_mode = z if isinstance(z, str) else "fixed"
        self.z_ema = float(z_ema)
        self.proximal = float(proximal)
        self.loss_type = loss_type
        self.backend = backend
        self.generator = generator
        self.negatives = negatives

    def _apply(self, fn, recurse=True):
        # .half()/.double()/.to(dtype) would cast the Z state too: it stays float32 (moved, not cast)
        z = self._buffers.pop("z")
        try:
            super()._apply(fn, recurse)
            moved = fn(z)
        finally:
            self._buffers["z"] = z
        self._buffers["z"] = moved if moved.dtype == torch.float32 else z.to(moved.device, torch.float32)
        return self

    @property
    def memory(self):
        return self.bank.memory

    def forward(self, features, indices):
        if self.num_negatives == 0:
            return nonparametric_softmax_loss(features, self.bank.memory, indices, temperature=self.temperature,
                                              momentum=self.bank.momentum, backend=self.backend)
        return nce_loss(features, self.bank.memory, indices, num_negatives=self.num_negatives,
                        temperature=self.temperature, z=self.z, momentum=self.bank.momentum,
                        proximal=self.proximal, generator=self.generator, loss_type=self.loss_type,
                        z_ema=self.z_ema if self.z_mode == "ema" else None, backend=self.backend,
                        negatives=self.negatives)

    def extra_repr(self):
        k = "exact softmax" if self.num_negatives == 0 else f"num_negatives={self.num_negatives}"
        return f"{k}, temperature={self.temperature}, z={self.z_mode}, loss_type={self.loss_type}"

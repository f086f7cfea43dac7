"""``InstDiscLoss``: an nn.Module owning the memory bank and Z."""
from __future__ import annotations

import torch
from torch import nn

from . import _backend, _validate
from .memory_bank import MemoryBank
from .ops.nce import nce_loss
from .ops import z_policy
from .ops.softmax import nonparametric_softmax_loss


class InstDiscLoss(nn.Module):
    """InstDisc loss with its memory bank.

    ``forward(features, indices) -> loss`` computes the loss against the old
    bank rows, then updates the bank (fused, in the same call).
    num_negatives=0 selects the exact non-parametric softmax (SPEC 1.2).
    z: the NCE normaliser policy (ops/z_policy.py): "batch" (default: re-estimated from
    every batch), "first-batch" (lemniscate), "ema" / "ema-bc" (moving average, factor
    z_ema; "ema-bc" bias-corrected), "exact" (the exact partition function, refreshed
    every z_every steps) or a positive float (fixed).
    negatives: "per-sample" (K per row) or "shared" (one set of K for the batch, ops/nce_shared.py).
    """

    def __init__(self, num_samples: int, dim: int = 128, *, num_negatives: int = 4096, temperature: float = 0.07,
                 momentum: float = 0.5, z: str | float = z_policy.DEFAULT_POLICY, z_ema: float = 0.99,
                 z_every: int = z_policy.DEFAULT_EVERY, proximal: float = 0.0, bank_dtype: torch.dtype = torch.float32,
                 loss_type: str = "nce", backend: str = "auto", device: torch.device | str | None = None,
                 generator: torch.Generator | None = None, negatives: str = "per-sample") -> None:
        super().__init__()
        if negatives not in ("per-sample", "shared"):
            raise ValueError(f"negatives must be 'per-sample' or 'shared', got {negatives!r}")
        backend = _backend.canonical(backend)   # "reference" -> "eager" (DeprecationWarning)
        _validate.check_loss_config(     # z: checked (with z_every) by the policy module
            num_samples=num_samples, dim=dim, num_negatives=num_negatives, temperature=temperature,
            momentum=momentum, z="first-batch" if isinstance(z, str) else z, z_ema=z_ema, proximal=proximal,
            loss_type=loss_type, backend=backend, bank_dtype=bank_dtype)
        z_init = z_policy.check_policy(z, z_ema, z_every)
        self.bank = MemoryBank(num_samples, dim, dtype=bank_dtype, device=device, momentum=momentum,
                               generator=generator)
        self.register_buffer("z", torch.tensor([z_init], dtype=torch.float32, device=device))
        self.register_buffer("z_step", torch.zeros((), dtype=torch.int64, device=device))  # NCE steps taken
        self.num_negatives = num_negatives
        self.temperature = float(temperature)
        self.z_mode = z if isinstance(z, str) else "fixed"
        self.z_ema = float(z_ema)
        self.z_every = z_every
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
    def memory(self) -> torch.Tensor:
        return self.bank.memory

    def forward(self, features: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        if self.num_negatives == 0:
            return nonparametric_softmax_loss(features, self.bank.memory, indices, temperature=self.temperature,
                                              momentum=self.bank.momentum, backend=self.backend)
        if self.loss_type == "infonce":       # InfoNCE does not use Z
            z_in, z_ema = self.z, None
        else:
            if self.z_mode == "exact":        # shapes first: the refresh reads the bank
                _validate.check_features_memory_indices(features, self.bank.memory, indices, values=False)
            step = int(self.z_step) if self.z_mode in z_policy.STEP_POLICIES else 0   # no sync otherwise
            z_in, z_ema = z_policy.prepare(self.z_mode, self.z, step, features, self.bank.memory,
                                           self.temperature, z_ema=self.z_ema, z_every=self.z_every)
        loss = nce_loss(features, self.bank.memory, indices, num_negatives=self.num_negatives,
                        temperature=self.temperature, z=z_in, momentum=self.bank.momentum,
                        proximal=self.proximal, generator=self.generator, loss_type=self.loss_type,
                        z_ema=z_ema, backend=self.backend, negatives=self.negatives)
        if z_in is not self.z:                # the call succeeded: keep the Z it used
            # state created under torch.inference_mode() is written like the bank (ops/nce.py)
            inference = not _validate._tracing() and self.z.is_inference()
            with torch.inference_mode() if inference else torch.no_grad():
                self.z.copy_(z_in)
                self.z_step.add_(1)
        return loss

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before z_step existed: count from 0
        state_dict.setdefault(prefix + "z_step", torch.zeros((), dtype=torch.int64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        k = "exact softmax" if self.num_negatives == 0 else f"num_negatives={self.num_negatives}"
        z = f"{self.z_mode} every {self.z_every}" if self.z_mode == "exact" else self.z_mode
        return f"{k}, temperature={self.temperature}, z={z}, loss_type={self.loss_type}"

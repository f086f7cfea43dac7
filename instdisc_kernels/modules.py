"""``InstDiscLoss``: an nn.Module owning the memory bank and Z."""
from __future__ import annotations

import torch
from torch import nn

from . import _backend, _validate
from .memory_bank import MemoryBank
from .ops import z_policy
from .ops.nce import nce_loss
from .ops.softmax import nonparametric_softmax_loss

LOSS_TYPES = ("nce", "infonce", "softmax")
DEFAULT_NUM_NEGATIVES = 4096
DEFAULT_Z_EMA = 0.99
EMA_POLICIES = ("ema", "ema-bc")


def _loss_kind(loss_type, num_negatives):
    """(loss_type, K): loss_type None means "softmax" for num_negatives=0, else "nce"."""
    if num_negatives is not None and (isinstance(num_negatives, bool) or not isinstance(num_negatives, int)
                                      or num_negatives < 0):
        raise ValueError(f"num_negatives must be an integer >= 0, got {num_negatives!r}")
    if loss_type is None:
        loss_type = "softmax" if num_negatives == 0 else "nce"
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(map(repr, LOSS_TYPES))}, got {loss_type!r}")
    if loss_type == "softmax":
        if num_negatives not in (None, 0):
            raise ValueError(f"num_negatives={num_negatives!r} does not apply to loss_type='softmax' (the exact "
                             f"softmax scores every bank row): leave num_negatives unset or pass 0")
        return loss_type, 0
    if num_negatives == 0:
        raise ValueError(f"loss_type={loss_type!r} needs num_negatives >= 1: num_negatives=0 is the exact "
                         f"softmax (loss_type='softmax', or leave loss_type unset)")
    return loss_type, DEFAULT_NUM_NEGATIVES if num_negatives is None else num_negatives


def _check_applicable(loss_type, *, z, z_ema, z_every, negatives):
    """ValueError naming every given argument that this loss would not use."""
    given = {"z": z, "z_ema": z_ema, "z_every": z_every, "negatives": negatives}
    if loss_type == "softmax":
        unused, why = ("z", "z_ema", "z_every", "negatives"), (
            "the exact softmax (loss_type='softmax', num_negatives=0) normalises over every bank row: "
            "it has no Z and draws no negatives")
    elif loss_type == "infonce":
        unused, why = ("z", "z_ema", "z_every"), "InfoNCE (loss_type='infonce') does not use Z"
    else:
        policy = z_policy.DEFAULT_POLICY if z is None else z
        unused, why = (), ""
        if z_ema is not None and policy not in EMA_POLICIES:
            unused, why = ("z_ema",), f"z_ema is the factor of z='ema' / 'ema-bc', not of z={policy!r}"
        elif z_every is not None and policy != "exact":
            unused, why = ("z_every",), f"z_every is the refresh interval of z='exact', not of z={policy!r}"
    bad = [f"{name}={given[name]!r}" for name in unused if given[name] is not None]
    if bad:
        raise ValueError(f"{', '.join(bad)} {'does' if len(bad) == 1 else 'do'} not apply: {why}")


class InstDiscLoss(nn.Module):
    """InstDisc loss with its memory bank.

    ``forward(features, indices) -> loss`` computes the loss against the old
    bank rows, then updates the bank (fused, in the same call).
    loss_type: "nce" (default, K = num_negatives sampled negatives, default 4096), "infonce"
    or "softmax" (the exact non-parametric softmax over every bank row, docs/method.md#the-exact-non-parametric-softmax);
    num_negatives=0 with loss_type unset selects "softmax" too.
    z: the NCE normaliser policy (ops/z_policy.py): "batch" (default: re-estimated from
    every batch), "first-batch" (lemniscate), "ema" / "ema-bc" (moving average, factor
    z_ema, default 0.99; "ema-bc" bias-corrected), "exact" (the exact partition function,
    refreshed every z_every steps, default 1) or a positive float (fixed).
    negatives: "per-sample" (default, K per row) or "shared" (one set of K for the batch,
    ops/nce_shared.py).
    proximal: lambda of the proximal term lambda ||F[b] - V_old[y[b]]||^2 (mean over the
    batch), for every loss_type.
    An argument the chosen loss does not use (z, z_ema, z_every or negatives with the
    exact softmax; z, z_ema, z_every with InfoNCE; z_ema without an "ema" policy; z_every
    without z="exact"; num_negatives with loss_type="softmax") is a ValueError naming it.
    """

    def __init__(self, num_samples: int, dim: int = 128, *, num_negatives: int | None = None,
                 temperature: float = 0.07, momentum: float = 0.5, z: str | float | None = None,
                 z_ema: float | None = None, z_every: int | None = None, proximal: float = 0.0,
                 bank_dtype: torch.dtype = torch.float32, loss_type: str | None = None, backend: str = "auto",
                 device: torch.device | str | None = None, generator: torch.Generator | None = None,
                 negatives: str | None = None) -> None:
        super().__init__()
        loss_type, num_negatives = _loss_kind(loss_type, num_negatives)
        _check_applicable(loss_type, z=z, z_ema=z_ema, z_every=z_every, negatives=negatives)
        z = z_policy.DEFAULT_POLICY if z is None else z
        z_ema = DEFAULT_Z_EMA if z_ema is None else z_ema
        z_every = z_policy.DEFAULT_EVERY if z_every is None else z_every
        negatives = "per-sample" if negatives is None else negatives
        if negatives not in ("per-sample", "shared"):
            raise ValueError(f"negatives must be 'per-sample' or 'shared', got {negatives!r}")
        backend = _backend.canonical(backend)   # "reference" -> "eager" (DeprecationWarning)
        _validate.check_loss_config(     # z: checked (with z_every) by the policy module
            num_samples=num_samples, dim=dim, num_negatives=num_negatives, temperature=temperature,
            momentum=momentum, z="first-batch" if isinstance(z, str) else z, z_ema=z_ema, proximal=proximal,
            loss_type="infonce" if loss_type == "infonce" else "nce", backend=backend, bank_dtype=bank_dtype)
        z_init = z_policy.check_policy(z, z_ema, z_every)
        self.bank = MemoryBank(num_samples, dim, dtype=bank_dtype, device=device, momentum=momentum,
                               generator=generator)
        self.register_buffer("z", torch.tensor([z_init], dtype=torch.float32, device=device))
        self.register_buffer("z_step", torch.zeros((), dtype=torch.int64, device=device))  # NCE steps taken
        self.num_negatives = num_negatives
        self.temperature = float(temperature)
        self.z_mode = (z if isinstance(z, str) else "fixed") if loss_type == "nce" else None
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
                                              momentum=self.bank.momentum, backend=self.backend,
                                              proximal=self.proximal)
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
        out = f"{k}, temperature={self.temperature}"
        if self.z_mode is not None:
            z = f"{self.z_mode} every {self.z_every}" if self.z_mode == "exact" else self.z_mode
            out += f", z={z}"
        out += f", loss_type={self.loss_type}"
        return out + (f", proximal={self.proximal}" if self.proximal > 0 else "")

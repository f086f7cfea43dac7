"""The probabilities P = exp(V[idx] . F / T) / Z of lemniscate's NCEAverage and
their backward dF[b] = sum_k gP[b,k] P[b,k] / T V[idx[b,k]] (SPEC 1.1, 5).

Used by the drop-in modules (instdisc_kernels/lemniscate/), which must
return the B x (K+1) probabilities. Implementations: "cpu"/"cuda" ->
torch.ops.instdisc.nce_probs / nce_probs_backward (C++), "triton" ->
*_triton variants when ops/nce_triton.py defines them, "reference" -> eager.

``nce_probs_loss`` also returns lemniscate's NCECriterion on P (Pn = 1/N, K =
idx.size(1) - 1): its loss, dloss/dF and dloss/dP, from the same pass over the gathered
rows ("cpu": torch.ops.instdisc.nce_probs_loss; "reference": eager). The
drop-in uses it when the criterion follows (``has_fused``).
"""
from __future__ import annotations

import torch

from .. import _backend
from ._formulas import (
    nce_grad_probs,
    nce_loss_from_probs,
    nce_negative,
    nce_positive,
    opmath,
)


def probs_reference(features, memory, idx, z, temperature):
    acc = opmath(features.dtype)
    s = torch.einsum("bkd,bd->bk", memory[idx].to(acc), features.to(acc))
    e = torch.exp(s / temperature)
    zc = z.reshape(()).to(acc)
    Z = torch.where(zc <= 0, memory.shape[0] * e.mean(), zc)
    return e / Z, Z.to(torch.float32).reshape(1)


def probs_loss_reference(features, memory, idx, z, temperature):
    P, z_out = probs_reference(features, memory, idx, z, temperature)
    B, K = P.shape[0], P.shape[1] - 1
    kpn = K / memory.shape[0]
    loss = nce_loss_from_probs(P, kpn).to(P.dtype)
    logp = torch.log(P)
    coef = torch.cat([nce_positive(logp[:, :1], kpn)[1], nce_negative(logp[:, 1:], kpn)[1]], 1) / (B * temperature)
    grad_probs = nce_grad_probs(P, kpn)
    return P, loss, probs_backward_reference(coef, torch.ones_like(P), memory, idx, 1.0), grad_probs, z_out


def probs_backward_reference(grad_probs, probs, memory, idx, temperature):
    coef = grad_probs.to(probs.dtype) * probs / temperature
    return torch.einsum("bk,bkd->bd", coef, memory[idx].to(probs.dtype))


try:
    from . import nce_triton  # noqa: F401  (defines instdisc::nce_probs_triton and its backward)
    _HAS_TRITON = hasattr(torch.ops.instdisc, "nce_probs_triton")
except ImportError:
    _HAS_TRITON = False


def resolve(backend, device):
    return _backend.resolve(backend, device, op="NCEAverage", cpp_op="nce_probs", has_triton=_HAS_TRITON)


def nce_probs(features, memory, idx, z, temperature, backend):
    if backend == "reference":
        return probs_reference(features, memory, idx, z, temperature)
    op = torch.ops.instdisc.nce_probs_triton if backend == "triton" else torch.ops.instdisc.nce_probs
    return op(features.contiguous(), memory, idx.contiguous(), z.reshape(1).float(), float(temperature))


def nce_probs_backward(grad_probs, probs, memory, idx, temperature, backend):
    if backend == "reference":
        return probs_backward_reference(grad_probs, probs, memory, idx, temperature)
    op = (torch.ops.instdisc.nce_probs_backward_triton if backend == "triton"
          else torch.ops.instdisc.nce_probs_backward)
    return op(grad_probs.contiguous(), probs.contiguous(), memory, idx.contiguous(), float(temperature))


def has_fused(backend, device):
    """Whether ``nce_probs_loss`` runs on ``backend`` (resolved) for tensors on ``device``."""
    if backend == "reference":
        return True
    return backend == "cpu" and device.type == "cpu" and _backend.has_kernel("nce_probs_loss", "CPU")


def nce_probs_loss(features, memory, idx, z, temperature, backend):
    """(P, loss, dloss/dF, dloss/dP, Z used) of NCECriterion(P) with P = nce_probs(...)."""
    if backend == "reference":
        return probs_loss_reference(features, memory, idx, z, temperature)
    return torch.ops.instdisc.nce_probs_loss(features.contiguous(), memory, idx.contiguous(), z.reshape(1).float(),
                                             float(temperature))


if _backend.extension_loaded() and hasattr(torch.ops.instdisc, "nce_probs_loss"):
    @torch.library.register_fake("instdisc::nce_probs_loss")
    def _(features, memory, idx, z, temperature):
        acc = opmath(features.dtype)
        B, K1 = idx.shape
        return (features.new_empty((B, K1), dtype=acc), features.new_empty((), dtype=acc),
                features.new_empty(features.shape, dtype=acc), features.new_empty((B, K1), dtype=acc),
                features.new_empty((1,), dtype=torch.float32))

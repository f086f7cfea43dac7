"""The probabilities P = exp(V[idx] . F / T) / Z of lemniscate's NCEAverage and
their backward dF[b] = sum_k gP[b,k] P[b,k] / T V[idx[b,k]] (docs/lemniscate.md).

Used by the drop-in modules (instdisc_kernels/lemniscate/), which must
return the B x (K+1) probabilities. Implementations: TABLE below, each backend a
pair (probs, backward) (docs/backends.md).

``nce_probs_loss`` also returns lemniscate's NCECriterion on P (Pn = 1/N, K =
idx.size(1) - 1): its loss, dloss/dF and dloss/dP, from the same pass over the gathered
rows (LOSS_TABLE: "cpu" torch.ops.instdisc.nce_probs_loss, "eager"). The
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


def probs_eager(features, memory, idx, z, temperature):
    acc = opmath(features.dtype)
    s = torch.einsum("bkd,bd->bk", memory[idx].to(acc), features.to(acc))
    e = torch.exp(s / temperature)
    zc = z.reshape(()).to(acc)
    Z = torch.where(zc <= 0, memory.shape[0] * e.mean(), zc)
    return e / Z, Z.to(torch.float32).reshape(1)


def probs_loss_eager(features, memory, idx, z, temperature):
    P, z_out = probs_eager(features, memory, idx, z, temperature)
    B, K = P.shape[0], P.shape[1] - 1
    kpn = K / memory.shape[0]
    loss = nce_loss_from_probs(P, kpn).to(P.dtype)
    logp = torch.log(P)
    coef = torch.cat([nce_positive(logp[:, :1], kpn)[1], nce_negative(logp[:, 1:], kpn)[1]], 1) / (B * temperature)
    grad_probs = nce_grad_probs(P, kpn)
    return P, loss, probs_backward_eager(coef, torch.ones_like(P), memory, idx, 1.0), grad_probs, z_out


def probs_backward_eager(grad_probs, probs, memory, idx, temperature):
    coef = grad_probs.to(probs.dtype) * probs / temperature
    return torch.einsum("bk,bkd->bd", coef, memory[idx].to(probs.dtype))


try:
    from . import nce_probs_triton  # noqa: F401  (defines instdisc::nce_probs_triton and its backward)
except ImportError:
    pass


def _cpp(features, memory, idx, z, temperature):
    return torch.ops.instdisc.nce_probs(features.contiguous(), memory, idx.contiguous(), z.reshape(1).float(),
                                        float(temperature))


def _cpp_backward(grad_probs, probs, memory, idx, temperature):
    return torch.ops.instdisc.nce_probs_backward(grad_probs.contiguous(), probs.contiguous(), memory,
                                                 idx.contiguous(), float(temperature))


def _triton(features, memory, idx, z, temperature):
    return torch.ops.instdisc.nce_probs_triton(features.contiguous(), memory, idx.contiguous(),
                                               z.reshape(1).float(), float(temperature))


def _triton_backward(grad_probs, probs, memory, idx, temperature):
    return torch.ops.instdisc.nce_probs_backward_triton(grad_probs.contiguous(), probs.contiguous(), memory,
                                                        idx.contiguous(), float(temperature))


def _cpp_loss(features, memory, idx, z, temperature):
    return torch.ops.instdisc.nce_probs_loss(features.contiguous(), memory, idx.contiguous(), z.reshape(1).float(),
                                             float(temperature))


_TRITON = (_triton, _triton_backward) if _backend.op_handle("nce_probs_triton") is not None else None
TABLE = _backend.OpTable(
    "NCEAverage",
    eager=_backend.Impl((probs_eager, probs_backward_eager), "ops/nce_probs.py probs_eager, probs_backward_eager"),
    cpu=_backend.Impl((_cpp, _cpp_backward), "csrc/cpu/nce_probs.cpp nce_probs_cpu, nce_probs_backward_cpu",
                      dispatch="nce_probs"),
    cuda=_backend.Impl((_cpp, _cpp_backward), "csrc/cuda/nce_probs.cu nce_probs_cuda, nce_probs_backward_cuda",
                       dispatch="nce_probs"),
    triton=_backend.Impl(_TRITON, "ops/nce_probs_triton.py nce_probs_triton, nce_probs_backward_triton", triton=True),
)
# The probabilities together with NCECriterion's loss on them, in one pass (NCEAverage + NCECriterion).
LOSS_TABLE = _backend.OpTable(
    "NCEAverage + NCECriterion",
    eager=_backend.Impl(probs_loss_eager, "ops/nce_probs.py probs_loss_eager"),
    cpu=_backend.Impl(_cpp_loss, "csrc/cpu/nce_probs.cpp nce_probs_loss_cpu", dispatch="nce_probs_loss"),
)


def nce_probs(features, memory, idx, z, temperature, backend):
    """(P, Z used) on ``backend`` (a name TABLE.select returned)."""
    return TABLE[backend][0](features, memory, idx, z, temperature)


def nce_probs_backward(grad_probs, probs, memory, idx, temperature, backend):
    return TABLE[backend][1](grad_probs, probs, memory, idx, temperature)


def has_fused(backend, device):
    """Whether ``nce_probs_loss`` runs on ``backend`` (a name TABLE.select returned) on ``device``."""
    return LOSS_TABLE.available(backend, device)


def nce_probs_loss(features, memory, idx, z, temperature, backend):
    """(P, loss, dloss/dF, dloss/dP, Z used) of NCECriterion(P) with P = nce_probs(...)."""
    return LOSS_TABLE[backend](features, memory, idx, z, temperature)


# Fake (meta) kernels of the C++ ops (schemas in csrc/instdisc.cpp), for torch.compile / opcheck:
# outputs in the opmath dtype of the features (float64 for float64 features, else float32), Z float32.
def _probs_fake(features, memory, idx, z, temperature):
    return (features.new_empty((features.shape[0], idx.shape[1]), dtype=opmath(features.dtype)),
            features.new_empty((1,), dtype=torch.float32))


def _probs_backward_fake(grad_probs, probs, memory, idx, temperature):
    return probs.new_empty((probs.shape[0], memory.shape[1]))


def _probs_loss_fake(features, memory, idx, z, temperature):
    acc = opmath(features.dtype)
    B, K1 = idx.shape
    return (features.new_empty((B, K1), dtype=acc), features.new_empty((), dtype=acc),
            features.new_empty(features.shape, dtype=acc), features.new_empty((B, K1), dtype=acc),
            features.new_empty((1,), dtype=torch.float32))


for _name, _fake in (("nce_probs", _probs_fake), ("nce_probs_backward", _probs_backward_fake),
                     ("nce_probs_loss", _probs_loss_fake)):
    if _backend.extension_loaded() and hasattr(torch.ops.instdisc, _name):
        torch.library.register_fake(f"instdisc::{_name}")(_fake)

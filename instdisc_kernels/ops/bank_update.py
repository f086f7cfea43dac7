"""Memory-bank momentum update (docs/method.md#noise-contrastive-estimation-nce): ``bank_update_``.

    V[y[b]] <- normalize(m * V_old[y[b]] + (1 - m) * F[b])

computed in fp32 (fp64 for a float64 bank), rounded once to the bank dtype;
with a repeated index the last occurrence in batch order wins.

Implementations: TABLE below (docs/backends.md). After a loss, the update's backend
comes from ``backend_after_loss``.
"""
from __future__ import annotations

import torch

from .. import _backend, _validate
from ._formulas import opmath


def normalize_rows(v, old):
    """v / ||v|| per row, scale-safe: where the sum of squares leaves the normal range
    (overflow for |v| ~ 1e20 in fp32, underflow) v is divided by max |v| first. A row
    with v = 0 (or a non-finite v) has no direction: it keeps its old bank row ``old``."""
    info = torch.finfo(v.dtype)
    ss = v.pow(2).sum(1, keepdim=True)
    plain = (ss >= info.tiny / info.eps) & (ss <= info.max)          # the usual case: v / sqrt(ss)
    amax = v.abs().amax(1, keepdim=True)
    ok = (amax > 0) & torch.isfinite(amax)
    u = v / torch.where(ok, amax, torch.ones_like(amax))
    u = u / u.pow(2).sum(1, keepdim=True).sqrt().clamp(min=1)
    ok = ok & torch.isfinite(u).all(1, keepdim=True)
    return torch.where(plain, v / torch.where(plain, ss, torch.ones_like(ss)).sqrt(),
                       torch.where(ok, u, old.to(v.dtype)))


@torch.library.custom_op("instdisc::bank_update_eager_", mutates_args=("memory",))
def bank_update_eager_(memory: torch.Tensor, indices: torch.Tensor, features: torch.Tensor,
                       momentum: float) -> None:
    acc = opmath(memory.dtype)
    B = indices.shape[0]
    old = memory[indices]
    v = normalize_rows(momentum * old.to(acc) + (1 - momentum) * features.to(acc), old)
    # Every duplicate writes the value of the last occurrence, so the result is
    # deterministic even where index_copy_ is not (CUDA).
    pos = torch.arange(B, device=indices.device)
    same = indices.view(-1, 1) == indices.view(1, -1)
    last = torch.where(same, pos.view(1, -1), -1).amax(1)
    memory.index_copy_(0, indices, v[last].to(memory.dtype))


@bank_update_eager_.register_fake
def _(memory, indices, features, momentum):
    return None


try:
    from . import bank_update_triton  # noqa: F401  (defines instdisc::bank_update_triton_)
except ImportError:
    pass

if _backend.extension_loaded():
    @torch.library.register_fake("instdisc::bank_update_")
    def _(memory, indices, features, momentum):
        return None


TABLE = _backend.OpTable(
    "bank_update_",
    eager=_backend.Impl(torch.ops.instdisc.bank_update_eager_, "ops/bank_update.py bank_update_eager_"),
    cpu=_backend.Impl(_backend.op_handle("bank_update_"), "csrc/cpu/bank_update.cpp bank_update_cpu",
                      dispatch="bank_update_"),
    cuda=_backend.Impl(_backend.op_handle("bank_update_"), "csrc/cuda/bank_update.cu bank_update_cuda",
                       dispatch="bank_update_"),
    triton=_backend.Impl(_backend.op_handle("bank_update_triton_"), "ops/bank_update_triton.py bank_update_triton_",
                         triton=True),
)


def backend_after_loss(backend, device):
    """The backend of the bank update that follows a loss called with ``backend`` (every loss
    and drop-in module uses this): "auto" stays "auto" (this op's own choice); a named backend
    is kept when this op has it on ``device``, else this op's "auto" choice."""
    name = _backend.canonical(backend, warn=False)
    if name != "auto" and TABLE.available(name, device):
        return name
    return TABLE.select("auto", device)


def bank_update_(memory: torch.Tensor, indices: torch.Tensor, features: torch.Tensor, momentum: float = 0.5, *,
                 backend: str = "auto", validate: bool = True) -> torch.Tensor:
    """In-place momentum update of the memory bank rows ``indices`` with ``features``.

    Deterministic with repeated indices (the last occurrence in batch order wins).
    Every written row is a finite unit row; where m V_old + (1 - m) F is exactly 0
    (e.g. F = -V_old, or m = 0 and F = 0) there is no direction and the row keeps
    its old value. ``features`` may be a view of ``memory`` (read before any write).
    A bank created under torch.inference_mode() is updated like any other bank.
    ``validate`` checks index ranges and NaN/inf (a GPU synchronisation).
    """
    _validate.check_features_memory_indices(features, memory, indices, values=validate)
    _validate.check_momentum(momentum)
    if not memory.is_contiguous():
        raise ValueError("memory must be contiguous (it is updated in place)")
    be = TABLE.select(backend, memory.device)
    features = features.detach()
    tracing = _validate._tracing()
    # features that view the bank: the C++ ops copy them and "eager" reads every row before
    # writing; the Triton programs would race, so they get a copy
    if be == "triton" and not tracing and features.untyped_storage().data_ptr() == memory.untyped_storage().data_ptr():
        features = features.clone()
    # an inference tensor may only be written in inference mode; no autograd graph can hold one
    mode = torch.inference_mode() if not tracing and memory.is_inference() else torch.no_grad()
    with mode:
        TABLE[be](memory, indices.long().contiguous(), features.contiguous(), float(momentum))
    return memory

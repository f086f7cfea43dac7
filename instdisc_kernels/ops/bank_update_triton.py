"""Triton kernel of the memory-bank momentum update (docs/method.md#noise-contrastive-estimation-nce), in place:

    V[y[b]] <- normalize(m * V_old[y[b]] + (1 - m) * F[b])

computed in fp32 (fp64 for a float64 bank), scale-safe (divided by max |v| first
where the sum of squares would overflow or underflow; a row with v = 0 keeps its
old value), rounded once to the bank dtype
(round-to-nearest-even on a GPU; note that the Triton *interpreter* truncates
fp32 -> bf16 casts, so on CPU tests a bf16 bank may differ by one bf16 ulp).

One program per batch row b. Determinism with repeated indices, without any
host synchronisation: program b first scans y[b+1:] (an O(B^2) compare of the
int64 index vector, which stays in cache; trivial next to the row traffic for
B <= a few thousand) and only the last occurrence of an index reads, computes
and writes its row. Programs that are not last occurrences touch no bank row,
so every written row is read by exactly one program, before it writes it: no
race, and the result equals a sequential index_copy_ (last occurrence wins).

Registered as ``instdisc::bank_update_triton_`` (ops/bank_update.py picks it
for backend="triton"). Runs on CUDA tensors, and on CPU tensors under
TRITON_INTERPRET=1 (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._formulas import opmath


@triton.jit
def _bank_update_kernel(mem_ptr, idx_ptr, feat_ptr, B, D, momentum, tiny,
                        ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr):
    b = tl.program_id(0)
    y = tl.load(idx_ptr + b)
    # Is there a later occurrence of y in the batch? (then this row must not write)
    later = tl.zeros([BLOCK_B], dtype=tl.int32)
    for start in range(b + 1, B, BLOCK_B):
        offs = start + tl.arange(0, BLOCK_B)
        other = tl.load(idx_ptr + offs, mask=offs < B, other=-1)
        later += (other == y).to(tl.int32)
    is_last = tl.sum(later, axis=0) == 0

    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_d < D) & is_last
    row = mem_ptr + y.to(tl.int64) * D + offs_d          # int64: N * D may exceed 2^31
    v_old = tl.load(row, mask=mask, other=0.0).to(ACC)
    f = tl.load(feat_ptr + b.to(tl.int64) * D + offs_d, mask=mask, other=0.0).to(ACC)
    v = momentum * v_old + (1.0 - momentum) * f
    # scale-safe norm: where the sum of squares leaves the normal range (overflow / underflow)
    # v is divided by max |v| first; v = 0 or a non-finite v keeps the old row
    ss = tl.sum(v * v, axis=0)
    plain = (ss >= tiny) & (ss > 0) & (ss - ss == 0)      # (tiny is an fp32 argument: 0 for float64)
    amax = tl.max(tl.abs(v), axis=0)
    ok = (amax > 0) & (amax - amax == 0)
    u = v / tl.where(ok, amax, 1.0)
    su = tl.sum(u * u, axis=0)
    ok = ok & (su - su == 0)
    u = tl.where(plain, v, u)
    inv = 1.0 / tl.sqrt(tl.where(plain, ss, tl.where(ok, su, 1.0)))
    writes = (plain.to(tl.int32) + ok.to(tl.int32)) > 0
    tl.store(row, (u * inv).to(mem_ptr.dtype.element_ty), mask=mask & writes)


def _launch_params(B, D):
    block_d = max(16, triton.next_power_of_2(D))
    block_b = min(1024, max(16, triton.next_power_of_2(B)))
    num_warps = 4 if block_d <= 1024 else 8
    return block_d, block_b, num_warps


@torch.library.custom_op("instdisc::bank_update_triton_", mutates_args=("memory",))
def bank_update_triton_(memory: torch.Tensor, indices: torch.Tensor, features: torch.Tensor,
                        momentum: float) -> None:
    if memory.dim() != 2 or not memory.is_contiguous():
        raise ValueError(f"memory must be a contiguous (N, D) tensor, got shape {tuple(memory.shape)}")
    if indices.dim() != 1 or indices.dtype != torch.int64:
        raise ValueError(f"indices must be a 1-D int64 tensor, got {indices.dtype} of shape {tuple(indices.shape)}")
    B, D = indices.shape[0], memory.shape[1]
    if features.shape != (B, D):
        raise ValueError(f"features must have shape ({B}, {D}), got {tuple(features.shape)}")
    if B == 0:
        return
    acc = tl.float64 if memory.dtype == torch.float64 else tl.float32
    info = torch.finfo(opmath(memory.dtype))
    block_d, block_b, num_warps = _launch_params(B, D)
    _bank_update_kernel[(B,)](memory, indices.contiguous(), features.contiguous(), B, D, float(momentum),
                              info.tiny / info.eps, ACC=acc, BLOCK_D=block_d, BLOCK_B=block_b,
                              num_warps=num_warps)


@bank_update_triton_.register_fake
def _(memory, indices, features, momentum):
    return None

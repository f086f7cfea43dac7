"""Triton kernels of lemniscate's NCEAverage probabilities (docs/lemniscate.md):
``instdisc::nce_probs_triton`` (P = exp(V[idx] . F / T) / Z, B x (K+1)) and
``instdisc::nce_probs_backward_triton`` (dF[b] = sum_k gP[b,k] P[b,k] / T V[idx[b,k]]),
the triton backend of ops/nce_probs.py. The index matrix idx is always given
(the drop-in draws it), so nothing is sampled here.

Kernels (grid (B, SPLIT) as in ops/nce_triton.py, whose launch heuristic,
device check and row gather ``_gather_dot`` they share):

* ``_probs_kernel``     exp(s/T) per column, divided by z when z > 0, and per-program
  partial sums of exp(s/T) for the batch estimate of Z;
* ``_z_kernel``         one program: Z = N * mean exp(s/T) from the partials when z <= 0,
  else z;
* ``_scale_kernel``     P /= Z when Z was estimated (a no-op with a fixed z, decided on the
  device: no host sync);
* ``_probs_bwd_kernel`` per-program partial gradients, summed over SPLIT in torch.

Precision: rows and features are widened to fp32 on load, accumulation is fp32;
float64 features give float64 outputs of fp32 accuracy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._formulas import opmath
from .nce_triton import (
    _check_2d_float,
    _check_device,
    _gather_dot,
    _launch_params,
    _program_slice,
    _row_stride,
)

# --------------------------------------------------------------------------- #
# Kernels                                                                      #
# --------------------------------------------------------------------------- #


@triton.jit
def _probs_kernel(feat_ptr, mem_ptr, idx_ptr, z_ptr, p_ptr, esum_ptr, D, stride_m, K1, CHUNK, SPLIT, inv_T,
                  BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """P = exp(s/T) / z when z > 0, else exp(s/T) (divided by the estimate in _scale_kernel)."""
    b, j, k_start, k_end, offs_d, dmask = _program_slice(K1, CHUNK, D, BLOCK_D)
    f = tl.load(feat_ptr + b.to(tl.int64) * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
    z = tl.load(z_ptr)
    inv_z = tl.where(z > 0, 1.0 / tl.where(z > 0, z, 1.0), 1.0)
    total = 0.0
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < k_end
        idx = tl.load(idx_ptr + b.to(tl.int64) * K1 + offs_k, mask=kmask, other=0)
        _rows, s = _gather_dot(mem_ptr, stride_m, idx, kmask, f, offs_d, dmask)
        e = tl.where(kmask, tl.exp(s * inv_T), 0.0)
        total += tl.sum(e, axis=0)
        tl.store(p_ptr + b.to(tl.int64) * K1 + offs_k, e * inv_z, mask=kmask)
    tl.store(esum_ptr + b * SPLIT + j, total)


@triton.jit
def _scale_kernel(p_ptr, z_ptr, zbuf_ptr, numel, BLOCK: tl.constexpr):
    """P /= Z only when Z was estimated (z <= 0); with a fixed z it touches nothing."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < tl.where(tl.load(z_ptr) <= 0, numel, 0)
    e = tl.load(p_ptr + offs, mask=mask, other=0.0)
    tl.store(p_ptr + offs, e / tl.load(zbuf_ptr), mask=mask)


@triton.jit
def _probs_bwd_kernel(gp_ptr, p_ptr, mem_ptr, idx_ptr, part_g_ptr, D, stride_m, K1, CHUNK, SPLIT, inv_T,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial dF[b] = sum_k gP[b,k] P[b,k] / T V[idx[b,k]] over this program's columns."""
    b, j, k_start, k_end, offs_d, dmask = _program_slice(K1, CHUNK, D, BLOCK_D)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < k_end
        off = b.to(tl.int64) * K1 + offs_k
        idx = tl.load(idx_ptr + off, mask=kmask, other=0)
        coef = (tl.load(gp_ptr + off, mask=kmask, other=0.0).to(tl.float32)
                * tl.load(p_ptr + off, mask=kmask, other=0.0).to(tl.float32) * inv_T)
        rows = tl.load(mem_ptr + idx.to(tl.int64)[:, None] * stride_m + offs_d[None, :],
                       mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(coef[:, None] * rows, axis=0)
    tl.store(part_g_ptr + (b * SPLIT + j).to(tl.int64) * D + offs_d, acc, mask=dmask)


@triton.jit
def _z_kernel(esum_ptr, z_ptr, zbuf_ptr, NP, scale, z_ema, ALWAYS: tl.constexpr, BLOCK: tl.constexpr):
    """Z = N * mean exp(s/T) (= scale * sum of the partials) when z <= 0; EMA or z otherwise."""
    total = 0.0
    for start in range(0, NP, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        total += tl.sum(tl.load(esum_ptr + offs, mask=offs < NP, other=0.0), axis=0)
    est = total * scale
    z = tl.load(z_ptr)
    if ALWAYS:
        zk = z_ema * z + (1.0 - z_ema) * est
    else:
        zk = z
    tl.store(zbuf_ptr, tl.where(z <= 0, est, zk))


# --------------------------------------------------------------------------- #
# Ops                                                                          #
# --------------------------------------------------------------------------- #
@torch.library.custom_op("instdisc::nce_probs_triton", mutates_args=())
def nce_probs_triton(features: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor, z: torch.Tensor,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    _check_2d_float("features", features)
    _check_2d_float("memory", memory)
    _check_device(features)
    B, D = features.shape
    if memory.shape[1] != D:
        raise ValueError(f"memory has dim {memory.shape[1]} but features have dim {D}")
    if idx.dim() != 2 or idx.shape[0] != B or idx.shape[1] < 1:
        raise ValueError(f"idx must have shape ({B}, K+1), got {tuple(idx.shape)}")
    if z.numel() != 1:
        raise ValueError(f"z must have one element, got shape {tuple(z.shape)}")
    dev = features.device
    K1 = idx.shape[1]
    N = memory.shape[0]
    mem = _row_stride(memory)
    ix = idx.to(torch.int64).contiguous()
    z_in = z.reshape(1).to(torch.float32)
    block_k, block_d, split, chunk, num_warps = _launch_params(B, K1, D, mem.dtype, dev)
    f32 = {"dtype": torch.float32, "device": dev}
    probs = torch.empty(B, K1, **f32)
    esum = torch.empty(B * split, **f32)
    zbuf = torch.empty(1, **f32)
    _probs_kernel[(B, split)](features.contiguous(), mem, ix, z_in, probs, esum, D, mem.stride(0), K1, chunk,
                              split, 1.0 / temperature, BLOCK_K=block_k, BLOCK_D=block_d, num_warps=num_warps)
    _z_kernel[(1,)](esum, z_in, zbuf, B * split, N / (B * K1), 0.0, ALWAYS=False,
                    BLOCK=min(1024, max(16, triton.next_power_of_2(B * split))))
    block = 1024
    _scale_kernel[(triton.cdiv(B * K1, block),)](probs, z_in, zbuf, B * K1, BLOCK=block)
    if features.dtype == torch.float64:
        probs = probs.double()
    return probs, zbuf


@nce_probs_triton.register_fake
def _(features, memory, idx, z, temperature):
    acc = opmath(features.dtype)
    return (features.new_empty((features.shape[0], idx.shape[1]), dtype=acc),
            z.new_empty((1,), dtype=torch.float32))


@torch.library.custom_op("instdisc::nce_probs_backward_triton", mutates_args=())
def nce_probs_backward_triton(grad_probs: torch.Tensor, probs: torch.Tensor, memory: torch.Tensor,
                              idx: torch.Tensor, temperature: float) -> torch.Tensor:
    _check_2d_float("memory", memory)
    _check_device(probs)
    if probs.dim() != 2 or grad_probs.shape != probs.shape or idx.shape != probs.shape:
        raise ValueError(f"grad_probs, probs and idx must have the same (B, K+1) shape, got "
                         f"{tuple(grad_probs.shape)}, {tuple(probs.shape)}, {tuple(idx.shape)}")
    dev = probs.device
    B, K1 = probs.shape
    D = memory.shape[1]
    mem = _row_stride(memory)
    block_k, block_d, split, chunk, num_warps = _launch_params(B, K1, D, mem.dtype, dev)
    part_g = torch.empty(B, split, D, dtype=torch.float32, device=dev)
    _probs_bwd_kernel[(B, split)](grad_probs.contiguous(), probs.contiguous(), mem, idx.to(torch.int64).contiguous(),
                                  part_g, D, mem.stride(0), K1, chunk, split, 1.0 / temperature,
                                  BLOCK_K=block_k, BLOCK_D=block_d, num_warps=num_warps)
    grad = part_g[:, 0] if split == 1 else part_g.sum(1)
    return grad.to(probs.dtype).contiguous()


@nce_probs_backward_triton.register_fake
def _(grad_probs, probs, memory, idx, temperature):
    return probs.new_empty((probs.shape[0], memory.shape[1]))

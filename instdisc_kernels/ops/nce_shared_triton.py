"""Triton kernel of shared-negative NCE / InfoNCE, registered as
``instdisc::nce_shared_forward_triton`` (contract in ops/nce_shared.py).

The K shared rows are gathered once into a contiguous block G (K x D). Program
(i, s) owns BLOCK_B feature rows and the columns [s * cols_per_split, ...) of
G, streamed in BLOCK_K tiles: S = F G_tile^T / T with tl.dot (tensor cores on
a GPU), then the epilogue on the tile in registers, and the gradient product
with a second tl.dot in the same loop (no B x K block, no second pass):
  MODE 0 (Z estimate): running max m and sum l of exp(S - m) per row;
  MODE 1 (NCE, x = S + bias[k], bias = -(log Z + log c_k)): l = sum softplus(x),
      acc += sigmoid(x) @ G_tile.
  InfoNCE is the online log-sum-exp (m, l) with acc += exp(S - m) @ G_tile,
  rescaled when m grows: exactly the exact softmax's split kernel
  (ops/softmax_triton.py, _softmax_partial_kernel) run over G, with its tiling.
Each program writes its partial (m, l, acc); a few torch ops merge the splits
in a fixed order and the shared pieces of ops/nce_shared.py add the positives,
masks, Z and the proximal term. softplus uses log1p(e) = log(u) e / (u - 1),
u = 1 + e (exact to fp32 rounding for tiny e).

precision "bf16": tl.dot on bf16 operands (features/T, rows, coefficients),
fp32 accumulation; "fp32": input_precision="tf32x3" on a GPU. float64 inputs
are computed in fp32. Under TRITON_INTERPRET=1 every dot runs in fp32 on
values first rounded to bf16 where the GPU would use bf16 (as in
ops/softmax_triton.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting
from . import nce_shared as _shared
from . import softmax_triton as _softmax
from ._formulas import opmath


@triton.jit
def _round_bf16(x, USE_BF16: tl.constexpr, INTERPRET: tl.constexpr):
    if USE_BF16:
        if INTERPRET:
            x = x.to(tl.bfloat16).to(tl.float32)
        else:
            x = x.to(tl.bfloat16)
    return x


@triton.jit
def _shared_tile_kernel(F_ptr, G_ptr, bias_ptr, m_ptr, l_ptr, acc_ptr, B, K, D, cols_per_split, inv_t,
                        MODE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                        USE_BF16: tl.constexpr, INTERPRET: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    bmask = offs_b < B
    dmask = offs_d < D
    f = tl.load(F_ptr + offs_b[:, None].to(tl.int64) * D + offs_d[None, :],
                mask=bmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * inv_t
    f = _round_bf16(f, USE_BF16, INTERPRET)
    m = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    k_start = pid_s * cols_per_split
    k_end = tl.minimum(k_start + cols_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < k_end
        g = tl.load(G_ptr + offs_k[:, None].to(tl.int64) * D + offs_d[None, :],
                    mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        g = _round_bf16(g, USE_BF16, INTERPRET)
        s = tl.dot(f, tl.trans(g), input_precision=DOT_PREC)             # BLOCK_B x BLOCK_K, fp32
        if MODE == 1:
            x = s + tl.load(bias_ptr + offs_k, mask=kmask, other=0.0)[None, :]
            e = tl.exp(-tl.abs(x))
            u = 1.0 + e
            log1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
            sp = tl.maximum(x, 0.0) + log1p                               # softplus(x)
            l += tl.sum(tl.where(kmask[None, :], sp, 0.0), axis=1)
            w = tl.where(kmask[None, :], tl.sigmoid(x), 0.0)
            acc += tl.dot(_round_bf16(w, USE_BF16, INTERPRET), g, input_precision=DOT_PREC)
        else:
            s = tl.where(kmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m = m_new
    row = pid_s * B + offs_b
    tl.store(m_ptr + row, m, mask=bmask)
    tl.store(l_ptr + row, l, mask=bmask)
    if MODE == 1:
        tl.store(acc_ptr + row[:, None].to(tl.int64) * D + offs_d[None, :], acc,
                 mask=bmask[:, None] & dmask[None, :])


class _Launcher:
    def __init__(self, F, G, temperature, precision, chunk_size):
        self.F, self.G = F, G
        self.B, self.D = F.shape
        self.K = G.shape[0]
        self.inv_t = 1.0 / temperature
        self.interp = triton_interpreting() and F.device.type == "cpu"
        # the exact softmax's tiling (same loop shape; its register/spill notes apply here too)
        self.params = _softmax._launch_params(self.B, self.K, self.D, chunk_size, precision, F.device)
        (self.block_b, self.block_k, self.block_d, self.num_warps, self.n_rb, self.cps,
         self.splits) = self.params
        self.use_bf16 = precision == "bf16"
        self.dot_prec = "ieee" if self.interp else ("tf32" if self.use_bf16 else "tf32x3")

    def __call__(self, mode, bias=None):
        """Partials (m, l, acc) of shape (splits, B), (splits, B), (splits, B, D)."""
        dev, B, D = self.F.device, self.B, self.D
        m = torch.empty(self.splits, B, dtype=torch.float32, device=dev)
        l = torch.empty(self.splits, B, dtype=torch.float32, device=dev)
        acc = torch.empty(self.splits if mode else 1, B, D, dtype=torch.float32, device=dev)
        block_b, num_warps = self.block_b, self.num_warps
        if mode == 0 and not self.use_bf16 and not self.interp and block_b == 32:
            block_b, num_warps = 16, 4      # sm_90 AOT: the Z pass spills 16 B at 32 x 32 with 8 warps (tf32x3)
        _shared_tile_kernel[(triton.cdiv(B, block_b), self.splits)](
            self.F, self.G, m if bias is None else bias, m, l, acc, B, self.K, D, self.cps, self.inv_t,
            MODE=mode, BLOCK_B=block_b, BLOCK_K=self.block_k, BLOCK_D=self.block_d,
            USE_BF16=self.use_bf16, INTERPRET=self.interp, DOT_PREC=self.dot_prec, num_warps=num_warps)
        return m, l, acc


def forward_triton(features, memory, indices, neg_indices, z, temperature, proximal, loss_type, z_ema,
                   exclude_positive, noise_probs, precision="fp32", chunk_size=0):
    out = opmath(features.dtype)
    acc = torch.float32
    B = features.shape[0]
    N, K = memory.shape[0], neg_indices.shape[0]
    T = temperature
    F = features.contiguous().to(acc)
    G = memory.index_select(0, neg_indices)
    G = G.float() if G.dtype == torch.float64 else G.contiguous()
    Vy = memory.index_select(0, indices).to(acc)
    t0, prox_loss, prox_grad = _shared.positive_terms(F, Vy, T, proximal)
    cnt = _shared.masked_counts(indices, neg_indices, acc) if exclude_positive else None
    run = _Launcher(F, G, T, precision, chunk_size)
    z_out = z.to(torch.float32).clone()
    if loss_type == 1:       # the online log-sum-exp over G is the exact softmax's kernel
        bb, bk, bd, nw, n_rb, cps, splits = run.params
        m = torch.empty(splits, B, dtype=acc, device=F.device)
        l = torch.empty(splits, B, dtype=acc, device=F.device)
        A = torch.empty(splits, B, features.shape[1], dtype=acc, device=F.device)
        _softmax._softmax_partial_kernel[(n_rb, splits)](
            F, G, m, l, A, B, K, features.shape[1], cps, 1.0 / T, BLOCK_B=bb, BLOCK_N=bk, BLOCK_D=bd,
            USE_BF16=run.use_bf16, INTERPRET=run.interp, DOT_PREC=run.dot_prec, num_warps=nw)
        m_all = m.amax(0)
        w = torch.exp(m - m_all)
        loss, grad = _shared.infonce_finish(m_all, (l * w).sum(0), (A * w[:, :, None]).sum(0), t0, cnt, Vy, T)
    else:
        if float(z[0]) <= 0 or z_ema > 0:
            m, l, _ = run(0)
            parts = torch.cat([(m + torch.log(l)).flatten(), t0]).double()
            log_all = torch.logsumexp(parts, 0)
            if cnt is not None:
                log_mask = torch.logsumexp(t0.double() + torch.log(cnt.double()), 0)
                log_all = log_all + torch.log1p(-torch.exp(log_mask - log_all).clamp_max(1 - 1e-16))
            count = B * (K + 1) - (0 if cnt is None else int(cnt.sum()))
            log_z = _shared.combine_log_z(_shared.log_z_estimate(log_all, count, N), z, z_ema)
            z_out = torch.exp(log_z).to(torch.float32).reshape(1)
        else:
            log_z = _shared.combine_log_z(None, z, 0.0)
        c = _shared.noise_c(neg_indices, N, K, noise_probs, acc)
        bias = (-(torch.log(c) + log_z.to(acc))).contiguous()
        _, l, A = run(1, bias)
        K_consts = B * torch.log(c.double() / (c.double() - _shared.EPS)).sum()
        pos, coef0 = _shared.nce_positive_and_masks(t0, log_z, _shared.noise_c(indices, N, K, noise_probs, acc),
                                                    cnt, K_consts)
        loss = (l.double().sum() + pos) / B
        grad = (A.sum(0) + coef0[:, None] * Vy) / (T * B)
    loss, grad, z_out = _shared._finish(loss, grad, prox_loss, prox_grad, z_out)
    return loss.to(out), grad.to(out), z_out


_shared.define_op("instdisc::nce_shared_forward_triton", forward_triton)

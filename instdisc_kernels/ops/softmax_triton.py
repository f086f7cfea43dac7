"""Triton kernel of the exact non-parametric softmax (docs/method.md#the-exact-non-parametric-softmax), registered as
``instdisc::softmax_forward_triton`` (contract in ops/softmax.py).

Split-N flash-softmax: program (i, s) owns BLOCK_B feature rows and the bank
rows [s * rows_per_split, (s + 1) * rows_per_split). It streams over them in
BLOCK_N tiles: S = F V_tile^T / T with tl.dot (tensor cores on a GPU), online
row max m, l = sum exp(S - m), A = sum exp(S - m) V_tile (a second tl.dot),
rescaled whenever m grows, and writes its partial (m, l, A). A few small
torch ops merge the splits (m = max, l and A rescaled and summed) and form
loss = mean(m + log l - F.V[y]/T) and grad = (A / l - V[y]) / (T B).
Extra memory: splits x B x (D + 2) floats; the B x N logits never exist.

precision "bf16": tl.dot on bf16 operands (fp32 accumulation);
"fp32": tl.dot with input_precision="tf32x3" on a GPU (about fp32 accuracy).
float64 features are computed in fp32 (outputs returned as float64).
Under TRITON_INTERPRET=1 (CPU tests) every dot runs in fp32 on values first
rounded to bf16 where the GPU would use bf16 (the interpreter's bf16 dot is
wrong, and its fp32 -> bf16 cast truncates instead of rounding to nearest).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreting
from ._formulas import add_proximal, opmath


@triton.jit
def _softmax_partial_kernel(F_ptr, V_ptr, m_ptr, l_ptr, acc_ptr, B, N, D, rows_per_split, inv_t,
                            BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            USE_BF16: tl.constexpr, INTERPRET: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    bmask = offs_b < B
    dmask = offs_d < D
    f = tl.load(F_ptr + offs_b[:, None].to(tl.int64) * D + offs_d[None, :],
                mask=bmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * inv_t
    if USE_BF16:
        if INTERPRET:
            f = f.to(tl.bfloat16).to(tl.float32)
        else:
            f = f.to(tl.bfloat16)
    m = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
    n_start = pid_s * rows_per_split
    n_end = tl.minimum(n_start + rows_per_split, N)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nmask = offs_n < n_end
        v = tl.load(V_ptr + offs_n[:, None].to(tl.int64) * D + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        if USE_BF16:
            if INTERPRET:
                v = v.to(tl.bfloat16).to(tl.float32)
            else:
                v = v.to(tl.bfloat16)
        s = tl.dot(f, tl.trans(v), input_precision=DOT_PREC)          # BLOCK_B x BLOCK_N, fp32
        s = tl.where(nmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if USE_BF16:
            if INTERPRET:
                p = p.to(tl.bfloat16).to(tl.float32)
            else:
                p = p.to(tl.bfloat16)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PREC)
        m = m_new
    row = pid_s * B + offs_b
    tl.store(m_ptr + row, m, mask=bmask)
    tl.store(l_ptr + row, l, mask=bmask)
    tl.store(acc_ptr + row[:, None].to(tl.int64) * D + offs_d[None, :], acc,
             mask=bmask[:, None] & dmask[None, :])


def _launch_params(B, N, D, rows_per_split, precision, device):
    interp = device.type != "cuda"
    block_d = max(16, triton.next_power_of_2(D))
    if interp:
        # the interpreter pays per program and per loop iteration: few, large blocks
        block_b = min(64, max(16, triton.next_power_of_2(B)))
        block_n = 128
        num_warps = 4
    elif precision == "bf16":
        block_b = 64 if B > 32 else max(16, triton.next_power_of_2(B))
        block_n = 64 if block_d <= 128 else 32
        num_warps = 4 if block_d <= 128 else 8
    else:
        # "fp32": tf32x3 keeps hi/lo halves of every operand live. sm_90 AOT, D = 128
        # (python_tests/backends/test_triton_aot.py, triton 3.8 and 3.6), BLOCK_B x BLOCK_N:
        # the bf16 sizes (64 x 64, 4 warps) hit 255 registers and spill ~390 B; every
        # 64-row tile spills 8-660 B; 128 x 32 with 8 warps: 255 registers, 16 B spilled
        # on 3.6; 32 x 32 with 8 warps: 228-246 registers, no spill; 16 x 32 with 4
        # warps (B <= 16): 165-200, no spill. D > 128 spills in every shape tried:
        # 16 x 16 with 8 warps least (0-16 B; 64 x 32: ~880 B).
        if block_d <= 128:
            block_b = 32 if B > 16 else 16
            block_n = 32
            num_warps = 8 if block_b == 32 else 4
        else:
            block_b, block_n, num_warps = 16, 16, 8
    n_row_blocks = triton.cdiv(B, block_b)
    if rows_per_split <= 0:
        if interp:
            rows_per_split = N
        else:
            sms = torch.cuda.get_device_properties(device).multi_processor_count
            splits = max(1, min(triton.cdiv(4 * sms, n_row_blocks), triton.cdiv(N, 4 * block_n)))
            rows_per_split = triton.cdiv(N, splits)
    rows_per_split = triton.cdiv(rows_per_split, block_n) * block_n
    splits = triton.cdiv(N, rows_per_split)
    return block_b, block_n, block_d, num_warps, n_row_blocks, rows_per_split, splits


def forward_triton(features, memory, indices, temperature, precision="fp32", chunk_size=0, proximal=0.0):
    """(loss, grad_features); chunk_size > 0 sets the bank rows per program (split); proximal:
    lambda of the proximal term on the positives' rows (added after the merge, ops/_formulas.py)."""
    out_dtype = opmath(features.dtype)
    B, D = features.shape
    N = memory.shape[0]
    F = features.contiguous()
    V = memory.contiguous()
    if F.dtype == torch.float64:
        F = F.float()
    if V.dtype == torch.float64:
        V = V.float()
    interp = triton_interpreting() and F.device.type == "cpu"
    block_b, block_n, block_d, num_warps, n_rb, rps, splits = _launch_params(B, N, D, chunk_size, precision,
                                                                             F.device)
    m = torch.empty(splits, B, dtype=torch.float32, device=F.device)
    l = torch.empty(splits, B, dtype=torch.float32, device=F.device)
    A = torch.empty(splits, B, D, dtype=torch.float32, device=F.device)
    use_bf16 = precision == "bf16"
    dot_prec = "ieee" if interp else ("tf32" if use_bf16 else "tf32x3")  # ignored for bf16 operands
    _softmax_partial_kernel[(n_rb, splits)](
        F, V, m, l, A, B, N, D, rps, 1.0 / temperature,
        BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_D=block_d, USE_BF16=use_bf16,
        INTERPRET=interp, DOT_PREC=dot_prec, num_warps=num_warps)
    # merge the splits (splits x B x D floats: small)
    m_all = m.amax(0)
    w = torch.exp(m - m_all)                                     # splits x B
    l_all = (l * w).sum(0)
    A_all = (A * w[:, :, None]).sum(0)
    Ff = F.float()
    Vy = V[indices].float()
    pos = (Ff * Vy).sum(1) / temperature
    loss = (m_all + torch.log(l_all) - pos).mean()
    grad = (A_all / l_all[:, None] - Vy) / (temperature * B)
    loss, grad = add_proximal(loss, grad, Ff, Vy, proximal)
    return loss.to(out_dtype), grad.to(out_dtype)


@torch.library.custom_op("instdisc::softmax_forward_triton", mutates_args=())
def softmax_forward_triton(features: torch.Tensor, memory: torch.Tensor, indices: torch.Tensor,
                           temperature: float, precision: str, chunk_size: int, proximal: float = 0.0
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    return forward_triton(features, memory, indices, temperature, precision, chunk_size, proximal)

"""Triton kernels of the fused sampled-negative NCE / InfoNCE op (docs/method.md#noise-contrastive-estimation-nce),
``instdisc::nce_forward_triton`` (used by ``nce_loss``). lemniscate's NCEAverage
probabilities have their own file, ops/nce_probs_triton.py, which reuses the
launch helpers and ``_gather_dot`` of this one.

Memory traffic. One training step reads B*(K+1)*D*elem_size bytes of gathered
bank rows (+ B*D feature values and B*(K+1) int64 indices when neg_indices is
given; none when the negatives are drawn in-kernel) and writes B*D fp32
gradients plus tiny per-row partials. At B=256, K=4096, D=128 that is 537 MB
with an fp32 bank, 268 MB with a bf16 bank: about 1 FLOP per byte, so on a GPU
the op is bound by the bandwidth of *random row gathers* (each row is one
contiguous 256-512 B segment, well below HBM's ideal streaming access), by
the number of loads in flight per SM (latency hiding: enough programs, wide
tiles, software pipelining), and for small B by occupancy, which is why the
(K+1) columns of one row are split over several programs when B is small.
Nothing of size B x (K+1) x D is ever allocated; each gathered row is read
once and used for the dot product, the NCE/InfoNCE term and the gradient.

Kernels (grid (B, SPLIT): program (b, j) handles columns [j*CHUNK, (j+1)*CHUNK)
of batch row b, in tiles of BLOCK_K rows x BLOCK_D columns):

* ``_esum_kernel``  Z pre-pass (NCE only): sum_k exp(s/T) per program. It reads
  z from device memory and, when z > 0 and z_ema == 0 (fixed Z), runs zero loop
  iterations (no row is read): the branch is decided on the device, no host sync.
* ``_esum_kernel`` keeps an online max and a sum of exp(s/T - max), so that
  ``_log_z_kernel`` (one program) forms log Z from the partials and z (first batch /
  EMA / fixed) without overflow; ``_nce_kernel`` works with log P = s/T - log Z.
  Z itself is returned as float32 and the caller rejects it when float32 cannot hold it.
* ``_nce_kernel``   main pass: NCE terms with the device-resident Z, or InfoNCE with
  an online softmax over the negatives (running max, rescaled sum and rescaled
  gradient accumulator, as in flash-attention) so that the gradient is
  accumulated in the same single pass over the rows; the positive's logit is
  merged in _combine_kernel (grad = sum_{k>0} p_k (V_k - V_0), no cancellation
  when the softmax is saturated on the positive).
* ``_combine_kernel`` one program per row: merges the SPLIT partials in a fixed
  order (deterministic), adds the proximal term; the loss is then the torch sum
  of B per-row values (deterministic too).

Negatives drawn in-kernel (neg_indices None): the stream every backend shares
(csrc/philox.h, docs/negatives.md), so that one seed draws the same negatives
with the cpu, cuda and triton kernels. Philox4x32-10 keyed by the 64-bit seed
(low word k0, high word k1), loaded from the seed tensor inside the kernel
(tl.philox takes a tensor seed: no host synchronisation). Negative j (column
j + 1) of batch row b uses the counter (j >> 1 as 64 bits, b as 64 bits) and
the 64-bit word out[0] | out[1] << 32 when j is even, out[2] | out[3] << 32
when odd; the word r maps to [0, M) as floor(r * M / 2^64) (tl.umulhi), M = N,
or N - 1 with exclude_positive, in which case values >= y[b] shift up by one.
The draws are not the ones torch.randint makes from the same generator (the
eager backend draws with torch.randint); they are reproducible for a given
seed. Every kernel draws through the one inline function ``_draw_negatives``.

Precision: bank rows and features are converted to fp32 right after loading
and everything is accumulated in fp32, also for float64 features (loss and
grad are returned as float64 then, but are only fp32-accurate; gradcheck in
float64 is done on the eager/cpu backends). Scalars (T, lambda, z_ema) are
passed as fp32 kernel arguments.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _backend
from ._formulas import EPS

_EPS = tl.constexpr(EPS)   # lemniscate's eps, read by the kernel

# --------------------------------------------------------------------------- #
# Device helpers                                                               #
# --------------------------------------------------------------------------- #


@triton.jit
def _draw_negatives(seed, b, offs_k, N, y, EXCLUDE: tl.constexpr):
    """int64 negatives for columns offs_k (1..K; negative j = offs_k - 1) of batch row b: the
    stream of csrc/philox.h (see the module docstring)."""
    j = (offs_k - 1).to(tl.int64)
    blk = (j >> 1).to(tl.uint64)
    row = (offs_k * 0 + b).to(tl.uint64)
    o0, o1, o2, o3 = tl.philox(seed, blk.to(tl.uint32), (blk >> 32).to(tl.uint32), row.to(tl.uint32),
                               (row >> 32).to(tl.uint32))
    odd = (j & 1) == 1
    r = (tl.where(odd, o3, o1).to(tl.uint64) << 32) | tl.where(odd, o2, o0).to(tl.uint64)
    if EXCLUDE:
        m = (offs_k * 0 + N - 1).to(tl.uint64)
    else:
        m = (offs_k * 0 + N).to(tl.uint64)
    v = tl.umulhi(r, m).to(tl.int64)                  # floor(r * m / 2^64)
    if EXCLUDE:
        v = v + (v >= y).to(tl.int64)
    return v


@triton.jit
def _column_indices(y, neg_ptr, seed, b, offs_k, kmask, N, K, HAS_NEG: tl.constexpr, EXCLUDE: tl.constexpr):
    """idx[b, offs_k]: column 0 the positive y, columns 1..K the negatives."""
    if HAS_NEG:
        neg = tl.load(neg_ptr + b.to(tl.int64) * K + (offs_k - 1), mask=kmask & (offs_k > 0), other=0)
    else:
        neg = _draw_negatives(seed, b, offs_k, N, y, EXCLUDE)
    return tl.where(offs_k == 0, y, neg)


@triton.jit
def _program_slice(K1, CHUNK, D, BLOCK_D: tl.constexpr):
    """This program's batch row b, its column chunk j (columns k_start..k_end of K1) and the D lanes."""
    b = tl.program_id(0)
    j = tl.program_id(1)
    k_start = j * CHUNK
    k_end = tl.minimum(k_start + CHUNK, K1)
    offs_d = tl.arange(0, BLOCK_D)
    return b, j, k_start, k_end, offs_d, offs_d < D


@triton.jit
def _gather_dot(mem_ptr, stride_m, idx, kmask, f, offs_d, dmask):
    """Bank rows idx (BLOCK_K x BLOCK_D, fp32, masked rows are 0) and their dots with f."""
    ptrs = mem_ptr + idx.to(tl.int64)[:, None] * stride_m + offs_d[None, :]   # int64: N*D may exceed 2^31
    rows = tl.load(ptrs, mask=kmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    return rows, tl.sum(rows * f[None, :], axis=1)


# --------------------------------------------------------------------------- #
# Kernels                                                                      #
# --------------------------------------------------------------------------- #


@triton.jit(do_not_specialize=["N"])
def _esum_kernel(feat_ptr, mem_ptr, y_ptr, neg_ptr, seed_ptr, z_ptr, esum_ptr, emax_ptr,
                 N, D, stride_m, K, K1, CHUNK, SPLIT, inv_T,
                 ALWAYS: tl.constexpr, HAS_NEG: tl.constexpr, EXCLUDE: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b, j, k_start, k_end, offs_d, dmask = _program_slice(K1, CHUNK, D, BLOCK_D)
    if not ALWAYS:
        # fixed Z (z > 0, no EMA): nothing to estimate, read no row
        k_end = tl.where(tl.load(z_ptr) <= 0, k_end, k_start)
    f = tl.load(feat_ptr + b.to(tl.int64) * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b)
    seed = tl.load(seed_ptr)
    # online max m and sum of exp(s/T - m): Z in log space, no overflow of exp(s/T)
    m = -float("inf")
    total = 0.0
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        kmask = offs_k < k_end
        idx = _column_indices(y, neg_ptr, seed, b, offs_k, kmask, N, K, HAS_NEG, EXCLUDE)
        rows, s = _gather_dot(mem_ptr, stride_m, idx, kmask, f, offs_d, dmask)
        t = tl.where(kmask, s * inv_T, -float("inf"))
        m_new = tl.maximum(m, tl.max(t, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(t - m_new), axis=0)
        m = m_new
    tl.store(esum_ptr + b * SPLIT + j, total)
    tl.store(emax_ptr + b * SPLIT + j, m)


@triton.jit
def _log_z_kernel(esum_ptr, emax_ptr, z_ptr, zbuf_ptr, NP, log_scale, z_ema, ALWAYS: tl.constexpr,
                  BLOCK: tl.constexpr):
    """log Z from the (max, sum exp(t - max)) partials: log(scale * sum) when z <= 0, the
    EMA log(a z + (1 - a) est) or log z otherwise. zbuf = (Z, log Z); Z may be inf (checked by the caller)."""
    M = -float("inf")
    for start in range(0, NP, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        M = tl.maximum(M, tl.max(tl.load(emax_ptr + offs, mask=offs < NP, other=-float("inf")), axis=0))
    total = 0.0
    for start in range(0, NP, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mj = tl.load(emax_ptr + offs, mask=offs < NP, other=-float("inf"))
        sj = tl.load(esum_ptr + offs, mask=offs < NP, other=0.0)
        total += tl.sum(tl.where(sj > 0, sj * tl.exp(mj - M), 0.0), axis=0)
    log_est = tl.log(total) + M + log_scale
    z = tl.load(z_ptr)
    log_zg = tl.log(tl.where(z > 0, z, 1.0))
    if ALWAYS:
        x = tl.log(z_ema) + log_zg
        y = tl.log(1.0 - z_ema) + log_est
        lz = tl.maximum(x, y) + tl.log(1.0 + tl.exp(-tl.abs(x - y)))
    else:
        lz = log_zg
    lz = tl.where(z <= 0, log_est, lz)
    tl.store(zbuf_ptr, tl.exp(lz))
    tl.store(zbuf_ptr + 1, lz)


@triton.jit(do_not_specialize=["N"])
def _nce_kernel(feat_ptr, mem_ptr, y_ptr, neg_ptr, noise_ptr, seed_ptr, zbuf_ptr,
                part_a_ptr, part_m_ptr, part_g_ptr,
                N, D, stride_m, K, K1, CHUNK, SPLIT, inv_T, k_float, c_uniform,
                LOSS: tl.constexpr, HAS_NEG: tl.constexpr, HAS_NOISE: tl.constexpr, EXCLUDE: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    b, j, k_start, k_end, offs_d, dmask = _program_slice(K1, CHUNK, D, BLOCK_D)
    f = tl.load(feat_ptr + b.to(tl.int64) * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b)
    seed = tl.load(seed_ptr)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    part = b * SPLIT + j
    if LOSS == 0:
        # lemniscate NCE: per-entry terms with the device-resident log Z; beyond |log P| > LIM
        # the terms take their asymptotic forms (exp(log P) never overflows fp32)
        log_z = tl.load(zbuf_ptr + 1)
        LIM = 80.0
        loss = 0.0
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < k_end
            idx = _column_indices(y, neg_ptr, seed, b, offs_k, kmask, N, K, HAS_NEG, EXCLUDE)
            rows, s = _gather_dot(mem_ptr, stride_m, idx, kmask, f, offs_d, dmask)
            lp = s * inv_T - log_z
            P = tl.exp(tl.minimum(lp, LIM))
            big = lp > LIM
            small = lp < -LIM
            if HAS_NOISE:
                cneg = k_float * tl.load(noise_ptr + idx, mask=kmask, other=1.0)   # K * Pn
            else:
                cneg = c_uniform                                                  # K / N
            c = cneg + _EPS
            pos = offs_k == 0
            # -log(P/(P+c)) for the positive, -log(K Pn/(P+c)) for negatives;
            # coef = dloss/dP * P (times 1/(T B), applied in _combine_kernel)
            term_pos = tl.where(big, 0.0, tl.where(small, tl.log(c) - lp, tl.log((P + c) / P)))
            coef_pos = tl.where(big, 0.0, tl.where(small, -1.0, -c / (P + c)))
            term_neg = tl.where(big, lp - tl.log(cneg), tl.log((P + c) / cneg))
            coef_neg = tl.where(big, 1.0, P / (P + c))
            term = tl.where(pos, term_pos, term_neg)
            coef = tl.where(pos, coef_pos, coef_neg)
            loss += tl.sum(tl.where(kmask, term, 0.0), axis=0)
            acc += tl.sum(tl.where(kmask, coef, 0.0)[:, None] * rows, axis=0)
        tl.store(part_a_ptr + part, loss)
    else:
        # InfoNCE: online softmax over the negatives' logits s/T. The positive is
        # left out here and added back in _combine_kernel, so that the gradient
        # sum_{k>0} p_k (V_k - V_0) is formed without cancellation when p_0 ~ 1.
        m = -float("inf")
        l_sum = 0.0
        for k0 in range(k_start, k_end, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            kmask = offs_k < k_end
            idx = _column_indices(y, neg_ptr, seed, b, offs_k, kmask, N, K, HAS_NEG, EXCLUDE)
            rows, s = _gather_dot(mem_ptr, stride_m, idx, kmask, f, offs_d, dmask)
            logit = tl.where(kmask & (offs_k > 0), s * inv_T, -float("inf"))
            m_new = tl.maximum(m, tl.max(logit, axis=0))
            alpha = tl.exp(m - m_new)
            p = tl.exp(logit - m_new)
            l_sum = l_sum * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * rows, axis=0)
            m = m_new
        tl.store(part_a_ptr + part, l_sum)
        tl.store(part_m_ptr + part, m)
    tl.store(part_g_ptr + part.to(tl.int64) * D + offs_d, acc, mask=dmask)


@triton.jit
def _combine_kernel(part_a_ptr, part_m_ptr, part_g_ptr, feat_ptr, mem_ptr, y_ptr, loss_ptr, grad_ptr,
                    D, stride_m, SPLIT, inv_T, inv_B, lam,
                    LOSS: tl.constexpr, HAS_PROX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    smask = offs_s < SPLIT
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    a = tl.load(part_a_ptr + b * SPLIT + offs_s, mask=smask, other=0.0)
    g = tl.zeros([BLOCK_D], dtype=tl.float32)
    if LOSS == 0:
        for jj in range(0, SPLIT):
            g += tl.load(part_g_ptr + (b * SPLIT + jj).to(tl.int64) * D + offs_d, mask=dmask, other=0.0)
    else:
        mj = tl.load(part_m_ptr + b * SPLIT + offs_s, mask=smask, other=-float("inf"))
        M = tl.max(mj, axis=0)
        L = tl.sum(tl.where(smask, a * tl.exp(mj - M), 0.0), axis=0)
        for jj in range(0, SPLIT):
            w = tl.exp(tl.load(part_m_ptr + b * SPLIT + jj) - M)
            g += w * tl.load(part_g_ptr + (b * SPLIT + jj).to(tl.int64) * D + offs_d, mask=dmask, other=0.0)
    f = tl.load(feat_ptr + b.to(tl.int64) * D + offs_d, mask=dmask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b)
    v0 = tl.load(mem_ptr + y.to(tl.int64) * stride_m + offs_d, mask=dmask, other=0.0).to(tl.float32)
    if LOSS == 0:
        loss = tl.sum(a, axis=0)
        grad = g * inv_T
    else:
        # M, L, g: max, sum and weighted row sum over the negatives only
        l0 = tl.sum(f * v0, axis=0) * inv_T
        M0 = tl.maximum(M, l0)
        scale = tl.exp(M - M0)
        L_neg = L * scale
        L_all = L_neg + tl.exp(l0 - M0)
        loss = M0 + tl.log(L_all) - l0
        grad = (g * scale - L_neg * v0) / L_all * inv_T
    loss = loss * inv_B
    grad = grad * inv_B
    if HAS_PROX:
        diff = f - v0
        loss += lam * inv_B * tl.sum(diff * diff, axis=0)
        grad += (2.0 * lam * inv_B) * diff
    tl.store(loss_ptr + b, loss)
    tl.store(grad_ptr + b.to(tl.int64) * D + offs_d, grad, mask=dmask)


# --------------------------------------------------------------------------- #
# Launch parameters                                                            #
# --------------------------------------------------------------------------- #
# Programs the split heuristic aims for on CPU (interpreter: every program costs
# ~3.5 ms, so few; small enough that tests with B = 1..3 still exercise SPLIT > 1).
INTERPRETER_TARGET_PROGRAMS = 8


def _launch_params(B, K1, D, mem_dtype, device):
    """(BLOCK_K, BLOCK_D, SPLIT, CHUNK, num_warps) from a small (D, K, dtype) heuristic.

    On a GPU one would autotune BLOCK_K (16..128), num_warps (2..8), num_stages
    (2..4, software pipelining of the row gathers) and the SPLIT target (waves
    of programs per SM), keyed on (D, K, bank dtype, B bucket); multi-config
    @triton.autotune is not used because it cannot run on the CPU interpreter.
    """
    block_d = max(16, triton.next_power_of_2(D))
    if device.type == "cuda":
        tile = 4096 if mem_dtype.itemsize >= 4 else 8192      # elements per BLOCK_K x BLOCK_D tile
        block_k = max(4, min(64, tile // block_d))
        num_warps = 4 if block_k * block_d <= 4096 else 8
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        block_k = 64
        num_warps = 1
        target = INTERPRETER_TARGET_PROGRAMS
    block_k = min(block_k, max(4, triton.next_power_of_2(K1)))
    n_blocks = triton.cdiv(K1, block_k)
    split = max(1, min(n_blocks, triton.cdiv(target, B)))
    chunk = triton.cdiv(n_blocks, split) * block_k
    split = triton.cdiv(K1, chunk)
    return block_k, block_d, split, chunk, num_warps


def _check_device(t):
    if t.device.type != "cuda" and not (t.device.type == "cpu" and _backend.triton_interpreting()):
        raise ValueError(f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), "
                         f"got tensors on {t.device}")


def _check_2d_float(name, t):
    if t.dim() != 2 or not t.is_floating_point():
        raise ValueError(f"{name} must be a 2-D floating tensor, got {t.dtype} of shape {tuple(t.shape)}")


def _row_stride(memory):
    return memory if memory.stride(1) == 1 else memory.contiguous()


# --------------------------------------------------------------------------- #
# Ops                                                                          #
# --------------------------------------------------------------------------- #
@torch.library.custom_op("instdisc::nce_forward_triton", mutates_args=())
def nce_forward_triton(
    features: torch.Tensor, memory: torch.Tensor, indices: torch.Tensor, neg_indices: torch.Tensor | None,
    z: torch.Tensor, seed: torch.Tensor, num_negatives: int, temperature: float, proximal: float,
    loss_type: int, z_ema: float, exclude_positive: bool, noise_probs: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_2d_float("features", features)
    _check_2d_float("memory", memory)
    _check_device(features)
    B, D = features.shape
    N = memory.shape[0]
    if memory.shape[1] != D:
        raise ValueError(f"memory has dim {memory.shape[1]} but features have dim {D}")
    if indices.shape != (B,):
        raise ValueError(f"indices must have shape ({B},), got {tuple(indices.shape)}")
    if neg_indices is not None:
        if neg_indices.dim() != 2 or neg_indices.shape[0] != B or neg_indices.shape[1] != num_negatives:
            raise ValueError(f"neg_indices must have shape ({B}, num_negatives={num_negatives}), "
                             f"got {tuple(neg_indices.shape)}")
    elif noise_probs is not None:
        raise ValueError("noise_probs needs explicit neg_indices (in-kernel draws are uniform)")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if loss_type not in (0, 1):
        raise ValueError(f"loss_type must be 0 (nce) or 1 (infonce), got {loss_type}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if exclude_positive and neg_indices is None and N < 2:
        raise ValueError("exclude_positive needs a memory bank with at least 2 rows")
    if z.numel() != 1 or seed.numel() != 1:
        raise ValueError(f"z and seed must have one element, got shapes {tuple(z.shape)} and {tuple(seed.shape)}")
    if noise_probs is not None and noise_probs.shape != (N,):
        raise ValueError(f"noise_probs must have shape ({N},), got {tuple(noise_probs.shape)}")

    dev = features.device
    K, K1 = num_negatives, num_negatives + 1
    mem = _row_stride(memory)
    feats = features.contiguous()
    y = indices.to(torch.int64).contiguous()
    neg = neg_indices.to(torch.int64).contiguous() if neg_indices is not None else y
    noise = noise_probs.to(torch.float32).contiguous() if noise_probs is not None else y
    z_in = z.reshape(1).to(torch.float32)
    seed_t = seed.reshape(1).to(torch.int64)
    block_k, block_d, split, chunk, num_warps = _launch_params(B, K1, D, mem.dtype, dev)
    inv_T = 1.0 / temperature
    common = dict(HAS_NEG=neg_indices is not None, EXCLUDE=bool(exclude_positive),
                  BLOCK_K=block_k, BLOCK_D=block_d, num_warps=num_warps)
    f32 = dict(dtype=torch.float32, device=dev)

    zbuf = torch.empty(2, **f32)                                  # (Z, log Z)
    if loss_type == 0:
        esum = torch.empty(B * split, **f32)
        emax = torch.empty(B * split, **f32)
        _esum_kernel[(B, split)](feats, mem, y, neg, seed_t, z_in, esum, emax, N, D, mem.stride(0), K, K1, chunk,
                                 split, inv_T, ALWAYS=z_ema > 0, **common)
        _log_z_kernel[(1,)](esum, emax, z_in, zbuf, B * split, math.log(N / (B * K1)), float(z_ema),
                            ALWAYS=z_ema > 0, BLOCK=min(1024, max(16, triton.next_power_of_2(B * split))))
    part_a = torch.empty(B, split, **f32)
    part_m = torch.empty(B, split, **f32)
    part_g = torch.empty(B, split, D, **f32)
    _nce_kernel[(B, split)](feats, mem, y, neg, noise, seed_t, zbuf, part_a, part_m, part_g,
                            N, D, mem.stride(0), K, K1, chunk, split, inv_T, float(K), K / N,
                            LOSS=loss_type, HAS_NOISE=noise_probs is not None, **common)
    loss_rows = torch.empty(B, **f32)
    grad = torch.empty(B, D, **f32)
    _combine_kernel[(B,)](part_a, part_m, part_g, feats, mem, y, loss_rows, grad, D, mem.stride(0), split,
                          inv_T, 1.0 / B, float(proximal), LOSS=loss_type, HAS_PROX=proximal > 0,
                          BLOCK_S=max(2, triton.next_power_of_2(split)), BLOCK_D=block_d, num_warps=num_warps)
    loss = loss_rows.sum()
    z_out = zbuf[:1].clone() if loss_type == 0 else z_in.clone()
    if features.dtype == torch.float64:
        loss, grad = loss.double(), grad.double()
    return loss, grad, z_out

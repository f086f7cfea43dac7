"""Shared negatives: NCE / InfoNCE with one set of K negatives per step, as two GEMMs.

``nce_loss(..., negatives="shared")`` lands here (``shared_step``). Every row
b of the batch is scored against its own positive V[y[b]] and against the same
K bank rows V[n_1..n_K]; the step is then S = F G^T / T with G the K gathered
rows (read once, not B*(K+1) times) and the gradient coef @ G.

Op contract, shared by every backend::

    nce_shared_forward_<impl>(features (B,D), memory (N,D), indices (B,) int64,
        neg_indices (K,) int64, z (1,) float32, temperature T, proximal lambda,
        loss_type (0 nce, 1 infonce), z_ema a (0 = off), exclude_positive,
        noise_probs (N,) float32 | None, precision "fp32" | "bf16", chunk_size)
        -> (loss 0-dim, grad_features (B,D), z_out (1,) float32)

* loss and grad are float64 for float64 features, else float32; grad is
  dloss/dfeatures (backward only scales it, ops/_saved_grad.py). The bank is
  only read; the update is the separate op bank_update_ (after the loss).
* Entry (b, k) of the B x K score block is s[b,k] = V[n_k] . F[b]; the positive
  of row b is s0[b] = V[y[b]] . F[b].
* exclude_positive: entry (b, k) is *masked* when n_k == y[b] (a shared set
  cannot skip each row's positive while drawing). A masked entry is dropped
  from every sum of row b: from its NCE negative terms and gradient, from its
  InfoNCE softmax, and from the Z estimate (whose mean is then over the
  B + B*K - #masked unmasked entries). The K of the noise term K*Pn stays K.
  Without exclude_positive a shared negative equal to the row's positive is an
  ordinary negative (as per-sample negatives are).
* NCE (lemniscate's terms, per unmasked entry, c = K * Pn + 1e-7 with Pn = 1/N
  or noise_probs[index]): loss = (1/B) [ sum_b -log(P0/(P0 + c0))
  + sum_(b,k) -log((c - 1e-7)/(P + c)) ], P = exp(s/T) / Z. Computed as
  softplus(-x0) and softplus(x) + log(c/(c - 1e-7)) with x = s/T - log Z - log c
  (no exp(s/T) is ever formed), gradient coefficients sigmoid(x) / (T B) on the
  negatives and -sigmoid(-x0) / (T B) on the positive.
* Z (NCE only; InfoNCE returns z unchanged): if z[0] <= 0, Z = N * mean of
  exp(s/T) over the B positives and the B*K (unmasked) scores; elif z_ema > 0,
  Z = a z[0] + (1-a) * that estimate; else Z = z[0]. Computed in log space
  (float64); a Z that float32 cannot hold raises ValueError (nothing written).
  When Z is estimated, the scores are computed twice (one extra GEMM pass).
* InfoNCE: loss = mean_b [ logsumexp([s0, unmasked s[b,:]] / T) - s0/T ], by
  an online log-sum-exp over the K columns (running max m, sum l, A = sum w G);
  grad = exp(m - M) (A - l V[y]) / (l_tot T B): masked entries are rows equal
  to V[y], so they only change the denominator l_tot.
* proximal: adds lambda/B sum_b ||F[b] - V[y[b]]||^2 and its gradient.

Implementations (TABLE below; docs/backends.md):
  "eager"  -> instdisc::nce_shared_forward_chunked: ATen GEMMs over
      K-chunks of ``chunk_size`` columns (default ops/softmax.default_chunk_size),
      the epilogue per B x chunk tile in preallocated buffers; peak extra
      memory O(K D + B chunk), never B x K; any device (cuBLAS on CUDA tensors).
  "cpu"    -> instdisc::nce_shared_forward_cpu; CPU only. With fp32 features, a contiguous bank
      on an AVX2+ CPU and fp32 products (or bf16 ones where the CPU has no native bf16 GEMM: the
      pass rounds both operands to bf16) each pass over the K rows is one C++ op that reads them
      from the bank by neg_indices and keeps the scores in register tiles (no gathered copy, no
      B x chunk tile, no per-chunk ATen call): nce_shared_lse_pass for the
      Z estimate, nce_shared_nce_pass for NCE's softplus sum and sigmoid-weighted row sum
      (csrc/cpu/nce_shared.cpp), softmax_online_state for InfoNCE (csrc/cpu/softmax.cpp).
      Otherwise the same tiles and ATen GEMMs as "eager", each tile's epilogue one C++ pass
      while the tile is in cache (nce_shared_tile_nce_, nce_shared_tile_lse,
      nce_shared_tile_softmax_) instead of five to seven ATen elementwise passes.
  "triton" -> instdisc::nce_shared_forward_triton (ops/nce_shared_triton.py).
  No CUDA C++ kernel ("cuda"). ``forward_full`` below computes the full
  B x K block with an explicit mask (tests cross-check against it; not a backend).

precision "bf16" (the chunked eager path and Triton): features/T, the gathered rows
and the gradient coefficients are rounded to bfloat16 for the products (fp32
accumulation; on CPU ATen rounds the product outputs to bf16 too; on a CPU
without native bf16 GEMMs the bf16-rounded features/T and rows are multiplied in
fp32, at fp32 speed, like ops/softmax.py). The
positive scores, Z combination, exp/log and all sums stay fp32/float64. Bound
(u = 2^-8, r = max|F| max|V| / T, delta = 3.05 u r, as in ops/softmax.py):
every negative logit is off by at most delta, so
  InfoNCE: |loss error| <= delta, |grad error|_row <= max|V| ((e^(2 delta) - 1)(1 + 3u) + 3.2u) / (T B);
  NCE: log Z (when estimated) is off by <= delta, each x by <= 2 delta, so
      |loss error| <= 2 delta (K + 1) and |grad error|_row <= max|V| K (delta / 2 + 3.2u) / (T B)
(softplus is 1-Lipschitz, sigmoid 1/4-Lipschitz). These are worst cases;
measured errors are far smaller (python_tests/nce/test_nce_shared.py checks both).

Negatives (shared_step): neg_indices (K,) as given, or drawn once per
call as ``draw_negatives(indices[:1], N, K, generator=generator,
noise_probs=noise_probs)`` of ops/nce.py viewed as (K,): the eager
backend's per-sample rule for a single row, i.e. torch.randint(0, N, (K,),
generator=generator) (torch.multinomial(noise_probs, K, replacement=True)
with noise_probs), on the generator's device. exclude_positive masks instead
of re-drawing.
"""
from __future__ import annotations

import math

import torch

from .. import _backend, _validate
from . import _saved_grad
from ._formulas import EPS, nce_negative, nce_positive, opmath, product_operand, proximal_terms
from .bank_update import backend_after_loss
from .nce import LOSS_TYPES, draw_negatives, finish_step
from .softmax import PRECISIONS, cpu_one_pass, default_chunk_size, one_pass_precision, softmax_step

LOG_F32_MAX = math.log(torch.finfo(torch.float32).max)


# --------------------------------------------------------------------------- #
# Pieces shared by every implementation                                        #
# --------------------------------------------------------------------------- #
def masked_counts(indices, neg_indices, acc):
    """(B,) number of shared negatives equal to each row's positive."""
    srt = torch.sort(neg_indices).values
    lo = torch.searchsorted(srt, indices, right=False)
    hi = torch.searchsorted(srt, indices, right=True)
    return (hi - lo).to(acc)


def noise_c(idx, N, K, noise_probs, acc):
    """c = K * Pn + EPS for the bank rows idx (Pn = 1/N, or noise_probs[idx])."""
    if noise_probs is None:
        return torch.full(idx.shape, K / N + EPS, dtype=acc, device=idx.device)
    return K * noise_probs[idx].to(acc) + EPS


def combine_log_z(log_est, z, z_ema):
    """log Z from the batch estimate (float64 0-dim) and the z input, by the op contract."""
    z0 = float(z[0])
    if z0 <= 0:
        log_z = log_est
    elif z_ema > 0:
        log_z = torch.logaddexp(log_est + math.log1p(-z_ema), torch.tensor(math.log(z_ema) + math.log(z0),
                                                                           dtype=torch.float64, device=z.device))
    else:
        return torch.tensor(math.log(z0), dtype=torch.float64, device=z.device)
    # NaN or +-inf from float64 sums of float32 scores: a non-finite score (bank row), which
    # nce_loss's output check names; only a finite estimate can be too large for float32
    if not bool(torch.isfinite(log_z)):
        return log_z
    if float(log_z) > LOG_F32_MAX:
        raise ValueError(f"the Z estimate exp({float(log_z):.4g}) is not representable in float32: the scores "
                         "s/T are too large (normalise the features/bank rows or raise the temperature)")
    return log_z


def log_z_estimate(log_sum, count, N):
    """log(N * sum / count) from log(sum) (float64 0-dim)."""
    return log_sum + math.log(N) - math.log(count)


def positive_terms(F, Vy, temperature, proximal):
    """Positive logits s0/T (acc) and the proximal (loss, grad) pieces."""
    t0 = (F * Vy).sum(1) / temperature
    if proximal > 0:
        return (t0,) + proximal_terms(F, Vy, proximal)
    return t0, None, None


def nce_positive_and_masks(t0, log_z, c0, cnt, K_consts):
    """The NCE loss sum of the positives, minus the masked entries, plus the per-entry
    constants log(c/(c-EPS)); and the gradient coefficients (times T B) on V[y].

    c0: the positives' c, (B,), or one float for all (uniform noise); K_consts: sum over all B*K
    entries of log(c/(c - EPS)) (a float64 0-dim, or a float)."""
    log = math.log if isinstance(c0, float) else torch.log
    x0 = t0 - log_z.to(t0.dtype) - log(c0)
    pos = torch.nn.functional.softplus(-x0).sum()
    coef0 = -torch.sigmoid(-x0)
    if cnt is not None:        # a masked entry has the positive's own score and c
        pos = pos - (cnt * (torch.nn.functional.softplus(x0) + log(c0 / (c0 - EPS)))).sum()
        coef0 = coef0 - cnt * torch.sigmoid(x0)
    return pos.double() + K_consts, coef0


def infonce_finish(m, l, A, t0, cnt, Vy, temperature):
    """Merge the positive into the online log-sum-exp state (m, l, A) of the negatives."""
    B = t0.shape[0]
    M = torch.maximum(m, t0)
    a = torch.exp(m - M)
    e0 = torch.exp(t0 - M)
    lneg = l * a
    if cnt is not None:
        lneg = (lneg - cnt * e0).clamp_min(0)
    ltot = e0 + lneg
    loss = (M + torch.log(ltot) - t0).mean()
    grad = (a / ltot)[:, None] * (A - l[:, None] * Vy) / (temperature * B)
    return loss, grad


def _finish(loss, grad, prox_loss, prox_grad, z_out):
    if prox_loss is not None:
        loss = loss + prox_loss
        grad = grad + prox_grad
    return loss, grad, z_out


# --------------------------------------------------------------------------- #
# Chunked ATen implementation ("eager" backend)                                #
# --------------------------------------------------------------------------- #
class _Tiles:
    """B x chunk score tiles over the K gathered rows, in buffers allocated once per call."""

    def __init__(self, Fs, G, chunk, acc, fused=False):
        """fused: the epilogues are the C++ one-pass tile ops (csrc/cpu/nce_shared.cpp; CPU)."""
        B, D = Fs.shape
        self.Fs, self.G, self.chunk, self.B, self.fused = Fs, G, chunk, B, fused
        dev = Fs.device
        self.s_buf = torch.empty(B * chunk, dtype=acc, device=dev)
        self.t_buf = torch.empty(B * chunk, dtype=acc, device=dev)
        self.u_buf = None
        self.low = G.dtype != acc
        if self.low:
            self.lo_buf = torch.empty(B * chunk, dtype=G.dtype, device=dev)
            self.pv = torch.empty(B, D, dtype=G.dtype, device=dev)

    def __iter__(self):
        K = self.G.shape[0]
        for start in range(0, K, self.chunk):
            yield start, min(self.chunk, K - start)

    def scores(self, start, n, bias=None):
        """(S = Fs G_c^T (+ bias[start:start+n]), G_c) for columns [start, start + n)."""
        B = self.B
        Gc = self.G[start:start + n]
        S = self.s_buf[:B * n].view(B, n)
        if self.low:
            Sl = self.lo_buf[:B * n].view(B, n)
            torch.mm(self.Fs, Gc.t(), out=Sl)
            S.copy_(Sl)
            if bias is not None:
                S.add_(bias[start:start + n])
        elif bias is not None:
            torch.addmm(bias[start:start + n], self.Fs, Gc.t(), out=S)
        else:
            torch.mm(self.Fs, Gc.t(), out=S)
        return S, Gc

    def softplus_sum(self, S):
        """sum softplus(S) (float64 0-dim); S is kept. On CPU ATen's softplus and log1p are
        scalar loops (~20 ns an entry): exp in the tile's dtype, 1 + e in float64, then one
        log per row of the float64 product of its (1 + e) (a product of n terms is off by
        <= ~n 2^-53 relative, so the row's sum by <= ~n 1.1e-16 absolute). If a row's
        product overflows (large scores), one log per entry; if an exp overflowed, ATen's
        softplus."""
        Tt = self.t_buf[:S.numel()].view(S.shape)
        if S.device.type == "cpu":
            torch.exp(S, out=Tt)
            if self.u_buf is None:
                self.u_buf = torch.empty(self.s_buf.numel(), dtype=torch.float64, device=S.device)
            U = self.u_buf[:S.numel()].view(S.shape).copy_(Tt)
            total = torch.prod(U.add_(1), 1).log_().sum()
            if bool(torch.isfinite(total)):
                return total
            total = U.log_().sum()
            if bool(torch.isfinite(total)):
                return total
        torch.ops.aten.softplus.out(S, 1, 20, out=Tt)
        return Tt.sum().double()

    def nce_epilogue(self, S):
        """sum softplus(S) (float64 0-dim), S replaced by sigmoid(S) (NCE's gradient weights)."""
        if self.fused:
            return torch.ops.instdisc.nce_shared_tile_nce_(S)
        total = self.softplus_sum(S)
        S.sigmoid_()
        return total

    def tile_lse(self, S):
        """log sum exp over the tile (float64 0-dim); S may be overwritten."""
        if self.fused:
            return torch.ops.instdisc.nce_shared_tile_lse(S)
        cm = S.max().double()
        return cm + torch.log(S.sub_(cm.to(S.dtype)).exp_().sum().double())

    def softmax_step(self, S, m, l, work):
        """InfoNCE's online softmax over one tile: per row M' = max(m, max S), S <- exp(S - M'),
        l <- l exp(m - M') + sum S, m <- M'; returns exp(m_old - M') (B,). work: two (B,) buffers."""
        return softmax_step(S, m, l, work, self.fused)

    def accumulate(self, A, W, Gc):
        """A += W @ G_c (W rounded to the product dtype)."""
        if self.low:
            Wl = self.lo_buf[:W.numel()].view(W.shape).copy_(W)
            torch.mm(Wl, Gc, out=self.pv)
            A.add_(self.pv)
        else:
            A.addmm_(W, Gc)


def _log_sum_exp_all(tiles, extra):
    """log of sum exp over every score tile plus the (B,) logits ``extra`` (float64 0-dim)."""
    M = extra.max().double()
    total = torch.exp(extra.double() - M).sum()
    for start, n in tiles:
        S, _ = tiles.scores(start, n)
        lse = tiles.tile_lse(S)
        M_new = torch.maximum(M, lse)
        total = total * torch.exp(M - M_new) + torch.exp(lse - M_new)
        M = M_new
    return M + torch.log(total)


def forward_chunked(features, memory, indices, neg_indices, z, temperature, proximal, loss_type, z_ema,
                    exclude_positive, noise_probs, precision="fp32", chunk_size=0, fused=False):
    """(loss, grad, z_out) by the op contract, with tiled ATen GEMMs; fused: each tile's
    epilogue is one C++ pass (backend "cpu") instead of ATen's elementwise ops."""
    acc = opmath(features.dtype)
    B, D = features.shape
    N, K = memory.shape[0], neg_indices.shape[0]
    T = temperature
    F = features.to(acc)
    # fused on an AVX2+ CPU, fp32 products or bf16 ones without native bf16 GEMMs: each pass over the
    # K rows is one C++ op reading them from the bank by neg_indices (scores in register tiles, no
    # gathered copy, no B x chunk tile; csrc/cpu/nce_shared.cpp, softmax.cpp)
    one_pass = (fused and one_pass_precision(precision, F.device) and cpu_one_pass(F, memory)
                and memory.is_contiguous() and _backend.has_kernel("nce_shared_nce_pass", "CPU"))
    if one_pass:
        Fs = F / T
        rows = (memory, neg_indices, precision == "bf16")                # read in the pass
        tiles = None
    else:
        Fs = product_operand(F / T, precision, acc)                   # bf16, or bf16-valued fp32
        G = product_operand(memory.index_select(0, neg_indices), precision, acc)   # the K rows, read once
        chunk = min(chunk_size if chunk_size > 0 else default_chunk_size(B, K), K)
        tiles = _Tiles(Fs, G, chunk, acc, fused)
    Vy = memory.index_select(0, indices).to(acc)
    t0, prox_loss, prox_grad = positive_terms(F, Vy, T, proximal)
    cnt = masked_counts(indices, neg_indices, acc) if exclude_positive else None
    z_out = z.to(torch.float32).clone()
    if loss_type == 1:
        if one_pass:
            m, l, A = torch.ops.instdisc.softmax_online_state(Fs, *rows)
        else:
            A = torch.zeros(B, D, dtype=acc, device=F.device)
            m = torch.full((B,), float("-inf"), dtype=acc, device=F.device)
            l = torch.zeros(B, dtype=acc, device=F.device)
            work = (torch.empty(B, dtype=acc, device=F.device), torch.empty(B, dtype=acc, device=F.device))
            for start, n in tiles:
                S, Gc = tiles.scores(start, n)
                scale = tiles.softmax_step(S, m, l, work)
                A.mul_(scale[:, None])
                tiles.accumulate(A, S, Gc)
        loss, grad = infonce_finish(m, l, A, t0, cnt, Vy, T)
        return _finish(loss, grad, prox_loss, prox_grad, z_out)
    if float(z[0]) <= 0 or z_ema > 0:
        if one_pass:
            log_all = torch.logaddexp(torch.logsumexp(t0.double(), 0), torch.ops.instdisc.nce_shared_lse_pass(Fs, *rows))
        else:
            log_all = _log_sum_exp_all(tiles, t0)
        if cnt is not None:      # remove the masked entries (each has the positive's score)
            log_mask = torch.logsumexp(t0.double() + torch.log(cnt.double()), 0)
            log_all = log_all + torch.log1p(-torch.exp(log_mask - log_all).clamp_max(1 - 1e-16))
        count = B * (K + 1) - (0 if cnt is None else int(cnt.sum()))
        log_z = combine_log_z(log_z_estimate(log_all, count, N), z, z_ema)
        z_out = torch.exp(log_z).to(torch.float32).reshape(1)
    else:
        log_z = combine_log_z(None, z, 0.0)
    if noise_probs is None:       # uniform noise: every c is K/N + EPS, Python floats (no K-length ops)
        c0 = K / N + EPS
        bias = torch.full((K,), -math.log(c0), dtype=acc, device=F.device).sub_(log_z)
        K_consts = B * K * math.log(c0 / (c0 - EPS))
    else:
        c = noise_c(neg_indices, N, K, noise_probs, acc)                # (K,)
        bias = -(torch.log(c) + log_z.to(acc))
        K_consts = B * torch.log(c.double() / (c.double() - EPS)).sum()
        c0 = noise_c(indices, N, K, noise_probs, acc)
    if one_pass:
        lsum, A = torch.ops.instdisc.nce_shared_nce_pass(Fs, rows[0], bias, *rows[1:])
    else:
        A = torch.zeros(B, D, dtype=acc, device=F.device)
        lsum = torch.zeros((), dtype=torch.float64, device=F.device)
        for start, n in tiles:
            S, Gc = tiles.scores(start, n, bias)
            lsum += tiles.nce_epilogue(S)
            tiles.accumulate(A, S, Gc)
    pos, coef0 = nce_positive_and_masks(t0, log_z, c0, cnt, K_consts)
    loss = ((lsum + pos) / B).to(acc)
    grad = (A + coef0[:, None] * Vy) / (T * B)
    return _finish(loss, grad, prox_loss, prox_grad, z_out)


# --------------------------------------------------------------------------- #
# The full B x K block (cross-checks; not a backend)                           #
# --------------------------------------------------------------------------- #
def forward_full(features, memory, indices, neg_indices, z, temperature, proximal, loss_type, z_ema,
                  exclude_positive, noise_probs, precision="fp32", chunk_size=0):
    """(loss, grad, z_out) through the full B x K block (chunk_size is ignored)."""
    acc = opmath(features.dtype)
    cd = torch.bfloat16 if precision == "bf16" else acc
    B = features.shape[0]
    N, K = memory.shape[0], neg_indices.shape[0]
    T = temperature
    F = features.to(acc)
    G = memory[neg_indices].to(cd)
    Vy = memory[indices].to(acc)
    s = torch.mm((F / T).to(cd), G.t()).to(acc)                          # B x K logits
    t0, prox_loss, prox_grad = positive_terms(F, Vy, T, proximal)
    keep = torch.ones(B, K, dtype=torch.bool, device=F.device)
    if exclude_positive:
        keep = neg_indices.view(1, -1) != indices.view(-1, 1)
    z_out = z.to(torch.float32).clone()
    if loss_type == 1:
        logits = torch.cat([t0[:, None], s.masked_fill(~keep, float("-inf"))], 1)
        loss = (torch.logsumexp(logits, 1) - t0).mean()
        w = torch.softmax(logits, 1)
        grad = (torch.mm(w[:, 1:].to(cd), G).to(acc) - (1 - w[:, 0:1]) * Vy) / (T * B)
        return _finish(loss, grad, prox_loss, prox_grad, z_out)
    if float(z[0]) <= 0 or z_ema > 0:
        all_logits = torch.cat([t0, s[keep]]).double()
        log_est = log_z_estimate(torch.logsumexp(all_logits, 0), all_logits.numel(), N)
        log_z = combine_log_z(log_est, z, z_ema)
        z_out = torch.exp(log_z).to(torch.float32).reshape(1)
    else:
        log_z = combine_log_z(None, z, 0.0)
    # lemniscate's terms of log P = s/T - log Z (ops/_formulas.py), masked entries dropped
    kp = K / N if noise_probs is None else K * noise_probs[neg_indices].to(acc)
    kp0 = K / N if noise_probs is None else K * noise_probs[indices].to(acc)
    ln_neg, d_neg = nce_negative(s - log_z.to(acc), kp)
    ln_pos, d_pos = nce_positive(t0 - log_z.to(acc), kp0)
    loss = (ln_pos.sum().double() + torch.where(keep, ln_neg, 0).sum().double()) / B
    coef = torch.where(keep, d_neg, 0)
    grad = (torch.mm(coef.to(cd), G).to(acc) + d_pos[:, None] * Vy) / (T * B)
    loss = loss.to(acc)
    return _finish(loss, grad, prox_loss, prox_grad, z_out)


# --------------------------------------------------------------------------- #
# Registration                                                                 #
# --------------------------------------------------------------------------- #
def define_op(name, impl):
    """Register ``impl(features, ..., precision, chunk_size)`` as the custom op ``name``, with
    the op contract's schema, the fake kernel and the saved-gradient autograd."""
    def forward(
        features: torch.Tensor, memory: torch.Tensor, indices: torch.Tensor, neg_indices: torch.Tensor,
        z: torch.Tensor, temperature: float, proximal: float, loss_type: int, z_ema: float,
        exclude_positive: bool, noise_probs: torch.Tensor | None, precision: str, chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return impl(features, memory, indices, neg_indices, z, temperature, proximal, loss_type, z_ema,
                    exclude_positive, noise_probs, precision, chunk_size)

    op = torch.library.custom_op(name, forward, mutates_args=())
    _saved_grad.register(name, _fake)
    return op


def _fake(features, memory, indices, neg_indices, z, temperature, proximal, loss_type, z_ema, exclude_positive,
          noise_probs, precision, chunk_size):
    acc = opmath(features.dtype)
    return (features.new_empty((), dtype=acc), features.new_empty(features.shape, dtype=acc),
            z.new_empty((1,), dtype=torch.float32))


def forward_cpu(features, memory, indices, neg_indices, z, temperature, proximal, loss_type, z_ema,
                exclude_positive, noise_probs, precision="fp32", chunk_size=0):
    """forward_chunked with the C++ tile epilogues (csrc/cpu/nce_shared.cpp)."""
    return forward_chunked(features, memory, indices, neg_indices, z, temperature, proximal, loss_type, z_ema,
                           exclude_positive, noise_probs, precision, chunk_size, fused=True)


define_op("instdisc::nce_shared_forward_chunked", forward_chunked)
define_op("instdisc::nce_shared_forward_cpu", forward_cpu)
if _backend.op_handle("nce_shared_tile_nce_") is not None:     # a build with the tile epilogues
    @torch.library.register_fake("instdisc::nce_shared_tile_nce_")
    def _tile_nce_fake(scores):
        return scores.new_empty((), dtype=torch.float64)

    @torch.library.register_fake("instdisc::nce_shared_tile_lse")
    def _tile_lse_fake(scores):
        return scores.new_empty((), dtype=torch.float64)

    @torch.library.register_fake("instdisc::nce_shared_tile_softmax_")
    def _tile_softmax_fake(scores, row_max, row_sum):
        return scores.new_empty((scores.shape[0],))

if _backend.op_handle("nce_shared_nce_pass") is not None:
    @torch.library.register_fake("instdisc::nce_shared_nce_pass")
    def _nce_pass_fake(features, rows, bias, index=None, round_bf16=False):
        return features.new_empty((), dtype=torch.float64), features.new_empty(features.shape)

    @torch.library.register_fake("instdisc::nce_shared_lse_pass")
    def _lse_pass_fake(features, rows, index=None, round_bf16=False):
        return features.new_empty((), dtype=torch.float64)

try:
    from . import nce_shared_triton  # noqa: F401  (defines instdisc::nce_shared_forward_triton)
except ImportError:
    pass

TABLE = _backend.OpTable(
    "nce_loss(negatives='shared')",
    eager=_backend.Impl(torch.ops.instdisc.nce_shared_forward_chunked, "ops/nce_shared.py forward_chunked"),
    cpu=_backend.Impl(torch.ops.instdisc.nce_shared_forward_cpu,
                      "ops/nce_shared.py forward_cpu + csrc/cpu/nce_shared.cpp tile epilogues",
                      dispatch="nce_shared_tile_nce_"),
    triton=_backend.Impl(_backend.op_handle("nce_shared_forward_triton"),
                         "ops/nce_shared_triton.py forward_triton", triton=True),
)


# --------------------------------------------------------------------------- #
# The step behind nce_loss(..., negatives="shared")                            #
# --------------------------------------------------------------------------- #
def draw_shared_negatives(indices, num_samples, num_negatives, *, generator=None, noise_probs=None):
    """(K,) int64 shared negatives on indices' device, by the rule of the module docstring."""
    dev = generator.device if generator is not None else indices.device
    neg = draw_negatives(indices[:1].to(dev), num_samples, num_negatives, generator=generator,
                         noise_probs=None if noise_probs is None else noise_probs.to(dev))
    return neg.view(-1).to(indices.device)


def shared_entries(neg_indices, batch, lo, hi):
    """(rows, cols) entries of the sharded NCE (distributed/_sharded.py) for shared negatives:
    every batch row b against each shared negative in this shard's rows [lo, hi) (cols local)."""
    mine = neg_indices[(neg_indices >= lo) & (neg_indices < hi)] - lo
    rows = torch.arange(batch, device=neg_indices.device).repeat_interleave(mine.numel())
    return rows, mine.repeat(batch)


def check_shared_neg_indices(neg_indices, features, N, validate):
    _validate.check_tensor("neg_indices", neg_indices)
    if neg_indices.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"neg_indices must be an integer (int64) tensor, got {neg_indices.dtype}")
    if neg_indices.dim() != 1 or neg_indices.shape[0] < 1:
        raise ValueError("with negatives='shared', neg_indices must be 1-D of shape (K>=1,) (a 2-D (B, K) "
                         f"tensor means per-sample negatives), got {tuple(neg_indices.shape)}")
    _validate.check_same_device(features=features, neg_indices=neg_indices)
    if validate:
        _validate.check_index_range("neg_indices", neg_indices, N)
    return neg_indices.long().contiguous()


def shared_step(features, memory, indices, neg_indices, z_state, z_in, num_negatives, temperature, momentum,
                proximal, update_memory, generator, loss_type, z_ema, backend, exclude_positive, noise_probs,
                precision, chunk_size, validate=True):
    """nce_loss(..., negatives="shared") after nce_loss has checked its arguments (neg_indices
    with check_shared_neg_indices, noise_probs normalised): the loss; the bank update after it."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if chunk_size is not None:
        _validate.check_positive_int(chunk_size, "chunk_size")
    be = TABLE.select(backend, features.device)
    indices = indices.long().contiguous()
    if neg_indices is None:
        neg_indices = draw_shared_negatives(indices, memory.shape[0], num_negatives, generator=generator,
                                            noise_probs=noise_probs)
    loss, grad, z_out = TABLE[be](
        features.contiguous(), memory, indices, neg_indices, z_in, float(temperature), float(proximal),
        LOSS_TYPES[loss_type], float(z_ema or 0.0), bool(exclude_positive), noise_probs, precision,
        int(chunk_size or 0))
    # the same checks, Z store and update as per-sample nce_loss
    finish_step(features, memory, indices, (indices, neg_indices), loss, grad, z_out, z_state, loss_type,
                temperature, momentum, validate, update_memory, backend_after_loss(backend, features.device))
    return loss

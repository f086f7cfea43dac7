"""Per-shard math of the sharded bank (eager torch on the local rows).

Rank r holds rows [lo, hi) of the N x D bank. The global batch (features Fg,
indices yg; B_g rows in rank order) is known on every rank. An "entry" is one
(batch row b, bank row j) pair of the index matrix: the positive (b, yg[b])
lives on the owner of yg[b]; each negative on the owner of its row. A rank
computes the scores, loss terms and gradient contributions of its entries;
the global quantities come from small all_reduces (B_g or 2 numbers), and the
partial gradients (B_g x D) go back to the feature owners with a reduce-scatter
(done by the caller).
"""
from __future__ import annotations

import math

import torch

from ..ops import knn as _knn
from ..ops._formulas import nce_negative, nce_positive, proximal_terms
from ..ops.softmax import online_state
from . import _comm

ENTRY_CHUNK = 1 << 15          # gathered rows per chunk (bounds the B*K*D temporary)


def entry_scores(F, bank, rows, cols):
    """s[e] = bank[cols[e]] . F[rows[e]] in F's dtype, chunked over entries."""
    out = F.new_empty(rows.shape[0])
    for a in range(0, rows.shape[0], ENTRY_CHUNK):
        r, c = rows[a:a + ENTRY_CHUNK], cols[a:a + ENTRY_CHUNK]
        out[a:a + r.shape[0]] = (bank[c].to(F.dtype) * F[r]).sum(1)
    return out


def add_entry_grads_(grad, bank, rows, cols, coef):
    """grad[rows[e]] += coef[e] * bank[cols[e]]."""
    for a in range(0, rows.shape[0], ENTRY_CHUNK):
        r, c = rows[a:a + ENTRY_CHUNK], cols[a:a + ENTRY_CHUNK]
        grad.index_add_(0, r, coef[a:a + r.shape[0], None] * bank[c].to(grad.dtype))
    return grad


def owned_positives(yg, lo, hi):
    """(batch rows whose positive this shard owns, their local bank rows)."""
    prow = ((yg >= lo) & (yg < hi)).nonzero().squeeze(1)
    return prow, yg[prow] - lo


def negatives_from_matrix(neg_g, lo, hi):
    """Entries of an explicit (B_g, K) global negative matrix that fall in [lo, hi)."""
    mask = (neg_g >= lo) & (neg_g < hi)
    return mask.nonzero()[:, 0], neg_g[mask] - lo


def negatives_from_counts(counts, shard_rows, generator):
    """counts[b] negatives of batch row b, uniform (with replacement) over this shard's rows."""
    rows = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts.long())
    cols = torch.randint(0, shard_rows, (rows.shape[0],), generator=generator, device=counts.device)
    return rows, cols


def shard_counts(batch, num_negatives, num_samples, inner_bounds, generator):
    """(W, B) int32: how many of each local row's K uniform negatives fall in each shard.

    Drawn exactly as the single-process sampler (K uniform rows of [0, N)), then
    bucketed by shard; the owner of each shard redraws their positions uniformly
    within it, which gives the same distribution as global uniform sampling.
    """
    dev = inner_bounds.device
    neg = torch.randint(0, num_samples, (batch, num_negatives), generator=generator, device=dev)
    sid = torch.searchsorted(inner_bounds, neg, right=True)
    counts = torch.zeros(batch, inner_bounds.shape[0] + 1, dtype=torch.int32, device=dev)
    counts.scatter_add_(1, sid, torch.ones_like(sid, dtype=torch.int32))
    return counts.t().contiguous()


def nce(F, yg, bank, lo, neg_rows, neg_cols, *, num_samples, num_negatives, temperature, z, z_ema,
        loss_type, proximal, need_grad, group):
    """Global NCE / InfoNCE loss over the sharded bank and this shard's partial gradient.

    F: (B_g, D) gathered features in the accumulation dtype. z: the Z state value
    (<= 0: estimate it from this batch). Returns (loss, partial grad or None, Z used or None).
    """
    Bg, N, K, T = F.shape[0], num_samples, num_negatives, temperature
    prow, pcol = owned_positives(yg, lo, lo + bank.shape[0])
    npos = prow.shape[0]
    rows, cols = torch.cat([prow, neg_rows]), torch.cat([pcol, neg_cols])
    x = entry_scores(F, bank, rows, cols) / T
    z_used = None
    if loss_type == "infonce":
        m = torch.full((Bg,), float("-inf"), dtype=F.dtype, device=F.device)
        m.scatter_reduce_(0, rows, x, "amax")
        _comm.all_reduce_(m, "max", group)
        lsum = torch.zeros(Bg, dtype=F.dtype, device=F.device).index_add_(0, rows, torch.exp(x - m[rows]))
        _comm.all_reduce_(lsum, "sum", group)
        lse = m + torch.log(lsum)
        part = (lse[prow] - x[:npos]).sum()
        coef = torch.exp(x - lse[rows])
        coef[:npos] -= 1
        coef /= Bg * T
    else:
        if z <= 0 or z_ema is not None:
            log_z = _log_z_estimate(x, N, group)
            if z > 0:                                              # log(a z + (1 - a) est)
                log_z = torch.logaddexp(log_z + math.log1p(-z_ema), torch.tensor(
                    math.log(z_ema * z), dtype=torch.float64, device=F.device))
        else:
            log_z = torch.tensor(math.log(z), dtype=torch.float64, device=F.device)
        z_used = torch.exp(log_z).to(F.dtype)
        lp = x - log_z.to(F.dtype)                                 # log P, P = exp(s/T) / Z
        t_pos, d_pos = nce_positive(lp[:npos], K / N)              # ops/_formulas.py
        t_neg, d_neg = nce_negative(lp[npos:], K / N)
        part = t_pos.sum() + t_neg.sum()
        coef = torch.cat([d_pos, d_neg]) / (T * Bg)
    grad = None
    if need_grad:
        grad = add_entry_grads_(torch.zeros_like(F), bank, rows, cols, coef)
    loss = (part / Bg).reshape(1)
    if proximal > 0 and npos:
        p_loss, p_grad = proximal_terms(F[prow], bank[pcol].to(F.dtype), proximal, batch=Bg)
        loss = loss + p_loss
        if need_grad:
            grad.index_add_(0, prow, p_grad)
    _comm.all_reduce_(loss, "sum", group)
    return loss[0], grad, z_used


def _log_z_estimate(x, num_samples, group):
    """log(N * mean exp(x)) over every rank's entries x (float64 0-dim), as a log-sum-exp."""
    m = (x.max().to(torch.float64) if x.numel() else torch.tensor(float("-inf"), dtype=torch.float64,
                                                                   device=x.device)).reshape(1)
    _comm.all_reduce_(m, "max", group)
    tot = torch.stack([torch.exp(x.to(torch.float64) - m[0]).sum(),
                       torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)])
    _comm.all_reduce_(tot, "sum", group)
    return m[0] + torch.log(tot[0] / tot[1]) + math.log(num_samples)


def exact_softmax(F, yg, bank, lo, *, temperature, need_grad, group, proximal=0.0):
    """Exact non-parametric softmax (docs/method.md) over the sharded bank, plus the proximal term of
    the positives this shard owns. One streaming pass over the shard (the "cpu" backend's
    online log-sum-exp, ops/softmax.py) gives its (m, l, A); the global row max and sum come
    from two all_reduces of B_g numbers, and A rescaled is this shard's partial gradient."""
    Bg, T = F.shape[0], temperature
    m, lsum, A = online_state(F, bank, T)
    m_all = _comm.all_reduce_(m.clone(), "max", group)
    w = torch.exp(m - m_all)                                      # this shard's rescaling
    lsum_all = _comm.all_reduce_(lsum * w, "sum", group)
    lse = m_all + torch.log(lsum_all)
    prow, pcol = owned_positives(yg, lo, lo + bank.shape[0])
    Vy = bank[pcol].to(F.dtype)
    part = ((lse[prow] - (F[prow] * Vy).sum(1) / T).sum() / Bg).reshape(1)
    p_grad = None
    if proximal > 0 and prow.numel():
        p_loss, p_grad = proximal_terms(F[prow], Vy, proximal, batch=Bg)
        part = part + p_loss
    loss = _comm.all_reduce_(part, "sum", group)[0]
    grad = None
    if need_grad:
        grad = A.mul_((w / lsum_all)[:, None])                   # sum_j softmax_j V[j] over this shard
        grad.index_add_(0, prow, -Vy)
        grad /= T * Bg
        if p_grad is not None:
            grad.index_add_(0, prow, p_grad)
    return loss, grad


def topk_padded(queries, bank, lo, k):
    """Per-shard top-k of queries @ bank.T: (values, global indices), padded to k with -inf."""
    vals, idx = _knn.search(queries, bank, min(k, bank.shape[0]))
    if vals.shape[1] < k:
        pad = k - vals.shape[1]
        vals = torch.cat([vals, vals.new_full((vals.shape[0], pad), float("-inf"))], 1)
        idx = torch.cat([idx, idx.new_zeros((idx.shape[0], pad)) - lo], 1)
    return vals, idx + lo


def merge_topk(vals, idx, world, k):
    """Merge (W*Q, k) per-shard lists (blocks in shard order) into the top k per query.

    Shards hold increasing row ranges and each list has ties in index order, so a
    stable sort of the concatenation keeps ties at the lower bank index, as the
    single-process search does."""
    q = vals.shape[0] // world
    vals = vals.view(world, q, k).permute(1, 0, 2).reshape(q, world * k)
    idx = idx.view(world, q, k).permute(1, 0, 2).reshape(q, world * k)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
    return vals.gather(1, order), idx.gather(1, order)

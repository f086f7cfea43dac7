"""Eager baselines written the way lemniscate.pytorch computes each op (docs/method.md, docs/lemniscate.md).

They are what a user runs without this library, so they are not tuned beyond
what the original code does; low-precision banks compute the matmuls in the
bank dtype (the cheapest eager choice, as under autocast) and the loss in fp32.

* NCE: idx uniform with column 0 = y; weight = index_select(memory, idx)
  (B x (K+1) x D); bmm with x; /T; exp; /Z; NCECriterion; autograd backward;
  then memory.index_copy_(y, normalize(m * V_old[y] + (1 - m) * x)), V_old[y]
  taken from the gathered positive rows as lemniscate does.
* exact softmax: cross_entropy(x @ V.T / T, y), autograd, then the update.
* kNN: lemniscate test.py's loop over query batches (mm against all train
  features, topk, one-hot scatter of the labels weighted by exp(sim / sigma)).
* search alone (no vote): mm of a query batch against all train features and topk,
  batches sized so one batch's similarities stay under 256 MB.
* bank update alone: index_select / mul / add / normalize / index_copy_.

The ``*_fn`` functions are pure (no in-place bank writes) and are what the
torch.compile provider compiles.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-7  # lemniscate's NCECriterion eps


# --------------------------------------------------------------------------- #
# Sampled-negative NCE                                                         #
# --------------------------------------------------------------------------- #
def draw_idx(y, num_samples, num_negatives):
    """(B, K+1) uniform draws with replacement, column 0 overwritten with y."""
    idx = torch.randint(0, num_samples, (y.shape[0], num_negatives + 1), device=y.device)
    idx[:, 0] = y
    return idx


def nce_criterion(probs, num_samples):
    """lemniscate's NCECriterion: summed over the negatives, divided by B."""
    B, K1 = probs.shape
    kpn = (K1 - 1) / num_samples
    ln_pos = torch.log(probs[:, 0] / (probs[:, 0] + kpn + EPS))
    ln_neg = torch.log(kpn / (probs[:, 1:] + kpn + EPS))
    return -(ln_pos.sum() + ln_neg.sum()) / B


def nce_forward_eager(x, memory, idx, temperature, z):
    """(loss, gathered weight). z: a float or 0-dim tensor (fixed Z)."""
    B, D = x.shape
    weight = torch.index_select(memory, 0, idx.view(-1)).view(B, idx.shape[1], D)
    out = torch.bmm(weight, x.to(weight.dtype).unsqueeze(2)).squeeze(2).float()
    probs = torch.exp(out / temperature) / z
    return nce_criterion(probs, memory.shape[0]), weight


def nce_loss_fn(x, memory, y, num_negatives, temperature, z):
    """Draw, gather, score and NCE loss (the part torch.compile sees)."""
    idx = draw_idx(y, memory.shape[0], num_negatives)
    return nce_forward_eager(x, memory, idx, temperature, z)[0]


def nce_step_eager(x, memory, y, num_negatives, temperature, z, momentum):
    """One lemniscate training step of the NCE head: forward, backward, bank update."""
    x.grad = None
    idx = draw_idx(y, memory.shape[0], num_negatives)
    loss, weight = nce_forward_eager(x, memory, idx, temperature, z)
    loss.backward()
    with torch.no_grad():
        _write_rows(memory, y, weight[:, 0], x, momentum)
    return loss


def nce_shared_step_eager(x, memory, y, num_negatives, temperature, z, momentum):
    """The same step with one set of K negatives for the batch, written the plain eager way:
    gather the K rows, B x K logits by mm, NCECriterion on [positive, K shared], autograd."""
    x.grad = None
    neg = torch.randint(0, memory.shape[0], (num_negatives,), device=y.device)
    G = torch.index_select(memory, 0, neg)
    pos_rows = torch.index_select(memory, 0, y)
    xs = x.to(G.dtype)
    out = torch.cat([(pos_rows * xs).sum(1, keepdim=True), xs @ G.t()], 1).float()
    loss = nce_criterion(torch.exp(out / temperature) / z, memory.shape[0])
    loss.backward()
    with torch.no_grad():
        _write_rows(memory, y, pos_rows, x, momentum)
    return loss


# --------------------------------------------------------------------------- #
# Memory update                                                                #
# --------------------------------------------------------------------------- #
def updated_rows_fn(old_rows, x, momentum):
    v = old_rows.float() * momentum + x.detach().float() * (1 - momentum)
    return v / v.pow(2).sum(1, keepdim=True).sqrt()


def _write_rows(memory, y, old_rows, x, momentum):
    memory.index_copy_(0, y, updated_rows_fn(old_rows, x, momentum).to(memory.dtype))


def bank_update_eager(memory, y, x, momentum):
    """index_select / mul / add / normalize / index_copy_."""
    with torch.no_grad():
        _write_rows(memory, y, torch.index_select(memory, 0, y), x, momentum)


# --------------------------------------------------------------------------- #
# Exact non-parametric softmax (LinearAverage + CrossEntropyLoss)              #
# --------------------------------------------------------------------------- #
def softmax_loss_fn(x, memory, y, temperature):
    logits = torch.mm(x.to(memory.dtype), memory.t()).float() / temperature
    return F.cross_entropy(logits, y)


def softmax_step_eager(x, memory, y, temperature, momentum):
    x.grad = None
    loss = softmax_loss_fn(x, memory, y, temperature)
    loss.backward()
    bank_update_eager(memory, y, x, momentum)
    return loss


# --------------------------------------------------------------------------- #
# Weighted kNN (lemniscate test.py)                                            #
# --------------------------------------------------------------------------- #
def knn_batch_scores_fn(q, bank, bank_labels, k, sigma, num_classes):
    """Class scores of one query batch: mm, topk, one-hot labels weighted by exp(sim/sigma)."""
    b = q.shape[0]
    sim = torch.mm(q.to(bank.dtype), bank.t())
    top_sim, top_idx = sim.topk(k, dim=1, largest=True, sorted=True)
    retrieval = torch.gather(bank_labels.view(1, -1).expand(b, -1), 1, top_idx)
    one_hot = torch.zeros(b * k, num_classes, device=q.device)
    one_hot.scatter_(1, retrieval.view(-1, 1), 1)
    w = torch.exp(top_sim.float() / sigma)
    return (one_hot.view(b, k, num_classes) * w.view(b, k, 1)).sum(1)


def knn_eager(queries, query_labels, bank, bank_labels, k, sigma, num_classes, batch_size=100,
              scores_fn=knn_batch_scores_fn):
    """lemniscate's kNN loop over query batches of ``batch_size`` (test loader batch 100).

    Returns (top-1, top-5) accuracy in percent."""
    top1 = top5 = 0
    for s in range(0, queries.shape[0], batch_size):
        probs = scores_fn(queries[s:s + batch_size], bank, bank_labels, k, sigma, num_classes)
        order = probs.sort(1, True).indices
        correct = order.eq(query_labels[s:s + batch_size].view(-1, 1))
        top1 += int(correct[:, :1].sum())
        top5 += int(correct[:, :min(5, num_classes)].sum())
    n = queries.shape[0]
    return 100.0 * top1 / n, 100.0 * top5 / n


def search_eager(queries, bank, k, max_elems=1 << 26):
    """(sims, idx) (Q, k): torch.mm + topk over query batches of at most max_elems similarities."""
    qb = max(1, max_elems // bank.shape[0])
    vals, idxs = [], []
    for s in range(0, queries.shape[0], qb):
        v, i = torch.mm(queries[s:s + qb].to(bank.dtype), bank.t()).topk(k, dim=1, largest=True, sorted=True)
        vals.append(v.float())
        idxs.append(i)
    return torch.cat(vals), torch.cat(idxs)

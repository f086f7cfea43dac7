"""Weighted kNN evaluation (SPEC 1.3): ``knn_predict`` and ``knn_accuracy``.
Streams over the train features in chunks keeping a running top-k per query;
never holds the Q x N similarity matrix."""
from __future__ import annotations

import torch

from .. import _backend, _validate

DEFAULT_CHUNK = 65536


def _topk_chunked(queries, bank, k, chunk=DEFAULT_CHUNK):
    """Running top-k (values, indices) of queries @ bank.T; ties to the lower index."""
    acc = torch.float64 if queries.dtype == torch.float64 else torch.float32
    Q = queries.to(acc)
    best_v = best_i = None
    for start in range(0, bank.shape[0], chunk):
        sim = Q @ bank[start:start + chunk].to(acc).t()
        idx = torch.arange(start, start + sim.shape[1], device=sim.device).expand_as(sim)
        if best_v is not None:
            sim = torch.cat([best_v, sim], 1)
            idx = torch.cat([best_i, idx], 1)
        kk = min(k, sim.shape[1])
        # stable descending sort keeps the earlier (lower-index) entry first on ties
        order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :kk]
        best_v, best_i = sim.gather(1, order), idx.gather(1, order)
    return best_v, best_i


def knn_predict(queries, bank, bank_labels, *, k=200, temperature=0.07, num_classes=None,
                validate=True, backend="auto", chunk_size=DEFAULT_CHUNK):
    """Weighted kNN class scores (Q, C): sum over the top-k neighbours of exp(sim / T)."""
    _validate.check_float_matrix("bank", bank)
    _validate.check_float_matrix("queries", queries, dim=bank.shape[1])
    _validate.check_tensor("bank_labels", bank_labels)
    _validate.check_same_device(queries=queries, bank=bank, bank_labels=bank_labels)
    if bank_labels.dtype not in (torch.int64, torch.int32) or bank_labels.shape != (bank.shape[0],):
        raise ValueError(f"bank_labels must be an integer tensor of shape ({bank.shape[0]},), "
                         f"got {bank_labels.dtype} {tuple(bank_labels.shape)}")
    _validate.check_positive_int(k, "k")
    if k > bank.shape[0]:
        raise ValueError(f"k={k} is larger than the number of bank rows N={bank.shape[0]}")
    _validate.check_temperature(temperature)
    if num_classes is None:
        num_classes = int(bank_labels.max()) + 1
    _validate.check_positive_int(num_classes, "num_classes")
    if validate:
        _validate.check_index_range("bank_labels", bank_labels, num_classes)
        _validate.check_finite("queries", queries)
    _backend.resolve(backend, queries.device, op="knn_predict")
    vals, idx = _topk_chunked(queries, bank, k, chunk_size)
    scores = torch.zeros(queries.shape[0], num_classes, dtype=vals.dtype, device=queries.device)
    scores.scatter_add_(1, bank_labels.long()[idx], torch.exp(vals / temperature))
    return scores


def knn_accuracy(queries, query_labels, bank, bank_labels, *, k=200, temperature=0.07, num_classes=None,
                 batch_size=1024, **kw):
    """(top-1, top-5) weighted-kNN accuracy in percent, queries processed in batches."""
    _validate.check_tensor("query_labels", query_labels)
    if query_labels.shape != (queries.shape[0],):
        raise ValueError(f"query_labels must have shape ({queries.shape[0]},), got {tuple(query_labels.shape)}")
    if num_classes is None:
        num_classes = int(max(int(bank_labels.max()), int(query_labels.max()))) + 1
    top1 = top5 = 0
    for s in range(0, queries.shape[0], batch_size):
        sc = knn_predict(queries[s:s + batch_size], bank, bank_labels, k=k, temperature=temperature,
                         num_classes=num_classes, **kw)
        order = torch.sort(sc, dim=1, descending=True, stable=True).indices
        lab = query_labels[s:s + batch_size].to(order.device).view(-1, 1)
        top1 += int((order[:, :1] == lab).any(1).sum())
        top5 += int((order[:, :min(5, num_classes)] == lab).any(1).sum())
    n = queries.shape[0]
    return 100.0 * top1 / n, 100.0 * top5 / n

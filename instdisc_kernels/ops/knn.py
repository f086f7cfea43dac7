"""Weighted kNN evaluation (docs/method.md, docs/ops.md): ``knn_topk``, ``knn_predict``, ``knn_accuracy``.

    sim = Q . Vtrain^T; top k per query; class score c = sum over the top k
    neighbours with label c of exp(sim / sigma); top-1 / top-5 by score.

Two backends (TABLE below; docs/backends.md); neither builds the Q x N matrix:

"cpu": the C++ kernel ``knn_topk_cpu`` (csrc/cpu/knn.cpp, see below) returns the
float64 top k: similarities rescored in float64 from the inputs, ties to the
lower bank index, the same answer as the float64 oracle.

"eager": the chunked torch path (``knn_topk``) streams over the train features in
chunks of ``chunk_size`` rows, queries in batches of ``query_batch``, keeping a
running top k per query: peak extra memory O(query_batch x (chunk + k)) plus
the (Q, k) result. Similarities are exact in the inputs' opmath (fp32 GEMM;
float64 for float64 inputs; bf16/fp16 inputs are upcast per chunk), so rows
whose similarities differ by less than fp32 rounding may order differently
from the float64 oracle. Any device (cuBLAS GEMMs and torch.topk on CUDA).

Ties in similarity go to the lower bank index (what a stable descending sort
does, and what the oracle does). Why the chunked path keeps that rule:
* chunks are visited in increasing index order, so on a tie between a running
  entry and a new chunk entry the running one (lower index) must win; the
  merge concatenates [running, chunk] and never lets a chunk entry in at a
  value equal to the running k-th value (candidates must be > it);
* torch.topk alone is not stable, so each selection takes the top kk + 1 and
  checks the set: if the (kk+1)-th value equals the kk-th (more than kk
  entries are >= it: a tie straddles the cut) that row is redone with an
  exact (value desc, index asc) sort, which only happens on exact ties;
* the final (Q, k) lists are sorted by (value desc, index asc).
Speed of the chunked path: the first chunk of each query batch is reduced to
the max of each group of GROUP consecutive columns; the k best groups hold the
top k unless the (k+1)-th group max reaches the k-th selected value (those rows
are redone on the whole chunk). Later chunks keep only the groups whose max
beats the running k-th value (the top-M groups, M = the largest such count in
the batch) and skip the chunk when there are none. On 2 CPU cores (10,000 x
50,000, D = 128, k = 200) its fp32 GEMM is about 2/3 of the time: hence the
C++ kernel, which never writes the similarities out of registers.

The "cpu" kernel: a similarity prefilter computed in registers keeps, per query,
only the rows within a rigorous error bound of the running k-th similarity; those
are rescored in float64 from the original inputs. The result is the float64 top
k, never an approximation, and the Q x N matrix is never built. The prefilter is
chosen by the CPU capability (csrc/cpu/capability.h):
* avx512_bf16: bf16 products (vdpbf16ps), 8-query x 32-row tiles;
* avx2 and avx512: fp32 FMA tiles of 16 queries x 6 bank rows, the bank read
  where it lies (fp32) or widened 96 rows at a time (bf16, fp16, float64); its
  bound is about 1e-5 for unit rows, so the lists hold little beyond the top k;
* default (the x86-64 baseline, other CPUs): the bf16 products in a portable
  loop, slower than the chunked torch path there.
"auto" picks the kernel under the first two (``_CPU_FAST``) and "eager" under
the last (``Impl(auto=False)``); "cpu" runs the kernel everywhere. Extra memory:
a few KB per query for min(Q, 2048) queries at a time (Q when the bank spans
several chunks), plus one bf16 chunk for the bf16 prefilters.
No Triton or CUDA C++ kNN kernel is written ("auto" on CUDA picks "eager").
``_topk_full`` builds the full Q x N matrix and stable-sorts it (tests; not a backend).
kNN is evaluation only: no autograd.
"""
from __future__ import annotations

import torch

from .. import _backend, _validate
from ._formulas import opmath

DEFAULT_CHUNK = 65536
DEFAULT_QUERY_BATCH = 128
GROUP = 8


# --------------------------------------------------------------------------- #
# Exact running top-k with the lower-index tie rule                            #
# --------------------------------------------------------------------------- #
def _lex_order(vals, idx):
    """Per row, the permutation sorting by (value desc, index asc)."""
    o1 = torch.sort(idx, dim=1, stable=True).indices
    o2 = torch.sort(vals.gather(1, o1), dim=1, descending=True, stable=True).indices
    return o1.gather(1, o2)


def _select(vals, kk, index_of):
    """The kk best entries per row by (value desc, index asc), as a set.

    vals (q, W); index_of(pos, rows) maps positions pos (len(rows), m) of the
    rows ``rows`` (None: all) to bank indices. Returns (values, indices) (q, kk)."""
    W = vals.shape[1]
    if W <= kk:                                 # a copy: vals may be a reused buffer
        pos = torch.arange(W, device=vals.device).expand(vals.shape[0], W)
        return vals.clone(), index_of(pos, None)
    tv, tp = vals.topk(kk + 1, dim=1)
    # more than kk entries >= the kk-th value <=> the (kk+1)-th equals it: a tie crosses the cut
    straddle = tv[:, kk] == tv[:, kk - 1]
    tv, tp = tv[:, :kk], tp[:, :kk]
    ti = index_of(tp, None)
    if bool(straddle.any()):
        rows = straddle.nonzero().squeeze(1)
        v = vals[rows]
        idx = index_of(torch.arange(W, device=vals.device).expand(rows.shape[0], W), rows)
        o = _lex_order(v, idx)[:, :kk]
        tv[rows] = v.gather(1, o)
        ti[rows] = idx.gather(1, o)
    return tv, ti


def _candidates(S, thr):
    """Groups of GROUP consecutive columns of the chunk S that may beat the running
    k-th value thr: (values (q, M*GROUP), group ids (q, M)), or (S, None) for all of S,
    or (None, None) when no column can."""
    q, c = S.shape
    if c < 4 * GROUP:
        return S, None
    pad = (-c) % GROUP
    Sp = torch.nn.functional.pad(S, (0, pad), value=float("-inf")) if pad else S
    ng = (c + pad) // GROUP
    gmax = torch.nn.functional.max_pool1d(Sp.unsqueeze(1), GROUP).squeeze(1)      # (q, ng)
    M = int((gmax > thr[:, None]).sum(1, dtype=torch.int32).max())
    if M == 0:
        return None, None
    if 2 * M >= ng:
        return S, None
    gid = gmax.topk(M, dim=1).indices                     # holds every group whose max > thr
    vals = Sp.view(q, ng, GROUP).gather(1, gid[:, :, None].expand(q, M, GROUP)).view(q, M * GROUP)
    # padded columns are -inf and can never enter a full running set
    return vals, gid


def _first_select(S, start, k):
    """_select on a chunk with no running set yet, through the groups of GROUP columns:
    the top k groups by max hold the answer unless the (k+1)-th group max reaches the
    k-th selected value; rows where it does are redone on the whole chunk."""
    q, c = S.shape
    pad = (-c) % GROUP
    ng = (c + pad) // GROUP
    if ng < 4 * (k + 1):
        return _select(S, k, _index_fn(None, None, start))
    Sp = torch.nn.functional.pad(S, (0, pad), value=float("-inf")) if pad else S
    gmax = torch.nn.functional.max_pool1d(Sp.unsqueeze(1), GROUP).squeeze(1)      # (q, ng)
    gv, gid = gmax.topk(k + 1, dim=1)                                              # sorted
    gid = gid[:, :k]
    vals = Sp.view(q, ng, GROUP).gather(1, gid[:, :, None].expand(q, k, GROUP)).view(q, k * GROUP)
    tv, ti = _select(vals, k, _index_fn(None, gid, start))
    # every column outside the chosen groups is <= gv[:, k]; strictly below the k-th
    # selected value it can neither enter nor tie
    redo = gv[:, k] >= tv.amin(1)
    if bool(redo.any()):
        rows = redo.nonzero().squeeze(1)
        rv, ri = _select(S[rows], k, _index_fn(None, None, start))
        tv[rows] = rv
        ti[rows] = ri
    return tv, ti


def _index_fn(run_i, gid, start):
    """index_of for the union [running (w columns), candidates]: candidates are the
    chunk's columns from ``start`` on (gid None), the groups gid of that chunk, or,
    with start None, the bank indices held in gid."""
    off = 0 if run_i is None else run_i.shape[1]

    def index_of(pos, rows):
        ri = None if run_i is None else (run_i if rows is None else run_i[rows])
        g = None if gid is None else (gid if rows is None else gid[rows])
        p = (pos - off).clamp(min=0)
        if start is None:                       # gid holds the candidates' bank indices
            ind = g.gather(1, p)
        elif g is None:
            ind = p + start
        else:
            ind = g.gather(1, torch.div(p, GROUP, rounding_mode="floor")) * GROUP + p % GROUP + start
        if ri is None:
            return ind
        return torch.where(pos < off, ri.gather(1, pos.clamp(max=off - 1)), ind)
    return index_of


def knn_topk(queries, bank, k, *, chunk_size=DEFAULT_CHUNK, query_batch=DEFAULT_QUERY_BATCH):
    """(values, indices), each (Q, k): the k most similar bank rows per query,
    sorted by (similarity desc, index asc); no input checks (see knn_predict)."""
    acc = opmath(queries.dtype, bank.dtype)
    N = bank.shape[0]
    Q = queries.shape[0]
    batches = [(qs, queries[qs:qs + query_batch].to(acc)) for qs in range(0, Q, query_batch)]
    run = [(None, None)] * len(batches)
    # one similarity buffer for the whole call: a fresh (batch x chunk) block per chunk
    # would page-fault anew each time the allocator hands memory back to the OS
    s_buf = torch.empty(min(query_batch, Q) * min(chunk_size, N), dtype=acc, device=queries.device)
    for start in range(0, N, chunk_size):                 # each bank chunk is read (and cast) once
        Vc = bank[start:start + chunk_size].to(acc)
        n = Vc.shape[0]
        for b, (_qs, Qb) in enumerate(batches):
            run_v, run_i = run[b]
            S = torch.mm(Qb, Vc.t(), out=s_buf[:Qb.shape[0] * n].view(Qb.shape[0], n))
            if run_v is None:
                run[b] = _first_select(S, start, k)
                continue
            gid = None
            if run_v.shape[1] == k:
                S, gid = _candidates(S, run_v.amin(1))
                if S is None:
                    continue
            if gid is None and S.shape[1] > k:
                # the whole chunk: its own top k first, then a small merge
                cv, ci = _select(S, k, _index_fn(None, None, start))
                run[b] = _select(torch.cat([run_v, cv], 1), k, _index_fn(run_i, ci, None))
                continue
            S = torch.cat([run_v, S], 1)
            run[b] = _select(S, k, _index_fn(run_i, gid, start))
    out_v = torch.empty(Q, k, dtype=acc, device=queries.device)
    out_i = torch.empty(Q, k, dtype=torch.int64, device=queries.device)
    for (qs, Qb), (run_v, run_i) in zip(batches, run):
        o = _lex_order(run_v, run_i)
        out_v[qs:qs + Qb.shape[0]] = run_v.gather(1, o)
        out_i[qs:qs + Qb.shape[0]] = run_i.gather(1, o)
    return out_v, out_i


# --------------------------------------------------------------------------- #
# The C++ kernel ("cpu" backend)                                               #
# --------------------------------------------------------------------------- #
if _backend.op_handle("knn_topk") is not None:
    @torch.library.register_fake("instdisc::knn_topk")
    def _knn_topk_fake(queries, bank, k, chunk_size):
        Q = queries.shape[0]
        return (queries.new_empty((Q, k), dtype=opmath(queries.dtype, bank.dtype)),
                queries.new_empty((Q, k), dtype=torch.int64))

    # whether the kernel runs a vectorised prefilter here (AVX512-BF16, or the fp32 FMA tiles of avx2
    # and avx512; "auto" picks the kernel only then): the CPU capability chosen at load
    # (INSTDISC_CPU_CAPABILITY can lower it)
    _CPU_FAST = _backend.CPU_FMA_TILES
else:
    _CPU_FAST = False


def knn_topk_cpp(queries, bank, k, *, chunk_size=DEFAULT_CHUNK):
    """(values, indices) (Q, k) from the C++ kernel: the float64 top k by
    (similarity desc, index asc); values in the inputs' opmath dtype."""
    return torch.ops.instdisc.knn_topk(queries, bank, k, chunk_size)


def _topk_full(queries, bank, k):
    acc = opmath(queries.dtype, bank.dtype)
    sim = queries.to(acc) @ bank.to(acc).t()                          # Q x N
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k]
    return sim.gather(1, order), order


def _eager(queries, bank, k, chunk_size, query_batch):
    return knn_topk(queries, bank, k, chunk_size=chunk_size, query_batch=query_batch)


def _cpp(queries, bank, k, chunk_size, query_batch):
    return knn_topk_cpp(queries, bank, k, chunk_size=chunk_size)


TABLE = _backend.OpTable(
    "knn_predict",
    eager=_backend.Impl(_eager, "ops/knn.py knn_topk"),
    cpu=_backend.Impl(_cpp, "csrc/cpu/knn.cpp knn_topk_cpu", dispatch="knn_topk", auto=_CPU_FAST),
)


# --------------------------------------------------------------------------- #
# Public functions                                                             #
# --------------------------------------------------------------------------- #
def _check_labels(name, labels, length, num_classes, *, values=True):
    _validate.check_tensor(name, labels)
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(labels.shape)}")
    if values and num_classes is not None:
        _validate.check_index_range(name, labels, num_classes)


def search(queries, bank, k, *, backend="auto", chunk_size=DEFAULT_CHUNK, query_batch=DEFAULT_QUERY_BATCH,
           op="knn_predict"):
    """(values, indices) (Q, k), sorted by (similarity desc, index asc), on the backend
    TABLE.select picks (``op`` names the public function in errors); no input checks."""
    be = TABLE.select(backend, queries.device, op=op)
    return TABLE[be](queries, bank, k, chunk_size, query_batch)


# With num_classes=None the class count is inferred as max label + 1; beyond this
# (and beyond the number of labels given) the labels are not dense class ids.
MAX_INFERRED_CLASSES = 1 << 20


def _num_classes(num_classes, **labels):
    if num_classes is not None:
        _validate.check_positive_int(num_classes, "num_classes")
        return num_classes
    name, top = max(((n, int(lab.max())) for n, lab in labels.items()), key=lambda t: t[1])
    count = sum(lab.numel() for lab in labels.values())
    if top + 1 > max(MAX_INFERRED_CLASSES, count):
        raise ValueError(f"{name} contains the label {top}: with num_classes=None the scores get max label + 1 "
                         f"= {top + 1} columns; labels must be class ids 0..C-1 (relabel them, or pass num_classes)")
    return top + 1


def check_search_args(k, num_rows, temperature, num_classes):
    """k, temperature and num_classes of a kNN over a bank of num_rows rows (also the distributed bank's)."""
    _validate.check_positive_int(k, "k")
    if k > num_rows:
        raise ValueError(f"k={k} is larger than the number of bank rows N={num_rows}")
    _validate.check_temperature(temperature)
    if num_classes is not None:
        _validate.check_positive_int(num_classes, "num_classes")


def _check_common(queries, bank, bank_labels, k, temperature, num_classes, validate, chunk_size, query_batch):
    _validate.check_float_matrix("bank", bank)
    _validate.check_float_matrix("queries", queries, dim=bank.shape[1])
    _validate.check_same_device(queries=queries, bank=bank, bank_labels=bank_labels)
    _check_labels("bank_labels", bank_labels, bank.shape[0], None)
    check_search_args(k, bank.shape[0], temperature, num_classes)
    _validate.check_positive_int(chunk_size, "chunk_size")
    _validate.check_positive_int(query_batch, "query_batch")
    if validate:
        _validate.check_finite("queries", queries)
        _validate.check_finite("bank", bank)


def _scores(vals, idx, bank_labels, temperature, num_classes, *, relative=False):
    """Class scores from the sorted top-k: weights exp(sim / T), or with ``relative``
    exp((sim - best sim) / T) (the same ranking, finite for any T: the best neighbour weighs 1)."""
    w = torch.exp((vals - vals[:, :1]) / temperature if relative else vals / temperature)
    if not relative and not _validate._tracing() and not bool(torch.isfinite(w).all() & (w[:, 0] > 0).all()):
        raise ValueError(f"temperature={temperature!r} is too small: the kNN weights exp(similarity / temperature) "
                         f"are not representable in {w.dtype} (max |similarity| = {float(vals.abs().max()):.4g}); "
                         f"use a larger temperature (knn_accuracy weighs relative to the best neighbour and accepts it)")
    scores = torch.zeros(vals.shape[0], num_classes, dtype=vals.dtype, device=vals.device)
    scores.scatter_add_(1, bank_labels.long()[idx], w)
    return scores


def topk_hits(scores, labels, num_classes):
    """(top-1, top-5) hit counts (0-dim int64 tensors) of class scores (top-5 is top-C when
    C < 5); class-score ties go to the lower class index."""
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :min(5, num_classes)]
    lab = labels.long().view(-1, 1)
    return (order[:, :1] == lab).sum(), (order == lab).any(1).sum()


@torch.no_grad()
def knn_predict(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, *, k: int = 200,
                temperature: float = 0.07, num_classes: int | None = None, validate: bool = True,
                backend: str = "auto", chunk_size: int = DEFAULT_CHUNK,
                query_batch: int = DEFAULT_QUERY_BATCH) -> torch.Tensor:
    """Weighted kNN class scores (Q, C): sum over the top-k neighbours of exp(sim / temperature).

    queries (Q, D) and bank (N, D) float (unit rows: cosine similarity); bank_labels (N,)
    integer in [0, num_classes) (num_classes None: max label + 1, and then a label
    beyond the number of labels and 2^20 is an error). Scores are float32
    (float64 for float64 inputs); a temperature at which exp(sim / temperature)
    overflows (or the best neighbour's weight underflows) is an error. k > N is an error; similarity ties go to the lower
    bank index.
    """
    _check_common(queries, bank, bank_labels, k, temperature, num_classes, validate, chunk_size, query_batch)
    num_classes = _num_classes(num_classes, bank_labels=bank_labels)
    if validate:
        _validate.check_index_range("bank_labels", bank_labels, num_classes)
    vals, idx = search(queries, bank, k, backend=backend, chunk_size=chunk_size, query_batch=query_batch)
    return _scores(vals, idx, bank_labels, temperature, num_classes)


@torch.no_grad()
def knn_accuracy(queries: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                 *, k: int = 200, temperature: float = 0.07, num_classes: int | None = None, batch_size: int = 4096,
                 validate: bool = True, backend: str = "auto", chunk_size: int = DEFAULT_CHUNK,
                 query_batch: int = DEFAULT_QUERY_BATCH) -> tuple[float, float]:
    """(top-1, top-5) weighted-kNN accuracy in percent (top-5 is top-C when C < 5).

    The weights are exp((sim - best sim) / temperature) per query (the ranking of
    knn_predict's scores, finite for any temperature).
    Class-score ties go to the lower class index. Queries are processed
    batch_size at a time (the (batch, C) scores are the only per-batch output).
    """
    _check_common(queries, bank, bank_labels, k, temperature, num_classes, validate, chunk_size, query_batch)
    _check_labels("query_labels", query_labels, queries.shape[0], None)
    _validate.check_same_device(queries=queries, query_labels=query_labels)
    _validate.check_positive_int(batch_size, "batch_size")
    num_classes = _num_classes(num_classes, bank_labels=bank_labels, query_labels=query_labels)
    if validate:
        _validate.check_index_range("bank_labels", bank_labels, num_classes)
        _validate.check_index_range("query_labels", query_labels, num_classes)
    top1 = top5 = 0
    for s in range(0, queries.shape[0], batch_size):
        vals, idx = search(queries[s:s + batch_size], bank, k, backend=backend, chunk_size=chunk_size,
                           query_batch=query_batch, op="knn_accuracy")
        sc = _scores(vals, idx, bank_labels, temperature, num_classes, relative=True)
        h1, h5 = topk_hits(sc, query_labels[s:s + batch_size], num_classes)
        top1 += int(h1)
        top5 += int(h5)
    n = queries.shape[0]
    return 100.0 * top1 / n, 100.0 * top5 / n

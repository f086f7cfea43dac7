"""Exact inner-product search with FAISS's shape of answer: ``knn_search``.

    faiss:             index = faiss.IndexFlatIP(D); index.add(bank); sims, idx = index.search(queries, k)
    instdisc_kernels:  sims, idx = knn_search(queries, bank, k)

Same backends as ``knn_predict`` (ops/knn.py TABLE): "cpu", the C++ kernel (a
register-tile prefilter inside a rigorous error bound, float64 rescore; "auto" picks
it on CPUs with AVX2 or better), and "eager", the chunked GEMM + running top-k (any device);
never a Q x N matrix.
The answer is sorted by (similarity descending, bank index ascending), so
ties go to the lower index. No index to build: the bank is searched as it is.
"""
from __future__ import annotations

import torch

from .. import _validate
from . import knn


@torch.no_grad()
def knn_search(queries: torch.Tensor, bank: torch.Tensor, k: int, *, backend: str = "auto",
               validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The k bank rows with the largest inner product with each query.

    Args:
        queries: (Q, D) floating tensor.
        bank: (N, D) floating tensor on the same device (any float dtype).
        k: neighbours per query, 1 <= k <= N.
        backend: "auto", "cpu" (the C++ kernel) or "eager" (chunked GEMMs and a running
            top-k, any device); docs/backends.md. "reference": deprecated spelling of "eager".
        validate: check queries and bank for NaN/inf (reads every value).
    Returns:
        (similarities (Q, k) float32, indices (Q, k) int64), each row sorted by
        similarity descending, ties to the lower index. Similarities of the
        "cpu" kernel are the float64 inner products rounded once to float32.
    """
    _validate.check_float_matrix("bank", bank)
    _validate.check_float_matrix("queries", queries, dim=bank.shape[1])
    _validate.check_same_device(queries=queries, bank=bank)
    _validate.check_positive_int(k, "k")
    if k > bank.shape[0]:
        raise ValueError(f"k={k} is larger than the number of bank rows N={bank.shape[0]}")
    if validate:
        _validate.check_finite("queries", queries)
        _validate.check_finite("bank", bank)
    vals, idx = knn.search(queries, bank, k, backend=backend, op="knn_search")
    return vals.to(torch.float32), idx.to(torch.int64)

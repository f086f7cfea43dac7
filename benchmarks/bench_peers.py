"""What a user would pick instead of this library, as benchmark providers (bench_cases.PEERS).

* ``faiss`` (faiss-cpu): ``IndexFlatIP`` exact inner-product search. For ``knn`` the
  step is what an evaluation with FAISS costs: wrap the bank (float32 numpy), add it
  to a flat index, search the queries, then the same weighted vote as the library
  (``exp(sim / sigma)`` summed per label over the top k). For ``knn_search`` it is
  the search alone against ``knn_search``. FAISS runs on as many OpenMP threads as
  torch has.
* ``torch-lce``: PyTorch's chunked ``torch.nn.functional.linear_cross_entropy``
  with ``options=LinearCrossEntropyOptions()`` (never builds the B x N logits),
  the bank as the weight, features / T as the input, the gradient to the features
  only, then the same eager bank update as the baseline.
* ``torch-mm`` (shared-negative NCE): the step's two products alone, torch.mm of
  the same shapes on ready inputs, S = x @ G^T (B x K) and W @ G (W: B x K): the
  GEMM rate the fused step is held against (no gather, epilogue, update).
* ``embedding_bag``: ``F.embedding_bag(idx, bank, offsets, mode="sum")`` over the
  op's own rows (NCE: the B*(K+1) rows of a step, one bag per batch row; update: the
  B rows), FBGEMM's CPU gather. Not a competitor: the practical limit of reading
  random bank rows here, against which the gather-bound ops are judged.

A peer whose package is missing is skipped with the reason.
"""
from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from bench_baselines import bank_update_eager
from bench_cases import MOMENTUM

IDX_POOL = 8        # pre-drawn index sets the gather probe cycles through (no RNG in the timing)


def skip_reason(provider):
    """None when the peer can run here, else why not."""
    if provider == "faiss":
        try:
            importlib.import_module("faiss")
        except ImportError as e:
            return f"faiss is not installed (pip install faiss-cpu; the Makefile's venv installs it): {e}"
    if provider == "torch-lce" and not (hasattr(F, "linear_cross_entropy")
                                        and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        return f"torch {torch.__version__} has no torch.nn.functional.linear_cross_entropy with options"
    return None


def vote(sims, idx, bank_labels, query_labels, temperature, num_classes):
    """(top-1, top-5) in percent of the weighted vote over (Q, k) neighbours (the library's rule)."""
    scores = torch.zeros(sims.shape[0], num_classes, dtype=sims.dtype)
    scores.scatter_add_(1, bank_labels.long()[idx], torch.exp(sims / temperature))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :min(5, num_classes)]
    lab = query_labels.long().view(-1, 1)
    n = sims.shape[0]
    return 100.0 * float((order[:, :1] == lab).sum()) / n, 100.0 * float((order == lab).any(1).sum()) / n


def faiss_search(queries, bank, k):
    """(sims, idx) torch tensors from a flat inner-product index over ``bank``."""
    import faiss
    faiss.omp_set_num_threads(torch.get_num_threads())
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank.float().contiguous().numpy())
    sims, idx = index.search(queries.float().contiguous().numpy(), k)
    return torch.from_numpy(sims), torch.from_numpy(idx)


def step(case, provider, g, device):
    T = case.temperature
    mem = g["memory"]
    if provider == "faiss":
        if device.type != "cpu":
            raise ValueError("the faiss provider is faiss-cpu: not available on CUDA")
        if case.op == "knn_search":
            return lambda: faiss_search(g["queries"], mem, case.K)

        def run():
            sims, idx = faiss_search(g["queries"], mem, case.K)
            return vote(sims, idx, g["bank_labels"], g["query_labels"], T, case.classes)
        return run
    if provider == "torch-lce":
        x, y = g["x"], g["y"]
        opts = torch.nn.LinearCrossEntropyOptions()

        def run():
            x.grad = None
            F.linear_cross_entropy((x / T).to(mem.dtype), mem, y, options=opts).backward()
            bank_update_eager(mem, y, x, MOMENTUM)
        return run
    if provider == "torch-mm":
        x = g["x"].detach().float()
        G = torch.randn(case.K, case.D, device=device)
        W = torch.randn(case.B, case.K, device=device)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

        def run():
            torch.mm(x, G.t())
            out = torch.mm(W, G)
            sync()
            return out
        return run
    if provider == "embedding_bag":
        B = case.B
        per_row = case.K + 1 if case.op == "nce" else 1
        pool = []
        for _ in range(IDX_POOL):
            idx = torch.randint(0, case.N, (B, per_row), device=device)
            idx[:, 0] = g["y"]
            pool.append(idx.view(-1))
        offsets = torch.arange(0, B * per_row, per_row, device=device)
        it = iter(range(1 << 62))
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

        def run():
            out = F.embedding_bag(pool[next(it) % IDX_POOL], mem, offsets, mode="sum")
            sync()
            return out
        return run
    raise ValueError(f"unknown peer provider {provider!r}")

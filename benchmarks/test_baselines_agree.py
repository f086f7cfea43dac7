"""The eager baselines compute what they claim: checked against the float64
oracle instdisc_kernels/reference.py on small shapes (run by the smoke run;
skipped by --benchmark-only, which runs benchmarks only)."""
import pytest
import torch

from instdisc_kernels import reference as ref
from bench_baselines import (bank_update_eager, draw_idx, knn_batch_scores_fn, knn_eager, nce_forward_eager,
                             softmax_loss_fn)

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=3e-2, atol=3e-2)}


def _unit(n, d, dtype=torch.float32):
    x = torch.randn(n, d, dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,K,D", [(1, 1, 3), (5, 17, 100), (8, 64, 128)])
def test_nce_eager_matches_reference(B, K, D, dtype):
    N, T = 300, 0.07
    mem = _unit(N, D, dtype)
    x = _unit(B, D).requires_grad_(True)
    y = torch.randperm(N)[:B]
    idx = draw_idx(y, N, K)
    assert torch.equal(idx[:, 0], y) and idx.shape == (B, K + 1)
    z = float(ref.estimate_z(ref.nce_scores(x, mem, idx), T, N))
    loss, _ = nce_forward_eager(x, mem, idx, T, z)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref.nce_loss_value(x, mem, idx, T, z), **TOL[dtype])
    torch.testing.assert_close(x.grad.double(), ref.nce_grad(x, mem, idx, T, z), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_eager_matches_reference(dtype):
    N, B, D, T = 500, 7, 129, 0.1
    mem = _unit(N, D, dtype)
    x = _unit(B, D).requires_grad_(True)
    y = torch.randint(0, N, (B,))
    loss = softmax_loss_fn(x, mem, y, T)
    loss.backward()
    tol = TOL[dtype] if dtype == torch.float32 else dict(rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(loss.double(), ref.softmax_loss_value(x, mem, y, T), **tol)
    torch.testing.assert_close(x.grad.double(), ref.softmax_grad(x, mem, y, T), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bank_update_eager_matches_reference(dtype):
    N, B, D = 50, 9, 100
    mem = _unit(N, D, dtype)
    x = _unit(B, D)
    y = torch.randperm(N)[:B]           # lemniscate batches have distinct indices
    want = ref.memory_update_(mem.clone(), y, x, 0.5)
    bank_update_eager(mem, y, x, 0.5)
    torch.testing.assert_close(mem.double(), want.double(), **TOL[dtype])


def test_knn_eager_matches_reference():
    N, Q, D, k, C, T = 400, 230, 64, 20, 7, 0.1
    bank = _unit(N, D)
    queries = _unit(Q, D)
    bl = torch.randint(0, C, (N,))
    ql = torch.randint(0, C, (Q,))
    scores = knn_batch_scores_fn(queries, bank, bl, k, T, C)
    want = ref.knn_scores(queries, bank, bl, k, T, C)
    torch.testing.assert_close(scores.double(), want, rtol=1e-4, atol=1e-5)
    assert knn_eager(queries, ql, bank, bl, k, T, C) == pytest.approx(ref.knn_topk_accuracy(want, ql))

"""The peer providers compute what the library computes: FAISS's flat search + the vote,
PyTorch's linear_cross_entropy and the embedding_bag gather, checked against the float64
oracle instdisc_kernels/reference.py on small fp32 shapes (run by the smoke run; a peer
whose package is missing is skipped with the reason)."""
import pytest
import torch
import torch.nn.functional as F
from bench_peers import faiss_search, skip_reason, vote

from instdisc_kernels import reference as ref


def _unit(n, d):
    x = torch.randn(n, d, dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True)).float()


def _need(provider):
    why = skip_reason(provider)
    if why:
        pytest.skip(why)


def test_faiss_search_and_vote_match_reference():
    _need("faiss")
    q, bank = _unit(40, 32), _unit(500, 32)
    labels, qlab = torch.randint(0, 7, (500,)), torch.randint(0, 7, (40,))
    sims, idx = faiss_search(q, bank, 20)
    rs, ri = ref.knn_topk(q, bank, 20)
    assert (idx == ri).float().mean() > 0.99            # fp32 sgemm: near-ties may swap
    torch.testing.assert_close(sims.double(), rs, rtol=1e-5, atol=1e-5)
    scores = ref.knn_scores(q, bank, labels, 20, 0.1, 7)
    assert vote(rs.float(), ri, labels, qlab, 0.1, 7) == pytest.approx(ref.knn_topk_accuracy(scores, qlab))


def test_linear_cross_entropy_matches_reference():
    _need("torch-lce")
    T = 0.1
    x, bank = _unit(16, 32).requires_grad_(), _unit(300, 32)
    y = torch.randperm(300)[:16]
    loss = F.linear_cross_entropy(x / T, bank, y, options=torch.nn.LinearCrossEntropyOptions())
    loss.backward()
    torch.testing.assert_close(loss.double(), ref.softmax_loss_value(x, bank, y, T), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref.softmax_grad(x, bank, y, T), rtol=1e-4, atol=1e-6)


def test_embedding_bag_reads_the_rows():
    bank = _unit(100, 8)
    idx = torch.randint(0, 100, (5, 4))
    out = F.embedding_bag(idx.view(-1), bank, torch.arange(0, 20, 4), mode="sum")
    torch.testing.assert_close(out.double(), bank.double()[idx].sum(1))

"""The float64 oracle against hand-derived formulas on tiny cases."""
import math

import pytest
import torch

from instdisc_kernels import reference as ref


def _unit(*rows):
    t = torch.tensor(rows, dtype=torch.float64)
    return t / t.norm(dim=1, keepdim=True)


def test_nce_tiny_case_by_hand():
    # B=1, K=1, N=4, D=2; feature e0, positive row 0 = e0, negative row 1 = e1.
    mem = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]], dtype=torch.float64)
    f = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    idx = torch.tensor([[0, 1]])
    T, N, K, Z = 0.5, 4, 1, 3.0
    s = ref.nce_scores(f, mem, idx)
    assert torch.allclose(s, torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    p_pos, p_neg = math.exp(1 / T) / Z, math.exp(0) / Z
    c = K / N + 1e-7
    expected = -(math.log(p_pos / (p_pos + c)) + math.log((K / N) / (p_neg + c)))
    got = ref.nce_loss_value(f, mem, idx, T, Z)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # Z estimate: N * mean(exp(s/T)) over all B*(K+1) entries
    assert ref.estimate_z(s, T, N).item() == pytest.approx(N * (math.exp(2) + 1) / 2, rel=1e-12)


def test_nce_loss_divides_by_batch_only():
    torch.manual_seed(1)
    mem = ref.init_memory(20, 5).double()
    f = _unit(*torch.randn(3, 5).tolist())
    idx = torch.randint(0, 20, (3, 8))
    per_row = [ref.nce_loss_value(f[b:b + 1], mem, idx[b:b + 1], 0.1, 2.0).item() for b in range(3)]
    assert ref.nce_loss_value(f, mem, idx, 0.1, 2.0).item() == pytest.approx(sum(per_row) / 3, rel=1e-12)


@pytest.mark.parametrize("fn,grad_fn,extra", [
    (ref.nce_loss_value, ref.nce_grad, (0.07, 5.0)),
    (ref.infonce_loss_value, ref.infonce_grad, (0.1,)),
])
def test_hand_gradients_match_autograd(fn, grad_fn, extra):
    torch.manual_seed(2)
    N, D, B, K = 30, 7, 4, 6
    mem = ref.init_memory(N, D).double()
    f = _unit(*torch.randn(B, D).tolist()).requires_grad_()
    idx = torch.randint(0, N, (B, K + 1))
    idx[1, 3] = idx[1, 0]                                   # a negative equal to the positive
    # autograd through an independent formulation of the same loss
    V = mem[idx]
    s = (V * f[:, None, :]).sum(-1)
    if fn is ref.nce_loss_value:
        T, Z = extra
        P = torch.exp(s / T) / Z
        c = K / N + 1e-7
        loss = -(torch.log(P[:, 0] / (P[:, 0] + c)).sum() + torch.log((K / N) / (P[:, 1:] + c)).sum()) / B
    else:
        (T,) = extra
        loss = torch.nn.functional.cross_entropy(s / T, torch.zeros(B, dtype=torch.long))
    loss.backward()
    assert fn(f, mem, idx, *extra).item() == pytest.approx(loss.item(), rel=1e-12)
    assert torch.allclose(grad_fn(f, mem, idx, *extra), f.grad, rtol=1e-10, atol=1e-12)


def test_proximal_gradient():
    torch.manual_seed(3)
    mem = ref.init_memory(10, 4).double()
    f = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 5, 1])
    ref.proximal_value(f, mem, y, 0.3)  # detached value
    diff = f - mem[y]
    (0.3 * (diff * diff).sum() / 3).backward()
    assert torch.allclose(ref.proximal_grad(f, mem, y, 0.3), f.grad)


def test_ema_z():
    s = torch.zeros(2, 3, dtype=torch.float64)                 # exp(0)=1 -> estimate = N
    assert ref.ema_z(None, s, 0.1, 10, 0.99).item() == pytest.approx(10)
    assert ref.ema_z(-1.0, s, 0.1, 10, 0.99).item() == pytest.approx(10)
    assert float(ref.ema_z(20.0, s, 0.1, 10, 0.99)) == pytest.approx(0.99 * 20 + 0.01 * 10)


def test_memory_update_last_occurrence_wins():
    mem = torch.zeros(4, 2, dtype=torch.float64)
    mem[1] = torch.tensor([1.0, 0.0])
    f = torch.tensor([[0.0, 1.0], [0.0, -1.0], [1.0, 1.0]], dtype=torch.float64)
    ref.memory_update_(mem, torch.tensor([1, 1, 2]), f, 0.5)
    assert torch.allclose(mem[1], torch.tensor([0.5, -0.5], dtype=torch.float64) / math.sqrt(0.5))
    assert torch.allclose(mem[2], torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2))
    assert torch.equal(mem[0], torch.zeros(2, dtype=torch.float64))


def test_init_memory_range_and_not_normalised():
    mem = ref.init_memory(1000, 12, generator=torch.Generator().manual_seed(0))
    s = 1 / math.sqrt(12 / 3)
    assert mem.abs().max() <= s and mem.abs().max() > 0.9 * s
    assert not torch.allclose(mem.norm(dim=1), torch.ones(1000))


def test_softmax_by_hand_and_gradient():
    torch.manual_seed(4)
    mem = _unit(*torch.randn(9, 5).tolist())
    f = _unit(*torch.randn(3, 5).tolist()).requires_grad_()
    y = torch.tensor([2, 2, 8])
    loss = torch.nn.functional.cross_entropy(f @ mem.t() / 0.1, y)
    loss.backward()
    assert ref.softmax_loss_value(f, mem, y, 0.1).item() == pytest.approx(loss.item(), rel=1e-12)
    assert torch.allclose(ref.softmax_grad(f, mem, y, 0.1), f.grad, rtol=1e-10, atol=1e-12)


def test_knn_by_hand():
    bank = _unit([1, 0], [0.9, 0.1], [0, 1], [-1, 0])
    labels = torch.tensor([0, 1, 1, 0])
    q = _unit([1, 0.05])
    scores = ref.knn_scores(q, bank, labels, k=2, temperature=0.5, num_classes=2)
    sims = (q @ bank.t())[0]
    assert scores[0, 0].item() == pytest.approx(math.exp(sims[0].item() / 0.5))
    assert scores[0, 1].item() == pytest.approx(math.exp(sims[1].item() / 0.5))
    top1, top5 = ref.knn_topk_accuracy(scores, torch.tensor([0]))
    assert (top1, top5) == (100.0, 100.0)


def test_knn_ties_go_to_lower_index():
    bank = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    scores = ref.knn_scores(bank[:1], bank, torch.tensor([0, 1, 2]), k=1, temperature=1.0, num_classes=3)
    assert scores[0].tolist() == [pytest.approx(math.e), 0.0, 0.0]

"""Gradients of the drop-ins when the loop is unusual (issue 13): two forwards sharing rows before
one backward, retain_graph double backward, other uses of the output, hooks; against a float64
oracle that reads the rows as they were at forward time."""
import pytest
import torch
import torch.nn.functional as F

from instdisc_kernels import reference as ref
from instdisc_kernels.lemniscate import LinearAverage, NCEAverage, NCECriterion
from instdisc_kernels.lemniscate import criterion as criterion_mod
from instdisc_kernels.ops import nce_probs as probs_mod

N, D, K, T = 12, 100, 5, 0.5
BACKENDS = ["cpu", "eager"]


def _views(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = F.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    x2 = F.normalize(x1 + 0.3 * torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    y = torch.tensor([3, 7, 7, 0])[:B]                         # a repeated index too
    idx = torch.randint(0, N, (B, K + 1), generator=g)
    idx[:, 0] = y
    return x1, x2, y, idx


def _oracle_nce(x, memory, idx, z, weight=None):
    """float64 (P, dloss/dx) of NCECriterion(P) (or of (P * weight).sum()) with the given rows."""
    x = x.detach().double().requires_grad_()
    P = torch.exp(torch.einsum("bkd,bd->bk", memory.double()[idx], x) / T) / z
    loss = ref.nce_criterion(P, N) if weight is None else (P * weight).sum()
    loss.backward()
    return P.detach(), x.grad


def _update(memory, y, x, m=0.5):
    out = memory.double().clone()
    ref.memory_update_(out, y, x.double(), m)
    return out


def _module(backend, dtype=torch.float64, z=2.0):
    lem = NCEAverage(D, N, K, T=T, Z=z, backend=backend).to(dtype)
    lem.memory.copy_(F.normalize(torch.randn(N, D, dtype=dtype), dim=1))
    return lem


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["criterion", "weighted"])
def test_two_forwards_sharing_rows_before_one_backward_have_exact_gradients(backend, loss):
    lem, crit = _module(backend), NCECriterion(N)
    x1, x2, y, idx = _views()
    w1, w2 = torch.randn(4, K + 1, dtype=torch.float64), torch.randn(4, K + 1, dtype=torch.float64)
    V0 = lem.memory.clone()
    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    o1, o2 = lem(a, y, idx=idx), lem(b, y, idx=idx)
    if loss == "criterion":
        (crit(o1, y) + crit(o2, y)).backward()
    else:
        ((o1 * w1).sum() + (o2 * w2).sum()).backward()
    for xg, x, w in ((a, x1, w1), (b, x2, w2)):
        _, g = _oracle_nce(x, V0, idx, 2.0, None if loss == "criterion" else w)
        torch.testing.assert_close(xg.grad, g, rtol=1e-9, atol=1e-12)
    # one update per forward, each from the current rows: view 2's backward ran first, then view 1's
    torch.testing.assert_close(lem.memory, _update(_update(V0, y, x2), y, x1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retain_graph_double_backward_updates_once_with_the_same_gradient(backend):
    lem, crit = _module(backend), NCECriterion(N)
    x1, _, y, idx = _views()
    V0 = lem.memory.clone()
    a = x1.clone().requires_grad_()
    out = lem(a, y, idx=idx)
    w = torch.randn_like(out)
    for loss in (crit(out, y), (out * w).sum()):                      # fused path and general path
        a.grad = None
        loss.backward(retain_graph=True)
        g1 = a.grad.clone()
        loss.backward(retain_graph=True)
        torch.testing.assert_close(a.grad, 2 * g1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.grad / 2, _oracle_nce(x1, V0, idx, 2.0, w)[1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lem.memory, _update(V0, y, x1), rtol=1e-12, atol=1e-12)   # one update


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_criterion_on_the_output_uses_the_forward_gradient_and_no_second_pass(monkeypatch, scale):
    lem, crit = _module("cpu", torch.float32), NCECriterion(N)
    x1, _, y, idx = _views()
    V0 = lem.memory.clone()
    a = x1.float().requires_grad_()
    loss = crit(lem(a, y, idx=idx), y)

    def no_second_pass(*args):
        raise AssertionError("the backward recomputed what the forward pass had")
    monkeypatch.setattr(probs_mod, "nce_probs_backward", no_second_pass)
    monkeypatch.setattr(criterion_mod, "criterion_grad", no_second_pass)
    (scale * loss).backward()
    P, g = _oracle_nce(x1, V0, idx, 2.0)
    torch.testing.assert_close(loss[0].double(), ref.nce_criterion(P, N), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad.double(), scale * g, rtol=1e-4, atol=1e-6)


def test_other_uses_of_the_output_and_hooks_see_true_gradients():
    lem, crit = _module("cpu"), NCECriterion(N)
    x1, _, y, idx = _views()
    V0 = lem.memory.clone()
    a = x1.clone().requires_grad_()
    out = lem(a, y, idx=idx)
    out.retain_grad()
    w = torch.randn_like(out)
    (crit(out, y) + (out * w).sum()).backward()
    P = torch.exp(torch.einsum("bkd,bd->bk", V0[idx], x1) / T) / 2.0
    Pg = P.clone().requires_grad_()
    (ref.nce_criterion(Pg, N) + (Pg * w).sum()).backward()
    torch.testing.assert_close(out.grad, Pg.grad, rtol=1e-9, atol=1e-12)
    g = _oracle_nce(x1, V0, idx, 2.0)[1] + _oracle_nce(x1, V0, idx, 2.0, w)[1]
    torch.testing.assert_close(a.grad, g, rtol=1e-9, atol=1e-12)


def test_a_bank_write_by_someone_else_between_forward_and_backward_is_an_error():
    lem = _module("cpu")
    x1, _, y, idx = _views()
    a = x1.clone().requires_grad_()
    out = lem(a, y, idx=idx)
    with torch.no_grad():
        lem.memory[idx[0, 1]] += 1.0
    after = lem.memory.clone()
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()
    assert torch.equal(lem.memory, after)


# --------------------------------------------------------------------------- #
# LinearAverage                                                                #
# --------------------------------------------------------------------------- #
def _original_linear_step(x, y, memory, T, m):
    """lemniscate's LinearAverage arithmetic: mm, /T in place; backward: grad /T, mm; then the update."""
    out = torch.mm(x, memory.t())
    out.div_(T)
    o = out.clone().requires_grad_()
    F.cross_entropy(o, y).backward()
    grad_x = torch.mm(o.grad.div_(T), memory)
    pos = memory.index_select(0, y).mul_(m).add_(x * (1 - m))
    mem = memory.clone()
    mem.index_copy_(0, y, pos.div(pos.pow(2).sum(1, keepdim=True).pow(0.5)))
    return out, grad_x, mem


def test_linear_average_is_bit_identical_to_the_original():
    torch.manual_seed(3)
    lin = LinearAverage(16, 50, T=0.07, momentum=0.5)
    x = F.normalize(torch.randn(8, 16), dim=1)
    y = torch.randperm(50)[:8]
    exp_out, exp_grad, exp_mem = _original_linear_step(x, y, lin.memory.clone(), float(lin.params[0]), 0.5)
    xg = x.clone().requires_grad_()
    out = lin(xg, y)
    assert torch.equal(out, exp_out)
    F.cross_entropy(out, y).backward()
    assert torch.equal(xg.grad, exp_grad)
    torch.testing.assert_close(lin.memory, exp_mem, rtol=0, atol=2e-7)       # fused update, fp32 rounding


def test_linear_average_two_forwards_and_retain_graph():
    torch.manual_seed(4)
    lin = LinearAverage(D, N, T=T).double()
    x1, x2, y, _ = _views()
    V0 = lin.memory.clone()
    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    loss = F.cross_entropy(lin(a, y), y) + F.cross_entropy(lin(b, y), y)
    loss.backward(retain_graph=True)
    ga, gb = a.grad.clone(), b.grad.clone()
    loss.backward()
    torch.testing.assert_close(a.grad, 2 * ga, rtol=1e-12, atol=1e-14)
    for g, x in ((ga, x1), (gb, x2)):
        torch.testing.assert_close(g, ref.softmax_grad(x, V0, y, T), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(lin.memory, _update(_update(V0, y, x2), y, x1), rtol=1e-12, atol=1e-12)


def test_linear_average_never_divides_a_gradient_someone_else_holds():
    torch.manual_seed(5)
    lin = LinearAverage(D, N, T=T)
    x = F.normalize(torch.randn(4, D), dim=1).requires_grad_()
    y = torch.arange(4)
    out = lin(x, y)
    logits = out.detach().clone().requires_grad_()
    F.cross_entropy(logits, y).backward()
    expected = logits.grad
    kept = []
    out.register_hook(kept.append)                                      # a hook keeps the tensor
    out.retain_grad()
    F.cross_entropy(out, y).backward()
    assert torch.equal(kept[0], expected) and torch.equal(out.grad, expected)
    gradient = torch.ones(4, N)                                         # backward(gradient=...)
    lin(x, y).backward(gradient)
    assert torch.equal(gradient, torch.ones(4, N))

"""Drop-in modules keep lemniscate.pytorch's semantics (docs/lemniscate.md)."""
import pytest
import torch

import instdisc_kernels as ik
from instdisc_kernels import reference as ref
from instdisc_kernels.ops import nce_probs as probs_mod

BACKENDS = [b for b in ("eager", "cpu", "triton") if ik.ops.nce_probs.TABLE.available(b, torch.device("cpu"))]


def _lemniscate_step(x, y, memory, idx, params, nLem):
    """A transcription of lemniscate's NCEFunction + NCECriterion + update, eager, float64."""
    K, T, Z, momentum = int(params[0]), float(params[1]), float(params[2]), float(params[3])
    x = x.detach().double().requires_grad_()
    weight = memory.double()[idx.view(-1)].view(idx.shape[0], idx.shape[1], -1)
    out = torch.bmm(weight, x.view(x.shape[0], -1, 1)).div(T).exp()
    if Z < 0:
        Z = out.mean().item() * nLem
    out = (out / Z).view(idx.shape[0], K + 1)
    loss = ref.nce_criterion(out, nLem)      # NCECriterion, same formula
    loss.backward()
    mem = memory.double().clone()
    pos = mem.index_select(0, y) * momentum + x.detach() * (1 - momentum)
    pos = pos / pos.pow(2).sum(1, keepdim=True).pow(0.5)
    for b in range(y.shape[0]):
        mem[y[b]] = pos[b]
    return out.detach(), loss.detach(), x.grad, mem, Z


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,K,D", [(1, 1, 3), (4, 7, 100), (6, 16, 128)])
def test_nce_average_matches_lemniscate(backend, B, K, D):
    torch.manual_seed(B + K + D)
    N = 50
    lem = ik.NCEAverage(D, N, K, T=0.1, backend=backend)
    crit = ik.NCECriterion(N)
    x = torch.nn.functional.normalize(torch.randn(B, D), dim=1).requires_grad_()
    y = torch.randint(0, N, (B,))
    if B > 2:
        y[1] = y[2]                                           # repeated positive
    idx = torch.randint(0, N, (B, K + 1))
    exp_out, exp_loss, exp_grad, exp_mem, exp_z = _lemniscate_step(
        x, y, lem.memory.clone(), torch.cat([y[:, None], idx[:, 1:]], 1), lem.params.clone(), N)
    mem0 = lem.memory.clone()
    out = lem(x, y, idx=idx)
    assert out.shape == (B, K + 1)
    torch.testing.assert_close(out.double(), exp_out, rtol=2e-5, atol=1e-9)
    assert float(lem.params[2]) == pytest.approx(exp_z, rel=1e-5)       # Z estimated, stored
    assert torch.equal(lem.memory, mem0)                                 # no update before backward
    loss = crit(out, y)
    assert loss.shape == (1,)                                            # the original's shape
    torch.testing.assert_close(loss[0].double(), exp_loss, rtol=2e-5, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(x.grad.double(), exp_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(lem.memory.double(), exp_mem, rtol=1e-5, atol=1e-6)


def test_z_is_set_on_first_call_only_and_given_z_is_kept():
    lem = ik.NCEAverage(8, 30, 4, T=0.07)
    assert lem.params.tolist()[:3] == [4, pytest.approx(0.07), -1]
    x = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    y = torch.arange(5)
    lem(x, y)
    z1 = float(lem.params[2])
    assert z1 > 0
    lem(torch.nn.functional.normalize(torch.randn(5, 8), dim=1), y)
    assert float(lem.params[2]) == z1
    fixed = ik.NCEAverage(8, 30, 4, Z=123.0)
    out = fixed(x, y)
    assert float(fixed.params[2]) == 123.0
    idx_out = out.shape
    assert idx_out == (5, 5)


def test_nce_average_column_zero_is_positive_when_idx_given():
    lem = ik.NCEAverage(4, 10, 2, Z=1.0, T=1.0)
    x = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    y = torch.tensor([3, 7])
    idx = torch.tensor([[0, 1, 2], [0, 1, 2]])
    out = lem(x, y, idx=idx)
    expected = torch.exp((lem.memory[y] * x).sum(1))
    torch.testing.assert_close(out[:, 0], expected)
    assert idx[:, 0].tolist() == [0, 0]          # the caller's tensor is not modified


def test_state_dict_keys_and_lemniscate_checkpoint_loads():
    lem = ik.NCEAverage(8, 20, 5, T=0.07, momentum=0.5)
    assert set(lem.state_dict()) == {"params", "memory"}
    ckpt = {"params": torch.tensor([5, 0.07, 321.5, 0.5]), "memory": torch.randn(20, 8)}
    lem.load_state_dict(ckpt)
    assert float(lem.params[2]) == 321.5 and torch.equal(lem.memory, ckpt["memory"])
    lin = ik.LinearAverage(8, 20)
    assert set(lin.state_dict()) == {"params", "memory"}
    assert lin.params.tolist() == [pytest.approx(0.07), 0.5]


def test_nce_average_float64_gradient_matches_finite_differences():
    # gradcheck's reentrancy check cannot apply (backward updates the bank, as
    # in lemniscate), so compare one backward with central differences.
    lem = ik.NCEAverage(5, 12, 3, Z=2.0, T=0.5, backend="eager").double()
    x = torch.nn.functional.normalize(torch.randn(3, 5, dtype=torch.float64), dim=1)
    y = torch.tensor([1, 2, 3])
    idx = torch.randint(0, 12, (3, 4))
    g = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        num = torch.zeros_like(x)
        for i in range(3):
            for j in range(5):
                e = torch.zeros_like(x)
                e[i, j] = 1e-6
                num[i, j] = ((lem(x + e, y, idx=idx) - lem(x - e, y, idx=idx)) * g).sum() / 2e-6
    xg = x.clone().requires_grad_()
    (lem(xg, y, idx=idx) * g).sum().backward()
    torch.testing.assert_close(xg.grad, num, rtol=1e-6, atol=1e-8)


def test_linear_average_matches_lemniscate():
    torch.manual_seed(5)
    N, D, B, T = 30, 16, 6, 0.1
    lin = ik.LinearAverage(D, N, T=T, momentum=0.5)
    x = torch.nn.functional.normalize(torch.randn(B, D), dim=1).requires_grad_()
    y = torch.tensor([1, 4, 4, 9, 0, 29])
    mem0 = lin.memory.clone()
    out = lin(x, y)
    torch.testing.assert_close(out, x.detach() @ mem0.t() / T)
    assert torch.equal(lin.memory, mem0)
    loss = torch.nn.CrossEntropyLoss()(out, y)
    torch.testing.assert_close(loss.double(), ref.softmax_loss_value(x, mem0, y, T), rtol=1e-5, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(x.grad.double(), ref.softmax_grad(x, mem0, y, T), rtol=1e-4, atol=1e-6)
    expected = mem0.double().clone()
    ref.memory_update_(expected, y, x, 0.5)
    torch.testing.assert_close(lin.memory.double(), expected, rtol=1e-5, atol=1e-6)


def test_probs_backward_eager_matches_autograd():
    torch.manual_seed(6)
    mem = ref.init_memory(15, 6).double()
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, 15, (3, 5))
    P, _ = probs_mod.probs_eager(x, mem, idx, torch.tensor([3.0]), 0.2)
    g = torch.randn_like(P)
    (P * g).sum().backward()
    P2, _ = probs_mod.probs_eager(x.detach(), mem, idx, torch.tensor([3.0]), 0.2)
    torch.testing.assert_close(probs_mod.probs_backward_eager(g, P2, mem, idx, 0.2), x.grad)


HAS_FUSED_OP = ik._backend.has_kernel("nce_probs_loss", "CPU")


@pytest.mark.skipif(not HAS_FUSED_OP, reason="extension built without instdisc::nce_probs_loss")
@pytest.mark.parametrize("feat_dtype,bank_dtype,tol", [
    (torch.float32, torch.float32, 2e-5), (torch.float64, torch.float64, 1e-10),
    (torch.float32, torch.bfloat16, 2e-5), (torch.float64, torch.float32, 1e-10)])
@pytest.mark.parametrize("B,K,D,z", [(1, 1, 100, 3.0), (5, 9, 100, -1.0), (6, 16, 128, 40.0)])
def test_nce_probs_loss_op_matches_float64_oracle(feat_dtype, bank_dtype, tol, B, K, D, z):
    torch.manual_seed(B * K)
    N = 30
    mem = torch.nn.functional.normalize(torch.randn(N, D), dim=1).to(bank_dtype)
    x = torch.nn.functional.normalize(torch.randn(B, D), dim=1).to(feat_dtype)
    idx = torch.randint(0, N, (B, K + 1))
    idx[:, 0] = torch.randint(0, N, (B,))
    if B > 2:
        idx[1, 0] = idx[2, 0]                                              # repeated positive
    zt = torch.tensor([z])
    P, loss, grad, gP, z_out = torch.ops.instdisc.nce_probs_loss(x, mem, idx, zt, 0.1)
    eP, eloss, egrad, egP, ez = probs_mod.probs_loss_eager(x.double(), mem.double(), idx, zt.double(), 0.1)
    torch.testing.assert_close(P.double(), eP, rtol=tol, atol=1e-12)
    torch.testing.assert_close(loss.double(), eloss, rtol=tol, atol=1e-9)
    torch.testing.assert_close(grad.double(), egrad, rtol=10 * tol, atol=1e-9)
    torch.testing.assert_close(gP.double(), egP, rtol=10 * tol, atol=1e-9)
    Pg = eP.clone().requires_grad_()                                      # dloss/dP of NCECriterion
    ref.nce_criterion(Pg, N).backward()
    torch.testing.assert_close(egP, Pg.grad, rtol=1e-9, atol=1e-12)
    assert float(z_out) == pytest.approx(float(ez), rel=1e-5)
    # the probabilities of nce_probs (up to FMA contraction)
    torch.testing.assert_close(P, torch.ops.instdisc.nce_probs(x, mem, idx, zt, 0.1)[0], rtol=1e-6, atol=0)
    # NCECriterion's formula (reference.nce_criterion) on the oracle's P gives the oracle's loss
    torch.testing.assert_close(ref.nce_criterion(eP, N), eloss, rtol=1e-10, atol=1e-12)


@pytest.mark.skipif(not HAS_FUSED_OP, reason="extension built without instdisc::nce_probs_loss")
def test_nce_probs_loss_opcheck():
    mem = torch.nn.functional.normalize(torch.randn(20, 8), dim=1)
    x = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    idx = torch.randint(0, 20, (3, 5))
    for z in (2.0, -1.0):
        torch.library.opcheck(torch.ops.instdisc.nce_probs_loss.default, (x, mem, idx, torch.tensor([z]), 0.5))


@pytest.mark.skipif(not HAS_FUSED_OP, reason="extension built without instdisc::nce_probs_loss")
@pytest.mark.parametrize("N,z", [(40, 3.0), (4000, 3.0), (40, -1.0)])     # row-order walk, row walk, Z estimate
def test_nce_probs_loss_does_not_depend_on_the_thread_count(N, z):
    mem = torch.nn.functional.normalize(torch.randn(N, 32), dim=1)
    x = torch.nn.functional.normalize(torch.randn(9, 32), dim=1)
    idx = torch.randint(0, N, (9, 31))
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(torch.ops.instdisc.nce_probs_loss(x, mem, idx, torch.tensor([z]), 0.2))
    finally:
        torch.set_num_threads(threads)
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], o))

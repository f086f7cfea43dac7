"""The bank momentum update at the numeric edges, on every backend: it never writes a
NaN/inf/zero row (scale-safe norm; v = 0 keeps the old row), features that are a view of
the bank give the copy's answer, and a bank created under torch.inference_mode() is
written like any other."""
import pytest
import torch

import instdisc_kernels as ik
from instdisc_kernels import reference as ref
from instdisc_kernels.ops import bank_update, softmax

BACKENDS = [b for b in ("eager", "cpu", "triton") if bank_update.TABLE.available(b, torch.device("cpu"))]
SOFTMAX_BACKENDS = [b for b in BACKENDS if b in softmax.TABLE.impls]   # the softmax has no C++ kernel
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _unit_bank(N, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1).to(dtype)


def _check_against_oracle(mem, before, y, feats, momentum, dtype):
    expected = before.clone().double()
    ref.memory_update_(expected, y, feats, momentum)
    assert torch.isfinite(mem).all()
    torch.testing.assert_close(mem.double(), expected, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("case", ["minus_rows", "zero_momentum_zero_features", "norm_1e20", "norm_1e-30",
                                  "d1_cancel", "mixed"])
def test_update_never_writes_nan_inf_or_zero_rows(backend, dtype, case):
    N, D, B = 9, 1 if case == "d1_cancel" else 100, 4
    mem = _unit_bank(N, D, dtype, seed=3)
    y = torch.tensor([5, 0, 8, 5])                      # 5 repeated: the last occurrence wins
    old = mem[y].clone()                                 # exact cancellation in the bank dtype
    momentum = 0.5
    if case == "minus_rows":                             # m V + (1 - m) F == 0 exactly
        feats = -old
    elif case == "zero_momentum_zero_features":
        feats, momentum = torch.zeros(B, D), 0.0
    elif case == "norm_1e20":                            # sum of squares overflows fp32
        feats, momentum = torch.randn(B, D) * 1e20, 0.0
    elif case == "norm_1e-30":                           # sum of squares underflows fp32
        feats, momentum = torch.randn(B, D) * 1e-30, 0.0
    elif case == "d1_cancel":
        feats = -old
        feats[1] = old[1] * 3                            # one row with a direction
    else:
        feats = torch.randn(B, D) * 1e19
        feats[0] = -old[0]
    before = mem.clone()
    ik.bank_update_(mem, y, feats, momentum, backend=backend)
    assert torch.isfinite(mem).all()
    norms = mem.double().norm(dim=1)
    assert (norms > 0.5).all(), f"a zero row was written: {norms}"
    # rows whose update has no direction keep their old value, bit for bit
    v = momentum * before[y].double() + (1 - momentum) * feats.double()
    for b in range(B):
        if y[b] == 5 and b == 0:
            continue                                     # superseded by b = 3
        if bool((v[b] == 0).all()):
            assert torch.equal(mem[y[b]], before[y[b]])
    _check_against_oracle(mem, before, y, feats, momentum, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_update_keeps_old_row_documented_for_zero_vector(backend):
    mem = _unit_bank(4, 3)
    before = mem.clone()
    ik.bank_update_(mem, torch.tensor([2]), -mem[2:3].clone(), 0.5, backend=backend)
    assert torch.equal(mem, before)
    # the float64 oracle says the same
    assert torch.equal(ref.updated_rows(-before[2:3], before, torch.tensor([2]), 0.5), before[2:3].double())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [1, 3])
def test_features_that_view_the_bank_match_a_copy(backend, shift):
    N, D, B = 12, 100, 6
    mem = _unit_bank(N, D, seed=1)
    y = torch.roll(torch.arange(B), shift)
    want = mem.clone()
    ik.bank_update_(want, y, want[:B].clone(), 0.5, backend=backend)
    ik.bank_update_(mem, y, mem[:B], 0.5, backend=backend)
    torch.testing.assert_close(mem, want, rtol=0, atol=0)
    expected = _unit_bank(N, D, seed=1).double()
    ref.memory_update_(expected, y, expected[:B].clone(), 0.5)
    torch.testing.assert_close(mem.double(), expected, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend", SOFTMAX_BACKENDS)
def test_softmax_loss_update_with_bank_view_features(backend):
    N, D, B = 10, 8, 4
    mem = _unit_bank(N, D, seed=2)
    want = mem.clone()
    y = torch.tensor([3, 0, 1, 2])
    ik.nonparametric_softmax_loss(want[:B].clone(), want, y, backend=backend)
    ik.nonparametric_softmax_loss(mem[:B], mem, y, backend=backend)
    torch.testing.assert_close(mem, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_created_under_inference_mode_is_written_on_every_backend(backend):
    N, D = 10, 6
    with torch.inference_mode():
        mem = _unit_bank(N, D, seed=4)
    assert mem.is_inference()
    normal = _unit_bank(N, D, seed=4)
    y = torch.tensor([1, 7, 1])
    feats = torch.nn.functional.normalize(torch.randn(3, D), dim=1)
    ik.bank_update_(mem, y, feats, 0.5, backend=backend)
    ik.bank_update_(normal, y, feats, 0.5, backend=backend)
    torch.testing.assert_close(mem, normal, rtol=0, atol=0)
    # and through a loss, which reads the bank and then updates it
    f = feats.clone().requires_grad_()
    loss = ik.nce_loss(f, mem, y, neg_indices=torch.tensor([[0, 2], [3, 4], [5, 6]]), backend=backend)
    loss.backward()
    assert torch.isfinite(f.grad).all()
    ik.nonparametric_softmax_loss(feats, mem, y, backend=backend if backend in SOFTMAX_BACKENDS else "auto")


def test_memory_bank_module_created_under_inference_mode():
    with torch.inference_mode():
        bank = ik.MemoryBank(8, 4, init="normal", generator=torch.Generator().manual_seed(0))
    want = bank.memory.clone()
    feats = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    ref.memory_update_(want, torch.tensor([0, 5]), feats, 0.5)
    bank.update(torch.tensor([0, 5]), feats)
    torch.testing.assert_close(bank.memory, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("backend,num_negatives", [(b, k) for b in BACKENDS for k in (0, 3)
                                                   if k or b in SOFTMAX_BACKENDS])
def test_instdisc_loss_created_under_inference_mode_trains(backend, num_negatives):
    kw = dict(num_negatives=num_negatives, backend=backend, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        crit = ik.InstDiscLoss(12, 4, **kw)
    normal = ik.InstDiscLoss(12, 4, **kw)
    normal.generator = torch.Generator().manual_seed(1)
    crit.generator = torch.Generator().manual_seed(1)
    normal.memory.copy_(crit.memory)
    f = torch.nn.functional.normalize(torch.randn(3, 4), dim=1)
    y = torch.tensor([2, 5, 2])
    for c in (crit, normal):
        x = f.clone().requires_grad_()
        c(x, y).backward()
        assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(crit.memory, normal.memory, rtol=0, atol=0)
    torch.testing.assert_close(crit.z, normal.z, rtol=0, atol=0)

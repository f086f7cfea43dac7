"""bank_update_ (every backend) against the float64 oracle reference.memory_update_."""
import pytest
import torch

import instdisc_kernels as ik
from instdisc_kernels import reference as ref
from instdisc_kernels.ops import bank_update

BACKENDS = [b for b in ("eager", "cpu", "triton") if bank_update.TABLE.available(b, torch.device("cpu"))]
# bank dtype -> tolerance on the updated rows (one rounding to the bank dtype)
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def test_cpu_backend_is_built():
    assert "cpu" in BACKENDS, "the C++ extension instdisc_kernels._C is not built"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,D,indices", [
    (1, 3, [4]),
    (5, 100, [0, 7, 7, 3, 7]),           # repeated index: last occurrence wins
    (6, 129, [2, 2, 2, 2, 2, 2]),
    (8, 128, [9, 1, 0, 5, 3, 1, 8, 0]),
])
def test_bank_update_matches_reference(backend, bank_dtype, B, D, indices):
    g = torch.Generator().manual_seed(B * 1000 + D)
    N = 10
    mem = ref.init_memory(N, D, generator=g).to(bank_dtype)
    feats = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    y = torch.tensor(indices)
    expected = mem.clone().double()
    ref.memory_update_(expected, y, feats, 0.5)
    # rows not in y are untouched, bit for bit
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[y] = False
    before = mem.clone()
    ik.bank_update_(mem, y, feats, 0.5, backend=backend)
    torch.testing.assert_close(mem.double(), expected, rtol=TOL[bank_dtype], atol=TOL[bank_dtype])
    assert torch.equal(mem[untouched], before[untouched])
    # updated rows are unit length (up to the bank dtype's rounding)
    norms = mem[y].double().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=4 * TOL[bank_dtype] + 1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_update_momentum_zero_copies_normalised_feature(backend):
    mem = torch.zeros(4, 3)
    f = torch.tensor([[3.0, 0.0, 4.0]])
    ik.bank_update_(mem, torch.tensor([2]), f, 0.0, backend=backend)
    torch.testing.assert_close(mem[2], torch.tensor([0.6, 0.0, 0.8]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bank_update_accepts_bf16_features_and_int32_indices(backend):
    mem = ref.init_memory(6, 5)
    f = torch.nn.functional.normalize(torch.randn(3, 5), dim=1)
    expected = mem.clone().double()
    ref.memory_update_(expected, torch.tensor([1, 2, 1]), f.bfloat16().float(), 0.5)
    ik.bank_update_(mem, torch.tensor([1, 2, 1], dtype=torch.int32), f.bfloat16(), 0.5, backend=backend)
    torch.testing.assert_close(mem.double(), expected, rtol=2e-6, atol=2e-6)


def test_memory_bank_module_update_and_state_dict():
    bank = ik.MemoryBank(12, 4, momentum=0.3)
    assert bank.memory.shape == (12, 4)
    f = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    expected = bank.memory.clone().double()
    ref.memory_update_(expected, torch.tensor([3, 11]), f, 0.3)
    bank.update(torch.tensor([3, 11]), f)
    torch.testing.assert_close(bank.memory.double(), expected)
    other = ik.MemoryBank(12, 4, init="zeros")
    other.load_state_dict(bank.state_dict())
    assert torch.equal(other.memory, bank.memory)
    normal = ik.MemoryBank(5, 4, init="normal")
    torch.testing.assert_close(normal.memory.norm(dim=1), torch.ones(5))

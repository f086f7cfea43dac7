"""MemoryBank storage on 2 MiB pages (instdisc_kernels/hugepages.py): same values, same
results, huge pages where the OS grants them, an ordinary tensor where it does not."""
import pickle

import pytest
import torch

from instdisc_kernels import MemoryBank, hugepages, nce_loss
from instdisc_kernels import reference as R

BIG = (40_000, 128)        # 20 MB of fp32: above hugepages.MIN_BYTES


def test_small_or_non_cpu_banks_are_ordinary_tensors():
    t = hugepages.empty_rows(10, 4)
    assert t.shape == (10, 4) and t.dtype == torch.float32 and t.is_contiguous()
    assert hugepages.huge_page_bytes(t) == 0 or hugepages.thp_mode() == "always"


@pytest.mark.skipif(not hugepages.available(),
                    reason=f"transparent huge pages are {hugepages.thp_mode()!r} on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_cpu_bank_is_on_huge_pages(dtype):
    t = hugepages.empty_rows(*BIG, dtype=dtype)
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0
    t.fill_(1.0)                                   # touch every page
    assert hugepages.huge_page_bytes(t) >= hugepages.HUGE_PAGE


def test_fallback_when_the_os_says_no(monkeypatch):
    monkeypatch.setattr(hugepages, "thp_mode", lambda: "never")
    t = hugepages.empty_rows(*BIG)
    assert t.shape == BIG and hugepages.huge_page_bytes(t.fill_(0)) == 0


def test_fallback_when_mmap_fails(monkeypatch):
    def boom(nbytes):
        raise OSError("no memory")
    monkeypatch.setattr(hugepages, "_huge_tensor", boom)
    assert hugepages.empty_rows(*BIG).shape == BIG


def test_memory_bank_values_state_dict_and_pickle():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    bank = MemoryBank(*BIG, generator=g1)
    assert torch.equal(bank.memory, R.init_memory(*BIG, generator=g2))
    sd = {k: v.clone() for k, v in bank.state_dict().items()}
    other = MemoryBank(*BIG)
    other.load_state_dict(sd)                      # in place: stays on the huge-page storage
    assert torch.equal(other.memory, bank.memory)
    again = pickle.loads(pickle.dumps(bank))
    assert torch.equal(again.memory, bank.memory)


def test_nce_on_a_huge_page_bank_equals_an_ordinary_one():
    bank = MemoryBank(*BIG)
    plain = bank.memory.clone()
    x = torch.nn.functional.normalize(torch.randn(5, BIG[1]), dim=1)
    y = torch.tensor([3, 9, 3, 1000, 39_999])
    neg = torch.randint(0, BIG[0], (5, 17))
    kw = dict(neg_indices=neg, temperature=0.07, z=1e4)
    a = nce_loss(x, bank.memory, y, **kw)
    b = nce_loss(x, plain, y, **kw)
    assert torch.equal(a, b) and torch.equal(bank.memory, plain)

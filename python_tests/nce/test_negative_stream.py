"""One stream of in-kernel negatives for every backend (docs/negatives.md).

The cpu kernel (torch.ops.instdisc.nce_forward with neg_indices None) and the Triton
kernels (ops/nce_triton.py, under the interpreter here) must draw exactly the same
indices for the same seed and shape. The cpu op returns no indices, so they are read
back from its gradient: with features 0, z = 1 and T = 1 every P is 1, and with bank
rows V[i] = (i, 0) the gradient of row b is c_pos * y[b] + c_neg * sum_j idx[b, j] in
its first column. The stream does not depend on K (negative j of row b uses counter
(j >> 1, b) only), so the draw j is the difference of these sums for K = j + 1 and K = j.
A pure-Python transcription of the documented stream checks both against the docs.
"""
import pytest
import torch

from instdisc_kernels import _backend
from instdisc_kernels import reference as ref

pytest.importorskip("instdisc_kernels.ops.nce_triton", reason="triton is not installed")
if not _backend.extension_loaded():
    pytest.skip("the C++ extension (instdisc_kernels._C) is not built", allow_module_level=True)
if not _backend.triton_interpreting():
    pytest.skip("these tests run the Triton kernels on CPU tensors (TRITON_INTERPRET=1)", allow_module_level=True)

OPS = torch.ops.instdisc
MASK32, MASK64 = 2**32 - 1, 2**64 - 1


def _cpu_sums(y, N, K, seed, exclude):
    """(B,) int64: sum over the cpu kernel's K in-kernel draws of each row, read from the gradient."""
    B = y.shape[0]
    mem = torch.zeros(N, 2, dtype=torch.float64)
    mem[:, 0] = torch.arange(N, dtype=torch.float64)
    F = torch.zeros(B, 2, dtype=torch.float64)
    _, grad, _ = OPS.nce_forward(F, mem, y, None, torch.tensor([1.0]), torch.tensor([seed]), K, 1.0, 0.0, 0, 0.0,
                                 exclude, None)
    c = K / N + ref.EPS                                   # every P = exp(0) / 1 = 1
    c_pos, c_neg = -c / (1 + c) / B, 1 / (1 + c) / B
    sums = (grad[:, 0] - c_pos * y.double()) / c_neg
    assert (sums - sums.round()).abs().max() < 1e-3
    return sums.round().long()


def cpu_draws(y, N, K, seed, exclude=False):
    """(B, K) int64: the negatives the cpu kernel draws in-kernel, in order."""
    prev = torch.zeros(y.shape[0], dtype=torch.int64)
    cols = []
    for k in range(1, K + 1):
        cur = _cpu_sums(y, N, k, seed, exclude)
        cols.append(cur - prev)
        prev = cur
    return torch.stack(cols, 1)


def _philox4x32_10(c, k0, k1):
    c = list(c)
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & MASK32, (p0 >> 32) ^ c[3] ^ k1, p0 & MASK32]
    return c


def documented_draws(y, N, K, seed, exclude=False):
    """The stream as docs/negatives.md states it, in Python integers."""
    key = seed & MASK64
    out = []
    for b, yb in enumerate(y.tolist()):
        row = []
        for j in range(K):
            o = _philox4x32_10([(j >> 1) & MASK32, j >> 33, b & MASK32, b >> 32], key & MASK32, key >> 32)
            r = o[0] | o[1] << 32 if j % 2 == 0 else o[2] | o[3] << 32
            v = (r * (N - 1 if exclude else N)) >> 64
            row.append(v + (v >= yb) if exclude else v)
        out.append(row)
    return torch.tensor(out, dtype=torch.int64)


CASES = [  # (B, N, K, seed, exclude_positive)
    (1, 7, 1, 0, False),                      # B = 1, K = 1
    (1, 10, 1, 3, True),
    (3, 101, 9, 12345, False),                # odd N, odd K (the last block's second word unused)
    (4, 1000, 6, 2**61 + 12345, True),        # N not a power of two, a seed with a high word
    (2, 2, 8, 7, True),                       # N = 2 with exclude_positive: always the other row
    (5, 96, 4, -5, False),                    # a negative int64 seed (the key is its 64-bit pattern)
    (2, 1_000_003, 3, 99, False),             # a large odd bank
]


@pytest.mark.parametrize("B,N,K,seed,exclude", CASES)
def test_triton_draws_equal_cpu_draws(B, N, K, seed, exclude, triton_negatives):
    y = (torch.arange(B) * 37 + 1) % N
    want = cpu_draws(y, N, K, seed, exclude)
    got = triton_negatives(y, N, K, torch.tensor([seed]), exclude)
    assert torch.equal(got, want)
    assert torch.equal(want, documented_draws(y, N, K, seed, exclude))
    assert want.min() >= 0 and want.max() < N
    if exclude:
        assert not (want == y[:, None]).any()
    if N == 2 and exclude:
        assert torch.equal(want, (1 - y)[:, None].expand(B, K))


@pytest.mark.parametrize("loss_type", [0, 1])
def test_nce_forward_is_the_same_on_cpu_and_triton(loss_type):
    """Switching the backend keeps the run: the same seed gives the same negatives, so the same loss."""
    g = torch.Generator().manual_seed(3)
    N, B, D, K = 53, 3, 16, 11
    mem = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    F = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    y = torch.randint(0, N, (B,), generator=g)
    args = (F, mem, y, None, torch.zeros(1), torch.tensor([2**40 + 9]), K, 0.07, 0.0, loss_type, 0.0, True, None)
    cpu = OPS.nce_forward(*args)
    tri = OPS.nce_forward_triton(*args)
    torch.testing.assert_close(tri[0], cpu[0], rtol=2e-5, atol=0)
    torch.testing.assert_close(tri[1], cpu[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tri[2], cpu[2], rtol=2e-5, atol=0)

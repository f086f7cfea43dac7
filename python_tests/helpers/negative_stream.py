"""The in-kernel negatives of the CPU kernel read back, and the stream as docs/negatives.md states
it, in Python integers. Used by python_tests/nce/test_negative_stream.py and, under every CPU
capability (the AVX2 kernels draw 16 negatives at a time), by the child of
python_tests/backends/test_cpu_capability.py.

The cpu op returns no indices, so they are read back from its gradient: with features 0, z = 1
and T = 1 every P is 1, and with bank rows V[i] = (i, 0) the gradient of row b is
c_pos * y[b] + c_neg * sum_j idx[b, j] in its first column. The stream does not depend on K
(negative j of row b uses counter (j >> 1, b) only), so the draw j is the difference of these
sums for K = j + 1 and K = j.
"""
import torch

MASK32, MASK64 = 2**32 - 1, 2**64 - 1
EPS = 1e-7          # lemniscate's NCECriterion eps (reference.EPS)

# (B, N, K, seed, exclude_positive): K >= 16 takes the vectorised draws, K % 16 their scalar tail
STREAM_CASES = [(3, 1_000_003, 37, 2**61 + 12345, True), (2, 50, 32, 7, False), (1, 2, 17, -5, True)]


def _cpu_sums(ops, y, N, K, seed, exclude):
    """(B,) int64: sum over the cpu kernel's K in-kernel draws of each row, read from the gradient."""
    B = y.shape[0]
    mem = torch.zeros(N, 2, dtype=torch.float64)
    mem[:, 0] = torch.arange(N, dtype=torch.float64)
    F = torch.zeros(B, 2, dtype=torch.float64)
    _, grad, _ = ops.nce_forward(F, mem, y, None, torch.tensor([1.0]), torch.tensor([seed]), K, 1.0, 0.0, 0, 0.0,
                                 exclude, None)
    c = K / N + EPS                                   # every P = exp(0) / 1 = 1
    c_pos, c_neg = -c / (1 + c) / B, 1 / (1 + c) / B
    sums = (grad[:, 0] - c_pos * y.double()) / c_neg
    assert (sums - sums.round()).abs().max() < 1e-3
    return sums.round().long()


def cpu_draws(ops, y, N, K, seed, exclude=False):
    """(B, K) int64: the negatives the cpu kernel draws in-kernel, in order."""
    prev = torch.zeros(y.shape[0], dtype=torch.int64)
    cols = []
    for k in range(1, K + 1):
        cur = _cpu_sums(ops, y, N, k, seed, exclude)
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


def check_negative_stream(ops):
    """The cpu kernel's draws equal the documented stream on STREAM_CASES; returns the number of checks."""
    for B, N, K, seed, exclude in STREAM_CASES:
        y = (torch.arange(B) * 37 + 1) % N
        got, want = cpu_draws(ops, y, N, K, seed, exclude), documented_draws(y, N, K, seed, exclude)
        assert torch.equal(got, want), f"in-kernel negatives differ from docs/negatives.md at {(B, N, K, seed)}"
    return len(STREAM_CASES)

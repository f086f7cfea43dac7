"""One stream of in-kernel negatives for every backend (docs/negatives.md).

The cpu kernel (torch.ops.instdisc.nce_forward with neg_indices None) and the Triton
kernels (ops/nce_triton.py, under the interpreter here) must draw exactly the same
indices for the same seed and shape. The cpu draws are read back from its gradient
(python_tests/helpers/negative_stream.py), and a pure-Python transcription of the
documented stream checks both against the docs.
"""
import pytest
import torch

from helpers import negative_stream
from helpers.negative_stream import documented_draws
from instdisc_kernels import _backend

pytest.importorskip("instdisc_kernels.ops.nce_triton", reason="triton is not installed")
if not _backend.extension_loaded():
    pytest.skip("the C++ extension (instdisc_kernels._C) is not built", allow_module_level=True)
if not _backend.triton_interpreting():
    pytest.skip("these tests run the Triton kernels on CPU tensors (TRITON_INTERPRET=1)", allow_module_level=True)

OPS = torch.ops.instdisc


def cpu_draws(y, N, K, seed, exclude=False):
    return negative_stream.cpu_draws(OPS, y, N, K, seed, exclude)


CASES = [  # (B, N, K, seed, exclude_positive)
    (1, 7, 1, 0, False),                      # B = 1, K = 1
    (1, 10, 1, 3, True),
    (3, 101, 9, 12345, False),                # odd N, odd K (the last block's second word unused)
    (4, 1000, 6, 2**61 + 12345, True),        # N not a power of two, a seed with a high word
    (2, 2, 8, 7, True),                       # N = 2 with exclude_positive: always the other row
    (5, 96, 4, -5, False),                    # a negative int64 seed (the key is its 64-bit pattern)
    (2, 1_000_003, 3, 99, False),             # a large odd bank
    *negative_stream.STREAM_CASES,            # K >= 16: the AVX2 kernel's 16-draw blocks and their tail
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

"""The exact softmax's fused CPU pass, instdisc::softmax_online_state (csrc/cpu/softmax.cpp), against
the float64 definition of its outputs: with S = F V^T over every bank row,
m = max_j S, l = sum_j exp(S - m), A = sum_j exp(S - m) V_j.

The loss and gradient it feeds (the softmax's "cpu" backend) are checked against the oracle in
test_softmax.py; here the state itself, on odd shapes (B not a multiple of the 6-row tile, N not
a multiple of the 96-row block, D not a multiple of 16), every bank dtype, one and several
threads, a selection of the bank's rows (index) and bf16-rounded operands (round_bf16), and its
argument checks."""
import pytest
import torch

from instdisc_kernels import _backend

pytestmark = pytest.mark.skipif(
    not (_backend.has_kernel("softmax_online_state", "CPU") and _backend.CPU_FMA_TILES),
    reason="needs the C++ extension and the avx2 CPU capability or better (the fused pass's FMA tiles)")


def _want(F, V):
    S = F.double() @ V.double().t()
    m = S.max(1).values
    P = torch.exp(S - m[:, None])
    return m, P.sum(1), P @ V.double()


def _data(B, N, D, bank_dtype=torch.float32, scale=1 / 0.07, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1).to(bank_dtype)
    F = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1) * scale
    return F.float(), V


def _check(F, V, rel=2e-5):
    m, l, A = torch.ops.instdisc.softmax_online_state(F, V)
    wm, wl, wA = _want(F, V)
    assert m.dtype == l.dtype == A.dtype == torch.float32 and A.shape == F.shape
    # s = f.v in fp32 FMA: within ~D u |f||v| of the float64 value; l and A scale by exp of that
    tol_s = 1e-6 * F.double().norm(dim=1).max().item() * V.double().norm(dim=1).max().item() + 1e-7
    assert (m.double() - wm).abs().max().item() <= tol_s
    assert ((l.double() - wl).abs() <= (rel + 2 * tol_s) * wl).all()
    err = (A.double() - wA).norm(dim=1)
    assert (err <= (rel + 2 * tol_s) * wl * V.double().norm(dim=1).max() + 1e-30).all()


SHAPES = [  # B, N, D
    (1, 1, 1),         # the smallest call
    (5, 95, 100),      # N < one block, D = 100
    (7, 96, 16),       # N = one block exactly
    (13, 97, 129),     # one block + one row, D = 129
    (6, 1000, 128),    # B = one tile
    (50, 2001, 33),    # B over one 48-row pass, several blocks per thread
]


@pytest.mark.parametrize("B,N,D", SHAPES)
def test_matches_float64(B, N, D):
    F, V = _data(B, N, D)
    _check(F, V)


@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_banks(bank_dtype):
    # bf16/fp16 rows are widened exactly: the float64 definition sees the same values
    F, V = _data(11, 700, 40, bank_dtype)
    _check(F, V)


def test_large_scores_are_stable():
    # scores up to ~1/0.01 = 100: exp would overflow without the running max
    F, V = _data(9, 500, 24, scale=100.0)
    _check(F, V, rel=1e-4)


def test_repeated_rows_and_threads():
    # every row the same: l = N exactly (up to rounding), A = N v; one thread and the default split agree
    F, _ = _data(4, 1, 20)
    V = _data(1, 1, 20, seed=3)[1].expand(777, 20).contiguous()
    _check(F, V)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.instdisc.softmax_online_state(F, V)
    finally:
        torch.set_num_threads(threads)
    many = torch.ops.instdisc.softmax_online_state(F, V)
    for a, b in zip(one, many):
        assert torch.allclose(a, b, rtol=1e-5, atol=0)


def test_thread_ranges_merge_with_different_maxima():
    # random rows, the largest score in the last 96-row block: with 2+ threads each range has its own
    # max, so the merge rescales (exp(m_t - m) < 1); the result equals the float64 state and one thread's
    F, V = _data(5, 1000, 24)
    V[-2] = torch.nn.functional.normalize(F[0].double(), dim=0).to(V.dtype)   # row 0's best match, last block
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.instdisc.softmax_online_state(F, V)
        torch.set_num_threads(max(2, threads))
        _check(F, V)
        many = torch.ops.instdisc.softmax_online_state(F, V)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.allclose(a, b, rtol=1e-5, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_bank_row_gives_a_non_finite_state(bad):
    # the softmax's output check names the row from a non-finite state; one bad row in the last
    # of several blocks must not be averaged away
    F, V = _data(4, 500, 16)
    V[450, 3] = bad
    m, l, A = torch.ops.instdisc.softmax_online_state(F, V)
    assert not bool(torch.isfinite(l).all() and torch.isfinite(A).all() and torch.isfinite(m).all())


def test_argument_errors():
    F, V = _data(3, 20, 8)
    with pytest.raises(TypeError, match="features must be float32"):
        torch.ops.instdisc.softmax_online_state(F.double(), V)
    with pytest.raises(TypeError, match="bank must be float32, bfloat16 or float16"):
        torch.ops.instdisc.softmax_online_state(F, V.double())
    with pytest.raises(ValueError, match="bank's D = 8"):
        torch.ops.instdisc.softmax_online_state(F[:, :5].contiguous(), V)
    with pytest.raises(ValueError, match="non-empty"):
        torch.ops.instdisc.softmax_online_state(F, V[:0])


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_index_reads_the_selected_rows(bank_dtype):
    # rows scattered over a larger bank, one selected twice: bit-identical to the gathered rows
    F, V = _data(13, 301, 100, bank_dtype)
    g = torch.Generator().manual_seed(5)
    bank = torch.randn(1000, 100, generator=g).to(bank_dtype)
    index = torch.randperm(1000, generator=g)[:301]
    index[7] = index[3]
    V[7] = V[3]
    bank[index] = V
    want = torch.ops.instdisc.softmax_online_state(F, V)
    got = torch.ops.instdisc.softmax_online_state(F, bank, index)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.float16])
def test_round_bf16_rounds_both_operands(bank_dtype):
    # the same as the pass on bf16-rounded features and rows (then exact fp32 products), and so
    # within the fp32 pass's error of the float64 state of the rounded operands
    F, V = _data(17, 500, 40, bank_dtype)
    Fr, Vr = F.bfloat16().float(), V.bfloat16().float()
    got = torch.ops.instdisc.softmax_online_state(F, V, None, True)
    want = torch.ops.instdisc.softmax_online_state(Fr, Vr)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    _check(Fr, Vr)
    assert not torch.equal(got[2], torch.ops.instdisc.softmax_online_state(F, V)[2])   # it did round


def test_round_bf16_matches_torch_on_edge_values():
    # ties to even, subnormals, signs, values near the bf16 range: one bank row of these values
    # against a one-hot feature row per value gives m = the rounded value; the weighted row (A, one
    # bank row, weight exp(0) = 1) is the rounded row itself
    vals = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 1.0 + 2 ** -8 + 2 ** -20, 3.0e-39,
                         -1.1e-40, 1e-45, 3.3895e38, -2.0 ** 127, 0.1, -7.77, 0.0, -0.0])
    D = vals.numel()
    got_m, _, got_A = torch.ops.instdisc.softmax_online_state(torch.eye(D), vals[None], None, True)
    want = vals.bfloat16().float()
    assert torch.equal(got_A, want.expand(D, D))
    assert torch.equal(got_m, want)
    # features rounded the same way: the bank row e_0 picks feature value d of row d
    F = vals[:, None].repeat(1, 2)
    got_m, _, _ = torch.ops.instdisc.softmax_online_state(F, torch.tensor([[1.0, 0.0]]), None, True)
    assert torch.equal(got_m, want)
    # NaN stays NaN (a NaN row must reach the output check)
    m, l, A = torch.ops.instdisc.softmax_online_state(torch.ones(1, 2), torch.tensor([[float("nan"), 1.0]]), None, True)
    assert torch.isnan(l[0]) and torch.isnan(A[0]).all()


def test_index_errors_name_the_argument():
    F, V = _data(3, 20, 8)
    with pytest.raises(ValueError, match=r"index contains 20 \(flat position 1\), out of range \[0, 20\)"):
        torch.ops.instdisc.softmax_online_state(F, V, torch.tensor([0, 20]))
    with pytest.raises(TypeError, match="softmax_online_state: index must be int64"):
        torch.ops.instdisc.softmax_online_state(F, V, torch.tensor([0], dtype=torch.int32))
    with pytest.raises(ValueError, match="softmax_online_state: index must be a 1-D CPU tensor"):
        torch.ops.instdisc.softmax_online_state(F, V, torch.zeros(1, 1, dtype=torch.long))

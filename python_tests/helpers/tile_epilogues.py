"""Checks of the CPU tile epilogues of the shared negatives (csrc/cpu/nce_shared.cpp) against
float64 torch on edge values (0, +-95, -100, a long row over the kernels' renormalisation
points, a NaN), used by python_tests/nce/test_nce_shared.py and, under every CPU capability, by
the child of python_tests/backends/test_cpu_capability.py. Returns the number of checks."""
import math

import torch

# per-entry error budgets in float32 units: the AVX2 exp is within 2 ulp, a sigmoid within 4
U32 = 2.0 ** -24


def check_tile_epilogues(ops):
    g = torch.Generator().manual_seed(11)
    checked = 0
    for B, n in ((1, 1), (3, 7), (5, 17), (2, 300), (3, 2200)):
        x = torch.randn(B, n, generator=g) * 30
        flat = x.view(-1)
        flat[0] = 0.0
        if flat.numel() > 3:
            flat[1], flat[2] = -100.0, 95.0
        xd = x.double()
        y = x.clone()
        total = ops.nce_shared_tile_nce_(y)
        want = torch.nn.functional.softplus(xd).sum()
        assert total.dtype == torch.float64 and total.dim() == 0
        assert abs(float(total - want)) <= 8 * U32 * x.numel(), (B, n, float(total), float(want))
        assert (y.double() - torch.sigmoid(xd)).abs().max().item() <= 8 * U32, (B, n, "sigmoid")
        lse = ops.nce_shared_tile_lse(x.clone())
        assert abs(float(lse - torch.logsumexp(xd.view(-1), 0))) <= 8 * U32, (B, n, "lse")
        m, l, z = torch.full((B,), 3.0), torch.full((B,), 2.0), x.clone()
        scale = ops.nce_shared_tile_softmax_(z, m, l)
        mn = torch.maximum(torch.tensor(3.0, dtype=torch.float64), xd.max(1).values)
        w = torch.exp(xd - mn[:, None])
        assert torch.equal(m.double(), mn), (B, n, "row max")
        assert (z.double() - w).abs().max().item() <= 8 * U32, (B, n, "softmax weights")
        want_l = 2.0 * torch.exp(3.0 - mn) + w.sum(1)
        assert ((l.double() - want_l) / want_l).abs().max().item() <= 8 * U32 * math.sqrt(n), (B, n, "row sum")
        assert (scale.double() - torch.exp(3.0 - mn)).abs().max().item() <= 4 * U32, (B, n, "rescale")
        checked += 4
    nan_row = torch.tensor([[float("nan")] + [float(i) for i in range(1, 12)]])
    assert math.isnan(float(ops.nce_shared_tile_nce_(nan_row.clone())))
    assert math.isnan(float(ops.nce_shared_tile_lse(nan_row.clone())))
    m, l = torch.full((1,), float("-inf")), torch.zeros(1)
    ops.nce_shared_tile_softmax_(nan_row.clone(), m, l)
    assert math.isnan(float(m)) and math.isnan(float(l))
    return checked + 1


def check_fused_passes(ops):
    """The one-pass ops over K gathered rows (nce_shared_nce_pass, nce_shared_lse_pass; avx2 and up)
    against float64 torch: odd B, K and D (across the 6-row tiles, 96-row blocks and 16-value
    groups), every row dtype, scores up to ~|60|; the same rows selected from a bank by index, and
    round_bf16. Returns the number of checks."""
    g = torch.Generator().manual_seed(12)
    checked = 0
    for (B, K, D), dtype in (((1, 1, 1), torch.float32), ((7, 97, 100), torch.float32),
                             ((13, 300, 33), torch.bfloat16), ((6, 96, 128), torch.float16),
                             ((50, 1000, 20), torch.float32)):
        rows = torch.nn.functional.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1).to(dtype)
        F = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1).float() / 0.07
        bias = (torch.randn(K, generator=g) * 3 - 5).float()
        S = F.double() @ rows.double().t()
        # each score is within ~D u |f| |g| of the float64 one (fp32 FMA): the error budgets below scale by it
        es = 2 * D * U32 * float(F.double().norm(dim=1).max()) + 1e-7
        total, A = ops.nce_shared_nce_pass(F, rows, bias)
        x = S + bias.double()
        want = torch.nn.functional.softplus(x).sum()
        assert total.dtype == torch.float64 and A.shape == F.shape and A.dtype == torch.float32
        assert abs(float(total - want)) <= (es + 8 * U32) * x.numel(), (B, K, D, "softplus sum")
        wa = torch.sigmoid(x) @ rows.double()
        assert (A.double() - wa).abs().max().item() <= (es + 8 * U32) * K, (B, K, D, "sigmoid-weighted sum")
        lse = ops.nce_shared_lse_pass(F, rows)
        assert abs(float(lse - torch.logsumexp(S.view(-1), 0))) <= es + 8 * U32, (B, K, D, "lse")
        checked += 3 + _selected_and_rounded(ops, g, F, rows, bias, (total, A), lse)
    return checked + _fused_pass_edges(ops, g)


def _selected_and_rounded(ops, g, F, rows, bias, nce_out, lse):
    """index: the same rows read from a larger bank (rows scattered, one twice) give bit-identical
    results to the gathered rows; round_bf16: the same as the pass on bf16-rounded operands."""
    K, D = rows.shape
    bank = torch.randn(3 * K + 5, D, generator=g).to(rows.dtype)
    index = torch.randperm(bank.shape[0], generator=g)[:K]
    if K > 2:
        index[-1] = index[0]
        rows = rows.clone()
        rows[-1] = rows[0]
        nce_out, lse = ops.nce_shared_nce_pass(F, rows, bias), ops.nce_shared_lse_pass(F, rows)
    bank[index] = rows
    sel = ops.nce_shared_nce_pass(F, bank, bias, index), ops.nce_shared_lse_pass(F, bank, index)
    assert torch.equal(sel[0][0], nce_out[0]) and torch.equal(sel[0][1], nce_out[1]) and torch.equal(sel[1], lse)
    Fr, Rr = F.bfloat16().float(), rows.bfloat16().float()
    want = ops.nce_shared_nce_pass(Fr, Rr, bias), ops.nce_shared_lse_pass(Fr, Rr)
    got = ops.nce_shared_nce_pass(F, bank, bias, index, True), ops.nce_shared_lse_pass(F, rows, None, True)
    assert torch.equal(got[0][0], want[0][0]) and torch.equal(got[0][1], want[0][1]) and torch.equal(got[1], want[1])
    return 2


def _fused_pass_edges(ops, g):
    """A NaN/+inf/-inf row among finite ones in the last of several 96-row blocks never gives a
    finite result; one thread and two agree (K = 1000: ranges of whole blocks per thread); bad
    arguments are named."""
    import pytest
    checked = 0
    B, K, D = 7, 1000, 20
    rows = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=1)
    F = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1) / 0.07
    bias = torch.full((K,), -4.0)
    for bad in (float("nan"), float("inf"), float("-inf")):
        r = rows.clone()
        r[K - 3, 5] = bad
        total, A = ops.nce_shared_nce_pass(F, r, bias)
        assert not (math.isfinite(float(total)) and bool(torch.isfinite(A).all())), ("nce_pass", bad)
        assert not math.isfinite(float(ops.nce_shared_lse_pass(F, r))) or bad == float("-inf"), ("lse_pass", bad)
        checked += 2
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.nce_shared_nce_pass(F, rows, bias), ops.nce_shared_lse_pass(F, rows)
        torch.set_num_threads(max(2, threads))
        many = ops.nce_shared_nce_pass(F, rows, bias), ops.nce_shared_lse_pass(F, rows)
    finally:
        torch.set_num_threads(threads)
    assert abs(float(one[0][0] - many[0][0])) <= 1e-9 * abs(float(one[0][0])) + 1e-9
    assert torch.allclose(one[0][1], many[0][1], rtol=1e-5, atol=1e-6)
    # each thread's exp(s - M_t) is an fp32 exp (2 ulp) with its own shift M_t: log-sum-exp within ~4 u
    assert abs(float(one[1] - many[1])) <= 8 * U32
    checked += 3
    with pytest.raises(TypeError, match="rows must be float32, bfloat16 or float16"):
        ops.nce_shared_nce_pass(F, rows.double(), bias)
    with pytest.raises(TypeError, match="features must be float32"):
        ops.nce_shared_lse_pass(F.double(), rows)
    with pytest.raises(ValueError, match="bias must be a float32 CPU"):
        ops.nce_shared_nce_pass(F, rows, bias[:-1])
    with pytest.raises(ValueError, match="bias must be a float32 CPU"):
        ops.nce_shared_nce_pass(F, rows, bias.double())
    with pytest.raises(ValueError, match="rows' D = 20"):
        ops.nce_shared_nce_pass(F[:, :7], rows, bias)
    index = torch.arange(K)
    for bad, err, match in ((torch.tensor([0, K]), ValueError, rf"index contains {K} \(flat position 1\), out of range"),
                            (torch.tensor([-1]), ValueError, "index contains -1"),
                            (index.int(), TypeError, "index must be int64"),
                            (index[None], ValueError, "index must be a 1-D CPU tensor")):
        with pytest.raises(err, match=match):
            ops.nce_shared_lse_pass(F, rows, bad)
        with pytest.raises(err, match=match):
            ops.nce_shared_nce_pass(F, rows, bias[:bad.shape[-1]], bad)
    with pytest.raises(ValueError, match="bias must be a float32 CPU .K,. tensor, K = 3"):
        ops.nce_shared_nce_pass(F, rows, bias, index[:3])      # bias follows the selection, not the rows
    total, A = ops.nce_shared_nce_pass(F.t().contiguous().t(), rows, bias)   # non-contiguous features
    assert torch.allclose(A, one[0][1], rtol=1e-5, atol=1e-6)
    return checked + 7

"""The eager baselines compute what they claim: checked against the float64
oracle instdisc_kernels/reference.py on small shapes (run by the smoke run;
skipped by --benchmark-only, which runs benchmarks only).

bf16 banks: the baselines do their matmuls in bf16, so no fixed elementwise
tolerance fits (a score rounded to bf16 moves exp(s/T) by up to ~3% at
T = 0.07, and near-zero gradient entries then carry errors far above their own
size: rtol = atol = 3e-2 failed on ~5% of seeds). The bound is the
flash-attention one: against the float64 oracle (evaluated on the same
bf16-valued bank), the baseline's largest absolute error must be at most twice
the largest error of the same formula written plainly with every tensor in
bf16 (PyTorch's own bf16 eager math, ``_*_torch_bf16`` below), plus two floors:
one bf16 rounding (2^-8) of the result's largest magnitude, and, for the NCE and
softmax losses and gradients, the first-order rounding envelope of the bf16
matmuls (``_bf16_matmul_floor``), because a scalar loss or a 3-element gradient
(B = 1, K = 1, D = 3) is a single draw of rounding errors and PyTorch's error on
it can cancel by luck (seen 137x below the baseline's). fp32 banks keep the
fixed tight tolerance (no failure over 200 seeds).
"""
import pytest
import torch
import torch.nn.functional as F
from bench_baselines import (
    bank_update_eager,
    draw_idx,
    knn_batch_scores_fn,
    knn_eager,
    nce_forward_eager,
    softmax_loss_fn,
)

from instdisc_kernels import reference as ref

FP32_TOL = dict(rtol=1e-4, atol=1e-5)
BF16_U = 2.0 ** -8          # bf16 unit roundoff
BF16 = torch.bfloat16


def _unit(n, d, dtype=torch.float32):
    x = torch.randn(n, d, dtype=torch.float64)
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)


def _bf16_errors(got, torch_bf16, exact):
    """(error of got, error of PyTorch's bf16 math, output-rounding floor), largest absolute values."""
    exact = exact.double()
    err = (got.double() - exact).abs().max().item()
    base = (torch_bf16.double() - exact).abs().max().item()
    return err, base, BF16_U * exact.abs().max().item()


def _check_bf16(got, torch_bf16, exact, what, matmul_floor=0.0):
    err, base, floor = _bf16_errors(got, torch_bf16, exact)
    bound = 2 * base + floor + matmul_floor
    assert err <= bound, (f"{what}: error {err:.3g} > bound {bound:.3g} = 2 x PyTorch bf16 error {base:.3g} "
                          f"+ floor {floor:.3g} + matmul floor {matmul_floor:.3g}")


def _check(got, torch_bf16, exact, what, dtype, matmul_floor=0.0):
    if dtype == BF16:
        _check_bf16(got, torch_bf16, exact, what, matmul_floor)
    else:
        torch.testing.assert_close(got.double(), exact.double(), **FP32_TOL, msg=lambda m: f"{what}: {m}")


def _bf16_matmul_floor(loss_of_scores, x, rows, scores, contract):
    """(loss floor, grad floor): first-order float64 bound of what the bf16 matmuls alone cost.

    Forward: x rounded to bf16 and each score rounded to bf16, |ds| <= u (|x| . |v| + |s|),
    propagated through the oracle's loss and gradient (|J| |ds|); backward: the score
    gradients rounded to bf16 before their matmul with the rows. ``scores(x, rows)`` gives
    the scores, ``contract(g, rows)`` the gradient of the features from score gradients g.
    """
    x, rows = x.detach().double(), rows.detach().double()
    s = scores(x, rows).requires_grad_(True)
    ds = BF16_U * (scores(x.abs(), rows.abs()) + s.detach().abs())

    def grad_of(t):
        return contract(torch.autograd.grad(loss_of_scores(t), t, create_graph=True)[0], rows)

    g = torch.autograd.grad(loss_of_scores(s), s)[0]
    J = torch.autograd.functional.jacobian(grad_of, s, vectorize=True)   # grad dims + score dims
    grad_floor = (J.abs() * ds).flatten(2).sum(-1) + BF16_U * contract(g.abs(), rows.abs())
    return (g.abs() * ds).sum().item(), grad_floor.max().item()


# --------------------------------------------------------------------------- #
# PyTorch's own bf16 eager math: the formulas of docs/method.md with every tensor in bf16      #
# --------------------------------------------------------------------------- #
def _nce_torch_bf16(x, mem, idx, T, z):
    """(loss, grad) of lemniscate's NCE (docs/method.md#noise-contrastive-estimation-nce), every op in bf16, autograd gradient."""
    N = mem.shape[0]
    B, K1 = idx.shape
    xb = x.detach().to(BF16).requires_grad_(True)
    s = torch.einsum("bkd,bd->bk", mem.to(BF16)[idx], xb)
    P = torch.exp(s / T) / z
    c = (K1 - 1) / N + ref.EPS
    loss = -(torch.log(P[:, 0] / (P[:, 0] + c)).sum() + torch.log((c - ref.EPS) / (P[:, 1:] + c)).sum()) / B
    loss.backward()
    return loss.detach(), xb.grad


def _softmax_torch_bf16(x, mem, y, T):
    """(loss, grad) of the exact non-parametric softmax (docs/method.md#the-exact-non-parametric-softmax), every op in bf16."""
    xb = x.detach().to(BF16).requires_grad_(True)
    loss = F.cross_entropy(xb @ mem.to(BF16).t() / T, y)
    loss.backward()
    return loss.detach(), xb.grad


def _rows_torch_bf16(mem, y, x, m):
    """normalize(m * V[y] + (1 - m) * x), every op in bf16."""
    v = mem.to(BF16)[y] * m + x.to(BF16) * (1 - m)
    return v / v.norm(dim=1, keepdim=True)


# --------------------------------------------------------------------------- #
# Tests                                                                        #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("dtype", [torch.float32, BF16])
@pytest.mark.parametrize("B,K,D", [(1, 1, 3), (5, 17, 100), (8, 64, 128)])
def test_nce_eager_matches_reference(B, K, D, dtype):
    N, T = 300, 0.07
    mem = _unit(N, D, dtype)
    x = _unit(B, D).requires_grad_(True)
    y = torch.randperm(N)[:B]
    idx = draw_idx(y, N, K)
    assert torch.equal(idx[:, 0], y) and idx.shape == (B, K + 1)
    z = float(ref.estimate_z(ref.nce_scores(x, mem, idx), T, N))
    loss, _ = nce_forward_eager(x, mem, idx, T, z)
    loss.backward()
    pt_loss, pt_grad, fl, fg = None, None, 0.0, 0.0
    if dtype == BF16:
        pt_loss, pt_grad = _nce_torch_bf16(x, mem, idx, T, z)
        fl, fg = _bf16_matmul_floor(lambda s: ref.nce_criterion(torch.exp(s / T) / z, N), x, mem[idx],
                                    lambda f, v: torch.einsum("bkd,bd->bk", v, f),
                                    lambda g, v: torch.einsum("bk,bkd->bd", g, v))
    _check(loss, pt_loss, ref.nce_loss_value(x, mem, idx, T, z), "loss", dtype, fl)
    _check(x.grad, pt_grad, ref.nce_grad(x, mem, idx, T, z), "grad", dtype, fg)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_softmax_eager_matches_reference(dtype):
    N, B, D, T = 500, 7, 129, 0.1
    mem = _unit(N, D, dtype)
    x = _unit(B, D).requires_grad_(True)
    y = torch.randint(0, N, (B,))
    loss = softmax_loss_fn(x, mem, y, T)
    loss.backward()
    pt_loss, pt_grad, fl, fg = None, None, 0.0, 0.0
    if dtype == BF16:
        pt_loss, pt_grad = _softmax_torch_bf16(x, mem, y, T)
        fl, fg = _bf16_matmul_floor(lambda s: (torch.logsumexp(s / T, 1) - s[torch.arange(B), y] / T).mean(),
                                    x, mem, lambda f, v: f @ v.t(), lambda g, v: g @ v)
    _check(loss, pt_loss, ref.softmax_loss_value(x, mem, y, T), "loss", dtype, fl)
    _check(x.grad, pt_grad, ref.softmax_grad(x, mem, y, T), "grad", dtype, fg)


@pytest.mark.parametrize("dtype", [torch.float32, BF16])
def test_bank_update_eager_matches_reference(dtype):
    N, B, D, m = 50, 9, 100, 0.5
    mem = _unit(N, D, dtype)
    old = mem.clone()
    x = _unit(B, D)
    y = torch.randperm(N)[:B]           # lemniscate batches have distinct indices
    bank_update_eager(mem, y, x, m)
    rest = torch.ones(N, dtype=torch.bool)
    rest[y] = False
    assert torch.equal(mem[rest], old[rest])                  # untouched rows bit for bit
    pt_rows = _rows_torch_bf16(old, y, x, m) if dtype == BF16 else None
    _check(mem[y], pt_rows, ref.updated_rows(x, old, y, m), "updated rows", dtype)


def test_knn_eager_matches_reference():
    N, Q, D, k, C, T = 400, 230, 64, 20, 7, 0.1
    bank = _unit(N, D)
    queries = _unit(Q, D)
    bl = torch.randint(0, C, (N,))
    ql = torch.randint(0, C, (Q,))
    scores = knn_batch_scores_fn(queries, bank, bl, k, T, C)
    want = ref.knn_scores(queries, bank, bl, k, T, C)
    torch.testing.assert_close(scores.double(), want, rtol=1e-4, atol=1e-5)
    assert knn_eager(queries, ql, bank, bl, k, T, C) == pytest.approx(ref.knn_topk_accuracy(want, ql))

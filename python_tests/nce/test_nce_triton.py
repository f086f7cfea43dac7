"""Triton NCE / InfoNCE / NCEAverage-probs / bank-update kernels against the
float64 oracle (instdisc_kernels/reference.py).

On CPU these run under the Triton interpreter (TRITON_INTERPRET=1, set in
conftest.py), so shapes are small; the @gpu tests run the same kernels on CUDA
at the paper's sizes.
"""
import pytest
import torch
import torch.nn.functional as Fn

import instdisc_kernels as ik
from instdisc_kernels import _backend
from instdisc_kernels import reference as ref

nce_triton = pytest.importorskip("instdisc_kernels.ops.nce_triton", reason="triton is not installed")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if not (_backend.triton_importable() and (DEV.type == "cuda" or _backend.triton_interpreting())):
    pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

OPS = torch.ops.instdisc
# Kernels load bank rows/features in any dtype and accumulate in fp32, and the oracle
# sees the same (already rounded) bank and features, so the tolerance is fp32-level
# for every dtype (exp(s/T) amplifies the rounding of s by up to |s|/T).
LOSS_RTOL, GRAD_TOL = 2e-5, 1e-4


def _data(B, K, D, N, *, bank_dtype=torch.float32, feat_dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mem = Fn.normalize(torch.randn(N, D, generator=g), dim=1).to(bank_dtype).to(DEV)
    feats = Fn.normalize(torch.randn(B, D, generator=g), dim=1).to(feat_dtype).to(DEV)
    y = torch.randint(0, N, (B,), generator=g).to(DEV)
    neg = torch.randint(0, N, (B, K), generator=g).to(DEV)
    return feats, mem, y, neg


def _oracle(feats, mem, y, neg, T, *, loss_type=0, z=0.0, z_ema=0.0, lam=0.0, noise=None):
    """(loss, grad, Z) in float64 from reference.py."""
    loss, grad, Z = ref.nce_forward(feats, mem, y, neg, temperature=T, z=z, loss_type=loss_type, proximal=lam,
                                    z_ema=z_ema, noise_probs=noise)
    return loss, grad, float(Z)


def _run(feats, mem, y, neg, T, *, loss_type=0, z=0.0, z_ema=0.0, lam=0.0, noise=None, seed=1,
         exclude=False, K=None):
    K = neg.shape[1] if neg is not None else K
    return OPS.nce_forward_triton(feats, mem, y, neg, torch.tensor([z], device=DEV), torch.tensor([seed], device=DEV),
                                  K, T, lam, loss_type, z_ema, exclude, noise)


def _assert_matches(out, exp, feats):
    loss, grad, z_out = out
    e_loss, e_grad, e_z = exp
    acc = torch.float64 if feats.dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and grad.dtype == acc and loss.shape == () and grad.shape == feats.shape
    torch.testing.assert_close(loss.double().cpu(), e_loss.cpu(), rtol=LOSS_RTOL, atol=1e-6)
    scale = e_grad.abs().max().item()
    torch.testing.assert_close(grad.double().cpu(), e_grad.cpu(), rtol=GRAD_TOL, atol=GRAD_TOL * scale)
    assert z_out.dtype == torch.float32 and z_out.shape == (1,)
    assert z_out.item() == pytest.approx(e_z, rel=1e-5)


# --------------------------------------------------------------------------- #
# nce_forward_triton                                                           #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("B,K,D,N,bank_dtype,loss_type,T", [
    (1, 1, 3, 5, torch.float32, 0, 0.07),
    (3, 7, 100, 50, torch.float32, 0, 0.1),
    (3, 7, 129, 50, torch.bfloat16, 0, 0.07),
    (16, 64, 128, 200, torch.float32, 0, 0.07),
    (16, 64, 128, 200, torch.float16, 0, 0.07),
    (1, 256, 129, 300, torch.bfloat16, 0, 0.07),     # B = 1, K large: several programs per row
    (1, 1, 3, 5, torch.float32, 1, 0.07),
    (3, 7, 100, 50, torch.float16, 1, 0.1),
    (16, 64, 128, 200, torch.bfloat16, 1, 0.07),
    (1, 256, 3, 300, torch.float32, 1, 0.07),
])
def test_forward_matches_oracle(B, K, D, N, bank_dtype, loss_type, T):
    feats, mem, y, neg = _data(B, K, D, N, bank_dtype=bank_dtype, seed=B * 7 + K + D)
    _assert_matches(_run(feats, mem, y, neg, T, loss_type=loss_type),
                    _oracle(feats, mem, y, neg, T, loss_type=loss_type), feats)


@pytest.mark.parametrize("feat_dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("loss_type", [0, 1])
def test_forward_feature_dtypes(feat_dtype, loss_type):
    feats, mem, y, neg = _data(3, 7, 129, 40, feat_dtype=feat_dtype, bank_dtype=torch.bfloat16, seed=3)
    _assert_matches(_run(feats, mem, y, neg, 0.07, loss_type=loss_type),
                    _oracle(feats, mem, y, neg, 0.07, loss_type=loss_type), feats)


@pytest.mark.parametrize("z,z_ema", [(0.0, 0.0), (-1.0, 0.0), (-1.0, 0.99), (35.0, 0.0), (35.0, 0.9)])
def test_z_first_batch_ema_fixed(z, z_ema):
    feats, mem, y, neg = _data(3, 7, 100, 40, seed=11)
    out = _run(feats, mem, y, neg, 0.1, z=z, z_ema=z_ema)
    exp = _oracle(feats, mem, y, neg, 0.1, z=z, z_ema=z_ema)
    _assert_matches(out, exp, feats)
    if z > 0 and z_ema == 0:
        assert out[2].item() == z                      # fixed Z is used and returned as is


def test_repeated_positives_and_negatives_equal_to_positive():
    feats, mem, y, neg = _data(5, 9, 100, 20, seed=5)
    y = torch.tensor([3, 3, 7, 3, 0], device=DEV)
    neg[:, 0] = y                                      # a negative equal to the positive
    neg[1, :] = y[1]                                   # all of them
    neg[4, 3:6] = 19                                   # repeated negative
    for loss_type in (0, 1):
        _assert_matches(_run(feats, mem, y, neg, 0.07, loss_type=loss_type),
                        _oracle(feats, mem, y, neg, 0.07, loss_type=loss_type), feats)


@pytest.mark.parametrize("loss_type,lam", [(0, 0.5), (1, 0.25)])
def test_proximal(loss_type, lam):
    feats, mem, y, neg = _data(3, 7, 129, 30, bank_dtype=torch.bfloat16, seed=8)
    _assert_matches(_run(feats, mem, y, neg, 0.07, loss_type=loss_type, lam=lam),
                    _oracle(feats, mem, y, neg, 0.07, loss_type=loss_type, lam=lam), feats)


def test_noise_probs():
    feats, mem, y, neg = _data(3, 7, 100, 30, seed=9)
    noise = torch.rand(30, generator=torch.Generator().manual_seed(1)).to(DEV)
    noise = noise / noise.sum()
    _assert_matches(_run(feats, mem, y, neg, 0.1, noise=noise), _oracle(feats, mem, y, neg, 0.1, noise=noise), feats)


@pytest.mark.parametrize("target", [1, 3, 64])
def test_split_over_programs_gives_same_result(monkeypatch, target):
    """Columns of a row split over 1, 2 or 5 programs (and a tail chunk of one column)."""
    monkeypatch.setattr(nce_triton, "INTERPRETER_TARGET_PROGRAMS", target)
    feats, mem, y, neg = _data(1, 256, 100, 300, seed=12)
    for loss_type in (0, 1):
        _assert_matches(_run(feats, mem, y, neg, 0.07, loss_type=loss_type),
                        _oracle(feats, mem, y, neg, 0.07, loss_type=loss_type), feats)


def test_opcheck_forward():
    feats, mem, y, neg = _data(3, 7, 20, 37, seed=2)
    z, seed = torch.zeros(1, device=DEV), torch.tensor([7], device=DEV)
    for args in [(feats, mem, y, neg, z, seed, 7, 0.5, 0.1, 0, 0.9, False, None),
                 (feats, mem, y, None, z + 3, seed, 7, 0.5, 0.0, 1, 0.0, True, None)]:
        torch.library.opcheck(OPS.nce_forward_triton, args)


def test_op_rejects_bad_shapes():
    feats, mem, y, neg = _data(3, 7, 20, 37)
    z, seed = torch.zeros(1, device=DEV), torch.tensor([1], device=DEV)
    with pytest.raises(ValueError, match="neg_indices"):
        OPS.nce_forward_triton(feats, mem, y, neg[:, :5], z, seed, 7, 0.1, 0.0, 0, 0.0, False, None)
    with pytest.raises(ValueError, match="loss_type"):
        OPS.nce_forward_triton(feats, mem, y, neg, z, seed, 7, 0.1, 0.0, 2, 0.0, False, None)
    with pytest.raises(ValueError, match="memory"):
        _run(feats, mem[:, :10], y, neg, 0.1)
    with pytest.raises(ValueError, match="noise_probs"):
        _run(feats, mem, y, None, 0.1, K=7, noise=torch.full((37,), 1 / 37, device=DEV))


# --------------------------------------------------------------------------- #
# In-kernel negatives                                                          #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("loss_type", [0, 1])
def test_in_kernel_draws_are_the_sampled_negatives(exclude, loss_type, triton_negatives):
    feats, mem, y, _ = _data(3, 50, 100, 40, seed=4)
    seed = torch.tensor([2**61 + 12345], device=DEV)
    neg = triton_negatives(y, 40, 50, seed, exclude_positive=exclude)
    out = OPS.nce_forward_triton(feats, mem, y, None, torch.zeros(1, device=DEV), seed, 50, 0.07, 0.0, loss_type,
                                 0.0, exclude, None)
    _assert_matches(out, _oracle(feats, mem, y, neg, 0.07, loss_type=loss_type), feats)


def test_in_kernel_draws_depend_on_seed_only(triton_negatives):
    feats, mem, y, _ = _data(3, 20, 64, 1000, seed=6)
    a = _run(feats, mem, y, None, 0.07, K=20, seed=5)
    b = _run(feats, mem, y, None, 0.07, K=20, seed=5)
    c = _run(feats, mem, y, None, 0.07, K=20, seed=6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    s5 = triton_negatives(y, 1000, 20, torch.tensor([5], device=DEV))
    assert torch.equal(s5, triton_negatives(y, 1000, 20, torch.tensor([5], device=DEV)))
    assert (s5 != triton_negatives(y, 1000, 20, torch.tensor([6], device=DEV))).float().mean() > 0.9


def _chi2_pvalue(counts):
    from scipy.stats import chi2
    counts = counts.double()
    expected = counts.sum() / counts.numel()
    stat = ((counts - expected) ** 2 / expected).sum().item()
    return chi2.sf(stat, counts.numel() - 1)


def test_in_kernel_draws_are_uniform(triton_negatives):
    N, K = 50, 2000
    y = torch.tensor([0, 17, 49], device=DEV)
    draws = triton_negatives(y, N, K, torch.tensor([99], device=DEV)).cpu()
    assert draws.min() >= 0 and draws.max() < N
    assert _chi2_pvalue(torch.bincount(draws.flatten(), minlength=N)) > 1e-4
    # exclude_positive: never the positive, uniform over the N - 1 others
    ex = triton_negatives(y, N, K, torch.tensor([99], device=DEV), exclude_positive=True).cpu()
    for b in range(3):
        assert not (ex[b] == y[b].item()).any()
        counts = torch.bincount(ex[b], minlength=N)
        assert _chi2_pvalue(torch.cat([counts[:y[b]], counts[y[b] + 1:]])) > 1e-4
    # a bank too small to miss: N = 2 with exclusion always draws the other row
    two = triton_negatives(torch.tensor([0, 1], device=DEV), 2, 64, torch.tensor([3], device=DEV), True)
    assert torch.equal(two.cpu(), torch.tensor([[1] * 64, [0] * 64]))


def test_in_kernel_draws_cover_large_banks(triton_negatives):
    """64-bit mapping: N > 2^32 rows (only the draws; no bank is allocated)."""
    N = 3 * 2**32 + 5
    d = triton_negatives(torch.tensor([0], device=DEV), N, 4096, torch.tensor([1], device=DEV)).cpu()
    assert d.min() >= 0 and d.max() < N
    assert (d >= 2**32).float().mean() > 0.6                     # about 2/3 of the draws lie above 2^32
    assert abs(d.double().mean().item() / N - 0.5) < 0.03


# --------------------------------------------------------------------------- #
# Through the public nce_loss (bank update included)                           #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss_type", ["nce", "infonce"])
def test_nce_loss_triton_step_updates_bank(bank_dtype, loss_type):
    feats, mem, y, neg = _data(4, 7, 129, 30, bank_dtype=bank_dtype, seed=13)
    y = torch.tensor([5, 9, 5, 2], device=DEV)                  # repeated positive: last occurrence wins
    feats.requires_grad_(True)
    z = torch.zeros(1, device=DEV)
    exp = _oracle(feats.detach(), mem, y, neg, 0.07, loss_type=int(loss_type == "infonce"))
    expected_bank = mem.clone().double()
    ref.memory_update_(expected_bank, y, feats.detach(), 0.5)
    loss = ik.nce_loss(feats, mem, y, neg_indices=neg, z=z, temperature=0.07, loss_type=loss_type, backend="triton")
    loss.backward()
    torch.testing.assert_close(loss.double().cpu(), exp[0].cpu(), rtol=LOSS_RTOL, atol=1e-6)
    torch.testing.assert_close(feats.grad.double().cpu(), exp[1].cpu(), rtol=GRAD_TOL,
                               atol=GRAD_TOL * exp[1].abs().max().item())
    if loss_type == "nce":
        assert z.item() == pytest.approx(exp[2], rel=1e-5)
    tol = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[bank_dtype]
    torch.testing.assert_close(mem.double().cpu(), expected_bank.cpu(), rtol=tol, atol=tol)


def test_nce_loss_triton_in_kernel_negatives_reproducible():
    feats, mem, y, _ = _data(3, 1, 64, 100, seed=14)
    out = []
    for _ in range(2):
        gen = torch.Generator(device=DEV).manual_seed(42)
        out.append(ik.nce_loss(feats, mem, y, num_negatives=16, generator=gen, update_memory=False,
                               exclude_positive=True, backend="triton"))
    assert torch.isfinite(out[0]) and torch.equal(out[0], out[1])


def test_nce_loss_triton_rejects_bad_input_before_writing():
    feats, mem, y, neg = _data(3, 7, 20, 30)
    before = mem.clone()
    bad = neg.clone()
    bad[1, 2] = 30
    with pytest.raises(ValueError, match="neg_indices"):
        ik.nce_loss(feats, mem, y, neg_indices=bad, backend="triton")
    with pytest.raises(ValueError, match="indices"):
        ik.nce_loss(feats, mem, torch.tensor([0, 1, -1], device=DEV), neg_indices=neg, backend="triton")
    with pytest.raises(ValueError, match="temperature"):
        ik.nce_loss(feats, mem, y, neg_indices=neg, temperature=0.0, backend="triton")
    with pytest.raises(ValueError, match="indices"):
        ik.bank_update_(mem, torch.tensor([0, 1, 99], device=DEV), feats, backend="triton")
    assert torch.equal(mem, before)


# --------------------------------------------------------------------------- #
# bank_update_triton_                                                          #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_bank_update_last_occurrence_wins(bank_dtype):
    g = torch.Generator().manual_seed(0)
    N, D = 12, 129
    mem = ref.init_memory(N, D, generator=g).to(bank_dtype).to(DEV)
    y = torch.tensor([3, 5, 3, 0, 11, 5, 3, 3], device=DEV)
    feats = Fn.normalize(torch.randn(8, D, generator=g), dim=1).to(DEV)
    expected = mem.clone().double()
    ref.memory_update_(expected, y, feats, 0.3)
    before = mem.clone()
    OPS.bank_update_triton_(mem, y, feats, 0.3)
    # one rounding to the bank dtype: RNE on a GPU, truncation in the interpreter (<= 1 ulp)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[bank_dtype]
    torch.testing.assert_close(mem.double().cpu(), expected.cpu(), rtol=tol, atol=tol)
    untouched = torch.ones(N, dtype=torch.bool, device=DEV)
    untouched[y] = False
    assert torch.equal(mem[untouched], before[untouched])
    # the last occurrence (b = 7 for index 3, b = 5 for index 5) wins, not an earlier one
    first = ref.updated_rows(feats[:1], before.double()[3:4].expand(1, D), torch.tensor([0], device=DEV), 0.3)
    assert not torch.allclose(mem[3].double(), first[0], atol=tol)


def test_bank_update_opcheck():
    g = torch.Generator().manual_seed(1)
    mem = ref.init_memory(9, 20, generator=g).to(DEV)
    feats = Fn.normalize(torch.randn(4, 20, generator=g), dim=1).to(DEV)
    torch.library.opcheck(OPS.bank_update_triton_, (mem, torch.tensor([1, 8, 1, 0], device=DEV), feats, 0.5))


# --------------------------------------------------------------------------- #
# nce_probs_triton / nce_probs_backward_triton                                 #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("B,K,D,bank_dtype,z", [
    (1, 1, 3, torch.float32, 0.0),
    (3, 7, 100, torch.bfloat16, -1.0),
    (3, 256, 129, torch.float16, 0.0),
    (16, 64, 128, torch.float32, 25.0),
])
def test_probs_and_backward_match_oracle(B, K, D, bank_dtype, z):
    feats, mem, y, neg = _data(B, K, D, 300, bank_dtype=bank_dtype, seed=K + D)
    idx = ref.index_matrix(y, neg)
    T = 0.07
    P, z_out = OPS.nce_probs_triton(feats, mem, idx, torch.tensor([z], device=DEV), T)
    Z = ref.estimate_z(ref.nce_scores(feats, mem, idx), T, 300) if z <= 0 else torch.tensor(z, dtype=torch.float64)
    eP = ref.nce_probs(feats, mem, idx, T, Z)
    assert P.dtype == torch.float32 and P.shape == (B, K + 1)
    torch.testing.assert_close(P.double().cpu(), eP.cpu(), rtol=GRAD_TOL, atol=GRAD_TOL * eP.abs().max().item())
    assert z_out.item() == pytest.approx(float(Z), rel=1e-5)
    gP = torch.randn(B, K + 1, generator=torch.Generator().manual_seed(3)).to(DEV)
    grad = OPS.nce_probs_backward_triton(gP, P, mem, idx, T)
    e_grad = torch.einsum("bk,bkd->bd", gP.double() * P.double() / T, mem.double()[idx])
    assert grad.dtype == P.dtype and grad.shape == (B, D)
    torch.testing.assert_close(grad.double().cpu(), e_grad.cpu(), rtol=GRAD_TOL,
                               atol=GRAD_TOL * e_grad.abs().max().item())


def test_probs_opcheck():
    feats, mem, y, neg = _data(3, 7, 20, 37, seed=2)
    idx = ref.index_matrix(y, neg)
    torch.library.opcheck(OPS.nce_probs_triton, (feats, mem, idx, torch.zeros(1, device=DEV), 0.5))
    P = torch.rand(3, 8, device=DEV)
    torch.library.opcheck(OPS.nce_probs_backward_triton, (torch.randn(3, 8, device=DEV), P, mem, idx, 0.5))


def test_nceaverage_drop_in_on_triton_backend():
    feats, mem, y, _ = _data(3, 1, 20, 50, seed=21)
    lem = ik.NCEAverage(20, 50, 7, T=0.07, backend="triton").to(DEV)
    lem.memory.copy_(mem)
    x = feats.clone().requires_grad_(True)
    out = lem(x, y)
    crit = ik.NCECriterion(50)
    loss = crit(out, y)
    loss.backward()
    assert out.shape == (3, 8) and torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert lem.params[2].item() > 0                                   # Z estimated on the first forward


# --------------------------------------------------------------------------- #
# GPU: the paper's sizes, int64 row offsets                                    #
# --------------------------------------------------------------------------- #
@pytest.mark.gpu
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", [0, 1])
def test_gpu_paper_size(bank_dtype, loss_type):
    feats, mem, y, neg = _data(256, 4096, 128, 100_000, bank_dtype=bank_dtype, seed=1)
    _assert_matches(_run(feats, mem, y, neg, 0.07, loss_type=loss_type),
                    _oracle(feats, mem, y, neg, 0.07, loss_type=loss_type), feats)
    a = _run(feats, mem, y, None, 0.07, K=4096, seed=3)
    b = _run(feats, mem, y, None, 0.07, K=4096, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.gpu
def test_gpu_row_offsets_beyond_int32():
    N, D = 2**24 + 64, 128                                           # N * D > 2^31 (4.3 GB in bf16)
    mem = torch.zeros(N, D, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor([N - 1, N - 2, N - 60, 5])
    mem[rows.cuda()] = Fn.normalize(torch.randn(4, D, generator=g), dim=1).to(torch.bfloat16).cuda()
    feats = Fn.normalize(torch.randn(2, D, generator=g), dim=1).cuda()
    y = torch.tensor([N - 1, 5], device="cuda")
    neg = torch.tensor([[N - 2, N - 60, 5], [N - 1, N - 2, 0]], device="cuda")
    small = mem[torch.cat([rows, torch.tensor([0])]).cuda()]
    remap = {int(r): i for i, r in enumerate(torch.cat([rows, torch.tensor([0])]))}
    ys = torch.tensor([remap[int(v)] for v in y], device="cuda")
    negs = torch.tensor([[remap[int(v)] for v in r] for r in neg], device="cuda")
    out = _run(feats, mem, y, neg, 0.07, z=10.0)
    _assert_matches(out, _oracle(feats, small, ys, negs, 0.07, z=10.0), feats)
    OPS.bank_update_triton_(mem, y, feats, 0.5)
    expected = ref.updated_rows(feats, small, ys, 0.5)
    torch.testing.assert_close(mem[y].double(), expected, rtol=8e-3, atol=8e-3)

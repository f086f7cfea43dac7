"""nce_loss / nonparametric_softmax_loss at the numeric edges, on every backend: Z never
overflows or is stored non-finite (a clear error before any write when float32 cannot
hold it), z is validated, a NaN/inf bank row is reported before the update, double
backward raises, and the Z buffer of InstDiscLoss stays float32."""
import math

import pytest
import torch

import instdisc_kernels as ik
from instdisc_kernels import reference as ref
from instdisc_kernels.ops import nce as nce_mod
from instdisc_kernels.ops import softmax as softmax_mod

DEV = torch.device("cpu")
NCE_BACKENDS = [b for b in ("eager", "cpu", "triton") if nce_mod.TABLE.available(b, DEV)]
SOFTMAX_BACKENDS = [b for b in ("eager", "triton") if softmax_mod.TABLE.available(b, DEV)]


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


def _assert_unchanged(mem, before, z=None, z_before=None):
    torch.testing.assert_close(mem, before, rtol=0, atol=0, equal_nan=True)
    if z is not None:
        torch.testing.assert_close(z, z_before, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- #
# Z                                                                            #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend", NCE_BACKENDS)
@pytest.mark.parametrize("case", ["t001_aligned", "norm_1e4", "ema_overflow"])
def test_unrepresentable_z_raises_before_any_write(backend, case):
    N, D = 16, 8
    mem = _unit(N, D, 0)
    y = torch.tensor([1, 4, 9])
    neg = torch.tensor([[1, 1], [4, 4], [9, 9]])          # aligned: every score is 1
    feats, T, z, z_ema = mem[y].clone(), 0.01, torch.tensor([-1.0]), None     # Z ~ N e^100
    if case == "norm_1e4":
        feats, T = feats * 1e4, 0.07
    if case == "ema_overflow":
        # a finite stored Z, but the moving average with this batch's estimate (N e^96) overflows
        z, z_ema, T, feats = torch.tensor([1e38]), 0.5, 0.0125, feats * 1.2
    before, z_before = mem.clone(), z.clone()
    with pytest.raises(ValueError, match="temperature"):
        ik.nce_loss(feats.requires_grad_(), mem, y, neg_indices=neg, temperature=T, z=z, z_ema=z_ema,
                    backend=backend)
    _assert_unchanged(mem, before, z, z_before)


@pytest.mark.parametrize("backend", NCE_BACKENDS)
def test_z_estimate_is_exact_where_exp_overflows_but_z_does_not(backend):
    # one score at s/T = 90 (exp overflows fp32) among many at -large, N small: Z = 2 e^90 / 40 fits
    B, K = 4, 9
    mem = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]])
    y = torch.tensor([0, 1, 1, 1])                      # only column 0 of row 0 has s/T = +90
    neg = torch.ones(B, K, dtype=torch.int64)
    feats = torch.tensor([[1.0, 0, 0, 0]] * B) * 0.9
    T = 0.01
    z = torch.tensor([-1.0])
    loss = ik.nce_loss(feats, mem, y, neg_indices=neg, temperature=T, z=z, backend=backend, update_memory=False)
    want_loss, _, want_z = ref.nce_forward(feats, mem, y, neg, temperature=T)
    assert torch.isfinite(loss) and torch.isfinite(z).all()
    assert math.isclose(float(z), float(want_z), rel_tol=1e-4)
    assert math.isclose(float(loss), float(want_loss), rel_tol=1e-4)


@pytest.mark.parametrize("to", ["half", "double", "to_bf16"])
def test_instdisc_loss_z_buffer_stays_float32(to):
    crit = ik.InstDiscLoss(100_000, 8, num_negatives=16, z="ema", generator=torch.Generator().manual_seed(0))
    crit = {"half": crit.half, "double": crit.double, "to_bf16": lambda: crit.to(torch.bfloat16)}[to]()
    assert crit.z.dtype == torch.float32 and float(crit.z) == -1.0
    feats = _unit(4, 8, 1).to(crit.memory.dtype).float()
    crit(feats, torch.arange(4))
    assert crit.z.dtype == torch.float32
    assert torch.isfinite(crit.z).all() and float(crit.z) > 65504      # Z ~ N: beyond the fp16 range
    sd = crit.state_dict()
    assert sd["z"].dtype == torch.float32


# --------------------------------------------------------------------------- #
# z validation                                                                 #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend", NCE_BACKENDS)
@pytest.mark.parametrize("z", [float("inf"), float("-inf"), float("nan"), 1e39,
                               "tensor_inf", "tensor_nan"])
def test_non_finite_z_is_rejected(backend, z):
    mem = _unit(10, 6, 0)
    y = torch.tensor([0, 3])
    neg = torch.tensor([[1, 2], [4, 5]])
    if isinstance(z, str):
        z = torch.tensor([float(z.split("_")[1])])
    before = mem.clone()
    with pytest.raises(ValueError, match="z"):
        ik.nce_loss(_unit(2, 6, 1), mem, y, neg_indices=neg, z=z, backend=backend)
    _assert_unchanged(mem, before)


@pytest.mark.parametrize("backend", NCE_BACKENDS)
@pytest.mark.parametrize("z", [0.0, -3.0])
def test_non_positive_z_means_estimate(backend, z):
    mem = _unit(10, 6, 0)
    y, neg, feats = torch.tensor([0, 3]), torch.tensor([[1, 2], [4, 5]]), _unit(2, 6, 1)
    loss = ik.nce_loss(feats, mem, y, neg_indices=neg, z=z, backend=backend, update_memory=False)
    want, _, _ = ref.nce_forward(feats, mem, y, neg, temperature=0.07)
    assert math.isclose(float(loss), float(want), rel_tol=1e-4)


# --------------------------------------------------------------------------- #
# NaN / inf rows already in the bank                                           #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend", NCE_BACKENDS)
@pytest.mark.parametrize("loss_type", ["nce", "infonce"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["positive", "negative", "drawn"])
def test_nce_loss_reports_a_non_finite_bank_row(backend, loss_type, bad, where):
    N, D = 8, 5
    mem = _unit(N, D, 0)
    row = 6
    mem[row, 2] = bad
    y = torch.tensor([row if where == "positive" else 1, 2, 3])
    neg = torch.tensor([[0, 4], [row if where == "negative" else 5, 7], [0, 1]])
    z = torch.tensor([-1.0])
    before, z_before = mem.clone(), z.clone()
    kw = dict(num_negatives=64) if where == "drawn" else dict(neg_indices=neg)
    if where == "drawn" and backend == "eager":
        kw["generator"] = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=f"memory row {row}"):
        ik.nce_loss(_unit(3, D, 1).requires_grad_(), mem, y, z=z, loss_type=loss_type, backend=backend, **kw)
    _assert_unchanged(mem, before, z, z_before)


@pytest.mark.parametrize("backend", SOFTMAX_BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_softmax_loss_reports_a_non_finite_bank_row(backend, bad, precision):
    N, D = 300, 5
    mem = _unit(N, D, 0)
    mem[257, 0] = bad
    before = mem.clone()
    with pytest.raises(ValueError, match="memory row 257"):
        ik.nonparametric_softmax_loss(_unit(3, D, 1), mem, torch.tensor([0, 1, 2]), backend=backend,
                                      precision=precision, chunk_size=128)
    _assert_unchanged(mem, before)


# --------------------------------------------------------------------------- #
# Double backward                                                              #
# --------------------------------------------------------------------------- #
def _loss_fns():
    y, neg = torch.tensor([0, 3, 3]), torch.tensor([[1, 2], [4, 5], [6, 7]])
    for be in NCE_BACKENDS:
        for lt in ("nce", "infonce"):
            yield f"nce-{lt}-{be}", lambda f, m, be=be, lt=lt: ik.nce_loss(
                f, m, y, neg_indices=neg, loss_type=lt, backend=be, update_memory=False)
    for be in SOFTMAX_BACKENDS:
        yield f"softmax-{be}", lambda f, m, be=be: ik.nonparametric_softmax_loss(f, m, y, backend=be,
                                                                                 update_memory=False)


@pytest.mark.parametrize("name,fn", list(_loss_fns()), ids=[n for n, _ in _loss_fns()])
def test_double_backward_raises(name, fn):
    mem = _unit(10, 6, 0)
    f = _unit(3, 6, 1).requires_grad_()
    (g,) = torch.autograd.grad(fn(f, mem), f, create_graph=True)
    (g_plain,) = torch.autograd.grad(fn(f, mem), f)
    torch.testing.assert_close(g.detach(), g_plain, rtol=0, atol=0)   # the first derivative is unchanged
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad((g * g).sum(), f)
    with pytest.raises(RuntimeError, match="not supported"):
        ((g * g).sum() + f.sum()).backward()

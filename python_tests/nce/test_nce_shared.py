"""Shared negatives (ops/nce_shared.py) against the float64 oracle reference.shared_nce_forward:
every backend, both loss types, odd shapes, masks, Z rules, bank dtypes, bf16 bound."""
import math

import pytest
import torch

import instdisc_kernels as ik
from helpers.alloc import AllocTracker
from helpers.tile_epilogues import check_fused_passes, check_tile_epilogues
from instdisc_kernels import _backend
from instdisc_kernels import reference as ref
from instdisc_kernels.ops import _formulas
from instdisc_kernels.ops import nce_shared as NS
from instdisc_kernels.ops import nce_shared_triton as NST

BACKENDS = ["full", "eager", "cpu", "triton"]      # IMPLS keys: "full" is the B x K cross-check
PUBLIC = ["eager", "cpu", "triton"]
IMPLS = {"full": NS.forward_full, "eager": NS.forward_chunked, "cpu": NS.forward_cpu, "triton": NST.forward_triton}
OPS = {"eager": "nce_shared_forward_chunked", "cpu": "nce_shared_forward_cpu", "triton": "nce_shared_forward_triton"}
LOSS = {"nce": 0, "infonce": 1}


def _problem(B, K, D, N=40, seed=0, bank_dtype=torch.float32, dtype=torch.float32, hits=True):
    g = torch.Generator().manual_seed(seed)
    mem = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    y = torch.randint(0, N, (B,), generator=g)
    neg = torch.randint(0, N, (K,), generator=g)
    if hits:
        if B > 1:
            y[-1] = y[0]                              # a repeated positive
        neg[0] = y[0]                                 # a shared negative equal to some positive
        if K > 2:
            neg[K // 2] = y[0]                        # ... twice
            neg[1] = neg[2]                           # a repeated shared negative
    f = torch.nn.functional.normalize(mem[y] + 0.7 * torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
    return mem.to(bank_dtype), f.to(dtype), y, neg


def _oracle(f, mem, y, neg, T, z, lt, prox=0.0, ema=0.0, ex=False, noise=None):
    return ref.shared_nce_forward(f, mem, y, neg, temperature=T, z=z, loss_type=lt, proximal=prox, z_ema=ema,
                                  exclude_positive=ex, noise_probs=noise)


def _close(loss, grad, L, G, tol):
    assert loss.dim() == 0 and grad.shape == G.shape
    assert abs(loss.double().item() - L.item()) <= tol * max(1.0, abs(L.item()))
    assert (grad.double() - G).abs().max().item() <= tol * max(1.0, G.abs().max().item())


SHAPES = [  # B, K, D, chunk
    (1, 1, 100, 0),
    (5, 70, 100, 16),       # K not a multiple of the chunk, D = 100
    (3, 1, 8, 0),
    (1, 9, 16, 1),
    (33, 20, 3, 8),         # B over one Triton row block
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,K,D,chunk", SHAPES)
@pytest.mark.parametrize("loss_type", ["nce", "infonce"])
@pytest.mark.parametrize("exclude", [False, True])
def test_matches_oracle(backend, B, K, D, chunk, loss_type, exclude):
    mem, f, y, neg = _problem(B, K, D)
    for z, ema in ((-1.0, 0.0), (30.0, 0.0), (30.0, 0.5)):
        L, G, Z = _oracle(f, mem, y, neg, 0.1, z, loss_type, 0.2, ema, exclude)
        loss, grad, z_out = IMPLS[backend](f, mem, y, neg, torch.tensor([z]), 0.1, 0.2, LOSS[loss_type], ema,
                                           exclude, None, "fp32", chunk)
        _close(loss, grad, L, G, 2e-5)
        assert z_out.dtype == torch.float32 and z_out.shape == (1,)
        assert z_out.item() == pytest.approx(float(Z), rel=1e-5)


def test_mask_changes_the_sums():
    # the oracle is not blind to the mask: with a hit, exclude_positive changes loss, gradient and Z
    mem, f, y, neg = _problem(4, 12, 16)
    for lt in ("nce", "infonce"):
        a = _oracle(f, mem, y, neg, 0.1, -1.0, lt, ex=False)
        b = _oracle(f, mem, y, neg, 0.1, -1.0, lt, ex=True)
        assert abs(a[0].item() - b[0].item()) > 1e-3 and (a[1] - b[1]).abs().max().item() > 1e-4
    assert abs(float(a[2]) - float(b[2])) == 0                       # InfoNCE: Z untouched
    n = _oracle(f, mem, y, neg, 0.1, -1.0, "nce", ex=False)[2], _oracle(f, mem, y, neg, 0.1, -1.0, "nce", ex=True)[2]
    assert float(n[0]) != float(n[1])
    # without hits the mask is a no-op
    mem, f, y, neg = _problem(4, 12, 16, hits=False)
    neg = neg[~torch.isin(neg, y)]
    for be in BACKENDS:
        a = IMPLS[be](f, mem, y, neg, torch.tensor([-1.0]), 0.1, 0.0, 0, 0.0, False, None, "fp32", 0)
        b = IMPLS[be](f, mem, y, neg, torch.tensor([-1.0]), 0.1, 0.0, 0, 0.0, True, None, "fp32", 0)
        assert a[0].item() == pytest.approx(b[0].item(), rel=1e-6)


def test_shared_equals_per_sample_with_the_same_rows():
    # every row given the same K negatives: the per-sample op must agree (no mask)
    mem, f, y, neg = _problem(6, 11, 32)
    for lt in ("nce", "infonce"):
        a = ik.nce_loss(f, mem, y, neg_indices=neg, negatives="shared", z=50.0, temperature=0.1, loss_type=lt,
                        update_memory=False)
        b = ik.nce_loss(f, mem, y, neg_indices=neg.expand(6, 11).contiguous(), z=50.0, temperature=0.1,
                        loss_type=lt, update_memory=False)
        assert a.item() == pytest.approx(b.item(), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noise_probs(backend):
    mem, f, y, neg = _problem(4, 10, 16)
    noise = torch.rand(40, generator=torch.Generator().manual_seed(3)) + 0.1
    noise = (noise / noise.sum()).float()
    L, G, _ = _oracle(f, mem, y, neg, 0.1, 20.0, "nce", noise=noise)
    loss, grad, _ = IMPLS[backend](f, mem, y, neg, torch.tensor([20.0]), 0.1, 0.0, 0, 0.0, False, noise, "fp32", 4)
    _close(loss, grad, L, G, 2e-5)


@pytest.mark.parametrize("backend", PUBLIC)
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_public_step_every_bank_dtype(backend, bank_dtype):
    mem, f, y, neg = _problem(5, 13, 24, bank_dtype=bank_dtype)
    mem0 = mem.clone()
    z = torch.tensor([-1.0])
    x = f.clone().requires_grad_()
    loss = ik.nce_loss(x, mem, y, neg_indices=neg, negatives="shared", temperature=0.1, z=z, proximal=0.3,
                       backend=backend, exclude_positive=True)
    loss.backward()
    L, G, Z = _oracle(f, mem0, y, neg, 0.1, -1.0, "nce", 0.3, ex=True)
    _close(loss, x.grad, L, G, 2e-5)
    assert loss.dtype == torch.float32
    assert z.item() == pytest.approx(float(Z), rel=1e-5)                     # Z state written
    exp_mem = mem0.clone()
    ref.memory_update_(exp_mem, y, f, 0.5)                                   # update after the loss
    tol = {torch.float32: 1e-6, torch.float64: 1e-6}.get(bank_dtype, 1e-2)
    torch.testing.assert_close(mem.double(), exp_mem.double(), rtol=tol, atol=tol)


def test_cpu_tile_epilogues_match_float64():
    # the C++ one-pass epilogues of the "cpu" backend on edge values (more under every CPU
    # capability in python_tests/backends/test_cpu_capability.py)
    assert check_tile_epilogues(torch.ops.instdisc) >= 20


@pytest.mark.skipif(not _backend.CPU_FMA_TILES, reason="the one-pass ops need the avx2 CPU capability or better")
def test_cpu_fused_passes_match_float64():
    # the one-pass ops the "cpu" backend runs with fp32 products (the oracle tests above run them
    # end to end; the tile epilogues stay for bf16 products, float64 and the "default" capability)
    assert check_fused_passes(torch.ops.instdisc) >= 15


@pytest.mark.parametrize("loss_type", [0, 1])
@pytest.mark.parametrize("z", [0.0, 3.0])
def test_cpu_one_pass_agrees_with_its_tile_path(loss_type, z, monkeypatch):
    # the same step through the one-pass ops and through the ATen tiles + C++ epilogues
    if not (_backend.CPU_FMA_TILES and _backend.has_kernel("nce_shared_nce_pass", "CPU")):
        pytest.skip("the one-pass ops need the C++ extension and the avx2 CPU capability or better")
    g = torch.Generator().manual_seed(5)
    N, B, K, D = 700, 9, 301, 37
    mem = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    f = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    y = torch.randint(0, N, (B,), generator=g)
    neg = torch.cat([y[:2], torch.randint(0, N, (K - 2,), generator=g)])       # two shared = a positive
    args = (f, mem, y, neg, torch.tensor([z]), 0.07, 0.0, loss_type, 0.0, True, None, "fp32", 64)
    one = NS.forward_cpu(*args)
    monkeypatch.setattr(NS, "cpu_one_pass", lambda F, rows: False)
    tiles = NS.forward_cpu(*args)
    for a, b in zip(one, tiles):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["full", "eager", "cpu"])
def test_float64_features(backend):
    mem, f, y, neg = _problem(3, 7, 10, bank_dtype=torch.float64, dtype=torch.float64)
    for lt in (0, 1):
        L, G, _ = _oracle(f, mem, y, neg, 0.2, -1.0, lt, 0.1, 0.0, True)
        loss, grad, _ = IMPLS[backend](f, mem, y, neg, torch.tensor([-1.0]), 0.2, 0.1, lt, 0.0, True, None, "fp32", 2)
        assert loss.dtype == torch.float64 and grad.dtype == torch.float64
        _close(loss, grad, L, G, 1e-10)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
def test_gradcheck_float64(backend):
    mem, f, y, neg = _problem(3, 5, 6, bank_dtype=torch.float64)
    x = f.double().requires_grad_()
    for lt in ("nce", "infonce"):
        assert torch.autograd.gradcheck(
            lambda inp: ik.nce_loss(inp, mem, y, neg_indices=neg, negatives="shared", z=2.0, temperature=0.5,
                                    proximal=0.1, loss_type=lt, update_memory=False, backend=backend,
                                    exclude_positive=True), (x,))


def test_triton_float64_inputs_computed_in_fp32():
    mem, f, y, neg = _problem(3, 7, 10, bank_dtype=torch.float64, dtype=torch.float64)
    L, G, _ = _oracle(f, mem, y, neg, 0.2, -1.0, "nce")
    loss, grad, _ = NST.forward_triton(f, mem, y, neg, torch.tensor([-1.0]), 0.2, 0.0, 0, 0.0, False, None, "fp32", 0)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    _close(loss, grad, L, G, 2e-5)


def test_large_logits_are_stable():
    # T = 0.001: logits ~ 1000; nothing forms exp(s/T)
    mem, f, y, neg = _problem(4, 30, 16)
    for be in BACKENDS:
        for lt in (0, 1):
            L, G, _ = _oracle(f, mem, y, neg, 0.001, 1e30, lt)
            loss, grad, _ = IMPLS[be](f, mem, y, neg, torch.tensor([1e30]), 0.001, 0.0, lt, 0.0, False, None,
                                      "fp32", 8)
            assert torch.isfinite(loss) and torch.isfinite(grad).all()
            assert abs(loss.item() - L.item()) <= 1e-4 * max(1.0, abs(L.item()))


@pytest.mark.parametrize("fill", [-12.0, 5.0, 100.0])   # product in range / a row's product overflows / exp overflows
def test_tile_softplus_sum_every_path(fill):
    S = torch.full((3, 300), fill) + torch.linspace(-1, 1, 900).view(3, 300)
    tiles = NS._Tiles(torch.zeros(3, 4), torch.zeros(300, 4), 300, torch.float32)
    got = tiles.softplus_sum(S.clone())
    want = torch.nn.functional.softplus(S.double()).sum()
    assert got.dtype == torch.float64 and abs(got.item() - want.item()) <= 1e-6 * max(1.0, want.item())


def test_unrepresentable_z_raises_before_any_write():
    mem, f, y, neg = _problem(4, 30, 16)
    mem0, z = mem.clone(), torch.tensor([-1.0])
    for be in PUBLIC:
        with pytest.raises(ValueError, match="not representable in float32"):
            ik.nce_loss(f * 20, mem, y, neg_indices=neg, negatives="shared", temperature=0.01, z=z, backend=be)
    assert torch.equal(mem, mem0) and z.item() == -1.0


# --------------------------------------------------------------------------- #
# bf16 products: the documented bound                                          #
# --------------------------------------------------------------------------- #
def _bf16_bounds(f, mem, T, K, loss_type):
    u = 2.0 ** -8
    vmax = mem.double().norm(dim=1).max().item()
    delta = 3.05 * u * f.double().norm(dim=1).max().item() * vmax / T
    B = f.shape[0]
    if loss_type == "infonce":
        return delta, vmax * (math.expm1(2 * delta) * (1 + 3 * u) + 3.2 * u) / (T * B)
    return 2 * delta * (K + 1), vmax * K * (delta / 2 + 3.2 * u) / (T * B)


@pytest.mark.parametrize("backend,native", [(b, True) for b in BACKENDS] + [("eager", False), ("cpu", False)])
@pytest.mark.parametrize("loss_type", ["nce", "infonce"])
def test_bf16_within_documented_bound(backend, native, loss_type, monkeypatch):
    # native: bf16 GEMMs (GPU, AVX512-BF16/AMX CPUs); else (the chunked CPU paths) bf16-valued
    # operands multiplied in fp32 (_formulas.native_bf16_products); both ways on every machine
    monkeypatch.setattr(_formulas, "_cpu_bf16", lambda: native)
    mem, f, y, neg = _problem(6, 40, 64, N=200)
    T = 0.07
    L, G, _ = _oracle(f, mem, y, neg, T, -1.0, loss_type, ex=True)
    loss, grad, _ = IMPLS[backend](f, mem, y, neg, torch.tensor([-1.0]), T, 0.0, LOSS[loss_type], 0.0, True, None,
                                   "bf16", 16)
    lb, gb = _bf16_bounds(f, mem, T, 40, loss_type)
    if backend == "triton":      # the interpreter truncates fp32 -> bf16 (a GPU rounds): twice the error
        lb, gb = 2 * lb, 2 * gb
    err_l, err_g = abs(loss.item() - L.item()), (grad.double() - G).norm(dim=1).max().item()
    assert err_l <= lb and err_g <= gb
    assert err_l > 1e-7 or (grad.double() - G).abs().max().item() > 1e-7    # really bf16


@pytest.mark.parametrize("loss_type", ["nce", "infonce"])
def test_bf16_typical_error_cpu(loss_type):
    mem, f, y, neg = _problem(32, 2048, 128, N=5000, hits=False)
    L, G, _ = _oracle(f, mem, y, neg, 0.07, -1.0, loss_type)
    loss, grad, _ = NS.forward_chunked(f, mem, y, neg, torch.tensor([-1.0]), 0.07, 0.0, LOSS[loss_type], 0.0,
                                       False, None, "bf16", 0)
    assert abs(loss.item() - L.item()) <= 2e-3 * max(1.0, abs(L.item()))
    assert ((grad.double() - G).norm() / G.norm()).item() <= 5e-3


# --------------------------------------------------------------------------- #
# Public API: negatives, Z state, validation, registration                     #
# --------------------------------------------------------------------------- #
def test_drawn_negatives_follow_the_documented_rule():
    mem, f, y, _ = _problem(4, 1, 16, N=300)
    kw = dict(num_negatives=25, negatives="shared", z=100.0, update_memory=False, temperature=0.1)
    a = ik.nce_loss(f, mem, y, generator=torch.Generator().manual_seed(7), **kw)
    neg = torch.randint(0, 300, (25,), generator=torch.Generator().manual_seed(7))
    b = ik.nce_loss(f, mem, y, neg_indices=neg, **{k: v for k, v in kw.items() if k != "num_negatives"})
    assert a.item() == b.item()
    c = ik.nce_loss(f, mem, y, generator=torch.Generator().manual_seed(8), **kw)
    assert c.item() != a.item()
    drawn = NS.draw_shared_negatives(y, 10, 20000, generator=torch.Generator().manual_seed(1))
    counts = torch.bincount(drawn, minlength=10).double()
    assert drawn.shape == (20000,) and ((counts - 2000) ** 2 / 2000).sum().item() < 27.9    # chi2, 9 dof


def test_z_state_rules():
    mem, f, y, neg = _problem(4, 9, 16)
    kw = dict(neg_indices=neg, negatives="shared", temperature=0.2, update_memory=False)
    est = float(_oracle(f, mem, y, neg, 0.2, -1.0, "nce")[2])
    z = torch.tensor([-1.0])
    ik.nce_loss(f, mem, y, z=z, **kw)
    assert z.item() == pytest.approx(est, rel=1e-5)                  # estimated and stored
    ik.nce_loss(f * 0.5, mem, y, z=z, **kw)
    assert z.item() == pytest.approx(est, rel=1e-5)                  # then kept
    ik.nce_loss(f, mem, y, z=z, z_ema=0.9, **kw)
    assert z.item() == pytest.approx(0.9 * est + 0.1 * est, rel=1e-5)
    z2 = torch.tensor([2 * est])
    ik.nce_loss(f, mem, y, z=z2, z_ema=0.5, **kw)
    assert z2.item() == pytest.approx(1.5 * est, rel=1e-5)
    zi = torch.tensor([-1.0])
    ik.nce_loss(f, mem, y, z=zi, loss_type="infonce", **kw)
    assert zi.item() == -1.0                                          # InfoNCE does not use Z


def test_validation_errors_leave_bank_unchanged():
    mem, f, y, neg = _problem(4, 6, 16)
    mem0 = mem.clone()
    bad = [
        (dict(neg_indices=neg.view(1, -1).expand(4, 6)), ValueError, "1-D"),
        (dict(neg_indices=neg[:0]), ValueError, "1-D"),
        (dict(neg_indices=neg.float()), TypeError, "integer"),
        (dict(neg_indices=neg + 100), ValueError, "out of range"),
        (dict(precision="fp16"), ValueError, "precision"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(backend="cuda"), ValueError, "CUDA"),
        (dict(noise_probs=torch.ones(40), exclude_positive=True), ValueError, "exclude_positive"),
    ]
    for kw, exc, msg in bad:
        with pytest.raises(exc, match=msg):
            ik.nce_loss(f, mem, y, negatives="shared", **kw)
    with pytest.raises(ValueError, match="negatives"):
        ik.nce_loss(f, mem, y, negatives="batch")
    with pytest.raises(ValueError, match="neg_indices"):
        ik.nce_loss(f, mem, y, neg_indices=neg)                       # 1-D without negatives="shared"
    assert torch.equal(mem, mem0)


@pytest.mark.parametrize("backend", PUBLIC)
def test_opcheck(backend):
    mem, f, y, neg = _problem(3, 4, 8)
    op = getattr(torch.ops.instdisc, OPS[backend]).default
    for args in [
        (f.clone().requires_grad_(), mem, y, neg, torch.tensor([-1.0]), 0.1, 0.0, 0, 0.0, True, None, "fp32", 2),
        (f.clone().requires_grad_(), mem, y, neg, torch.tensor([5.0]), 0.1, 0.2, 1, 0.0, False, None, "bf16", 0),
    ]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", ["eager", "cpu", "auto"])
def test_torch_compile_fullgraph_training_step(backend):
    torch._dynamo.reset()
    N, D = 64, 16
    net = torch.nn.Linear(8, D)
    crit = ik.InstDiscLoss(N, D, num_negatives=7, temperature=0.1, backend=backend, negatives="shared")
    data = torch.randn(N, 8)

    def forward(x, idx):
        return crit(torch.nn.functional.normalize(net(x), dim=1), idx)

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    idx = torch.arange(8)
    bank0 = crit.memory.clone()
    loss = compiled(data[idx], idx)
    loss.backward()
    assert torch.isfinite(loss) and crit.z.item() > 0
    assert not torch.equal(crit.memory[idx], bank0[idx]) and torch.equal(crit.memory[8:], bank0[8:])
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()
    assert torch.isfinite(compiled(data[idx + 8], idx + 8))


def test_never_allocates_b_by_k():
    B, K, D = 64, 4096, 16
    mem, f, y, neg = _problem(B, K, D, N=5000)
    bxk = B * K * 4
    for lt in (0, 1):
        with AllocTracker(f, mem, y, neg) as tr:
            NS.forward_chunked(f, mem, y, neg, torch.tensor([-1.0]), 0.1, 0.0, lt, 0.0, True, None, "fp32", 128)
        assert tr.largest < bxk / 2 and tr.peak < bxk, (tr.largest, tr.peak, bxk)
    with AllocTracker(f, mem, y, neg) as tr:                          # the tracker sees the eager B x K
        NS.forward_full(f, mem, y, neg, torch.tensor([-1.0]), 0.1, 0.0, 0, 0.0, True, None, "fp32")
    assert tr.largest >= bxk


@pytest.mark.parametrize("backend", PUBLIC)
@pytest.mark.parametrize("loss_type", ["nce", "infonce"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_shared_negatives_report_a_non_finite_bank_row_before_any_write(backend, loss_type, bad):
    # the same post-op checks as per-sample nce_loss: a NaN/+inf/-inf row among the K shared rows
    # is named (with Z estimated from this batch), and neither the bank nor the Z state changes
    g = torch.Generator().manual_seed(3)
    memory = torch.nn.functional.normalize(torch.randn(40, 16, generator=g), dim=1)
    memory[11, 3] = bad
    x = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=1).requires_grad_()
    y = torch.tensor([0, 5, 5, 39])
    z = torch.tensor([-1.0])
    bank0, z0 = memory.clone(), z.clone()
    with pytest.raises(ValueError, match="memory row 11"):
        ik.nce_loss(x, memory, y, neg_indices=torch.tensor([2, 11, 30]), negatives="shared", z=z,
                    loss_type=loss_type, temperature=0.1, backend=backend)
    assert torch.equal(memory.isnan(), bank0.isnan()) and torch.equal(memory.nan_to_num(), bank0.nan_to_num())
    assert torch.equal(z, z0)


def test_shared_negatives_write_an_inference_mode_z_state():
    with torch.inference_mode():
        z = torch.tensor([-1.0])
    memory = torch.nn.functional.normalize(torch.randn(30, 8), dim=1)
    x = torch.nn.functional.normalize(torch.randn(3, 8), dim=1).requires_grad_()
    loss = ik.nce_loss(x, memory, torch.tensor([1, 2, 3]), num_negatives=5, negatives="shared", z=z,
                       temperature=0.1, backend="eager")
    assert torch.isfinite(loss) and float(z) > 0

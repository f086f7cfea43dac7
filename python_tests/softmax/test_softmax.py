"""Exact non-parametric softmax (docs/method.md#the-exact-non-parametric-softmax) against the float64 oracle."""

import pytest
import torch

from helpers.alloc import AllocTracker
from instdisc_kernels import _backend, nonparametric_softmax_loss
from instdisc_kernels import reference as R
from instdisc_kernels.ops import _formulas
from instdisc_kernels.ops import softmax as S
from instdisc_kernels.ops import softmax_triton as ST

T = 0.07
BACKENDS = ["full", "eager", "cpu", "triton"]   # IMPLS keys: "full" is the B x N cross-check
PUBLIC = ["eager", "cpu", "triton"]


def _cpu(F, V, y, t, prec, chunk):
    """the cpu backend: the chunks' softmax step in C++ (needs the extension)."""
    if not _backend.has_kernel("nce_shared_tile_softmax_", "CPU"):
        pytest.skip("the C++ extension instdisc_kernels._C is not built (the softmax's cpu backend)")
    return S.forward_chunked(F, V, y, t, prec, chunk, fused=True)


IMPLS = {
    "full": lambda F, V, y, t, prec, chunk: S.forward_full(F, V, y, t, prec),
    "eager": S.forward_chunked,
    "cpu": _cpu,
    "triton": ST.forward_triton,
}


def _data(B, N, D, dtype=torch.float32, bank_dtype=torch.float32, noise=0.5, repeat=False):
    V = torch.nn.functional.normalize(torch.randn(N, D, dtype=torch.float64), dim=1)
    y = torch.randint(0, N, (B,))
    if repeat and B > 1:
        y[-1] = y[0]
    F = torch.nn.functional.normalize(V[y] + noise * torch.randn(B, D, dtype=torch.float64), dim=1)
    return F.to(dtype), V.to(bank_dtype), y


def _oracle(F, V, y, t=T):
    return R.softmax_loss_value(F, V, y, t), R.softmax_grad(F, V, y, t)


def _check(loss, grad, F, V, y, tol, t=T):
    L, G = _oracle(F, V, y, t)
    vmax = V.double().norm(dim=1).max().item()
    assert abs(loss.double().item() - L.item()) <= tol * max(1.0, abs(L.item()))
    # gradient rows are at most ~2 max|V| / (T B); scale the tolerance by that
    assert (grad.double() - G).abs().max().item() <= tol * vmax / (t * F.shape[0])


# --------------------------------------------------------------------------- #
# Values                                                                       #
# --------------------------------------------------------------------------- #
SHAPES = [  # B, N, D, chunk
    (1, 1, 3, 0),          # N = 1: softmax is one-hot, gradient exactly 0
    (5, 300, 100, 64),     # N not a multiple of the chunk
    (7, 129, 129, 0),
    (4, 50, 16, 64),       # N < chunk
    (6, 200, 128, 1),      # chunk of one row
    (33, 257, 3, 100),     # B > one Triton row block on the interpreter's 16..64 blocks
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,N,D,chunk", SHAPES)
def test_fp32_matches_oracle(backend, B, N, D, chunk):
    if backend == "triton" and chunk == 1:
        chunk = 16
    F, V, y = _data(B, N, D, repeat=True)
    loss, grad = IMPLS[backend](F, V, y, T, "fp32", chunk)
    assert loss.dtype == torch.float32 and grad.shape == (B, D)
    _check(loss, grad, F, V, y, 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fdtype,bdtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                           (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_low_precision_storage(backend, fdtype, bdtype):
    # bf16/fp16 storage is upcast exactly, so against the oracle on the *stored*
    # values the error is fp32 arithmetic only
    F, V, y = _data(9, 200, 64, fdtype, bdtype)
    loss, grad = IMPLS[backend](F, V, y, T, "fp32", 64)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    _check(loss, grad, F, V, y, 2e-5)


@pytest.mark.parametrize("backend", ["full", "eager"])
def test_float64(backend):
    F, V, y = _data(6, 150, 20, torch.float64, torch.float64)
    loss, grad = IMPLS[backend](F, V, y, 0.1, "fp32", 32)
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    _check(loss, grad, F, V, y, 1e-12, t=0.1)


def test_triton_float64_inputs_computed_in_fp32():
    F, V, y = _data(4, 100, 8, torch.float64, torch.float64)
    loss, grad = ST.forward_triton(F, V, y, T, "fp32", 0)
    assert loss.dtype == torch.float64
    _check(loss, grad, F, V, y, 2e-5)


def test_triton_splits_merge():
    # several programs along N (the GPU layout) merged on the host
    F, V, y = _data(5, 700, 32)
    loss, grad = ST.forward_triton(F, V, y, T, "fp32", 128)
    _check(loss, grad, F, V, y, 2e-5)


def test_large_logits_are_stable():
    # T small: logits ~ 1/T = 1000, exp would overflow without the running max
    F, V, y = _data(4, 300, 32, noise=0.01)
    for backend in BACKENDS:
        loss, grad = IMPLS[backend](F, V, y, 0.001, "fp32", 64)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        L, G = _oracle(F, V, y, 0.001)
        assert abs(loss.item() - L.item()) <= 1e-3 * max(1.0, abs(L.item()))


# --------------------------------------------------------------------------- #
# bf16 chunk products: the documented bound                                    #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend,native", [(b, True) for b in BACKENDS] + [("eager", False), ("cpu", False)])
@pytest.mark.parametrize("noise", [0.05, 0.5, 10.0])
def test_bf16_within_documented_bound(backend, native, noise, monkeypatch):
    # native: bf16 GEMMs (GPU, AVX512-BF16/AMX CPUs); else (the chunked CPU pass) bf16-valued
    # operands multiplied in fp32 (_formulas.native_bf16_products); both ways on every machine
    monkeypatch.setattr(_formulas, "_cpu_bf16", lambda: native)
    F, V, y = _data(8, 300, 64, noise=noise)
    loss, grad = IMPLS[backend](F, V, y, T, "bf16", 64)
    L, G = _oracle(F, V, y)
    delta, gbound = S.bf16_error_bound(F, V, T)
    if backend == "triton":
        # the interpreter truncates fp32 -> bf16 (a GPU rounds to nearest): twice the error
        delta, gbound = 2 * delta, 2 * gbound
    assert abs(loss.item() - L.item()) <= delta
    assert (grad.double() - G).norm(dim=1).max().item() <= gbound
    # and it is a real bf16 computation, not fp32 in disguise
    assert abs(loss.item() - L.item()) > 1e-7 or (grad.double() - G).abs().max().item() > 1e-7


def test_bf16_typical_error_cpu():
    # realistic sizes: errors far inside the worst-case bound
    F, V, y = _data(32, 20000, 128, noise=0.5)
    loss, grad = S.forward_chunked(F, V, y, T, "bf16", 0)
    L, G = _oracle(F, V, y)
    assert abs(loss.item() - L.item()) <= 2e-3
    assert ((grad.double() - G).norm() / G.norm()).item() <= 2e-3


# --------------------------------------------------------------------------- #
# Public function: autograd, bank update, compile, opcheck                     #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend", PUBLIC)
def test_public_loss_grad_and_bank_update(backend):
    F, V, y = _data(6, 90, 24, repeat=True)
    old = V.clone()
    x = F.clone().requires_grad_()
    loss = nonparametric_softmax_loss(x, V, y, temperature=T, momentum=0.5, backend=backend, chunk_size=32)
    (3.0 * loss).backward()
    L, G = _oracle(F, old, y)                       # the loss saw the old rows
    assert abs(loss.item() - L.item()) <= 2e-5 * max(1.0, L.item())
    assert (x.grad.double() - 3.0 * G).abs().max().item() <= 1e-5 / (T * 6)
    expect = R.memory_update_(old.clone(), y, F, 0.5)
    assert (V - expect).abs().max().item() <= 1e-6
    assert not torch.equal(V, old)


@pytest.mark.parametrize("bank_dtype", [torch.bfloat16, torch.float16])
def test_public_low_precision_bank(bank_dtype):
    F, V, y = _data(5, 70, 16, torch.float32, bank_dtype)
    old = V.clone()
    x = F.clone().requires_grad_()
    loss = nonparametric_softmax_loss(x, V, y, backend="eager")
    loss.backward()
    L, G = _oracle(F, old, y)
    assert abs(loss.item() - L.item()) <= 2e-5 * max(1.0, L.item())
    assert (x.grad.double() - G).abs().max().item() <= 1e-5 / (T * 5)
    expect = R.memory_update_(old.clone(), y, F, 0.5)
    ulp = 2.0 ** -7 if bank_dtype == torch.bfloat16 else 2.0 ** -10
    assert (V.double() - expect.double()).abs().max().item() <= ulp


def test_bf16_features_gradient_dtype():
    F, V, y = _data(4, 40, 16, torch.bfloat16)
    x = F.clone().requires_grad_()
    nonparametric_softmax_loss(x, V, y, update_memory=False).backward()
    assert x.grad.dtype == torch.bfloat16
    G = R.softmax_grad(F, V, y, T)
    assert (x.grad.double() - G).abs().max().item() <= 2 ** -8 * G.abs().max().item() + 1e-6


def test_update_memory_false_leaves_bank():
    F, V, y = _data(4, 40, 16)
    old = V.clone()
    nonparametric_softmax_loss(F, V, y, update_memory=False)
    assert torch.equal(V, old)


@pytest.mark.parametrize("backend", ["eager"])
def test_gradcheck_fp64(backend):
    F, V, y = _data(3, 20, 5, torch.float64, torch.float64)
    x = F.clone().requires_grad_()
    f = lambda x: nonparametric_softmax_loss(x, V, y, temperature=0.5, update_memory=False,  # noqa: E731
                                             backend=backend, chunk_size=7)
    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("op", ["softmax_forward_chunked", "softmax_forward_cpu", "softmax_forward_triton"])
def test_opcheck(op):
    F, V, y = _data(3, 40, 16)
    x = F.clone().requires_grad_()
    torch.library.opcheck(getattr(torch.ops.instdisc, op), (x, V, y, T, "fp32", 16))


@pytest.mark.parametrize("backend", ["eager", "cpu", "triton"])
def test_compile_fullgraph(backend):
    F, V, y = _data(4, 60, 16)
    V2 = V.clone()
    x1 = F.clone().requires_grad_()
    x2 = F.clone().requires_grad_()

    def step(x, bank):
        return nonparametric_softmax_loss(x, bank, y, backend=backend, chunk_size=16)

    loss_c = torch.compile(step, fullgraph=True, backend="aot_eager")(x1, V)
    loss_c.backward()
    loss_e = step(x2, V2)
    loss_e.backward()
    assert torch.allclose(loss_c, loss_e) and torch.allclose(x1.grad, x2.grad)
    assert torch.equal(V, V2)                       # the bank update ran inside the graph too


# --------------------------------------------------------------------------- #
# Memory: never a B x N tensor                                                 #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("backend,prec,chunk", [("eager", "fp32", 128), ("eager", "bf16", 128), ("cpu", "fp32", 128),
                                               ("triton", "fp32", 1024)])
def test_never_allocates_b_by_n(backend, prec, chunk):
    # Triton: chunk = bank rows per program; the partials are splits x B x D floats
    B, N, D = 16, 4096, 32
    F, V, y = _data(B, N, D)
    with AllocTracker(F, V, y) as tr:
        IMPLS[backend](F, V, y, T, prec, chunk)
    bxn = B * N * 4
    assert tr.largest < bxn / 8, (tr.largest, bxn)
    assert tr.peak < bxn / 4, (tr.peak, bxn)


def test_alloc_tracker_sees_the_eager_b_by_n():
    # the detector above is not blind: the eager version does allocate B x N
    B, N, D = 16, 4096, 32
    F, V, y = _data(B, N, D)
    with AllocTracker(F, V, y) as tr:
        S.forward_full(F, V, y, T)
    assert tr.largest >= B * N * 4


def test_default_chunk_size_bounds():
    assert S.default_chunk_size(256, 1_281_167) == 1024
    assert S.default_chunk_size(1, 10**7) == 8192
    assert S.default_chunk_size(4096, 10**6) == 256
    assert S.default_chunk_size(8, 5) == 5


# --------------------------------------------------------------------------- #
# Validation: clear errors naming the argument, bank untouched                 #
# --------------------------------------------------------------------------- #
def _bad_calls():
    F, V, y = _data(4, 30, 8)
    nan = F.clone()
    nan[1, 2] = float("nan")
    return V, [
        (dict(features=F.long()), TypeError, "features"),
        (dict(features=F[:, :5]), ValueError, "features"),
        (dict(features=F[0]), ValueError, "features"),
        (dict(features=nan), ValueError, "features"),
        (dict(indices=y.float()), TypeError, "indices"),
        (dict(indices=y[:3]), ValueError, "indices"),
        (dict(indices=torch.tensor([0, 1, 2, 30])), ValueError, "indices"),
        (dict(indices=torch.tensor([0, -1, 2, 3])), ValueError, "indices"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(momentum=1.0), ValueError, "momentum"),
        (dict(precision="fp16"), ValueError, "precision"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(backend="nope"), ValueError, "backend"),
        (dict(memory=V.t().contiguous().t()), ValueError, "memory"),
    ], F, y


def test_validation_errors_leave_bank_unchanged():
    V, cases, F, y = _bad_calls()
    for override, exc, name in cases:
        bank = override.pop("memory", V)
        before = bank.clone()
        kw = dict(features=F, memory=bank, indices=y)
        kw.update({k: override.pop(k) for k in ("features", "indices") if k in override})
        with pytest.raises(exc, match=name):
            nonparametric_softmax_loss(kw["features"], kw["memory"], kw["indices"], **override)
        assert torch.equal(bank, before)


@pytest.mark.parametrize("backend", ["eager", "cpu"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_bank_row_is_named_and_the_bank_left_bit_for_bit(backend, bad):
    # the worst bank a resumed run can hand the softmax: one corrupt row among finite ones
    if backend == "cpu" and not _backend.has_kernel("nce_shared_tile_softmax_", "CPU"):
        pytest.skip("the C++ extension instdisc_kernels._C is not built (the softmax's cpu backend)")
    F, V, y = _data(4, 50, 16)
    V[7, 3] = bad
    before = V.clone()
    x = F.clone().requires_grad_()
    with pytest.raises(ValueError, match="memory row 7 contains NaN or inf"):
        nonparametric_softmax_loss(x, V, y, backend=backend)
    assert torch.equal(V.view(torch.int32), before.view(torch.int32))


# --------------------------------------------------------------------------- #
# GPU (skipped without CUDA)                                                   #
# --------------------------------------------------------------------------- #
@pytest.mark.gpu
@pytest.mark.parametrize("prec", ["fp32", "bf16"])
@pytest.mark.parametrize("B,N,D", [(256, 50000, 128), (7, 1001, 129), (33, 300, 3)])
def test_triton_gpu_matches_oracle(prec, B, N, D):
    F, V, y = _data(B, N, D)
    loss, grad = ST.forward_triton(F.cuda(), V.cuda(), y.cuda(), T, prec, 0)
    L, G = _oracle(F, V, y)
    if prec == "fp32":                                # tf32x3: about fp32
        _check(loss.cpu(), grad.cpu(), F, V, y, 1e-4)
    else:
        delta, gbound = S.bf16_error_bound(F, V, T)
        assert abs(loss.item() - L.item()) <= delta
        assert (grad.cpu().double() - G).norm(dim=1).max().item() <= gbound
        assert ((grad.cpu().double() - G).norm() / G.norm()).item() <= 5e-3


@pytest.mark.gpu
def test_triton_gpu_public_step():
    F, V, y = _data(64, 5000, 128, repeat=True)
    Vc = V.cuda()
    x = F.cuda().requires_grad_()
    loss = nonparametric_softmax_loss(x, Vc, y.cuda(), backend="triton")
    loss.backward()
    L, G = _oracle(F, V, y)
    assert abs(loss.item() - L.item()) <= 1e-4 * L.item()
    assert (x.grad.cpu().double() - G).abs().max().item() <= 1e-4 / (T * 64)
    expect = R.memory_update_(V.clone(), y, F, 0.5)
    assert (Vc.cpu() - expect).abs().max().item() <= 1e-5

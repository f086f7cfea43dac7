"""The proximal term (paper eq. 9) on the exact softmax: nonparametric_softmax_loss(proximal=lambda)
on every backend, and InstDiscLoss(loss_type="softmax", proximal=lambda), against the float64
oracle reference.softmax_loss_value / softmax_grad(..., proximal)."""
import pytest
import torch

import instdisc_kernels as ik
from instdisc_kernels import nonparametric_softmax_loss
from instdisc_kernels import reference as R

BACKENDS = ["eager", "cpu", "triton"]   # triton: the interpreter on CPU tensors (conftest)
LAMBDAS = [0.0, 0.5, 30.0]
T = 0.1
# per feature dtype: (loss, gradient) tolerance, relative to max(1, |oracle|) and to the largest gradient
TOL = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-10, 1e-10)}


def _data(B, N, D, dtype=torch.float32, repeat=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    V = torch.nn.functional.normalize(torch.randn(N, D, dtype=torch.float64, generator=g), dim=1)
    y = torch.randint(0, N, (B,), generator=g)
    if repeat and B > 1:
        y[-1] = y[0]
    # features away from their bank rows, so the proximal term is large
    F = torch.nn.functional.normalize(V[y] + torch.randn(B, D, dtype=torch.float64, generator=g), dim=1)
    return F.to(dtype), V.to(dtype), y


def _run(F, V, y, backend, lam, **kw):
    x = F.clone().requires_grad_()
    loss = nonparametric_softmax_loss(x, V, y, temperature=T, backend=backend, proximal=lam, **kw)
    loss.backward()
    return loss.detach(), x.grad


def _close(loss, grad, F, V, y, lam, dtype):
    L, G = R.softmax_loss_value(F, V, y, T, lam), R.softmax_grad(F, V, y, T, lam)
    tl, tg = TOL[dtype]
    assert loss.dtype == dtype and grad.dtype == dtype
    assert abs(loss.double().item() - L.item()) <= tl * max(1.0, abs(L.item())), (loss.item(), L.item())
    assert (grad.double() - G).abs().max().item() <= tg * max(1.0, G.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", LAMBDAS)
@pytest.mark.parametrize("B, N, D", [(1, 1, 100), (5, 37, 100), (6, 300, 16)])
def test_loss_and_gradient_match_the_oracle(backend, lam, B, N, D):
    F, V, y = _data(B, N, D)
    loss, grad = _run(F, V, y, backend, lam, update_memory=False, chunk_size=128)
    _close(loss, grad, F, V, y, lam, torch.float32)


@pytest.mark.parametrize("backend", ["eager"])
@pytest.mark.parametrize("lam", LAMBDAS)
def test_float64_features(backend, lam):
    F, V, y = _data(4, 23, 100, torch.float64)
    loss, grad = _run(F, V, y, backend, lam, update_memory=False, chunk_size=7)
    _close(loss, grad, F, V, y, lam, torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_term_is_exactly_added(backend):
    """loss(lambda) - loss(0) and grad(lambda) - grad(0) are the proximal term and its gradient."""
    F, V, y = _data(5, 37, 100)
    l0, g0 = _run(F, V, y, backend, 0.0, update_memory=False)
    l1, g1 = _run(F, V, y, backend, 30.0, update_memory=False)
    pv, pg = R.proximal_value(F, V, y, 30.0), R.proximal_grad(F, V, y, 30.0)
    assert pv.item() > 1.0                                      # a term that matters
    assert abs((l1 - l0).double().item() - pv.item()) <= 1e-5 * pv.item()
    assert ((g1 - g0).double() - pg).abs().max().item() <= 1e-5 * pg.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_term_reads_the_bank_before_the_update(backend):
    F, V, y = _data(5, 37, 100)
    V0 = V.clone()
    loss, grad = _run(F, V, y, backend, 0.5)                    # update_memory=True
    assert not torch.equal(V, V0)                               # the update ran ...
    _close(loss, grad, F, V0, y, 0.5, torch.float32)            # ... after the loss read the old rows


@pytest.mark.parametrize("backend", ["eager"])
def test_gradcheck_fp64(backend):
    F, V, y = _data(3, 20, 5, torch.float64)
    x = F.clone().requires_grad_()
    f = lambda x: nonparametric_softmax_loss(x, V, y, temperature=0.5, update_memory=False,
                                             backend=backend, chunk_size=7, proximal=2.0)
    assert torch.autograd.gradcheck(f, (x,))


@pytest.mark.parametrize("op", ["softmax_forward_chunked", "softmax_forward_triton"])
def test_opcheck_with_proximal(op):
    F, V, y = _data(3, 40, 16)
    x = F.clone().requires_grad_()
    torch.library.opcheck(getattr(torch.ops.instdisc, op), (x, V, y, T, "fp32", 16, 0.5))


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), "0.5", True])
def test_bad_proximal_names_the_argument_and_leaves_the_bank(bad):
    F, V, y = _data(3, 10, 8)
    V0 = V.clone()
    with pytest.raises((ValueError, TypeError), match="proximal"):
        nonparametric_softmax_loss(F, V, y, proximal=bad)
    assert torch.equal(V, V0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lam", [0.5, 30.0])
def test_instdisc_loss_softmax_applies_proximal(backend, lam):
    F, _, y = _data(5, 37, 100)
    crit = ik.InstDiscLoss(37, 100, loss_type="softmax", temperature=T, proximal=lam, backend=backend,
                           generator=torch.Generator().manual_seed(1))
    V0 = crit.memory.clone()
    x = F.clone().requires_grad_()
    loss = crit(x, y)
    loss.backward()
    _close(loss.detach(), x.grad, F, V0, y, lam, torch.float32)
    assert "proximal" in repr(crit)

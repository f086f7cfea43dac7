"""nce_loss through the public API, on every backend available here: numerics
against the float64 oracle, Z state, sampling, autograd, opcheck, torch.compile."""
import pytest
import torch

import instdisc_kernels as ik
from instdisc_kernels import reference as ref
from instdisc_kernels.ops import nce as nce_mod

CPU = torch.device("cpu")
BACKENDS = [b for b in ("eager", "cpu", "triton") if nce_mod.TABLE.available(b, CPU)]
OPS = {"eager": "nce_forward_eager", "cpu": "nce_forward", "triton": "nce_forward_triton"}


def _problem(B, K, D, N=60, seed=0, bank_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mem = ref.init_memory(N, D, generator=g).to(bank_dtype)
    f = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    y = torch.randint(0, N, (B,), generator=g)
    neg = torch.randint(0, N, (B, K), generator=g)
    return mem, f, y, neg


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["nce", "infonce"])
def test_loss_grad_bank_and_z_match_oracle(backend, loss_type):
    mem, f, y, neg = _problem(5, 9, 100)
    y[3] = y[1]                                       # repeated positive
    neg[0, 2] = y[0]                                  # a negative equal to its positive
    T = 0.1
    mem0 = mem.clone()
    z = torch.tensor([-1.0])
    x = f.clone().requires_grad_()
    loss = ik.nce_loss(x, mem, y, neg_indices=neg, temperature=T, z=z, loss_type=loss_type, backend=backend)
    loss.backward()
    idx = ref.index_matrix(y, neg)
    if loss_type == "nce":
        Z = ref.estimate_z(ref.nce_scores(f, mem0, idx), T, mem.shape[0])
        assert z.item() == pytest.approx(Z.item(), rel=1e-5)
        exp_loss, exp_grad = ref.nce_loss_value(f, mem0, idx, T, Z), ref.nce_grad(f, mem0, idx, T, Z)
    else:
        assert z.item() == -1.0                          # InfoNCE does not use Z
        exp_loss, exp_grad = ref.infonce_loss_value(f, mem0, idx, T), ref.infonce_grad(f, mem0, idx, T)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(exp_loss.item(), rel=1e-5)
    torch.testing.assert_close(x.grad.double(), exp_grad, rtol=1e-4, atol=1e-6)
    exp_mem = mem0.double().clone()
    ref.memory_update_(exp_mem, y, f, 0.5)
    torch.testing.assert_close(mem.double(), exp_mem, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_z_state_semantics(backend):
    mem, f, y, neg = _problem(4, 6, 8)
    T = 0.2
    idx = ref.index_matrix(y, neg)
    est = ref.estimate_z(ref.nce_scores(f, mem, idx), T, mem.shape[0]).item()
    kw = dict(neg_indices=neg, temperature=T, update_memory=False, backend=backend)
    # a float: used as is
    fixed = ik.nce_loss(f, mem, y, z=3.0, **kw)
    assert fixed.item() == pytest.approx(ref.nce_loss_value(f, mem, idx, T, 3.0).item(), rel=1e-5)
    # None: estimated from this batch, nothing stored
    none = ik.nce_loss(f, mem, y, z=None, **kw)
    assert none.item() == pytest.approx(ref.nce_loss_value(f, mem, idx, T, est).item(), rel=1e-5)
    # state tensor: set on the first call, then kept
    state = torch.tensor([0.0])
    ik.nce_loss(f, mem, y, z=state, **kw)
    assert state.item() == pytest.approx(est, rel=1e-5)
    mem2, f2, y2, neg2 = _problem(4, 6, 8, seed=1)
    ik.nce_loss(f2, mem2, y2, z=state, neg_indices=neg2, temperature=T, update_memory=False, backend=backend)
    assert state.item() == pytest.approx(est, rel=1e-5)
    # EMA: Z <- a Z + (1-a) estimate, and the loss uses the new Z
    ema = torch.tensor([50.0])
    loss = ik.nce_loss(f, mem, y, z=ema, z_ema=0.9, **kw)
    new_z = 0.9 * 50.0 + 0.1 * est
    assert ema.item() == pytest.approx(new_z, rel=1e-5)
    assert loss.item() == pytest.approx(ref.nce_loss_value(f, mem, idx, T, new_z).item(), rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_proximal_term(backend):
    mem, f, y, neg = _problem(3, 4, 10)
    idx = ref.index_matrix(y, neg)
    x = f.clone().requires_grad_()
    loss = ik.nce_loss(x, mem, y, neg_indices=neg, z=2.0, proximal=0.5, temperature=0.1,
                       update_memory=False, backend=backend)
    loss.backward()
    exp = ref.nce_loss_value(f, mem, idx, 0.1, 2.0) + ref.proximal_value(f, mem, y, 0.5)
    exp_g = ref.nce_grad(f, mem, idx, 0.1, 2.0) + ref.proximal_grad(f, mem, y, 0.5)
    assert loss.item() == pytest.approx(exp.item(), rel=1e-5)
    torch.testing.assert_close(x.grad.double(), exp_g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stride_zero_grad_output_and_noncontiguous_features(backend):
    mem, f, y, neg = _problem(4, 5, 12)
    base = f.t().contiguous().t()                     # same values, column-major strides
    assert not base.is_contiguous()
    x = base.clone().requires_grad_()
    loss = ik.nce_loss(x, mem, y, neg_indices=neg, z=2.0, update_memory=False, backend=backend)
    loss.expand(7).sum().backward()                   # grad_output reaches the op as a stride-0 expand
    idx = ref.index_matrix(y, neg)
    torch.testing.assert_close(x.grad.double(), 7 * ref.nce_grad(f, mem, idx, 0.07, 2.0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_gradcheck_float64(backend):
    mem, f, y, neg = _problem(3, 4, 6)
    mem = mem.double()
    x = f.double().requires_grad_()
    for lt in ("nce", "infonce"):
        assert torch.autograd.gradcheck(
            lambda inp: ik.nce_loss(inp, mem, y, neg_indices=neg, z=2.0, temperature=0.5, proximal=0.1,
                                    loss_type=lt, update_memory=False, backend=backend), (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    mem, f, y, neg = _problem(3, 4, 8)
    op = getattr(torch.ops.instdisc, OPS[backend]).default
    seed = torch.tensor([1234])
    for args in [
        (f.clone().requires_grad_(), mem, y, neg, torch.tensor([-1.0]), seed, 4, 0.1, 0.0, 0, 0.0, False, None),
        (f.clone().requires_grad_(), mem, y, neg, torch.tensor([5.0]), seed, 4, 0.1, 0.2, 1, 0.0, False, None),
    ]:
        torch.library.opcheck(op, args)


def test_reference_backend_draws_reproducible_uniform_negatives():
    y = torch.tensor([0, 3, 7])
    a = nce_mod.draw_negatives(y, 10, 20000, generator=torch.Generator().manual_seed(5))
    b = nce_mod.draw_negatives(y, 10, 20000, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    counts = torch.bincount(a.flatten(), minlength=10).double()
    expected = a.numel() / 10
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.9                                     # chi-square, 9 dof, p = 0.001
    ex = nce_mod.draw_negatives(y, 10, 5000, generator=torch.Generator().manual_seed(6), exclude_positive=True)
    assert not (ex == y.view(-1, 1)).any()
    assert ex.min() >= 0 and ex.max() <= 9
    for b in range(3):                                      # still uniform over the other N-1 rows
        c = torch.bincount(ex[b], minlength=10).double()
        c = torch.cat([c[:y[b]], c[y[b] + 1:]])
        assert ((c - 5000 / 9) ** 2 / (5000 / 9)).sum().item() < 26.1    # 8 dof, p = 0.001


def test_noise_probs_never_draws_zero_probability_rows():
    N = 12
    noise = torch.ones(N)
    noise[5:] = 0
    mem, f, y, _ = _problem(3, 1, 4, N=N)
    neg = nce_mod.draw_negatives(y, N, 500, generator=torch.Generator().manual_seed(0), noise_probs=noise / 5)
    assert neg.max() < 5
    # uniform noise_probs gives exactly the uniform loss
    _, _, _, negs = _problem(3, 6, 4, N=N)
    a = ik.nce_loss(f, mem, y, neg_indices=negs, z=2.0, update_memory=False, noise_probs=torch.ones(N))
    b = ik.nce_loss(f, mem, y, neg_indices=negs, z=2.0, update_memory=False)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_generator_seed_same_loss(backend):
    mem, f, y, _ = _problem(4, 1, 16, N=500)
    kw = dict(num_negatives=32, z=100.0, update_memory=False, backend=backend)
    a = ik.nce_loss(f, mem, y, generator=torch.Generator().manual_seed(1), **kw)
    b = ik.nce_loss(f, mem, y, generator=torch.Generator().manual_seed(1), **kw)
    c = ik.nce_loss(f, mem, y, generator=torch.Generator().manual_seed(2), **kw)
    assert a.item() == b.item() and a.item() != c.item()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_torch_compile_fullgraph_training_step(backend):
    torch._dynamo.reset()
    N, D = 64, 16
    torch.manual_seed(0)
    net = torch.nn.Linear(8, D)
    crit = ik.InstDiscLoss(N, D, num_negatives=7, temperature=0.1, backend=backend)
    data = torch.randn(N, 8)

    def forward(x, idx):                       # network + loss + bank update, one graph
        feat = torch.nn.functional.normalize(net(x), dim=1)
        return crit(feat, idx)

    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    idx = torch.arange(8)
    bank0 = crit.memory.clone()
    loss = compiled(data[idx], idx)
    loss.backward()
    assert torch.isfinite(loss) and crit.z.item() > 0
    assert not torch.equal(crit.memory[idx], bank0[idx])              # bank updated
    assert torch.equal(crit.memory[8:], bank0[8:])
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()
    loss2 = compiled(data[idx + 8], idx + 8)                            # second step, Z fixed
    assert torch.isfinite(loss2)


def test_instdisc_loss_module_modes():
    torch.manual_seed(0)
    f = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    y = torch.tensor([0, 1, 2, 3])
    nce = ik.InstDiscLoss(20, 8, num_negatives=5)
    assert nce(f, y).dim() == 0 and nce.z.item() > 0
    ema = ik.InstDiscLoss(20, 8, num_negatives=5, z="ema")
    ema(f, y)
    z1 = ema.z.item()
    ema(f, y)
    assert ema.z.item() != z1
    exact = ik.InstDiscLoss(20, 8, num_negatives=0, temperature=0.1)
    mem0 = exact.memory.clone()
    loss = exact(f, y)
    assert loss.item() == pytest.approx(ref.softmax_loss_value(f, mem0, y, 0.1).item(), rel=1e-5)
    fixed = ik.InstDiscLoss(20, 8, num_negatives=5, z=7.0)
    fixed(f, y)
    assert fixed.z.item() == 7.0
    assert set(nce.state_dict()) == {"z", "z_step", "bank.memory"}     # z_step: the Z policy's step counter

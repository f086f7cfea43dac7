"""NCEAverage (lemniscate drop-in) under torch.compile: the custom ops of its traced path
(instdisc_kernels/lemniscate/_nce_average_ops.py) pass opcheck, and a compiled
forward + backward step with fullgraph=True gives the eager step's loss, gradient, bank
and Z. (The C++ ops nce_probs / nce_probs_backward / nce_probs_loss themselves are
opcheck'd with every other C++ op in test_op_registration.py.)
"""
import pytest
import torch
import torch.nn.functional as Fn

from instdisc_kernels import _backend
from instdisc_kernels.lemniscate import NCEAverage, NCECriterion

if not _backend.extension_loaded():
    pytest.skip("the C++ extension (instdisc_kernels._C) is not built", allow_module_level=True)

OPS = torch.ops.instdisc
N, D, K, B, T = 23, 12, 5, 3, 0.1


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = Fn.normalize(torch.randn(B, D, generator=g), dim=1)
    y = torch.tensor([4, 17, 4])                       # a repeated index: the last occurrence's update wins
    idx = torch.randint(0, N, (B, K + 1), generator=g)
    return x, y, idx


def _module(Z, backend, seed=1):
    torch.manual_seed(seed)
    return NCEAverage(D, N, K, T=T, Z=Z, backend=backend)


def _steps(module, compiled, n_steps=2, compile_backend="aot_eager"):
    """n_steps of forward + NCECriterion + backward; (loss, grad) per step."""
    crit = NCECriterion(N)

    def step(x, y, idx):
        return crit(module(x, y, idx), y)

    fn = torch.compile(step, fullgraph=True, backend=compile_backend) if compiled else step
    out = []
    for s in range(n_steps):
        x, y, idx = _inputs(seed=s)
        x.requires_grad_()
        loss = fn(x, y, idx)
        loss.backward()
        out.append((loss.detach(), x.grad))
    return out


def _assert_same_run(eager_module, eager, compiled_module, compiled):
    for (le, ge), (lc, gc) in zip(eager, compiled):
        torch.testing.assert_close(lc, le, rtol=1e-6, atol=0)     # eager fuses the criterion: other rounding
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(compiled_module.memory, eager_module.memory, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(compiled_module.params, eager_module.params, rtol=1e-6, atol=0)


@pytest.mark.parametrize("Z", [None, 2.5])          # None: Z estimated on the first batch, stored in params
def test_compiled_step_equals_eager(Z, capsys):
    me, mc = _module(Z, "cpu"), _module(Z, "cpu")
    eager = _steps(me, compiled=False)
    compiled = _steps(mc, compiled=True)
    _assert_same_run(me, eager, mc, compiled)
    assert not torch.equal(mc.memory, _module(Z, "cpu").memory)          # the steps did update the bank
    if Z is None:
        assert mc.params[2] > 0 and capsys.readouterr().out.count("normalization constant Z is set") == 2


@pytest.mark.skipif(not _backend.triton_interpreting(), reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
def test_compiled_step_equals_eager_triton():
    pytest.importorskip("instdisc_kernels.ops.nce_probs_triton", reason="triton is not installed")
    me, mc = _module(2.5, "triton"), _module(2.5, "triton")
    _assert_same_run(me, _steps(me, compiled=False, n_steps=1), mc, _steps(mc, compiled=True, n_steps=1))


@pytest.mark.slow
def test_compiled_step_equals_eager_inductor():
    me, mc = _module(None, "cpu"), _module(None, "cpu")
    _assert_same_run(me, _steps(me, compiled=False), mc, _steps(mc, compiled=True, compile_backend="inductor"))


def test_compiled_bank_change_before_backward_is_an_error():
    """Two forwards, then the first backward moves the rows the second read: an error, not a stale gradient."""
    m = _module(2.5, "cpu")
    crit = NCECriterion(N)
    fn = torch.compile(lambda x, y, idx: crit(m(x, y, idx), y), fullgraph=True, backend="aot_eager")
    x, y, idx = _inputs()
    l1, l2 = fn(x.clone().requires_grad_(), y, idx), fn(x.clone().requires_grad_(), y, idx)
    l1.backward()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        l2.backward()


def _op_args(z):
    x, y, idx = _inputs()
    idx[:, 0] = y
    mem = Fn.normalize(torch.randn(N, D, generator=torch.Generator().manual_seed(5)), dim=1)
    params = torch.tensor([float(K), T, z, 0.5])
    return x, y, mem, idx, params


@pytest.mark.parametrize("z", [2.5, -1.0])
def test_opcheck_traced_path_ops(z):
    x, y, mem, idx, params = _op_args(z)
    torch.library.opcheck(OPS.nce_average_forward.default, (x.clone().requires_grad_(), y, mem, idx, params, "cpu"))
    probs, z_out, tm = OPS.nce_average_forward(x, y, mem, idx, params, "cpu")     # the backward op's inputs
    gp = torch.randn(probs.shape, generator=torch.Generator().manual_seed(2))
    torch.library.opcheck(OPS.nce_average_backward.default, (gp, probs, x, y, mem, idx, tm, "cpu"))
    torch.library.opcheck(OPS.nce_average_set_z_.default, (params.clone(), z_out))


def test_traced_path_ops_values():
    """The ops' values: P and dF as nce_probs / nce_probs_backward, the rows y updated, Z stored once."""
    x, y, mem, idx, params = _op_args(-1.0)
    probs, z_out, tm = OPS.nce_average_forward(x, y, mem, idx, params, "cpu")
    want_p, want_z = OPS.nce_probs(x, mem, idx, torch.tensor([-1.0]), T)
    assert torch.equal(probs, want_p) and torch.equal(z_out, want_z)
    assert tm.tolist() == pytest.approx([T, 0.5])
    OPS.nce_average_set_z_(params, z_out)
    assert params[2].item() == pytest.approx(z_out.item())
    gp = torch.randn(probs.shape, generator=torch.Generator().manual_seed(2))
    bank = mem.clone()
    grad = OPS.nce_average_backward(gp, probs, x, y, bank, idx, tm, "cpu")
    torch.testing.assert_close(grad, OPS.nce_probs_backward(gp, probs, mem, idx, T), rtol=0, atol=0)
    rows = Fn.normalize(0.5 * mem[[4, 17]] + 0.5 * x[[2, 1]], dim=1)      # the last occurrence of 4 wins
    torch.testing.assert_close(bank[[4, 17]], rows, rtol=1e-6, atol=1e-7)
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[[4, 17]] = False
    assert torch.equal(bank[untouched], mem[untouched])

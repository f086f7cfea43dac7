"""Backend choice (instdisc_kernels/_backend.py, docs/backends.md): one vocabulary for every op,
"auto", the deprecated "reference", the error for a backend an op cannot run, and the bank
update's backend after a loss."""
import re
import warnings

import pytest
import torch

import instdisc_kernels as ik
from instdisc_kernels import _backend
from instdisc_kernels import reference as ref
from instdisc_kernels.ops import bank_update, knn, nce, nce_probs, nce_shared, softmax

CPU = torch.device("cpu")
T = 0.2
N, D, B, K = 23, 100, 3, 5          # D = 100, a repeated index, K and B odd


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _problem():
    mem = _unit(N, D, 0).float()
    x = _unit(B, D, 1).float()
    y = torch.tensor([4, 17, 4])
    neg = torch.randint(0, N, (B, K), generator=torch.Generator().manual_seed(2))
    return mem, x, y, neg


# Each op: run(backend) -> tensors to compare, and the float64 oracle's values for them.
def _nce(backend):
    mem, x, y, neg = _problem()
    x.requires_grad_()
    loss = ik.nce_loss(x, mem, y, neg_indices=neg, temperature=T, z=2.0, update_memory=False, backend=backend)
    loss.backward()
    return loss.detach(), x.grad


def _nce_oracle():
    mem, x, y, neg = _problem()
    loss, grad, _ = ref.nce_forward(x.double(), mem.double(), y, neg, temperature=T, z=2.0)
    return loss, grad


def _shared(backend):
    mem, x, y, neg = _problem()
    x.requires_grad_()
    loss = ik.nce_loss(x, mem, y, neg_indices=neg[0], negatives="shared", temperature=T, z=2.0,
                       update_memory=False, backend=backend)
    loss.backward()
    return loss.detach(), x.grad


def _shared_oracle():
    mem, x, y, neg = _problem()
    loss, grad, _ = ref.shared_nce_forward(x.double(), mem.double(), y, neg[0], temperature=T, z=2.0)
    return loss, grad


def _softmax(backend):
    mem, x, y, _ = _problem()
    x.requires_grad_()
    loss = ik.nonparametric_softmax_loss(x, mem, y, temperature=T, update_memory=False, backend=backend)
    loss.backward()
    return loss.detach(), x.grad


def _softmax_oracle():
    mem, x, y, _ = _problem()
    return ref.softmax_loss_value(x.double(), mem.double(), y, T), ref.softmax_grad(x.double(), mem.double(), y, T)


def _probs(backend):
    mem, x, y, neg = _problem()
    lem = ik.NCEAverage(D, N, K, T=T, Z=2.0, backend=backend)
    lem.memory.copy_(mem)
    with torch.no_grad():
        return (lem(x, y, torch.cat([y.view(-1, 1), neg], 1)),)


def _probs_oracle():
    mem, x, y, neg = _problem()
    return (ref.nce_probs(x.double(), mem.double(), ref.index_matrix(y, neg), T, 2.0),)


def _knn(backend):
    mem, x, _, _ = _problem()
    labels = torch.arange(N) % 4
    return (ik.knn_predict(x, mem, labels, k=7, temperature=T, num_classes=4, backend=backend),)


def _knn_oracle():
    mem, x, _, _ = _problem()
    return (ref.knn_scores(x.double(), mem.double(), torch.arange(N) % 4, 7, T, 4),)


def _search(backend):
    mem, x, _, _ = _problem()
    return ik.knn_search(x, mem, 7, backend=backend)


def _search_oracle():
    mem, x, _, _ = _problem()
    return ref.knn_topk(x, mem, 7)


def _update(backend):
    mem, x, y, _ = _problem()
    ik.bank_update_(mem, y, x, 0.5, backend=backend)
    return (mem,)


def _update_oracle():
    mem, x, y, _ = _problem()
    out = mem.double()
    ref.memory_update_(out, y, x.double(), 0.5)
    return (out,)


HAS_CPP = _backend.extension_loaded()
# op -> (table, public name in messages, run, oracle, what "auto" picks on CPU)
OPS = {
    "nce": (nce.TABLE, "nce_loss", _nce, _nce_oracle, "cpu" if HAS_CPP else "eager"),
    "nce_shared": (nce_shared.TABLE, "nce_loss(negatives='shared')", _shared, _shared_oracle,
                   "cpu" if HAS_CPP else "eager"),
    "softmax": (softmax.TABLE, "nonparametric_softmax_loss", _softmax, _softmax_oracle, "cpu" if HAS_CPP else "eager"),
    "nce_probs": (nce_probs.TABLE, "NCEAverage", _probs, _probs_oracle, "cpu" if HAS_CPP else "eager"),
    "knn": (knn.TABLE, "knn_predict", _knn, _knn_oracle, "cpu" if knn._CPU_FAST else "eager"),
    "knn_search": (knn.TABLE, "knn_search", _search, _search_oracle, "cpu" if knn._CPU_FAST else "eager"),
    "bank_update": (bank_update.TABLE, "bank_update_", _update, _update_oracle, "cpu" if HAS_CPP else "eager"),
}


@pytest.fixture
def chosen(monkeypatch):
    """[(op name, backend asked, backend picked)] of every _backend.select call."""
    calls = []
    real = _backend.select

    def spy(table, backend, device, op=None):
        be = real(table, backend, device, op=op)
        calls.append((table.op, backend, be))
        return be
    monkeypatch.setattr(_backend, "select", spy)
    return calls


@pytest.mark.parametrize("op", OPS)
def test_auto_on_cpu(op, chosen):
    table, _, run, _, want = OPS[op]
    assert table.select("auto", CPU) == want
    # the kNN without AVX512-BF16 runs eager; every other op with a C++ kernel picks it ("cpu")
    assert want == ("cpu" if "cpu" in table.impls and table.impls["cpu"].auto and HAS_CPP else "eager")
    chosen.clear()
    run("auto")
    assert (table.op, "auto", want) in chosen


@pytest.mark.parametrize("op", OPS)
def test_eager_matches_float64_oracle(op):
    _, _, run, oracle, _ = OPS[op]
    got, want = run("eager"), oracle()
    for g, w in zip(got, want):
        if g.dtype == torch.int64:
            assert torch.equal(g, w)
        else:
            torch.testing.assert_close(g.double(), w.double(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("op", OPS)
def test_reference_is_eager_with_a_deprecation_warning(op):
    _, _, run, _, _ = OPS[op]
    with pytest.warns(DeprecationWarning, match="backend='reference' is deprecated.*use backend='eager'") as rec:
        old = run("reference")
    # stacklevel: the warning points at the caller's line (this file), not at the library
    assert {w.filename for w in rec if "backend='reference'" in str(w.message)} == {__file__}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)      # "eager" itself does not warn
        new = run("eager")
    for a, b in zip(old, new):
        assert torch.equal(a, b)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("word", ["fused", "chunked", "Eager", "gpu"])
def test_unknown_backend_is_the_same_error_everywhere(op, word):
    _, _, run, _, _ = OPS[op]
    msg = f"backend must be one of ('auto', 'eager', 'cpu', 'triton', 'cuda'), got '{word}'"
    with pytest.raises(ValueError, match=re.escape(msg)):
        run(word)


# op -> (backend it cannot run on CPU tensors, what the message says is needed)
UNAVAILABLE = {
    "nce": [("cuda", "needs CUDA tensors")],
    "nce_shared": [("cuda", "this op has no CUDA C++ kernel")],
    "softmax": [("cuda", "this op has no CUDA C++ kernel")],
    "nce_probs": [("cuda", "needs CUDA tensors")],
    "knn": [("cuda", "this op has no CUDA C++ kernel"), ("triton", "this op has no Triton kernel")],
    "knn_search": [("cuda", "this op has no CUDA C++ kernel"), ("triton", "this op has no Triton kernel")],
    "bank_update": [("cuda", "needs CUDA tensors")],
}


@pytest.mark.parametrize("op,backend,need", [(op, b, n) for op, cases in UNAVAILABLE.items() for b, n in cases])
def test_unavailable_backend_is_the_same_error_everywhere(op, backend, need):
    _, name, run, _, _ = OPS[op]
    with pytest.raises(ValueError) as e:
        run(backend)
    msg = str(e.value)
    assert msg.startswith(f"backend={backend!r} is not available for {name} on device cpu: "), msg
    assert need in msg
    if "has no" in need:               # the op has no such kernel: nothing about a missing build
        assert "extension" not in msg and "INSTDISC_BUILD_CUDA" not in msg


def test_an_unavailable_backend_leaves_the_bank_unchanged():
    mem, x, y, neg = _problem()
    mem0 = mem.clone()
    for call in (lambda: ik.nce_loss(x, mem, y, neg_indices=neg, backend="cuda"),
                 lambda: ik.nonparametric_softmax_loss(x, mem, y, backend="cuda"),
                 lambda: ik.nce_loss(x, mem, y, neg_indices=neg[0], negatives="shared", backend="cuda"),
                 lambda: ik.bank_update_(mem, y, x, backend="cuda")):
        with pytest.raises(ValueError, match="is not available"):
            call()
        assert torch.equal(mem, mem0)


def test_every_table_has_eager_and_only_known_backends():
    for table, *_ in OPS.values():
        assert "eager" in table.impls and set(table.impls) <= set(_backend.BACKENDS[1:])
    with pytest.raises(ValueError, match="must include 'eager'"):
        _backend.OpTable("x", cpu=_backend.Impl(None, "nowhere"))


def test_auto_on_cuda_follows_cuda_preference_then_eager(monkeypatch):
    # no GPU needed: the choice reads only the registry and whether triton imports
    cuda = torch.device("cuda")
    assert _backend.auto_order(cuda) == _backend.CUDA_PREFERENCE + ("eager",)
    assert _backend.auto_order(CPU) == ("cpu", "eager")
    monkeypatch.setattr(_backend, "_TRITON_IMPORTABLE", False)
    # without Triton the softmax falls to its chunked eager pass (never the B x N logits)
    assert softmax.TABLE.select("auto", cuda) == "eager"
    assert softmax.TABLE["eager"] is torch.ops.instdisc.softmax_forward_chunked
    assert knn.TABLE.select("auto", cuda) == "eager"
    with pytest.raises(ValueError, match=r"backend='cuda' is not available for nonparametric_softmax_loss on "
                                         r"device cuda: this op has no CUDA C\+\+ kernel"):
        softmax.TABLE.select("cuda", cuda)
    with pytest.raises(ValueError, match="needs triton installed"):
        nce.TABLE.select("triton", cuda)


def _bank_choice(chosen):
    return [be for op, _, be in chosen if op == "bank_update_"][-1]


@pytest.mark.parametrize("loss_backend,bank", [("eager", "eager"), ("auto", "auto"), ("reference", "eager")]
                         + ([("cpu", "cpu")] if HAS_CPP else []))
def test_bank_update_after_a_loss_follows_the_loss_backend(chosen, loss_backend, bank):
    want = bank_update.TABLE.select("auto", CPU) if bank == "auto" else bank
    mem, x, y, neg = _problem()
    calls = [lambda be: ik.nce_loss(x, mem, y, neg_indices=neg, backend=be),
             lambda be: ik.InstDiscLoss(N, D, num_negatives=K, backend=be)(x, y)]
    # "cpu" for these three: their eager path (deprecated spelling), the bank update still on cpu
    calls += [lambda be: ik.nonparametric_softmax_loss(x, mem, y, backend=be),
              lambda be: ik.nce_loss(x, mem, y, neg_indices=neg[0], negatives="shared", backend=be),
              lambda be: ik.InstDiscLoss(N, D, num_negatives=0, backend=be)(x, y)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for call in calls:
            chosen.clear()
            call(loss_backend)
            assert _bank_choice(chosen) == want, chosen
        chosen.clear()                  # the drop-in: the update runs in backward
        lem = ik.NCEAverage(D, N, K, T=T, Z=2.0, backend=loss_backend)
        xg = x.clone().requires_grad_()
        lem(xg, y).sum().backward()
        assert _bank_choice(chosen) == want, chosen


def test_bank_update_after_linear_average_and_an_unavailable_name(chosen):
    _, x, y, _ = _problem()
    lin = ik.LinearAverage(D, N, T=T)
    xg = x.clone().requires_grad_()
    lin(xg, y).sum().backward()                     # no backend choice: the update's own "auto"
    assert _bank_choice(chosen) == bank_update.TABLE.select("auto", CPU)
    # a backend the update cannot run here falls to its "auto"; one it can run is kept
    assert bank_update.backend_after_loss("cuda", CPU) == bank_update.TABLE.select("auto", CPU)
    assert bank_update.backend_after_loss("eager", CPU) == "eager"


def test_modules_warn_once_at_construction_and_store_eager():
    for make in (lambda: ik.InstDiscLoss(N, D, num_negatives=K, backend="reference"),
                 lambda: ik.NCEAverage(D, N, K, T=T, backend="reference")):
        with pytest.warns(DeprecationWarning, match="backend='reference' is deprecated") as rec:
            module = make()
        assert [w.filename for w in rec if "backend='reference'" in str(w.message)] == [__file__]
        assert module.backend == "eager"
    with pytest.raises(ValueError, match=re.escape("backend must be one of ('auto', 'eager', 'cpu', 'triton', "
                                                   "'cuda'), got 'fused'")):
        ik.InstDiscLoss(N, D, backend="fused")


def test_softmax_cpu_backend_is_the_cpp_tile_step_and_auto_picks_it():
    # the softmax's "cpu" backend (its chunks' softmax step in C++) once aliased its chunked ATen
    # path with a DeprecationWarning; it is a backend of its own now, which "auto" picks on CPU
    mem, x, y, neg = _problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        got = ik.nonparametric_softmax_loss(x, mem.clone(), y, backend="cpu")
    want = ik.nonparametric_softmax_loss(x, mem.clone(), y, backend="eager")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert softmax.TABLE.select("auto", CPU) == ("cpu" if HAS_CPP else "eager")

"""Every operator of the instdisc library is fully registered: it has a fake (meta)
kernel and passes torch.library.opcheck (schema, fake tensor, autograd registration and
AOT dispatch tests) on CPU tensors.

The C++ operators are enumerated from the schemas in csrc/ (``m.def(...)``), so an operator
added there without a case here fails ``test_every_op_has_a_case``; every other registered
``torch.ops.instdisc`` operator (the Python custom ops) must have a fake kernel and either a
case here or an opcheck in the test file named in OPCHECKED_ELSEWHERE. Arguments are built
by the schema's argument names, so the cases do not depend on the argument order (nor
on an argument, such as knn_topk's ``portable`` flag, that a schema no longer has).
"""
import pathlib
import re

import pytest
import torch
import torch.nn.functional as Fn

from instdisc_kernels import (
    _backend,
    lemniscate,  # noqa: F401  (registers the NCEAverage ops)
)
from instdisc_kernels.ops import bank_update, knn, nce, nce_probs, nce_shared, softmax  # noqa: F401  (register the ops)

if not _backend.extension_loaded():
    pytest.skip("the C++ extension (instdisc_kernels._C) is not built", allow_module_level=True)

ROOT = pathlib.Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
# Capability queries: no tensor in or out, so nothing to fake or trace.
QUERIES = {"cpu_capability"}


def _schemas():
    """{op name: schema text} of every ``m.def("...")`` in csrc/ (string literals joined)."""
    out = {}
    for path in sorted(CSRC.rglob("*")):
        if path.suffix not in (".cpp", ".cu", ".h", ".cuh"):
            continue
        for m in re.finditer(r'\bm\.def\(\s*((?:"(?:[^"\\]|\\.)*"\s*)+)', path.read_text()):
            text = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', m.group(1)))
            out[text.split("(", 1)[0].strip()] = text
    return out


SCHEMAS = _schemas()
REGISTERED = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("instdisc::"))
# Python custom ops opcheck'd in their own test files.
OPCHECKED_ELSEWHERE = {
    "nce_forward_eager": ["test_nce_api.py"],
    "nce_forward_triton": ["test_nce_api.py", "test_nce_triton.py"],
    "nce_probs_triton": ["test_nce_triton.py"],
    "nce_probs_backward_triton": ["test_nce_triton.py"],
    "bank_update_triton_": ["test_nce_triton.py"],
    "nce_shared_forward_chunked": ["test_nce_shared.py"],
    "nce_shared_forward_cpu": ["test_nce_shared.py"],
    "nce_shared_forward_triton": ["test_nce_shared.py"],
    "softmax_forward_chunked": ["test_softmax.py"],
    "softmax_forward_cpu": ["test_softmax.py"],
    "softmax_forward_triton": ["test_softmax.py"],
    "nce_average_forward": ["test_nce_probs_registration.py"],
    "nce_average_backward": ["test_nce_probs_registration.py"],
    "nce_average_set_z_": ["test_nce_probs_registration.py"],
}


def _problem(B=3, K=4, D=8, N=13, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = Fn.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1).to(dtype)
    V = Fn.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1).to(dtype)
    y = torch.randint(0, N, (B,), generator=g)
    neg = torch.randint(0, N, (B, K), generator=g)
    return F, V, y, neg


def _nce_forward(dtype, drawn, loss_type):
    F, V, y, neg = _problem(dtype=dtype)
    return {"features": F.requires_grad_(), "memory": V, "indices": y, "neg_indices": None if drawn else neg,
                "z": torch.tensor([0.0]), "seed": torch.tensor([7]), "num_negatives": neg.shape[1], "temperature": 0.5,
                "proximal": 0.1, "loss_type": loss_type, "z_ema": 0.0, "exclude_positive": drawn, "noise_probs": None}


def _probs_args(dtype, z, grad=False):
    F, V, y, neg = _problem(dtype=dtype)
    return {"features": F.requires_grad_(grad), "memory": V, "idx": torch.cat([y[:, None], neg], 1),
                "z": torch.tensor([z]), "temperature": 0.5}


def _probs_backward(dtype):
    a = _probs_args(dtype, 2.0)
    P, _ = torch.ops.instdisc.nce_probs(a["features"], a["memory"], a["idx"], a["z"], 0.5)
    g = torch.randn(P.shape, generator=torch.Generator().manual_seed(1), dtype=P.dtype)
    return {"grad_probs": g, "probs": P, "memory": a["memory"], "idx": a["idx"], "temperature": 0.5}


def _bank_update(dtype):
    F, V, y, _ = _problem(dtype=dtype)
    return {"memory": V.clone(), "indices": torch.cat([y, y[:1]]), "features": torch.cat([F, F[:1]]).float(),
                "momentum": 0.5}


def _knn(qdtype, bdtype):
    F, V, _, _ = _problem(B=5, N=40, D=12)
    return {"queries": F.to(qdtype), "bank": V.to(bdtype), "k": 7, "chunk_size": 16, "portable": False}


def _tile(B=3, n=11, dtype=torch.float32):
    return (torch.randn(B, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 5).to(dtype)


CASES = {  # op name -> [(case id, () -> {argument name: value})]
    "nce_shared_tile_nce_": [("fp32", lambda: {"scores": _tile()}), ("fp64", lambda: {"scores": _tile(dtype=torch.float64)})],
    "nce_shared_tile_lse": [("fp32", lambda: {"scores": _tile()}), ("fp64", lambda: {"scores": _tile(dtype=torch.float64)})],
    "nce_shared_tile_softmax_": [("fp32", lambda: {"scores": _tile(), "row_max": torch.full((3,), float("-inf")),
                                                   "row_sum": torch.zeros(3)})],
    "bank_update_": [("fp32", lambda: _bank_update(torch.float32)), ("fp64", lambda: _bank_update(torch.float64))],
    "bank_update_eager_": [("fp32", lambda: _bank_update(torch.float32))],
    "nce_forward": [("nce-neg", lambda: _nce_forward(torch.float32, False, 0)),
                    ("infonce-drawn", lambda: _nce_forward(torch.float32, True, 1)),
                    ("nce-fp64-drawn", lambda: _nce_forward(torch.float64, True, 0))],
    "nce_probs": [("z-fixed", lambda: _probs_args(torch.float32, 2.0)),
                  ("z-estimated", lambda: _probs_args(torch.float32, 0.0)),
                  ("fp64", lambda: _probs_args(torch.float64, -1.0))],
    "nce_probs_backward": [("fp32", lambda: _probs_backward(torch.float32)),
                           ("fp64", lambda: _probs_backward(torch.float64))],
    "nce_probs_loss": [("z-fixed", lambda: _probs_args(torch.float32, 2.0)),
                       ("fp64-z-estimated", lambda: _probs_args(torch.float64, 0.0))],
    "nce_shared_nce_pass": [("fp32", lambda: {"features": _problem(N=40)[0], "rows": _problem(N=40)[1],
                                              "bias": torch.full((40,), -3.0), "index": None,
                                              "round_bf16": False}),
                            ("index-round-bf16", lambda: {"features": _problem(N=40)[0], "rows": _problem(N=40)[1],
                                                          "bias": torch.full((7,), -3.0),
                                                          "index": torch.tensor([3, 0, 39, 3, 12, 5, 6]),
                                                          "round_bf16": True})],
    "nce_shared_lse_pass": [("bf16-rows", lambda: {"features": _problem(N=40)[0],
                                                   "rows": _problem(N=40)[1].bfloat16(), "index": None,
                                                   "round_bf16": False}),
                            ("index", lambda: {"features": _problem(N=40)[0], "rows": _problem(N=40)[1],
                                               "index": torch.tensor([1, 1, 38]), "round_bf16": False})],
    "softmax_online_state": [("fp32", lambda: {"features": _problem(N=40)[0], "bank": _problem(N=40)[1],
                                               "index": None, "round_bf16": False}),
                             ("bf16-bank", lambda: {"features": _problem(N=40)[0],
                                                    "bank": _problem(N=40)[1].bfloat16(), "index": None,
                                                    "round_bf16": False}),
                             ("index-round-bf16", lambda: {"features": _problem(N=40)[0], "bank": _problem(N=40)[1],
                                                           "index": torch.tensor([9, 2, 2]), "round_bf16": True})],
    "knn_topk": [("fp32", lambda: _knn(torch.float32, torch.float32)),
                 ("fp64-bf16", lambda: _knn(torch.float64, torch.bfloat16))],
}
PARAMS = [pytest.param(op, make, id=f"{op}-{cid}") for op, cases in CASES.items() for cid, make in cases]


def _op(name):
    return getattr(torch.ops.instdisc, name).default


def _args(name, values):
    """Positional arguments in the order of the registered schema, by argument name."""
    schema = _op(name)._schema
    missing = [a.name for a in schema.arguments if a.name not in values]
    assert not missing, f"the {name} case has no value for the schema arguments {missing} ({schema})"
    return tuple(values[a.name] for a in schema.arguments)


def test_schemas_are_found():
    assert {"bank_update_", "nce_forward", "nce_probs", "nce_probs_backward", "knn_topk"} <= set(SCHEMAS)


def test_every_op_has_a_case():
    missing = sorted(set(SCHEMAS) - QUERIES - set(CASES))
    assert not missing, f"operators defined in csrc/ without a registration case here: {missing}"
    assert not set(CASES) - set(REGISTERED), "a case names an operator that is no longer registered"


def test_every_registered_op_is_opchecked():
    missing = sorted(set(REGISTERED) - QUERIES - set(CASES) - set(OPCHECKED_ELSEWHERE))
    assert not missing, f"registered operators without an opcheck case: {missing}"
    for name, files in OPCHECKED_ELSEWHERE.items():
        if name in REGISTERED:
            text = "".join(next((ROOT / "python_tests").rglob(f)).read_text() for f in files)
            assert "opcheck" in text and name in text, f"{name}: no opcheck in {files}"


@pytest.mark.parametrize("name", sorted(set(REGISTERED) - QUERIES))
def test_every_op_has_a_fake_kernel(name):
    entry = torch._library.simple_registry.singleton.find(f"instdisc::{name}")
    assert entry.fake_impl.kernel is not None, f"instdisc::{name} has no fake kernel (torch.library.register_fake)"
    if name in SCHEMAS:
        assert _backend.has_kernel(name, "CPU"), f"instdisc::{name} has no CPU kernel"


@pytest.mark.parametrize("name,make", PARAMS)
def test_opcheck(name, make):
    torch.library.opcheck(_op(name), _args(name, make()))


def _outputs(out):
    return () if out is None else out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name,make", PARAMS)
def test_fake_kernel_matches_the_cpu_kernel(name, make):
    """The fake's shapes and dtypes are the real outputs' (opcheck checks this too; here explicitly)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    args = _args(name, make())
    real = _op(name)(*[a.clone() if isinstance(a, torch.Tensor) else a for a in args])
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = _op(name)(*fake_args)
    real, fake = _outputs(real), _outputs(fake)
    assert len(real) == len(fake)
    assert len(real) == len(_op(name)._schema.returns)
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype) == (f.shape, f.dtype), name

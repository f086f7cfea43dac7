"""Per op: its inputs, and one training/evaluation step per provider.

A step is a callable with no arguments doing the whole unit of work the
providers are compared on:
  nce / softmax: draw (NCE), loss, backward to the features, bank update;
  knn: weighted-kNN top-1/top-5 over all queries;
  bank_update: the momentum update of B rows.
Fused steps call the public functions with validate=False (the baselines
validate nothing either).
"""
from __future__ import annotations

import functools

import bench_lemniscate
import bench_peers
import torch
from bench_baselines import (
    bank_update_eager,
    knn_batch_scores_fn,
    knn_eager,
    nce_loss_fn,
    nce_shared_step_eager,
    nce_step_eager,
    search_eager,
    softmax_loss_fn,
    softmax_step_eager,
    updated_rows_fn,
)
from bench_cases import KNN_OPS, MOMENTUM, is_peer, split_provider

import instdisc_kernels as ik
from instdisc_kernels import hugepages


def _unit_rows(n, d, device, dtype=torch.float32):
    x = torch.randn(n, d, device=device)
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)


_BANK = {}


def bank(N, D, dtype, device):
    """A unit-row bank, cached (one at a time: the ImageNet-size one is 656 MB in fp32), allocated
    like MemoryBank's (on CPU on 2 MiB pages where the OS allows it)."""
    key = (N, D, dtype, str(device))
    if key not in _BANK:
        _BANK.clear()
        _BANK[key] = hugepages.empty_rows(N, D, dtype=dtype, device=device).copy_(_unit_rows(N, D, device, dtype))
    return _BANK[key]


def small_page_copy(memory):
    """The same bank on ordinary pages (torch's allocator), for the fused-cpu+4k provider."""
    out = torch.empty_like(memory)
    return out.copy_(memory)


def _clustered(n, centres, labels, device, spread=1.0):
    """Unit rows near their class centre: normalize(centre + spread * a random unit vector)
    (cosine about 0.7 to the centre), what learned features look like to a search."""
    return torch.nn.functional.normalize(centres[labels] + spread * _unit_rows(n, centres.shape[1], device), dim=1)


def _knn_inputs(case, device):
    qlab = torch.randint(0, case.classes, (case.B,), device=device)
    if case.data == "random":
        return dict(memory=bank(case.N, case.D, case.torch_dtype, device), queries=_unit_rows(case.B, case.D, device),
                    query_labels=qlab, bank_labels=torch.randint(0, case.classes, (case.N,), device=device))
    _BANK.clear()
    centres = _unit_rows(case.classes, case.D, device)
    blab = torch.randint(0, case.classes, (case.N,), device=device)
    return dict(memory=_clustered(case.N, centres, blab, device).to(case.torch_dtype),
                queries=_clustered(case.B, centres, qlab, device), query_labels=qlab, bank_labels=blab)


def inputs(case, device):
    if case.op in KNN_OPS:
        return _knn_inputs(case, device)
    g = {"memory": bank(case.N, case.D, case.torch_dtype, device)}
    g["x"] = _unit_rows(case.B, case.D, device).requires_grad_(case.op != "bank_update")
    g["y"] = torch.randperm(case.N, device=device)[:case.B]
    if case.op in ("nce", "nce_shared", "lemniscate_nce"):   # a fixed Z, as lemniscate keeps after its first batch
        idx = torch.randint(0, case.N, (case.B, 64), device=device)
        s = torch.einsum("bkd,bd->bk", g["memory"][idx].float(), g["x"].detach())
        g["z"] = float(case.N * torch.exp(s / case.temperature).mean())
    return g


# --------------------------------------------------------------------------- #
# Availability of a library backend: a tiny call                               #
# --------------------------------------------------------------------------- #
def tiny_call(op, backend, device):
    """Calls ``op`` on tiny inputs with ``backend``; raises ValueError("... not available ...")."""
    N, B, D = 64, 4, 128
    mem = _unit_rows(N, D, device)
    x = _unit_rows(B, D, device)
    y = torch.arange(B, device=device)
    if op == "nce":
        ik.nce_loss(x, mem, y, num_negatives=8, temperature=0.1, backend=backend)
    elif op == "nce_shared":
        ik.nce_loss(x, mem, y, num_negatives=8, temperature=0.1, backend=backend, negatives="shared")
    elif op == "softmax":
        ik.nonparametric_softmax_loss(x, mem, y, temperature=0.1, backend=backend)
    elif op == "lemniscate_nce":
        ik.NCEAverage(D, N, 8, T=0.1, Z=1.0, backend=backend).to(device)(x, y)
    elif op == "lemniscate_linear":
        ik.LinearAverage(D, N).to(device)(x, y)
    elif op == "knn":
        ik.knn_predict(x, mem, torch.arange(N, device=device) % 3, k=5, temperature=0.1, backend=backend)
    elif op == "knn_search":
        ik.knn_search(x, mem, 5, backend=backend)
    else:
        ik.bank_update_(mem, y, x, backend=backend)


# --------------------------------------------------------------------------- #
# Steps                                                                        #
# --------------------------------------------------------------------------- #
def _sync(device):
    if device.type == "cuda":
        return functools.partial(torch.cuda.synchronize, device)
    return lambda: None


@functools.lru_cache(None)
def compiled(name):
    """One torch.compile object per baseline function, shared by all cases (dynamo
    recompiles per dtype and once more with dynamic shapes)."""
    fn = {"nce": nce_loss_fn, "softmax": softmax_loss_fn, "knn": knn_batch_scores_fn,
          "rows": updated_rows_fn}[name]
    return torch.compile(fn)


def _compiled_update(memory, y, x):
    with torch.no_grad():
        new = compiled("rows")(torch.index_select(memory, 0, y), x, MOMENTUM)
        memory.index_copy_(0, y, new.to(memory.dtype))


def step(case, provider, g, device):
    sync = _sync(device)
    T, m = case.temperature, MOMENTUM
    mem = g["memory"]
    if case.op.startswith("lemniscate_"):
        return bench_lemniscate.step(case, provider, g, m, sync)
    if provider == "eager":
        return _eager_step(case, g, sync)
    if provider == "compile":
        return _compiled_step(case, g, sync)
    if is_peer(provider):
        return bench_peers.step(case, provider, g, device)
    be, variant = split_provider(provider)
    precision = "bf16" if variant == "bf16" else "fp32"
    if variant == "4k":
        mem = small_page_copy(mem)
    if case.op in ("nce", "nce_shared"):
        x, y, K, z = g["x"], g["y"], case.K, g["z"]
        shared = dict(negatives="shared", precision=precision) if case.op == "nce_shared" else {}

        def run():
            x.grad = None
            ik.nce_loss(x, mem, y, num_negatives=K, temperature=T, z=z, momentum=m, validate=False,
                        backend=be, **shared).backward()
            sync()
    elif case.op == "softmax":
        x, y = g["x"], g["y"]

        def run():
            x.grad = None
            ik.nonparametric_softmax_loss(x, mem, y, temperature=T, momentum=m, validate=False,
                                          backend=be, precision=precision).backward()
            sync()
    elif case.op == "knn":
        def run():
            ik.knn_accuracy(g["queries"], g["query_labels"], mem, g["bank_labels"], k=case.K, temperature=T,
                            num_classes=case.classes, validate=False, backend=be)
            sync()
    elif case.op == "knn_search":
        def run():
            ik.knn_search(g["queries"], mem, case.K, validate=False, backend=be)
            sync()
    else:
        x, y = g["x"], g["y"]

        def run():
            ik.bank_update_(mem, y, x, m, validate=False, backend=be)
            sync()
    return run


def _eager_step(case, g, sync):
    T, m, mem = case.temperature, MOMENTUM, g["memory"]
    if case.op == "nce":
        return lambda: (nce_step_eager(g["x"], mem, g["y"], case.K, T, g["z"], m), sync())
    if case.op == "nce_shared":
        return lambda: (nce_shared_step_eager(g["x"], mem, g["y"], case.K, T, g["z"], m), sync())
    if case.op == "softmax":
        return lambda: (softmax_step_eager(g["x"], mem, g["y"], T, m), sync())
    if case.op == "knn":
        return lambda: (knn_eager(g["queries"], g["query_labels"], mem, g["bank_labels"], case.K, T,
                                  case.classes), sync())
    if case.op == "knn_search":
        return lambda: (search_eager(g["queries"], mem, case.K), sync())
    return lambda: (bank_update_eager(mem, g["y"], g["x"], m), sync())


def _compiled_step(case, g, sync):
    T, mem = case.temperature, g["memory"]
    x = g.get("x")
    if case.op == "nce":
        z = torch.tensor(g["z"], device=mem.device)     # a tensor: no recompile per Z value

        def run():
            x.grad = None
            compiled("nce")(x, mem, g["y"], case.K, T, z).backward()
            _compiled_update(mem, g["y"], x)
            sync()
    elif case.op == "softmax":
        def run():
            x.grad = None
            compiled("softmax")(x, mem, g["y"], T).backward()
            _compiled_update(mem, g["y"], x)
            sync()
    elif case.op == "knn":
        def run():
            knn_eager(g["queries"], g["query_labels"], mem, g["bank_labels"], case.K, T, case.classes,
                      scores_fn=compiled("knn"))
            sync()
    else:
        def run():
            _compiled_update(mem, g["y"], x)
            sync()
    return run

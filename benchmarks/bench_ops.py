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

import torch

import bench_lemniscate
import instdisc_kernels as ik
from bench_baselines import (bank_update_eager, knn_batch_scores_fn, knn_eager, nce_loss_fn,
                             nce_step_eager, softmax_loss_fn, softmax_step_eager, updated_rows_fn)
from bench_cases import MOMENTUM, split_provider


def _unit_rows(n, d, device, dtype=torch.float32):
    x = torch.randn(n, d, device=device)
    return (x / x.norm(dim=1, keepdim=True)).to(dtype)


_BANK = {}


def bank(N, D, dtype, device):
    """A unit-row bank, cached (one at a time: the ImageNet-size one is 656 MB in fp32)."""
    key = (N, D, dtype, str(device))
    if key not in _BANK:
        _BANK.clear()
        _BANK[key] = _unit_rows(N, D, device, dtype)
    return _BANK[key]


def inputs(case, device):
    g = {"memory": bank(case.N, case.D, case.torch_dtype, device)}
    if case.op == "knn":
        g["queries"] = _unit_rows(case.B, case.D, device)
        g["query_labels"] = torch.randint(0, case.classes, (case.B,), device=device)
        g["bank_labels"] = torch.randint(0, case.classes, (case.N,), device=device)
        return g
    g["x"] = _unit_rows(case.B, case.D, device).requires_grad_(case.op != "bank_update")
    g["y"] = torch.randperm(case.N, device=device)[:case.B]
    if case.op in ("nce", "lemniscate_nce"):   # a fixed Z, as lemniscate keeps after its first batch
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
    elif op == "softmax":
        ik.nonparametric_softmax_loss(x, mem, y, temperature=0.1, backend=backend)
    elif op == "lemniscate_nce":
        ik.NCEAverage(D, N, 8, T=0.1, Z=1.0, backend=backend).to(device)(x, y)
    elif op == "lemniscate_linear":
        ik.LinearAverage(D, N).to(device)(x, y)
    elif op == "knn":
        ik.knn_predict(x, mem, torch.arange(N, device=device) % 3, k=5, temperature=0.1, backend=backend)
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
    be, precision = split_provider(provider)
    if case.op == "nce":
        x, y, K, z = g["x"], g["y"], case.K, g["z"]

        def run():
            x.grad = None
            ik.nce_loss(x, mem, y, num_negatives=K, temperature=T, z=z, momentum=m, validate=False,
                        backend=be).backward()
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
    if case.op == "softmax":
        return lambda: (softmax_step_eager(g["x"], mem, g["y"], T, m), sync())
    if case.op == "knn":
        return lambda: (knn_eager(g["queries"], g["query_labels"], mem, g["bank_labels"], case.K, T,
                                  case.classes), sync())
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

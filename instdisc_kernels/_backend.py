"""Backend names, availability and the "auto" choice.

backends: "reference" (eager PyTorch, any device), "cpu" (C++ kernels in
instdisc_kernels._C), "triton" (Triton kernels on CUDA; on CPU tensors only
under TRITON_INTERPRET=1, for tests), "cuda" (CUDA C++ kernels in _C).
Each op module declares which backends it implements; ``resolve`` picks one.
"""
from __future__ import annotations

import importlib
import os

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# Decided once at import (plain constants, so torch.compile reads them without tracing).
_EXTENSION_LOADED = _importable("instdisc_kernels._C")   # registers torch.ops.instdisc.*
_TRITON_IMPORTABLE = _importable("triton")


def extension_loaded() -> bool:
    return _EXTENSION_LOADED


def triton_importable() -> bool:
    return _TRITON_IMPORTABLE


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
def has_kernel(op_name: str, dispatch_key: str) -> bool:
    """True when torch.ops.instdisc.<op_name> has a kernel for that dispatch key.

    A trace-time constant for torch.compile (the registry lookup returns a
    Python bool, which Dynamo cannot put in a graph)."""
    if not extension_loaded():
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"instdisc::{op_name}", dispatch_key)
    except RuntimeError:
        return False


def available(backend: str, device: torch.device, cpp_op: str | None = None, has_triton: bool = False,
              cpu_impl: bool = False) -> bool:
    """Whether ``backend`` can run an op on ``device``.

    cpp_op: the torch.ops.instdisc name whose C++ kernels implement "cpu"/"cuda".
    has_triton: whether the op has a Triton implementation.
    cpu_impl: the op's "cpu" backend is implemented without a C++ kernel
        (e.g. chunked ATen/oneDNN matmuls), so it is available on any CPU tensor.
    """
    if backend == "reference":
        return True
    if backend == "cpu":
        if device.type == "cpu" and cpu_impl:
            return True
        return device.type == "cpu" and cpp_op is not None and has_kernel(cpp_op, "CPU")
    if backend == "cuda":
        return device.type == "cuda" and cpp_op is not None and has_kernel(cpp_op, "CUDA")
    if backend == "triton":
        if not has_triton or not triton_importable():
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())
    return False


# On CUDA, "auto" tries these in order; benchmarks/RESULTS.md records why.
CUDA_PREFERENCE = ["triton", "cuda", "reference"]


def resolve(backend: str, device: torch.device, *, op: str, cpp_op: str | None = None,
            has_triton: bool = False, cpu_impl: bool = False) -> str:
    """Resolve ``backend`` for an op on ``device``; clear error when unavailable."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        order = ["cpu", "reference"] if device.type == "cpu" else CUDA_PREFERENCE
        for cand in order:
            if available(cand, device, cpp_op, has_triton, cpu_impl):
                return cand
        return "reference"
    if not available(backend, device, cpp_op, has_triton, cpu_impl):
        why = {
            "cpu": "needs CPU tensors and the compiled extension instdisc_kernels._C",
            "cuda": "needs CUDA tensors and an extension built with CUDA (INSTDISC_BUILD_CUDA=1)",
            "triton": "needs CUDA tensors and triton installed (or TRITON_INTERPRET=1 for CPU tensors)",
        }.get(backend, "")
        raise ValueError(f"backend={backend!r} is not available for {op} on device {device}: {why}")
    return backend

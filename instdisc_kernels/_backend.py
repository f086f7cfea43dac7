"""Backend names, what each needs, and the one function that picks one for an op.

The words mean the same for every op (docs/backends.md has the table op x backend):
  "eager"  plain PyTorch in the op's own precision; runs on any device. For the
           exact softmax, the shared negatives and the kNN this is the chunked
           torch path (never a B x N / Q x N block).
  "cpu"    this library's C++ kernels (instdisc_kernels._C, csrc/cpu/) on CPU tensors.
  "triton" this library's Triton kernels on CUDA tensors (on CPU tensors only under
           TRITON_INTERPRET=1, for tests).
  "cuda"   this library's CUDA C++ kernels (csrc/cuda/, an extension built with
           INSTDISC_BUILD_CUDA=1) on CUDA tensors.
  "auto"   CPU tensors: "cpu", else "eager"; CUDA tensors: CUDA_PREFERENCE, else "eager".
"reference" is the old spelling of "eager": accepted for one release with a
DeprecationWarning. The float64 oracle is instdisc_kernels/reference.py, not a backend.

Each op module declares its implementations once, as an ``OpTable`` (backend name ->
``Impl``); ``select`` is the only function that chooses among them.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import warnings
from typing import Any

import torch

BACKENDS = ("auto", "eager", "cpu", "triton", "cuda")
DEPRECATED = {"reference": "eager"}     # old spelling -> name; accepted until the next release

# On CUDA tensors, "auto" tries these in order, then "eager". Provisional: no GPU run has
# happened yet; the order stays a guess until benchmarks/run_gpu.sh records a run in
# benchmarks/RESULTS.md.
CUDA_PREFERENCE = ("triton", "cuda")
CPU_PREFERENCE = ("cpu",)

KIND = {"eager": "eager PyTorch path", "cpu": "C++ CPU kernel", "triton": "Triton kernel",
        "cuda": "CUDA C++ kernel"}


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


def op_handle(name: str):
    """torch.ops.instdisc.<name>, or None when this build does not define it."""
    try:
        return getattr(torch.ops.instdisc, name)
    except (AttributeError, RuntimeError):
        return None


# The CPU capability the C++ kernels run with ("default", "avx2", "avx512", "avx512_bf16";
# csrc/cpu/capability.h), read once at import; "none" without the extension.
CPU_CAPABILITY = torch.ops.instdisc.cpu_capability() if op_handle("cpu_capability") is not None else "none"
# Whether the CPU kernels have their AVX2 + FMA register tiles here (the kNN's fp32 prefilter,
# the exact softmax's fused pass).
CPU_FMA_TILES = CPU_CAPABILITY in ("avx2", "avx512", "avx512_bf16")


@dataclasses.dataclass(frozen=True)
class Impl:
    """One backend of an op: the implementation and what it needs besides the backend's device.

    fn: the callable or torch.ops handle (a tuple of them for ops with several entry
        points); None when this build does not define it.
    where: file and function of the kernel (for docs and error messages).
    dispatch: the torch.ops.instdisc op that must have a kernel for the device's dispatch key.
    triton: needs triton importable.
    auto: whether "auto" may pick it (False: only when asked for by name).
    """
    fn: Any
    where: str
    dispatch: str | None = None
    triton: bool = False
    auto: bool = True


class OpTable:
    """An op's implementations, declared once: backend name -> Impl ("eager" is required)."""

    def __init__(self, op: str, **impls: Impl):
        unknown = set(impls) - set(BACKENDS[1:])
        if unknown or "eager" not in impls:
            raise ValueError(f"{op}: backends must include 'eager' and be among {BACKENDS[1:]}, got {sorted(impls)}")
        self.op, self.impls = op, impls

    def __getitem__(self, backend: str):
        return self.impls[backend].fn

    def select(self, backend: str, device: torch.device, op: str | None = None) -> str:
        return select(self, backend, device, op=op)

    def available(self, backend: str, device: torch.device) -> bool:
        return backend in self.impls and missing(self, backend, device) is None


def _user_stacklevel() -> int:
    """stacklevel for warnings.warn called from canonical(): the first frame outside this
    package and torch (the user's call)."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    skip = (pkg, os.path.dirname(os.path.abspath(torch.__file__)))
    f, level = sys._getframe(1), 1        # level 1: canonical itself
    while f is not None and f.f_code.co_filename.startswith(skip):
        f, level = f.f_back, level + 1
    return level


def canonical(backend: str, warn: bool = True) -> str:
    """``backend`` in the vocabulary (ValueError naming the argument when it is not a backend);
    "reference" becomes "eager" with a DeprecationWarning."""
    if isinstance(backend, str) and backend in DEPRECATED:
        new = DEPRECATED[backend]
        if warn:
            warnings.warn(f"backend={backend!r} is deprecated and will be removed in the next release: "
                          f"use backend={new!r} (the same implementation)", DeprecationWarning,
                          stacklevel=_user_stacklevel())
        return new
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def auto_order(device: torch.device) -> tuple[str, ...]:
    if device.type == "cpu":
        return CPU_PREFERENCE + ("eager",)
    if device.type == "cuda":
        return CUDA_PREFERENCE + ("eager",)
    return ("eager",)


_DEVICE_NEEDS = {"cpu": ("cpu",), "cuda": ("cuda",)}


def missing(table: OpTable, backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run table's op on ``device`` (None: it can)."""
    impl = table.impls.get(backend)
    if impl is None:
        others = ", ".join(b for b in table.impls)
        return f"this op has no {KIND[backend]} (its backends: {others}; 'auto' picks the best available)"
    if backend in _DEVICE_NEEDS and device.type not in _DEVICE_NEEDS[backend]:
        return f"its {KIND[backend]} ({impl.where}) needs {backend.upper()} tensors"
    if impl.triton:
        if not triton_importable():
            return f"its {KIND[backend]} ({impl.where}) needs triton installed"
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreting()):
            return f"its {KIND[backend]} ({impl.where}) needs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    if impl.dispatch is not None:
        if not extension_loaded():
            return (f"its {KIND[backend]} ({impl.where}) needs the compiled extension instdisc_kernels._C, "
                    "which did not import")
        key = "CUDA" if device.type == "cuda" else "CPU"
        if not has_kernel(impl.dispatch, key):
            if key == "CUDA":
                return (f"its {KIND[backend]} ({impl.where}) is not in this build of instdisc_kernels._C "
                        "(build with INSTDISC_BUILD_CUDA=1)")
            return (f"the loaded instdisc_kernels._C has no CPU kernel for instdisc::{impl.dispatch} "
                    "(rebuild the extension)")
    if impl.fn is None:
        return f"its {KIND[backend]} ({impl.where}) is not defined in this build"
    return None


def select(table: OpTable, backend: str, device: torch.device, op: str | None = None) -> str:
    """The backend name that runs ``table``'s op for tensors on ``device``.

    "auto" takes the first of auto_order(device) the op has and can run (never fails: every
    op has "eager"); a named backend the op cannot run there is a ValueError naming the op,
    the backend, the device and what is needed. ``op`` overrides the op's name in messages."""
    name = canonical(backend)
    if name == "auto":
        for cand in auto_order(device):
            impl = table.impls.get(cand)
            if impl is not None and (impl.auto or cand == "eager") and missing(table, cand, device) is None:
                return cand
        return "eager"
    why = missing(table, name, device)
    if why is not None:
        raise ValueError(f"backend={name!r} is not available for {op or table.op} on device {device}: {why}")
    return name

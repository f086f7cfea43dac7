"""Benchmark shapes per op, device and --bench-size, and the providers compared.

Sizes: "smoke" (tiny, for `make test`), "default" (CPU: about 10 minutes on a
quiet 2-core machine; CUDA: the shapes of the issue that fit run_gpu.sh's time)
and "full" (every shape of the issue).
"""
from __future__ import annotations

import dataclasses
import itertools

import torch

CIFAR_N = 50_000
IMAGENET_N = 1_281_167
D = 128
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
T_IMAGENET, T_CIFAR = 0.07, 0.1
MOMENTUM = 0.5

# Providers in run order: the eager baseline first (the speedups divide by its time).
EAGER, COMPILE = "eager", "compile"
LIB_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}
# What users would pick instead of this library, per op (benchmarks/bench_peers.py), and the
# practical limit of a gather-bound op (embedding_bag over the op's own rows: FBGEMM's CPU gather).
PEERS = {"knn": ("faiss",), "knn_search": ("faiss",), "softmax": ("torch-lce",),
         "nce": ("embedding_bag",), "bank_update": ("embedding_bag",),
         "nce_shared": ("torch-mm",)}     # torch-mm: the step's two products alone, same shapes


@dataclasses.dataclass(frozen=True)
class Case:
    op: str                 # "nce" | "nce_shared" | "softmax" | "knn" | "knn_search" | "bank_update"
                            # | "lemniscate_nce" | "lemniscate_linear" (the drop-in modules' steps)
    N: int                  # bank rows (kNN: train features)
    B: int = 256            # batch (kNN: queries)
    K: int = 0              # NCE negatives (kNN: neighbours k)
    dtype: str = "fp32"     # bank dtype
    D: int = D
    classes: int = 10       # kNN only
    data: str = "random"    # kNN only: "random" unit rows or "clustered" (rows near their class centre)

    @property
    def id(self):
        k = {"nce": f"-K{self.K}", "nce_shared": f"-K{self.K}", "lemniscate_nce": f"-K{self.K}",
             "knn": f"-k{self.K}-C{self.classes}", "knn_search": f"-k{self.K}"}.get(self.op, "")
        b = "Q" if self.op in KNN_OPS else "B"
        data = "-clustered" if self.data == "clustered" else ""
        return f"N{self.N}-{b}{self.B}{k}-D{self.D}-{self.dtype}{data}"

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def temperature(self):
        return T_CIFAR if self.N <= CIFAR_N else T_IMAGENET

    @property
    def scale(self):
        """The x axis of the speedup plot: K for NCE, N otherwise."""
        return self.K if self.op in ("nce", "nce_shared", "lemniscate_nce") else self.N


def _nce(Ns, Bs, Ks, dts):
    return [Case("nce", N, B, K, dt) for N, B, K, dt in itertools.product(Ns, Bs, Ks, dts)]


def _softmax(Ns, Bs, dts):
    return [Case("softmax", N, B, 0, dt) for N, B, dt in itertools.product(Ns, Bs, dts)]


def _knn(op, N, Q, dts, classes=(10,), data=("random",)):
    return [Case(op, N, Q, 200, dt, classes=c, data=d) for dt, c, d in itertools.product(dts, classes, data)]


def _update(Ns, Bs, dts):
    return [Case("bank_update", N, B, 0, dt) for N, B, dt in itertools.product(Ns, Bs, dts)]


def _shared(size):
    """Shared negatives (one set of K per step) beside the per-sample NCE at K = 4096."""
    if size == "smoke":
        return [Case("nce_shared", 3000, 8, 64, "fp32"), Case("nce_shared", 500, 3, 1, "fp32", D=100)]
    return [Case("nce_shared", CIFAR_N, 256, K, "fp32") for K in (4096, 65536)]


def _dropins(N, B, K):
    """The drop-in modules' training steps (fp32 banks, as lemniscate's)."""
    return {"lemniscate_nce": [Case("lemniscate_nce", N, B, K)], "lemniscate_linear": [Case("lemniscate_linear", N, B)]}


def _cases(device_type, size):
    return {**_kernel_cases(device_type, size),
            **(_dropins(3000, 8, 64) if size == "smoke" else _dropins(CIFAR_N, 128, 4096))}


def _kernel_cases(device_type, size):
    both, fp32 = ("fp32", "bf16"), ("fp32",)
    if size == "smoke":
        return {
            "nce": _nce([3000], [8], [64], both) + [Case("nce", 500, 3, 1, "fp32", D=100)],
            "softmax": _softmax([3000], [8], both),
            "knn": [Case("knn", 3000, 250, 20, dt, classes=10) for dt in both],
            "knn_search": [Case("knn_search", 3000, 250, 20, "fp32", data="clustered")],
            "bank_update": _update([3000], [8], both),
        }
    C, I = CIFAR_N, IMAGENET_N
    if device_type == "cuda":
        Ks = [4096, 16384, 65536]
        Bs = [128, 256] if size == "full" else [256]
        return {
            "nce": _nce([C, I], Bs, Ks, both) + ([] if size == "full" else _nce([C, I], [128], [4096], both)),
            "softmax": _softmax([C, I], [128, 256], both),
            "knn": [Case("knn", C, 10_000, 200, dt, classes=10) for dt in both]
            + [Case("knn", I, 50_000 if size == "full" else 10_000, 200, dt, classes=1000) for dt in both],
            "knn_search": _knn("knn_search", C, 10_000, both) + _knn("knn_search", I, 10_000, both),
            "bank_update": _update([C, I], [256], both),
        }
    if size == "full":
        return {
            "nce": _nce([C, I], [128, 256], [4096], both),
            "softmax": _softmax([C, I], [128, 256], both),
            "knn": _knn("knn", C, 10_000, both, data=("random", "clustered"))
            + _knn("knn", I, 1_000, both, classes=(1000,), data=("random", "clustered")),
            "knn_search": _knn("knn_search", C, 10_000, both, data=("random", "clustered"))
            + _knn("knn_search", I, 1_000, both, data=("random", "clustered")),
            "bank_update": _update([C, I], [128, 256], both),
        }
    return {  # CPU default: the shapes of the CPU performance targets, bf16 at CIFAR size, a K sweep
        "nce": _nce([C, I], [256], [4096], fp32) + _nce([C], [256], [4096], ("bf16",))
        + _nce([C], [128], [4096], fp32) + _nce([C], [256], [1024, 16384], fp32),
        "softmax": _softmax([C, I], [256], fp32) + _softmax([C], [256], ("bf16",)),
        "knn": _knn("knn", C, 10_000, fp32, classes=(10, 1000)) + _knn("knn", C, 10_000, fp32, data=("clustered",))
        + _knn("knn", I, 1_000, fp32, classes=(1000,), data=("random", "clustered")),
        "knn_search": _knn("knn_search", C, 10_000, fp32, data=("random", "clustered"))
        + _knn("knn_search", I, 1_000, fp32, data=("random", "clustered")),
        "bank_update": _update([C, I], [256], both),
    }


def cases(op, device_type, size):
    if op == "nce_shared":
        return _shared(size)
    return _cases(device_type, size)[op]


KNN_OPS = ("knn", "knn_search")


def _table(op):
    """The backend table (instdisc_kernels/ops/*.py TABLE) of the library op a benchmark runs."""
    from instdisc_kernels.ops import bank_update, knn, nce, nce_probs, nce_shared, softmax
    return {"nce": nce, "nce_shared": nce_shared, "softmax": softmax, "knn": knn, "knn_search": knn,
            "bank_update": bank_update, "lemniscate_nce": nce_probs}[op].TABLE


def lib_backends(op, device_type):
    """LIB_BACKENDS of the device as the op has them: one the op has no kernel for is replaced by
    "eager" (the softmax, the shared negatives and the kNN: the library's chunked torch pass)."""
    impls = _table(op).impls
    out = []
    for b in LIB_BACKENDS[device_type]:
        b = b if b in impls else "eager"
        if b not in out:
            out.append(b)
    return tuple(out)


def providers(device_type, op):
    """Eager first, then each library backend of the op on the device, then torch.compile."""
    return [EAGER] + [f"fused-{b}" for b in lib_backends(op, device_type)] + [COMPILE]


def is_peer(provider):
    return any(provider in ps for ps in PEERS.values())


# ops with a precision= knob: besides fused-<backend> (precision="fp32", the default),
# fused-<backend>+bf16 runs precision="bf16" (bf16 products, fp32 accumulation)
PRECISION_OPS = ("softmax", "nce_shared")
# gather-bound ops whose bank is on 2 MiB pages (what MemoryBank allocates on CPU): fused-cpu+4k
# runs the same kernel on a copy of the bank on ordinary 4 KiB pages, side by side
PAGE_OPS = ("nce",)


def op_providers(op, device_type):
    """providers(device_type), plus the bf16-precision fused providers of PRECISION_OPS and the
    op's PEERS (before torch.compile; a search has no training-step baseline to compile); the drop-in
    steps: eager (the original-style modules) and the drop-ins (LinearAverage has no backend choice)."""
    if op == "lemniscate_nce":
        return providers(device_type, op)[:-1]
    if op == "lemniscate_linear":
        return [EAGER, f"fused-{LIB_BACKENDS[device_type][-1]}"]
    base = providers(device_type, op)
    eager, fused, comp = base[:1], base[1:-1], base[-1:]
    if op in PRECISION_OPS:
        fused += [f"fused-{b}+bf16" for b in lib_backends(op, device_type)]
    if op in PAGE_OPS and device_type == "cpu":
        fused += ["fused-cpu+4k"]
    if op == "knn_search":
        comp = []
    return eager + fused + list(PEERS.get(op, ())) + comp


def split_provider(provider):
    """"fused-cpu+bf16" -> ("cpu", "bf16"); "fused-cpu" -> ("cpu", "fp32"); "fused-cpu+4k" -> ("cpu", "4k")."""
    be, _, variant = provider.split("-", 1)[1].partition("+")
    return be, variant or "fp32"


def params(op, device_type, size):
    """[(case, provider)] in run order: for each case, the eager provider first."""
    return [(c, p) for c in cases(op, device_type, size) for p in op_providers(op, device_type)]


def bank_bytes(case):
    """Bytes of bank the op must read at least once (the fused floor, docs/method.md#why-kernels)."""
    es = torch.empty((), dtype=case.torch_dtype).element_size()
    rows = {"nce": case.B * (case.K + 1), "nce_shared": case.B + case.K, "softmax": case.N, "knn": case.N,
            "knn_search": case.N, "bank_update": case.B, "lemniscate_nce": case.B * (case.K + 1),
            "lemniscate_linear": case.N}[case.op]
    return rows * case.D * es


def access(case):
    """Which bandwidth probe an op is compared with: random rows or a stream."""
    return "gather" if case.op in ("nce", "nce_shared", "bank_update", "lemniscate_nce") else "read"


def flops(case):
    """Multiply-add FLOPs (2 per MAC) of a compute-bound op, None for a gather-bound one.

    softmax: S = F V^T and the gradient's softmax(S) V, 2 * 2 * B * N * D;
    kNN and the search: Q V^T, 2 * Q * N * D (the vote and the top-k are not counted);
    shared-negative NCE: S = F G^T and coef G over the K shared rows, 2 * 2 * B * K * D."""
    if case.op == "softmax":
        return 4 * case.B * case.N * case.D
    if case.op == "nce_shared":
        return 4 * case.B * case.K * case.D
    if case.op in KNN_OPS:
        return 2 * case.B * case.N * case.D
    return None

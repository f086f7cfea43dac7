"""Exact non-parametric softmax over the whole memory bank (docs/method.md#the-exact-non-parametric-softmax):
``nonparametric_softmax_loss`` (lemniscate's LinearAverage, ``--nce-k 0``).

    logits[b,j] = V[j] . F[b] / T
    loss        = (1/B) sum_b [ logsumexp_j logits[b,j] - logits[b, y[b]] ]
    dloss/dF[b] = (1/T) ( sum_j softmax(logits[b])_j V[j] - V[y[b]] ) / B

Op contract, shared by every backend::

    softmax_forward_<impl>(features (B,D), memory (N,D), indices (B,) int64,
                           temperature T, precision "fp32" | "bf16", chunk_size,
                           proximal lambda = 0)
        -> (loss 0-dim, grad_features (B,D))

* loss and grad_features are float64 for float64 features, else float32;
  grad_features is dloss/dfeatures, computed in the same pass as the loss
  (backward only scales it by grad_output). The bank is a constant for the
  gradient and is only read; the update is the separate op bank_update_.
* proximal (eq. 9 of the paper, as in ops/nce.py): adds
  lambda/B * sum_b ||F[b] - V[y[b]]||^2 to the loss and 2 lambda (F[b] - V[y[b]]) / B
  to the gradient, V the bank before this step's update (ops/_formulas.py).
* One streaming pass over the bank in chunks of ``chunk_size`` rows with an
  online log-sum-exp: per chunk S = F V_c^T / T, running row max m, running
  sum l = sum exp(S - m) and running A = sum exp(S - m) V_c, rescaled by
  exp(m_old - m_new) whenever the max grows (the flash-attention recurrence).
  Then lse = m + log l and sum_j softmax_j V[j] = A / l. Peak extra memory is
  O(B x chunk) (plus B x D), never B x N.

Quick CPU timings (2 shared cores, AVX512-BF16, no AMX; B = 256, D = 128,
loss + gradient, interleaved with the eager ``cross_entropy(x @ V.T / T, y)`` +
autograd; noisy machine, not a benchmark): N = 1,281,167: eager 3.45 s,
fp32 0.99 s, bf16 0.42 s; N = 50,000: eager ~430 ms, fp32 ~280 ms, bf16 ~63 ms.
Peak tensor memory: eager 3.75 GB (146 MB at N = 50,000), chunked 2.25 MB.

Implementations (TABLE below; docs/backends.md):
  "eager"  -> instdisc::softmax_forward_chunked: the recurrence above with
              ATen matmuls (oneDNN on CPU, bf16 products use AVX512-BF16/AMX when
              the CPU has them; cuBLAS on CUDA); any device. "auto" picks it on
              CUDA without Triton, and on CPU when the extension is not built.
  "cpu"    -> instdisc::softmax_forward_cpu (what "auto" picks on CPU). With fp32
              features, an fp32/bf16/fp16 bank on an AVX2+ CPU and fp32 products (or
              bf16 ones on a CPU without native bf16 GEMMs: the pass rounds both
              operands to bf16, the same products as below at fp32 speed):
              the whole recurrence is one C++ pass (instdisc::softmax_online_state,
              csrc/cpu/softmax.cpp): each 96-row block of the bank is scored in
              fp32 FMA register tiles, its softmax step taken on the scores in L1
              and its rows accumulated into A in the same tiles, the bank split into
              one range per thread (chunk_size is not used). Otherwise (native bf16
              products, float64, the "default" capability) the same chunks and ATen
              matmuls as "eager", with each chunk's max / exp / row-sum / rescale one
              C++ pass over the B x chunk block (instdisc::nce_shared_tile_softmax_).
  "triton" -> instdisc::softmax_forward_triton (ops/softmax_triton.py).
  No CUDA C++ kernel. ``forward_full`` below builds the full B x N
  logits the way plain eager code does (tests cross-check against it; not a backend).

precision (the chunk products; every reduction, exp and sum stays fp32):
  "fp32": products in fp32 (fp64 for float64 features). CPU: exact fp32
      GEMM. Triton on a GPU: tl.dot with input_precision="tf32x3" (about fp32
      accuracy on tensor cores).
  "bf16": features/T, the bank chunk and the softmax weights are rounded to
      bfloat16 for the two products, which accumulate in fp32 (on CPU ATen
      also rounds the product *outputs* to bf16). On a CPU without native bf16
      GEMMs (no AVX512-BF16 or AMX, e.g. AVX2: ATen's bf16 matmul is a slow
      fallback there) the bf16-rounded features/T and bank chunk are multiplied
      in fp32 instead (each product of two bf16 values is exact in fp32; the
      outputs and the weights are not rounded): at fp32 speed, within the same
      bound (_formulas.native_bf16_products). Error bound against the
      exact (fp32 / float64) result, with u = 2^-8 (bf16 unit roundoff),
      r = max_b |F[b]| * max_j |V[j]| / T and delta = 3.05 u r:
        every logit is off by at most delta (inputs and output rounded, for
        D up to ~3000), so
        |loss_bf16 - loss| <= delta,
        |grad_bf16[b] - grad[b]| <= max_j |V[j]| * ((e^(2 delta) - 1)(1 + 3u) + 3.2 u) / (T B)
      (the second from |Delta softmax|_1 <= e^(2 delta) - 1, plus the bf16
      rounding of the weights, of the bank rows and of the per-chunk sums,
      plus fp32 accumulation slack). These are worst
      cases: the rounding errors are unbiased and average out over N, and
      measured errors are far smaller (unit-norm rows, T = 0.07, N = 50,000:
      |loss error| ~ 3e-5, gradient relative error ~ 2e-4, against a bound
      delta = 0.17 on the loss). python_tests/softmax/test_softmax.py checks both the
      bound and a 2e-3 relative gradient error on realistic data.
"""
from __future__ import annotations

import math

import torch

from .. import _backend, _validate
from . import _saved_grad
from . import bank_update as _bank_update_mod
from ._formulas import add_proximal, native_bf16_products, opmath, product_operand

PRECISIONS = ("fp32", "bf16")
BF16_U = 2.0 ** -8


def default_chunk_size(batch: int, num_rows: int) -> int:
    """Bank rows per chunk on CPU: a B x chunk fp32 block of at most ~1 MiB
    (stays in L2, and keeps the peak extra memory tiny next to B x N),
    at least 256 rows so each GEMM stays efficient."""
    rows = (1 << 18) // max(1, batch)
    rows = max(256, min(8192, rows))
    return min(rows, max(1, num_rows))


def bf16_error_bound(features, memory, temperature):
    """(delta, grad_bound): the documented worst-case bf16 errors of the loss
    and of each gradient row (see the module docstring)."""
    fmax = float(features.detach().double().norm(dim=1).max())
    vmax = float(memory.detach().double().norm(dim=1).max())
    delta = 3.05 * BF16_U * fmax * vmax / temperature
    B = features.shape[0]
    grad = vmax * (math.expm1(2 * delta) * (1 + 3 * BF16_U) + 3.2 * BF16_U) / (temperature * B)
    return delta, grad


# --------------------------------------------------------------------------- #
# Chunked ATen implementation ("eager" backend)                                #
# --------------------------------------------------------------------------- #
def forward_chunked(features, memory, indices, temperature, precision="fp32", chunk_size=0, proximal=0.0,
                    fused=False):
    """(loss, grad_features): one streaming pass with an online log-sum-exp; fused: each chunk's
    softmax step is the C++ one-pass tile op (csrc/cpu/nce_shared.cpp; CPU)."""
    acc = opmath(features.dtype)
    B = features.shape[0]
    F = features.to(acc)
    m, l, A = online_state(F, memory, temperature, precision, chunk_size, fused)
    Vy = memory[indices].to(acc)
    pos = (F * Vy).sum(1) / temperature
    loss = (m + torch.log(l) - pos).mean()
    grad = (A / l[:, None] - Vy) / (temperature * B)
    return add_proximal(loss, grad, F, Vy, proximal)


def softmax_step(S, m, l, work, fused=False):
    """One chunk of the online softmax, in place: per row M' = max(m, max S), S <- exp(S - M'),
    l <- l exp(m - M') + sum S, m <- M'; returns exp(m_old - M') (B,), 0 on the first chunk.
    work: two (B,) buffers. fused (CPU): one C++ pass over S (instdisc::nce_shared_tile_softmax_)
    instead of five ATen passes. Also the shared negatives' InfoNCE step (ops/nce_shared.py)."""
    if fused:
        return torch.ops.instdisc.nce_shared_tile_softmax_(S, m, l)
    rowmax, rowsum = work
    torch.amax(S, 1, out=rowmax)
    torch.maximum(m, rowmax, out=rowmax)
    scale = torch.sub(m, rowmax).exp_()
    S.sub_(rowmax[:, None]).exp_()                  # in place: no second B x chunk block
    torch.sum(S, 1, out=rowsum)
    l.mul_(scale).add_(rowsum)
    m.copy_(rowmax)
    return scale


def one_pass_precision(precision, device):
    """Whether the one C++ pass computes ``precision``'s products: fp32 always; bf16 where the CPU
    has no native bf16 GEMM (the pass rounds both operands to bf16 and multiplies them exactly in
    fp32, the products _formulas.product_operand would give; with native bf16 the GEMMs are faster)."""
    return precision == "fp32" or (precision == "bf16" and not native_bf16_products(device))


def cpu_one_pass(F, memory):
    """Whether online_state can be the one C++ pass (instdisc::softmax_online_state): fp32
    features, an fp32/bf16/fp16 bank on CPU, AVX2 + FMA tiles built and chosen."""
    return (_backend.CPU_FMA_TILES and F.device.type == "cpu" and F.dtype == torch.float32
            and memory.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and _backend.has_kernel("softmax_online_state", "CPU"))


if _backend.op_handle("softmax_online_state") is not None:
    @torch.library.register_fake("instdisc::softmax_online_state")
    def _online_state_fake(features, bank, index=None, round_bf16=False):
        B, D = features.shape
        return features.new_empty((B,)), features.new_empty((B,)), features.new_empty((B, D))


def online_state(F, memory, temperature, precision="fp32", chunk_size=0, fused=False):
    """(m, l, A) after one streaming pass over the bank rows ``memory``, with S = F V^T / T:
    m[b] = max_j S[b,j], l[b] = sum_j exp(S[b,j] - m[b]), A[b] = sum_j exp(S[b,j] - m[b]) V[j]
    (F already in the op's dtype). The sharded bank merges these across shards. fused (CPU): the
    whole pass in C++ (softmax_online_state) where cpu_one_pass allows, else each chunk's
    softmax_step is one C++ pass over the B x chunk block.

    Every per-chunk block lives in buffers allocated once per call (``out=`` and
    in-place ops): fresh B x chunk allocations per chunk would page-fault anew
    whenever the allocator has returned memory to the OS (measured 8x slower
    right after an eager step had freed its 1.2 GB logits)."""
    acc = F.dtype
    if fused and one_pass_precision(precision, F.device) and cpu_one_pass(F, memory):
        return torch.ops.instdisc.softmax_online_state(F / temperature, memory, None, precision == "bf16")
    Fs = product_operand(F / temperature, precision, acc)
    cd = Fs.dtype                                               # dtype of the chunk products
    emulate = precision == "bf16" and cd == acc                 # bf16-valued operands in fp32
    B, D = F.shape
    N = memory.shape[0]
    chunk = min(chunk_size if chunk_size > 0 else default_chunk_size(B, N), N)
    dev = F.device
    m = torch.full((B,), float("-inf"), dtype=acc, device=dev)
    l = torch.zeros(B, dtype=acc, device=dev)
    A = torch.zeros(B, D, dtype=acc, device=dev)
    s_buf = torch.empty(B * chunk, dtype=acc, device=dev)            # logits, then weights
    work = (torch.empty(B, dtype=acc, device=dev), torch.empty(B, dtype=acc, device=dev))
    low = cd != acc
    if low:
        lo_buf = torch.empty(B * chunk, dtype=cd, device=dev)        # bf16 products / weights
        pv = torch.empty(B, D, dtype=cd, device=dev)
        v_buf = torch.empty(chunk * D, dtype=cd, device=dev) if memory.dtype != cd else None
    for start in range(0, N, chunk):
        n = min(chunk, N - start)
        Vc = memory[start:start + n]
        if emulate and Vc.dtype != torch.bfloat16:
            Vc = Vc.to(torch.bfloat16)
        if Vc.dtype != cd:
            if low:
                Vc = v_buf[:n * D].view(n, D).copy_(Vc)
            else:
                Vc = Vc.to(cd)
        S = s_buf[:B * n].view(B, n)
        if low:
            Sl = lo_buf[:B * n].view(B, n)
            torch.mm(Fs, Vc.t(), out=Sl)
            S.copy_(Sl)
        else:
            torch.mm(Fs, Vc.t(), out=S)
        scale = softmax_step(S, m, l, work, fused)
        A.mul_(scale[:, None])
        if low:
            Sl.copy_(S)
            torch.mm(Sl, Vc, out=pv)
            A.add_(pv)
        else:
            A.addmm_(S, Vc)
    return m, l, A


# --------------------------------------------------------------------------- #
# The full B x N logits (cross-checks; not a backend)                          #
# --------------------------------------------------------------------------- #
def forward_full(features, memory, indices, temperature, precision="fp32", proximal=0.0):
    """(loss, grad_features) through the full B x N logits, the way eager code does it."""
    acc = opmath(features.dtype)
    cd = torch.bfloat16 if precision == "bf16" else acc
    B = features.shape[0]
    F = features.to(acc)
    V = memory.to(cd)
    logits = torch.mm((F / temperature).to(cd), V.t()).to(acc)           # B x N
    p = torch.softmax(logits, dim=1)
    Vy = memory[indices].to(acc)
    pos = (F * Vy).sum(1) / temperature
    loss = (torch.logsumexp(logits, dim=1) - pos).mean()
    grad = (torch.mm(p.to(cd), V).to(acc) - Vy) / (temperature * B)
    return add_proximal(loss, grad, F, Vy, proximal)


@torch.library.custom_op("instdisc::softmax_forward_chunked", mutates_args=())
def softmax_forward_chunked(features: torch.Tensor, memory: torch.Tensor, indices: torch.Tensor,
                            temperature: float, precision: str, chunk_size: int, proximal: float = 0.0
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    return forward_chunked(features, memory, indices, temperature, precision, chunk_size, proximal)


@torch.library.custom_op("instdisc::softmax_forward_cpu", mutates_args=())
def softmax_forward_cpu(features: torch.Tensor, memory: torch.Tensor, indices: torch.Tensor,
                        temperature: float, precision: str, chunk_size: int, proximal: float = 0.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """forward_chunked with its streaming pass in C++ (csrc/cpu/softmax.cpp, or per chunk csrc/cpu/nce_shared.cpp)."""
    return forward_chunked(features, memory, indices, temperature, precision, chunk_size, proximal, fused=True)


def _forward_fake(features, memory, indices, temperature, precision, chunk_size, proximal=0.0):
    acc = opmath(features.dtype)
    return features.new_empty((), dtype=acc), features.new_empty(features.shape, dtype=acc)


def _register(opname):
    _saved_grad.register(opname, _forward_fake)


_register("instdisc::softmax_forward_chunked")
_register("instdisc::softmax_forward_cpu")
try:
    from . import softmax_triton  # noqa: F401  (defines instdisc::softmax_forward_triton)
except ImportError:
    pass
if _backend.op_handle("softmax_forward_triton") is not None:
    _register("instdisc::softmax_forward_triton")

TABLE = _backend.OpTable(
    "nonparametric_softmax_loss",
    eager=_backend.Impl(torch.ops.instdisc.softmax_forward_chunked, "ops/softmax.py forward_chunked"),
    cpu=_backend.Impl(torch.ops.instdisc.softmax_forward_cpu,
                      "ops/softmax.py forward_chunked + csrc/cpu/softmax.cpp (or the nce_shared.cpp tile step)",
                      dispatch="nce_shared_tile_softmax_"),
    triton=_backend.Impl(_backend.op_handle("softmax_forward_triton"), "ops/softmax_triton.py forward_triton",
                         triton=True),
)



def nonparametric_softmax_loss(features: torch.Tensor, memory: torch.Tensor, indices: torch.Tensor, *,
                               temperature: float = 0.07, momentum: float = 0.5, update_memory: bool = True,
                               validate: bool = True, backend: str = "auto", precision: str = "fp32",
                               chunk_size: int | None = None, proximal: float = 0.0) -> torch.Tensor:
    """Exact non-parametric softmax loss over all N bank rows (docs/method.md), mean over the batch.

    Args:
        features: (B, D) float features (unit rows); gets a gradient.
        memory: (N, D) memory bank (float32/bfloat16/float16/float64), read as a constant;
            updated in place after the loss has read it when ``update_memory``.
        indices: (B,) int64 dataset indices (the positives).
        temperature, momentum: T and m (docs/method.md).
        validate: check index ranges and NaN/inf, and that loss and gradient are finite
            before the update (a NaN/inf bank row is named); a GPU synchronisation.
        backend: "auto" | "eager" (the chunked ATen pass, any device) | "triton" (docs/backends.md;
            "reference": deprecated spelling of "eager"; "cpu"/"cuda": no such kernel, an error).
        precision: "fp32" or "bf16" chunk products (fp32 accumulation; bf16 error
            bound in the module docstring).
        chunk_size: bank rows per chunk (None: default_chunk_size on "eager",
            the kernel's own tiling on "triton").
        proximal: lambda of the proximal term lambda/B sum_b ||F[b] - V[y[b]]||^2 against
            the bank rows before the update (0 disables it; every backend).
    Returns:
        0-dim loss tensor (float32; float64 for float64 features).
    """
    _validate.check_features_memory_indices(features, memory, indices, values=validate)
    _validate.check_temperature(temperature)
    _validate.check_momentum(momentum)
    _validate.check_nonneg_number(proximal, "proximal")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if chunk_size is not None:
        _validate.check_positive_int(chunk_size, "chunk_size")
    if update_memory and not memory.is_contiguous():
        raise ValueError("memory must be contiguous (it is updated in place)")
    be = TABLE.select(backend, features.device)
    indices = indices.long().contiguous()
    loss, grad = TABLE[be](features.contiguous(), memory, indices, float(temperature), precision,
                           int(chunk_size or 0), float(proximal))
    if validate:   # every bank row is read: a NaN/inf one makes loss or gradient non-finite
        _validate.check_loss_result("nonparametric_softmax_loss", memory, loss, grad, temperature=temperature)
    if update_memory:
        _bank_update_mod.bank_update_(memory, indices, features.detach(), momentum,
                                      backend=_bank_update_mod.backend_after_loss(backend, features.device),
                                      validate=False)
    return loss

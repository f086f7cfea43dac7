"""Sampled-negative NCE / InfoNCE (docs/method.md#noise-contrastive-estimation-nce): ``nce_loss`` and its ops.

Op contract, shared by every backend (schema in csrc/instdisc.cpp)::

    nce_forward(features (B,D), memory (N,D), indices (B,) int64,
                neg_indices (B,K) int64 | None, z (1,) float32, seed (1,) int64,
                num_negatives K, temperature T, proximal lambda, loss_type (0 nce, 1 infonce),
                z_ema a (0 = off), exclude_positive, noise_probs (N,) float32 | None)
        -> (loss 0-dim, grad_features (B,D), z_out (1,) float32)

* loss and grad_features are float64 when features are float64, else float32.
  grad_features is dloss/dfeatures, computed in the same pass as the loss;
  backward only scales it by grad_output.
* Z: if z[0] <= 0, Z = N * mean(exp(s/T)) over this batch's B*(K+1) scores;
  elif z_ema > 0, Z = z_ema * z[0] + (1 - z_ema) * that estimate; else Z = z[0].
  Every backend forms it in log space (log-sum-exp of s/T, the EMA as a
  log-add-exp) and works with log P = s/T - log Z, so nothing overflows.
  The loss uses that Z; z_out holds it (inf, or 0, when float32 cannot:
  nce_loss then raises before any state or bank row is written). Z is a
  constant for the gradient.
* A NaN/inf bank row that the op reads makes its loss or gradient non-finite
  (the cpu kernel raises a ValueError naming the row itself); nce_loss checks
  the outputs and names the row before the update.
* neg_indices None: negatives drawn uniformly with replacement from [0, N)
  (from [0, N) minus the positive when exclude_positive) with Philox(seed), the same
  stream on the cpu, cuda and triton backends (docs/negatives.md).
* noise_probs: Pn per index (defaults to 1/N) in the NCE terms.
* proximal: adds lambda/B * sum_b ||F[b] - V[y[b]]||^2 (and its gradient).
* The memory bank is only read; the update is the separate op bank_update_.

Implementations: TABLE below ("eager" -> nce_forward_eager here; docs/backends.md).
"""
from __future__ import annotations

import math

import torch

from .. import _backend, _validate
from . import _saved_grad
from ._formulas import add_proximal, nce_negative, nce_positive, opmath
from .bank_update import backend_after_loss, bank_update_

LOSS_TYPES = {"nce": 0, "infonce": 1}


# --------------------------------------------------------------------------- #
# Eager implementation ("eager" backend): readable, any device                 #
# --------------------------------------------------------------------------- #
@torch.library.custom_op("instdisc::nce_forward_eager", mutates_args=())
def nce_forward_eager(
    features: torch.Tensor, memory: torch.Tensor, indices: torch.Tensor, neg_indices: torch.Tensor | None,
    z: torch.Tensor, seed: torch.Tensor, num_negatives: int, temperature: float, proximal: float,
    loss_type: int, z_ema: float, exclude_positive: bool, noise_probs: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if neg_indices is None:
        raise ValueError("the eager backend needs explicit neg_indices (nce_loss draws them)")
    acc = opmath(features.dtype)
    B, N = features.shape[0], memory.shape[0]
    K = num_negatives
    T = temperature
    F = features.to(acc)
    idx = torch.cat([indices.view(-1, 1), neg_indices], dim=1)          # B x (K+1)
    Vg = memory[idx].to(acc)                                            # B x (K+1) x D
    s = torch.einsum("bkd,bd->bk", Vg, F)
    z_out = z.to(torch.float32).clone()
    if loss_type == 1:                                                 # InfoNCE
        logits = s / T
        loss = (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
        w = torch.softmax(logits, 1)
        w[:, 0] -= 1
        coef = w / (B * T)
    else:                                                              # lemniscate NCE, in log space
        t = s / T
        log_est = torch.logsumexp(t.reshape(-1), 0) + math.log(N / t.numel())     # log(N * mean exp(t))
        zc = z_out[0].to(acc)
        if z_ema > 0:                                                  # log(a z + (1 - a) est)
            log_ema = torch.logaddexp(torch.log(z_ema * zc.clamp(min=0)), math.log1p(-z_ema) + log_est)
        else:
            log_ema = torch.log(zc.clamp(min=0))
        log_z = torch.where(zc <= 0, log_est, log_ema)
        z_out = torch.exp(log_z).to(torch.float32).reshape(1)
        kp = K / N if noise_probs is None else K * noise_probs[idx].to(acc)
        kp0, kpk = (kp, kp) if noise_probs is None else (kp[:, 0], kp[:, 1:])
        lp = t - log_z                                                 # log P, P = exp(s/T) / Z
        ln_pos, d_pos = nce_positive(lp[:, 0], kp0)
        ln_neg, d_neg = nce_negative(lp[:, 1:], kpk)
        loss = (ln_pos.sum() + ln_neg.sum()) / B
        coef = torch.cat([d_pos[:, None], d_neg], 1) / (T * B)         # dloss/ds
    grad = torch.einsum("bk,bkd->bd", coef, Vg)
    return add_proximal(loss, grad, F, Vg[:, 0], proximal) + (z_out,)


def _nce_forward_fake(features, memory, indices, neg_indices, z, seed, num_negatives, temperature,
                      proximal, loss_type, z_ema, exclude_positive, noise_probs):
    acc = opmath(features.dtype)
    return (features.new_empty((), dtype=acc), features.new_empty(features.shape, dtype=acc),
            z.new_empty((1,), dtype=torch.float32))


def _register(opname):
    _saved_grad.register(opname, _nce_forward_fake)


_register("instdisc::nce_forward_eager")
if _backend.extension_loaded():
    _register("instdisc::nce_forward")
try:
    from . import nce_triton  # noqa: F401  (defines instdisc::nce_forward_triton)
except ImportError:
    pass
if _backend.op_handle("nce_forward_triton") is not None:
    _register("instdisc::nce_forward_triton")

TABLE = _backend.OpTable(
    "nce_loss",
    eager=_backend.Impl(torch.ops.instdisc.nce_forward_eager, "ops/nce.py nce_forward_eager"),
    cpu=_backend.Impl(_backend.op_handle("nce_forward"), "csrc/cpu/nce.cpp nce_forward_cpu", dispatch="nce_forward"),
    cuda=_backend.Impl(_backend.op_handle("nce_forward"), "csrc/cuda/nce.cu nce_forward_cuda", dispatch="nce_forward"),
    triton=_backend.Impl(_backend.op_handle("nce_forward_triton"), "ops/nce_triton.py nce_forward_triton",
                         triton=True),
)



# --------------------------------------------------------------------------- #
# Negatives                                                                    #
# --------------------------------------------------------------------------- #
def draw_negatives(indices, num_samples, num_negatives, *, generator=None, exclude_positive=False,
                   noise_probs=None):
    """(B, K) int64 negatives, uniform with replacement (or from noise_probs)."""
    B = indices.shape[0]
    dev = indices.device
    if noise_probs is not None:
        flat = torch.multinomial(noise_probs, B * num_negatives, replacement=True, generator=generator)
        return flat.view(B, num_negatives)
    if exclude_positive:
        if num_samples < 2:
            raise ValueError("exclude_positive needs a memory bank with at least 2 rows")
        neg = torch.randint(0, num_samples - 1, (B, num_negatives), generator=generator, device=dev)
        return neg + (neg >= indices.view(-1, 1)).long()        # skip the positive, stay uniform
    return torch.randint(0, num_samples, (B, num_negatives), generator=generator, device=dev)


def _seed_tensor(generator, device):
    dev = generator.device if generator is not None else device
    return torch.randint(0, 2**62, (1,), generator=generator, device=dev, dtype=torch.int64).to(device)


def _z_tensor(z, device, validate=True):
    """(state tensor or None, (1,) float32 input tensor); z must be finite (<= 0: estimate)."""
    if z is None:
        return None, torch.zeros(1, dtype=torch.float32, device=device)
    if isinstance(z, torch.Tensor):
        if z.numel() != 1 or not z.is_floating_point():
            raise ValueError(f"z must be a float, None, or a 1-element floating tensor, got shape {tuple(z.shape)}")
        if z.device != device:
            raise ValueError(f"z is on {z.device} but features are on {device}")
        if validate:
            _validate.check_z_tensor(z)
        return z, z.detach().reshape(1).to(torch.float32)
    if isinstance(z, bool) or not isinstance(z, (int, float)):
        raise TypeError(f"z must be a float, None or a tensor, got {type(z).__name__}")
    _validate.check_z_number(float(z))
    return None, torch.full((1,), float(z), dtype=torch.float32, device=device)


# --------------------------------------------------------------------------- #
# Public function                                                              #
# --------------------------------------------------------------------------- #
def nce_loss(features: torch.Tensor, memory: torch.Tensor, indices: torch.Tensor, *, num_negatives: int = 4096,
             temperature: float = 0.07, z: float | torch.Tensor | None = None, momentum: float = 0.5,
             proximal: float = 0.0, neg_indices: torch.Tensor | None = None, update_memory: bool = True,
             generator: torch.Generator | None = None, loss_type: str = "nce", z_ema: float | None = None,
             validate: bool = True, backend: str = "auto", exclude_positive: bool = False,
             noise_probs: torch.Tensor | None = None, negatives: str = "per-sample", precision: str = "fp32",
             chunk_size: int | None = None) -> torch.Tensor:
    """Sampled-negative NCE loss of InstDisc (docs/method.md#noise-contrastive-estimation-nce), fused with the bank update.

    Args:
        features: (B, D) L2-normalised features (requires grad in training).
        memory: (N, D) memory bank (float32/bfloat16/float16); updated in place
            after the loss has read the old rows when ``update_memory``.
        indices: (B,) int64 dataset indices (the positives).
        num_negatives: K, negatives per sample (ignored if ``neg_indices``).
        temperature: T.
        z: normalisation constant (finite). A float; a 1-element float tensor used as
            state (a value <= 0 means "estimate from this batch and store it
            here"); or None (estimate from this batch, store nothing).
        momentum: bank momentum m.
        proximal: lambda of the proximal term (0 disables it).
        neg_indices: optional explicit (B, K) int64 negatives.
        update_memory: apply V[y] <- normalize(m V[y] + (1-m) F) after the loss.
        generator: torch.Generator for the negatives (reproducible runs).
        loss_type: "nce" (lemniscate, default) or "infonce" (softmax CE over K+1 logits).
        z_ema: moving-average factor for Z (e.g. 0.99) when ``z`` is a state tensor.
        validate: check index ranges and NaN/inf, and after the op (before Z or
            the bank change) that loss, gradient and Z are finite: a NaN/inf bank
            row is named, a Z float32 cannot hold is an error (costs a GPU synchronisation);
            shapes, dtypes and hyper-parameters are always checked.
        backend: "auto", "eager", "cpu", "triton" or "cuda" (docs/backends.md; "reference": deprecated
            spelling of "eager").
        exclude_positive: never draw the positive as a negative.
        noise_probs: optional (N,) noise distribution (sums to 1) instead of uniform.
        negatives: "per-sample" (K negatives per row, lemniscate's) or "shared" (one set of
            K negatives for the whole batch, neg_indices 1-D (K,); the GEMM form of
            ops/nce_shared.py, where exclude_positive masks instead of re-drawing).
        precision, chunk_size: "shared" only: "fp32" | "bf16" GEMM operands, K columns per tile.
    Returns:
        0-dim loss tensor (float32; float64 for float64 features).
    """
    _validate.check_features_memory_indices(features, memory, indices, values=validate)
    N = memory.shape[0]
    if not memory.is_contiguous():
        raise ValueError("memory must be contiguous (it is read by index and updated in place)")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be 'nce' or 'infonce', got {loss_type!r}")
    _validate.check_temperature(temperature)
    _validate.check_momentum(momentum)
    _validate.check_nonneg_number(proximal, "proximal")
    if z_ema is not None and (isinstance(z_ema, bool) or not isinstance(z_ema, (int, float)) or not 0 < z_ema < 1):
        raise ValueError(f"z_ema must be in (0, 1) or None, got {z_ema!r}")
    if negatives not in ("per-sample", "shared"):
        raise ValueError(f"negatives must be 'per-sample' or 'shared', got {negatives!r}")
    if negatives == "shared" and neg_indices is not None:
        from .nce_shared import check_shared_neg_indices
        neg_indices = check_shared_neg_indices(neg_indices, features, N, validate)
    elif neg_indices is not None:
        _validate.check_tensor("neg_indices", neg_indices)
        if neg_indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"neg_indices must be an integer (int64) tensor, got {neg_indices.dtype}")
        if neg_indices.dim() != 2 or neg_indices.shape[0] != features.shape[0] or neg_indices.shape[1] < 1:
            raise ValueError(f"neg_indices must have shape (B={features.shape[0]}, K>=1), got {tuple(neg_indices.shape)}")
        _validate.check_same_device(features=features, neg_indices=neg_indices)
        if validate:
            _validate.check_index_range("neg_indices", neg_indices, N)
        neg_indices = neg_indices.long().contiguous()
        num_negatives = neg_indices.shape[1]
    else:
        _validate.check_positive_int(num_negatives, "num_negatives")
    if noise_probs is not None:
        _validate.check_tensor("noise_probs", noise_probs)
        if noise_probs.shape != (N,) or not noise_probs.is_floating_point():
            raise ValueError(f"noise_probs must be a floating tensor of shape ({N},), got {tuple(noise_probs.shape)}")
        _validate.check_same_device(features=features, noise_probs=noise_probs)
        if validate and (not bool(torch.isfinite(noise_probs).all()) or bool((noise_probs < 0).any())
                         or float(noise_probs.sum()) <= 0):
            raise ValueError("noise_probs must be finite, non-negative and not all zero")
        if exclude_positive:
            raise ValueError("exclude_positive is only supported with uniform noise (noise_probs=None)")
        noise_probs = (noise_probs / noise_probs.sum()).to(torch.float32).contiguous()
    if exclude_positive and N < 2:
        raise ValueError("exclude_positive needs a memory bank with at least 2 rows")
    z_state, z_in = _z_tensor(z, features.device, validate)
    if negatives == "shared":
        from .nce_shared import shared_step
        return shared_step(features, memory, indices, neg_indices, z_state, z_in, num_negatives, temperature,
                           momentum, proximal, update_memory, generator, loss_type, z_ema, backend,
                           exclude_positive, noise_probs, precision, chunk_size, validate)
    be = TABLE.select(backend, features.device)

    indices = indices.long().contiguous()
    if neg_indices is None and (be == "eager" or noise_probs is not None):
        neg_indices = draw_negatives(indices, N, num_negatives, generator=generator,
                                     exclude_positive=exclude_positive, noise_probs=noise_probs)
    seed = _seed_tensor(generator, features.device)
    loss, grad, z_out = TABLE[be](
        features.contiguous(), memory, indices, neg_indices, z_in, seed, int(num_negatives),
        float(temperature), float(proximal), LOSS_TYPES[loss_type], float(z_ema or 0.0),
        bool(exclude_positive), noise_probs)
    finish_step(features, memory, indices, (indices, neg_indices), loss, grad, z_out, z_state, loss_type,
                temperature, momentum, validate, update_memory, backend_after_loss(backend, features.device))
    return loss


def finish_step(features, memory, indices, rows, loss, grad, z_out, z_state, loss_type, temperature, momentum,
                validate, update_memory, bank_backend):
    """After an NCE op (per-sample or shared negatives): check its outputs, store Z, update the bank."""
    if validate:   # a NaN/inf bank row it read, or a Z float32 cannot hold: error before any write
        _validate.check_loss_result("nce_loss", memory, loss, grad, temperature=temperature,
                                    z=z_out if loss_type == "nce" else None, rows=rows)
    if z_state is not None and loss_type == "nce":
        # an inference-mode state tensor (InstDiscLoss built under torch.inference_mode()) is written like the bank
        mode = torch.inference_mode() if not _validate._tracing() and z_state.is_inference() else torch.no_grad()
        with mode:   # never store a Z float32 cannot hold (only reachable with validate=False)
            z_new = z_out.reshape(z_state.shape).to(z_state.dtype)
            z_state.copy_(torch.where(torch.isfinite(z_new) & (z_new > 0), z_new, z_state))
    if update_memory:
        bank_update_(memory, indices, features.detach(), momentum, backend=bank_backend, validate=False)

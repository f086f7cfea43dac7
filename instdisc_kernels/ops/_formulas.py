"""The formulas that every production path shares, each defined once here: the eager
ops (ops/nce.py, ops/nce_shared.py, ops/nce_probs.py, ops/softmax.py), the sharded
bank (distributed/_sharded.py) and the lemniscate drop-ins (lemniscate/criterion.py).

instdisc_kernels/reference.py writes the same formulas again, on purpose and
independently (float64, literally as the method states them): it is the oracle
the tests compare these against, and it imports nothing from here.
"""
from __future__ import annotations

import functools

import torch

EPS = 1e-7   # lemniscate's NCECriterion eps: c = K Pn + EPS


def opmath(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype an op accumulates and returns in: float64 if any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def native_bf16_products(device: torch.device) -> bool:
    """Whether bf16 GEMMs are fast on ``device``: a GPU, or a CPU with AVX512-BF16 or AMX.
    Elsewhere (an AVX2 CPU) ATen's bf16 matmul is a slow fallback (150 ms against fp32's 5.5 ms
    for the B=256, K=4096, D=128 products, measured), and precision="bf16" instead multiplies
    the bf16-rounded operands in fp32: every product of two bf16 values is exact in fp32, so only
    the outputs' bf16 rounding is skipped (the results are closer to fp32's, within the same bound)."""
    if device.type != "cpu":
        return True
    return _cpu_bf16()


@functools.lru_cache(maxsize=None)
def _cpu_bf16() -> bool:
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def product_operand(t: torch.Tensor, precision: str, acc: torch.dtype) -> torch.Tensor:
    """A GEMM operand in the op's product precision: ``acc`` for "fp32"; for "bf16" rounded to
    bfloat16, kept in bfloat16 where bf16 GEMMs are native, else bf16-valued in ``acc``."""
    if precision != "bf16":
        return t.to(acc)
    r = t.to(torch.bfloat16)
    return r if native_bf16_products(t.device) else r.to(acc)


# --------------------------------------------------------------------------- #
# lemniscate's NCE criterion, per entry, in log space                          #
# --------------------------------------------------------------------------- #
def _as_tensor(kpn, like):
    return torch.as_tensor(kpn, dtype=like.dtype, device=like.device)


def nce_positive(log_p: torch.Tensor, kpn) -> tuple[torch.Tensor, torch.Tensor]:
    """(-log(P / (P + c)), its derivative w.r.t. log P) for positive entries, c = K Pn + EPS.

    log_p: log P with P = exp(s/T) / Z; kpn: K * Pn (a float or a tensor broadcasting
    with log_p). Written as softplus(-x), x = log P - log c: no exp(s/T) is formed."""
    x = log_p - torch.log(_as_tensor(kpn, log_p) + EPS)
    return torch.nn.functional.softplus(-x), -torch.sigmoid(-x)


def nce_negative(log_p: torch.Tensor, kpn) -> tuple[torch.Tensor, torch.Tensor]:
    """(-log(K Pn / (P + c)), its derivative w.r.t. log P) for negative entries, c = K Pn + EPS:
    softplus(x) + log1p(EPS / (K Pn)) and sigmoid(x), x = log P - log c."""
    kpn = _as_tensor(kpn, log_p)
    x = log_p - torch.log(kpn + EPS)
    return torch.nn.functional.softplus(x) + torch.log1p(EPS / kpn), torch.sigmoid(x)


def nce_loss_from_probs(p: torch.Tensor, kpn) -> torch.Tensor:
    """lemniscate's NCECriterion of P (B x (K+1), column 0 the positive): the sum of every
    entry's term, accumulated in float64, divided by B (a float64 0-dim tensor)."""
    logp = torch.log(p.to(opmath(p.dtype)))
    pos, _ = nce_positive(logp[:, 0], kpn)
    neg, _ = nce_negative(logp[:, 1:], kpn)
    return (pos.sum(dtype=torch.float64) + neg.sum(dtype=torch.float64)) / p.shape[0]


def nce_grad_probs(p: torch.Tensor, kpn: float, scale=1.0) -> torch.Tensor:
    """dloss/dP of NCECriterion (P: B x (K+1), column 0 the positive) times ``scale`` / B:
    1 / (P + c) on the negatives, -c / (P0 (P0 + c)) on the positive (one B x (K+1) buffer)."""
    c = kpn + EPS
    scale = torch.as_tensor(scale, dtype=p.dtype, device=p.device) / p.shape[0]
    g = p + c
    torch.div(scale, g, out=g)
    p0 = p[:, 0]
    g[:, 0] = -(c / (p0 * (p0 + c))) * scale
    return g


# --------------------------------------------------------------------------- #
# The proximal term of eq. 9: lambda ||F[b] - V_old[y[b]]||^2, mean over B     #
# --------------------------------------------------------------------------- #
def proximal_terms(F: torch.Tensor, Vy: torch.Tensor, lam: float, batch: int | None = None):
    """(loss term, gradient w.r.t. F) of lam / B * sum_b ||F[b] - Vy[b]||^2.

    F and Vy: rows of the features and the positives' (old) bank rows, in the op's
    dtype; batch: B (default: F's row count; the sharded bank passes the global B)."""
    B = F.shape[0] if batch is None else batch
    diff = F - Vy
    return lam * (diff * diff).sum() / B, (2 * lam / B) * diff


def add_proximal(loss, grad, F, Vy, lam):
    """(loss, grad) plus the proximal term and its gradient (unchanged when lam == 0)."""
    if lam <= 0:
        return loss, grad
    pl, pg = proximal_terms(F, Vy, lam)
    return loss + pl, grad + pg

"""Policies for Z, the normaliser of the sampled-negative NCE loss (docs/method.md#noise-contrastive-estimation-nce).

NCE scores a bank row j against a feature F[b] as P = exp(V[j].F[b] / T) / Z,
where Z stands for the partition function sum_j exp(V[j].F[b] / T) over the
whole bank (averaged over the batch). The policies (``Z_POLICIES``):

* ``"first-batch"``: lemniscate's estimate Z = N * mean(exp(s/T)) over the
  first batch's B*(K+1) sampled scores, then frozen. Measured against the
  random initial bank it is about N, while the partition function of trained
  features is orders of magnitude larger, so NCE collapses unless Z is set by
  hand (docs/learning.md).
* ``"ema"``: a * Z + (1 - a) * (this batch's estimate), started from the first
  estimate (factor ``z_ema``, default 0.99).
* ``"ema-bc"``: the bias-corrected (Adam-style) moving average of the per-batch
  estimates, m_t = a m_{t-1} + (1-a) est_t, Z_t = m_t / (1 - a^t) with m_0 = 0.
  It runs through the same op as ``"ema"``: Z_t = a_t Z_{t-1} + (1 - a_t) est_t
  with a_t = a (1 - a^(t-1)) / (1 - a^t) (a_1 = 0: the first batch's estimate).
* ``"batch"``: re-estimated from every batch's own B*(K+1) scores.
* ``"exact"``: the exact batch-mean partition function
  Z = mean_b exp(lse_b), lse_b = logsumexp_j V[j].F[b]/T over all N rows,
  refreshed every ``z_every`` steps and held fixed in between. It costs one
  streaming log-sum-exp pass over the bank (the exact softmax's forward,
  B x chunk blocks, never B x N) per refresh.
* a positive number: a fixed, hand-set Z.

Every estimating policy stores the Z it used in the module's ``z`` state (one
float32), so checkpoints and logs see it. ``InstDiscLoss`` defaults to
``DEFAULT_POLICY``; the lemniscate drop-ins (``instdisc_kernels.lemniscate``)
keep lemniscate's first-batch Z.
"""
from __future__ import annotations

import math

import torch

from ._formulas import opmath
from .softmax import default_chunk_size

Z_POLICIES = ("first-batch", "ema", "ema-bc", "batch", "exact")
STEP_POLICIES = ("ema-bc", "exact")        # the ones that read the step counter
DEFAULT_POLICY = "batch"
DEFAULT_EVERY = 1
_F32_MAX = float(torch.finfo(torch.float32).max)


def check_policy(z, z_ema=0.99, z_every=DEFAULT_EVERY):
    """ValueError naming the argument for a bad policy; returns the initial Z state
    (-1.0, "estimate it at the first step", for every estimating policy)."""
    if isinstance(z_every, bool) or not isinstance(z_every, int) or z_every < 1:
        raise ValueError(f"z_every must be an integer >= 1, got {z_every!r}")
    if isinstance(z_ema, bool) or not isinstance(z_ema, (int, float)) or not 0 < z_ema < 1:
        raise ValueError(f"z_ema must be in (0, 1), got {z_ema!r}")
    if isinstance(z, str):
        if z not in Z_POLICIES:
            raise ValueError(f"z must be one of {', '.join(Z_POLICIES)} or a positive float, got {z!r}")
        return -1.0
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not math.isfinite(z) or z <= 0:
        raise ValueError(f"z must be one of {', '.join(Z_POLICIES)} or a positive float, got {z!r}")
    return float(z)


@torch.no_grad()
def log_partition(features, memory, temperature, chunk_size=None):
    """(B,) lse_b = log sum_j exp(V[j].F[b] / T) over all N bank rows, in one
    streaming pass of B x chunk blocks (float64 for float64 features, else float32)."""
    acc = opmath(features.dtype)
    B, N = features.shape[0], memory.shape[0]
    chunk = min(chunk_size or default_chunk_size(B, N), N)
    Fs = features.detach().to(acc) / temperature
    lse = torch.full((B,), float("-inf"), dtype=acc, device=features.device)
    for start in range(0, N, chunk):
        S = Fs @ memory[start:start + chunk].to(acc).t()
        lse = torch.logaddexp(lse, torch.logsumexp(S, dim=1))
    return lse


def exact_z(features, memory, temperature, chunk_size=None):
    """Z = mean_b exp(lse_b), the exact partition function averaged over the batch
    (a Python float, computed in float64 and kept within float32's range)."""
    lse = log_partition(features, memory, temperature, chunk_size).double()
    log_z = float(torch.logsumexp(lse, 0)) - math.log(lse.shape[0])
    return min(math.exp(min(log_z, 709.0)), _F32_MAX)


def bias_corrected_factor(a, step):
    """a_t of the bias-corrected EMA at step t >= 1 (0 at t = 1)."""
    return a * (1 - a ** (step - 1)) / (1 - a ** step)


def prepare(policy, z, step, features, memory, temperature, *, z_ema=0.99, z_every=DEFAULT_EVERY):
    """(Z input tensor, ``z_ema`` argument of ``nce_loss``) for step ``step`` (0-based) of
    ``policy``, given the Z state ``z`` (left unchanged). The input is a fresh (1,) float32
    tensor: pass it as ``nce_loss``'s ``z`` (the op estimates Z when it is <= 0 and writes
    the Z it used into it), then copy it into the state once the call has succeeded."""
    z_in = z.detach().reshape(1).to(torch.float32).clone()
    ema = None                        # first-batch, fixed, exact between refreshes
    if policy == "ema":
        ema = z_ema
    elif policy == "ema-bc":
        if step == 0:
            z_in.fill_(-1.0)
        else:
            ema = bias_corrected_factor(z_ema, step + 1)
    elif policy == "batch":
        z_in.fill_(-1.0)
    elif policy == "exact" and (step % z_every == 0 or float(z_in) <= 0):
        z_in.fill_(exact_z(features, memory, temperature))
    return z_in, ema


DISTRIBUTED_POLICIES = ("first-batch", "ema", "batch")


def per_batch_hook(module, _inputs):
    """A forward pre-hook that makes a loss module with lemniscate's Z state (the
    distributed losses) re-estimate Z from every batch: Z <= 0 means "estimate"."""
    with torch.no_grad():
        module.z.fill_(-1.0)


"""Exact non-parametric softmax over the whole bank (SPEC 1.2):
``nonparametric_softmax_loss``. Streams over the bank in chunks with an online
log-sum-exp; never holds the B x N logits."""
from __future__ import annotations

import torch

from .. import _backend, _validate
from .bank_update import bank_update_

DEFAULT_CHUNK = 65536


def _softmax_forward_chunked(features, memory, indices, temperature, chunk=DEFAULT_CHUNK):
    """(loss, grad_features) in fp32 (fp64 for fp64 features), two streaming passes."""
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    F = features.to(acc)
    B, N = F.shape[0], memory.shape[0]
    m = torch.full((B,), float("-inf"), dtype=acc, device=F.device)
    l = torch.zeros(B, dtype=acc, device=F.device)
    for start in range(0, N, chunk):
        logits = F @ memory[start:start + chunk].to(acc).t() / temperature
        m_new = torch.maximum(m, logits.amax(1))
        l = l * torch.exp(m - m_new) + torch.exp(logits - m_new[:, None]).sum(1)
        m = m_new
    lse = m + torch.log(l)
    Vy = memory[indices].to(acc)
    loss = (lse - (F * Vy).sum(1) / temperature).mean()
    pv = torch.zeros_like(F)
    for start in range(0, N, chunk):
        Vc = memory[start:start + chunk].to(acc)
        pv += torch.exp(F @ Vc.t() / temperature - lse[:, None]) @ Vc
    grad = (pv - Vy) / (temperature * B)
    return loss, grad


@torch.library.custom_op("instdisc::softmax_forward_reference", mutates_args=())
def softmax_forward_reference(features: torch.Tensor, memory: torch.Tensor, indices: torch.Tensor,
                              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _softmax_forward_chunked(features, memory, indices, temperature)


@softmax_forward_reference.register_fake
def _(features, memory, indices, temperature):
    acc = torch.float64 if features.dtype == torch.float64 else torch.float32
    return features.new_empty((), dtype=acc), features.new_empty(features.shape, dtype=acc)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.features_dtype = inputs[0].dtype


def _backward(ctx, grad_loss, grad_grad):
    (g,) = ctx.saved_tensors
    return (grad_loss.to(g.dtype) * g).to(ctx.features_dtype), None, None, None


torch.library.register_autograd("instdisc::softmax_forward_reference", _backward, setup_context=_setup_context)


def nonparametric_softmax_loss(features, memory, indices, *, temperature=0.07, momentum=0.5,
                               update_memory=True, validate=True, backend="auto"):
    """Exact non-parametric softmax loss over all N bank rows (SPEC 1.2), mean over the batch.

    The memory bank is updated in place after the loss has read it when ``update_memory``.
    """
    _validate.check_features_memory_indices(features, memory, indices, values=validate)
    _validate.check_temperature(temperature)
    _validate.check_momentum(momentum)
    be = _backend.resolve(backend, features.device, op="nonparametric_softmax_loss")
    indices = indices.long().contiguous()
    loss, _ = torch.ops.instdisc.softmax_forward_reference(features.contiguous(), memory, indices, float(temperature))
    if update_memory:
        bank_update_(memory, indices, features.detach(), momentum, backend="auto", validate=False)
    del be
    return loss

"""NCEAverage as torch.library custom ops, the path ``NCEAverage.forward`` takes while
torch.compile traces it (``fullgraph=True`` works; the eager path is nce_average.py's).

The eager autograd.Function reads [K, T, Z, m] on the host, keeps Python state on its
node (the bank-write log, the fused NCECriterion hand-off, one update per forward) and
stores the bank by reference; Dynamo cannot trace any of that. Here the host reads
happen inside opaque ops, so the traced graph holds only:

* ``instdisc::nce_average_forward(x, y, memory, idx, params, backend) -> (probs, z_out, tm)``
  (functional; reads T and Z from ``params``; tm = (T, momentum), a copy kept for the
  backward, which must not see the Z that set_z_ writes into ``params``; autograd
  registered below),
* ``instdisc::nce_average_set_z_(params, z_out)``: stores the first batch's Z estimate
  when ``params[2] < 0`` (the same check and message as eager),
* in backward, ``instdisc::nce_average_backward(grad, probs, x, y, memory, idx, tm,
  backend) -> grad_x``: dF from nce_probs_backward, then the momentum update of the rows y
  (mutates ``memory``).

Differences from eager: the criterion is not fused into the forward (same values, a
second read of the rows in backward); the bank is saved for backward as a tensor, so
a bank changed between a forward and its backward (two forwards before one backward)
is a RuntimeError from autograd ("modified by an inplace operation") instead of being
corrected from the write log; ``backward(retain_graph=True)`` is refused by the compiled
backward (donated buffers; with torch._functorch.config.donated_buffer = False a second
backward would update the bank a second time).
"""
from __future__ import annotations

import torch

from ..ops import nce_probs as _probs
from ..ops.bank_update import backend_after_loss, bank_update_


@torch.library.custom_op("instdisc::nce_average_forward", mutates_args=())
def nce_average_forward(x: torch.Tensor, y: torch.Tensor, memory: torch.Tensor, idx: torch.Tensor,
                        params: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    T = float(params[1])
    probs, z_out = _probs.nce_probs(x, memory, idx, params[2], T, backend)
    return probs, z_out.clone(), params[[1, 3]].clone()


@nce_average_forward.register_fake
def _(x, y, memory, idx, params, backend):
    return (*_probs._probs_fake(x, memory, idx, params, 1.0), params.new_empty((2,)))


@torch.library.custom_op("instdisc::nce_average_set_z_", mutates_args=("params",))
def nce_average_set_z_(params: torch.Tensor, z_out: torch.Tensor) -> None:
    if float(params[2]) < 0:
        from .nce_average import _set_z
        _set_z(params, z_out, float(params[1]))


@nce_average_set_z_.register_fake
def _(params, z_out):
    return None


@torch.library.custom_op("instdisc::nce_average_backward", mutates_args=("memory",))
def nce_average_backward(grad_probs: torch.Tensor, probs: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                         memory: torch.Tensor, idx: torch.Tensor, tm: torch.Tensor, backend: str) -> torch.Tensor:
    T, momentum = tm.tolist()
    grad_x = _probs.nce_probs_backward(grad_probs, probs, memory, idx, T, backend)
    bank_update_(memory, y, x, momentum, backend=backend_after_loss(backend, memory.device), validate=False)
    torch.autograd.graph.increment_version(memory)    # a forward that saved the old bank must not use it
    return grad_x.to(x.dtype)


@nce_average_backward.register_fake
def _(grad_probs, probs, x, y, memory, idx, tm, backend):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, y, memory, idx, _params, backend = inputs
    ctx.save_for_backward(x.detach(), y, memory, idx, output[0], output[2])
    ctx.backend = backend


def _backward(ctx, grad_probs, _grad_z, _grad_tm):
    x, y, memory, idx, probs, tm = ctx.saved_tensors
    grad_x = torch.ops.instdisc.nce_average_backward(grad_probs.contiguous(), probs, x, y, memory, idx, tm,
                                                     ctx.backend)
    return grad_x, None, None, None, None, None


torch.library.register_autograd("instdisc::nce_average_forward", _backward, setup_context=_setup_context)


def traced_forward(x, y, memory, idx, params, backend):
    """The compile path of NCEAverage.forward: P (B x (K+1)) in x's dtype."""
    probs, z_out, _ = torch.ops.instdisc.nce_average_forward(x, y, memory, idx, params, backend)
    torch.ops.instdisc.nce_average_set_z_(params, z_out)
    return probs.to(x.dtype)

"""Drop-in ``NCECriterion`` (lemniscate.pytorch, docs/method.md#noise-contrastive-estimation-nce and 5).

    loss = -(1/B) sum_b [ log(P[b,0] / (P[b,0] + K Pn + eps)) + sum_k log(K Pn / (P[b,k] + K Pn + eps)) ]

with Pn = 1/nLem, returned with the original's shape (1,). Applied directly to
the output of the drop-in ``NCEAverage`` (same N) on a backend that fuses it,
the loss and dloss/dP are the ones that forward already computed, and so is the
gradient of x (see nce_average.py); otherwise they are computed here from P.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops._formulas import nce_grad_probs, nce_loss_from_probs
from . import _args
from .nce_average import fused_node


def criterion_loss(p, num_samples):
    """The loss from P (B x (K+1)), accumulated in float64, as a (1,) tensor of P's dtype."""
    return nce_loss_from_probs(p, (p.shape[1] - 1) / num_samples).to(p.dtype).reshape(1)


def criterion_grad(p, num_samples, grad_loss):
    """dloss/dP times grad_loss (a (1,) tensor)."""
    return nce_grad_probs(p, (p.shape[1] - 1) / num_samples, grad_loss.to(p.dtype))


class _Criterion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, num_samples, node):
        ctx.num_samples, ctx.node, ctx.p_dtype = num_samples, node, p.dtype
        if node is not None:
            return node.fused_loss.to(p.dtype).reshape(1)
        ctx.save_for_backward(p)
        return criterion_loss(p, num_samples)

    @staticmethod
    def backward(ctx, grad_loss):
        node = ctx.node
        if node is None:
            (p,) = ctx.saved_tensors
            return criterion_grad(p, ctx.num_samples, grad_loss), None, None
        # dloss/dP from the forward pass (scaled unless grad_loss is 1, as after loss.backward());
        # NCEAverage's backward recognises this exact tensor and uses its forward dloss/dx
        g = node.fused_grad_probs
        if not (grad_loss.device.type == "cpu" and bool(grad_loss == 1)):
            g = g * grad_loss.to(g.dtype)
        g = g.to(ctx.p_dtype)
        node.criterion_grad = (g, g._version, grad_loss)
        return g, None, None


class NCECriterion(nn.Module):
    """lemniscate's NCECriterion: ``loss = criterion(out, y)`` (y unused); loss of shape (1,)."""

    def __init__(self, nLem: int) -> None:
        super().__init__()
        self.nLem = _args.positive_int(nLem, "nLem")

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be the floating (B, K+1) output of NCEAverage, got {type(x).__name__}"
                            + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
        if x.dim() != 2 or x.shape[1] < 2 or x.shape[0] == 0:
            raise ValueError(f"x must be the (B, K+1) output of NCEAverage, got shape {tuple(x.shape)}")
        fused = x.requires_grad and not torch.compiler.is_compiling()   # no fusion in a traced graph
        return _Criterion.apply(x, self.nLem, fused_node(x, self.nLem) if fused else None)

"""Drop-in ``LinearAverage`` (lemniscate.pytorch's exact softmax, ``--nce-k 0``; docs/method.md, docs/lemniscate.md).

``out = lemniscate(x, y)`` returns the logits V . x / T (B x N), used with
``nn.CrossEntropyLoss()(out, y)``; the bank rows y are updated during backward,
once per forward. The arithmetic is the original's (mm, then an in-place
division by T; backward: the incoming gradient divided by T, mm with the bank),
so results are bit-identical. Like the original, backward divides the incoming
B x N gradient in place, but only when nothing else references it
(_exclusive.py); otherwise it divides a copy.
"""
from __future__ import annotations

import torch

from .. import _validate
from ..ops.bank_update import backend_after_loss
from . import _args, _exclusive
from ._bank_log import LoggedBankModule
from .nce_average import init_memory


class _LinearAverageFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, memory, params, log):
        T, momentum = params.tolist()
        xd = x.detach()
        out = torch.mm(xd.to(memory.dtype), memory.t())
        out.div_(T)
        ctx.save_for_backward(xd, y)
        ctx.memory, ctx.version, ctx.log = memory, memory._version, log   # the bank by reference
        ctx.T, ctx.momentum, ctx.updated = T, momentum, False
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        counts = _exclusive.counts_of(grad_out)
        x, y = ctx.saved_tensors
        memory = ctx.memory
        if grad_out.dtype == memory.dtype and _exclusive.exclusive(grad_out, counts):
            g = grad_out.div_(ctx.T)           # in place, as the original (nobody else can see it)
        else:
            g = grad_out.to(memory.dtype) / ctx.T
        grad_x = torch.mm(g, memory)
        changed = ctx.log.delta(memory, ctx.version, grad_x.dtype)
        if changed is not None:               # rows moved by a later forward's backward: as at forward time
            rows, delta = changed
            grad_x.addmm_(g.index_select(1, rows), delta)
        if not ctx.updated:                   # one forward, one bank update (also with retain_graph)
            ctx.updated = True
            ctx.log.update_(memory, y, x, ctx.momentum, backend_after_loss("auto", memory.device))
        return grad_x.to(x.dtype), None, None, None, None


class LinearAverage(LoggedBankModule):
    """lemniscate's LinearAverage: returns logits / T (B x N), used with ``nn.CrossEntropyLoss()(out, y)``.

    Buffers ``params`` = [T, momentum] and ``memory`` (N x D); the bank is updated during backward."""

    def __init__(self, inputSize: int, outputSize: int, T: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        inputSize = _args.positive_int(inputSize, "inputSize")
        outputSize = _args.positive_int(outputSize, "outputSize")
        params = torch.tensor([_args.temperature(T), _args.momentum(momentum)])
        self._setup(params, init_memory(outputSize, inputSize))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _validate.check_features_memory_indices(x, self.memory, y, values=True)
        return _LinearAverageFunction.apply(x, y.long(), self.memory, self.params, self._bank_log)

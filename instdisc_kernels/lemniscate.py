"""Drop-in replacements for lemniscate.pytorch's ``NCEAverage``, ``NCECriterion``
and ``LinearAverage`` (SPEC 5): same constructor signatures, buffers
(``params``, ``memory``: lemniscate checkpoints load), outputs and update
timing (the bank is updated during backward). They run on CPU and GPU, on the
fused kernels where available.

    from instdisc_kernels.lemniscate import NCEAverage, NCECriterion, LinearAverage
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import _validate
from .ops import nce_probs as _probs
from .ops.bank_update import bank_update_

EPS = 1e-7


def _init_memory(outputSize, inputSize):
    stdv = 1.0 / math.sqrt(inputSize / 3)
    return torch.rand(outputSize, inputSize).mul_(2 * stdv).add_(-stdv)


def _check_xy(x, y, memory):
    _validate.check_features_memory_indices(x, memory, y, values=True)


class _NCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, memory, idx, params, backend):
        _, T, Z, momentum = params.tolist()                    # one host read of [K, T, Z, m]
        probs, z_out = _probs.nce_probs(x.detach(), memory, idx, params[2], T, backend)
        if Z < 0:
            params[2] = z_out.to(params.dtype).reshape(())
            print("normalization constant Z is set to {:.1f}".format(float(params[2])))
        # The bank is held by reference, not saved: it is updated in place in
        # backward. The gradient reads its rows at backward time, which are the
        # forward-time rows unless another backward updated them in between.
        ctx.save_for_backward(x.detach(), y, idx, probs)
        ctx.memory = memory
        ctx.T, ctx.momentum, ctx.backend = T, momentum, backend
        return probs.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, y, idx, probs = ctx.saved_tensors
        memory = ctx.memory
        grad_x = _probs.nce_probs_backward(grad_out, probs, memory, idx, ctx.T, ctx.backend)
        # then update the bank from the old rows, as lemniscate does in backward
        bank_update_(memory, y, x, ctx.momentum, backend=_backend_for_update(ctx.backend), validate=False)
        return grad_x.to(x.dtype), None, None, None, None, None


def _backend_for_update(backend):
    return "auto" if backend in ("cpu", "cuda") else backend


class NCEAverage(nn.Module):
    """lemniscate's NCEAverage: ``out = lemniscate(x, y)`` returns P (B x (K+1)), column 0 the positive.

    Z is estimated on the first forward (stored in ``params[2]``) unless given.
    The bank row of each y is updated during backward. ``forward(x, y, idx)``
    also accepts an explicit (B, K+1) index matrix (column 0 is set to y).
    """

    def __init__(self, inputSize, outputSize, K, T=0.07, momentum=0.5, Z=None, backend="auto"):
        super().__init__()
        _validate.check_positive_int(inputSize, "inputSize")
        _validate.check_positive_int(outputSize, "outputSize")
        _validate.check_positive_int(K, "K")
        _validate.check_temperature(T, "T")
        _validate.check_momentum(momentum)
        self.nLem = outputSize
        self.K = K
        self.backend = backend
        self.register_buffer("params", torch.tensor([K, T, -1 if Z is None else Z, momentum]))
        self.register_buffer("memory", _init_memory(outputSize, inputSize))

    def forward(self, x, y, idx=None):
        _check_xy(x, y, self.memory)
        B = x.shape[0]
        if idx is None:
            idx = torch.randint(0, self.nLem, (B, self.K + 1), device=x.device)
        else:
            _validate.check_tensor("idx", idx)
            if idx.dim() != 2 or idx.shape[0] != B or idx.shape[1] < 2:
                raise ValueError(f"idx must have shape (B={B}, K+1>=2), got {tuple(idx.shape)}")
            _validate.check_index_range("idx", idx[:, 1:], self.nLem)
            idx = idx.long().clone()
        idx[:, 0] = y
        backend = _probs.resolve(self.backend, x.device)
        return _NCEFunction.apply(x, y.long(), self.memory, idx, self.params, backend)


class NCECriterion(nn.Module):
    """lemniscate's NCECriterion: ``loss = criterion(out, y)`` (y unused)."""

    def __init__(self, nLem):
        super().__init__()
        _validate.check_positive_int(nLem, "nLem")
        self.nLem = nLem

    def forward(self, x, targets=None):
        if x.dim() != 2 or x.shape[1] < 2:
            raise ValueError(f"x must be the (B, K+1) output of NCEAverage, got shape {tuple(x.shape)}")
        B, K = x.shape[0], x.shape[1] - 1
        Pn = 1.0 / float(self.nLem)
        p_pos = x[:, 0]
        ln_pmt = torch.log(p_pos / (p_pos + K * Pn + EPS))
        ln_pon = torch.log((K * Pn) / (x[:, 1:] + K * Pn + EPS))
        return -(ln_pmt.sum() + ln_pon.sum()) / B


class _LinearAverageFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, memory, params):
        T, momentum = params.tolist()
        out = torch.mm(x.detach().to(memory.dtype), memory.t()).to(x.dtype) / T
        ctx.save_for_backward(x.detach(), y)
        ctx.memory = memory                      # updated in place in backward
        ctx.T, ctx.momentum = T, momentum
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, y = ctx.saved_tensors
        memory = ctx.memory
        grad_x = torch.mm((grad_out / ctx.T).to(memory.dtype), memory).to(x.dtype)
        bank_update_(memory, y, x, ctx.momentum, validate=False)
        return grad_x, None, None, None


class LinearAverage(nn.Module):
    """lemniscate's LinearAverage (exact softmax, ``--nce-k 0``): returns logits/T (B x N),
    used with ``nn.CrossEntropyLoss()(out, y)``; the bank is updated during backward."""

    def __init__(self, inputSize, outputSize, T=0.07, momentum=0.5):
        super().__init__()
        _validate.check_positive_int(inputSize, "inputSize")
        _validate.check_positive_int(outputSize, "outputSize")
        _validate.check_temperature(T, "T")
        _validate.check_momentum(momentum)
        self.nLem = outputSize
        self.register_buffer("params", torch.tensor([T, momentum]))
        self.register_buffer("memory", _init_memory(outputSize, inputSize))

    def forward(self, x, y):
        _check_xy(x, y, self.memory)
        return _LinearAverageFunction.apply(x, y.long(), self.memory, self.params)

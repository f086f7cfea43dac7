"""Drop-in ``NCEAverage`` (lemniscate.pytorch, docs/method.md#noise-contrastive-estimation-nce and 5).

``out = lemniscate(x, y)`` returns P = exp(V[idx] . x / T) / Z (B x (K+1), column 0
the positive y); the bank rows y are updated during backward, once per forward.
When ``NCECriterion`` is applied directly to the output (the lemniscate script's
``criterion(out, index)``) on the "cpu" or "eager" backend, the forward also
computes the criterion's loss and dloss/dx in the same pass over the gathered
rows, and the backward uses them instead of reading the rows a second time.
While torch.compile traces ``forward``, it takes the custom-op path of
_nce_average_ops.py instead (fullgraph-traceable; docs/lemniscate.md).
"""
from __future__ import annotations

import math

import torch

from .. import _backend, _validate
from ..memory_bank import uniform_init
from ..ops import nce_probs as _probs
from ..ops.bank_update import backend_after_loss
from . import _args, _nce_average_ops
from ._bank_log import LoggedBankModule, nce_correction_


def init_memory(outputSize, inputSize):
    """lemniscate's bank (memory_bank.uniform_init), from the default RNG as the original draws it."""
    return uniform_init(outputSize, inputSize)


class UniformSampler:
    """``NCEAverage.multinomial``: ``draw(n)`` returns n int64 indices drawn uniformly from
    [0, N) on the bank's device (what lemniscate's alias sampler gives for its uniform unigrams)."""

    def __init__(self, num_samples, device):
        self.num_samples, self.device = num_samples, device

    def draw(self, n):
        return torch.randint(0, self.num_samples, (int(n),), device=self.device)


def check_idx(idx, B, N):
    """An explicit (B, K+1) index matrix: integer (TypeError otherwise), in range."""
    _validate.check_tensor("idx", idx)
    if idx.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"idx must be an integer (int64) tensor, got {idx.dtype}")
    if idx.dim() != 2 or idx.shape[0] != B or idx.shape[1] < 2:
        raise ValueError(f"idx must have shape (B={B}, K+1>=2), got {tuple(idx.shape)}")
    _validate.check_index_range("idx", idx[:, 1:], N)


def _set_z(params, z_out, T):
    """Store the Z estimated on the first batch; a non-finite estimate is an error (nothing stored)."""
    z = float(z_out)
    if not (math.isfinite(z) and z > 0):
        raise ValueError(
            f"the normalization constant Z estimated on the first batch is {z} (exp(V . x / T) overflows or is "
            f"NaN): T={T} is too small for these features / memory rows; pass a larger T or an explicit Z")
    params[2] = z_out.to(params.dtype).reshape(())
    print("normalization constant Z is set to {:.1f}".format(z))


class _NCEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, memory, idx, params, backends, log, fused):
        backend, bank_backend = backends
        _, T, Z, momentum = params.tolist()                    # one host read of [K, T, Z, m]
        xd = x.detach()
        ctx.fused_loss = ctx.fused_grad = ctx.fused_grad_probs = ctx.criterion_grad = None
        if fused:
            probs, loss, grad, grad_probs, z_out = _probs.nce_probs_loss(xd, memory, idx, params[2], T, backend)
            ctx.fused_loss, ctx.fused_grad, ctx.fused_grad_probs = loss, grad, grad_probs
        else:
            probs, z_out = _probs.nce_probs(xd, memory, idx, params[2], T, backend)
        if Z < 0:
            _set_z(params, z_out, T)
        ctx.save_for_backward(xd, y, idx, probs)
        ctx.memory, ctx.version, ctx.log = memory, memory._version, log   # the bank by reference
        ctx.T, ctx.momentum, ctx.backend, ctx.num_samples = T, momentum, backend, memory.shape[0]
        ctx.bank_backend = bank_backend
        ctx.updated = False
        return probs.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, y, idx, probs = ctx.saved_tensors
        memory, token = ctx.memory, ctx.criterion_grad
        ctx.criterion_grad = None
        if token is not None and grad_out is token[0] and grad_out._version == token[1]:
            # grad_out is exactly NCECriterion's gradient: its dloss/dx was computed in forward
            grad_x = ctx.fused_grad * token[2].to(ctx.fused_grad.dtype)
        else:
            grad_x = _probs.nce_probs_backward(grad_out, probs, memory, idx, ctx.T, ctx.backend)
            changed = ctx.log.delta(memory, ctx.version, grad_x.dtype)
            if changed is not None:           # rows moved by a later forward's backward: as at forward time
                coef = grad_out.to(grad_x.dtype) * probs.to(grad_x.dtype) / ctx.T
                nce_correction_(grad_x, coef, idx, *changed)
        if not ctx.updated:                   # one forward, one bank update (also with retain_graph)
            ctx.updated = True
            ctx.log.update_(memory, y, x, ctx.momentum, ctx.bank_backend)
        return grad_x.to(x.dtype), None, None, None, None, None, None, None


def fused_node(out, num_samples):
    """The _NCEFunction node whose fused loss belongs to ``out`` (the unmodified output), or None."""
    node = out.grad_fn
    if (isinstance(node, _NCEFunction._backward_cls) and node.fused_loss is not None
            and out._version == 0 and node.num_samples == num_samples):
        return node
    return None


class NCEAverage(LoggedBankModule):
    """lemniscate's NCEAverage: ``out = lemniscate(x, y)`` returns P (B x (K+1)), column 0 the positive.

    Buffers ``params`` = [K, T, Z, momentum] and ``memory`` (N x D); Z is estimated on the
    first forward (stored in ``params[2]``) unless given. The bank row of each y is updated
    during backward, once per forward. ``forward(x, y, idx)`` also accepts an explicit
    integer (B, K+1) index matrix (column 0 is set to y).
    """

    def __init__(self, inputSize: int, outputSize: int, K: int, T: float = 0.07, momentum: float = 0.5,
                 Z: float | None = None, backend: str = "auto") -> None:
        super().__init__()
        inputSize = _args.positive_int(inputSize, "inputSize")
        outputSize = _args.positive_int(outputSize, "outputSize")
        K = _args.positive_int(K, "K")
        params = torch.tensor([K, _args.temperature(T), _args.normalization(Z), _args.momentum(momentum)])
        self._setup(params, init_memory(outputSize, inputSize), backend)

    def _setup(self, params, memory, backend="auto"):
        super()._setup(params, memory)
        self.K, self.backend = int(params[0]), _backend.canonical(backend)

    # lemniscate's alias sampler and its unigrams (uniform): kept for scripts that read them
    @property
    def multinomial(self):
        return UniformSampler(self.nLem, self.memory.device)

    @property
    def unigrams(self):
        return torch.full((self.nLem,), 1.0 / self.nLem)

    def forward(self, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        _validate.check_features_memory_indices(x, self.memory, y, values=True)
        B = x.shape[0]
        if idx is None:
            idx = self.multinomial.draw(B * (self.K + 1)).view(B, self.K + 1)
        else:
            check_idx(idx, B, self.nLem)
            idx = idx.long().clone()
        idx[:, 0] = y
        backend = _probs.TABLE.select(self.backend, x.device)
        if torch.compiler.is_compiling():     # traceable custom ops (see _nce_average_ops.py)
            return _nce_average_ops.traced_forward(x, y.long(), self.memory, idx, self.params, backend)
        fused = (torch.is_grad_enabled() and x.requires_grad and _probs.has_fused(backend, x.device))
        backends = (backend, backend_after_loss(self.backend, x.device))
        return _NCEFunction.apply(x, y.long(), self.memory, idx, self.params, backends, self._bank_log, fused)

"""Whether an incoming gradient is referenced by nothing but this backward call.

lemniscate's LinearAverage divides the incoming B x N gradient by T in place
(it allocates nothing). The drop-in does the same only when no one else can see
that tensor: no other reference from Python (a hook that kept it, the tensor
passed to ``backward(gradient=...)``), none from the autograd engine (a gradient
captured by ``torch.autograd.grad``, or shared with another branch of the
graph), no view of its storage, no graph of its own. The reference counts of a
gradient that is certainly exclusive are measured once, on a probe backward
that takes the same path; anything above them, or a missing counter, means
"not exclusive" and the caller divides out of place.
"""
from __future__ import annotations

import sys

import torch

_BASELINE = None


def _counts(g):
    use = getattr(g, "_use_count", None)
    if use is None:
        return None
    return sys.getrefcount(g), use(), torch._C._storage_Use_Count(g.untyped_storage()._cdata)


class _Probe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad_out):
        global _BASELINE
        counts = counts_of(grad_out)        # the first statement, as in the callers
        _BASELINE = counts
        return grad_out


def counts_of(grad_out):
    """The counts as seen from a backward: call it as its first statement, ``counts = counts_of(grad_out)``,
    as the probe does (a reference held anywhere else, even on the caller's stack, counts)."""
    return _counts(grad_out)


def _measure():
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.zeros(2, 3, requires_grad=True)
            (_Probe.apply(x) * 2.0).sum().backward()    # MulBackward hands the probe a fresh tensor
    except RuntimeError:                                # no baseline: never in place
        pass


_measure()                                              # at import: one tiny backward


def exclusive(grad_out, counts):
    """``counts``: counts_of(grad_out), taken directly in the backward."""
    base = _BASELINE
    if counts is None or base is None or grad_out.requires_grad or grad_out._base is not None:
        return False
    if not grad_out.is_contiguous():
        return False
    return all(c <= b for c, b in zip(counts, base))

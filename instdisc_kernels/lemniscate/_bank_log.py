"""Exact gradients when the bank changes between a forward and its backward.

lemniscate's modules update the memory bank in backward. A second forward that
reads the same rows before the first backward (two augmented views of each
image), or a second ``backward(retain_graph=True)``, would then see rows the
first backward already moved. Each drop-in module keeps a short log of the
writes its own backward made: (bank version before, version after, rows, their
old values). A backward whose forward saw an earlier version rebuilds the rows
as they were at its forward from that log; a change made by anything else (the
version moved with no log entry) is a clear RuntimeError.
"""
from __future__ import annotations

import collections

import torch

from ..ops.bank_update import bank_update_

MAX_ENTRIES = 16        # backward writes a forward may lag behind (B x D values each)


class BankWriteLog:
    def __init__(self):
        self.entries = collections.deque(maxlen=MAX_ENTRIES)

    def update_(self, memory, y, x, momentum, backend="auto"):
        """The momentum update of rows y with x, logged (and the bank's version bumped)."""
        before = memory._version
        old = memory.index_select(0, y)
        bank_update_(memory, y, x, momentum, backend=backend, validate=False)
        torch.autograd.graph.increment_version(memory)
        self.entries.append((before, memory._version, y, old))

    def rows_at(self, memory, version):
        """(rows, values): the rows written since ``version`` (sorted, unique) and their
        values at that version; None if the bank has not changed since."""
        now = memory._version
        if now == version:
            return None
        cur, rows, old = version, [], []
        for before, after, r, o in self.entries:
            if before == cur:
                rows.append(r)
                old.append(o)
                cur = after
        if cur != now:
            raise RuntimeError(
                "the memory bank was modified in place between this forward and its backward by something "
                "other than this module's own backward updates (or by more than "
                f"{MAX_ENTRIES} of them): the gradient would use rows the forward did not read. "
                "Run the backward before changing `memory`.")
        rows, old = torch.cat(rows), torch.cat(old)
        uniq, inv = torch.unique(rows, return_inverse=True)
        first = torch.full((uniq.shape[0],), rows.shape[0], dtype=torch.long, device=rows.device)
        first.scatter_reduce_(0, inv, torch.arange(rows.shape[0], device=rows.device), "amin")
        return uniq, old[first]                        # the oldest write holds the value at `version`

    def delta(self, memory, version, dtype):
        """(rows, then - now) of the rows changed since ``version``, in ``dtype``; None if unchanged."""
        changed = self.rows_at(memory, version)
        if changed is None:
            return None
        rows, then = changed
        return rows, then.to(dtype) - memory.index_select(0, rows).to(dtype)


def nce_correction_(grad, coef, idx, rows, delta):
    """grad[b] += sum_k coef[b,k] * delta[row idx[b,k]] over the entries of idx among ``rows``."""
    pos = torch.searchsorted(rows, idx).clamp_(max=rows.shape[0] - 1)
    b, k = (rows[pos] == idx).nonzero(as_tuple=True)
    grad.index_add_(0, b, coef[b, k, None] * delta[pos[b, k]])
    return grad


class LoggedBankModule(torch.nn.Module):
    """Base of the drop-in modules: buffers ``params`` and ``memory`` and a write log, which is
    not part of a checkpoint (a loaded module starts a fresh one)."""

    def _setup(self, params, memory):
        self.nLem = memory.shape[0]
        self.register_buffer("params", params)
        self.register_buffer("memory", memory)
        self._bank_log = BankWriteLog()

    @classmethod
    def from_buffers(cls, params, memory, **kwargs):
        """A module around existing ``params`` and ``memory`` (N x D), without the random init."""
        obj = cls.__new__(cls)
        torch.nn.Module.__init__(obj)
        obj._setup(params, memory, **kwargs)
        return obj

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_bank_log", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._bank_log = BankWriteLog()

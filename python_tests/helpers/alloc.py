"""Test helper: a dispatch mode that records the tensors ATen allocates (to show that a kernel
never materialises a B x N or B x K buffer)."""
import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class AllocTracker(TorchDispatchMode):
    """Records every tensor allocated by ATen ops: the largest one and the peak live total."""

    def __init__(self, *inputs):
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in inputs}
        self.sizes = {}
        self.live = self.peak = self.largest = 0

    def _free(self, key):
        self.live -= self.sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage().data_ptr()
            if key in self.skip or key in self.sizes or key == 0:
                continue
            n = t.untyped_storage().nbytes()
            self.sizes[key] = n
            self.live += n
            self.largest = max(self.largest, n)
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, key)
        return out

"""Drop-in replacements for lemniscate.pytorch's ``NCEAverage``, ``NCECriterion``
and ``LinearAverage`` (docs/lemniscate.md#the-modules): same constructor signatures, buffers (``params``,
``memory``), outputs and update timing (the bank is updated during backward,
once per forward). They run on CPU and GPU, on the fused kernels where available.

    from instdisc_kernels.lemniscate import NCEAverage, NCECriterion, LinearAverage

Whole-module checkpoints of these classes load with plain ``torch.load(path)``
(they are allow-listed for ``weights_only`` loading at import);
``load_checkpoint(path)`` reads a checkpoint written by the original modules
without lemniscate's code and returns it with the drop-ins in their place.
"""
import torch

from .checkpoint import load_checkpoint
from .criterion import NCECriterion
from .linear_average import LinearAverage
from .nce_average import NCEAverage

# Pickles name the classes by this public path (as before they moved into the
# package's files), and a module pickles as its class plus its __dict__ (plain
# Python values, dicts, OrderedDicts, sets and tensors), all of which
# weights_only loading allows once the class itself is allow-listed.
for _cls in (NCEAverage, NCECriterion, LinearAverage):
    _cls.__module__ = __name__
torch.serialization.add_safe_globals([NCEAverage, NCECriterion, LinearAverage])

__all__ = ["NCEAverage", "NCECriterion", "LinearAverage", "load_checkpoint"]

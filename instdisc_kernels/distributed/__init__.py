"""Multi-GPU / multi-node InstDisc on torch.distributed (docs/scaling.md).

    DistributedInstDiscLoss(num_samples, dim, mode="replicated" | "sharded", ...)
    save_sharded(criterion, path) / load_resharded(criterion, path)

Replicated: every rank holds the whole bank and applies the global batch's
update. Sharded: rank r holds a contiguous slice of the rows; the loss,
gradients, Z, exact softmax and kNN are computed per shard and combined with
O(B_global * D) communication per step.
"""
from .checkpoint import load_resharded, save_sharded
from .loss import DistributedInstDiscLoss

__all__ = ["DistributedInstDiscLoss", "save_sharded", "load_resharded"]

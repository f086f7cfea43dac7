"""Collective helpers for the distributed memory banks (gloo and NCCL).

Every helper is called by every rank of ``group`` in the same order. Tensors
passed to collectives live on the bank's device (CUDA for NCCL).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_ERROR_TYPES = {"TypeError": TypeError, "ValueError": ValueError, "FileNotFoundError": FileNotFoundError,
                "OSError": OSError, "KeyError": ValueError}


def rank_and_size(group):
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group, group_rank):
    """The global rank of ``group_rank`` in ``group`` (what src/dst arguments take)."""
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def agree(error, values, *, group, device):
    """Check-then-agree: one all_gather of (error flag, *values) from every rank.

    ``error`` is the exception this rank's local checks raised, or None. When any
    rank has one, every rank raises the same exception (the first failing rank's
    type; message naming the failing ranks), so no rank is left waiting in a
    later collective. Returns the (world_size, len(values)) table of ``values``
    as a CPU int64 tensor.
    """
    row = torch.tensor([0 if error is None else 1, *[int(v) for v in values]], dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    out = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(out, row, group=group)
    table = torch.stack(out).cpu()
    if bool(table[:, 0].any()):
        _raise_everywhere(error, group, world)
    return table[:, 1:]


def _raise_everywhere(error, group, world):
    info = None if error is None else (type(error).__name__, str(error))
    infos = [None] * world
    dist.all_gather_object(infos, info, group=group)
    failed = [(r, i) for r, i in enumerate(infos) if i is not None]
    cls = _ERROR_TYPES.get(failed[0][1][0], ValueError)
    msg = "; ".join(f"rank {r}: {m}" for r, (_, m) in failed)
    raise cls(f"{msg} (input rejected on {len(failed)} of {world} ranks; every rank raises)") from error


def all_gather_rows(t, sizes, group):
    """Every rank's ``t`` (sizes[r] rows, same trailing shape) concatenated in rank order."""
    m = max(sizes)
    if t.shape[0] == m:
        buf = t.contiguous()
    else:
        buf = t.new_zeros((m,) + tuple(t.shape[1:]))
        buf[: t.shape[0]] = t
    out = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(out, buf, group=group)
    return torch.cat([o[:s] for o, s in zip(out, sizes)])


_RS_UNSUPPORTED = set()


def reduce_scatter_rows(t, sizes, rank, group):
    """Sum ``t`` (sum(sizes) rows, in rank order) over ranks; return this rank's sizes[rank] rows."""
    m = max(sizes)
    t = t.contiguous()
    parts = []
    for p in torch.split(t, sizes):       # row blocks of a contiguous tensor: no copy unless padded
        if p.shape[0] < m:
            buf = t.new_zeros((m,) + tuple(t.shape[1:]))
            buf[: p.shape[0]] = p
            p = buf
        parts.append(p)
    backend = dist.get_backend(group)
    if backend not in _RS_UNSUPPORTED:
        out = torch.empty_like(parts[0])
        try:
            dist.reduce_scatter(out, parts, group=group)
            return out[: sizes[rank]]
        except RuntimeError as e:  # an old gloo: raised locally on every rank, before any communication
            if "support" not in str(e).lower():
                raise
            _RS_UNSUPPORTED.add(backend)
    full = torch.stack(parts)
    dist.all_reduce(full, group=group)
    return full[rank, : sizes[rank]]


def all_to_all_rows(t, send_sizes, recv_sizes, group):
    """Rows send_sizes[r] of ``t`` (in order) go to rank r; returns the received rows in source-rank order."""
    out = t.new_empty((sum(recv_sizes),) + tuple(t.shape[1:]))
    dist.all_to_all_single(out, t.contiguous(), output_split_sizes=list(recv_sizes),
                           input_split_sizes=list(send_sizes), group=group)
    return out


def all_reduce_(t, op="sum", group=None):
    dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op], group=group)
    return t

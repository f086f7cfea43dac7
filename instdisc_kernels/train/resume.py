"""Resuming a run: the checks that a checkpoint fits this run's arguments, and the restore of
the weights, the bank and Z, the optimiser, the schedule and every RNG stream (per rank)."""
from __future__ import annotations

import os
import sys

from ..checkpoint import CheckpointError, rng_state, set_rng_state
from ..models import unwrap
from .config import ConfigError

# Arguments that must match the checkpoint when resuming (the bank and the weights depend on them).
STRUCTURAL = ("dataset", "arch", "feat_dim", "bank_dtype", "image_size")


def check_compatible(ck, args, num_samples):
    """CheckpointError when the run cannot continue from checkpoint ``ck``."""
    old = ck["args"]
    bad = [f"--{k.replace('_', '-')} {old.get(k)} (checkpoint) vs {getattr(args, k)} (now)"
           for k in STRUCTURAL if old.get(k) != getattr(args, k)]
    if ck["num_samples"] != num_samples:
        bad.append(f"dataset size: the checkpoint's memory bank has {ck['num_samples']} rows, this run has "
                   f"{num_samples} training images (check --dataset, --limit-train)")
    if ck["feat_dim"] != args.feat_dim and not any(b.startswith("--feat-dim") for b in bad):
        bad.append(f"feature dim {ck['feat_dim']} (checkpoint) vs {args.feat_dim} (now)")
    if bad:
        raise CheckpointError("cannot resume from this checkpoint with these arguments: " + "; ".join(bad))


def restore(ck, args, model, criterion, optimizer, scheduler, rank, world, distributed):
    """Load checkpoint ``ck`` into the run: weights, bank and Z, optimiser, schedule and every
    RNG stream (per rank when distributed: each rank gets its own saved streams back)."""
    unwrap(model).load_state_dict(ck["model"])
    resume_dir = os.path.dirname(os.path.abspath(args.resume))
    if distributed and ck["criterion"] is not None:     # a --bank local checkpoint: take our rows
        lo, hi = criterion.shard_range
        criterion.memory.copy_(ck["criterion"]["bank.memory"][lo:hi])
        criterion.z.copy_(ck["criterion"]["z"])
    elif distributed:   # the bank is in <checkpoint folder>/bank, saved at any world size
        from ..distributed import load_resharded
        load_resharded(criterion, os.path.join(resume_dir, "bank"), expect_meta=ck.get("bank_meta"))
    elif ck["criterion"] is None:
        raise ConfigError(f"{args.resume} was written by --bank replicated/sharded (its bank is in "
                          f"bank/ next to it): resume it with --bank replicated or sharded")
    streams = ck.get("rank_rng")
    if not distributed:
        criterion.load_state_dict(ck["criterion"])
        rng, gen_state = ck["rng"], ck["criterion_generator"]
    elif streams is not None and len(streams) == world:
        rng, gen_state = streams[rank]["rng"], streams[rank]["criterion_generator"]
    else:               # another world size (or a --bank local checkpoint): new per-rank streams
        if rank == 0:
            print(f"note: {args.resume} holds the RNG streams of {len(streams) if streams else 1} process(es), "
                  f"this run has {world}: the negatives are reseeded, so the run will not repeat an "
                  f"uninterrupted one bit for bit", file=sys.stderr)
        rng, gen_state = ck["rng"], None
        criterion.generator.manual_seed(args.seed + 1 + 1_000_003 * rank + 7919 * ck["epoch"])
    if gen_state is not None:
        criterion.generator.set_state(gen_state)
    optimizer.load_state_dict(ck["optimizer"])
    scheduler.load_state_dict(ck["scheduler"])
    set_rng_state(rng)


def rank_rng_streams(criterion, world):
    """Every rank's RNG streams (python, numpy, torch, CUDA, the negatives' generator), in rank
    order, on every rank (one all_gather_object per epoch, a few kB)."""
    import torch.distributed as dist
    out = [None] * world
    dist.all_gather_object(out, {"rng": rng_state(), "criterion_generator": criterion.generator.get_state()})
    return out

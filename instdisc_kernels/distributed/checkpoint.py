"""Bank checkpoints that load at any world size: ``save_sharded`` / ``load_resharded``.

Layout of a checkpoint directory::

    index.json                     format, num_samples, dim, dtype, z, world_size, files, meta
    rows-<lo>-<hi>.pt              {"rows": [lo, hi], "memory": (hi-lo, D) tensor, "sha256": ..., ...}

Each rows file stores the SHA-256 of its rows; loading refuses a file whose rows no
longer match it. ``meta`` is the caller's (e.g. the trainer's epoch), checked on load
with ``expect_meta``. Temporary files of a save killed midway are removed by the next
save.

A sharded criterion writes one file per rank; a replicated one writes one file
(rank 0) with every row. Loading reads, on each rank, only the row ranges that
overlap its own rows (memory-mapped), so a checkpoint saved by W ranks loads on
W' ranks, in either mode. The directory must be visible to every rank (a
shared filesystem on multi-node jobs).
"""
from __future__ import annotations

import json
import os
import re

import torch

from ..checkpoint import digest
from . import _comm

FORMAT = "instdisc-bank-rows/1"
_NAME = re.compile(r"^rows-\d{12}-\d{12}\.pt$")
_TEMP = re.compile(r"^(rows-\d{12}-\d{12}\.pt\.tmp\d+|index\.json\.tmp)$")


def _name(lo, hi):
    return f"rows-{lo:012d}-{hi:012d}.pt"


def save_sharded(criterion, path, meta=None):
    """Save the bank (and Z) of a DistributedInstDiscLoss under directory ``path``.

    Every rank must call it. Returns when the whole checkpoint is written; an I/O
    error on any rank raises on every rank. ``meta``: a JSON-able dict stored in
    index.json (see load_resharded's expect_meta)."""
    group, rank, device = criterion.group, criterion.rank, criterion.device
    lo, hi = criterion.shard_range
    writes = criterion.mode == "sharded" or rank == 0
    err = None
    try:
        os.makedirs(path, exist_ok=True)
        if writes:
            final = os.path.join(path, _name(lo, hi))
            mem = criterion.memory.detach().cpu()
            torch.save({"format": FORMAT, "num_samples": criterion.num_samples, "dim": criterion.dim,
                        "rows": [lo, hi], "memory": mem, "sha256": digest(mem)}, final + f".tmp{rank}")
            os.replace(final + f".tmp{rank}", final)
    except OSError as e:
        err = e
    _comm.agree(err, [], group=group, device=device)
    err = None
    if rank == 0:
        try:
            bounds = criterion.bounds
            files = [{"file": _name(a, b), "rows": [a, b]} for a, b in zip(bounds[:-1], bounds[1:])]
            index = {"format": FORMAT, "num_samples": criterion.num_samples, "dim": criterion.dim,
                     "dtype": str(criterion.memory.dtype).replace("torch.", ""), "z": float(criterion.z),
                     "mode": criterion.mode, "world_size": criterion.world_size, "files": files,
                     "meta": meta or {}}
            with open(os.path.join(path, "index.json.tmp"), "w") as f:
                json.dump(index, f, indent=1)
            os.replace(os.path.join(path, "index.json.tmp"), os.path.join(path, "index.json"))
            keep = {f["file"] for f in files}
            for name in os.listdir(path):      # shards of an earlier save at another world size, and
                if (_NAME.match(name) and name not in keep) or _TEMP.match(name):   # a killed save's temps
                    os.remove(os.path.join(path, name))
        except OSError as e:
            err = e
    _comm.agree(err, [], group=group, device=device)


def _read_rows(path, lo, hi, num_samples, dim, dtype, device, expect_meta=None):
    """Rows [lo, hi) of the checkpoint at ``path`` and its Z."""
    with open(os.path.join(path, "index.json")) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"{path} is not an instdisc bank checkpoint (format {index.get('format')!r})")
    meta = index.get("meta", {})
    for k, v in (expect_meta or {}).items():
        if meta.get(k) != v:
            raise ValueError(f"bank checkpoint {path} has {k}={meta.get(k)!r}, expected {k}={v!r} (it was "
                             f"saved by another run or at another time than the checkpoint that goes with it)")
    if index["num_samples"] != num_samples or index["dim"] != dim:
        raise ValueError(f"checkpoint {path} holds a {index['num_samples']} x {index['dim']} bank, "
                         f"the criterion has {num_samples} x {dim}")
    files = sorted(index["files"], key=lambda f: f["rows"][0])
    edges = [f["rows"] for f in files]
    if edges[0][0] != 0 or edges[-1][1] != num_samples or any(a[1] != b[0] for a, b in zip(edges, edges[1:])):
        raise ValueError(f"checkpoint {path}: the row ranges {edges} do not cover [0, {num_samples})")
    out = torch.empty(hi - lo, dim, dtype=dtype, device=device)
    for f in files:
        a, b = f["rows"]
        s, e = max(a, lo), min(b, hi)
        if s >= e:
            continue
        data = torch.load(os.path.join(path, f["file"]), map_location="cpu", mmap=True, weights_only=True)
        mem = data["memory"]
        if list(data["rows"]) != [a, b] or tuple(mem.shape) != (b - a, dim):
            raise ValueError(f"checkpoint file {f['file']} holds rows {data['rows']} shape {tuple(mem.shape)}, "
                             f"index.json says rows [{a}, {b})")
        if "sha256" in data and digest(mem) != data["sha256"]:
            raise ValueError(f"checkpoint file {os.path.join(path, f['file'])} is corrupt: its rows do not match "
                             f"the checksum stored when it was saved (the file was damaged or modified)")
        out[s - lo:e - lo] = mem[s - a:e - a].to(device=device, dtype=dtype)
    return out, float(index["z"])


def read_bank(path, expect_meta=None):
    """The whole bank saved under ``path`` (N x D, its saved dtype, on the CPU) and its Z, read in
    this process (no process group needed); ValueError / OSError when it cannot be read."""
    with open(os.path.join(path, "index.json")) as f:
        index = json.load(f)
    n, d = index.get("num_samples"), index.get("dim")
    dtype = getattr(torch, str(index.get("dtype")), None)
    if not isinstance(n, int) or not isinstance(d, int) or not isinstance(dtype, torch.dtype):
        raise ValueError(f"{path}/index.json is not an instdisc bank index")
    return _read_rows(path, 0, n, n, d, dtype, "cpu", expect_meta)


def load_resharded(criterion, path, expect_meta=None):
    """Load a checkpoint written by ``save_sharded`` at any world size and either mode.

    Every rank must call it; it reads only the rows it holds. A missing, corrupt or
    mismatched checkpoint (or one whose index.json meta lacks an item of
    ``expect_meta``) raises on every rank and leaves every bank unchanged."""
    lo, hi = criterion.shard_range
    err = rows = z = None
    try:
        rows, z = _read_rows(path, lo, hi, criterion.num_samples, criterion.dim, criterion.memory.dtype,
                             criterion.device, expect_meta)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        err = e if not isinstance(e, (KeyError, RuntimeError)) else ValueError(f"checkpoint {path}: {e!r}")
    _comm.agree(err, [], group=criterion.group, device=criterion.device)
    with torch.no_grad():
        criterion.memory.copy_(rows)
        criterion.z.fill_(z)

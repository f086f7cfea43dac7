"""Test helper: gloo process groups on CPU for the distributed tests. ``_launch`` spawns a
worker on every rank, the worker calls ``_serve`` with its scenarios, and each rank pickles a
(traceback or None, seconds) per scenario that ``_assert_ok`` reads; ``Checks`` collects a
scenario's failures so every rank reaches its last collective. ``_batch`` is the global
batch of a step over a bank of N rows."""
import datetime
import os
import pickle
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as Fn

N = 41
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=2e-6)}


class Checks:
    """Collects failures; raise_if_any() once the scenario's collectives are done."""

    def __init__(self):
        self.fails = []

    def close(self, what, a, b, **tol):
        try:
            torch.testing.assert_close(a, b, **tol)
        except AssertionError as e:
            self.fails.append(f"{what}: {e}")

    def true(self, what, cond):
        if not cond:
            self.fails.append(what)

    def raises(self, what, exc_type, words, fn):
        try:
            fn()
        except exc_type as e:
            for w in words:
                self.true(f"{what}: {w!r} not in message {e}", w in str(e))
            return
        except Exception as e:  # noqa: BLE001
            self.fails.append(f"{what}: expected {exc_type.__name__}, got {type(e).__name__}: {e}")
            return
        self.fails.append(f"{what}: no exception")

    def raise_if_any(self):
        if self.fails:
            raise AssertionError("\n".join(self.fails))


def _batch(world, step, dim, k, dtype):
    """The global batch (rank-order rows) of one step: sizes, features, indices, negatives."""
    g = torch.Generator().manual_seed(1000 * step + 10 * world + dim)
    sizes = [1 + (2 * r + step) % 4 for r in range(world)]
    bg = sum(sizes)
    feats = Fn.normalize(torch.randn(bg, dim, generator=g, dtype=torch.float64), dim=1).to(dtype)
    y = torch.randint(0, N, (bg,), generator=g)
    y[-1] = y[0]                                   # repeated across ranks: the last occurrence wins
    y[bg // 2] = y[0]
    neg = torch.randint(0, N, (bg, max(k, 1)), generator=g)
    neg[0, 0] = y[0]                               # a negative equal to the positive
    return sizes, feats, y, neg


def _gather_all(t, world):
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t.contiguous())
    return out


def _serve(rank, world, port, outdir, scenarios, timeout_s=60):
    """Join the gloo group and run each ``scenarios[name](rank, world)`` in order, recording
    (traceback or None, seconds) per name in outdir/rank<r>.pkl."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    results = {}
    for name, fn in scenarios.items():
        t0 = time.monotonic()
        try:
            fn(rank, world)
            results[name] = (None, time.monotonic() - t0)
        except Exception:  # noqa: BLE001
            results[name] = (traceback.format_exc(), time.monotonic() - t0)
    dist.destroy_process_group()
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(results, f)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world, outdir, ckpt, limit=300, *, worker):
    """Spawn ``worker(rank, world, port, outdir, ckpt)`` on ``world`` processes; every rank's pickled
    results (rank<r>.pkl in outdir). A run that outlives ``limit`` seconds fails as a hang."""
    ctx = mp.start_processes(worker, args=(world, _free_port(), str(outdir), str(ckpt)), nprocs=world,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + limit
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world}-rank run did not finish in {limit} s (a hang)")
    runs = []
    for r in range(world):
        with open(os.path.join(outdir, f"rank{r}.pkl"), "rb") as f:
            runs.append(pickle.load(f))
    return runs


def _assert_ok(runs, name):
    errors = [f"rank {r}:\n{run[name][0]}" for r, run in enumerate(runs) if run[name][0] is not None]
    assert not errors, "\n".join(errors)

"""Per-step time of DistributedInstDiscLoss, sharded against replicated bank, on W gloo CPU
processes (one thread each): forward + backward + bank update of a B-per-rank batch, NCE with
K per-sample negatives and a fixed Z (no Z all_reduce), float32. The modes alternate within
each round (a busy machine slows both alike); medians over --rounds steps.

    python benchmarks/sharded_vs_replicated.py --world 2 --rounds 10

Replicated runs the fused single-process op (``--backend``: "cpu" is the C++ kernel) on the
whole bank; sharded runs the per-shard eager torch path of distributed/_sharded.py
(docs/scaling.md says why it is not the fused kernel). Both pay the same all_gather of the
batch; sharded adds the counts all_to_all and the reduce-scatter of the partial gradients.
"""
import argparse
import datetime
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, port, a, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(minutes=5))
    from instdisc_kernels.distributed import DistributedInstDiscLoss
    crits = {mode: DistributedInstDiscLoss(a.n, a.d, mode=mode, num_negatives=a.k, temperature=0.07, z=float(a.n),
                                           backend=a.backend if mode == "replicated" else "auto",
                                           generator=torch.Generator().manual_seed(rank))
             for mode in ("replicated", "sharded")}
    g = torch.Generator().manual_seed(100 + rank)
    times = {mode: [] for mode in crits}
    for r in range(a.rounds + 1):                       # round 0: warm-up
        for mode, crit in crits.items():
            x = torch.nn.functional.normalize(torch.randn(a.b, a.d, generator=g), dim=1).requires_grad_()
            y = torch.randint(0, a.n, (a.b,), generator=g)
            dist.barrier()
            t0 = time.perf_counter()
            crit(x, y).backward()
            dist.barrier()
            if r:
                times[mode].append(time.perf_counter() - t0)
    if rank == 0:
        out.update({mode: statistics.median(t) for mode, t in times.items()})
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--n", type=int, default=50_000, help="bank rows N")
    ap.add_argument("--b", type=int, default=64, help="batch per rank")
    ap.add_argument("--k", type=int, default=4096, help="negatives per sample K")
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--backend", default="cpu", help="replicated mode's nce_loss backend")
    a = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as m:
        out = m.dict()
        mp.spawn(_worker, args=(a.world, port, a, out), nprocs=a.world, join=True)
        res = dict(out)
    print(f"W={a.world} N={a.n} B={a.b}/rank K={a.k} D={a.d}, 1 thread/rank, median of {a.rounds} steps "
          f"(forward + backward + bank update):")
    for mode, t in res.items():
        print(f"  {mode:10s} {t * 1e3:8.1f} ms")
    print(f"  sharded / replicated: {res['sharded'] / res['replicated']:.2f}x")


if __name__ == "__main__":
    main()

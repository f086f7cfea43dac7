"""Shared negatives beyond the op: the trainer's --negatives flag and the replicated and
sharded distributed modes (2 gloo ranks) against the single-process step on the same K rows."""
import datetime
import os
import pickle
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import instdisc_kernels as ik
from helpers.process_group import TOL, Checks, _batch, _free_port, _gather_all
from helpers.train_runs import TINY_DIGITS, _metrics
from instdisc_kernels import train
from instdisc_kernels.distributed import DistributedInstDiscLoss

pytestmark = pytest.mark.slow          # the trainer and 2-process runs with shared negatives

N, T, K, DIM = 41, 0.1, 6, 19


def test_trainer_shared_negatives_run(tmp_path):
    out = str(tmp_path / "run")
    assert train.main(["--epochs", "1", "--loss", "nce", "--nce-k", "16", "--negatives", "shared", "--z", "ema",
                       "--no-baselines", "--out", out, *TINY_DIGITS]) == 0
    assert 0 <= _metrics(out)[0]["knn_top1"] <= 100
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--negatives", "batch"])


def _replicated(rank, world):
    chk = Checks()
    for mode, be, lt in (("replicated", "eager", "nce"), ("replicated", "auto", "infonce"),
                         ("replicated", "auto", "nce"), ("sharded", "eager", "nce"),
                         ("sharded", "eager", "infonce")):
        crit = DistributedInstDiscLoss(N, DIM, mode=mode, num_negatives=K, temperature=T, loss_type=lt,
                                       backend=be, negatives="shared", generator=torch.Generator().manual_seed(rank))
        ref_mem = crit.full_bank(all_ranks=True).clone()
        ref_z = torch.tensor([-1.0])
        for step in range(2):
            sizes, feats, y, _ = _batch(world, step, DIM, K, torch.float32)
            off, b = sum(sizes[:rank]), sizes[rank]
            # the documented rule: torch.randint(0, N, (K,)) from the shared generator
            neg = torch.randint(0, N, (K,), generator=torch.Generator().set_state(crit.shared_generator.get_state()))
            negs = _gather_all(neg, world)
            chk.true(f"{mode} {be} step {step}: shared negatives differ across ranks",
                     all(torch.equal(x, negs[0]) for x in negs))
            fr = feats.clone().requires_grad_(True)
            lr = ik.nce_loss(fr, ref_mem, y, neg_indices=neg, negatives="shared", temperature=T, z=ref_z,
                             loss_type=lt, backend="eager")
            lr.backward()
            fl = feats[off:off + b].clone().requires_grad_(True)
            loss = crit(fl, y[off:off + b])
            loss.backward()
            tol = TOL[torch.float32]
            chk.close(f"{mode} {be} {lt} step {step} loss", loss.detach(), lr.detach(), **tol)
            chk.close(f"{mode} {be} {lt} step {step} grad", fl.grad, world * fr.grad[off:off + b], **tol)
            chk.close(f"{mode} {be} {lt} step {step} bank", crit.full_bank(all_ranks=True), ref_mem, rtol=0, atol=2e-6)
            if lt == "nce":
                chk.close(f"{mode} {be} step {step} Z", crit.z, ref_z, rtol=1e-6, atol=0)
    chk.raises("bad negatives", ValueError, ["negatives"],
               lambda: DistributedInstDiscLoss(N, DIM, mode="sharded", negatives="batch"))
    chk.raise_if_any()


def _worker(rank, world, port, outdir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        _replicated(rank, world)
        err = None
    except Exception:  # noqa: BLE001
        err = traceback.format_exc()
    dist.destroy_process_group()
    with open(os.path.join(outdir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(err, f)


def test_distributed_shared_negatives_match_single_process(tmp_path):
    world = 2
    ctx = mp.start_processes(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 240
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail("the 2-rank run did not finish in 240 s (a hang)")
    errs = []
    for r in range(world):
        with open(os.path.join(tmp_path, f"rank{r}.pkl"), "rb") as f:
            err = pickle.load(f)
        if err is not None:
            errs.append(f"rank {r}:\n{err}")
    assert not errs, "\n".join(errs)

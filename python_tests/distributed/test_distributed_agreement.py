"""Ranks that disagree fail together: DistributedInstDiscLoss configuration, per-step feature
dtype and kNN arguments that differ across ranks raise the same ValueError on every rank
(naming the argument and each rank's value) instead of a gloo abort, a silent divergence of
the replicated banks or a hang until the collective timeout; a replicated Z that float32
cannot hold fails every rank the same way. 2 gloo CPU processes.

The process group timeout is 20 s: a hang fails as a RuntimeError, not as a stuck test.
"""
import pytest
import torch
import torch.nn.functional as Fn

from helpers.process_group import Checks, _assert_ok, _launch, _serve
from instdisc_kernels.distributed import DistributedInstDiscLoss

pytestmark = pytest.mark.slow          # distributed: spawns process groups

N, DIM, K = 23, 8, 4
MODES = ("replicated", "sharded")
BASE = dict(num_negatives=K, temperature=0.1, momentum=0.5, z="first-batch", backend="eager")

# (argument, value on rank 0, value on the other ranks, the name the error must use)
CONFIG_CASES = [
    ("temperature", 0.1, 0.2, "temperature"),
    ("momentum", 0.5, 0.6, "momentum"),
    ("z", "ema", "first-batch", "z differs"),
    ("z", 50.0, 60.0, "z value"),
    ("z", "first-batch", 50.0, "z differs"),
    ("z_ema", 0.99, 0.9, "z_ema"),
    ("loss_type", "nce", "infonce", "loss_type"),
    ("num_negatives", 4, 5, "num_negatives"),
    ("num_negatives", 0, 4, "num_negatives"),
    ("bank_dtype", torch.float32, torch.bfloat16, "bank_dtype"),
    ("proximal", 0.0, 0.1, "proximal"),
    ("backend", "eager", "cpu", "backend"),
    ("dim", DIM, DIM + 1, "dim"),
    ("num_samples", N, N + 2, "num_samples"),
]


def _batch(rank, dtype=torch.float32):
    g = torch.Generator().manual_seed(11 + rank)
    f = Fn.normalize(torch.randn(3 + rank, DIM, generator=g, dtype=torch.float64), dim=1).to(dtype)
    return f, torch.randint(0, N, (3 + rank,), generator=g)


def _config_mismatch(rank, world):
    chk = Checks()
    other = rank != 0
    for mode in MODES:
        for arg, v0, v1, name in CONFIG_CASES:
            kw = dict(BASE, mode=mode)
            kw[arg] = v1 if other else v0
            n = kw.pop("num_samples", N)
            d = kw.pop("dim", DIM)
            chk.raises(f"{mode}: {arg} {v0} vs {v1}", ValueError,
                       [name, "differs across ranks", f"rank 0: {v0}", f"rank 1: {v1}"],
                       lambda: DistributedInstDiscLoss(n, d, **kw))
        chk.raises(f"{mode}: mode differs", ValueError, ["mode differs across ranks", "rank 1: "],
                   lambda: DistributedInstDiscLoss(N, DIM, **dict(BASE, mode=MODES[other])))
        crit = DistributedInstDiscLoss(N, DIM, mode=mode, **BASE)     # the group still works
        f, y = _batch(rank)
        chk.true(f"{mode}: loss after the rejected constructions is not finite", bool(torch.isfinite(crit(f, y))))
    chk.raise_if_any()


def _step_dtype_mismatch(rank, world):
    chk = Checks()
    for mode in MODES:
        for odd in (torch.float64, torch.float16, torch.bfloat16):
            crit = DistributedInstDiscLoss(N, DIM, mode=mode, **BASE)
            bank, z = crit.full_bank(all_ranks=True).clone(), crit.z.clone()
            f, y = _batch(rank, odd if rank == world - 1 else torch.float32)
            chk.raises(f"{mode}: features float32 vs {odd}", ValueError,
                       ["features dtype differs across ranks", "rank 0: torch.float32", f"rank 1: {odd}"],
                       lambda: crit(f.requires_grad_(True), y))
            chk.true(f"{mode} {odd}: a rejected step changed the bank",
                     torch.equal(crit.full_bank(all_ranks=True), bank))
            chk.true(f"{mode} {odd}: a rejected step changed Z", torch.equal(crit.z, z))
            f, y = _batch(rank)
            loss = crit(f, y)
            chk.true(f"{mode}: loss after the rejected step is not finite", bool(torch.isfinite(loss)))
    chk.raise_if_any()


def _knn_mismatch(rank, world):
    chk = Checks()
    labels = torch.arange(N) % 3
    q, ql = _batch(rank)
    ql = ql % 3
    cases = [("k", dict(k=3 + rank), "k differs"), ("temperature", dict(temperature=0.1 + 0.1 * rank), "temperature"),
             ("num_classes", dict(num_classes=3 if rank == 0 else None), "num_classes"),
             ("batch_size", dict(batch_size=2 + rank), "batch_size")]
    for mode in MODES:
        crit = DistributedInstDiscLoss(N, DIM, mode=mode, **BASE)
        for what, kw, name in cases:
            chk.raises(f"{mode}: knn {what}", ValueError, [name, "differs across ranks"],
                       lambda: crit.knn_accuracy(q, ql, labels, **dict(dict(k=3), **kw)))
        qd = q.double() if rank == 1 else q
        chk.raises(f"{mode}: knn query dtype", ValueError, ["queries dtype differs across ranks", "float64"],
                   lambda: crit.knn_accuracy(qd, ql, labels, k=3))
        top1, top5 = crit.knn_accuracy(q, ql, labels, k=3)
        chk.true(f"{mode}: knn after the rejected calls", 0 <= top1 <= top5 <= 100)
    chk.raise_if_any()


def _z_overflow(rank, world):
    """The replicated first-batch Z in log space: exact where exp(s/T) overflows float32 but Z does
    not, and a Z float32 cannot hold raises the same ValueError on every rank, nothing written."""
    chk = Checks()
    k = 40
    bank = torch.zeros(N, DIM)
    bank[0, 0] = 1.0                                  # row 0 = e0, every other row = e1
    bank[1:, 1] = 1.0
    f = torch.zeros(3 + rank, DIM)
    f[:, 2] = 1.0                                     # orthogonal to every row: s = 0
    if rank == 0:
        f[0] = 0
        f[0, 0] = 1.0                                 # s = 1 against row 0 only
    y = torch.arange(1, 4 + rank) + 5 * rank          # positives: rows other than 0
    neg = torch.full((3 + rank, k), 7)
    if rank == 0:
        neg[0, 3] = 0                                 # one aligned entry in the whole global batch
    entries = sum((3 + r) * (k + 1) for r in range(world))
    for T, ok in ((1 / 90, True), (1 / 200, False)):  # exp(90) > float32 max; Z = N e^90 / entries is not
        crit = DistributedInstDiscLoss(N, DIM, mode="replicated", num_negatives=k, temperature=T,
                                       z="first-batch", backend="eager")
        crit.memory.copy_(bank)
        before, z0 = crit.full_bank(all_ranks=True).clone(), crit.z.clone()
        if ok:
            loss = crit(f.clone().requires_grad_(True), y, neg_indices=neg)
            want = N * (torch.tensor(90.0, dtype=torch.float64).exp() + entries - 1) / entries
            chk.close("Z at T=1/90", crit.z.double().reshape(()), want, rtol=1e-6, atol=0)
            chk.true("loss at T=1/90 is not finite", bool(torch.isfinite(loss)))
        else:
            chk.raises("Z not representable", ValueError, ["temperature", "not representable"],
                       lambda: crit(f.clone().requires_grad_(True), y, neg_indices=neg))
            chk.true("a rejected step changed the bank", torch.equal(crit.full_bank(all_ranks=True), before))
            chk.true("a rejected step changed Z", torch.equal(crit.z, z0))
    chk.raise_if_any()


SCENARIOS = {"config": _config_mismatch, "step_dtype": _step_dtype_mismatch, "knn": _knn_mismatch,
             "z_overflow": _z_overflow}


def _worker(rank, world, port, outdir, _ckpt):
    _serve(rank, world, port, outdir, SCENARIOS, timeout_s=20)


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    return _launch(2, tmp_path_factory.mktemp("agree2"), "", limit=240, worker=_worker)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_disagreeing_ranks_raise_the_same_error_everywhere(run2, name):
    _assert_ok(run2, name)

"""DistributedInstDiscLoss (replicated and sharded banks) on gloo with 2 and 3 CPU
processes, against the single-process oracle (nce_loss / nonparametric_softmax_loss
with backend="eager") on the same global index matrix.

Each world size is spawned once (module fixture) and runs every scenario; a
scenario records its failed checks and raises only after its last collective,
so ranks stay in step. The 3-rank run writes a checkpoint the 2-rank run loads.
"""
import copy
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as Fn

import instdisc_kernels as ik
from helpers.process_group import TOL, Checks, N, _assert_ok, _batch, _gather_all, _launch, _serve
from instdisc_kernels.distributed import DistributedInstDiscLoss, _sharded, load_resharded, save_sharded

pytestmark = pytest.mark.slow          # distributed: spawns process groups

T = 0.1
BANK_TOL = {torch.float32: dict(rtol=0, atol=2e-6), torch.bfloat16: dict(rtol=0, atol=8e-3)}


# --------------------------------------------------------------------------- #
# Scenarios (run inside the spawned ranks)                                     #
# --------------------------------------------------------------------------- #
CONFIGS = {
    "sharded_nce": dict(mode="sharded", k=5, dim=19, proximal=0.3),
    "sharded_nce_ema": dict(mode="sharded", k=7, dim=3, z="ema"),
    "sharded_infonce": dict(mode="sharded", k=6, dim=19, loss_type="infonce", proximal=0.2),
    "sharded_softmax": dict(mode="sharded", k=0, dim=129, proximal=0.4),
    "sharded_bf16_bank": dict(mode="sharded", k=5, dim=100, fdtype=torch.float32, bank=torch.bfloat16),
    "replicated_nce": dict(mode="replicated", k=5, dim=19, proximal=0.3),
    "replicated_infonce": dict(mode="replicated", k=4, dim=3, loss_type="infonce"),
    "replicated_softmax": dict(mode="replicated", k=0, dim=19, proximal=0.4),
    "replicated_auto_fp32": dict(mode="replicated", k=5, dim=129, fdtype=torch.float32, backend="auto",
                                 z="ema"),
}


def _matches_single_process(rank, world, name):
    c = CONFIGS[name]
    k, dim, mode = c["k"], c["dim"], c["mode"]
    fdtype, bank = c.get("fdtype", torch.float64), c.get("bank", torch.float32)
    z, lt, prox = c.get("z", "first-batch"), c.get("loss_type", "nce"), c.get("proximal", 0.0)
    chk = Checks()
    crit = DistributedInstDiscLoss(N, dim, mode=mode, num_negatives=k, temperature=T, z=z, proximal=prox,
                                   loss_type=lt, bank_dtype=bank, backend=c.get("backend", "eager"),
                                   generator=torch.Generator().manual_seed(rank))
    ref_mem = crit.full_bank(all_ranks=True).clone()
    ref_z = torch.tensor([-1.0])
    for step in range(3):
        sizes, feats, y, neg = _batch(world, step, dim, k, fdtype)
        off, b = sum(sizes[:rank]), sizes[rank]
        fr = feats.clone().requires_grad_(True)
        if k == 0:
            lr = ik.nonparametric_softmax_loss(fr, ref_mem, y, temperature=T, backend="eager", proximal=prox)
        else:
            lr = ik.nce_loss(fr, ref_mem, y, neg_indices=neg, temperature=T, z=ref_z, proximal=prox,
                             loss_type=lt, z_ema=0.99 if z == "ema" else None, backend="eager")
        lr.backward()
        fl = feats[off:off + b].clone().requires_grad_(True)
        loss = crit(fl, y[off:off + b], neg[off:off + b] if k else None)
        loss.backward()
        tol = TOL[fdtype]
        if mode == "replicated" and step == 0 and k and lt == "nce" and fdtype == torch.float64:
            # the fused op takes Z as float32: the first-batch Z is rounded once (single-process
            # keeps that one batch's estimate in float64); the gradient amplifies it by cancellation
            tol = dict(rtol=1e-6, atol=1e-9)
        chk.close(f"step {step} loss", loss.detach(), lr.detach().to(loss.dtype), **tol)
        chk.close(f"step {step} grad = world * single-process grad", fl.grad, world * fr.grad[off:off + b], **tol)
        chk.close(f"step {step} bank", crit.full_bank(all_ranks=True).double(), ref_mem.double(), **BANK_TOL[bank])
        if k and lt == "nce":
            chk.close(f"step {step} Z", crit.z, ref_z, rtol=1e-6, atol=0)
        losses = _gather_all(loss.detach().reshape(1), world)
        chk.true(f"step {step}: loss differs across ranks {losses}", all(torch.equal(x, losses[0]) for x in losses))
        if mode == "replicated":
            banks = _gather_all(crit.memory, world)
            chk.true(f"step {step}: replicated banks differ across ranks",
                     all(torch.equal(x, banks[0]) for x in banks))
    chk.raise_if_any()


def _random_negatives(rank, world):
    """Without explicit negatives: ranks agree on loss/Z, banks stay identical (replicated)."""
    chk = Checks()
    for mode in ("sharded", "replicated"):
        torch.manual_seed(0)          # same default RNG on every rank: negatives must still differ per rank
        crit = DistributedInstDiscLoss(N, 16, mode=mode, num_negatives=9, temperature=T, backend="eager")
        for step in range(2):
            sizes, feats, y, _ = _batch(world, step, 16, 1, torch.float32)
            off, b = sum(sizes[:rank]), sizes[rank]
            fl = feats[off:off + b].clone().requires_grad_(True)
            loss = crit(fl, y[off:off + b])
            loss.backward()
            chk.true(f"{mode}: non-finite loss/grad", bool(torch.isfinite(loss)) and bool(torch.isfinite(fl.grad).all()))
            for what, t in (("loss", loss.detach().reshape(1)), ("Z", crit.z)):
                got = _gather_all(t, world)
                chk.true(f"{mode}: {what} differs across ranks {got}", all(torch.equal(x, got[0]) for x in got))
            if mode == "replicated":
                banks = _gather_all(crit.memory, world)
                chk.true("replicated banks differ", all(torch.equal(x, banks[0]) for x in banks))
        draws = _gather_all(torch.randint(0, 2**30, (4,), generator=crit.generator), world)
        chk.true(f"{mode}: per-rank generators coincide", len({tuple(d.tolist()) for d in draws}) == world)
    chk.raise_if_any()


def _knn(rank, world):
    chk = Checks()
    g = torch.Generator().manual_seed(7)
    dim, classes = 12, 4
    full = Fn.normalize(torch.randn(N, dim, generator=g), dim=1)
    labels = torch.randint(0, classes, (N,), generator=g)
    qsizes = [0, 5, 8][:world] if world == 3 else [6, 7]
    queries = Fn.normalize(torch.randn(sum(qsizes), dim, generator=g), dim=1)
    qlab = torch.randint(0, classes, (sum(qsizes),), generator=g)
    off, q = sum(qsizes[:rank]), qsizes[rank]
    for mode in ("sharded", "replicated"):
        crit = DistributedInstDiscLoss(N, dim, mode=mode, num_negatives=4, temperature=T)
        lo, hi = crit.shard_range
        crit.memory.copy_(full[lo:hi])
        for k in (1, 25, N):                      # 25 > every shard's rows: the per-shard lists are padded
            want = ik.reference.knn_topk_accuracy(
                ik.reference.knn_scores(queries, full, labels, k, T, classes), qlab)
            got = crit.knn_accuracy(queries[off:off + q], qlab[off:off + q], labels, k=k, batch_size=3)
            chk.close(f"{mode} k={k} accuracy", torch.tensor(got, dtype=torch.float64),
                      torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-9)
    chk.raise_if_any()


def _bad_input_fails_everywhere(rank, world):
    chk = Checks()
    last = world - 1
    chk.raises("different num_samples per rank", ValueError, ["num_samples differs across ranks"],
               lambda: DistributedInstDiscLoss(N + rank, 8, mode="sharded"))
    chk.raises("bad temperature on one rank", ValueError, [f"rank {last}", "temperature"],
               lambda: DistributedInstDiscLoss(N, 8, temperature=-1.0 if rank == last else T))
    for mode in ("sharded", "replicated"):
        crit = DistributedInstDiscLoss(N, 8, mode=mode, num_negatives=3, temperature=T, backend="eager")
        sizes, feats, y, neg = _batch(world, 0, 8, 3, torch.float32)
        off, b = sum(sizes[:rank]), sizes[rank]
        fl, yl, nl = feats[off:off + b], y[off:off + b].clone(), neg[off:off + b]
        before, z_before = crit.memory.clone(), crit.z.clone()
        t0 = time.monotonic()
        bad_y = yl.clone()
        if rank == last:
            bad_y[0] = N
        chk.raises(f"{mode} out-of-range index", ValueError, [f"rank {last}", "indices", f"[0, {N})"],
                   lambda: crit(fl, bad_y, nl))
        bad_f = fl.to(torch.int64) if rank == 0 else fl
        chk.raises(f"{mode} integer features", TypeError, ["rank 0", "features"], lambda: crit(bad_f, yl, nl))
        bad_f = fl.clone()
        if rank == last:
            bad_f[0, 0] = float("nan")
        chk.raises(f"{mode} NaN features", ValueError, [f"rank {last}", "NaN"], lambda: crit(bad_f, yl, nl))
        chk.raises(f"{mode} neg_indices on some ranks only", ValueError, ["neg_indices"],
                   lambda: crit(fl, yl, nl if rank == 0 else None))
        chk.raises(f"{mode} bad query labels", ValueError, ["query_labels"],
                   lambda: crit.knn_accuracy(fl, torch.zeros(b + (rank == last), dtype=torch.long),
                                             torch.zeros(N, dtype=torch.long), k=3))
        chk.true(f"{mode}: rejected calls took {time.monotonic() - t0:.1f} s", time.monotonic() - t0 < 30)
        chk.true(f"{mode}: bank changed by a rejected call", torch.equal(crit.memory, before))
        chk.true(f"{mode}: Z changed by a rejected call", torch.equal(crit.z, z_before))
        loss = crit(fl, yl, nl)                  # the group still works
        chk.true(f"{mode}: loss after errors not finite", bool(torch.isfinite(loss)))
    chk.raise_if_any()


def _ddp_step_equals_single_process(rank, world):
    """One DDP step with the distributed loss == one single-process step on the global batch."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    chk = Checks()
    dim, k = 10, 6
    for mode in ("sharded", "replicated"):
        torch.manual_seed(3)
        net = torch.nn.Linear(5, dim).double()
        ref_net = copy.deepcopy(net)
        ddp = DDP(net)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
        ref_opt = torch.optim.SGD(ref_net.parameters(), lr=0.5)
        # replicated: a fixed Z (its first-batch Z is rounded to float32 by the fused op; see above)
        z = "first-batch" if mode == "sharded" else 50.0
        crit = DistributedInstDiscLoss(N, dim, mode=mode, num_negatives=k, temperature=T, z=z, backend="eager")
        ref_mem, ref_z = crit.full_bank(all_ranks=True).clone(), torch.tensor([-1.0 if mode == "sharded" else 50.0])
        for step in range(2):
            sizes, _, y, neg = _batch(world, step, dim, k, torch.float64)
            x = torch.randn(sum(sizes), 5, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
            off, b = sum(sizes[:rank]), sizes[rank]
            opt.zero_grad()
            crit(Fn.normalize(ddp(x[off:off + b]), dim=1), y[off:off + b], neg[off:off + b]).backward()
            opt.step()
            ref_opt.zero_grad()
            ik.nce_loss(Fn.normalize(ref_net(x), dim=1), ref_mem, y, neg_indices=neg, temperature=T, z=ref_z,
                        backend="eager").backward()
            ref_opt.step()
            for (n_, p), rp in zip(net.named_parameters(), ref_net.parameters()):
                chk.close(f"{mode} step {step} {n_}", p.detach(), rp.detach(), rtol=1e-9, atol=1e-11)
    chk.raise_if_any()


def _checkpoint_save3(rank, world, ckpt):
    chk = Checks()
    crit = DistributedInstDiscLoss(N, 16, mode="sharded", num_negatives=3, temperature=T, bank_dtype=torch.bfloat16)
    sizes, feats, y, neg = _batch(world, 0, 16, 3, torch.float32)
    off, b = sum(sizes[:rank]), sizes[rank]
    crit(feats[off:off + b], y[off:off + b], neg[off:off + b])
    save_sharded(crit, os.path.join(ckpt, "bank"))
    full = crit.full_bank()
    torch.save(crit.state_dict(), os.path.join(ckpt, f"state{rank}.pt"))
    twin = DistributedInstDiscLoss(N, 16, mode="sharded", num_negatives=3, bank_dtype=torch.bfloat16)
    twin.load_state_dict(torch.load(os.path.join(ckpt, f"state{rank}.pt")))
    chk.true("state_dict round trip at the same world size", torch.equal(twin.memory, crit.memory)
             and torch.equal(twin.z, crit.z))
    if rank == 0:
        torch.save({"bank": full, "z": crit.z.clone()}, os.path.join(ckpt, "expected.pt"))
    chk.raise_if_any()


def _checkpoint_load2(rank, world, ckpt):
    chk = Checks()
    want = torch.load(os.path.join(ckpt, "expected.pt"))
    for mode in ("sharded", "replicated"):
        crit = DistributedInstDiscLoss(N, 16, mode=mode, num_negatives=3, bank_dtype=torch.bfloat16)
        load_resharded(crit, os.path.join(ckpt, "bank"))
        chk.true(f"{mode}: resharded 3 -> 2 bank differs", torch.equal(crit.full_bank(all_ranks=True), want["bank"]))
        chk.true(f"{mode}: Z not restored", torch.equal(crit.z, want["z"]))
        before = crit.memory.clone()
        chk.raises(f"{mode}: missing checkpoint", FileNotFoundError, ["rank 0", "index.json"],
                   lambda: load_resharded(crit, os.path.join(ckpt, "nowhere")))
        chk.raises(f"{mode}: state_dict of another world size", ValueError, ["load_resharded"],
                   lambda: crit.load_state_dict(torch.load(os.path.join(ckpt, "state1.pt"))))
        chk.true(f"{mode}: bank changed by a rejected load", torch.equal(crit.memory, before))
    # and back: save at 2 (sharded), load replicated on 2
    crit = DistributedInstDiscLoss(N, 16, mode="sharded", num_negatives=3, bank_dtype=torch.bfloat16)
    load_resharded(crit, os.path.join(ckpt, "bank"))
    save_sharded(crit, os.path.join(ckpt, "bank2"))
    rep = DistributedInstDiscLoss(N, 16, mode="replicated", num_negatives=3, bank_dtype=torch.bfloat16)
    load_resharded(rep, os.path.join(ckpt, "bank2"))
    chk.true("sharded(2) -> replicated(2) differs", torch.equal(rep.memory, want["bank"]))
    chk.true("stale shard files left", sorted(os.listdir(os.path.join(ckpt, "bank2"))) ==
             ["index.json", "rows-000000000000-000000000020.pt", "rows-000000000020-000000000041.pt"])
    chk.raise_if_any()


SCENARIOS = {
    **{name: (lambda name: lambda r, w, c: _matches_single_process(r, w, name))(name) for name in CONFIGS},
    "random_negatives": lambda r, w, c: _random_negatives(r, w),
    "knn": lambda r, w, c: _knn(r, w),
    "bad_input": lambda r, w, c: _bad_input_fails_everywhere(r, w),
    "ddp": lambda r, w, c: _ddp_step_equals_single_process(r, w),
    "checkpoint_save": _checkpoint_save3,
    "checkpoint_load": _checkpoint_load2,
}
COMMON = list(CONFIGS) + ["random_negatives", "knn", "bad_input"]
RUNS = {3: COMMON + ["checkpoint_save"], 2: COMMON + ["ddp", "checkpoint_load"]}


def _worker(rank, world, port, outdir, ckpt):
    _serve(rank, world, port, outdir,
           {name: (lambda fn: lambda r, w: fn(r, w, ckpt))(SCENARIOS[name]) for name in RUNS[world]})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def run3(tmp_path_factory, ckpt):
    return _launch(3, tmp_path_factory.mktemp("run3"), ckpt, worker=_worker)


@pytest.fixture(scope="module")
def run2(tmp_path_factory, ckpt, run3):  # loads the checkpoint run3 writes
    return _launch(2, tmp_path_factory.mktemp("run2"), ckpt, worker=_worker)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_grad_bank_match_single_process(request, world, name):
    _assert_ok(request.getfixturevalue(f"run{world}"), name)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("name", ["random_negatives", "knn", "bad_input"])
def test_distributed_behaviour(request, world, name):
    _assert_ok(request.getfixturevalue(f"run{world}"), name)


def test_ddp_update_equals_single_process(run2):
    _assert_ok(run2, "ddp")


def test_checkpoint_saved_on_3_ranks_loads_on_2(run3, run2):
    _assert_ok(run3, "checkpoint_save")
    _assert_ok(run2, "checkpoint_load")


# --------------------------------------------------------------------------- #
# In-process checks (no process group)                                         #
# --------------------------------------------------------------------------- #
def test_sharded_sampler_is_uniform_over_the_global_bank():
    bounds = torch.tensor([13, 27])                      # shards [0,13) [13,27) [27,41)
    g = torch.Generator().manual_seed(0)
    counts = _sharded.shard_counts(4000, 50, N, bounds, g)          # (W, B)
    assert counts.shape == (3, 4000) and bool((counts.sum(0) == 50).all())
    hist = torch.zeros(N)
    for s, lo, hi in ((0, 0, 13), (1, 13, 27), (2, 27, 41)):
        rows, cols = _sharded.negatives_from_counts(counts[s], hi - lo, g)
        assert rows.shape[0] == int(counts[s].sum()) and bool((cols < hi - lo).all())
        hist += torch.bincount(cols + lo, minlength=N).double()
    expected = 4000 * 50 / N
    chi2 = float(((hist - expected) ** 2 / expected).sum())
    assert chi2 < 90, chi2          # 40 degrees of freedom: P(chi2 > 90) < 1e-5


def test_constructor_needs_a_process_group(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="init_process_group"):
        DistributedInstDiscLoss(N, 8)


def test_scaling_doc_has_the_current_tables():
    from instdisc_kernels.distributed.scaling import bank_bytes, markdown_tables
    doc = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "scaling.md")
    with open(doc) as f:
        assert markdown_tables() in f.read(), "regenerate: python -m instdisc_kernels.distributed.scaling"
    assert bank_bytes("sharded", 1_000_000_000, 512) == 1_953_125 * 128 * 2
    assert bank_bytes("replicated", 1_281_167, 8) == 1_281_167 * 128 * 2

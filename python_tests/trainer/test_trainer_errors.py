"""instdisc-train's user errors end with one line `instdisc-train: error: ...` and exit code 2,
never a traceback, and say what is actually wrong: output folders that cannot be used, damaged
or incomplete checkpoints, backends without their device, a diverging run and an overflowing
temperature. In-process main() calls on tiny digits runs.
"""
import os
import stat

import pytest
import torch

from helpers.bitrot import flip_bytes_of
from instdisc_kernels import checkpoint as ckpt
from instdisc_kernels import train
from instdisc_kernels.modules import InstDiscLoss

pytestmark = pytest.mark.slow          # the trainer's error paths (most run it)

TINY = ["--limit-train", "96", "--limit-test", "40", "--batch-size", "32", "--no-progress", "--no-baselines"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trained") / "run")
    assert train.main(["--epochs", "1", "--loss", "nce", "--nce-k", "16", "--out", out, *TINY]) == 0
    return os.path.join(out, "checkpoint.pt")


def _fails(capsys, argv, *needles, absent=()):
    """main(argv) exits 2 with a one-line error (the last stderr line) holding every needle."""
    capsys.readouterr()
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert "Traceback" not in err, err
    assert last.startswith("instdisc-train: error: "), err
    for n in needles:
        assert n in last, (n, last)
    for n in absent:
        assert n not in last, (n, last)
    return last


def _edited_copy(trained, tmp_path, edit, resave=True):
    """A copy of the trained checkpoint changed by ``edit(state)``: saved with fresh checksums
    (``resave``) or written with torch.save, keeping the old ones."""
    st = ckpt.load_checkpoint(trained)
    edit(st)
    path = str(tmp_path / "checkpoint.pt")
    if resave:
        ckpt.save_checkpoint(st, path)
    else:
        torch.save(st, path)
    return path


# --------------------------------------------------------------------------- #
# Output folder                                                                #
# --------------------------------------------------------------------------- #
def test_out_under_a_regular_file(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    _fails(capsys, ["--epochs", "1", "--out", str(f / "run"), *TINY], "--out", "is a file")
    _fails(capsys, ["--epochs", "1", "--out", str(f / "a" / "b"), *TINY], "--out", "is a file")
    assert f.read_text() == "keep me"


def test_out_naming_an_existing_file(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    _fails(capsys, ["--epochs", "1", "--out", str(f), *TINY], "--out", "existing file")
    assert f.read_text() == "keep me"


def test_out_in_an_unwritable_place(tmp_path, capsys):
    if os.geteuid() == 0:                   # root writes anywhere mode bits forbid: use a virtual fs
        target = "/proc/instdisc-unwritable/run"
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        target = str(ro / "run")
    _fails(capsys, ["--epochs", "1", "--out", target, *TINY], "--out", "cannot be created or written")


# --------------------------------------------------------------------------- #
# Checkpoints                                                                  #
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("keys", [("args",), ("optimizer",), ("model", "rng")])
@pytest.mark.parametrize("resave", [True, False])
def test_checkpoint_missing_keys(trained, tmp_path, capsys, keys, resave):
    path = _edited_copy(trained, tmp_path, lambda st: [st.pop(k) for k in keys], resave=resave)
    last = _fails(capsys, ["--resume", path], "cannot resume", *[repr(k) for k in keys])
    assert ("removed after it was saved" in last) == (not resave)


def test_checkpoint_bank_with_fewer_rows(trained, tmp_path, capsys):
    def edit(st):
        st["criterion"]["bank.memory"] = st["criterion"]["bank.memory"][:10].clone()
    path = _edited_copy(trained, tmp_path, edit)
    _fails(capsys, ["--resume", path], "memory bank has shape (10, 128)", "96 training images")


def test_checkpoint_with_nan_bank_says_so(trained, tmp_path, capsys):
    def edit(st):
        st["criterion"]["bank.memory"][[3, 7]] = float("nan")
    path = _edited_copy(trained, tmp_path, edit)
    _fails(capsys, ["--resume", path], "memory bank holds NaN/inf in 2 of 96 rows", "first: row 3", absent=["--lr"])


@pytest.mark.parametrize("what", ["z", "weights"])
def test_checkpoint_with_nonfinite_z_or_weights(trained, tmp_path, capsys, what):
    def edit(st):
        if what == "z":
            st["criterion"]["z"].fill_(float("inf"))
        else:
            next(iter(st["model"].values())).view(-1)[0] = float("nan")
    path = _edited_copy(trained, tmp_path, edit)
    _fails(capsys, ["--resume", path], "Z is inf" if what == "z" else "network weights hold NaN/inf")


def test_flipped_bank_bytes_are_refused(trained, tmp_path, capsys):
    path = _edited_copy(trained, tmp_path, lambda st: None)
    st = ckpt.load_checkpoint(path)
    flip_bytes_of(path, st["criterion"]["bank.memory"])
    st2 = torch.load(path, weights_only=False)              # torch itself reads it without complaint
    assert not torch.equal(st2["criterion"]["bank.memory"], st["criterion"]["bank.memory"])
    _fails(capsys, ["--resume", path], "corrupt", "'criterion'", "checksum")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):     # instdisc-retrieve reads through it too
        ckpt.load_checkpoint(path, map_location="cpu")


def test_checksums_survive_a_round_trip_and_see_every_entry(tmp_path):
    st = {"epoch": 3, "w": torch.randn(5, 3), "b": torch.randn(4).bfloat16(), "rng": ckpt.rng_state(),
          "history": [{"loss": 0.25, "lr": None}], "s": "x"}
    path = str(tmp_path / "c.pt")
    ckpt.save_checkpoint(st, path)
    back = ckpt.load_checkpoint(path)
    assert ckpt.checksum_problems(back) == []
    for key, change in (("epoch", 4), ("history", [{"loss": 0.25000001, "lr": None}]), ("s", "y")):
        bad = dict(back, **{key: change})
        assert repr(key) in ckpt.checksum_problems(bad)[0]
    bad = dict(back, b=back["b"].clone())
    bad["b"][1] = 7
    assert "'b'" in ckpt.checksum_problems(bad)[0]


def test_resume_from_a_directory(tmp_path, capsys):
    _fails(capsys, ["--resume", str(tmp_path)], "is a directory")


def test_stale_temp_files_of_a_killed_save_are_removed(trained, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in (".tmp-checkpoint.pt-abc123", ".tmp-checkpoint.pt-x"):
        (out / name).write_bytes(b"half a checkpoint")
    (out / "notes.txt").write_text("mine")
    assert train.main(["--epochs", "1", "--out", str(out), *TINY]) == 0
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert (out / "notes.txt").read_text() == "mine" and "temporary file" in capsys.readouterr().err
    assert ckpt.remove_stale_temp_files(str(out / "checkpoint.pt")) == []


# --------------------------------------------------------------------------- #
# Backends and runs that go wrong                                              #
# --------------------------------------------------------------------------- #
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_gpu_backend_without_gpu(tmp_path, capsys, backend, loss):
    out = tmp_path / "never"
    _fails(capsys, ["--epochs", "1", "--backend", backend, "--loss", loss, "--out", str(out), *TINY],
           f"--backend {backend}", "CUDA")
    assert not out.exists()


@pytest.mark.parametrize("loss", ["softmax", "nce"])
@pytest.mark.parametrize("limit", ["96", "600"])          # diverges in the kNN evaluation / inside epoch 1
def test_diverging_run_says_so(tmp_path, capsys, loss, limit):
    argv = ["--epochs", "2", "--lr", "1e6", "--loss", loss, "--out", str(tmp_path / "r"), *TINY, "--limit-train",
            limit]
    _fails(capsys, argv, "diverged", "epoch 1", "NaN/inf", "lower --lr")


def test_tiny_temperature_names_the_temperature(tmp_path, capsys):
    _fails(capsys, ["--epochs", "1", "--loss", "nce", "--nce-t", "1e-6", "--out", str(tmp_path / "r"), *TINY],
           "nce-t", absent=["lower --lr", "smaller --lr"])


def test_os_errors_during_a_run_are_one_line(tmp_path, capsys, monkeypatch):
    def full_disk(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "r" / "checkpoint.pt"))
    monkeypatch.setattr(train.loop, "save_checkpoint", full_disk)
    _fails(capsys, ["--epochs", "1", "--out", str(tmp_path / "r"), *TINY], "No space left on device",
           "checkpoint.pt")


@pytest.mark.parametrize("loss", ["nce", "softmax"])
def test_nan_rows_in_the_bank_during_a_run_are_named(tmp_path, capsys, monkeypatch, loss):
    build = train.build_criterion

    def broken_bank(*a, **k):
        crit = build(*a, **k)
        crit.memory[:] = float("nan")
        return crit
    monkeypatch.setattr(train.loop, "build_criterion", broken_bank)
    _fails(capsys, ["--epochs", "1", "--loss", loss, "--out", str(tmp_path / "r"), *TINY],
           "memory bank holds NaN/inf", "epoch 1, step 1", absent=["--lr"])


def test_a_rejected_step_is_one_line_naming_the_step(tmp_path, capsys, monkeypatch):
    def refuse(self, features, indices):
        raise ValueError("temperature=1e-06 makes exp(score / temperature) overflow")
    monkeypatch.setattr(InstDiscLoss, "forward", refuse)
    _fails(capsys, ["--epochs", "1", "--loss", "nce", "--nce-t", "1e-6", "--out", str(tmp_path / "r"), *TINY],
           "the loss failed at epoch 1, step 1", "--nce-t 1e-06", "temperature=1e-06", absent=["lower --lr"])


def test_resume_after_a_kill_inside_a_save_removes_its_temp_file(trained, tmp_path):
    import shutil
    import subprocess
    import sys
    import textwrap

    run = tmp_path / "run"
    shutil.copytree(os.path.dirname(trained), run)
    path = str(run / "checkpoint.pt")
    code = textwrap.dedent(f"""
        import os, signal
        from instdisc_kernels import checkpoint as c
        def dying_save(obj, f):
            f.write(b"x" * 4096); f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        c.torch.save = dying_save
        c.save_checkpoint(c.load_checkpoint({path!r}), {path!r})
    """)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "-c", code], cwd=root,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    assert [n for n in os.listdir(run) if n.startswith(".tmp-checkpoint.pt-")]
    assert train.main(["--resume", path, "--epochs", "2", "--no-progress"]) == 0
    assert not [n for n in os.listdir(run) if n.startswith(".tmp-")]
    assert ckpt.load_checkpoint(path)["epoch"] == 2

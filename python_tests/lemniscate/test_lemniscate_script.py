"""A lemniscate-style training script (lemniscate_style_train.py: ``lemniscate(feature, index)``,
``criterion(output, index)``, whole-module checkpoint, ``lemniscate = checkpoint['lemniscate']``)
runs unchanged on the drop-ins, resume included (issue 13)."""
import lemniscate_style_train as script
import numpy as np
import pytest
import torch

from instdisc_kernels.lemniscate import LinearAverage, NCEAverage, NCECriterion


def _same_run(a, b):
    assert a["losses"] == b["losses"]
    assert torch.equal(a["lemniscate"].memory, b["lemniscate"].memory)
    assert torch.equal(a["lemniscate"].params, b["lemniscate"].params)
    for pa, pb in zip(a["net"].parameters(), b["net"].parameters()):
        assert torch.equal(pa, pb)


@pytest.mark.parametrize("k", [16, 0], ids=["NCEAverage", "LinearAverage"])
def test_resume_from_whole_module_checkpoint_continues_the_same_run(tmp_path, k, capsys):
    ckpt, ckpt2 = str(tmp_path / "ckpt.t7"), str(tmp_path / "ckpt2.t7")
    straight = script.main(["--nce-k", str(k), "--epochs", "2"])
    first = script.main(["--nce-k", str(k), "--epochs", "1", "--ckpt", ckpt])
    loaded = torch.load(ckpt)                                   # default weights_only=True
    assert type(loaded["lemniscate"]) is (NCEAverage if k else LinearAverage)
    assert torch.equal(loaded["lemniscate"].memory, first["lemniscate"].memory)
    capsys.readouterr()
    resumed = script.main(["--nce-k", str(k), "--epochs", "1", "--resume", ckpt, "--ckpt", ckpt2])
    assert "normalization constant" not in capsys.readouterr().out   # Z was not re-estimated
    resumed["losses"] = first["losses"] + resumed["losses"]
    _same_run(straight, resumed)
    assert all(np.isfinite(straight["losses"]))
    if k:
        lem = resumed["lemniscate"]
        assert lem.K == 16 and float(lem.params[2]) > 0 and lem.params[1].item() == pytest.approx(0.1)
        assert torch.isfinite(lem.memory).all()


def test_two_views_per_image_before_one_backward_updates_each_row_twice():
    out = script.main(["--nce-k", "16", "--epochs", "1", "--two-views", "--ndata", "16", "--batch-size", "16"])
    lem = out["lemniscate"]
    # after one step every row was written (twice): unit length, unlike lemniscate's init
    torch.testing.assert_close(lem.memory.norm(dim=1), torch.ones(16))
    assert len(out["losses"]) == 1 and np.isfinite(out["losses"][0])


def test_what_a_script_touches():
    lem = NCEAverage(np.int64(8), np.int32(30), np.int64(5), T=torch.tensor(0.1), momentum=np.float32(0.5))
    assert lem.params.tolist() == [5, pytest.approx(0.1), -1, 0.5] and lem.params.dtype == torch.float32
    assert NCEAverage(8, 30, 5, T=1).params[1] == 1.0                   # a Python int for T
    LinearAverage(np.int64(8), 30, T=np.float64(0.07), momentum=torch.tensor(0.5))
    NCECriterion(np.int64(30))
    draws = lem.multinomial.draw(3000)
    assert draws.shape == (3000,) and draws.dtype == torch.int64
    assert int(draws.min()) >= 0 and int(draws.max()) < 30
    counts = torch.bincount(draws, minlength=30).float()
    assert float(counts.min()) > 50                                      # uniform: 100 expected each
    torch.testing.assert_close(lem.unigrams, torch.full((30,), 1 / 30))
    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    loss = NCECriterion(30)(lem(x, torch.arange(4)), torch.arange(4))
    assert loss.shape == (1,)
    assert loss.data[0].item() == loss.item()

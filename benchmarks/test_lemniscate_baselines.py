"""The original-style modules of bench_lemniscate.py (the drop-in providers' baseline) compute what
the drop-ins compute, on the same negatives: the baseline is the same step, not a strawman."""
import bench_lemniscate as bl
import torch
import torch.nn.functional as F

from instdisc_kernels.lemniscate import LinearAverage, NCEAverage, NCECriterion


def _inputs(N=60, B=5, D=16):
    mem = F.normalize(torch.randn(N, D), dim=1)
    x = F.normalize(torch.randn(B, D), dim=1)
    return mem, x, torch.tensor([3, 9, 9, 0, 59])


def _step(lem, crit, x, y):
    xg = x.clone().requires_grad_()
    out = lem(xg, y)
    loss = crit(out, y)
    loss.backward()
    return out.detach(), loss.detach().reshape(()), xg.grad


def test_original_style_nce_modules_match_the_drop_ins():
    mem, x, y = _inputs()
    K, T, z = 7, 0.1, 25.0
    idx = torch.randint(0, 60, (5, K + 1))
    orig = bl.OriginalNCEAverage(mem.clone(), K, T, z, 0.5)
    orig.multinomial.draw = lambda n: idx.clone().view(-1)
    drop = NCEAverage.from_buffers(torch.tensor([K, T, z, 0.5]), mem.clone())
    a = _step(orig, bl.OriginalNCECriterion(60), x, y)
    b = _step(lambda xx, yy: drop(xx, yy, idx=idx), NCECriterion(60), x, y)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(orig.memory, drop.memory, rtol=1e-5, atol=1e-6)


def test_original_style_linear_average_matches_the_drop_in_bit_for_bit():
    mem, x, y = _inputs()
    orig = bl.OriginalLinearAverage(mem.clone(), 0.07, 0.5)
    drop = LinearAverage.from_buffers(torch.tensor([0.07, 0.5]), mem.clone())
    a = _step(orig, F.cross_entropy, x, y)
    b = _step(drop, F.cross_entropy, x, y)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    torch.testing.assert_close(orig.memory, drop.memory, rtol=0, atol=2e-7)


def test_alias_table_draws_uniform_indices():
    draws = bl.AliasTable(10, torch.device("cpu")).draw(5000)
    assert draws.dtype == torch.int64 and int(draws.min()) >= 0 and int(draws.max()) < 10
    assert float(torch.bincount(draws, minlength=10).min()) > 400

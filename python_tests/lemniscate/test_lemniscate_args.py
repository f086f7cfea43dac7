"""Input checks of the drop-ins (issues 12, 13): constructor numbers, idx dtype, a Z estimate that is
not finite; every rejected call leaves memory and params bit-for-bit unchanged."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instdisc_kernels.lemniscate import LinearAverage, NCEAverage, NCECriterion


@pytest.mark.parametrize("kw,word", [
    (dict(Z=float("inf")), "Z"), (dict(Z=float("nan")), "Z"), (dict(Z=0), "Z"),
    (dict(T=float("nan")), "T"), (dict(T=float("inf")), "T"), (dict(T=0), "T"), (dict(T=torch.tensor([0.1, 0.2])), "T"),
    (dict(momentum=float("nan")), "momentum"), (dict(momentum=1.0), "momentum"), (dict(momentum=-0.1), "momentum"),
    (dict(T=True), "T"), (dict(K=4.0), "K"), (dict(K=np.float64(4)), "K"), (dict(K=0), "K"),
])
def test_nce_average_rejects_bad_numbers_naming_them(kw, word):
    args = dict(inputSize=4, outputSize=10, K=2)
    args.update(kw)
    with pytest.raises(ValueError, match=word):
        NCEAverage(**args)


def test_numbers_of_every_kind_the_original_accepts():
    lem = NCEAverage(torch.tensor(4), np.int16(10), torch.tensor(2), T=np.float32(0.25), momentum=0, Z=np.int64(7))
    assert lem.params.tolist() == [2, 0.25, 7, 0] and lem.memory.shape == (10, 4)
    assert NCEAverage(4, 10, 2, Z=-1).params[2] == -1                   # lemniscate's "not estimated"
    assert LinearAverage(4, 10, T=1, momentum=np.float16(0.5)).params.tolist() == [1, 0.5]
    with pytest.raises(ValueError, match="nLem"):
        NCECriterion(2.5)
    with pytest.raises(ValueError, match="momentum"):
        LinearAverage(4, 10, momentum=float("inf"))


def _state(lem):
    return lem.memory.clone(), lem.params.clone()


def _unchanged(lem, state):
    return torch.equal(lem.memory, state[0]) and torch.equal(lem.params, state[1])


@pytest.mark.parametrize("idx,err", [
    (torch.zeros(3, 3), TypeError), (torch.zeros(3, 3, dtype=torch.bool), TypeError),
    (torch.zeros(3, 3, dtype=torch.float64), TypeError), (torch.zeros(3, 1, dtype=torch.long), ValueError),
    (torch.full((3, 3), 10), ValueError), ([[0, 1, 2]] * 3, TypeError),
])
def test_explicit_idx_must_be_an_integer_matrix_in_range(idx, err):
    lem = NCEAverage(4, 10, 2)
    before = _state(lem)
    x = F.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    with pytest.raises(err, match="idx"):
        lem(x, torch.arange(3), idx=idx)
    assert _unchanged(lem, before)
    out = lem(x, torch.arange(3), idx=torch.zeros(3, 3, dtype=torch.int32))     # int32 is fine
    assert out.shape == (3, 3)


@pytest.mark.parametrize("backend", ["cpu", "eager"])
def test_a_z_estimate_that_is_not_finite_is_an_error_and_nothing_is_stored(backend):
    lem = NCEAverage(4, 10, 2, T=1e-3, backend=backend)
    with torch.no_grad():
        lem.memory.mul_(100.0)                                          # exp(V . x / T) overflows
    before = _state(lem)
    x = F.normalize(torch.randn(3, 4), dim=1).requires_grad_()
    with pytest.raises(ValueError, match="T="):
        lem(x, torch.arange(3))
    assert _unchanged(lem, before) and float(lem.params[2]) == -1
    with pytest.raises(ValueError, match="features"):
        lem(torch.full((3, 4), float("nan")), torch.arange(3))
    assert _unchanged(lem, before)


def test_criterion_rejects_what_is_not_an_output():
    crit = NCECriterion(10)
    with pytest.raises(TypeError, match="x"):
        crit(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="x"):
        crit(torch.zeros(3, 1))

"""Every public entry point rejects bad input with an error naming the argument,
before any bank row is written (the bank stays bit-for-bit unchanged)."""
import math

import pytest
import torch

import instdisc_kernels as ik

N, D, B = 40, 6, 4


def _setup():
    mem = ik.reference.init_memory(N, D, generator=torch.Generator().manual_seed(0))
    f = torch.nn.functional.normalize(torch.randn(B, D), dim=1)
    y = torch.tensor([0, 5, 5, 39])
    return mem, f, y


def _nan_features():
    f = torch.nn.functional.normalize(torch.randn(B, D), dim=1)
    f[1, 2] = float("nan")
    return f


def _inf_features():
    f = torch.nn.functional.normalize(torch.randn(B, D), dim=1)
    f[0, 0] = math.inf
    return f


# (description, kwargs overrides, exception, text the message must contain)
NCE_CASES = [
    ("features 1-D", dict(features=torch.randn(D)), ValueError, "features"),
    ("features int", dict(features=torch.ones(B, D, dtype=torch.int64)), TypeError, "features"),
    ("feature dim != bank dim", dict(features=torch.randn(B, D + 1)), ValueError, "features"),
    ("memory 3-D", dict(memory=torch.randn(2, N, D)), ValueError, "memory"),
    ("indices float", dict(indices=torch.zeros(B)), TypeError, "indices"),
    ("indices wrong length", dict(indices=torch.zeros(B + 1, dtype=torch.long)), ValueError, "indices"),
    ("indices 2-D", dict(indices=torch.zeros(B, 1, dtype=torch.long)), ValueError, "indices"),
    ("index >= N", dict(indices=torch.tensor([0, 1, 2, N])), ValueError, "indices"),
    ("negative index", dict(indices=torch.tensor([0, -1, 2, 3])), ValueError, "indices"),
    ("NaN features", dict(features=_nan_features()), ValueError, "features"),
    ("inf features", dict(features=_inf_features()), ValueError, "features"),
    ("K < 1", dict(num_negatives=0), ValueError, "num_negatives"),
    ("K not int", dict(num_negatives=2.5), ValueError, "num_negatives"),
    ("T = 0", dict(temperature=0.0), ValueError, "temperature"),
    ("T < 0", dict(temperature=-0.1), ValueError, "temperature"),
    ("T nan", dict(temperature=float("nan")), ValueError, "temperature"),
    ("momentum 1", dict(momentum=1.0), ValueError, "momentum"),
    ("momentum < 0", dict(momentum=-0.1), ValueError, "momentum"),
    ("proximal < 0", dict(proximal=-1.0), ValueError, "proximal"),
    ("loss_type", dict(loss_type="hinge"), ValueError, "loss_type"),
    ("z_ema", dict(z_ema=1.5), ValueError, "z_ema"),
    ("z string", dict(z="big"), TypeError, "z"),
    ("z 2 elements", dict(z=torch.tensor([1.0, 2.0])), ValueError, "z"),
    ("neg_indices float", dict(neg_indices=torch.zeros(B, 3)), TypeError, "neg_indices"),
    ("neg_indices wrong B", dict(neg_indices=torch.zeros(B + 1, 3, dtype=torch.long)), ValueError, "neg_indices"),
    ("neg_indices out of range", dict(neg_indices=torch.full((B, 3), N, dtype=torch.long)), ValueError, "neg_indices"),
    ("backend unknown", dict(backend="tpu"), ValueError, "backend"),
    ("backend unavailable", dict(backend="cuda"), ValueError, "backend"),
    ("noise_probs shape", dict(noise_probs=torch.ones(N + 1)), ValueError, "noise_probs"),
    ("noise_probs negative", dict(noise_probs=-torch.ones(N)), ValueError, "noise_probs"),
]


@pytest.mark.parametrize("case", NCE_CASES, ids=[c[0] for c in NCE_CASES])
def test_nce_loss_rejects_and_leaves_bank_unchanged(case):
    _, overrides, exc, word = case
    mem, f, y = _setup()
    args = dict(features=f, memory=mem, indices=y)
    kw = dict(num_negatives=3)
    for k, v in overrides.items():
        (args if k in args else kw)[k] = v
    before = args["memory"].clone()
    with pytest.raises(exc, match=word):
        ik.nce_loss(args["features"], args["memory"], args["indices"], **kw)
    assert torch.equal(args["memory"], before)


def test_nce_loss_rejects_tensors_on_different_devices():
    mem, f, y = _setup()
    before = mem.clone()
    with pytest.raises(ValueError, match="device"):
        ik.nce_loss(f.to("meta"), mem, y, num_negatives=3)
    assert torch.equal(mem, before)


SOFTMAX_CASES = [c for c in NCE_CASES if c[0] in (
    "features 1-D", "features int", "feature dim != bank dim", "indices float", "index >= N",
    "NaN features", "T = 0", "momentum 1", "backend unknown", "backend unavailable")]


@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=[c[0] for c in SOFTMAX_CASES])
def test_softmax_loss_rejects_and_leaves_bank_unchanged(case):
    _, overrides, exc, word = case
    mem, f, y = _setup()
    args = dict(features=f, memory=mem, indices=y)
    kw = {}
    for k, v in overrides.items():
        (args if k in args else kw)[k] = v
    before = args["memory"].clone()
    with pytest.raises(exc, match=word):
        ik.nonparametric_softmax_loss(args["features"], args["memory"], args["indices"], **kw)
    assert torch.equal(args["memory"], before)


@pytest.mark.parametrize("overrides,exc,word", [
    (dict(indices=torch.tensor([0, 1, 2, N])), ValueError, "indices"),
    (dict(features=_nan_features()), ValueError, "features"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(features=torch.randn(B, D + 2)), ValueError, "features"),
])
def test_bank_update_rejects_and_leaves_bank_unchanged(overrides, exc, word):
    mem, f, y = _setup()
    args = dict(features=f, indices=y, momentum=0.5)
    args.update(overrides)
    before = mem.clone()
    with pytest.raises(exc, match=word):
        ik.bank_update_(mem, args["indices"], args["features"], args["momentum"])
    assert torch.equal(mem, before)


def test_knn_rejects_bad_input():
    bank = torch.nn.functional.normalize(torch.randn(10, 4), dim=1)
    labels = torch.arange(10) % 3
    q = bank[:2]
    with pytest.raises(ValueError, match="k=11"):
        ik.knn_predict(q, bank, labels, k=11)
    with pytest.raises(ValueError, match="bank_labels"):
        ik.knn_predict(q, bank, labels[:5], k=3)
    with pytest.raises(TypeError, match="bank_labels"):
        ik.knn_predict(q, bank, labels.float(), k=3)
    with pytest.raises(ValueError, match="queries"):
        ik.knn_predict(torch.randn(2, 5), bank, labels, k=3)
    with pytest.raises(ValueError, match="temperature"):
        ik.knn_predict(q, bank, labels, k=3, temperature=0)
    with pytest.raises(ValueError, match="bank_labels"):
        ik.knn_predict(q, bank, labels, k=3, num_classes=2)


@pytest.mark.parametrize("ctor,kw,word", [
    (ik.MemoryBank, dict(num_samples=0, dim=4), "num_samples"),
    (ik.MemoryBank, dict(num_samples=4, dim=4, momentum=1.0), "momentum"),
    (ik.MemoryBank, dict(num_samples=4, dim=4, init="ones"), "init"),
    (ik.InstDiscLoss, dict(num_samples=10, dim=4, num_negatives=-1), "num_negatives"),
    (ik.InstDiscLoss, dict(num_samples=10, dim=4, temperature=0), "temperature"),
    (ik.InstDiscLoss, dict(num_samples=10, dim=4, z="sometimes"), "z"),
    (ik.NCEAverage, dict(inputSize=4, outputSize=10, K=0), "K"),
    (ik.NCEAverage, dict(inputSize=4, outputSize=10, K=2, T=-1), "T"),
    (ik.LinearAverage, dict(inputSize=4, outputSize=10, momentum=2), "momentum"),
    (ik.NCECriterion, dict(nLem=0), "nLem"),
])
def test_constructors_reject_bad_hyper_parameters(ctor, kw, word):
    with pytest.raises(ValueError, match=word):
        ctor(**kw)


def test_dropins_reject_and_leave_bank_unchanged():
    lem = ik.NCEAverage(D, N, 3)
    before = lem.memory.clone()
    f = torch.randn(B, D, requires_grad=True)
    with pytest.raises(ValueError, match="indices"):
        lem(f, torch.tensor([0, 1, 2, N]))
    with pytest.raises(ValueError, match="features"):
        lem(torch.randn(B, D + 1), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="idx"):
        lem(f, torch.tensor([0, 1, 2, 3]), idx=torch.zeros(B, 1, dtype=torch.long))
    lin = ik.LinearAverage(D, N)
    lin_before = lin.memory.clone()
    with pytest.raises(ValueError, match="features"):
        lin(_nan_features(), torch.tensor([0, 1, 2, 3]))
    assert torch.equal(lem.memory, before) and torch.equal(lin.memory, lin_before)


def test_validate_false_skips_value_checks_only():
    mem, f, y = _setup()
    # shapes are still checked
    with pytest.raises(ValueError, match="features"):
        ik.nce_loss(torch.randn(B, D + 1), mem, y, num_negatives=3, validate=False)
    # values are not: a NaN goes through (the caller promised valid input)
    loss = ik.nce_loss(_nan_features(), mem, y, num_negatives=3, validate=False, update_memory=False)
    assert torch.isnan(loss)

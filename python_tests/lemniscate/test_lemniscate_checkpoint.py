"""Checkpoints: drop-in whole-module checkpoints load with plain torch.load (weights_only),
and load_checkpoint reads the original modules' pickles (classes named lib.NCEAverage.NCEAverage,
...) without lemniscate's code: stand-in classes registered under those module names here write
the pickle, and are removed from sys.modules before loading."""
import pickle
import sys
import types

import pytest
import torch
from torch import nn

from instdisc_kernels.lemniscate import LinearAverage, NCEAverage, NCECriterion, load_checkpoint

N, D, K = 20, 6, 4
NAMES = {"NCEAverage": "lib.NCEAverage", "LinearAverage": "lib.LinearAverage",
         "NCECriterion": "lib.NCECriterion", "AliasMethod": "lib.alias_multinomial"}


def _stand_in_classes():
    """Classes with the original's names and instance state (docs/lemniscate.md), in modules named like lemniscate's."""
    class AliasMethod:
        def __init__(self, probs):
            self.prob = torch.ones(probs.shape[0])
            self.alias = torch.zeros(probs.shape[0], dtype=torch.long)

    class NCEAverage(nn.Module):
        def __init__(self, inputSize, outputSize, K, T=0.07, momentum=0.5, Z=None):
            super().__init__()
            self.nLem = outputSize
            self.unigrams = torch.ones(outputSize)
            self.multinomial = AliasMethod(self.unigrams)
            self.unigrams.div_(self.unigrams.sum())
            self.K = K
            self.register_buffer("params", torch.tensor([K, T, -1, momentum]))
            self.register_buffer("memory", torch.rand(outputSize, inputSize))

    class LinearAverage(nn.Module):
        def __init__(self, inputSize, outputSize, T=0.07, momentum=0.5):
            super().__init__()
            self.nLem = outputSize
            self.register_buffer("params", torch.tensor([T, momentum]))
            self.register_buffer("memory", torch.rand(outputSize, inputSize))

    class NCECriterion(nn.Module):
        def __init__(self, nLem):
            super().__init__()
            self.nLem = nLem

    return {"NCEAverage": NCEAverage, "LinearAverage": LinearAverage, "NCECriterion": NCECriterion,
            "AliasMethod": AliasMethod}


def _save_original(path, build):
    """torch.save(build(classes)) with the stand-ins importable as lib.*, then remove them."""
    classes = _stand_in_classes()
    mods = {"lib": types.ModuleType("lib")}
    for name, modname in NAMES.items():
        mods.setdefault(modname, types.ModuleType(modname))
        classes[name].__module__ = modname
        classes[name].__qualname__ = name
        setattr(mods[modname], name, classes[name])
    sys.modules.update(mods)
    try:
        obj = build(classes)
        torch.save(obj, path)
    finally:
        for m in mods:
            sys.modules.pop(m, None)
    return obj


def _original_nce(classes, z=321.5):
    lem = classes["NCEAverage"](D, N, K, T=0.1, momentum=0.4)
    lem.params[2] = z                                                   # Z as estimated in training
    return lem


def test_plain_torch_load_cannot_read_the_original_but_load_checkpoint_can(tmp_path):
    path = tmp_path / "ckpt.t7"
    orig = _save_original(path, lambda c: {"net": {"module.fc.weight": torch.randn(3, 3)},
                                           "lemniscate": _original_nce(c), "acc": 80.5, "epoch": 7})
    with pytest.raises(pickle.UnpicklingError, match="lib.NCEAverage"):
        torch.load(path)
    ckpt = load_checkpoint(path, map_location="cpu")
    assert set(ckpt) == {"net", "lemniscate", "acc", "epoch"} and ckpt["acc"] == 80.5 and ckpt["epoch"] == 7
    lem = ckpt["lemniscate"]
    assert type(lem) is NCEAverage and lem.K == K and lem.nLem == N
    assert torch.equal(lem.memory, orig["lemniscate"].memory)
    assert torch.equal(lem.params, orig["lemniscate"].params)          # K, T, Z = 321.5, momentum
    assert lem.multinomial.draw(5).shape == (5,)
    # Z is not re-estimated: the forward uses the stored one
    x = torch.nn.functional.normalize(torch.randn(3, D), dim=1)
    out = lem(x, torch.tensor([0, 1, 2]))
    assert float(lem.params[2]) == 321.5
    torch.testing.assert_close(out[:, 0], torch.exp((lem.memory[:3] * x).sum(1) / 0.1) / 321.5)


def test_load_checkpoint_linear_average_criterion_and_main_py_layout(tmp_path):
    path = tmp_path / "main.pth.tar"
    orig = _save_original(path, lambda c: {
        "epoch": 3, "arch": "resnet18", "state_dict": {"module.fc.bias": torch.zeros(2)},
        "lemniscate": c["LinearAverage"](D, N, T=0.07, momentum=0.5), "best_prec1": 0.0,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "params": [0]}]},
        "extra": [c["NCECriterion"](N), (c["LinearAverage"](D, N),)]})
    ckpt = load_checkpoint(str(path))
    lin = ckpt["lemniscate"]
    assert type(lin) is LinearAverage and torch.equal(lin.memory, orig["lemniscate"].memory)
    assert lin.params.tolist() == [pytest.approx(0.07), 0.5]
    assert type(ckpt["extra"][0]) is NCECriterion and ckpt["extra"][0].nLem == N
    assert type(ckpt["extra"][1][0]) is LinearAverage
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == 0.03


@pytest.mark.parametrize("corrupt,word", [
    (lambda lem: lem.params.__setitem__(2, float("inf")), "Z"),
    (lambda lem: lem.params.__setitem__(1, float("nan")), "T"),
    (lambda lem: lem.params.__setitem__(3, 1.5), "momentum"),
    (lambda lem: lem.memory.__setitem__((0, 0), float("nan")), "memory"),
    (lambda lem: setattr(lem.multinomial, "prob", torch.linspace(0, 1, N)), "multinomial"),
])
def test_load_checkpoint_rejects_invalid_state_naming_it(tmp_path, corrupt, word):
    path = tmp_path / "bad.t7"

    def build(c):
        lem = _original_nce(c)
        corrupt(lem)
        return {"lemniscate": lem}
    _save_original(path, build)
    with pytest.raises(ValueError, match=word):
        load_checkpoint(path)


def test_load_checkpoint_runs_no_code_from_the_file(tmp_path):
    path = tmp_path / "evil.t7"

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"lemniscate": Evil()}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path)


@pytest.mark.parametrize("make", [lambda: NCEAverage(D, N, K, T=0.1), lambda: LinearAverage(D, N),
                                  lambda: NCECriterion(N)], ids=["NCEAverage", "LinearAverage", "NCECriterion"])
def test_drop_in_whole_module_checkpoint_loads_with_default_torch_load(tmp_path, make):
    mod = make()
    net = nn.Sequential(nn.Linear(4, D), nn.BatchNorm1d(D))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt.t7"
    torch.save({"net": net.state_dict(), "lemniscate": mod, "acc": 12.5, "epoch": 2,
                "optimizer": opt.state_dict()}, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    with open(path, "rb") as f:                        # named by the public path (as before the package)
        assert f"instdisc_kernels.lemniscate\n{type(mod).__name__}".encode() in _pickle_bytes(f)
    ckpt = torch.load(path)                                              # weights_only=True
    back = ckpt["lemniscate"]
    assert type(back) is type(mod) and ckpt["epoch"] == 2
    if hasattr(mod, "memory"):
        assert torch.equal(back.memory, mod.memory) and torch.equal(back.params, mod.params)
        y = torch.arange(3)
        x = torch.nn.functional.normalize(torch.randn(3, D), dim=1).requires_grad_()
        out = back(x, y)
        (out.sum()).backward()                                          # the loaded module trains
        assert not torch.equal(back.memory[:3], mod.memory[:3])
    assert load_checkpoint(path)["lemniscate"].__class__ is type(mod)   # load_checkpoint reads it too


def _pickle_bytes(f):
    import zipfile
    with zipfile.ZipFile(f) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))

"""Bad input to the C++/CUDA ops (torch.ops.instdisc.*, called directly, past the Python checks):
the exception type and message come from one header (csrc/checks.h), so they are the same on every
backend, and the types are the ones the Python layer raises (instdisc_kernels/_validate.py):
TypeError for a dtype, ValueError for everything else. Nothing is written to the bank."""
import pytest
import torch

from instdisc_kernels import _backend

OPS = torch.ops.instdisc
B, K, D, N = 3, 4, 8, 10


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    mem = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    F = torch.nn.functional.normalize(torch.randn(B, D, generator=g), dim=1)
    y = torch.tensor([1, 2, 1])
    neg = torch.randint(0, N, (B, K), generator=g)
    return {k: v.to(device) for k, v in dict(mem=mem, F=F, y=y, neg=neg).items()}


def _nce(t, **over):
    a = dict(F=t["F"], mem=t["mem"], y=t["y"], neg=t["neg"], z=torch.tensor([0.0], device=t["mem"].device),
             seed=torch.tensor([0], device=t["mem"].device), K=K, T=0.1, prox=0.0, lt=0, ema=0.0)
    a.update(over)
    return OPS.nce_forward(a["F"], a["mem"], a["y"], a["neg"], a["z"], a["seed"], a["K"], a["T"], a["prox"],
                           a["lt"], a["ema"], False, None)


def _idx(t):
    return torch.cat([t["y"][:, None], t["neg"]], 1)


def _probs(t):
    return OPS.nce_probs(t["F"], t["mem"], _idx(t), torch.tensor([1.0], device=t["mem"].device), 0.1)[0]


CASES = {  # name: (call, exception type, message start)
    "indices dtype": (lambda t: _nce(t, y=t["y"].int()), TypeError, "indices must be an int64 tensor"),
    "features shape": (lambda t: _nce(t, F=t["F"][:, :5]), ValueError, "features must be a non-empty (B, D)"),
    "features dtype": (lambda t: _nce(t, F=t["F"].int()), TypeError, "features must be float32/float64"),
    "neg shape": (lambda t: _nce(t, neg=t["neg"][:, :2]), ValueError, "neg_indices must have shape"),
    "temperature": (lambda t: _nce(t, T=-1.0), ValueError, "temperature must be a positive finite number"),
    "loss_type": (lambda t: _nce(t, lt=3), ValueError, "loss_type must be 0 (nce) or 1 (infonce)"),
    "z size": (lambda t: _nce(t, z=torch.zeros(2, device=t["mem"].device)), ValueError,
               "z must hold exactly one value"),
    "probs idx shape": (lambda t: OPS.nce_probs(t["F"], t["mem"], _idx(t)[:2], torch.tensor([1.0], device=t["mem"].device),
                                                0.1), ValueError, "idx must have shape"),
    "probs_backward dtype": (lambda t: OPS.nce_probs_backward(_probs(t), _probs(t).half(), t["mem"], _idx(t), 0.1),
                             TypeError, "probs must be float32 or float64"),
    "bank_update momentum": (lambda t: OPS.bank_update_(t["mem"], t["y"], t["F"], 1.5), ValueError,
                             "momentum must be in [0, 1)"),
    "bank_update features": (lambda t: OPS.bank_update_(t["mem"], t["y"], t["F"][:2], 0.5), ValueError,
                             "features must have shape"),
}


def _error(device, name):
    t = _inputs(device)
    before = t["mem"].clone()
    call, _, _ = CASES[name]
    with pytest.raises((TypeError, ValueError)) as e:
        call(t)
    assert torch.equal(t["mem"], before)
    return e.type, str(e.value).splitlines()[0]


@pytest.mark.skipif(not _backend.has_kernel("nce_forward", "CPU"), reason="the C++ extension is not built")
@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_error_type_and_message(name):
    typ, msg = _error("cpu", name)
    assert typ is CASES[name][1] and msg.startswith(CASES[name][2]), (typ, msg)


@pytest.mark.skipif(not (torch.cuda.is_available() and _backend.has_kernel("nce_forward", "CUDA")),
                    reason="needs a GPU and the CUDA kernels")
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_error_matches_cpu(name):
    assert _error("cuda", name) == _error("cpu", name)

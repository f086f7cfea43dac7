"""The CPU kernels under every CPU capability this machine has (csrc/cpu/capability.h).

The extension is compiled for the x86-64 baseline and picks, once at load, the kernels built for
the best capability the CPU supports, capped by INSTDISC_CPU_CAPABILITY. Each capability runs in
a subprocess with the variable set: the extension must import there, report the capability, and
nce_forward (NCE and InfoNCE), the NCEAverage ops, bank_update_, knn_topk, the softmax's fused
pass and the shared negatives' tile epilogues must match the float64 oracle (instdisc_kernels/reference.py) on small
odd shapes, and the in-kernel negatives the documented stream (docs/negatives.md). "default" is
the baseline (SSE2) build, which every x86-64 CPU runs. The child loads only torch, the extension,
the oracle module and python_tests/helpers (a few seconds), not the whole package.
"""
import functools
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

if __name__ != "__main__":  # the child (below) loads only the extension and the oracle
    from instdisc_kernels import _backend

    pytestmark = pytest.mark.skipif(not _backend.has_kernel("nce_forward", "CPU"),
                                    reason="the C++ extension instdisc_kernels._C is not built")

LEVELS = ["default", "avx2", "avx512", "avx512_bf16"]
HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
ROOT = os.path.dirname(TESTS)


@functools.lru_cache(maxsize=None)
def _supported():
    """The capabilities this CPU runs: every level up to the one chosen without a cap."""
    best = _run_child(None, checks=False)["capability"]
    return LEVELS[:LEVELS.index(best) + 1]


def _env(cap, **extra):
    env = dict(os.environ, **extra)
    env.pop("INSTDISC_CPU_CAPABILITY", None)
    if cap is not None:
        env["INSTDISC_CPU_CAPABILITY"] = cap
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE, TESTS, env.get("PYTHONPATH", "")])
    return env


def _run_child(cap, *, checks=True):
    out = subprocess.run([sys.executable, __file__, "--child"] + ([] if checks else ["--no-checks"]), cwd=ROOT,
                         env=_env(cap), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["stderr"] = out.stderr
    return res


@pytest.mark.parametrize("cap", LEVELS)
def test_kernels_match_oracle_under_capability(cap):
    if cap not in _supported():
        pytest.skip(f"this CPU does not support {cap}")
    res = _run_child(cap)
    assert res["capability"] == cap
    assert res["checked"] >= 10, res


def test_unknown_capability_is_ignored_with_a_warning():
    res = _run_child("sse9", checks=False)
    assert "ignoring INSTDISC_CPU_CAPABILITY=sse9" in res["stderr"]
    assert res["capability"] == _supported()[-1]


# The capability below the machine's best that runs each kNN prefilter (csrc/cpu/knn_kernels.h):
# AVX512-BF16 products, fp32 FMA tiles, the portable bf16 loop.
PREFILTER_CAP = {"bf16-avx512": "avx512_bf16", "fp32-fma": "avx512", "bf16-portable": "default"}
PREFILTER_OF = {"avx512_bf16": "bf16-avx512", "avx512": "fp32-fma", "avx2": "fp32-fma", "default": "bf16-portable"}


@pytest.mark.slow
@pytest.mark.parametrize("prefilter", list(PREFILTER_CAP))
def test_knn_suite_on_each_prefilter(prefilter):
    """test_knn_cpu.py again under each kNN prefilter this CPU runs, other than the one it picks."""
    cap = PREFILTER_CAP[prefilter]
    if cap not in _supported():
        pytest.skip(f"this CPU does not support {cap}")
    if PREFILTER_OF[_supported()[-1]] == prefilter:
        pytest.skip(f"the {prefilter} prefilter is this CPU's own: test_knn_cpu.py runs it")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          os.path.join(TESTS, "knn", "test_knn_cpu.py")], cwd=ROOT, env=_env(cap),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " passed" in out.stdout


# --------------------------------------------------------------------------- #
# The child: small checks against the oracle                                   #
# --------------------------------------------------------------------------- #
def _close(got, want, tol, what):
    got, want = got.double(), want.double()
    err = (got - want).abs().max().item()
    scale = max(want.abs().max().item(), 1e-30)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} * {scale:.3g}"


def _load_child_modules():
    """The extension (registers torch.ops.instdisc.*) and the oracle, without the package."""
    so = sorted(glob.glob(os.path.join(ROOT, "instdisc_kernels", "_C*.so")))
    torch.ops.load_library(so[0])
    spec = importlib.util.spec_from_file_location("instdisc_reference", os.path.join(ROOT, "instdisc_kernels",
                                                                                      "reference.py"))
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    return ref


def _child(checks=True):
    ref = _load_child_modules()
    ops = torch.ops.instdisc
    checked = 0
    if not checks:
        print(json.dumps({"capability": ops.cpu_capability(), "checked": 0}))
        return
    g = torch.Generator().manual_seed(7)
    for bank_dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-5), (torch.float16, 2e-5),
                            (torch.float64, 1e-12)):
        for B, K, D, N in ((1, 1, 100, 13), (5, 33, 100, 37)):
            mem = ((torch.rand(N, D, generator=g) * 2 - 1) / (D / 3) ** 0.5).to(bank_dtype)   # lemniscate's init
            feat_dtype = torch.float64 if bank_dtype == torch.float64 else torch.float32
            F = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1)
            F = F.to(feat_dtype)
            y = torch.randint(0, N, (B,), generator=g)
            if B > 1:
                y[1] = y[0]                                   # repeated positive
            neg = torch.randint(0, N, (B, K), generator=g)
            for loss_type in (0, 1):
                loss, grad, _ = ops.nce_forward(F, mem, y, neg, torch.tensor([0.0]), torch.tensor([0]), K, 0.1,
                                                0.0, loss_type, 0.0, False, None)
                rl, rg, _ = ref.nce_forward(F, mem, y, neg, temperature=0.1, loss_type=loss_type)
                _close(loss, rl, tol, f"nce_forward loss {bank_dtype} {loss_type}")
                _close(grad, rg, tol * 10, f"nce_forward grad {bank_dtype} {loss_type}")
                checked += 1
            idx = ref.index_matrix(y, neg)
            P, z = ops.nce_probs(F, mem, idx, torch.tensor([2.0]), 0.1)
            _close(P, ref.nce_probs(F, mem, idx, 0.1, 2.0), tol, f"nce_probs {bank_dtype}")
            checked += 1
            m2 = mem.clone()
            ops.bank_update_(m2, y, F, 0.5)
            want = mem.double().clone()
            ref.memory_update_(want, y, F.double(), 0.5)
            _close(m2, want, 1e-2 if bank_dtype in (torch.bfloat16, torch.float16) else tol,
                   f"bank_update_ {bank_dtype}")
            checked += 1
            q = torch.nn.functional.normalize(torch.randn(3, D, generator=g, dtype=torch.float64), dim=1)
            k = min(5, N)
            v, i = ops.knn_topk(q.to(feat_dtype), mem, k, 16)
            rv, ri = ref.knn_topk(q.to(feat_dtype), mem, k)
            _close(v, rv, 1e-6, f"knn_topk {bank_dtype}")
            assert torch.equal(i, ri), f"knn_topk {bank_dtype}: indices differ from the oracle's"
            checked += 1
            if feat_dtype == torch.float32 and ops.cpu_capability() != "default":
                # the exact softmax's fused pass (FMA tiles: avx2 and up): the loss from its state
                Fs = F / 0.1
                m, l, _ = ops.softmax_online_state(Fs, mem)
                want = ref.softmax_loss_value(F, mem, y, 0.1) + (F.double() * mem[y].double()).sum(1).mean() / 0.1
                _close((m.double() + l.double().log()).mean(), want, tol, f"softmax_online_state {bank_dtype}")
                checked += 1
    from helpers.tile_epilogues import check_tile_epilogues
    checked += check_tile_epilogues(ops)      # the shared negatives' tile epilogues
    if ops.cpu_capability() != "default":     # and their one-pass ops (FMA tiles)
        from helpers.tile_epilogues import check_fused_passes
        checked += check_fused_passes(ops)
    from helpers.negative_stream import check_negative_stream
    checked += check_negative_stream(ops)     # the in-kernel negatives against docs/negatives.md
    print(json.dumps({"capability": ops.cpu_capability(), "checked": checked}))


if __name__ == "__main__" and "--child" in sys.argv:
    _child(checks="--no-checks" not in sys.argv)

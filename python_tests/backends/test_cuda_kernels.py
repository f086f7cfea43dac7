"""CUDA C++ kernels (csrc/cuda/*.cu) and the build logic of setup.py.

GPU tests (marked gpu, skipped without a CUDA device) call torch.ops.instdisc.*
on CUDA tensors, directly and through the public API with backend="cuda", and
compare with the float64 oracle (instdisc_kernels/reference.py). Tolerances:
fp32 accumulation against float64, relative to the result's magnitude; bf16 /
fp16 banks are compared with the oracle evaluated on the same low-precision
values, so only accumulation error remains. In-kernel negatives use the same
Philox stream as the CPU kernel (csrc/cpu/nce.cpp), so with the same seed the
CUDA and CPU ops must agree: that is how in-kernel sampling is tested here (the
CPU tests check the stream's uniformity and exclude_positive).

CPU tests check setup.py's choice of CUDA build and its toolkit discovery on
fake toolkits (no nvcc needed).
"""
import importlib.util
import os
import re
import stat
from pathlib import Path

import pytest
import torch

import instdisc_kernels as ik
from instdisc_kernels import _backend
from instdisc_kernels import reference as ref

ROOT = Path(__file__).resolve().parents[2]
_NO_CUDA_KERNELS = not _backend.has_kernel("nce_forward", "CUDA")


def gpu(test):
    """GPU test: needs a CUDA device (conftest skips it otherwise) and an extension built with CUDA."""
    reason = "instdisc_kernels._C was built without its CUDA kernels (INSTDISC_BUILD_CUDA=0 or no nvcc)"
    return pytest.mark.gpu(pytest.mark.skipif(_NO_CUDA_KERNELS, reason=reason)(test))


DEV = "cuda"


# --------------------------------------------------------------------------- #
# Build logic (CPU)                                                            #
# --------------------------------------------------------------------------- #
def _load_setup():
    spec = importlib.util.spec_from_file_location("instdisc_setup_under_test", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # defines functions only: setup() runs under __main__
    return mod


def _fake_toolkit(tmp_path):
    tk = tmp_path / "cuda-x"
    (tk / "bin").mkdir(parents=True)
    (tk / "include").mkdir()
    (tk / "include" / "cuda_runtime.h").write_text("/* fake */\n")
    nvcc = tk / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 0\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return tk


def _isolate_env(monkeypatch, path):
    for var in ("CUDA_HOME", "CUDA_PATH", "INSTDISC_BUILD_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(path))


def test_find_cuda_home_resolves_symlinked_nvcc(tmp_path, monkeypatch):
    S = _load_setup()
    tk = _fake_toolkit(tmp_path)
    bindir = tmp_path / "usr_bin"
    bindir.mkdir()
    (bindir / "nvcc").symlink_to(tk / "bin" / "nvcc")
    _isolate_env(monkeypatch, bindir)
    assert S.find_cuda_home() == os.path.realpath(tk)


def test_find_cuda_home_asks_a_wrapper_script(tmp_path, monkeypatch):
    # /usr/local/bin/nvcc-style wrapper: the parent of its bin/ is no toolkit,
    # nvcc -v --dryrun reports the real one.
    S = _load_setup()
    tk = _fake_toolkit(tmp_path)
    bindir = tmp_path / "local" / "bin"
    bindir.mkdir(parents=True)
    wrapper = bindir / "nvcc"
    wrapper.write_text(f"#!/bin/sh\necho '#$ _HERE_={tk}/bin' >&2\necho '#$ TOP={tk}/bin/..' >&2\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    _isolate_env(monkeypatch, bindir)
    assert S.find_cuda_home() == os.path.realpath(tk)


def test_find_cuda_home_prefers_env_and_handles_no_nvcc(tmp_path, monkeypatch):
    S = _load_setup()
    _isolate_env(monkeypatch, tmp_path)  # PATH without nvcc
    assert S.find_cuda_home() is None
    monkeypatch.setenv("CUDA_HOME", "/opt/some/cuda")
    assert S.find_cuda_home() == "/opt/some/cuda"


def test_cuda_switch(tmp_path, monkeypatch):
    S = _load_setup()
    _isolate_env(monkeypatch, tmp_path)
    monkeypatch.setenv("INSTDISC_BUILD_CUDA", "0")
    assert S.cuda_plan() == (False, "INSTDISC_BUILD_CUDA=0")
    monkeypatch.setenv("INSTDISC_BUILD_CUDA", "yes")
    with pytest.raises(SystemExit, match="INSTDISC_BUILD_CUDA"):
        S.cuda_plan()
    monkeypatch.setenv("INSTDISC_BUILD_CUDA", "1")  # forced, but no nvcc on PATH (or no CUDA torch)
    with pytest.raises(SystemExit, match="INSTDISC_BUILD_CUDA=1"):
        S.cuda_plan()
    monkeypatch.delenv("INSTDISC_BUILD_CUDA")
    build, why = S.cuda_plan()  # auto: falls back to CPU with a reason
    assert build is False and why


def test_cpu_only_extension_is_unchanged(tmp_path, monkeypatch):
    S = _load_setup()
    _isolate_env(monkeypatch, tmp_path)
    monkeypatch.setenv("INSTDISC_BUILD_CUDA", "0")
    monkeypatch.chdir(ROOT)
    (ext,) = S.extensions()
    assert ext.name == "instdisc_kernels._C"
    assert all(src.endswith(".cpp") for src in ext.sources) and "csrc/instdisc.cpp" in ext.sources
    assert ext.extra_compile_args["cxx"][:2] == ["-O3", "-fopenmp"]
    assert "nvcc" not in ext.extra_compile_args


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_cuda_extension_plan(tmp_path, monkeypatch):
    import torch.utils.cpp_extension as cpp_ext

    S = _load_setup()
    tk = _fake_toolkit(tmp_path)
    _isolate_env(monkeypatch, tk / "bin")
    monkeypatch.setenv("CUDA_HOME", str(tk))  # restored after the test (extensions() sets it too)
    monkeypatch.setattr(cpp_ext, "CUDA_HOME", cpp_ext.CUDA_HOME)
    monkeypatch.chdir(ROOT)
    (ext,) = S.extensions()
    cu = [s for s in ext.sources if s.endswith(".cu")]
    assert sorted(cu) == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu")) and cu
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == S.DEFAULT_CUDA_ARCHS == "8.0;9.0+PTX"
    assert not any(f.startswith("-std") for f in ext.extra_compile_args["nvcc"])  # torch picks it
    assert cpp_ext.CUDA_HOME == str(tk)


def test_extension_registers_cuda_kernels_when_built_with_cuda():
    if not _backend.extension_loaded():
        pytest.skip("instdisc_kernels._C is not built")
    if not _backend.has_kernel("bank_update_", "CUDA"):
        pytest.skip("instdisc_kernels._C was built without CUDA (INSTDISC_BUILD_CUDA=0 or no nvcc)")
    for op in ("nce_forward", "nce_probs", "nce_probs_backward", "bank_update_"):
        assert _backend.has_kernel(op, "CUDA"), op
        assert _backend.has_kernel(op, "CPU"), op


def test_smoke_test_values_match_the_oracle():
    # csrc/test/smoke_test.cpp (ctest) holds numbers pasted from csrc/test/smoke_values.py:
    # they must still be what reference.py computes.
    spec = importlib.util.spec_from_file_location("smoke_values", ROOT / "csrc" / "test" / "smoke_values.py")
    sv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sv)
    F, V, y, neg = sv.inputs()
    idx = ref.index_matrix(y, neg)
    z = ref.estimate_z(ref.nce_scores(F, V, idx), sv.T, sv.N)
    Vu = ref.memory_update_(V.clone(), y, F, 0.5)
    values = torch.cat([ref.nce_loss_value(F, V, idx, sv.T, z).reshape(1), z.reshape(1),
                        ref.nce_grad(F, V, idx, sv.T, z).reshape(-1),
                        ref.infonce_loss_value(F, V, idx, sv.T).reshape(1),
                        ref.infonce_grad(F, V, idx, sv.T).reshape(-1), Vu[[0, 2]].double().reshape(-1)])
    pasted = [float(x) for x in re.findall(r"-?\d+\.\d+(?:e-?\d+)?", (ROOT / "csrc" / "test" / "smoke_test.cpp").read_text())]
    for v in values.tolist():
        assert any(abs(v - p) <= 1e-8 * (1 + abs(v)) for p in pasted), f"{v:.9g} is not in smoke_test.cpp"


# --------------------------------------------------------------------------- #
# GPU: nce_forward                                                             #
# --------------------------------------------------------------------------- #
OP = torch.ops.instdisc.nce_forward if _backend.extension_loaded() else None


def _call(F, mem, y, neg, *, z=0.0, T=0.07, K=None, proximal=0.0, loss_type=0, z_ema=0.0, seed=0,
          exclude=False, noise=None):
    K = neg.shape[1] if neg is not None else K
    dev = F.device
    return OP(F, mem, y, neg, torch.tensor([float(z)], device=dev), torch.tensor([seed], device=dev), K, T,
              proximal, loss_type, z_ema, exclude, noise)


def _oracle(F, mem, y, neg, *, z=0.0, T=0.07, proximal=0.0, loss_type=0, z_ema=0.0, noise=None):
    """(loss, grad, Z) in float64 from reference.py, on CPU."""
    loss, grad, Z = ref.nce_forward(F.cpu(), mem.cpu(), y.cpu(), neg.cpu(), temperature=T, z=z, loss_type=loss_type,
                                    proximal=proximal, z_ema=z_ema,
                                    noise_probs=None if noise is None else noise.cpu())
    return float(loss), grad, float(Z)


def _close(got, want, tol, what):
    got = got.detach().double().cpu()
    want = torch.as_tensor(want, dtype=torch.float64)
    scale = max(1.0, float(want.abs().max()))
    err = float((got - want).abs().max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol * scale:.3g}"


def _data(B, K, D, N, *, bank=torch.float32, feat=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mem = ref.init_memory(N, D, generator=g).to(bank)
    F = torch.nn.functional.normalize(torch.randn(B, D, generator=g, dtype=torch.float64), dim=1).to(feat)
    y = torch.randint(0, N, (B,), generator=g)
    neg = torch.randint(0, N, (B, K), generator=g)
    return F.to(DEV), mem.to(DEV), y.to(DEV), neg.to(DEV)


SHAPES = [(1, 1, 3, 5), (3, 7, 100, 50), (64, 256, 128, 1000), (5, 33, 129, 40), (2, 4095, 128, 300),
          (16, 64, 512, 100)]


@gpu
@pytest.mark.parametrize("B,K,D,N", SHAPES)
@pytest.mark.parametrize("loss_type", [0, 1])
def test_nce_forward_matches_oracle(B, K, D, N, loss_type):
    F, mem, y, neg = _data(B, K, D, N)
    y[0] = neg[0, 0]  # a negative equal to its positive
    if B > 2:
        y[2] = y[1]   # repeated positives
    loss, grad, z = _call(F, mem, y, neg, loss_type=loss_type)
    want_loss, want_grad, want_z = _oracle(F, mem, y, neg, loss_type=loss_type)
    _close(loss, want_loss, 2e-5, "loss")
    _close(grad, want_grad, 2e-5, "grad")
    if loss_type == 0:
        _close(z, [want_z], 2e-5, "z")
    assert loss.dtype == grad.dtype == torch.float32 and z.dtype == torch.float32


@gpu
@pytest.mark.parametrize("bank", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("feat", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("D", [128, 100])
def test_nce_forward_dtypes(bank, feat, D):
    F, mem, y, neg = _data(8, 50, D, 200, bank=bank, feat=feat)
    for loss_type in (0, 1):
        loss, grad, _ = _call(F, mem, y, neg, loss_type=loss_type, proximal=0.1)
        want_loss, want_grad, _ = _oracle(F, mem, y, neg, loss_type=loss_type, proximal=0.1)
        acc = torch.float64 if feat == torch.float64 else torch.float32
        assert loss.dtype == grad.dtype == acc
        tol = 1e-9 if (feat == torch.float64 and bank == torch.float64) else (5e-6 if feat == torch.float64 else 2e-5)
        _close(loss, want_loss, tol, f"loss {bank} {feat}")
        _close(grad, want_grad, tol, f"grad {bank} {feat}")


@gpu
@pytest.mark.parametrize("mode", ["fixed", "ema", "estimate"])
def test_nce_forward_z_modes(mode):
    F, mem, y, neg = _data(6, 40, 128, 100)
    z, z_ema = {"fixed": (3.5, 0.0), "ema": (3.5, 0.9), "estimate": (0.0, 0.9)}[mode]
    loss, grad, z_out = _call(F, mem, y, neg, z=z, z_ema=z_ema)
    want_loss, want_grad, want_z = _oracle(F, mem, y, neg, z=z, z_ema=z_ema)
    _close(z_out, [want_z], 1e-5, "z")
    _close(loss, want_loss, 2e-5, "loss")
    _close(grad, want_grad, 2e-5, "grad")


@gpu
def test_nce_forward_noise_probs():
    F, mem, y, neg = _data(4, 20, 128, 60)
    noise = torch.rand(60, device=DEV) + 0.1
    noise = noise / noise.sum()
    loss, grad, _ = _call(F, mem, y, neg, noise=noise, z=2.0)
    want_loss, want_grad, _ = _oracle(F, mem, y, neg, z=2.0, noise=noise)
    _close(loss, want_loss, 2e-5, "loss")
    _close(grad, want_grad, 2e-5, "grad")


@gpu
@pytest.mark.parametrize("exclude", [False, True])
@pytest.mark.parametrize("loss_type", [0, 1])
def test_in_kernel_negatives_match_cpu_stream(exclude, loss_type):
    # Same Philox stream on both backends: identical draws, so the results agree
    # to accumulation error; another seed gives another loss.
    F, mem, y, _ = _data(5, 1, 128, 97)
    got = _call(F, mem, y, None, K=300, seed=1234, exclude=exclude, loss_type=loss_type)
    cpu = _call(F.cpu(), mem.cpu(), y.cpu(), None, K=300, seed=1234, exclude=exclude, loss_type=loss_type)
    _close(got[0], cpu[0].double(), 2e-5, "loss vs cpu")
    _close(got[1], cpu[1].double(), 2e-5, "grad vs cpu")
    again = _call(F, mem, y, None, K=300, seed=1234, exclude=exclude, loss_type=loss_type)
    assert torch.equal(got[0], again[0]) and torch.equal(got[1], again[1])
    other = _call(F, mem, y, None, K=300, seed=99, exclude=exclude, loss_type=loss_type)
    assert not torch.equal(got[0], other[0])


@gpu
def test_nce_forward_is_deterministic():
    F, mem, y, neg = _data(3, 5000, 128, 4000)  # several column slices per row
    a = _call(F, mem, y, neg)
    b = _call(F, mem, y, neg)
    for x, w in zip(a, b):
        assert torch.equal(x, w)


@gpu
def test_nce_loss_public_api_cuda_backend():
    F, mem, y, neg = _data(16, 64, 128, 500)
    Fr = F.clone().requires_grad_(True)
    mem_before = mem.clone()
    loss = ik.nce_loss(Fr, mem, y, neg_indices=neg, temperature=0.07, backend="cuda")
    loss.backward()
    want_loss, want_grad, _ = _oracle(F, mem_before, y, neg)
    _close(loss, want_loss, 2e-5, "loss")
    _close(Fr.grad, want_grad, 2e-5, "grad")
    want_mem = ref.memory_update_(mem_before.cpu().clone(), y.cpu(), F.cpu(), 0.5)
    _close(mem, want_mem.double(), 1e-6, "bank after the step")


@gpu
def test_opcheck_nce_forward_cuda():
    F, mem, y, neg = _data(3, 6, 16, 20)
    args = (F, mem, y, neg, torch.tensor([0.0], device=DEV), torch.tensor([0], device=DEV), 6, 0.1, 0.0, 0,
            0.0, False, None)
    torch.library.opcheck(torch.ops.instdisc.nce_forward.default, args)


@gpu
def test_nce_forward_rejects_large_d_clearly():
    F, mem, y, neg = _data(2, 3, 600, 10)
    with pytest.raises(ValueError, match="feature dim"):
        _call(F, mem, y, neg)


# --------------------------------------------------------------------------- #
# GPU: nce_probs / nce_probs_backward                                          #
# --------------------------------------------------------------------------- #
@gpu
@pytest.mark.parametrize("B,K,D,N", [(1, 1, 3, 4), (4, 9, 129, 30), (32, 200, 128, 500), (2, 3000, 128, 100)])
@pytest.mark.parametrize("bank", [torch.float32, torch.bfloat16])
def test_nce_probs_and_backward(B, K, D, N, bank):
    F, mem, y, neg = _data(B, K, D, N, bank=bank)
    idx = torch.cat([y.view(-1, 1), neg], 1)
    for z in (0.0, 5.0):
        P, z_out = torch.ops.instdisc.nce_probs(F, mem, idx, torch.tensor([z], device=DEV), 0.07)
        want_Z = ref.estimate_z(ref.nce_scores(F.cpu(), mem.cpu(), idx.cpu()), 0.07, N) if z <= 0 else z
        want_P = ref.nce_probs(F.cpu(), mem.cpu(), idx.cpu(), 0.07, want_Z)
        _close(z_out, [float(want_Z)], 1e-5, "z")
        _close(P / want_P.max().to(DEV), want_P / want_P.max(), 2e-5, "probs")
    gP = torch.randn(B, K + 1, device=DEV)
    got = torch.ops.instdisc.nce_probs_backward(gP, P, mem, idx, 0.07)
    coef = gP.double().cpu() * P.double().cpu() / 0.07
    want = torch.einsum("bk,bkd->bd", coef, mem.double().cpu()[idx.cpu()])
    _close(got, want, 2e-5, "probs backward")
    assert got.dtype == P.dtype


# --------------------------------------------------------------------------- #
# GPU: bank_update_                                                            #
# --------------------------------------------------------------------------- #
@gpu
@pytest.mark.parametrize("bank", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("B,D,N", [(1, 3, 4), (64, 128, 50), (33, 129, 10), (5000, 100, 3000)])
def test_bank_update_matches_oracle_last_wins(bank, B, D, N):
    F, mem, y, _ = _data(B, 1, D, N, bank=bank)
    y[-1] = y[0]  # a repeated index: the last occurrence wins
    want = ref.memory_update_(mem.cpu().clone(), y.cpu(), F.cpu(), 0.5)
    torch.ops.instdisc.bank_update_(mem, y, F, 0.5)
    if bank in (torch.float32, torch.float64):
        _close(mem, want.double(), 1e-6 if bank == torch.float32 else 1e-12, "bank")
    else:  # one rounding of the fp32 result: at most one ulp apart from the oracle's rounding
        ulp = 2.0 ** -7 if bank == torch.bfloat16 else 2.0 ** -10
        _close(mem, want.double(), ulp, "bank")
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[y.cpu()] = False
    assert torch.equal(mem.cpu()[untouched], want[untouched])


@gpu
def test_bank_unchanged_after_rejected_call():
    F, mem, y, neg = _data(4, 8, 128, 30)
    before = mem.clone()
    with pytest.raises(ValueError, match="indices"):
        ik.nce_loss(F, mem, torch.tensor([0, 1, 2, 30], device=DEV), neg_indices=neg, backend="cuda")
    with pytest.raises(ValueError, match="features"):
        ik.bank_update_(mem, y, F[:, :5], backend="cuda")
    assert torch.equal(mem, before)

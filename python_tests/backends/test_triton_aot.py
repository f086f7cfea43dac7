"""Ahead-of-time compilation of every launched Triton kernel for an H100/H200
(sm_90), without a GPU: the interpreter (TRITON_INTERPRET=1, used by every
other Triton test) accepts code that the real compiler rejects, so this file
runs each kernel through Triton's full CUDA pipeline (TTIR -> TTGIR -> LLVM ->
PTX -> ptxas -> cubin) with the constexprs the launchers pick on a GPU.

How the cases are made: a subprocess with TRITON_INTERPRET=0 (under
TRITON_INTERPRET=1, set by conftest.py, @triton.jit makes InterpretedFunction
objects, which triton.compile cannot take; with 0 they are JITFunctions) replaces every launched kernel of the three modules by a
recorder, runs the launchers on CPU tensors as if they were on an sm_90 device
with 132 SMs (B=256, D=128, K=4096; banks fp32/bf16/fp16; NCE and InfoNCE;
explicit and in-kernel negatives; exclude_positive; noise; fixed Z and EMA;
proximal term; NCEAverage forward/backward; softmax fp32/bf16 precision), turns
each recorded launch into the signature / constexprs / divisibility attributes
the JIT would derive, and compiles each distinct one with triton.compile for
GPUTarget("cuda", 90, 32). Kernels are found as the JITFunction objects of the
modules (helpers called from other kernels excluded), so a kernel that no
launcher scenario reaches fails test_every_kernel_has_an_aot_case.

Register counts and stack (local memory, i.e. spills) are read from the cubin's
ELF and printed per case (pytest -s or -rP shows them).
"""
from __future__ import annotations

import ast
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

pytestmark = pytest.mark.slow          # Triton ahead-of-time compiles of every kernel

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODULES = ("nce_triton", "nce_probs_triton", "bank_update_triton", "softmax_triton", "nce_shared_triton")
TARGET = ("cuda", 90, 32)
SM_COUNT = 132                      # H100 SXM and H200
B, D, K = 256, 128, 4096
N = 50_021                          # bank rows (odd, like a real dataset size; small to allocate)
TEMPERATURE = 0.07
MAX_SHARED = 232448                 # sm_90 opt-in shared memory per block (227 KiB): larger fails at launch
# kernels (by module) whose every variant must compile without a stack frame
NO_SPILLS = ("softmax_triton.", "nce_shared_triton.")


# --------------------------------------------------------------------------- #
# Test side (TRITON_INTERPRET=1 process)                                       #
# --------------------------------------------------------------------------- #
def _jit_names(tree):
    """Names of the module-level functions decorated with triton.jit / triton.jit(...)."""
    out = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for dec in node.decorator_list:
                target = dec.func if isinstance(dec, ast.Call) else dec
                if isinstance(target, ast.Attribute) and target.attr == "jit":
                    out.append(node)
    return out


def _launched_kernels_from_source():
    """module.kernel for every @triton.jit function that no other jit function calls."""
    names = []
    for mod in MODULES:
        tree = ast.parse((ROOT / "instdisc_kernels" / "ops" / f"{mod}.py").read_text())
        fns = _jit_names(tree)
        called = {n.func.id for f in fns for n in ast.walk(f)
                  if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        names += [f"{mod}.{f.name}" for f in fns if f.name not in called]
    return names


KERNELS = _launched_kernels_from_source()


@pytest.fixture(scope="module")
def aot():
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "aot.json"
        env = dict(os.environ, TRITON_INTERPRET="0",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.run([sys.executable, __file__, str(out)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not out.exists():
            raise AssertionError(f"AOT subprocess failed (rc {proc.returncode}):\n"
                                 f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        res = json.loads(out.read_text())
    if res.get("skip"):
        pytest.skip(res["skip"])
    return res


def test_every_kernel_has_an_aot_case(aot):
    # the JITFunction objects found in the modules are the kernels found in their source
    assert sorted(aot["kernels"]) == sorted(KERNELS)
    missing = sorted(set(aot["kernels"]) - {c["kernel"] for c in aot["cases"]})
    assert not missing, (f"kernels launched by no AOT scenario (add one to _scenarios in "
                         f"{pathlib.Path(__file__).name}): {missing}")
    assert len(aot["cases"]) >= len(KERNELS)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_compiles_to_sm90_cubin(aot, kernel):
    cases = [c for c in aot["cases"] if c["kernel"] == kernel]
    assert cases, f"{kernel}: no AOT case"
    print(f"\n{kernel}: {len(cases)} distinct compilations for sm_90")
    for c in cases:
        spill = "  SPILLS" if c.get("stack") else ""
        print(f"  regs={c.get('regs')!s:>4} stack={c.get('stack')!s:>5}B{spill} smem={c.get('shared')!s:>6}B "
              f"warps={c['num_warps']} {c['desc']}  [{', '.join(c['scenarios'][:3])}"
              f"{', ...' if len(c['scenarios']) > 3 else ''}]")
    failed = [c for c in cases if not c["ok"]]
    assert not failed, "\n\n".join(f"{c['desc']}\n{c['error']}" for c in failed)
    for c in cases:
        assert "cubin" in c["asm"] and c["cubin_bytes"] > 0, c["desc"]
        assert c["regs"] is not None and 0 < c["regs"] <= 255, c["desc"]
        assert c["regs"] * 32 * c["num_warps"] <= 65536, f"{c['desc']}: too many registers per block"
        assert c["shared"] <= MAX_SHARED, f"{c['desc']}: {c['shared']} B of shared memory > {MAX_SHARED}"
        if kernel.startswith(NO_SPILLS):
            assert c["stack"] == 0, f"{c['desc']}: {c['stack']} B of stack (register spills), {c['regs']} registers"


# --------------------------------------------------------------------------- #
# Subprocess side (TRITON_INTERPRET=0): record launches, compile them          #
# --------------------------------------------------------------------------- #
def _shared_scenarios(sh, banks, feats, y, g, torch):
    """Shared negatives (ops/nce_shared_triton.py): the Z pass, the NCE pass and InfoNCE (through the
    softmax kernel) per bank dtype and precision. The recorder does not run the kernels, so the Z
    pass's outputs are garbage and the Z check may raise: the launches are recorded by then."""
    negs = torch.randint(0, N, (K,), generator=g)

    def call(bank, prec, loss, z, b=B):
        def run():
            try:
                sh.forward_triton(feats["fp32"][:b], banks[bank], y[:b], negs, torch.tensor([z]), TEMPERATURE,
                                  0.0, loss, 0.0, True, None, prec, 0)
            except ValueError:
                pass
        return run
    out = []
    for bank in ("fp32", "bf16"):
        for prec in ("fp32", "bf16"):
            out.append((f"shared-nce-{bank}-{prec}-zfirst", call(bank, prec, 0, -1.0)))
            out.append((f"shared-nce-{bank}-{prec}-zfixed", call(bank, prec, 0, float(N))))
            out.append((f"shared-infonce-{bank}-{prec}", call(bank, prec, 1, -1.0)))
    out.append(("shared-nce-bf16-bf16-B16", call("bf16", "bf16", 0, float(N), b=16)))
    return out


def _scenarios(nt, pt, bt, st, torch, sh=None):
    """(name, thunk) pairs; each thunk calls one launcher with realistic inputs."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, N, (B,), generator=g)
    neg = torch.randint(0, N, (B, K), generator=g)
    seed = torch.tensor([1234], dtype=torch.int64)
    noise = torch.full((N,), 1.0 / N)
    banks = {n: torch.randn(N, D, generator=g).to(dt)
             for n, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))}
    feats = {n: torch.randn(B, D, generator=g).to(dt)
             for n, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))}
    z_fixed = torch.tensor([float(N)])          # z > 0
    z_first = torch.tensor([-1.0])              # estimate on the first batch

    def nce(bank, feat="fp32", loss=0, has_neg=True, exclude=False, use_noise=False, z_ema=0.0, prox=0.0,
            z=z_first):
        return lambda: nt.nce_forward_triton(
            feats[feat], banks[bank], y, neg if has_neg else None, z, seed, K, TEMPERATURE, prox, loss,
            z_ema, exclude, noise if use_noise else None)

    out = []
    for bank in banks:
        for loss, lname in ((0, "nce"), (1, "infonce")):
            out.append((f"{lname}-{bank}-neg", nce(bank, loss=loss)))
            out.append((f"{lname}-{bank}-draw", nce(bank, loss=loss, has_neg=False)))
            out.append((f"{lname}-{bank}-draw-exclude", nce(bank, loss=loss, has_neg=False, exclude=True)))
            out.append((f"{lname}-{bank}-neg-exclude", nce(bank, loss=loss, exclude=True)))
            out.append((f"{lname}-{bank}-neg-noise-prox", nce(bank, loss=loss, use_noise=True, prox=0.1)))
        out.append((f"nce-{bank}-draw-ema", nce(bank, has_neg=False, z_ema=0.5)))
        out.append((f"nce-{bank}-neg-ema-fixedz", nce(bank, z_ema=0.5, z=z_fixed)))
    # autocast-style bf16 / fp16 features
    out.append(("nce-bf16-featbf16-draw", nce("bf16", feat="bf16", has_neg=False)))
    out.append(("infonce-bf16-featbf16-draw", nce("bf16", feat="bf16", loss=1, has_neg=False)))
    out.append(("infonce-fp16-featfp16-neg", nce("fp16", feat="fp16", loss=1)))

    idx = torch.cat([y[:, None], neg], 1)
    probs = torch.rand(B, K + 1, generator=g)
    for bank in banks:
        out.append((f"probs-{bank}", lambda bank=bank: pt.nce_probs_triton(feats["fp32"], banks[bank], idx,
                                                                           z_first, TEMPERATURE)))
        out.append((f"probs-bwd-{bank}", lambda bank=bank: pt.nce_probs_backward_triton(
            probs, probs, banks[bank], idx, TEMPERATURE)))

    for bank in banks:
        for feat in ("fp32", bank):
            out.append((f"bank-update-{bank}-feat{feat}",
                        lambda bank=bank, feat=feat: bt.bank_update_triton_(banks[bank].clone(), y, feats[feat],
                                                                            0.5)))
        for prec in ("fp32", "bf16"):
            out.append((f"softmax-{bank}-{prec}",
                        lambda bank=bank, prec=prec: st.forward_triton(feats["fp32"], banks[bank], y, TEMPERATURE,
                                                                      prec, 0)))
    out.append(("softmax-bf16-featbf16-bf16", lambda: st.forward_triton(feats["bf16"], banks["bf16"], y,
                                                                        TEMPERATURE, "bf16", 0)))
    # a small batch: more column splits per row (BLOCK_S) and 16-row softmax tiles
    ys = y[:16]
    for loss in (0, 1):
        out.append((f"{('nce', 'infonce')[loss]}-bf16-draw-B16", lambda loss=loss: nt.nce_forward_triton(
            feats["fp32"][:16], banks["bf16"], ys, None, z_first, seed, K, TEMPERATURE, 0.0, loss, 0.0, False,
            None)))
    for prec in ("fp32", "bf16"):
        out.append((f"softmax-bf16-{prec}-B16", lambda prec=prec: st.forward_triton(
            feats["fp32"][:16], banks["bf16"], ys, TEMPERATURE, prec, 0)))
    if sh is not None:
        out += _shared_scenarios(sh, banks, feats, y, g, torch)
    return out


_PTR = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64",
        "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _specialize(kernel, args, kwargs, torch):
    """(signature, constexprs, attrs, options) as the JIT derives them at launch
    (ints equal to 1 become constexprs, pointers and ints divisible by 16 get
    tt.divisibility unless do_not_specialize)."""
    names = list(kernel.arg_names)
    no_spec = {p.name for p in kernel.params if p.do_not_specialize}
    bound = dict(zip(names, args))
    options = {}
    for k, v in kwargs.items():
        if k in names:
            bound[k] = v
        else:
            options[k] = v
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        v = bound[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _PTR[str(v.dtype).replace("torch.", "")]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            raise TypeError(f"{kernel.__name__}.{p.name}: bool runtime argument (make it a constexpr)")
        elif isinstance(v, int):
            if v == 1 and p.name not in no_spec:
                sig[p.name], consts[p.name] = "constexpr", 1
                continue
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0 and p.name not in no_spec:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}.{p.name}: unexpected argument type {type(v).__name__}")
    options.setdefault("num_warps", 4)
    return sig, consts, attrs, options


def _elf_resources(cubin):
    """(registers, stack frame bytes) of the kernel of a one-kernel sm_90 cubin (ELF64),
    from the EIATTR_REGCOUNT (0x2f) and EIATTR_FRAME_SIZE (0x11) entries of its
    .nv.info sections (what cuobjdump -res-usage prints as REG and STACK; a stack
    frame is local memory, i.e. register spills here)."""
    import struct
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    stroff = secs[shstrndx][4]
    found = {}
    for s in secs:
        name = cubin[stroff + s[0]:cubin.index(b"\0", stroff + s[0])]
        if not name.startswith(b".nv.info"):
            continue
        off, end = s[4], s[4] + s[5]
        while off + 4 <= end:
            fmt, attr, size = cubin[off], cubin[off + 1], struct.unpack_from("<H", cubin, off + 2)[0]
            if fmt == 0x04:                            # EIFMT_SVAL: u16 size, then (symbol, value)
                if attr in (0x2F, 0x11) and size >= 8:
                    found.setdefault(attr, struct.unpack_from("<I", cubin, off + 8)[0])
                off += 4 + size
            else:                                      # EIFMT_NVAL / BVAL / HVAL: 4 bytes
                off += 4
    return found.get(0x2F), found.get(0x11)


def _ptxas_available():
    try:
        from triton import knobs
        path = knobs.nvidia.ptxas.path
    except Exception:  # older triton: bundled binary or PATH
        import shutil

        import triton.backends.nvidia as nv
        bundled = pathlib.Path(nv.__file__).parent / "bin" / "ptxas"
        path = os.environ.get("TRITON_PTXAS_PATH") or (str(bundled) if bundled.exists() else shutil.which("ptxas"))
    return bool(path) and os.access(path, os.X_OK)


def _main(out_path):
    def done(res):
        pathlib.Path(out_path).write_text(json.dumps(res))

    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from triton.runtime.jit import JITFunction
    except ImportError as e:
        return done({"skip": f"triton or its compiler API is unavailable: {e}"})
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        return done({"skip": "triton has no CUDA (nvidia) backend"})
    if not _ptxas_available():
        return done({"skip": "ptxas not found (neither triton's bundled one nor TRITON_PTXAS_PATH / PATH)"})

    import types

    import torch

    from instdisc_kernels.ops import bank_update_triton as bt
    from instdisc_kernels.ops import nce_probs_triton as pt
    from instdisc_kernels.ops import nce_shared_triton as sh
    from instdisc_kernels.ops import nce_triton as nt
    from instdisc_kernels.ops import softmax_triton as st
    mods = {"nce_triton": nt, "nce_probs_triton": pt, "bank_update_triton": bt, "softmax_triton": st, "nce_shared_triton": sh}

    # kernels: module-level JITFunctions that no other JITFunction of the module calls
    kernels = {}
    for mname, mod in mods.items():
        jits = {n: f for n, f in vars(mod).items() if isinstance(f, JITFunction) and f.__module__ == mod.__name__}
        called = set()
        for f in jits.values():
            called |= {n.func.id for n in ast.walk(ast.parse(f.src))
                       if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        kernels.update({f"{mname}.{n}": (mod, n, f) for n, f in jits.items() if n not in called})

    # record the launches, as on an sm_90 device with SM_COUNT SMs
    records = []

    class Recorder:
        def __init__(self, key):
            self.key = key

        def __getitem__(self, grid):
            return lambda *args, **kwargs: records.append((self.key, args, kwargs))

    cuda = torch.device("cuda")
    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    for key, (mod, n, _f) in kernels.items():
        patch(mod, n, Recorder(key))
    patch(torch.cuda, "get_device_properties", lambda *a, **k: types.SimpleNamespace(multi_processor_count=SM_COUNT))
    for mod in (nt, pt, st):
        orig = mod._launch_params
        patch(mod, "_launch_params", lambda *a, _orig=orig: _orig(*a[:-1], cuda))
    for mod in (nt, pt):
        patch(mod, "_check_device", lambda t: None)
    assert not st.triton_interpreting()
    cases = {}
    try:
        for scen, thunk in _scenarios(nt, pt, bt, st, torch, sh):
            del records[:]
            thunk()
            for key, args, kwargs in records:
                sig, consts, attrs, options = _specialize(kernels[key][2], args, kwargs, torch)
                ident = json.dumps([key, sig, {k: str(v) for k, v in consts.items()},
                                    sorted(map(str, attrs)), options], sort_keys=True)
                if ident not in cases:
                    cases[ident] = dict(kernel=key, sig=sig, consts=consts, attrs=attrs, options=options,
                                        scenarios=[])
                cases[ident]["scenarios"].append(scen)
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)

    target = GPUTarget(*TARGET)
    results = []
    for c in cases.values():
        fn = kernels[c["kernel"]][2]
        flags = {k: v for k, v in c["consts"].items() if fn.params[fn.arg_names.index(k)].is_constexpr}
        specialized = sorted(set(c["consts"]) - set(flags))
        desc = " ".join(f"{k}={getattr(v, 'name', v)}" for k, v in flags.items())
        desc += " | " + " ".join(f"{k}:{t}" for k, t in c["sig"].items() if t.startswith("*"))
        if specialized:
            desc += " | =1: " + ",".join(specialized)
        r = dict(kernel=c["kernel"], desc=desc, num_warps=c["options"]["num_warps"], scenarios=c["scenarios"],
                 ok=False, asm=[], cubin_bytes=0, regs=None, stack=None, shared=None, error=None)
        try:
            src = ASTSource(fn=fn, signature=c["sig"], constexprs=c["consts"], attrs=c["attrs"])
            k = triton.compile(src, target=target, options=c["options"])
            cubin = k.asm.get("cubin", b"")
            r.update(ok=True, asm=sorted(k.asm), cubin_bytes=len(cubin), shared=k.metadata.shared)
            if cubin:
                r["regs"], r["stack"] = _elf_resources(cubin)
        except Exception as e:  # a compile error is the finding: report it
            r["error"] = f"{type(e).__name__}: {str(e)[:6000]}"
        results.append(r)
    done({"kernels": sorted(kernels), "cases": results})


if __name__ == "__main__":
    _main(sys.argv[1])

"""Build of instdisc_kernels._C: the C++ and CUDA operators in csrc/.

The CUDA sources (csrc/cuda/*.cu) are built when the installed torch has CUDA
and nvcc is found; otherwise the extension is CPU-only (a one-line notice says
why). INSTDISC_BUILD_CUDA=1 forces the CUDA build (an error if impossible),
INSTDISC_BUILD_CUDA=0 disables it. TORCH_CUDA_ARCH_LIST picks the GPU
architectures (default below). The toolkit root (CUDA_HOME) is found from
nvcc when not set.

The C++ code is compiled for the portable x86-64 baseline: the hot CPU kernels
are compiled once per CPU capability (AVX2, AVX-512) and picked at load time
(csrc/cpu/capability.h; INSTDISC_CPU_CAPABILITY=default|avx2|avx512|avx512_bf16
caps the choice at run time). INSTDISC_NATIVE=1 adds -march=native (a build
for this machine only: it may crash with an illegal instruction elsewhere).
"""
import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # A100, H100/H200 (+PTX for newer GPUs); small = fast compile


def _is_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))


def find_cuda_home():
    """CUDA toolkit root: $CUDA_HOME / $CUDA_PATH, else where nvcc lives.

    nvcc may be a symlink or a wrapper script outside the toolkit (e.g.
    /usr/local/bin/nvcc running <toolkit>/bin/nvcc): symlinks are resolved,
    and if the parent of bin/ is no toolkit, nvcc itself reports its TOP dir.
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if _is_toolkit(root):
        return root
    try:
        out = subprocess.run([nvcc, "-v", "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.M)
    if m:
        root = os.path.realpath(m.group(1).strip())
        if _is_toolkit(root):
            return root
    return None


def nvidia_include_dirs(torch_dir):
    """Header dirs of the pip CUDA packages installed next to torch (site-packages/nvidia/*/include):
    the toolkit may lack headers torch's CUDA headers include (cublas, cusparse, curand)."""
    base = os.path.join(os.path.dirname(torch_dir), "nvidia")
    return sorted(d for d in glob.glob(os.path.join(base, "*", "include")) if os.path.isdir(d))


def cuda_plan():
    """(build_cuda, reason or CUDA_HOME)."""
    flag = os.environ.get("INSTDISC_BUILD_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        raise SystemExit(f"INSTDISC_BUILD_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return False, "INSTDISC_BUILD_CUDA=0"
    import torch

    why = None
    home = None
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} has no CUDA"
    else:
        home = find_cuda_home()
        if home is None:
            why = "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if why is not None:
        if flag == "1":
            raise SystemExit(f"INSTDISC_BUILD_CUDA=1 but {why}")
        return False, why
    return True, home


def extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]  # the C++ standard comes from torch (C++17 or C++20)
    native = os.environ.get("INSTDISC_NATIVE", "0").strip()
    if native not in ("0", "1"):
        raise SystemExit(f"INSTDISC_NATIVE must be 0 or 1, got {native!r}")
    if native == "1":  # opt-in: this machine's ISA everywhere (not portable)
        cxx.append("-march=native")
    build_cuda, info = cuda_plan()
    if not build_cuda:
        print(f"instdisc_kernels: building the CPU-only extension ({info})", file=sys.stderr)
        from torch.utils.cpp_extension import CppExtension

        return [
            CppExtension(
                "instdisc_kernels._C",
                sources,
                extra_compile_args={"cxx": cxx},
                extra_link_args=["-fopenmp"],
                py_limited_api=False,
            )
        ]
    # torch.utils.cpp_extension reads CUDA_HOME when first imported.
    os.environ["CUDA_HOME"] = info
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    import torch
    import torch.utils.cpp_extension as cpp_ext

    cpp_ext.CUDA_HOME = info  # in case it was imported before with another guess
    # -isystem: searched after the toolkit's own include dir, only fills gaps.
    sys_inc = [f for d in nvidia_include_dirs(os.path.dirname(torch.__file__)) for f in ("-isystem", d)]
    # No -std here: torch adds the standard it needs for host and device code.
    nvcc = ["-O3", "-lineinfo"] + sys_inc
    print(f"instdisc_kernels: building with CUDA (CUDA_HOME={info}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})", file=sys.stderr)
    return [
        cpp_ext.CUDAExtension(
            "instdisc_kernels._C",
            sources + sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu"))),
            extra_compile_args={"cxx": cxx + sys_inc, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    ]


if __name__ == "__main__":
    ext_modules = extensions()  # first: it sets CUDA_HOME before torch.utils.cpp_extension is imported
    from torch.utils.cpp_extension import BuildExtension

    setup(
        packages=find_packages(include=["instdisc_kernels", "instdisc_kernels.*"]),
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )

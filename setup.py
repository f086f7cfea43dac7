"""Build of instdisc_kernels._C: the C++ (and later CUDA) operators in csrc/."""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cxx = ["-O3", "-fopenmp"]  # the C++ standard comes from torch (C++17 or C++20)
    if os.environ.get("INSTDISC_NATIVE", "1") == "1":
        cxx.append("-march=native")
    return [
        CppExtension(
            "instdisc_kernels._C",
            sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    ]


setup(
    packages=find_packages(include=["instdisc_kernels", "instdisc_kernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)

"""Builds the native extension expseg_fast._C from csrc/.

A CppExtension (C++ with OpenMP) always; the CUDA kernels are added when the installed torch has
CUDA and nvcc is found (CUDAExtension). EXPSEG_FAST_CUDA=0 forces a CPU-only build, =1 requires CUDA.
Install with `pip install --no-build-isolation -e .` so the extension is built against the torch
that runs it.
"""
import os
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def want_cuda() -> bool:
    flag = os.environ.get("EXPSEG_FAST_CUDA", "auto")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "1" and not available:
        raise RuntimeError("EXPSEG_FAST_CUDA=1 but torch has no CUDA or nvcc was not found (CUDA_HOME)")
    return available and flag != "0"


def extension():
    cpp = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp"))
    cxx = ["-O3", "-fopenmp", "-fno-trapping-math"]  # no FP traps: lets the tile loops vectorise
    if want_cuda():
        cu = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("cuda/*.cu"))
        return CUDAExtension(
            "expseg_fast._C",
            cpp + cu,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("expseg_fast._C", cpp, extra_compile_args=cxx, extra_link_args=["-fopenmp"])


setup(ext_modules=[extension()], cmdclass={"build_ext": BuildExtension})

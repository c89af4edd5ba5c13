"""Build script. The pure-Python package always installs; the optional compiled extension ``rotkern._C``
(``torch.ops.rotkern.rotated_adamw_unit_``, csrc/) is built when

- ``ROTKERN_BUILD_EXT=1`` (the CPU path; plus the CUDA path when CUDA_HOME is set and
  ``ROTKERN_SKIP_CUDA_BUILD`` != 1), or
- CUDA_HOME is set and ``ROTKERN_SKIP_CUDA_BUILD`` != 1.

Building needs torch at build time, so build without isolation, e.g. ``make ext`` (which runs
``ROTKERN_BUILD_EXT=1 python setup.py build_ext --inplace``) or ``pip install --no-build-isolation -e .``.
MAX_JOBS, NVCC_THREADS and TORCH_CUDA_ARCH_LIST are honoured by torch's build helpers.
"""

import glob
import os
import sys

from setuptools import setup


def _extension():
    want_cpu = os.environ.get("ROTKERN_BUILD_EXT", "0") == "1"
    want_cuda = bool(os.environ.get("CUDA_HOME")) and os.environ.get("ROTKERN_SKIP_CUDA_BUILD", "0") != "1"
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu")) if want_cuda else []
    if not cpp or not (want_cpu or want_cuda):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if want_cpu:
            sys.exit("ROTKERN_BUILD_EXT=1 needs torch at build time: install torch, then build without isolation")
        print("rotkern: torch is not importable at build time; skipping the optional extension", file=sys.stderr)
        return [], {}
    # OpenMP: at::parallel_for's header implementation only runs in parallel when compiled with it.
    cxx = ["-O3", "-fopenmp"]
    if cu:
        nvcc = ["-O3", f"--threads={os.environ.get('NVCC_THREADS', '4')}"]
        ext = CUDAExtension(
            "rotkern._C",
            cpp + cu,
            define_macros=[("ROTKERN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("rotkern._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

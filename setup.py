"""Build script. The pure-Python package always installs; the optional compiled extension
``rotkern._C`` is built only when csrc/ has sources, CUDA_HOME is set and ROTKERN_SKIP_CUDA_BUILD != 1
(MAX_JOBS, NVCC_THREADS and TORCH_CUDA_ARCH_LIST are honoured by torch's build helpers)."""

import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*.cu"))
if sources and os.environ.get("ROTKERN_SKIP_CUDA_BUILD", "0") != "1" and os.environ.get("CUDA_HOME"):
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    nvcc_threads = os.environ.get("NVCC_THREADS", "4")
    ext_modules.append(
        CUDAExtension(
            "rotkern._C",
            sources,
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", f"--threads={nvcc_threads}"]},
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)

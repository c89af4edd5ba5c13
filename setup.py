"""Build script. The pure-Python package always installs; the optional compiled extension ``rotkern._C``
(``torch.ops.rotkern.rotated_adamw_unit_``, csrc/) is built when

- ``ROTKERN_BUILD_EXT=1`` (the CPU path; plus the CUDA path when CUDA_HOME is set and
  ``ROTKERN_SKIP_CUDA_BUILD`` != 1), or
- CUDA_HOME is set and ``ROTKERN_SKIP_CUDA_BUILD`` != 1.

Building needs torch at build time, so build without isolation: ``ROTKERN_BUILD_EXT=1 pip install
--no-build-isolation .``, or ``make ext`` in a checkout. Every wheel ships the sources (as ``rotkern/_csrc``), so
``python -m rotkern.build_ext`` adds the extension to an install that lacks it. The extension's flags live in
``rotkern/build_ext.py`` (loaded here by path), the one place they are written.
"""

import glob
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

_spec = importlib.util.spec_from_file_location("_rotkern_build_ext", Path(__file__).parent / "rotkern" / "build_ext.py")
_build_ext = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build_ext)


class BuildPyWithSources(build_py):
    """Copies csrc/ into the built package as rotkern/_csrc, for ``python -m rotkern.build_ext`` after install."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "rotkern" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for pattern in ("*.cpp", "*.h", "*.inc", "*.cu", "*.cuh"):
            for f in glob.glob(os.path.join("csrc", pattern)):
                shutil.copy2(f, target)


def _extension():
    want_cpu = os.environ.get("ROTKERN_BUILD_EXT", "0") == "1"
    want_cuda = bool(os.environ.get("CUDA_HOME")) and os.environ.get("ROTKERN_SKIP_CUDA_BUILD", "0") != "1"
    if not glob.glob("csrc/*.cpp") or not (want_cpu or want_cuda):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension
    except ImportError:
        if want_cpu:
            sys.exit("ROTKERN_BUILD_EXT=1 needs torch at build time: install torch, then build without isolation")
        print("rotkern: torch is not importable at build time; skipping the optional extension", file=sys.stderr)
        return [], {}
    return [_build_ext.extension("csrc", cuda=want_cuda)], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extension()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})

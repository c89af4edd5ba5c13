"""``python -m rotkern.build_ext``: build the optional compiled extension ``rotkern._C`` for this install.

The extension (``torch.ops.rotkern.rotated_adamw_unit_``, its sources in csrc/) runs the CPU step of
``FusedRotatedAdamW`` at the GEMM floor; without it, CPU tensors take the eager reference (the same result,
about 2.5x slower in the global scope). ``pip install`` builds a pure-Python wheel unless asked for the
extension, so this command builds it afterwards, next to the installed package, against the torch installed
there. It works for a source checkout (``make ext`` runs the same build) and for a wheel install (the wheel
ships the sources as ``rotkern/_csrc``). It needs a C++ compiler with OpenMP (g++ or clang); ``--cuda`` also
builds the CUDA path with nvcc (CUDA_HOME). MAX_JOBS, NVCC_THREADS and TORCH_CUDA_ARCH_LIST are honoured by
torch's build helpers. setup.py builds the same extension from this module's :func:`extension`.

This module imports nothing from rotkern: setup.py loads it by path, before rotkern is installed.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def source_dir() -> Path | None:
    """The folder holding the extension's sources: the checkout's csrc/ or the wheel's rotkern/_csrc/."""
    for folder in (PACKAGE.parent / "csrc", PACKAGE / "_csrc"):
        if glob.glob(str(folder / "*.cpp")):
            return folder
    return None


def extension(sources: Path | str = "csrc", *, cuda: bool = False):
    """The ``rotkern._C`` extension (a torch CppExtension, or CUDAExtension with ``cuda``) from ``sources``."""
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpp = sorted(glob.glob(os.path.join(str(sources), "*.cpp")))
    cu = sorted(glob.glob(os.path.join(str(sources), "*.cu"))) if cuda else []
    # OpenMP: at::parallel_for's header implementation only runs in parallel when compiled with it.
    cxx = ["-O3", "-fopenmp"]
    if cu:
        nvcc = ["-O3", f"--threads={os.environ.get('NVCC_THREADS', '4')}"]
        return CUDAExtension(
            "rotkern._C",
            cpp + cu,
            define_macros=[("ROTKERN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension("rotkern._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


def compiler() -> str | None:
    """The C++ compiler torch's build helpers would call (``$CXX``, else c++ / g++ / clang++), or None."""
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def built_path() -> Path:
    """Where the built extension lives: ``rotkern/_C<EXT_SUFFIX>`` in the package folder."""
    import sysconfig

    return PACKAGE / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"


def up_to_date(src: Path) -> bool:
    """True when the built extension is newer than every source file (and than this build script)."""
    out = built_path()
    if not out.exists():
        return False
    inputs = [p for p in src.iterdir() if p.suffix in (".cpp", ".h", ".inc", ".cu", ".cuh")] + [Path(__file__)]
    return out.stat().st_mtime >= max(p.stat().st_mtime for p in inputs)


def build(*, cuda: bool = False, quiet: bool = True, force: bool = False) -> tuple[Path, bool]:
    """Compile ``rotkern._C`` into the installed package folder, unless it is up to date (or ``force``).

    Returns:
        (the built file, whether it was compiled now).

    Raises:
        RuntimeError: no sources, no compiler, an unwritable package folder, or a failed compile (with its log).
    """
    src = source_dir()
    if src is None:
        raise RuntimeError(f"no extension sources next to {PACKAGE} (csrc/ or rotkern/_csrc/); reinstall rotkern")
    if not force and not cuda and up_to_date(src):
        return built_path(), False
    if compiler() is None:
        raise RuntimeError("no C++ compiler found (c++, g++ or clang++): install one, e.g. apt install g++")
    if not os.access(PACKAGE, os.W_OK):
        raise RuntimeError(f"{PACKAGE} is not writable: run this with the permissions that installed rotkern")
    from setuptools import Distribution
    from torch.utils.cpp_extension import BuildExtension

    with tempfile.TemporaryDirectory(prefix="rotkern-build-") as tmp:
        dist = Distribution({"name": "rotkern", "ext_modules": [extension(src, cuda=cuda)]})
        dist.cmdclass["build_ext"] = BuildExtension
        cmd = dist.get_command_obj("build_ext")
        cmd.build_lib, cmd.build_temp = str(PACKAGE.parent), tmp  # the .so lands in PACKAGE, as --inplace
        log_path = Path(tmp) / "build.log"
        try:
            if quiet:  # the compiler's lines go to a log, shown only when the build fails
                with open(log_path, "w") as log_file:
                    out, err = os.dup(1), os.dup(2)
                    os.dup2(log_file.fileno(), 1)
                    os.dup2(log_file.fileno(), 2)
                    try:
                        dist.run_command("build_ext")
                    finally:
                        os.dup2(out, 1)
                        os.dup2(err, 2)
            else:
                dist.run_command("build_ext")
        except (Exception, SystemExit) as e:
            tail = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
            raise RuntimeError(f"building rotkern._C failed ({e}):\n{tail}") from None
        built = cmd.get_ext_fullpath("rotkern._C")
    return Path(built), True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rotkern.build_ext", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="also build the CUDA path (needs nvcc and CUDA_HOME)")
    parser.add_argument("--verbose", action="store_true", help="show the compiler's output")
    parser.add_argument("--force", action="store_true", help="rebuild even when the built file is up to date")
    args = parser.parse_args(argv)
    try:
        if args.force or args.cuda or not up_to_date(source_dir() or PACKAGE):
            print("rotkern: building the compiled extension rotkern._C (a minute or more) ...", flush=True)
        path, fresh = build(cuda=args.cuda, quiet=not args.verbose, force=args.force)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    what = "built" if fresh else "up to date:"
    print(f"rotkern: {what} {path}; FusedRotatedAdamW runs it for CPU tensors (backend 'auto' or 'ext')")
    return 0

if __name__ == "__main__":
    sys.exit(main())

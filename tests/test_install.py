"""A pip user's path to the compiled extension: the wheel ships its sources and ``python -m rotkern.build_ext``
builds it into the installed package; without it, the one message names that command."""

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from rotkern import _backend, build_ext

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """rotkern's wheel, built from this checkout as ``pip install .`` would (no extension asked for)."""
    out = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if k not in ("ROTKERN_BUILD_EXT", "CUDA_HOME")}
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
        check=True, env=env, capture_output=True, cwd=out,
    )  # fmt: skip
    (found,) = out.glob("rotkern-*.whl")
    return found


def test_the_wheel_ships_the_extension_sources_and_the_build_command(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = {f"rotkern/_csrc/{p.name}" for p in (ROOT / "csrc").iterdir() if p.suffix in (".cpp", ".h", ".inc")}
    assert sources and sources <= names, sources - names
    assert "rotkern/build_ext.py" in names
    assert not any(n.startswith("rotkern/_C") for n in names)  # pure Python unless the extension is asked for


def test_the_missing_extension_names_the_build_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rotkern._C" else real(name, *a))
    assert "python -m rotkern.build_ext" in _backend._ext_probe()


def test_build_ext_without_a_compiler_is_one_error_line(monkeypatch, capsys):
    monkeypatch.setattr(build_ext, "compiler", lambda: None)
    monkeypatch.setattr(build_ext, "up_to_date", lambda src: False)
    assert build_ext.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no C++ compiler") and "g++" in err[0], err


@pytest.mark.ext
@pytest.mark.slow
def test_build_ext_after_a_wheel_install_gives_the_compiled_step(wheel, tmp_path):
    """pip install (pure Python) -> python -m rotkern.build_ext -> FusedRotatedAdamW runs backend 'ext'."""
    if build_ext.compiler() is None:
        pytest.skip("no C++ compiler")
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = [sys.executable, "-m", "rotkern.build_ext"]
    first = subprocess.run(run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr
    assert "rotkern: built" in first.stdout and len(first.stdout.splitlines()) == 2, first.stdout  # compiler quiet
    again = subprocess.run(run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert "up to date" in again.stdout
    step = (
        f"import torch, rotkern; assert rotkern.__file__.startswith({str(target)!r}), rotkern.__file__\n"
        "p = torch.nn.Parameter(torch.randn(5, 7)); p.grad = torch.randn(5, 7)\n"
        "o = rotkern.FusedRotatedAdamW([p], rotation='global', backend='ext'); o.step(); print(o.backend_used)\n"
    )
    used = subprocess.run([sys.executable, "-c", step], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert used.returncode == 0 and used.stdout.strip() == "ext", used.stderr

"""Shared by the trainers: the error class the CLI reports in one line, dataclass configs with presets and
``--key=value`` overrides, the log header (versions, device, git sha, config), atomic checkpoint writes."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import inspect
import io
import json
import math
import os
import platform
import re
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import Any

import torch


class TrainerError(Exception):
    """A user-facing problem (bad path, bad data, mismatched checkpoint): the CLI prints ``error: ...``, exits 2."""


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _parse_bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {s!r}")


def field_types(cfg_cls) -> dict[str, type]:
    return {f.name: f.type if isinstance(f.type, type) else _TYPES[f.type] for f in dataclasses.fields(cfg_cls)}


def add_config_args(parser: argparse.ArgumentParser, cfg_cls, *, suppress: bool = False) -> None:
    """One ``--name`` option per dataclass field, typed like the field (nanoGPT's configurator, with argparse).

    Each option's help is the field's comment in the config's source (the ``# ...`` after it, or the comment
    lines right above it), then its default: the dataclass is the one place an option is described.
    With ``suppress``, options left out do not appear in the namespace, so presets can fill them. Fields named
    in the class's ``HIDDEN_OPTIONS`` (inherited settings the command sets itself or does not use) are left out
    of ``--help``; given anyway, :func:`config_from_args` refuses them with a message saying so.
    """
    comments = field_comments(cfg_cls)
    hidden = getattr(cfg_cls, "HIDDEN_OPTIONS", frozenset())
    for f in dataclasses.fields(cfg_cls):
        if f.name in hidden:
            parser.add_argument(f"--{f.name}", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
            continue
        kind = field_types(cfg_cls)[f.name]
        default = argparse.SUPPRESS if suppress else f.default
        text = comments.get(f.name, "")
        flag = {"nargs": "?", "const": True} if kind is bool else {}  # a bare --fsdp means --fsdp=true
        parser.add_argument(
            f"--{f.name}",
            type=_parse_bool if kind is bool else kind,
            default=default,
            **flag,
            metavar=kind.__name__.upper(),
            help=f"{text} (default {f.default!r})" if text else f"default {f.default!r}",
        )


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric option accepts: ``lo <= x`` (``lo < x`` with ``open_lo``) and ``x <= hi`` (``x < hi``
    with ``open_hi``); ``None`` leaves that side unbounded. Floats must also be finite. A config class lists its
    options' ranges in ``RANGES``; :func:`check_ranges` refuses a value outside with the option's name."""

    lo: float | None = None
    hi: float | None = None
    open_lo: bool = False
    open_hi: bool = False

    def holds(self, x: float) -> bool:
        # Written as the conditions that must hold, so that NaN (all comparisons false) fails them.
        if isinstance(x, float) and not math.isfinite(x):
            return False
        low = self.lo is None or (x > self.lo if self.open_lo else x >= self.lo)
        high = self.hi is None or (x < self.hi if self.open_hi else x <= self.hi)
        return low and high

    def text(self) -> str:
        lo, hi = (None if b is None else f"{b:g}" if isinstance(b, float) else str(b) for b in (self.lo, self.hi))
        if lo is not None and hi is not None:
            return f"in {'(' if self.open_lo else '['}{lo}, {hi}{')' if self.open_hi else ']'}"
        if lo is not None:
            return f"{'>' if self.open_lo else '>='} {lo}"
        return f"{'<' if self.open_hi else '<='} {hi}" if hi is not None else "finite"


def check_ranges(cfg) -> None:
    """TrainerError naming the first option of ``cfg`` outside its class's ``RANGES``: the value, the range and
    the option's default as the fix (one line, as the CLI prints it)."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for name, allowed in getattr(cfg, "RANGES", {}).items():
        value = getattr(cfg, name)
        if not allowed.holds(value):
            raise TrainerError(
                f"--{name}={value!r} is out of range: it must be {allowed.text()} "
                f"(e.g. --{name}={defaults[name]!r}, the default)"
            )


@functools.cache
def field_comments(cfg_cls) -> dict[str, str]:
    """Field name -> its comment in the source of the dataclass (and of its dataclass bases), '%' escaped for
    argparse. A field's own class wins over a base's."""
    out: dict[str, str] = {}
    for klass in reversed(cfg_cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # no source (frozen apps): options keep their defaults only
            continue
        comments: dict[int, str] = {}
        code_lines: set[int] = set()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
                code_lines.add(tok.start[0])
        names = {f.name for f in dataclasses.fields(klass)}
        for no, line in enumerate(source.splitlines(), start=1):
            m = re.match(r"\s+(\w+)\s*:", line)
            if not m or m.group(1) not in names or no not in code_lines:
                continue
            text = comments.get(no, "")
            if not text:  # comment lines right above the field
                above, k = [], no - 1
                while k in comments and k not in code_lines and not comments[k].startswith("---"):  # a section
                    above.insert(0, comments[k])
                    k -= 1
                text = " ".join(above)
            if text:
                out[m.group(1)] = text.replace("%", "%%")
    return out


def config_from_args(cfg_cls, args: argparse.Namespace, presets: dict[str, dict] | None = None):
    """Dataclass defaults, then the ``preset`` named on the command line (if any), then explicit options."""
    hidden = sorted(k for k in getattr(cfg_cls, "HIDDEN_OPTIONS", ()) if hasattr(args, k))
    if hidden:
        names = ", ".join(f"--{k}" for k in hidden)
        raise TrainerError(
            f"{names}: this command sets {'it' if len(hidden) == 1 else 'them'} itself or does not use "
            f"{'it' if len(hidden) == 1 else 'them'}; such options belong to train (see --help for this command's)"
        )
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cfg_cls) if hasattr(args, f.name)}
    values: dict[str, Any] = {}
    preset = given.get("preset", "")
    if preset:
        if presets is None or preset not in presets:
            raise TrainerError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(presets or {}))}")
        values.update(presets[preset])
    values.update(given)
    cfg = cfg_cls(**values)
    check_ranges(cfg)
    return cfg


# -- log header ----------------------------------------------------------------------------------------


def git_sha() -> str | None:
    """HEAD of the repository holding this package (with ``-dirty`` for local changes), or None."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def code_hash() -> str:
    """sha256 of rotkern's own .py sources (identifies the code when git is not available)."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import numpy

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": numpy.__version__,
        "cuda": torch.version.cuda,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    )


def header(cfg, device: torch.device, **extra) -> dict:
    from .. import __version__

    return {
        "type": "header",
        "rotkern": __version__,
        "versions": versions(),
        "device": device_name(device),
        "git_sha": git_sha(),
        "code_hash": code_hash(),
        "argv": sys.argv,
        **extra,
        "config": dataclasses.asdict(cfg),
    }


class JsonlLog:
    """Append-only JSONL log; refuses to touch an existing log unless ``append`` (a resumed run)."""

    def __init__(self, path: str | os.PathLike | None, *, append: bool = False) -> None:
        self.path = Path(path) if path else None
        if self.path is None:
            self._f = None
            return
        if self.path.exists() and not append:
            raise TrainerError(
                f"{self.path} already exists; pass --resume=CHECKPOINT to continue it or pick another out_dir"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record, default=str) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def ema(values: list[float], decay: float) -> list[float]:
    """Bias-corrected exponential moving average: s_t = decay s_(t-1) + (1 - decay) x_t, divided by 1 - decay^t."""
    out, s = [], 0.0
    for t, x in enumerate(values, 1):
        s = decay * s + (1 - decay) * x
        out.append(s / (1 - decay**t))
    return out

"""Helpers shared by the benchmark scripts (bench_step.py, bench_cpu_step.py, bench_bases.py): one version each.

Where the scripts' copies had diverged, a keyword parameter keeps each caller's behaviour (see the functions).
No benchmark script imports another; they import what they share from here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rotkern import RotatedAdamW, param_groups_for
from rotkern._backend import ext_available
from rotkern.trainers.common import device_name, git_sha, versions
from rotkern.trainers.models import GPT, GPTConfig, ResNet, ResNetConfig, SimpleViT, ViTConfig

ROOT = Path(__file__).resolve().parent.parent
HYPER = dict(lr=1e-6, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
BYTES_PER_PARAM = 28  # fp32 AdamW: read p, g, m, v; write p, m, v
MIN_QUIET = 3


# %% sizes --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Sizes:
    """Everything that differs between a GPU run and the CPU --dry-run."""

    block_size: int
    ceil_numel: int  # elements of the copy / gather / GEMM probes
    width: int  # synthetic matrices are (rows, width)
    synthetic_numel: int
    scale_numels: tuple[int, ...]  # scale-d
    scale_blocks: tuple[int, ...]  # scale-n, in the order they are measured (spread first, so a cut keeps a span)
    reps: int
    warmup: int
    scale_reps: int
    e2e_reps: int
    e2e_batch: tuple[int, int]  # (batch, sequence)
    gpt: GPTConfig
    vit: ViTConfig
    resnet: ResNetConfig
    compile_prior_s: float  # guessed cost of one torch.compile before any was measured


DRY = Sizes(
    block_size=32,
    ceil_numel=2**14,
    width=64,
    synthetic_numel=2**13,
    scale_numels=(2**10, 2**11, 2**12, 2**13),
    scale_blocks=(32, 8, 64, 16),
    reps=2,
    warmup=1,
    scale_reps=2,
    e2e_reps=2,
    e2e_batch=(2, 32),
    gpt=GPTConfig(block_size=32, vocab_size=64, n_layer=1, n_head=2, n_embd=32, attention="math"),
    vit=ViTConfig(image_size=8, patch_size=4, num_classes=10, dim=32, depth=1, heads=2, mlp_dim=64),
    resnet=ResNetConfig(block="basic", layers="1,1", width=8, num_classes=10, stem="small", image_size=8),
    compile_prior_s=30.0,
)


# %% budget -------------------------------------------------------------------------------------------
class Budget:
    """Seconds left of --budget-seconds, and the record of what was skipped to stay inside them."""

    def __init__(self, seconds: float, t0: float) -> None:
        self.seconds = seconds
        self.t0 = t0  # perf_counter() the budget counts from (the caller's, taken before torch was imported)
        self.skipped: list[dict] = []

    def used(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.used()

    def allow(self, phase: str, what: str, estimate_s: float) -> bool:
        if estimate_s <= self.left():
            return True
        self.skip(phase, what, f"budget: estimated {estimate_s:.0f} s, {max(self.left(), 0):.0f} s left")
        return False

    def skip(self, phase: str, what: str, reason: str) -> None:
        self.skipped.append({"phase": phase, "what": what, "reason": reason})
        print(f"  skipped {phase} {what}: {reason}")


# %% parameter sets -----------------------------------------------------------------------------------
@dataclasses.dataclass
class ParamSet:
    name: str
    params: list[torch.Tensor]
    rotated_groups: list[dict]  # param_groups_for style: names, roles, decay_mask
    torch_groups: list[dict]  # nanoGPT's decay / no-decay groups for torch.optim.AdamW
    model: nn.Module | None = None
    description: str = ""

    @property
    def d(self) -> int:
        return sum(p.numel() for p in self.params)

    def summary(self) -> dict:
        return {"name": self.name, "params": self.d, "tensors": len(self.params), "description": self.description}


def _torch_groups(params: list[torch.Tensor]) -> list[dict]:
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return [g for g in ({"params": decay}, {"params": rest, "weight_decay": 0.0}) if g["params"]]


def build_set(name: str, sizes: Sizes, device: torch.device, numel: int | None = None) -> ParamSet:
    """A parameter set on ``device``; ``synthetic`` takes ``numel`` (default sizes.synthetic_numel)."""
    if name == "synthetic":
        numel = numel or sizes.synthetic_numel
        w = sizes.width
        m = max(1, -(-numel // (w * w)))
        rows = max(1, numel // (m * w))
        params = [torch.randn(rows, w, device=device) * 0.02 for _ in range(m)]
        groups = [{"params": params, "names": [f"w{i}" for i in range(m)], "roles": ["matrix"] * m}]
        return ParamSet(name, params, groups, _torch_groups(params), None, f"{m} x {rows}x{w} matrices")
    cfg = {"gpt2": sizes.gpt, "vit": sizes.vit, "resnet": sizes.resnet}[name]
    with torch.device(device):
        model = {"gpt2": GPT, "vit": SimpleViT, "resnet": ResNet}[name](cfg)
    groups = param_groups_for(model, weight_decay=HYPER["weight_decay"])
    params = groups[0]["params"]
    desc = {
        "gpt2": "nanoGPT GPT-2 (tied wte/lm_head, no biases), rotkern.trainers.models.GPT",
        "vit": "SimpleViT (fixed sin-cos position embedding: no parameter), rotkern.trainers.models.SimpleViT",
        "resnet": "ResNet v1.5 (conv kernels rotated as (out, in kh kw)), rotkern.trainers.models.ResNet",
    }[name]
    return ParamSet(name, params, groups, _torch_groups(params), model, f"{desc}: {cfg}")


class Grads:
    """K gradient buffers; feed() points every param's .grad at the next one (outside the timed region)."""

    def __init__(self, params: list[torch.Tensor], k: int | None = None) -> None:
        d = sum(p.numel() for p in params)
        if k is None:
            k = 1 if 4 * d > 2**31 else max(2, min(16, math.ceil(2**28 / max(4 * d, 1))))
        self.params = params
        self.bufs = [[torch.randn_like(p) for p in params] for _ in range(k)]
        self.i = 0

    def feed(self) -> None:
        buf = self.bufs[self.i % len(self.bufs)]
        self.i += 1
        for p, g in zip(self.params, buf, strict=True):
            p.grad = g

    def release(self) -> None:
        for p in self.params:
            p.grad = None
        self.bufs = []


def rotation_work(opt: RotatedAdamW) -> tuple[float, dict[int, int]]:
    """(FLOPs of both rotations, {permutation length: coordinates behind such permutations}) of one step."""
    flops, permuted = 0.0, {}
    for gi in range(len(opt.param_groups)):
        for u in opt.units(gi):
            if u.rotation is None:
                continue
            k, length = u.shape
            rot = u.rotation
            blocks = [rot.block_size] * rot.num_blocks + ([rot.residual] if rot.residual else [])
            flops += k * sum(4.0 * nb * nb for nb in blocks)
            if rot.perm_stream is not None:
                permuted[length] = permuted.get(length, 0) + k * length
    return flops, permuted


# %% load ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Snapshot:
    t: float  # perf_counter seconds
    busy: int  # all CPUs' non-idle jiffies (steal excluded)
    steal: int
    own: int  # this process's user + system jiffies (all threads)
    load1: float


class LoadMeter:
    """Other processes' CPU use around a round, from /proc (Linux); elsewhere it reads zeros and says so."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = Path("/proc/stat").exists() and Path("/proc/self/stat").exists()

    def snapshot(self) -> Snapshot:
        load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        if not self.available:
            return Snapshot(time.perf_counter(), 0, 0, 0, load1)
        with open("/proc/stat") as f:
            cpu = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal guest guest_nice (guest time is already in user)
        idle = cpu[3] + cpu[4]
        steal = cpu[7] if len(cpu) > 7 else 0
        busy = sum(cpu[:8]) - idle - steal
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        own = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
        return Snapshot(time.perf_counter(), busy, steal, own, load1)

    def cores(self, a: Snapshot, b: Snapshot) -> tuple[float, float]:
        """(cores other processes used, cores stolen by the hypervisor) on average between two snapshots."""
        dt = max(b.t - a.t, 1e-9) * self.hz
        return max(0.0, (b.busy - a.busy) - (b.own - a.own)) / dt, max(0, b.steal - a.steal) / dt

    def windows(self, snaps: list[Snapshot], span: float = 1.0) -> list[tuple[float, float, float]]:
        """(seconds, foreign cores, steal cores) over consecutive windows of at least ``span`` seconds."""
        bounds = [0]
        for i in range(1, len(snaps)):
            if snaps[i].t - snaps[bounds[-1]].t >= span:
                bounds.append(i)
        if bounds[-1] != len(snaps) - 1:
            # A tail shorter than span joins the window before it (ticks are 10 ms: short windows are noise).
            if len(bounds) > 1:
                bounds[-1] = len(snaps) - 1
            else:
                bounds.append(len(snaps) - 1)
        return [
            (snaps[b].t - snaps[a].t, *self.cores(snaps[a], snaps[b])) for a, b in zip(bounds, bounds[1:], strict=False)
        ]

    def wait_quiet(self, max_foreign: float, max_load: float, max_wait: float) -> float:
        """Wait (up to max_wait s) for a 2-second window in which others use <= max_foreign cores and the load
        average is <= max_load; returns the seconds waited."""
        t0 = time.perf_counter()
        while True:
            a = self.snapshot()
            time.sleep(2.0)
            b = self.snapshot()
            foreign, steal = self.cores(a, b)
            if (foreign <= max_foreign and steal <= max_foreign and b.load1 <= max_load) or not self.available:
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > max_wait:
                return time.perf_counter() - t0


def _around(snaps: list[Snapshot], i: int, span: float) -> tuple[Snapshot, Snapshot]:
    """The snapshots around sample i (between snaps[i - 1] and snaps[i]), widened alternately to each side until
    they span at least ``span`` seconds (or the whole round)."""
    lo, hi = i - 1, i
    while snaps[hi].t - snaps[lo].t < span and (lo > 0 or hi < len(snaps) - 1):
        if lo > 0 and (hi == len(snaps) - 1 or snaps[lo].t - snaps[lo - 1].t <= snaps[hi + 1].t - snaps[hi].t):
            lo -= 1
        else:
            hi += 1
    return snaps[lo], snaps[hi]


# %% statistics, formatting ---------------------------------------------------------------------------
def _kept(c, xs: list[float], all_quiet_ok: bool = False) -> tuple[list[float], bool]:
    """The samples of candidate c (anything with a ``quiet`` list) that count: the quiet ones; all of them, flagged
    noisy, when fewer than MIN_QUIET.

    The copies diverged: bench_bases.py passes all_quiet_ok=True, which also keeps only the quiet samples (not
    flagged) when every sample is quiet, however few; bench_cpu_step.py keeps the default (False).
    """
    quiet = [x for x, q in zip(xs, c.quiet, strict=False) if q]
    ok = len(quiet) >= MIN_QUIET or (all_quiet_ok and len(quiet) == len(xs))
    return (quiet, False) if ok else (list(xs), True)


def _q(xs: list[float], f: float, empty_none: bool = False) -> float | None:
    """The f-quantile of xs (sorted, index int(f * n), clamped).

    The copies diverged: bench_bases.py passes empty_none=True (None for no samples); bench_step.py keeps the
    default, where no samples raise IndexError as before.
    """
    t = sorted(xs)
    if not t and empty_none:
        return None
    return t[min(len(t) - 1, int(f * len(t)))]


def _linear_fit(xs: list[float], ys: list[float]) -> dict | None:
    """Least squares y = a + b x; R^2 = 1 - SS_res / SS_tot."""
    if len(xs) < 2:
        return None
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    slope, icept = np.polyfit(x, y, 1)
    ss_res = float(((y - (icept + slope * x)) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1 - ss_res / ss_tot if ss_tot else 1.0
    return {"intercept": float(icept), "slope": float(slope), "r2": r2, "points": len(xs)}


def _ms(x: float | None, fine: bool = False) -> str:
    """Milliseconds for a table cell ("—" for None).

    The copies diverged: bench_bases.py passes fine=True (3 decimals below 0.1 ms); bench_cpu_step.py keeps the
    default (2 decimals below 10 ms).
    """
    if x is None:
        return "—"
    if fine:
        return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 0.1 else f"{x:.3f}"
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}" if x >= 10 else f"{x:.2f}"


def _one_line(e: BaseException, cut_message_only: bool = False) -> str:
    """The string "Type: first line of the message", at most 300 characters.

    The copies diverged: bench_bases.py passes cut_message_only=True (the message's first line is cut to 300
    characters, the type name added in full); bench_step.py keeps the default (the whole string is cut to 300).
    """
    msg = str(e).strip().splitlines()
    if cut_message_only:
        return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


# %% torch.compile ----------------------------------------------------------------------------------------
_DEFAULT_BACKEND = object()  # backend not given: torch.compile's own default (not backend=None)


def compiled_step(opt: RotatedAdamW, backend: object = _DEFAULT_BACKEND, no_grad: bool = False) -> Callable[[], object]:
    """torch.compile(opt.step) behind one eager first step, with Dynamo's logs quieted and its recompile limits
    raised (so that a row never falls back to eager silently).

    The copies diverged: bench_step.py passes its --compile-backend and no_grad=True (the compiled call runs under
    torch.no_grad()); bench_cpu_step.py keeps the defaults (torch.compile's default backend, no no_grad).
    """
    import logging

    import torch._dynamo

    torch._logging.set_logs(dynamo=logging.ERROR)  # graph breaks (the step's .item()) are expected / counted per row
    cfg = torch._dynamo.config
    for key in ("cache_size_limit", "recompile_limit"):
        if hasattr(cfg, key):
            setattr(cfg, key, 256)
    for key in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(cfg, key):
            setattr(cfg, key, 4096)
    fn = torch.compile(opt.step) if backend is _DEFAULT_BACKEND else torch.compile(opt.step, backend=backend)
    warm: list[bool] = []

    def step():
        if not warm:
            # One eager step first: permutations and Haar blocks are built lazily with numpy uint64 arithmetic,
            # which Dynamo cannot trace; afterwards they come from the rotations' caches.
            opt.step()
            warm.append(True)
        if no_grad:
            with torch.no_grad():
                return fn()
        return fn()

    return step


def write_json(path: Path, data: dict) -> None:
    """The results JSON as all three scripts write it: indent 1, str() for what JSON lacks, a final newline."""
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")


# %% environment --------------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    sha, source = git_sha(), "git"
    if sha is None:
        f = ROOT / ".gitsha"
        sha, source = (f.read_text().strip(), ".gitsha") if f.exists() else ("unknown", "none")
    return {
        "gpu": device_name(device) + (" (dry run)" if device.type != "cuda" else ""),
        **versions(),
        "git": sha,
        "git_source": source,
    }


def cpu_environment() -> dict:
    env = environment(torch.device("cpu"))
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = "n/a"
    if ext_available():
        from rotkern import _C

        isa = _C.simd_isa()
    return {"torch": env["torch"], "git": env["git"], "cpu": cpu, "cores": os.cpu_count(), "isa": isa}

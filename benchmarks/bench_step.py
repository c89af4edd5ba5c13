"""Optimizer step benchmark: every parameter set x scope x backend x precision against floors
measured in the same run, plus scaling, the end-to-end share of a GPT-2 iteration and a timing cross-check.

    python benchmarks/bench_step.py [--out benchmarks/results/latest] [--budget-seconds 540]
    python benchmarks/bench_step.py --dry-run                     # tiny shapes on the CPU (plumbing only)
    TRITON_INTERPRET=1 python benchmarks/bench_step.py --dry-run  # ... with the fused rows in the interpreter
    python benchmarks/report.py benchmarks/results/latest/bench_step.json   # -> README performance section

Parameter sets. Shapes and roles come from the models the trainers train (rotkern.trainers.models, built on the
device, annotated by rotkern.param_groups_for):
  gpt2       nanoGPT GPT-2 124M: tied wte 50304x768 and wpe 1024x768 (role embedding), 12 x {ln_1, c_attn
             2304x768 (role qkv), attn.c_proj 768x768, ln_2, c_fc 3072x768, mlp.c_proj 768x3072}, ln_f: 124,373,760
  vit        SimpleViT S/16: patch LayerNorm (768), patch_proj 384x768 (+bias), 12 x {LN, to_qkv 1152x384 (qkv),
             to_out 384x384, LN, fc1 1536x384, fc2 384x1536 (+biases)}, LN, head 1000x384: 22.0M. Its position
             embedding is SimpleViT's fixed 2-D sin-cos buffer, not a parameter.
  resnet     ResNet-50 v1.5: conv kernels (out, in, kh, kw) (rotated as (out, in kh kw)), BatchNorm weights and
             biases, fc 1000x2048: 25.6M
  synthetic  4 x 4096x4096 matrices (role matrix): 67.1M
In --dry-run each set is a tiny version of itself (a few thousand parameters) and block size n is 32, not 768.

Rows, all stepping the same fp32 params (lr 1e-6) with the optimizer's own state:
  torch-fused | torch-foreach | torch-for-loop   torch.optim.AdamW, nanoGPT's decay / no-decay groups (the anchors)
  rotated-eager    RotatedAdamW (the eager reference); precision = fp32 matmul precision of its rotations:
                   ieee (torch.set_float32_matmul_precision("highest")) or tf32 ("high"); tf32x3 has no eager
                   counterpart (n/a)
  rotated-compile  torch.compile(RotatedAdamW.step), same precisions; "n/a" where it does not compile
  rotated-fused    FusedRotatedAdamW (Triton), tl.dot input precision ieee | tf32x3 | tf32
Scope none has no rotation, so one precision-free row per backend.

Timing. CUDA events around each step, the device synchronised before each one (so a host-bound step pays its
own launch time rather than hiding it behind the previous row's kernels); warm-up (the first call, which builds
plans and compiles kernels, is timed on the host as first_call_s); then rounds that step every row once in a
shuffled order (interleaved, so clock drift and neighbours hit all rows alike); median and p20/p80 over rounds.
Before every step the params' .grad point at the next of K gradient buffers (K = 2..16, at least 256 MB of
them; 1 past 512M params) so that L2 (50 MB on H100) does not hold a small case's gradients. "x torch fused"
divides by the torch-fused anchor timed in the same interleaved group.

Ceilings (measured first, same process, on 2^27 fp32 elements): device copy bandwidth (bytes read + written),
random gather rate (index_select through a random permutation of all of them; also through independent random
permutations of each 2^12, 2^16, 2^20, 2^24-long stretch, since a permutation inside a short row stays in cache)
and scatter rate (index_copy_), cuBLAS (b x n) @ (n x n) TFLOP/s in fp32 and TF32 at b n = 2^27 for every block
size n used. Floor of a row = max(stream, gemm, perm):
  stream = 28 bytes per param (read p, g, m, v; write p, m, v) / copy bandwidth
  gemm   = the rotations' FLOPs (4 nb^2 per block of nb: rotate and unrotate) / the GEMM rate at the row's
           precision and block size n (tf32x3 = three TF32 products: a third of the TF32 rate)
  perm   = 2 random passes (gather g, scatter p) over each permuted coordinate / the gather rate of the
           shortest measured span that holds its permutation
"of floor" = floor / median (1.0 = at the floor). Memory: persistent_mb = torch.cuda.memory_allocated growth
over an optimizer's first step (moments, permutations, plans); step_extra_mb = max_memory_allocated - allocated
over one later step (workspaces and temporaries).

Phases, in this order; each is skipped (and recorded as skipped) when its estimate exceeds what is left of
--budget-seconds, and results are written after every phase, so a run cut short still leaves its JSON:
  ceilings, table (per set: gpt2 first), crosscheck (a few gpt2 rows timed again with
  torch.utils.benchmark.Timer, a synchronised wall clock, and triton.testing.do_bench; ratio to the events
  median), e2e (GPT-2 124M iteration, batch 12 x 1024, bf16 autocast, math attention: share of the optimizer
  step, fused and eager vs torch fused AdamW), the rest of the tables, scale-d (synthetic 1M ... 1B params or
  to memory), scale-n (block size 16 ... 4096 on the 67M synthetic set), compile (torch.compile rows, last:
  compile time is the least predictable).
--keep-first-table: the first set's table (gpt2 by default) is never skipped for budget; instead precisions are
cut from the end of --precisions (each cut recorded as skipped) until its estimate fits what is left, the first
precision always kept. The estimate is per timed row (anchors and scope none always run; a precision adds an
eager and a fused row per rotated scope, tf32x3 a fused one): the last table's measured cost per row and
parameter, else the whole GPT-2 table's prior (150 s) shared out over its 25 rows.
Interrupts: SIGINT (Ctrl-C, timeout -s INT) during the timing rounds keeps the rounds completed (medians, p20/p80,
x torch fused from them); anywhere else (a first call, a compile) what exists is kept. Either way bench_step.json
(meta: interrupted, interrupted_at = {phase, stage, rounds_done}), .csv and .md are saved, the rows of the group
cut short are printed, and the exit status is 130.

Outputs in --out: bench_step.json (everything, tagged with GPU, versions and git sha), bench_step.csv (one line
per row), bench_step.md (benchmarks/report.py's rendering) and the PNG plots. Without CUDA and without --dry-run
the script says so and exits 0.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # the budget counts from here, before torch is imported

if __name__ == "__main__":  # Ctrl-C while torch imports: nothing to save yet, so exit quietly (no traceback)
    import signal as _signal

    def _quiet_exit(*_) -> None:
        print("bench_step: interrupted while starting; nothing saved")
        raise SystemExit(130)

    _signal.signal(_signal.SIGINT, _quiet_exit)

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import report  # noqa: E402
from _common import (  # noqa: E402
    BYTES_PER_PARAM,
    DRY,
    HYPER,
    Budget,
    Grads,
    ParamSet,
    Sizes,
    _linear_fit,
    _one_line,
    _q,
    build_set,
    compiled_step,
    environment,
    rotation_work,
    write_json,
)

from rotkern import SCOPES, FusedRotatedAdamW, RotatedAdamW  # noqa: E402
from rotkern._backend import interpret_mode, why_not_triton  # noqa: E402
from rotkern.trainers.models import GPTConfig, ResNetConfig, ViTConfig  # noqa: E402

SETS = ("gpt2", "vit", "resnet", "synthetic")
PHASES = ("ceilings", "table", "crosscheck", "e2e", "scale-d", "scale-n", "compile")
PRECISIONS = ("ieee", "tf32x3", "tf32")
ROTATED_SCOPES = tuple(s for s in SCOPES if s != "none")
ANCHORS = {"torch-fused": dict(fused=True), "torch-foreach": dict(foreach=True), "torch-for-loop": dict(foreach=False)}
BACKENDS = tuple(ANCHORS) + ("rotated-eager", "rotated-compile", "rotated-fused")
MATMUL_PRECISION = {"ieee": "highest", "tf32": "high"}  # torch.set_float32_matmul_precision of the eager rows
PERM_SPANS = (2**12, 2**16, 2**20, 2**24)  # permutation lengths whose gather rate is measured besides the whole
SCHEMA = 1


GPU = Sizes(
    block_size=768,
    ceil_numel=2**27,
    width=4096,
    synthetic_numel=2**26,
    scale_numels=tuple(2**k for k in range(20, 31, 2)),
    scale_blocks=(768, 128, 4096, 32, 2048, 512, 64, 1024, 256, 16),
    reps=20,
    warmup=3,
    scale_reps=10,
    e2e_reps=10,
    e2e_batch=(12, 1024),
    gpt=GPTConfig(attention="math"),
    vit=ViTConfig(),
    resnet=ResNetConfig(),
    compile_prior_s=90.0,
)


# %% clock ----------------------------------------------------------------------------------------------
class Clock:
    """CUDA events on the GPU, the host clock on the CPU (--dry-run)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else 1e3 * (b - a)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


# %% ceilings and floors ------------------------------------------------------------------------------
class Ceilings:
    """Copy bandwidth, random gather / scatter rate and cuBLAS GEMM rates, measured in this process."""

    def __init__(self, device: torch.device, numel: int, clock: Clock, reps: int = 10) -> None:
        self.device, self.numel, self.clock, self.reps = device, numel, clock, reps
        src = torch.randn(numel, device=device)
        dst = torch.empty_like(src)
        perm = torch.randperm(numel, device=device)
        t = _median_times(
            {
                "copy": lambda: dst.copy_(src),
                "gather": lambda: torch.index_select(src, 0, perm, out=dst),
                "scatter": lambda: dst.index_copy_(0, perm, src),
            },
            clock,
            reps,
        )
        self.copy_ms, self.gather_ms, self.scatter_ms = t["copy"], t["gather"], t["scatter"]
        self.copy_Bps = 2 * 4 * numel / (t["copy"] / 1e3)
        self.gather_eps = numel / (t["gather"] / 1e3)  # elements per second
        self.scatter_eps = numel / (t["scatter"] / 1e3)
        # Permutations local to a span (a row of 3072, a 2.4M weight) stay in cache: their gather rate is
        # measured too, with an independent random permutation inside each span-long stretch.
        self.span_eps = {numel: self.gather_eps}
        for span in (s for s in PERM_SPANS if s < numel):
            m = numel // span * span
            local = torch.argsort(torch.rand(m // span, span, device=device), dim=1)
            local = (local + torch.arange(0, m, span, device=device)[:, None]).reshape(-1)
            out = dst[:m]
            t = _median_times(
                {"g": lambda local=local, out=out: torch.index_select(src, 0, local, out=out)}, clock, reps
            )
            self.span_eps[span] = m / (t["g"] / 1e3)
            del local
        self.gemm: dict[int, dict[str, float]] = {}  # n -> {"fp32": FLOP/s, "tf32": FLOP/s}

    def gather_rate(self, length: int) -> float:
        """Elements per second of a gather through a random permutation of ``length`` elements."""
        return self.span_eps[min((s for s in self.span_eps if s >= length), default=self.numel)]

    def gemm_rate(self, n: int, precision: str) -> float:
        """FLOP/s of (b x n) @ (n x n) with b n = numel, at a row's precision (tf32x3: a third of TF32)."""
        if n not in self.gemm:
            b = max(1, self.numel // n)
            x = torch.randn(b, n, device=self.device)
            r = torch.randn(n, n, device=self.device)
            out = torch.empty(b, n, device=self.device)

            def mm(mode: str) -> Callable[[], object]:
                def run():
                    torch.set_float32_matmul_precision(mode)
                    torch.mm(x, r, out=out)

                return run

            t = _median_times({"fp32": mm("highest"), "tf32": mm("high")}, self.clock, self.reps)
            torch.set_float32_matmul_precision("highest")
            self.gemm[n] = {k: 2.0 * b * n * n / (v / 1e3) for k, v in t.items()}
        rates = self.gemm[n]
        return {"ieee": rates["fp32"], "tf32": rates["tf32"], "tf32x3": rates["tf32"] / 3}[precision]

    def floor(self, d: int, flops: float, permuted: dict[int, int], precision: str, n: int) -> dict:
        """permuted: {permutation length: coordinates behind permutations of that length}."""
        stream = 1e3 * BYTES_PER_PARAM * d / self.copy_Bps
        gemm = 1e3 * flops / self.gemm_rate(n, precision) if flops and precision in PRECISIONS else 0.0
        perm = sum(1e3 * 2 * count / self.gather_rate(length) for length, count in permuted.items())
        parts = {"stream": stream, "gemm": gemm, "perm": perm}
        bound = max(parts, key=parts.get)
        return {"floor_ms": parts[bound], "stream_ms": stream, "gemm_ms": gemm, "perm_ms": perm, "bound": bound}

    def record(self) -> dict:
        return {
            "probe_numel": self.numel,
            "copy_GBps": self.copy_Bps / 1e9,
            "copy_ms": self.copy_ms,
            "gather_Gelem_per_s": self.gather_eps / 1e9,
            "gather_ms": self.gather_ms,
            "scatter_Gelem_per_s": self.scatter_eps / 1e9,
            "scatter_ms": self.scatter_ms,
            "gather_Gelem_per_s_by_span": {str(k): v / 1e9 for k, v in sorted(self.span_eps.items())},
            "gemm_TFLOPs": {str(n): {k: v / 1e12 for k, v in r.items()} for n, r in sorted(self.gemm.items())},
        }


def _median_times(fns: dict[str, Callable], clock: Clock, reps: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    clock.sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            a = clock.mark()
            fn()
            b = clock.mark()
            clock.sync()
            times[k].append(clock.ms(a, b))
    return {k: statistics.median(v) for k, v in times.items()}


# %% rows ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Row:
    phase: str
    set: str
    backend: str
    scope: str
    precision: str  # ieee | tf32x3 | tf32 | "-" (anchors and scope none)
    d: int
    block_size: int | None = None
    fn: Callable[[], object] | None = None
    opt: object | None = None
    floor: dict | None = None
    status: str = "ok"  # ok | n/a | skipped | error
    reason: str = ""
    times: list[float] = dataclasses.field(default_factory=list)
    first_call_s: float | None = None
    persistent_mb: float | None = None
    step_extra_mb: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    vs_torch_fused: float | None = None

    @property
    def label(self) -> str:
        return f"{self.backend} {self.scope}" + (f" {self.precision}" if self.precision != "-" else "")

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    def fail(self, status: str, reason: str) -> None:
        self.status, self.reason = status, reason
        self.fn = self.opt = None
        self.times = []

    def record(self) -> dict:
        t = sorted(self.times)
        q = (lambda f: t[min(len(t) - 1, int(f * len(t)))]) if t else (lambda f: None)
        med = self.median
        floor = self.floor or {}
        return {
            "phase": self.phase,
            "set": self.set,
            "backend": self.backend,
            "scope": self.scope,
            "precision": self.precision,
            "block_size": self.block_size,
            "d": self.d,
            "status": self.status,
            "reason": self.reason,
            "median_ms": med,
            "p20_ms": q(0.2),
            "p80_ms": q(0.8),
            "reps": len(t),
            **{k: floor.get(k) for k in ("floor_ms", "stream_ms", "gemm_ms", "perm_ms", "bound")},
            "of_floor": floor["floor_ms"] / med if med and floor.get("floor_ms") else None,
            "vs_torch_fused": self.vs_torch_fused,
            "persistent_mb": self.persistent_mb,
            "step_extra_mb": self.step_extra_mb,
            "first_call_s": self.first_call_s,
            **self.extra,
        }


def _with_matmul_precision(fn: Callable, precision: str) -> Callable:
    mode = MATMUL_PRECISION.get(precision)
    if mode is None:
        return fn

    def step():
        torch.set_float32_matmul_precision(mode)
        return fn()

    return step


def _fused_step(opt: FusedRotatedAdamW, precision: str) -> Callable:
    precision = precision if precision in PRECISIONS else opt.precision  # scope none: no dot, any precision

    def step():
        opt.precision = precision  # one optimizer (one cached plan, one state) per scope serves every precision
        return opt.step()

    return step


class Bench:
    """One run: device, sizes, budget, ceilings and everything recorded so far."""

    def __init__(self, args: argparse.Namespace, device: torch.device, sizes: Sizes) -> None:
        self.args, self.device, self.sizes = args, device, sizes
        self.clock = Clock(device)
        self.budget = Budget(args.budget_seconds, _T0)
        self.out = Path(args.out)
        self.ceil: Ceilings | None = None
        self.rows: list[Row] = []
        self.sets: dict[str, dict] = {}
        self.crosscheck: list[dict] = []
        self.e2e: dict = {}
        self.scaling: dict = {}
        self.errors: list[dict] = []
        self.phase_s: dict[str, float] = {}
        self.calib: dict[str, float] = {}  # measured costs that estimate later phases
        self.env = environment(device)
        self.scopes = [s for s in args.scopes.split(",") if s]
        self.precisions = [p for p in args.precisions.split(",") if p]
        self.fused_reason = None if device.type == "cuda" else why_not_triton(torch.empty(0, device=device))
        self.compile_s: list[float] = []
        # Where the run is, for an interrupt (Ctrl-C, timeout -s INT) to say what it cut short.
        self.current: str | None = None  # label of the phase running
        self.stage: str | None = None  # first calls | warm-up | timing rounds, inside time_rows
        self.group: list[Row] = []  # the rows time_rows was last given (scale-d adds its rows to self.rows late)
        self.rounds_done = 0
        self.interrupt: dict | None = None
        self.kept: dict | None = None  # what --keep-first-table kept of the first set's table

    # -- rows of one parameter set ------------------------------------------------------------------
    def make_rows(
        self,
        ps: ParamSet,
        phase: str,
        backends: tuple[str, ...],
        scopes: list[str],
        precisions: list[str],
        block_size: int | None = None,
    ) -> list[Row]:
        n = block_size or self.args.block_size or self.sizes.block_size
        rows: list[Row] = []
        d = ps.d

        def row(backend, scope, precision, **kw) -> Row:
            r = Row(phase, ps.name, backend, scope, precision, d, None if backend in ANCHORS else n, **kw)
            rows.append(r)
            return r

        for name, kw in ANCHORS.items():
            if name in backends:
                opt = torch.optim.AdamW([dict(g) for g in ps.torch_groups], **HYPER, **kw)  # groups are mutated
                row(name, "none", "-", fn=opt.step, opt=opt, floor=self.ceil.floor(d, 0, {}, "-", n))
        for scope in scopes:
            precs = precisions if scope != "none" else ["-"]
            for backend in ("rotated-eager", "rotated-compile", "rotated-fused"):
                if backend not in backends:
                    continue
                if backend == "rotated-fused" and self.fused_reason:
                    for p in precs:
                        row(backend, scope, p, status="skipped", reason=f"Triton {self.fused_reason}")
                    continue
                cls = FusedRotatedAdamW if backend == "rotated-fused" else RotatedAdamW
                kw = dict(backend="triton") if backend == "rotated-fused" else {}
                groups = [dict(g) for g in ps.rotated_groups]
                opt = cls(groups, **HYPER, rotation=scope, block_size=n, seed=0, **kw)
                flops, permuted = rotation_work(opt)
                for p in precs:
                    floor = self.ceil.floor(d, flops, permuted, p, n)
                    if backend != "rotated-fused" and p == "tf32x3":
                        row(backend, scope, p, status="n/a", reason="PyTorch matmuls have no 3xTF32 mode")
                    elif backend == "rotated-fused":
                        row(backend, scope, p, fn=_fused_step(opt, p), opt=opt, floor=floor)
                    elif backend == "rotated-eager":
                        row(backend, scope, p, fn=_with_matmul_precision(opt.step, p), opt=opt, floor=floor)
                    else:
                        row(backend, scope, p, fn=_with_matmul_precision(self.compiled(opt), p), opt=opt, floor=floor)
        return rows

    def compiled(self, opt) -> Callable:
        return compiled_step(opt, backend=self.args.compile_backend, no_grad=True)

    def compile_estimate(self) -> float:
        return max(self.compile_s) * 1.5 if self.compile_s else self.sizes.compile_prior_s

    # -- timing -------------------------------------------------------------------------------------
    def first_calls(self, rows: list[Row], grads: Grads) -> None:
        """Each row's first step, alone: builds state, plans, permutations, compiles; memory it keeps."""
        seen: set[int] = set()
        for r in rows:
            if r.status != "ok":
                continue
            compiling = r.backend == "rotated-compile"
            # A torch.compile can take minutes and cannot be interrupted: start one only with time for it.
            if compiling and not self.budget.allow(r.phase, f"{r.set} {r.label}", self.compile_estimate()):
                r.fail("skipped", self.budget.skipped[-1]["reason"])
                continue
            graphs = _dynamo_counts() if compiling else None
            self.clock.sync()
            a0 = self._allocated()
            t0 = time.perf_counter()
            ok = self._call(r, grads)
            if compiling:
                self.compile_s.append(time.perf_counter() - t0)  # failed compiles cost time too
            if not ok:
                continue
            r.first_call_s = time.perf_counter() - t0
            if id(r.opt) not in seen and a0 is not None:
                r.persistent_mb = (self._allocated() - a0) / 2**20
            seen.add(id(r.opt))
            if compiling:
                after = _dynamo_counts()
                r.extra.update(graphs=after[0] - graphs[0], graph_breaks=after[1] - graphs[1])
        # Rows sharing an optimizer share its persistent memory.
        by_opt = {id(r.opt): r.persistent_mb for r in rows if r.persistent_mb is not None}
        for r in rows:
            if r.status == "ok" and r.persistent_mb is None:
                r.persistent_mb = by_opt.get(id(r.opt))

    def _call(self, r: Row, grads: Grads) -> bool:
        """One untimed step of a row (synchronised); a failure marks the row instead of ending the phase."""
        try:
            grads.feed()
            r.fn()
            self.clock.sync()
            return True
        except torch.cuda.OutOfMemoryError as e:
            r.fail("skipped", f"out of memory: {_one_line(e)[:120]}")
        except Exception as e:
            r.fail("n/a" if r.backend == "rotated-compile" else "error", _one_line(e))
        self.free()
        return False

    def time_rows(self, rows: list[Row], grads: Grads, reps: int, warmup: int, deadline: float) -> int:
        """First calls, warm-up, then interleaved rounds until reps or the deadline (at least 3 rounds).

        A KeyboardInterrupt during the rounds keeps the rounds completed so far (medians, vs_torch_fused) and
        is raised again for main() to save them; one during the first calls or the warm-up just propagates.
        """
        self.group, self.rounds_done = rows, 0
        self.stage = "first calls"
        self.first_calls(rows, grads)
        self.stage = "warm-up"
        for _ in range(max(warmup - 1, 0)):
            for r in rows:
                if r.status == "ok":
                    self._call(r, grads)
        for r in rows:
            if r.backend == "rotated-compile" and r.status == "ok":
                before = _dynamo_counts()[0]
                if self._call(r, grads) and _dynamo_counts()[0] > before:
                    r.fail("n/a", "recompiles every step (Dynamo guard failures)")
        active = [r for r in rows if r.status == "ok"]
        self.stage = "timing rounds"
        interrupted = False
        try:
            self._rounds(active, grads, reps, deadline)
        except KeyboardInterrupt:
            interrupted = True
        if not interrupted:  # the extra step it takes is not worth delaying an interrupted run's exit
            for r in active:
                r.step_extra_mb = self._step_extra(r, grads)
        torch.set_float32_matmul_precision("highest")
        anchor = next((r for r in rows if r.backend == "torch-fused" and r.times), None)
        for r in rows:
            if r.times and anchor is not None:
                r.vs_torch_fused = r.median / anchor.median
        if interrupted:
            raise KeyboardInterrupt
        self.stage = None
        return self.rounds_done

    def _rounds(self, active: list[Row], grads: Grads, reps: int, deadline: float) -> None:
        """Interleaved rounds; a row's times grow only by whole rounds, so an interrupt leaves complete ones."""
        rng = random.Random(0)
        for rep in range(reps):
            if rep >= 3 and time.perf_counter() > deadline:
                break
            order = active[:]
            rng.shuffle(order)
            marks = []
            for r in order:
                grads.feed()
                # An idle device at the start event: a host-bound step (many small launches) is charged its
                # own launch time instead of hiding it behind the previous row's queued kernels.
                self.clock.sync()
                a = self.clock.mark()
                r.fn()
                b = self.clock.mark()
                marks.append((r, a, b))
            self.clock.sync()
            times = [(r, self.clock.ms(a, b)) for r, a, b in marks]
            for r, t in times:
                r.times.append(t)
            self.rounds_done += 1

    def _step_extra(self, r: Row, grads: Grads) -> float | None:
        if self.device.type != "cuda":
            return None
        grads.feed()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        r.fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    def _allocated(self) -> int | None:
        return torch.cuda.memory_allocated() if self.device.type == "cuda" else None

    def free(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # -- phases and interrupts ----------------------------------------------------------------------
    def phase(self, name: str, fn: Callable, *a, what: str = "") -> object:
        """Run one phase; an exception is recorded (the run goes on), and the results are saved after it."""
        label = f"{name} {what}".strip()
        print(f"[{self.budget.used():6.1f} s] {label}")
        self.current = label
        t0 = time.perf_counter()
        try:
            out = fn(*a)
        except Exception as e:
            self.errors.append({"phase": label, "error": _one_line(e), "traceback": traceback.format_exc()[-2000:]})
            print(f"  {label} failed: {_one_line(e)}")
            self.free()
            self.stage = None  # a time_rows that raised is over
            out = None
        finally:
            self.phase_s[label] = round(time.perf_counter() - t0, 2)
            self.save()
        self.current = None  # left set when a KeyboardInterrupt passes: it names the phase cut short
        return out

    def interrupted(self) -> int:
        """After a KeyboardInterrupt: save what was measured, marked interrupted; print it; exit status 130."""
        self.interrupt = {"phase": self.current, "stage": self.stage, "rounds_done": self.rounds_done}
        known = {id(r) for r in self.rows}
        self.rows += [r for r in self.group if id(r) not in known]  # e.g. a scale-d point's rows, added late
        with _sigint_ignored():  # a second Ctrl-C must not leave a half-written JSON
            self.save()
        if self.stage is not None:  # the group cut short never reached its phase's own printout
            print(f"  {len(self.group)} rows of the interrupted group, {self.rounds_done} completed rounds:")
            _print_rows(self.group)
        where = self.current or "between phases"
        if self.stage:
            where += f", {self.stage}" + (f" ({self.rounds_done} completed)" if self.stage == "timing rounds" else "")
        print(f"bench_step: interrupted in {where}; saved {self.out}/bench_step.json, .csv, .md")
        return 130

    # -- results ------------------------------------------------------------------------------------
    def result(self, final: bool = False) -> dict:
        return {
            "schema": SCHEMA,
            "meta": {
                **self.env,
                "dry_run": self.args.dry_run,
                "interpret": interpret_mode(),
                "env_vars": {k: os.environ.get(k) for k in ("ROTKERN_BACKEND", "ROTKERN_TILE_CONFIG")},
                "argv": sys.argv[1:],
                "budget_s": self.args.budget_seconds,
                "wall_s": round(self.budget.used(), 1),
                "complete": final,
                "interrupted": self.interrupt is not None,
                "interrupted_at": self.interrupt,  # {phase, stage, rounds_done} or None
                "keep_first_table": self.kept,
                "phase_s": self.phase_s,
                "block_size": self.args.block_size or self.sizes.block_size,
                "reps": self.args.reps or self.sizes.reps,
                "hyper": {k: list(v) if isinstance(v, tuple) else v for k, v in HYPER.items()},
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
            "ceilings": self.ceil.record() if self.ceil else None,
            "sets": self.sets,
            "rows": [r.record() for r in self.rows],
            "crosscheck": self.crosscheck,
            "e2e": self.e2e,
            "scaling": self.scaling,
            "skipped": self.budget.skipped,
            "errors": self.errors,
        }

    def save(self, final: bool = False) -> dict:
        """JSON, CSV and markdown now (after every phase); the plots too when final."""
        data = self.result(final)
        self.out.mkdir(parents=True, exist_ok=True)
        data["plots"] = []
        if final:
            try:
                data["plots"] = report.plot(data, self.out)
            except Exception as e:  # matplotlib missing or broken: report.py --plots can draw them elsewhere
                self.errors.append({"phase": "plots", "error": _one_line(e)})
        try:
            (self.out / "bench_step.md").write_text(report.render(data, image_prefix=""))
        except Exception as e:  # the JSON is what counts; report.py can render it again later
            self.errors.append(
                {"phase": "markdown", "error": _one_line(e), "traceback": traceback.format_exc()[-2000:]}
            )
        data["errors"] = self.errors
        write_json(self.out / "bench_step.json", data)
        with open(self.out / "bench_step.csv", "w", newline="") as f:
            tags = {k: self.env[k] for k in ("gpu", "torch", "triton", "git")}
            recs = [{**rec, **tags} for rec in data["rows"]]
            w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for rec in recs for k in rec)))
            w.writeheader()
            for rec in recs:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in rec.items()})
        return data


class _sigint_ignored:
    """SIGINT ignored inside the block (main thread only: elsewhere signal.signal cannot be called)."""

    def __enter__(self) -> None:
        main = threading.current_thread() is threading.main_thread()
        self.previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _dynamo_counts() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


# %% phases -------------------------------------------------------------------------------------------
def phase_ceilings(b: Bench) -> None:
    b.ceil = Ceilings(b.device, b.sizes.ceil_numel, b.clock)
    b.ceil.gemm_rate(b.args.block_size or b.sizes.block_size, "ieee")
    c = b.ceil.record()
    print(
        f"  copy {c['copy_GBps']:.0f} GB/s | gather {c['gather_Gelem_per_s']:.2f} Gelem/s | scatter "
        f"{c['scatter_Gelem_per_s']:.2f} Gelem/s | GEMM {c['gemm_TFLOPs']}"
    )


def _table_prior(b: Bench) -> float:
    """Seconds per parameter of a whole table (every scope and precision) before any was measured."""
    return 150.0 / 124e6 if b.device.type == "cuda" else 30.0 / 2e4


def table_estimate(b: Bench, d: int) -> float:
    """Seconds a set's table will take: the measured cost per parameter of the last table, else a prior."""
    rate = b.calib.get("table_s_per_param")
    if rate is None:
        rate = _table_prior(b)
    return 5.0 + rate * d


def timed_rows(scopes: list[str], precisions: list[str], fused: bool = True, anchors: bool = True) -> int:
    """Rows of a table that step (n/a and skipped ones cost nothing): anchors, scope none, then per rotated
    scope an eager row per precision with a PyTorch mode (not tf32x3) and a fused one per precision."""
    n = len(ANCHORS) if anchors else 0
    for scope in scopes:
        if scope == "none":
            n += 1 + fused
        else:
            n += sum((p in MATMUL_PRECISION) + fused for p in precisions)
    return n


def row_estimate(b: Bench, d: int) -> float:
    """Seconds one timed row of a d-parameter table costs: measured on the last table, else the prior of a
    whole table shared out over its rows (GPT-2 124M: 150 s over 25 rows)."""
    rate = b.calib.get("table_s_per_row_param")
    if rate is None:
        rate = _table_prior(b) / timed_rows(list(SCOPES), list(PRECISIONS))
    return rate * d


def fit_precisions(b: Bench, name: str, d: int) -> list[str]:
    """--keep-first-table: the longest head of --precisions whose table fits what is left of the budget
    (precisions are cut from the end; the first one always stays). Each cut is recorded as a budget skip."""
    row, fused, left = row_estimate(b, d), b.fused_reason is None, b.budget.left()
    rotated = [s for s in b.scopes if s != "none"]
    est = 5.0 + row * timed_rows(b.scopes, [], fused)  # anchors and scope none always run
    totals = []
    for p in b.precisions:
        est += row * timed_rows(rotated, [p], fused, anchors=False)
        totals.append(est)
    keep = max(1, sum(t <= left for t in totals)) if totals else 0  # totals grow: the ones that fit lead
    for p, t in zip(b.precisions[keep:], totals[keep:], strict=True):
        b.budget.skip(
            "table",
            f"{name} {p}",
            f"budget: estimated {t:.0f} s for the table up to {p}, {max(left, 0):.0f} s left "
            "(--keep-first-table cuts precisions from the end)",
        )
    kept = b.precisions[:keep]
    est = totals[keep - 1] if keep else est
    b.kept = {"set": name, "precisions": kept, "estimate_s": round(est, 1), "left_s": round(left, 1)}
    if est > left:  # the first precision alone does not fit: it runs anyway, as the flag promises
        what = f"{name} {' '.join(kept)}"
        print(f"  --keep-first-table: {what} runs over budget ({est:.0f} s estimated, {left:.0f} s left)")
    return kept


def run_table(b: Bench, ps: ParamSet, grads: Grads, precisions: list[str] | None = None) -> list[Row]:
    """Every backend x scope x precision on one set (compile rows come in their own phase)."""
    backends = tuple(x for x in BACKENDS if x != "rotated-compile")
    rows = b.make_rows(ps, "table", backends, b.scopes, b.precisions if precisions is None else precisions)
    b.rows += rows
    stepping = sum(r.status == "ok" for r in rows)
    t0 = time.perf_counter()
    deadline = t0 + max(30.0, b.budget.left() * 0.5)
    done = b.time_rows(rows, grads, b.args.reps or b.sizes.reps, b.sizes.warmup, deadline)
    b.calib["table_s_per_param"] = (time.perf_counter() - t0) / ps.d
    b.calib["table_s_per_row_param"] = (time.perf_counter() - t0) / (max(stepping, 1) * ps.d)
    print(f"  {ps.name}: {len(rows)} rows, {done} rounds, {time.perf_counter() - t0:.1f} s")
    _print_rows(rows)
    return rows


def _print_rows(rows: list[Row]) -> None:
    for r in rows:
        if r.times:
            print(f"    {r.label:34s} {r.median:9.3f} ms  x{r.vs_torch_fused or float('nan'):6.2f} torch fused")
        elif r.status != "ok":
            print(f"    {r.label:34s} {r.status}: {r.reason}")


def run_crosscheck(b: Bench, rows: list[Row], grads: Grads) -> None:
    """Time a few rows again with a second and third method; record the ratio to the events median."""
    import torch.utils.benchmark as tb

    wanted = [
        ("torch-fused", "none", "-"),
        ("rotated-fused", "output", "tf32x3"),
        ("rotated-fused", "global", "tf32x3"),
        ("rotated-eager", "layer", "ieee"),
    ]
    picks = [r for key in wanted for r in rows if (r.backend, r.scope, r.precision) == key and r.times]
    do_bench = None
    if b.device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            pass
    for r in picks:

        def call(r=r):
            grads.feed()
            r.fn()

        min_s = 0.05 if b.args.dry_run else 0.5
        m = tb.Timer(stmt="call()", globals={"call": call}).blocked_autorange(min_run_time=min_s)
        rec = {"set": r.set, "row": r.label, "events_ms": r.median, "timer_ms": m.median * 1e3}
        rec["timer_ratio"] = rec["timer_ms"] / r.median
        if do_bench is not None:
            rec["do_bench_ms"] = float(do_bench(call, warmup=25, rep=200, return_mode="median"))
            rec["do_bench_ratio"] = rec["do_bench_ms"] / r.median
        rec["ok"] = all(abs(v - 1) <= 0.10 for k, v in rec.items() if k.endswith("_ratio"))
        b.crosscheck.append(rec)
        torch.set_float32_matmul_precision("highest")
        print(f"    {r.label:34s} events {r.median:.3f} ms | Timer x{rec['timer_ratio']:.3f}", end="")
        print(f" | do_bench x{rec['do_bench_ratio']:.3f}" if "do_bench_ratio" in rec else "")


def run_e2e(b: Bench, ps: ParamSet, rows: list[Row]) -> None:
    """GPT-2 training iterations (fwd + bwd in bf16 autocast, then the step), optimizers interleaved."""
    model = ps.model
    batch, seq = b.sizes.e2e_batch
    vocab = model.config.vocab_size
    gen = torch.Generator(device=b.device).manual_seed(0)
    x = torch.randint(0, vocab, (batch, seq), device=b.device, generator=gen)
    y = torch.randint(0, vocab, (batch, seq), device=b.device, generator=gen)
    want = {("torch-fused", "-")} | {("rotated-fused", p) for p in ("tf32x3", "tf32")}
    want |= {("rotated-eager", "ieee")}
    entries = [r for r in rows if (r.backend, r.precision) in want and r.fn is not None and r.status == "ok"]
    entries = [r for r in entries if r.backend == "torch-fused" or r.scope in ROTATED_SCOPES]
    model.train()

    def iteration(r: Row):
        model.zero_grad(set_to_none=True)
        torch.set_float32_matmul_precision("highest")  # whatever the previous row's step set
        e0 = b.clock.mark()
        with torch.autocast(b.device.type, dtype=torch.bfloat16):
            loss = model(x, y)[1]
        loss.backward()
        e1 = b.clock.mark()
        r.fn()
        e2 = b.clock.mark()
        return e0, e1, e2

    for r in entries:  # warm-up: the first call of a row may still build plans or compile
        for _ in range(1 if b.args.dry_run else 2):
            iteration(r)
    b.clock.sync()
    times = {id(r): ([], []) for r in entries}
    rng = random.Random(1)
    deadline = time.perf_counter() + max(20.0, b.budget.left() * 0.3)
    reps = b.args.reps or b.sizes.e2e_reps
    for rep in range(reps):
        if rep >= 3 and time.perf_counter() > deadline:
            break
        order = entries[:]
        rng.shuffle(order)
        marks = [(r, iteration(r)) for r in order]
        b.clock.sync()
        for r, (e0, e1, e2) in marks:
            times[id(r)][0].append(b.clock.ms(e0, e1))
            times[id(r)][1].append(b.clock.ms(e1, e2))
    torch.set_float32_matmul_precision("highest")
    model.zero_grad(set_to_none=True)
    med = statistics.median
    out = []
    for r in entries:
        fb, st = times[id(r)]
        it = [a + c for a, c in zip(fb, st, strict=True)]
        out.append(
            dict(backend=r.backend, scope=r.scope, precision=r.precision, fwd_bwd_ms=med(fb), step_ms=med(st),
                 iter_ms=med(it), iter_p20_ms=_q(it, 0.2), iter_p80_ms=_q(it, 0.8), reps=len(it))
        )  # fmt: skip
    base = next((e for e in out if e["backend"] == "torch-fused"), None)
    for e in out:
        e["step_share"] = e["step_ms"] / e["iter_ms"]
        if base:
            # What replacing AdamW's step costs the iteration: step difference over AdamW's iteration (the
            # fwd + bwd noise cancels); the ratio of iteration medians is given too.
            e["adds_vs_adamw"] = (e["step_ms"] - base["step_ms"]) / base["iter_ms"]
            e["iter_vs_adamw"] = e["iter_ms"] / base["iter_ms"] - 1
    accept = []
    for e in out:
        if e["backend"] == "rotated-fused" and e["scope"] in ("output", "layer") and "adds_vs_adamw" in e:
            ok = e["adds_vs_adamw"] <= 0.05
            accept.append({k: e[k] for k in ("scope", "precision", "adds_vs_adamw")} | {"ok": ok})
    b.e2e = {
        "model": "gpt2",
        "config": str(model.config),
        "batch": batch,
        "seq": seq,
        "autocast": "bf16",
        "attention": model.config.attention,
        "rows": out,
        "acceptance": {"rule": "fused step adds <= 5% to the iteration (output, layer)", "rows": accept},
    }
    for e in out:
        print(
            f"    {e['backend']:14s} {e['scope']:7s} {e['precision']:6s} iter {e['iter_ms']:8.2f} ms  step "
            f"{e['step_ms']:7.2f} ms  share {100 * e['step_share']:5.1f}%  adds "
            f"{100 * e.get('adds_vs_adamw', float('nan')):5.1f}%"
        )


def _fits(rows: list[Row], key: str) -> dict:
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.times:
            series.setdefault(r.label, []).append((getattr(r, key), r.median))
    return {name: _linear_fit(*zip(*sorted(pts), strict=True)) for name, pts in series.items()}


def _row_bytes(r: Row) -> float:
    """Bytes per parameter a row keeps (state, permutations) plus its transient peak, for packing by memory."""
    if r.backend in ANCHORS:
        return 8
    perm = r.scope in ("global", "layer")
    if r.backend == "rotated-fused":
        return 8 + 4 * perm + 4 + 24 * perm  # moments, int32 pi, workspace, sorting pi on the device
    return 8 + 16 * perm + 24  # moments, int64 pi and pi^-1, temporaries


def run_scale_d(b: Bench) -> None:
    """Step time vs parameter count on synthetic sets: torch fused, each fused scope, eager global."""
    scopes = [s for s in b.scopes if s in ROTATED_SCOPES]
    rows_all: list[Row] = []
    prev: tuple[int, float] | None = None
    for numel in b.sizes.scale_numels:
        if numel > b.args.max_params:
            b.budget.skip("scale-d", f"{numel:,} params", f"--max-params {b.args.max_params:,}")
            continue
        est = 10.0 if prev is None else prev[1] * numel / prev[0] + 5
        if not b.budget.allow("scale-d", f"{numel:,} params", est):
            continue
        t0 = time.perf_counter()
        try:
            rows = _scale_point(b, numel, scopes)
        except torch.cuda.OutOfMemoryError as e:
            b.budget.skip("scale-d", f"{numel:,} params", f"out of memory: {_one_line(e)}")
            b.free()
            break
        rows_all += rows
        prev = (numel, time.perf_counter() - t0)
        print(f"  {numel:>13,} params: {prev[1]:.1f} s")
        b.free()
    b.scaling["params"] = {"fits_ms_vs_params": _fits(rows_all, "d")}


def _scale_point(b: Bench, numel: int, scopes: list[str]) -> list[Row]:
    ps = build_set("synthetic", b.sizes, b.device, numel)
    ps.name = f"synthetic-{numel}"
    grads = Grads(ps.params, 1 if numel >= 2**28 else None)
    precision = "tf32x3" if "tf32x3" in b.precisions else b.precisions[0]
    spec = [("torch-fused", "none", "-")] + [("rotated-fused", s, precision) for s in scopes]
    spec += [("rotated-eager", "global", "ieee")] if "global" in scopes else []
    free = torch.cuda.mem_get_info()[0] if b.device.type == "cuda" else float("inf")
    base = ps.d * (4 + 4 * len(grads.bufs))
    fits = [s for s in spec if base + ps.d * (8 + _row_bytes(Row("", "", *s, 0))) < 0.85 * free]
    for s in spec:
        if s not in fits:
            b.budget.skip("scale-d", f"{numel:,} params {' '.join(s)}", "memory: does not fit beside the anchor")
    whole = base + ps.d * sum(_row_bytes(Row("", "", *s, 0)) for s in fits) < 0.85 * free
    # Everything in one interleaved group when it fits; else the anchor beside one row at a time.
    groups = [fits] if whole else [[fits[0], s] for s in fits[1:]]
    out: list[Row] = []
    for group in groups if fits else []:
        rows = [r for backend, scope, prec in group for r in b.make_rows(ps, "scale-d", (backend,), [scope], [prec])]
        b.time_rows(rows, grads, b.args.reps or b.sizes.scale_reps, 1, time.perf_counter() + 60)
        for r in rows:
            r.fn = r.opt = None
        out += rows
        b.free()
    b.rows += out
    grads.release()
    return out


def run_scale_n(b: Bench) -> None:
    """Step time vs block size n on the synthetic set: each fused scope beside torch fused."""
    ps = build_set("synthetic", b.sizes, b.device)
    grads = Grads(ps.params)
    scopes = [s for s in b.scopes if s in ROTATED_SCOPES]
    precision = "tf32x3" if "tf32x3" in b.precisions else b.precisions[0]
    b.sets.setdefault("synthetic", ps.summary())
    rows_all: list[Row] = []
    cost = None
    for n in b.sizes.scale_blocks:
        est = 15.0 if cost is None else cost * 1.5
        if not b.budget.allow("scale-n", f"n={n}", est):
            continue
        t0 = time.perf_counter()
        rows = b.make_rows(ps, "scale-n", ("torch-fused", "rotated-fused"), scopes, [precision], block_size=n)
        for r in rows:
            r.block_size = n
        b.time_rows(rows, grads, b.args.reps or b.sizes.scale_reps, 1, time.perf_counter() + 60)
        for r in rows:
            r.fn = r.opt = None
        b.rows += rows
        rows_all += [r for r in rows if r.backend != "torch-fused"]
        cost = max(cost or 0.0, time.perf_counter() - t0)
        print(f"  n={n}: {time.perf_counter() - t0:.1f} s")
        b.free()
    grads.release()
    b.scaling["block"] = {"set": ps.summary(), "fits_ms_vs_n": _fits(rows_all, "block_size")}


def run_compile(b: Bench, name: str) -> None:
    """torch.compile of the eager step per scope beside the eager rows and the anchor, interleaved."""
    import torch._dynamo

    ps = build_set(name, b.sizes, b.device)
    grads = Grads(ps.params)
    precs = [p for p in b.precisions if p in MATMUL_PRECISION]
    rows = b.make_rows(ps, "compile", ("torch-fused", "rotated-eager", "rotated-compile"), b.scopes, precs)
    b.rows += rows
    t0 = time.perf_counter()
    b.time_rows(rows, grads, b.args.reps or b.sizes.reps, b.sizes.warmup + 2, time.perf_counter() + 60)
    graphs: dict[str, int] = {}
    for r in rows:
        if r.backend == "rotated-compile":
            graphs[r.scope] = graphs.get(r.scope, 0) + r.extra.get("graphs", 0)
    for r in rows:
        if r.backend == "rotated-compile" and r.status == "ok" and not graphs[r.scope]:
            r.extra["note"] = "Dynamo compiled no graph: this row ran eagerly"
        r.fn = r.opt = None
    print(f"  {name}: compile rows in {time.perf_counter() - t0:.1f} s")
    for r in rows:
        if r.backend == "rotated-compile":
            print(f"    {r.label:34s} {r.status} {r.median or 0:9.3f} ms  {r.reason} {r.extra}")
    grads.release()
    del rows
    torch._dynamo.reset()
    b.free()


# %% main ---------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/latest", help="folder for the JSON, CSV, markdown, PNGs")
    ap.add_argument("--budget-seconds", type=float, default=540.0, help="skip what would overrun (default 540)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU; fused rows need TRITON_INTERPRET=1")
    ap.add_argument("--sets", default=",".join(SETS), help="parameter sets, in order (default all)")
    ap.add_argument("--phases", default=",".join(PHASES), help="phases to run (default all)")
    ap.add_argument("--scopes", default=",".join(SCOPES), help="scopes (default all)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="precisions (default ieee,tf32x3,tf32)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved rounds per group (default 20; scale 10)")
    ap.add_argument("--block-size", type=int, default=None, help="block size n of the tables (default 768)")
    ap.add_argument("--max-params", type=int, default=2**30, help="largest scale-d point (default 2^30)")
    ap.add_argument(
        "--keep-first-table",
        action="store_true",
        help="never skip the first set's table (gpt2 by default) for budget: cut precisions from the end of\n"
        "--precisions until its estimate fits (the first one always runs), record each cut in 'skipped'",
    )
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; dry run eager)")
    args = ap.parse_args(argv)
    for opt, valid in (("sets", SETS), ("phases", PHASES), ("scopes", SCOPES), ("precisions", PRECISIONS)):
        bad = [x for x in getattr(args, opt).split(",") if x and x not in valid]
        if bad:
            ap.error(f"--{opt}: unknown {bad}; choose from {', '.join(valid)}")
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.dry_run else "inductor"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        device, sizes = torch.device("cpu"), DRY
    elif not torch.cuda.is_available():
        print("bench_step: no CUDA device here; the benchmark needs a GPU (or --dry-run for the CPU plumbing check).")
        return 0
    elif interpret_mode():
        print("bench_step: TRITON_INTERPRET=1 is set; unset it to benchmark the compiled kernels on the GPU.")
        return 2
    else:
        device, sizes = torch.device("cuda"), GPU
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("highest")
    b = Bench(args, device, sizes)
    try:
        return run_all(b)
    except KeyboardInterrupt:  # SIGINT (Ctrl-C, timeout -s INT): keep what was measured, no traceback
        return b.interrupted()


def run_all(b: Bench) -> int:
    """Every phase in order; results are saved after each one."""
    args, env = b.args, b.env
    print(
        f"bench_step: {env['gpu']} | torch {env['torch']} | triton {env['triton']} | git {env['git']} | "
        f"budget {args.budget_seconds:.0f} s ({b.budget.left():.0f} s left after imports)"
    )
    phases = [p for p in args.phases.split(",") if p]
    sets = [s for s in args.sets.split(",") if s]
    b.phase("ceilings", phase_ceilings, b)
    if b.ceil is None:  # every floor needs them
        print("bench_step: the ceilings failed (see bench_step.json errors); nothing else can be measured.")
        return 1
    for i, name in enumerate(sets):
        run_set(b, name, phases, keep=args.keep_first_table and i == 0 and "table" in phases)
    if "scale-d" in phases:
        b.phase("scale-d", run_scale_d, b)
    if "scale-n" in phases:
        b.phase("scale-n", run_scale_n, b)
    if "compile" in phases:
        for name in sets[:1] if args.dry_run else sets:  # the dry run checks the plumbing once
            if b.budget.allow("compile", name, b.compile_estimate() + 10):
                b.phase("compile", run_compile, b, name, what=name)
    data = b.save(final=True)
    print(f"wrote {b.out}/bench_step.json, .csv, .md and {len(data.get('plots', []))} plots in {b.budget.used():.0f} s")
    return 0


def run_set(b: Bench, name: str, phases: list[str], keep: bool = False) -> None:
    """One parameter set's table, cross-check and (gpt2) end-to-end run. keep (--keep-first-table, first set):
    the table runs whatever the budget, with the precisions fit_precisions leaves."""
    table = "table" in phases
    e2e = "e2e" in phases and name == "gpt2"
    cross = "crosscheck" in phases and name == "gpt2"
    if not (table or e2e or cross):
        return
    ps = build_set(name, b.sizes, b.device)
    b.sets[name] = ps.summary()
    precisions = None
    if keep:
        precisions = fit_precisions(b, name, ps.d)
    elif (table or cross) and not b.budget.allow("table", name, table_estimate(b, ps.d)):  # e2e alone: its own
        del ps
        b.free()
        return
    grads = Grads(ps.params)
    if table or cross:
        rows = b.phase("table", run_table, b, ps, grads, precisions, what=name) or []
    else:  # the end-to-end run alone still needs its optimizers
        rows = b.make_rows(ps, "e2e", ("torch-fused", "rotated-eager", "rotated-fused"), b.scopes, b.precisions)
    # A kept table may have run over the budget: then the cross-check, left unchecked otherwise, waits its turn.
    if cross and rows and (not keep or b.budget.allow("crosscheck", name, 10.0 if b.device.type == "cuda" else 2.0)):
        b.phase("crosscheck", run_crosscheck, b, rows, grads, what=name)
    grads.release()
    if e2e and rows:
        est = 60.0 if b.device.type == "cuda" else 10.0
        if b.budget.allow("e2e", name, est):
            b.phase("e2e", run_e2e, b, ps, rows, what=name)
    for r in b.rows:  # every optimizer of this set, also those of a phase that failed half-way
        r.fn = r.opt = None
    del ps, rows, grads
    b.free()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # from here main() turns Ctrl-C into saved results
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before the Bench exists (parsing, git sha): nothing measured
        print("bench_step: interrupted while starting; nothing saved")
        sys.exit(130)

"""CPU optimizer-step benchmark: the compiled extension (``backend="ext"``, what ``auto`` runs on a CPU)
against torch's fused AdamW, the eager reference, torch.compile of the eager step and the step's floors, all
measured in one process, interleaved, with the machine's load recorded around every round.

    python benchmarks/bench_cpu_step.py                                   # the acceptance run (~1 h, 2 quiet cores)
    python benchmarks/bench_cpu_step.py --sizes 10m --blocks 768 --threads 1 --no-compile --phases table
    python benchmarks/bench_cpu_step.py --dry-run --out /tmp/cpu-dry      # tiny shapes: the plumbing (< 1 min)

Groups. One interleaved group per (parameter set, block size n, torch threads). Parameter sets are GPT-shaped
(rotkern.trainers.models.GPT, annotated by param_groups_for with nanoGPT's decay rule): ``10m`` = 4 layers,
n_embd 384, vocab 8192 (10,325,376 params); ``40m`` = 4 layers, n_embd 768, vocab 16384 (41,097,984 params).

Candidates of a group, all stepping the same fp32 params (lr 1e-6), each with its own optimizer state:
  torch-fused        torch.optim.AdamW(fused=True), nanoGPT's decay / no-decay groups (scope none only)
  eager <scope>      RotatedAdamW, the eager reference
  ext <scope>        FusedRotatedAdamW(backend="ext"), the compiled extension
  compile <scope>    torch.compile(RotatedAdamW.step) (one eager step first, as benchmarks/bench_step.py does);
                     rotated scopes; compiled per group, since Inductor bakes the thread count into its code
  floor-perm <scope> the scope's permuted coordinates gathered (index_select) and scattered (index_copy_) with
                     torch ops: every permuted unit, each through its own pi, on contiguous buffers
  probe-gemm         (m x n) @ (n x n) BLAS products at the group's n, m = 256 and 2048, one single-threaded
                     stream of them per torch thread at once (as the extension runs its tiles): the rate
  probe-stream       a += b over 2^24 floats, 8 times: the memory bandwidth (12 bytes per element, as AdamW moves
                     them)
Floors of a scope: gemm = its rotations' FLOPs (4 nb^2 per block of nb: rotate and unrotate) / the faster probe
rate of the same round; perm = the floor-perm candidate; stream = 28 bytes per param / the probe's bandwidth. The
floor is their max; "of floor" = ext median / floor (1.0 = at the floor; acceptance: <= 1.5).

Timing. Every candidate's first call is made alone (state, tables, compilation: first_call_s); one untimed
warm-up round; then rounds that call every candidate once in a shuffled order, each after pointing the params'
.grad at the next of K gradient buffers (K >= 2, so that no step finds the previous step's gradient in cache).
Host clock (time.perf_counter) around each call; a step shorter than --min-sample-ms (100) is repeated back to back
within its sample (each repetition with the next gradient buffer; the sample is their mean). Medians over the
quiet samples.

Load. The machine is shared, so every round records the 1-minute load average before and after it, and every
sample the CPU time other processes used around it: /proc/stat's busy time minus this process's own
(/proc/self/stat), over the window between the snapshots taken before and after the call, widened to at least
--window seconds (1 s: ticks are 10 ms) with the neighbouring snapshots; idle margins before and after each round
make that possible for the first and last calls. Hypervisor steal time is counted the same way. A sample is quiet
when others used at most --max-foreign cores (default 0.25) and steal stayed under the same bound: then this
process had its cores (and most of the memory bandwidth) to itself. Before each round the script waits (up to
--wait-quiet seconds) for a 2-second window that is quiet in the same sense and a 1-minute load of at most
threads + --max-extra-load (1.5 at one thread); the load average lags a minute behind, so it decides when to
start, and the direct measure which samples count. Rounds repeat until every candidate has --rounds quiet
samples, or --max-rounds. A candidate with fewer than 3 is reported from all its samples and marked NOISY.

Phases: table (the groups), scale-d (ext and torch fused on GPT sets of 1, 2, 4 and 8 layers at n_embd 768,
vocab 16384, n = 768, one thread: linear fits of time vs params) and scale-n (ext on the 40m set at n = 96 ...
1536, one thread: the log-log slope of time vs n, which must not exceed 1).

Outputs in --out: <name>.json (every round and sample, the load figures, the environment) and <name>.md (tables,
acceptance checks, the command). Default: benchmarks/results/cpu_step.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from _common import (
    BYTES_PER_PARAM,
    DRY,
    HYPER,
    MIN_QUIET,
    Grads,
    LoadMeter,
    ParamSet,
    Snapshot,  # noqa: F401  (re-exported: the tests build bench_cpu_step.Snapshot)
    _around,
    _kept,
    _linear_fit,
    _ms,
    compiled_step,
    rotation_work,
    write_json,
)
from _common import build_set as _build_set
from _common import cpu_environment as environment

from rotkern import SCOPES, FusedRotatedAdamW, RotatedAdamW
from rotkern._backend import why_not_ext
from rotkern.trainers.models import GPTConfig

HERE = Path(__file__).resolve().parent
ROTATED = tuple(s for s in SCOPES if s != "none")
SETS = {
    "10m": GPTConfig(block_size=256, vocab_size=8192, n_layer=4, n_head=6, n_embd=384, attention="math"),
    "40m": GPTConfig(block_size=256, vocab_size=16384, n_layer=4, n_head=12, n_embd=768, attention="math"),
    "tiny": DRY.gpt,  # --dry-run
}
SCALE_D_LAYERS = (1, 2, 4, 8)
SCALE_N = (96, 192, 384, 768, 1536)
SCHEMA = 1


# %% candidates ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Cand:
    name: str
    kind: str  # torch-fused | eager | ext | compile | floor-perm | probe-gemm | probe-stream
    scope: str
    fn: Callable[[], object] | None
    times: list[float] = dataclasses.field(default_factory=list)  # ms, one per round
    quiet: list[bool] = dataclasses.field(default_factory=list)  # per sample: others stayed under --max-foreign
    foreign: list[float] = dataclasses.field(default_factory=list)  # per sample: cores others used around it
    status: str = "ok"
    reason: str = ""
    first_call_s: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    def fail(self, status: str, reason: str) -> None:
        self.status, self.reason, self.fn = status, reason, None


def build_set(name: str, n_layer: int | None = None) -> ParamSet:
    cfg = SETS[name] if n_layer is None else dataclasses.replace(SETS[name], n_layer=n_layer)
    torch.manual_seed(0)
    ps = _build_set("gpt2", dataclasses.replace(DRY, gpt=cfg), torch.device("cpu"))
    ps.name = name if n_layer is None else f"{name}-{n_layer}l"
    return ps


def rotation_flops(opt: RotatedAdamW) -> float:
    return rotation_work(opt)[0]


class PermFloor:
    """index_select + index_copy_ through every permutation of a scope's units, on contiguous buffers (the
    same positions the step gathers and scatters, with torch's ops)."""

    def __init__(self, opt: RotatedAdamW) -> None:
        self.jobs: list[tuple[int, torch.Tensor, tuple[int, int]]] = []
        numel = 0
        for gi in range(len(opt.param_groups)):
            for u in opt.units(gi):
                rot = u.rotation
                if rot is None or getattr(rot, "perm_stream", None) is None:
                    continue
                k, length = u.shape
                pi = rot.permutation("cpu", cache=False)
                # flat: (1, L) along dim 1; rows: (k, L) along dim 1; cols: the (L, k) stored view along dim 0.
                dim, shape = (0, (length, k)) if u.layout == "cols" else (1, (k, length))
                self.jobs.append((dim, pi, shape))
                numel = max(numel, k * length)
        self.src = torch.randn(numel) if numel else None
        self.dst = torch.empty(numel) if numel else None
        self.coords = sum(math.prod(s) for _, _, s in self.jobs)

    def __call__(self) -> None:
        for dim, pi, shape in self.jobs:
            m = math.prod(shape)
            src, dst = self.src[:m].view(shape), self.dst[:m].view(shape)
            torch.index_select(src, dim, pi, out=dst)
            src.index_copy_(dim, pi, dst)


class GemmProbe:
    """The BLAS rate as the extension uses it at block size n: each of the T torch threads multiplying its own
    (m x n) @ (n x n) tiles single-threaded, m = 256 and 2048, the faster shape per call. (One multi-threaded
    BLAS call of these shapes reached ~110 of ~200 GFLOP/s on 2 threads here: a floor it would set is no floor.)
    The T workers are Python threads (torch releases the GIL in mm) with torch's intra-op threads set to one."""

    def __init__(self, n: int) -> None:
        self.threads = torch.get_num_threads()
        self.r = torch.randn(n, n)
        self.shapes = {m: [(torch.randn(m, n), torch.empty(m, n)) for _ in range(self.threads)] for m in (256, 2048)}
        self.reps = {m: max(1, 2**22 // (m * n)) for m in self.shapes}
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self.rates: list[float] = []  # FLOP/s, the faster shape of each call

    def __call__(self) -> None:
        best = 0.0
        n = self.r.shape[0]
        for m, bufs in self.shapes.items():

            def work(k: int, m=m, bufs=bufs) -> None:
                x, y = bufs[k]
                for _ in range(self.reps[m]):
                    torch.mm(x, self.r.t(), out=y)

            torch.set_num_threads(1)
            try:
                t0 = time.perf_counter()
                if self.pool is None:
                    work(0)
                else:
                    list(self.pool.map(work, range(self.threads)))
                dt = time.perf_counter() - t0
            finally:
                torch.set_num_threads(self.threads)
            best = max(best, 2.0 * m * n * n * self.reps[m] * self.threads / dt)
        self.rates.append(best)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


class StreamProbe:
    """Memory bandwidth as AdamW uses it: ``a += b`` over 2 x 2^24 floats reads a and b and writes a (12 bytes
    per element, all of them moved: a is read before it is written, so no write-allocate traffic is hidden, as
    in AdamW's 28 bytes per param); 8 times per call, the rate of the whole."""

    def __init__(self, numel: int, reps: int = 8) -> None:
        self.a, self.b = torch.randn(numel), torch.randn(numel)
        self.reps = reps
        self.rates: list[float] = []  # bytes per second

    def __call__(self) -> None:
        t0 = time.perf_counter()
        for _ in range(self.reps):
            self.a.add_(self.b)
        self.rates.append(12.0 * self.a.numel() * self.reps / (time.perf_counter() - t0))


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def ext_memory(opt: FusedRotatedAdamW) -> dict:
    """Bytes the extension keeps beyond the optimizer state: cached permutation tables and the workspace."""
    from rotkern.kernels import ext

    units = {id(u) for gi in range(len(opt.param_groups)) for u in opt.units(gi)}
    tables = 0
    for unit, desc in ext._DESCRIPTIONS.values():
        if id(unit) in units:
            perm, extra = desc[3][1], desc[4]
            tables += sum(t.numel() * t.element_size() for t in ((perm,) if perm is not None else ()) + (extra or ()))
    ws = getattr(ext._local, "workspace", None)
    return {"tables_bytes": tables, "workspace_bytes": 0 if ws is None else ws.numel() * 4}


# %% one interleaved group -----------------------------------------------------------------------------------
class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.meter = LoadMeter()
        self.rng = random.Random(0)

    def max_load(self, threads: int) -> float:
        return threads + self.args.max_extra_load

    def run(self, cands: list[Cand], grads: Grads, threads: int, rounds: int, label: str) -> dict:
        """First calls, a warm-up round, then interleaved rounds until `rounds` quiet ones (or --max-rounds)."""
        a = self.args
        for c in cands:
            if c.fn is None:
                continue
            t0 = time.perf_counter()
            try:
                graphs = _dynamo_graphs() if c.kind == "compile" else 0
                grads.feed()
                c.fn()
                if c.kind == "compile":
                    c.extra["graphs"] = _dynamo_graphs() - graphs
            except Exception as e:  # a candidate that cannot run is recorded, not fatal
                c.fail("error", f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}")
            c.first_call_s = time.perf_counter() - t0
        for c in cands:  # warm-up; a compiled step that still compiles new graphs recompiles every step
            if c.fn is None:
                continue
            before = _dynamo_graphs() if c.kind == "compile" else 0
            grads.feed()
            t0 = time.perf_counter()
            c.fn()
            took = time.perf_counter() - t0
            if not isinstance(c.fn, (GemmProbe, StreamProbe)):
                # Short steps are repeated within a sample (timer and scheduler noise are ~1 ms): the sample is the
                # mean of `repeat` back-to-back steps, each with the next gradient buffer.
                c.extra["repeat"] = max(1, min(64, math.ceil(a.min_sample_ms / max(1e3 * took, 1e-3))))
            if c.kind == "compile" and _dynamo_graphs() > before:
                grads.feed()
                before = _dynamo_graphs()
                c.fn()
                if _dynamo_graphs() > before:
                    c.fail("n/a", "recompiles every step (Dynamo guard failures)")
        active = [c for c in cands if c.fn is not None]
        for c in active:
            if isinstance(c.fn, (GemmProbe, StreamProbe)):
                c.fn.rates.clear()  # from here on, one rate per timed sample
        log: list[dict] = []
        pad = a.window / 2
        while len(log) < max(1, a.max_rounds) and min((sum(c.quiet) for c in active), default=rounds) < rounds:
            waited = self.meter.wait_quiet(a.max_foreign, self.max_load(threads), a.wait_quiet) if a.wait_quiet else 0
            order = active[:]
            self.rng.shuffle(order)
            # Idle margins on both sides, so that every sample can be judged on a window of at least --window
            # seconds (ticks are 10 ms: a shorter window cannot tell a neighbour from rounding; idle time is not
            # ours, so it does not dilute what others used).
            snaps = [self.meter.snapshot()]
            time.sleep(pad)
            snaps.append(self.meter.snapshot())
            for c in order:
                took = 0.0
                for _ in range(c.extra.get("repeat", 1)):
                    grads.feed()
                    t0 = time.perf_counter()
                    c.fn()
                    took += time.perf_counter() - t0
                c.times.append(1e3 * took / c.extra.get("repeat", 1))
                snaps.append(self.meter.snapshot())
            time.sleep(pad)
            snaps.append(self.meter.snapshot())
            worst = 0.0
            for i, c in enumerate(order, start=1):
                foreign, steal = self.meter.cores(*_around(snaps, i, a.window))
                ok = foreign <= a.max_foreign and steal <= a.max_foreign
                c.quiet.append(ok)
                c.foreign.append(foreign)
                worst = max(worst, foreign)
            mean_foreign, mean_steal = self.meter.cores(snaps[0], snaps[-1])
            log.append(
                {
                    "round": len(log),
                    "seconds": snaps[-1].t - snaps[0].t,
                    "waited_s": round(waited, 1),
                    "load1_before": snaps[0].load1,
                    "load1_after": snaps[-1].load1,
                    "foreign_cores_max": worst,
                    "foreign_cores_mean": mean_foreign,
                    "steal_cores_mean": mean_steal,
                    "flagged": [c.name for c in order if not c.quiet[-1]],
                    "order": [c.name for c in order],
                }
            )
            flagged = len(log[-1]["flagged"])
            print(
                f"    {label} round {len(log) - 1}: load {snaps[0].load1:.2f} -> {snaps[-1].load1:.2f}, others "
                f"{mean_foreign:.2f} cores on average, {worst:.2f} at most ({a.window:g} s windows), steal "
                f"{mean_steal:.2f}; {flagged} of {len(order)} samples flagged; {snaps[-1].t - snaps[0].t:.1f} s"
                + (f" after waiting {waited:.0f} s" if waited > 2.5 else ""),
                flush=True,
            )
        return {"rounds": log}


def summarize(c: Cand) -> dict:
    keep, noisy = _kept(c, c.times)
    t = sorted(keep)
    q = (lambda f: t[min(len(t) - 1, int(f * len(t)))]) if t else (lambda f: None)
    return {
        "candidate": c.name,
        "kind": c.kind,
        "scope": c.scope,
        "status": c.status,
        "reason": c.reason,
        "median_ms": statistics.median(t) if t else None,
        "p20_ms": q(0.2),
        "p80_ms": q(0.8),
        "reps": len(t),
        "quiet_reps": sum(c.quiet),
        "noisy": noisy and bool(t),
        "all_ms": c.times,
        "quiet": c.quiet,
        "foreign_cores": c.foreign,
        "first_call_s": c.first_call_s,
        **c.extra,
    }


def run_group(runner: Runner, ps: ParamSet, n: int, threads: int, kinds: set[str], scopes: list[str]) -> dict:
    a = runner.args
    torch.set_num_threads(threads)
    grads = Grads(ps.params, 2)
    cands: list[Cand] = []
    hyper = HYPER
    info: dict[str, dict] = {}
    if "torch-fused" in kinds:
        opt = torch.optim.AdamW([dict(g) for g in ps.torch_groups], **hyper, fused=True)
        cands.append(Cand("torch-fused", "torch-fused", "none", opt.step))
    ext_opts = {}
    for scope in scopes:
        groups = lambda: [dict(g) for g in ps.rotated_groups]  # noqa: E731  (optimizers fill in their defaults)
        eager = RotatedAdamW(groups(), **hyper, rotation=scope, block_size=n, seed=0)
        info[scope] = {"flops": rotation_flops(eager)}
        if "eager" in kinds:
            cands.append(Cand(f"eager {scope}", "eager", scope, eager.step))
        if "ext" in kinds:
            if why_not_ext(ps.params[0]) is None:
                opt = FusedRotatedAdamW(groups(), **hyper, rotation=scope, block_size=n, seed=0, backend="ext")
                ext_opts[scope] = opt
                cands.append(Cand(f"ext {scope}", "ext", scope, ext_opts[scope].step))
            else:
                cands.append(Cand(f"ext {scope}", "ext", scope, None, status="n/a", reason=why_not_ext(ps.params[0])))
        if "compile" in kinds and scope != "none":
            opt = RotatedAdamW(groups(), **hyper, rotation=scope, block_size=n, seed=0)
            cands.append(Cand(f"compile {scope}", "compile", scope, compiled_step(opt)))
        if "floors" in kinds and scope != "none":
            pf = PermFloor(eager)
            info[scope]["permuted_coords"] = pf.coords
            if pf.jobs:
                cands.append(Cand(f"floor-perm {scope}", "floor-perm", scope, pf))
    if "floors" in kinds:
        gemm, stream = GemmProbe(n), StreamProbe(a.stream_numel)
        cands += [Cand("probe-gemm", "probe-gemm", "-", gemm), Cand("probe-stream", "probe-stream", "-", stream)]
    label = f"{ps.name} n={n} t={threads}"
    print(f"  {label}: {ps.d:,} params, {len(cands)} candidates", flush=True)
    t0 = time.perf_counter()
    res = runner.run(cands, grads, threads, a.rounds, label)
    rows = [summarize(c) for c in cands]
    by = {r["candidate"]: r for r in rows}
    probes = {c.kind: c for c in cands}

    def probe_rate(kind: str) -> float | None:
        c = probes.get(kind)
        return statistics.median(_kept(c, c.fn.rates)[0]) if c is not None and c.fn is not None and c.fn.rates else None

    gemm_rate, stream_bw = probe_rate("probe-gemm"), probe_rate("probe-stream")
    floors = {}
    for scope in scopes:
        gemm_ms = 1e3 * info[scope]["flops"] / gemm_rate if gemm_rate and info[scope]["flops"] else 0.0
        perm_row = by.get(f"floor-perm {scope}")
        perm_ms = perm_row["median_ms"] if perm_row and perm_row["median_ms"] else 0.0
        stream_ms = 1e3 * BYTES_PER_PARAM * ps.d / stream_bw if stream_bw else 0.0
        parts = {"gemm": gemm_ms, "perm": perm_ms, "stream": stream_ms}
        bound = max(parts, key=parts.get)
        floors[scope] = {"floor_ms": parts[bound], "bound": bound, **{f"{k}_ms": v for k, v in parts.items()}}
        ext_row = by.get(f"ext {scope}")
        if ext_row and ext_row["median_ms"] and parts[bound]:
            ext_row["of_floor"] = ext_row["median_ms"] / parts[bound]
        if scope in ext_opts:
            mem = ext_memory(ext_opts[scope])
            if ext_row is not None:
                ext_row.update({k: v for k, v in mem.items()}, bytes_per_param=sum(mem.values()) / ps.d)
    grads.release()
    if "floors" in kinds:
        gemm.close()
    del cands, ext_opts
    _reset_compile()
    gc.collect()
    return {
        "set": ps.name,
        "params": ps.d,
        "block_size": n,
        "threads": threads,
        "seconds": time.perf_counter() - t0,
        "gemm_GFLOPs": gemm_rate / 1e9 if gemm_rate else None,
        "stream_GBps": stream_bw / 1e9 if stream_bw else None,
        "floors": floors,
        "rotation_flops": {s: info[s]["flops"] for s in scopes},
        "rows": rows,
        "noisy": any(r["noisy"] for r in rows),
        **res,
    }


def _reset_compile() -> None:
    try:
        import torch._dynamo

        torch._dynamo.reset()
    except Exception:  # no Dynamo on this build: nothing was compiled
        pass


# %% scaling -------------------------------------------------------------------------------------------------
def _fit(xs: list[float], ys: list[float]) -> dict | None:
    fit = _linear_fit(xs, ys)
    if fit and len(xs) >= 2 and min(xs) > 0 and min(ys) > 0:
        fit["loglog_slope"] = float(np.polyfit(np.log(xs), np.log(ys), 1)[0])
    return fit


def run_scale_d(runner: Runner, scopes: list[str], base: str, n: int) -> dict:
    points = []
    for layers in runner.args.scale_d_layers:
        ps = build_set(base, layers)
        g = run_group(runner, ps, n, 1, {"torch-fused", "ext"}, scopes)
        points.append(g)
    fits = {}
    for name in ["torch-fused"] + [f"ext {s}" for s in scopes]:
        pts = [(g["params"], r["median_ms"]) for g in points for r in g["rows"] if r["candidate"] == name]
        pts = [p for p in pts if p[1]]
        if pts:
            fits[name] = _fit(*map(list, zip(*pts, strict=True)))
            fits[name]["points"] = pts
    return {"block_size": n, "threads": 1, "groups": points, "fits_ms_vs_params": fits}


def run_scale_n(runner: Runner, scopes: list[str], base: str) -> dict:
    ps = build_set(base)
    points = [run_group(runner, ps, n, 1, {"ext"}, [s for s in scopes if s != "none"]) for n in runner.args.scale_n]
    fits = {}
    for s in scopes:
        if s == "none":
            continue
        pts = [(g["block_size"], r["median_ms"]) for g in points for r in g["rows"] if r["candidate"] == f"ext {s}"]
        pts = [p for p in pts if p[1]]
        if pts:
            fits[f"ext {s}"] = _fit(*map(list, zip(*pts, strict=True)))
            fits[f"ext {s}"]["points"] = pts
    return {"set": ps.name, "params": ps.d, "threads": 1, "groups": points, "fits_ms_vs_n": fits}


# %% report ----------------------------------------------------------------------------------------------------


def acceptance(data: dict) -> list[dict]:
    """Each acceptance point of the CPU extension's targets with its figure, per group."""
    out = []
    for g in data["groups"]:
        by = {r["candidate"]: r for r in g["rows"]}
        group = f"{g['set']} n={g['block_size']} t={g['threads']}"

        def where(*rows: dict, group=group) -> str:
            # A figure from a candidate without 3 quiet samples is marked: it came from loaded rounds.
            return group + (" NOISY" if any(r.get("noisy") for r in rows) else "")

        ext, fused = by.get("ext none"), by.get("torch-fused")
        if ext and fused and ext["median_ms"] and fused["median_ms"]:
            ratio = ext["median_ms"] / fused["median_ms"]
            out.append({"group": where(ext, fused), "check": "none: ext <= 1.2x torch fused",
                        "figure": f"{ratio:.2f}x", "ok": ratio <= 1.2})  # fmt: skip
        for s in ROTATED:
            e = by.get(f"ext {s}")
            if not e or not e["median_ms"]:
                continue
            for other in ("eager", "compile"):
                o = by.get(f"{other} {s}")
                if o and o["median_ms"]:
                    out.append({"group": where(e, o), "check": f"{s}: ext faster than {other}",
                                "figure": f"{o['median_ms'] / e['median_ms']:.2f}x faster",
                                "ok": e["median_ms"] < o["median_ms"]})  # fmt: skip
                elif o:
                    out.append({"group": where(e), "check": f"{s}: ext faster than {other}",
                                "figure": f"{other} {o['status']}: {o['reason']}", "ok": None})  # fmt: skip
            if e.get("of_floor"):
                f = g["floors"][s]
                floor_rows = [r for r in (by.get(f"floor-perm {s}"), by.get("probe-gemm"), by.get("probe-stream")) if r]
                check = f"{s}: ext within 1.5x of its floor ({f['bound']})"
                out.append({"group": where(e, *floor_rows), "check": check,
                            "figure": f"{e['of_floor']:.2f}x the floor ({f['floor_ms'] / e['median_ms']:.0%} of "
                            "floor speed)", "ok": e["of_floor"] <= 1.5})  # fmt: skip
    sd = data.get("scaling", {}).get("params")
    for name, fit in (sd or {}).get("fits_ms_vs_params", {}).items():
        if fit and name.startswith("ext"):
            out.append({"group": "scale-d", "check": f"{name}: linear in d (r^2 >= 0.99)",
                        "figure": f"{1e6 * fit['slope']:.1f} ns/param + {fit['intercept']:.0f} ms, r^2 "
                        f"{fit['r2']:.4f}, log-log slope {fit.get('loglog_slope', float('nan')):.2f}",
                        "ok": fit["r2"] >= 0.99})  # fmt: skip
    sn = data.get("scaling", {}).get("block")
    for name, fit in (sn or {}).get("fits_ms_vs_n", {}).items():
        if fit and fit.get("loglog_slope") is not None:
            out.append({"group": "scale-n", "check": f"{name}: at most linear in n (log-log slope <= 1)",
                        "figure": f"slope {fit['loglog_slope']:.2f}", "ok": fit["loglog_slope"] <= 1.05})  # fmt: skip
    return out


def render(data: dict) -> str:
    m = data["meta"]
    lines = [
        "# CPU optimizer step: compiled extension vs torch fused AdamW, eager, torch.compile and the floors",
        "",
        f"Command: `{m['command']}` ({m['date']}, {m['wall_s'] / 60:.0f} min). Machine: {m['cpu']}, "
        f"{m['cores']} cores; torch {m['torch']}, extension kernels `{m['isa']}`, git {m['git']}.",
        "Rounds: every candidate once per round, shuffled; before each, a wait (up to "
        f"{m['wait_quiet']:g} s) for a 2 s window in which others use <= {m['max_foreign']} cores and the 1-minute "
        f"load is <= threads + {m['max_extra_load']}. A sample counts when other processes used <= {m['max_foreign']}"
        f" cores in the >= {m['window']:g} s window around it; medians over those, {m['rounds']} per candidate wanted,"
        f" {m['max_rounds']} rounds at most. A candidate with fewer than {MIN_QUIET} such samples is reported from "
        "all of them and marked * (NOISY). Times in ms.",
        "",
    ]
    if m.get("dry_run"):
        lines += ["**Dry run** (tiny shapes): plumbing only, the figures mean nothing.", ""]
    for g in data["groups"]:
        by = {r["candidate"]: r for r in g["rows"]}
        rs = g["rounds"]
        loads = [r["load1_before"] for r in rs] + [r["load1_after"] for r in rs]
        timed = [r for r in g["rows"] if r["all_ms"]]
        counts = [r["quiet_reps"] for r in timed]
        lines += [
            f"## {g['set']} ({g['params']:,} params), n = {g['block_size']}, {g['threads']} thread"
            f"{'s' if g['threads'] > 1 else ''}" + (" — some candidates NOISY (*)" if g["noisy"] else ""),
            "",
            f"{len(rs)} rounds, {min(counts, default=0)}–{max(counts, default=0)} quiet samples per candidate; 1-min "
            f"load {min(loads, default=0):.2f}–{max(loads, default=0):.2f} before/after rounds; other processes used "
            f"{statistics.mean(r['foreign_cores_mean'] for r in rs) if rs else 0:.2f} cores on average, "
            f"{max((r['foreign_cores_max'] for r in rs), default=0):.2f} at most around a sample; hypervisor steal "
            f"{max((r['steal_cores_mean'] for r in rs), default=0):.2f} cores at most. BLAS "
            f"{_ms(g['gemm_GFLOPs'])} GFLOP/s, memory {_ms(g['stream_GBps'])} GB/s (same rounds).",
            "",
            "| scope | torch fused | eager | compile | **ext** | GEMM floor | perm floor | stream floor | ext / floor "
            "| ext vs eager | ext vs compile |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in ["none", *ROTATED]:
            if f"ext {s}" not in by and f"eager {s}" not in by:
                continue
            f = g["floors"].get(s, {})
            ext = by.get(f"ext {s}", {}).get("median_ms")

            def cell(name: str, by=by) -> str:
                r = by.get(name)
                if r is None:
                    return "—"
                return _ms(r["median_ms"]) + ("*" if r["noisy"] else "") if r["median_ms"] else r["status"]

            def vs(name: str, by=by, ext=ext) -> str:
                r = by.get(name)
                return f"{r['median_ms'] / ext:.2f}x" if r and r["median_ms"] and ext else "—"

            lines.append(
                f"| {s} | {cell('torch-fused') if s == 'none' else '—'} | {cell(f'eager {s}')} | "
                f"{cell(f'compile {s}')} | **{cell(f'ext {s}')}** | {_ms(f.get('gemm_ms') or None)} | "
                f"{_ms(f.get('perm_ms') or None)} | {_ms(f.get('stream_ms'))} | "
                + (f"{of_floor:.2f} ({f['bound']})" if (of_floor := by.get(f"ext {s}", {}).get("of_floor")) else "—")
                + f" | {vs(f'eager {s}')} | {vs(f'compile {s}')} |"
            )
        mem = [(s, b) for s in ROTATED if (b := by.get(f"ext {s}", {}).get("bytes_per_param"))]
        if mem:
            lines += ["", "ext memory beyond the optimizer state (permutation tables + workspace), bytes per param: "
                      + ", ".join(f"{s} {b:.2f}" for s, b in mem) + "."]  # fmt: skip
        lines.append("")
    sc = data.get("scaling", {})
    if sc.get("params"):
        lines += ["## Scaling in d (n = 768, 1 thread)", "", "| candidate | points (params: ms) | fit |"]
        lines.append("|---|---|---|")
        for name, fit in sc["params"]["fits_ms_vs_params"].items():
            pts = ", ".join(f"{p / 1e6:.1f}M: {_ms(t)}" for p, t in fit["points"])
            lines.append(f"| {name} | {pts} | {1e6 * fit['slope']:.2f} ns/param + {fit['intercept']:.1f} ms, r² "
                         f"{fit['r2']:.4f}, log-log slope {fit.get('loglog_slope', float('nan')):.2f} |")  # fmt: skip
        lines.append("")
    if sc.get("block"):
        b = sc["block"]
        lines += [f"## Scaling in n ({b['set']}, {b['params']:,} params, 1 thread)", "",
                  "| candidate | points (n: ms) | log-log slope |", "|---|---|---|"]  # fmt: skip
        for name, fit in b["fits_ms_vs_n"].items():
            pts = ", ".join(f"{p}: {_ms(t)}" for p, t in fit["points"])
            lines.append(f"| {name} | {pts} | {fit.get('loglog_slope', float('nan')):.2f} |")
        lines.append("")
    acc = data.get("acceptance", [])
    lines += ["## Acceptance", ""]
    if acc:
        lines += ["| where | check | figure | met |", "|---|---|---|---|"]
        for a in acc:
            mark = "yes" if a["ok"] else ("n/a" if a["ok"] is None else "**no**")
            lines.append(f"| {a['group']} | {a['check']} | {a['figure']} | {mark} |")
    else:
        lines.append("Nothing to judge: the compiled extension is not built here (`make ext`).")
    lines.append("")
    return "\n".join(lines)


# %% main ------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--name", default="cpu_step", help="output file stem")
    p.add_argument("--phases", default="table,scale-d,scale-n")
    p.add_argument("--sizes", default="10m,40m")
    p.add_argument("--blocks", default="384,768")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--scopes", default=",".join(SCOPES))
    p.add_argument("--no-compile", action="store_true", help="leave out the torch.compile candidates")
    p.add_argument("--no-eager", action="store_true", help="leave out the eager candidates")
    p.add_argument("--rounds", type=int, default=5, help="quiet rounds wanted per group")
    p.add_argument("--max-rounds", type=int, default=10, help="rounds at most per group")
    p.add_argument("--max-foreign", type=float, default=0.25, help="cores other processes may use in a quiet round")
    p.add_argument("--max-extra-load", type=float, default=0.5, help="quiet: 1-min load <= threads + this")
    p.add_argument("--wait-quiet", type=float, default=300.0, help="seconds to wait for quiet before a round")
    p.add_argument("--window", type=float, default=1.0, help="seconds of the load windows a round is judged on")
    p.add_argument("--stream-numel", type=int, default=2**24)
    p.add_argument("--min-sample-ms", type=float, default=100.0, help="shorter steps repeat within a sample")
    p.add_argument("--scale-d-layers", default=",".join(map(str, SCALE_D_LAYERS)))
    p.add_argument("--scale-n", default=",".join(map(str, SCALE_N)))
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, 2 rounds, no waiting: checks the plumbing")
    args = p.parse_args(argv)
    if args.dry_run:
        args.sizes, args.blocks, args.rounds, args.max_rounds, args.wait_quiet = "tiny", "16,32", 2, 2, 0.0
        args.window, args.min_sample_ms = min(args.window, 0.05), min(args.min_sample_ms, 1.0)
        args.scale_d_layers, args.scale_n, args.stream_numel = "1,2", "8,16,32", 2**16
    args.scale_d_layers = [int(x) for x in str(args.scale_d_layers).split(",") if x]
    args.scale_n = [int(x) for x in str(args.scale_n).split(",") if x]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    old_threads = torch.get_num_threads()
    runner = Runner(args)
    phases = [x for x in args.phases.split(",") if x]
    scopes = [s for s in args.scopes.split(",") if s]
    kinds = {"torch-fused", "ext", "floors", "eager", "compile"}
    kinds -= {"compile"} if args.no_compile else set()
    kinds -= {"eager"} if args.no_eager else set()
    data: dict = {"schema": SCHEMA, "groups": [], "scaling": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(["python", "benchmarks/bench_cpu_step.py", *(argv if argv is not None else sys.argv[1:])])

    def save() -> None:
        data["meta"] = {
            **environment(),
            "command": cmd,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": time.perf_counter() - t0,
            "dry_run": args.dry_run,
            **{k: getattr(args, k) for k in ("rounds", "max_rounds", "max_foreign", "max_extra_load", "wait_quiet")},
            "window": args.window,
            "load_measure": "proc" if runner.meter.available else "unavailable (not Linux): rounds are all 'quiet'",
        }
        data["acceptance"] = acceptance(data)
        write_json(out / f"{args.name}.json", data)
        (out / f"{args.name}.md").write_text(render(data))

    try:
        if "table" in phases:
            sets = {name: build_set(name) for name in args.sizes.split(",") if name}
            for threads in (int(t) for t in args.threads.split(",") if t):
                for ps in sets.values():
                    for n in (int(b) for b in args.blocks.split(",") if b):
                        data["groups"].append(run_group(runner, ps, n, threads, kinds, scopes))
                        save()
            del sets
        base = "tiny" if args.dry_run else "40m"
        n_d = int(args.blocks.split(",")[-1]) if args.dry_run else 768
        if "scale-d" in phases:
            data["scaling"]["params"] = run_scale_d(runner, scopes, base, n_d)
            save()
        if "scale-n" in phases:
            data["scaling"]["block"] = run_scale_n(runner, scopes, base)
            save()
    finally:
        torch.set_num_threads(old_threads)
    save()
    print(f"wrote {out / (args.name + '.md')} and .json in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

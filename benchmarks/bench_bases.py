"""Dynamic bases: the fused svd / eigen step against their eager step, per kind of step (basis refresh or not).

    python benchmarks/bench_bases.py                         # CUDA when there is one, else the CPU set
    python benchmarks/bench_bases.py --device cpu --out benchmarks/results --name bench_bases_cpu
    python benchmarks/bench_bases.py --dry-run --out /tmp/bases-dry                       # plumbing, ~5 s
    TRITON_INTERPRET=1 python benchmarks/bench_bases.py --dry-run --out /tmp/bases-dry    # + triton rows

Parameter set: the transformer blocks' matrices of a GPT (rotkern.trainers.models.GPT, annotated by
rotkern.param_groups_for, nanoGPT's decay rule; c_attn has role qkv, so split_qkv rotates q, k, v as three
units): on CUDA GPT-2 124M (12 layers, n_embd 768: 84,934,656 params, 72 units), on the CPU 4 layers at
n_embd 256 (3,145,728 params, 24 units), in --dry-run 1 layer at n_embd 32 (12,288 params). Embeddings and the
1-D LayerNorm weights are left out: the dynamic scopes give the embeddings no useful basis (a 50304-row side is
past max_precond_dim) and the vectors would only add the same unrotated step to every row. Block size n of the
static ``output`` scope: n_embd (--block-size).

Rows, every (rotation, kind) for each implementation, all stepping the same fp32 params (lr 1e-6), each with its
own optimizer state:
  rotation none, output   kind "step": every step is alike
  rotation svd, eigen     kind "steady": a step that keeps the basis (svd_every / precondition_every = 10^9, so
                          that after the first step no basis is recomputed; eigen still takes G G^T and G^T G
                          into its factors every step, as it does at any period)
                          kind "refresh": a step that recomputes it (svd_every / precondition_every = 1: svd's
                          SVD of every unit's gradient and the bases' completion; eigen's power iteration, QR
                          and the moments' transport, after the factor update)
                          kind "amortized": derived, (refresh + (P - 1) steady) / P at the optimizer's default
                          period P (RotatedAdamW's svd_every 250, precondition_every 10); p20 / p80 the same
                          combination of the p20s / p80s
                          kind "period": measured at the default period, each sample the mean of P consecutive
                          steps (one refresh among them wherever it starts), for P <= --max-measured-period
                          (eigen): the check of "amortized"
Implementations:
  eager    RotatedAdamW, the eager reference (fp32 matmuls at "highest" precision)
  triton   FusedRotatedAdamW(backend="triton", precision=--precision): on CUDA; on the CPU only in --dry-run under
           TRITON_INTERPRET=1, where it checks the plumbing and is never a timing. Basis management (SVD, eigh,
           QR, transport) is always the eager torch code; the Adam step of an eigen unit runs in the two-sided
           kernel (rotkern/kernels/two_sided_adamw.py), "ran" counts its unit steps per optimizer step
           (two_sided_steps); svd units run the eager step unless fused.py enables them (_FUSED_SVD)
  ext      FusedRotatedAdamW(backend="ext"), the compiled extension, on the CPU where it is built: it has no
           dynamic-basis path, so its svd / eigen units run the eager reference (backend_used "eager"); with
           this matrices-only set those rows are the eager step behind FusedRotatedAdamW's dispatch
Ratios: "x eager" = median / the eager median of the same (rotation, kind); "x none" = median / the "none" median
of the same implementation (fused / fused, eager / eager).

Timing. Each candidate's first step is made alone (state, first basis: svd's first SVD, eigen's eigh and skipped
Adam step; first_call_s), then --warmup untimed rounds, then rounds that call every candidate once in a shuffled
order (interleaved), each call after pointing the params' .grad at the next of K gradient buffers; medians and
p20 / p80 over rounds. Candidates run in three groups, in this order, each until its deadline (A: 30% of the
budget left when it starts, B: 50%, C: the rest; 3 rounds at least while the whole budget has room for them; a
group whose first call, warm-up and one round would not fit is skipped, and a cut is recorded): A none, output,
svd / eigen steady; B svd / eigen refresh; C the measured periods.
  CUDA: CUDA events around each call, the device synchronised before it; times are per optimizer step.
  CPU: time.perf_counter (wall) and time.process_time (this process's CPU time, all threads) around each call,
  --threads torch threads (default 1); a step shorter than --min-sample-ms is repeated back to back within its
  sample (each repetition with the next gradient buffer). The 1-minute load is recorded before and after the
  run and every round, and the CPU time other processes used around every sample (_common.LoadMeter,
  /proc): a sample is quiet when others used at most --max-foreign cores in the >= --window s window around
  it; medians come from the quiet samples when a candidate has >= 3 of them, else from all (marked NOISY).
  Before each round the script waits (up to --wait-quiet s) for a quiet 2 s window. Rounds repeat until every
  candidate of the group has --rounds quiet samples, --max-rounds, or the group's deadline.

Outputs in --out: <name>.json (every sample, the environment: device, torch, triton, git sha) and <name>.md (the
table and the command). Default --out benchmarks/results/latest, --name bench_bases.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # the budget of a command-line run counts from here, before torch is imported

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import inspect  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _p in (str(ROOT), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from _common import (  # noqa: E402
    DRY,
    HYPER,
    MIN_QUIET,
    Budget,
    Grads,
    LoadMeter,
    ParamSet,
    _around,
    _torch_groups,
    cpu_environment,
    environment,
    write_json,
)
from _common import _kept as _common_kept  # noqa: E402
from _common import _ms as _common_ms  # noqa: E402
from _common import _one_line as _common_one_line  # noqa: E402
from _common import _q as _common_q  # noqa: E402

from rotkern import FusedRotatedAdamW, RotatedAdamW, param_groups_for  # noqa: E402
from rotkern._backend import ext_available, interpret_mode, why_not_ext, why_not_triton  # noqa: E402
from rotkern.trainers.common import device_name  # noqa: E402
from rotkern.trainers.models import GPT, GPTConfig  # noqa: E402

ROTATIONS = ("none", "output", "svd", "eigen")
DYNAMIC = ("svd", "eigen")
IMPLS = ("eager", "triton", "ext")
KINDS = ("step", "steady", "refresh", "amortized", "period")
PERIOD_KEY = {"svd": "svd_every", "eigen": "precondition_every"}
NEVER = 10**9  # a period no benchmark reaches: the basis is never recomputed after the first step
SCHEMA = 1

CONFIGS = {
    "cuda": GPTConfig(attention="math"),  # GPT-2 124M
    "cpu": GPTConfig(block_size=256, vocab_size=8192, n_layer=4, n_head=4, n_embd=256, attention="math"),
    "dry": DRY.gpt,  # 1 layer, n_embd 32
}


def default_periods() -> dict[str, int]:
    """RotatedAdamW's default svd_every and precondition_every (read from its signature, so they follow it)."""
    sig = inspect.signature(RotatedAdamW.__init__).parameters
    return {rot: int(sig[key].default) for rot, key in PERIOD_KEY.items()}


# %% parameter set ------------------------------------------------------------------------------------------
def build_set(cfg: GPTConfig, device: torch.device, name: str) -> ParamSet:
    """The transformer blocks' matrices of a GPT with ``cfg``, with their names, roles and decay mask."""
    with torch.device(device):
        model = GPT(cfg)
    groups = []
    for g in param_groups_for(model, weight_decay=HYPER["weight_decay"]):
        keep = [i for i, (n, p) in enumerate(zip(g["names"], g["params"], strict=True))
                if n.startswith("transformer.h.") and p.dim() == 2]  # fmt: skip
        if keep:
            groups.append({k: [v[i] for i in keep] if isinstance(v, list) else v for k, v in g.items()})
    params = [p for g in groups for p in g["params"]]
    desc = (
        f"GPT (rotkern.trainers.models.GPT) n_layer {cfg.n_layer}, n_embd {cfg.n_embd}: the transformer blocks' "
        "matrices (c_attn as q, k, v, attn.c_proj, c_fc, mlp.c_proj)"
    )
    del model
    return ParamSet(name, params, groups, _torch_groups(params), None, desc)


# %% candidates ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Cand:
    rotation: str
    kind: str  # step | steady | refresh | period
    impl: str  # eager | triton | ext
    period: int | None = None  # svd_every / precondition_every it runs with
    opt: torch.optim.Optimizer | None = None
    steps: int = 1  # optimizer steps per call (a period candidate: P)
    status: str = "ok"  # ok | skipped | error
    reason: str = ""
    group: str = ""
    repeat: int = 1  # calls per sample (CPU: short steps)
    times: list[float] = dataclasses.field(default_factory=list)  # wall ms per optimizer step, one per sample
    cpu: list[float] = dataclasses.field(default_factory=list)  # process CPU ms per optimizer step (CPU only)
    quiet: list[bool] = dataclasses.field(default_factory=list)
    foreign: list[float] = dataclasses.field(default_factory=list)
    first_call_s: float | None = None
    calls: int = 0  # optimizer steps taken, all of them
    two_sided: int = 0  # two_sided_steps over the timed and warm-up steps (after the first call)
    counted_steps: int = 0
    backend_used: set = dataclasses.field(default_factory=set)

    @property
    def name(self) -> str:
        return f"{self.impl} {self.rotation} {self.kind}"

    def fail(self, status: str, reason: str) -> None:
        self.status, self.reason, self.opt = status, reason, None

    def call(self, grads: Grads) -> None:
        for _ in range(self.steps):
            grads.feed()
            self.opt.step()
        self.calls += self.steps


def make_cands(ps: ParamSet, args: argparse.Namespace, device: torch.device) -> list[Cand]:
    """Every candidate (rotation x kind x implementation), optimizers built; unavailable ones carry the reason."""
    periods = default_periods()
    example = ps.params[0]
    impl_reason = {"eager": None}
    impl_reason["triton"] = why_not_triton(example)
    if impl_reason["triton"] is None and device.type == "cpu" and not args.dry_run:
        # TRITON_INTERPRET=1 on CPU tensors: a plumbing check (--dry-run), never a timing.
        impl_reason["triton"] = "the Triton interpreter on the CPU is a plumbing check (--dry-run), never a timing"
    impl_reason["ext"] = why_not_ext(example)
    impls = [i for i in args.impls.split(",") if i]
    out: list[Cand] = []
    for rot in [r for r in args.rotations.split(",") if r]:
        if rot in DYNAMIC:
            kinds = [("steady", NEVER, "A"), ("refresh", 1, "B")]
            if periods[rot] <= args.max_measured_period:
                kinds.append(("period", periods[rot], "C"))
        else:
            kinds = [("step", None, "A")]
        for kind, period, group in kinds:
            for impl in impls:
                c = Cand(rot, kind, impl, period, group=group, steps=period if kind == "period" else 1)
                if impl_reason[impl] is not None:
                    c.fail("skipped", f"{impl}: {impl_reason[impl]}")
                    out.append(c)
                    continue
                groups = [dict(g) for g in ps.rotated_groups]  # optimizers fill their defaults into the dicts
                kw = dict(rotation=rot, block_size=args.block_size, seed=0)
                if rot in DYNAMIC:
                    kw[PERIOD_KEY[rot]] = period
                if impl == "eager":
                    c.opt = RotatedAdamW(groups, **HYPER, **kw)
                else:
                    c.opt = FusedRotatedAdamW(groups, **HYPER, **kw, backend=impl, precision=args.precision)
                out.append(c)
    return out


def estimate_s(c: Cand, cands: list[Cand]) -> float:
    """Seconds one call of c should take, from the groups measured before it (0 when nothing tells)."""
    steady = next((x for x in cands if (x.rotation, x.impl, x.kind) == (c.rotation, c.impl, "steady")), None)
    if c.kind == "refresh" and steady is not None:
        # A refresh step computes bases as the first step did (svd: an SVD; eigen: eigh, which costs more than
        # the power iteration and QR of a refresh): the first step bounds it.
        return steady.first_call_s or 0.0
    if c.kind == "period" and steady is not None and steady.times:
        refresh = next((x for x in cands if (x.rotation, x.impl, x.kind) == (c.rotation, c.impl, "refresh")), None)
        r_ms = (
            statistics.median(refresh.times)
            if refresh is not None and refresh.times
            else 1e3 * (steady.first_call_s or 0)
        )
        return ((c.steps - 1) * statistics.median(steady.times) + r_ms) / 1e3
    return 0.0


# %% timing -------------------------------------------------------------------------------------------------
class Timer:
    """CUDA events on the GPU; wall and process time on the CPU (with the load meter)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, c: Cand, grads: Grads) -> tuple[float, float | None]:
        """(wall ms, process CPU ms) of one sample of c, per optimizer step."""
        n = c.repeat * c.steps
        if self.cuda:
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(c.repeat):
                c.call(grads)
            b.record()
            torch.cuda.synchronize()
            return a.elapsed_time(b) / n, None
        w0, p0 = time.perf_counter(), time.process_time()
        for _ in range(c.repeat):
            c.call(grads)
        w1, p1 = time.perf_counter(), time.process_time()
        return 1e3 * (w1 - w0) / n, 1e3 * (p1 - p0) / n


class Runner:
    def __init__(self, args: argparse.Namespace, device: torch.device, budget: Budget) -> None:
        self.args, self.device, self.budget = args, device, budget
        self.timer = Timer(device)
        self.meter = LoadMeter()
        self.rng = random.Random(0)
        self.rounds: list[dict] = []
        self.errors: list[dict] = []

    def _guarded(self, c: Cand, grads: Grads) -> bool:
        try:
            c.call(grads)
            self.timer.sync()
            return True
        except Exception as e:  # a candidate that cannot run is recorded, not fatal
            c.fail("error", _one_line(e))
            self.errors.append(
                {"candidate": c.name, "error": _one_line(e), "traceback": traceback.format_exc()[-2000:]}
            )
            return False

    def run(self, cands: list[Cand], grads: Grads, group: str, deadline: float) -> None:
        """First calls, warm-up rounds, then interleaved rounds until the wanted quiet samples or the deadline."""
        a = self.args
        label = f"group {group}"
        for c in cands:
            if c.status != "ok":
                continue
            if time.perf_counter() > deadline:
                c.fail("skipped", f"budget: no time left for {label}'s first calls")
                self.budget.skip(label, c.name, c.reason)
                continue
            t0 = time.perf_counter()
            if self._guarded(c, grads):
                c.first_call_s = time.perf_counter() - t0
        warm_s: dict[int, float] = {}
        for _ in range(max(a.warmup, 1)):
            for c in cands:
                if c.status == "ok":
                    two0 = getattr(c.opt, "two_sided_steps", 0)
                    calls0 = c.calls
                    t0 = time.perf_counter()
                    if self._guarded(c, grads):
                        warm_s[id(c)] = time.perf_counter() - t0
                        self._count(c, two0, calls0)
        active = [c for c in cands if c.status == "ok"]
        for c in active:
            took_ms = 1e3 * warm_s[id(c)] / c.steps
            c.repeat = max(1, min(64, math.ceil(a.min_sample_ms / max(took_ms, 1e-3)))) if not self.timer.cuda else 1
        round_s = sum(warm_s[id(c)] * c.repeat for c in active)
        print(f"  {label}: {len(active)} candidates, ~{round_s:.1f} s per round", flush=True)
        cpu = not self.timer.cuda
        pad = a.window / 2 if cpu else 0.0
        done = 0
        while active and done < a.max_rounds:
            quiet_enough = min(sum(c.quiet) for c in active) >= a.rounds
            if done >= a.rounds and (quiet_enough or not cpu):
                break
            if self._past(done, deadline, round_s + 2 * pad):
                self.budget.skip(label, f"rounds after {done}", f"deadline: a round takes ~{round_s:.0f} s")
                break
            waited = 0.0
            if cpu and a.wait_quiet > 0:
                max_load = torch.get_num_threads() + a.max_extra_load
                waited = self.meter.wait_quiet(
                    a.max_foreign, max_load, min(a.wait_quiet, deadline - time.perf_counter())
                )
                if self._past(done, deadline, round_s + 2 * pad):
                    self.budget.skip(label, f"rounds after {done}", f"deadline, after waiting {waited:.0f} s for quiet")
                    break
            order = active[:]
            self.rng.shuffle(order)
            snaps = [self.meter.snapshot()]
            if pad:
                time.sleep(pad)
                snaps.append(self.meter.snapshot())
            for c in order:
                two0, calls0 = getattr(c.opt, "two_sided_steps", 0), c.calls
                wall, proc = self.timer.measure(c, grads)
                self._count(c, two0, calls0)
                c.times.append(wall)
                if proc is not None:
                    c.cpu.append(proc)
                snaps.append(self.meter.snapshot())
            if pad:
                time.sleep(pad)
                snaps.append(self.meter.snapshot())
            first = 2 if pad else 1
            worst = 0.0
            for i, c in enumerate(order, start=first):
                if cpu and self.meter.available:
                    foreign, steal = self.meter.cores(*_around(snaps, i, a.window))
                else:
                    foreign, steal = 0.0, 0.0
                c.quiet.append(foreign <= a.max_foreign and steal <= a.max_foreign)
                c.foreign.append(foreign)
                worst = max(worst, foreign)
            mean_foreign, mean_steal = self.meter.cores(snaps[0], snaps[-1]) if cpu else (0.0, 0.0)
            self.rounds.append({
                "group": group, "round": done, "seconds": snaps[-1].t - snaps[0].t, "waited_s": round(waited, 1),
                "load1_before": snaps[0].load1, "load1_after": snaps[-1].load1, "foreign_cores_mean": mean_foreign,
                "foreign_cores_max": worst, "steal_cores_mean": mean_steal,
                "flagged": [c.name for c in order if not c.quiet[-1]], "order": [c.name for c in order],
            })  # fmt: skip
            done += 1
            print(
                f"    {label} round {done - 1}: {snaps[-1].t - snaps[0].t:.1f} s, load {snaps[0].load1:.2f} -> "
                f"{snaps[-1].load1:.2f}, others {mean_foreign:.2f} cores (max {worst:.2f} around a sample), "
                f"{len(self.rounds[-1]['flagged'])} of {len(order)} flagged"
                + (f", after waiting {waited:.0f} s" if waited > 2.5 else ""),
                flush=True,
            )

    def _past(self, done: int, deadline: float, round_s: float) -> bool:
        """Whether to stop before another round: past the group's deadline, except that up to 3 rounds run while
        the whole budget has room for them (a median of one or two samples says little)."""
        end = time.perf_counter() + round_s
        if done < min(3, self.args.rounds) and end < self.budget.t0 + self.budget.seconds - 5:
            return False
        return done >= 1 and end > deadline

    @staticmethod
    def _count(c: Cand, two0: int, calls0: int) -> None:
        c.two_sided += getattr(c.opt, "two_sided_steps", 0) - two0
        c.counted_steps += c.calls - calls0
        used = getattr(c.opt, "backend_used", None)
        c.backend_used.add(used or "eager")


# %% results ------------------------------------------------------------------------------------------------


def ran(c: Cand) -> str:
    """What executed the step, in words."""
    if c.status != "ok":
        return "—"
    used = "/".join(sorted(c.backend_used)) or "eager"
    if c.impl == "eager":
        return "eager reference"
    two = c.two_sided / c.counted_steps if c.counted_steps else 0
    if c.rotation in DYNAMIC:
        if two:
            return f"{used}: two-sided kernel, {two:g} unit steps per step; bases eager"
        if c.impl == "ext":
            return f"{used}: {c.rotation} units on the eager reference (ext has no path for them)"
        return f"{used}: {c.rotation} units on the eager reference (the two-sided kernel did not run)"
    return used


# The shared helpers' copies had diverged; these keep this script's behaviour (see _common.py).
def _kept(c: Cand, xs: list[float]) -> tuple[list[float], bool]:
    return _common_kept(c, xs, all_quiet_ok=True)  # also quiet-only when every sample is quiet


def _q(xs: list[float], f: float) -> float | None:
    return _common_q(xs, f, empty_none=True)  # None for no samples


def _ms(x: float | None) -> str:
    return _common_ms(x, fine=True)  # 3 decimals below 0.1 ms


def _one_line(e: BaseException) -> str:
    return _common_one_line(e, cut_message_only=True)  # the message is cut to 300, not the whole string


def record(c: Cand, ps: ParamSet) -> dict:
    keep, noisy = _kept(c, c.times)
    cpu_keep = _kept(c, c.cpu)[0] if c.cpu else []
    return {
        "set": ps.name,
        "rotation": c.rotation,
        "kind": c.kind,
        "impl": c.impl,
        "period": c.period,
        "group": c.group,
        "status": c.status,
        "reason": c.reason,
        "median_ms": statistics.median(keep) if keep else None,
        "p20_ms": _q(keep, 0.2),
        "p80_ms": _q(keep, 0.8),
        "cpu_median_ms": statistics.median(cpu_keep) if cpu_keep else None,
        "reps": len(keep),
        "quiet_reps": sum(c.quiet),
        "noisy": noisy and bool(keep),
        "repeat": c.repeat,
        "steps_per_call": c.steps,
        "first_call_s": c.first_call_s,
        "backend_used": sorted(c.backend_used),
        "two_sided_per_step": c.two_sided / c.counted_steps if c.counted_steps else None,
        "ran": ran(c),
        "derived": False,
        "all_ms": c.times,
        "all_cpu_ms": c.cpu,
        "quiet": c.quiet,
        "foreign_cores": c.foreign,
    }


def amortized_rows(rows: list[dict], periods: dict[str, int]) -> list[dict]:
    """(refresh + (P - 1) steady) / P at the default period P, per (set, dynamic rotation, impl)."""
    by = {(r["set"], r["rotation"], r["kind"], r["impl"]): r for r in rows}
    out = []
    for r in rows:
        if r["kind"] != "steady":
            continue
        key = (r["set"], r["rotation"], "refresh", r["impl"])
        f = by.get(key)
        p = periods[r["rotation"]]
        new = {k: r[k] for k in ("set", "rotation", "impl")}
        new.update(
            kind="amortized",
            period=p,
            group="A+B",
            derived=True,
            ran=r["ran"],
            noisy=r["noisy"] or bool(f and f["noisy"]),
        )
        new.update(backend_used=r["backend_used"], two_sided_per_step=r["two_sided_per_step"])
        if r["median_ms"] is not None and f is not None and f["median_ms"] is not None:
            for k in ("median_ms", "p20_ms", "p80_ms", "cpu_median_ms"):
                new[k] = (f[k] + (p - 1) * r[k]) / p if f.get(k) is not None and r.get(k) is not None else None
            new.update(status="ok", reason=f"(refresh + {p - 1} steady) / {p}", reps=min(r["reps"], f["reps"]))
        else:
            why = r["reason"] if r["status"] != "ok" else (f["reason"] if f else "no refresh row")
            new.update(status=r["status"] if r["status"] != "ok" else (f["status"] if f else "skipped"), reason=why)
            new.update(median_ms=None, p20_ms=None, p80_ms=None, cpu_median_ms=None, reps=0)
        out.append(new)
    return out


def add_ratios(rows: list[dict]) -> None:
    """x_eager: median / the eager median of the same (set, rotation, kind); x_none: median / the none median of
    the same (set, impl)."""
    by = {(r["set"], r["rotation"], r["kind"], r["impl"]): r for r in rows}
    for r in rows:
        med = r.get("median_ms")
        eager = by.get((r["set"], r["rotation"], r["kind"], "eager"))
        none = by.get((r["set"], "none", "step", r["impl"]))
        r["x_eager"] = (
            med / eager["median_ms"] if med and r["impl"] != "eager" and eager and eager["median_ms"] else None
        )
        r["x_none"] = med / none["median_ms"] if med and none and none["median_ms"] else None


def _x(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def render(data: dict) -> str:
    m = data["meta"]
    cpu = m["device_type"] == "cpu"
    lines = [
        "# Dynamic bases: fused svd / eigen step vs the eager step",
        "",
        f"Command: `{m['command']}` ({m['date']}, {m['wall_s']:.0f} s). Device: {m['device']}; torch {m['torch']}, "
        f"triton {m['triton']}, git {m['git']}" + (f"; {m['threads']} torch thread(s)" if cpu else "") + ".",
    ]
    if m["dry_run"]:
        lines += ["", "**Dry run** (tiny shapes, 2 rounds): plumbing only, the figures mean nothing"
                  + (" (the triton rows ran in the Triton interpreter)." if m["interpret"] else ".")]  # fmt: skip
    if cpu:
        lines += [
            "",
            f"Medians of interleaved rounds after a warm-up (wall clock; `cpu` = process time per step). 1-minute "
            f"load {m['load1_before']:.2f} before, {m['load1_after']:.2f} after; a sample counts when other "
            f"processes used <= {m['max_foreign']} cores around it (medians over those when there are >= "
            f"{MIN_QUIET}; * = NOISY, all samples). {m['rounds_total']} rounds in all.",
        ]
    else:
        lines += ["", "CUDA events around each step (device synchronised first), medians of interleaved rounds."]
    for name, s in data["sets"].items():
        rows = [r for r in data["rows"] if r["set"] == name]
        impls = [i for i in IMPLS if any(r["impl"] == i and r["status"] == "ok" for r in rows)]
        fused = [i for i in impls if i != "eager"]
        lines += ["", f"## {name}: {s['params']:,} params in {s['tensors']} matrices", "", s["description"] + ".", ""]
        head = ["rotation", "step", "period"] + [f"{i} ms (p20–p80)" for i in impls]
        head += [f"{i} x eager" for i in fused] + [f"{i} x none" for i in impls] + [f"{i} ran" for i in fused]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        by = {(r["rotation"], r["kind"], r["impl"]): r for r in rows}
        for rot in ROTATIONS:
            for kind in KINDS:
                cells = [by.get((rot, kind, i)) for i in impls]
                if not any(cells):
                    continue
                period = next((c["period"] for c in cells if c), None)
                ptxt = "—" if period is None else ("never" if period == NEVER else f"{period:,}")
                row = [rot, kind + (" (derived)" if kind == "amortized" else ""), ptxt]
                for c in cells:
                    if c is None:
                        row.append("—")
                    elif c["median_ms"] is None:
                        row.append(c["status"])
                    else:
                        star = "*" if c.get("noisy") else ""
                        spread = f" ({_ms(c['p20_ms'])}–{_ms(c['p80_ms'])})" if c.get("p20_ms") is not None else ""
                        extra = f", cpu {_ms(c['cpu_median_ms'])}" if cpu and c.get("cpu_median_ms") else ""
                        row.append(f"{_ms(c['median_ms'])}{star}{spread}{extra}")
                row += [_x(by[(rot, kind, i)]["x_eager"]) if (rot, kind, i) in by else "—" for i in fused]
                row += [_x(by[(rot, kind, i)]["x_none"]) if (rot, kind, i) in by else "—" for i in impls]
                row += [by[(rot, kind, i)]["ran"] if (rot, kind, i) in by else "—" for i in fused]
                lines.append("| " + " | ".join(row) + " |")
        first = [r for r in rows if r.get("first_call_s") is not None and r["kind"] in ("steady", "step")]
        if first:
            lines += ["", "First step (state, first basis), s: " + ", ".join(
                f"{r['impl']} {r['rotation']} {r['first_call_s']:.2f}" for r in first) + "."]  # fmt: skip
    why: dict[str, list[str]] = {}
    for r in data["rows"]:
        if r["status"] != "ok" and not r.get("derived"):
            why.setdefault(f"{r['status']}: {r['reason']}", []).append(f"{r['impl']} {r['rotation']} {r['kind']}")
    if why:
        lines += ["", "Not measured: " + "; ".join(f"{', '.join(v)} ({k})" for k, v in why.items()) + "."]
    for s in data["skipped"]:
        lines.append(f"- cut: {s['phase']} {s['what']}: {s['reason']}")
    if data["errors"]:
        lines += ["", "Errors: " + "; ".join(f"{e['candidate']}: {e['error']}" for e in data["errors"])]
    lines += [
        "",
        "Kinds: steady = a step that keeps the basis (period 10^9 after the first step); refresh = every step "
        "recomputes it (period 1); amortized = (refresh + (P - 1) steady) / P at RotatedAdamW's default period P; "
        "period = measured at P, each sample the mean of P consecutive steps. x eager: median / the eager median of "
        "the same row; x none: median / the same implementation's rotation=none step. Basis management (SVD, eigh, "
        "QR, moment transport) is eager torch on every backend; ext has no path for svd / eigen units, so its rows "
        "for them run the eager reference.",
        "",
    ]
    return "\n".join(lines)


# %% main ---------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/latest", help="folder for <name>.json and <name>.md")
    ap.add_argument("--name", default="bench_bases", help="output file stem (default bench_bases)")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, 2 rounds, no waiting: plumbing")
    ap.add_argument("--budget-seconds", type=float, default=300.0, help="cap on the whole run (default 300)")
    ap.add_argument("--rotations", default=",".join(ROTATIONS), help="default none,output,svd,eigen")
    ap.add_argument(
        "--impls", default=",".join(IMPLS), help="default eager,triton,ext (those that cannot run: skipped)"
    )
    ap.add_argument("--layers", type=int, default=None, help="GPT layers (default 12 on CUDA, 4 on the CPU)")
    ap.add_argument("--n-embd", type=int, default=None, help="GPT width (default 768 on CUDA, 256 on the CPU)")
    ap.add_argument("--block-size", type=int, default=None, help="output scope's block size n (default n_embd)")
    ap.add_argument("--precision", default="tf32x3", help="triton rows' tl.dot precision (default tf32x3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    ap.add_argument("--rounds", type=int, default=None, help="(quiet) rounds wanted per group (default 7; dry 2)")
    ap.add_argument("--max-rounds", type=int, default=None, help="rounds at most per group (default 2 x --rounds)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds after the first calls (default 1)")
    ap.add_argument("--max-measured-period", type=int, default=10, help="measure 'period' rows up to this P")
    ap.add_argument("--min-sample-ms", type=float, default=50.0, help="CPU: shorter steps repeat within a sample")
    ap.add_argument("--max-foreign", type=float, default=0.5, help="CPU: cores others may use around a quiet sample")
    ap.add_argument("--max-extra-load", type=float, default=1.0, help="CPU: wait for 1-min load <= threads + this")
    ap.add_argument("--wait-quiet", type=float, default=20.0, help="CPU: seconds to wait for quiet before a round")
    ap.add_argument("--window", type=float, default=1.0, help="CPU: seconds of the load window around a sample")
    args = ap.parse_args(argv)
    for opt, valid in (("rotations", ROTATIONS), ("impls", IMPLS)):
        bad = [x for x in getattr(args, opt).split(",") if x and x not in valid]
        if bad:
            ap.error(f"--{opt}: unknown {bad}; choose from {', '.join(valid)}")
    if args.dry_run:
        args.device = "cpu"
        args.rounds = args.rounds or 2
        args.max_rounds = args.max_rounds or args.rounds
        args.wait_quiet, args.window, args.min_sample_ms = 0.0, min(args.window, 0.05), min(args.min_sample_ms, 1.0)
    args.rounds = args.rounds or 7
    args.max_rounds = args.max_rounds or 2 * args.rounds
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = _T0 if argv is None else time.perf_counter()
    budget = Budget(args.budget_seconds, t0)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and interpret_mode():
        print("bench_bases: TRITON_INTERPRET=1 is set; unset it to time the compiled kernels on the GPU.")
        return 2
    cfg = CONFIGS["dry" if args.dry_run else device.type]
    n_embd = args.n_embd or cfg.n_embd
    cfg = dataclasses.replace(cfg, n_layer=args.layers or cfg.n_layer, n_embd=n_embd, n_head=max(1, n_embd // 64))
    args.block_size = args.block_size or n_embd
    old_threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.set_float32_matmul_precision("highest")
    env = environment(device)
    env["gpu"] = device_name(device)  # bench_step tags every CPU run as its dry run
    if device.type == "cpu":
        cpu_env = cpu_environment()
        env.update(cpu=cpu_env["cpu"], cores=cpu_env["cores"], ext_isa=cpu_env["isa"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmd = " ".join(["python", "benchmarks/bench_bases.py", *(argv if argv is not None else sys.argv[1:])])
    name = ("gpt-tiny" if args.dry_run else "gpt2-124m" if device.type == "cuda" else "gpt-cpu") + "-blocks"
    load_before = os.getloadavg()[0]
    print(f"bench_bases: {env['gpu']} | torch {env['torch']} | triton {env['triton']} | git {env['git']} | "
          f"budget {args.budget_seconds:.0f} s")  # fmt: skip
    runner = Runner(args, device, budget)
    periods = default_periods()
    data: dict = {"schema": SCHEMA, "sets": {}, "rows": [], "rounds": [], "skipped": [], "errors": []}

    def save(rows: list[dict], complete: bool) -> dict:
        rows = rows + amortized_rows(rows, periods)
        add_ratios(rows)
        data["rows"] = rows
        data["rounds"] = runner.rounds
        data["skipped"] = budget.skipped
        data["errors"] = runner.errors
        data["meta"] = {
            **env,
            "device": env["gpu"],
            "device_type": device.type,
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "command": cmd,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": budget.used(),
            "complete": complete,
            "dry_run": args.dry_run,
            "interpret": interpret_mode(),
            "ext_built": ext_available(),
            "budget_s": args.budget_seconds,
            "hyper": {k: list(v) if isinstance(v, tuple) else v for k, v in HYPER.items()},
            "block_size": args.block_size,
            "precision": args.precision,
            "default_periods": periods,
            "load1_before": load_before,
            "load1_after": os.getloadavg()[0],
            "load_measure": "proc" if runner.meter.available else "unavailable",
            "rounds_total": len(runner.rounds),
            **{k: getattr(args, k) for k in ("rounds", "max_rounds", "warmup", "max_foreign", "wait_quiet", "window")},
            "min_sample_ms": args.min_sample_ms,
        }
        write_json(out / f"{args.name}.json", data)
        (out / f"{args.name}.md").write_text(render(data))
        return data

    try:
        ps = build_set(cfg, device, name)
        data["sets"][name] = ps.summary() | {"config": str(cfg)}
        print(f"  {name}: {ps.d:,} params, {len(ps.params)} matrices; building the optimizers", flush=True)
        cands = make_cands(ps, args, device)
        grads = Grads(ps.params, 2 if device.type == "cpu" else None)
        shares = {"A": 0.3, "B": 0.5, "C": 1.0}  # of the budget left when the group starts (C: all of it)
        for group in ("A", "B", "C"):
            members = [c for c in cands if c.group == group and c.status == "ok"]
            if not members:
                continue
            left = budget.left()
            need = (2 + args.warmup) * sum(estimate_s(c, cands) for c in members)  # first call, warm-up, a round
            if left < 5 or need > left:
                why = (
                    f"budget: {max(left, 0):.0f} s left, group {group} needs ~{need:.0f} s (first call, warm-up, round)"
                )
                for c in members:
                    c.fail("skipped", why)
                budget.skip(f"group {group}", ", ".join(c.name for c in members), why)
                continue
            deadline = time.perf_counter() + shares[group] * left - (5 if group == "C" else 0)
            runner.run(members, grads, group, deadline)
            for c in members:
                c.opt = None  # free the state of a finished group
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save([record(c, ps) for c in cands], False)
        grads.release()
        data = save([record(c, ps) for c in cands], True)
    finally:
        torch.set_num_threads(old_threads)
    for r in data["rows"]:
        if r["median_ms"] is not None:
            print(f"  {r['impl']:6s} {r['rotation']:6s} {r['kind']:9s} {r['median_ms']:10.3f} ms  x eager "
                  f"{_x(r['x_eager']):>6s}  x none {_x(r['x_none']):>7s}  {r['ran']}")  # fmt: skip
    print(f"wrote {out / (args.name + '.md')} and .json in {budget.used():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

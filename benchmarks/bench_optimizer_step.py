"""Optimizer step time on GPT-2 124M parameter shapes, against floors measured in the same run.

    python benchmarks/bench_optimizer_step.py --out benchmarks/results [--quick]

Rows: torch.optim.AdamW (fused / foreach / for-loop), RotatedAdamW (eager reference) per scope, and
FusedRotatedAdamW per scope x precision. All optimizers step the same fp32 params with fixed grads; steps
are timed with CUDA events, after warm-up, as the median of interleaved repetitions (each round steps
every row once, so drift in clocks or neighbours hits all rows alike).

Ceilings, measured in the same run: device copy bandwidth, random gather rate (index_select with a random
permutation of d elements), cuBLAS (b x 768) @ (768 x 768) in fp32 and TF32. A row's floor is
max(stream + gather, dot): stream = 28 bytes per parameter (read p, g, m, v; write p, m, v) at copy
bandwidth; gather = two random passes (gather g, scatter p) over the permuted coordinates at the measured
gather rate; dot = the rotations' FLOPs (4 nb^2 per block of nb) at the GEMM rate of the precision (tf32x3
counts three TF32 products). "of floor" = floor / time (1.0 = at the floor).

Writes bench_optimizer_step.csv and bench_optimizer_step.md (with GPU, versions, git sha) to --out.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rotkern import SCOPES, FusedRotatedAdamW, RotatedAdamW  # noqa: E402

PRECISIONS = ("tf32x3", "tf32", "ieee")
HYPER = dict(lr=1e-6, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
DEVICE = "cuda"  # --dry-run: "cpu" (the script's plumbing under the Triton interpreter; timings meaningless)


def gpt2_shapes(n_layer: int = 12, vocab: int = 50304, ctx: int = 1024, dim: int = 768) -> list[tuple[tuple, str]]:
    """nanoGPT GPT-2 parameters in named_parameters() order (no biases, tied head) with their roles."""
    block = [
        ((dim,), "vector"),  # ln_1
        ((3 * dim, dim), "qkv"),  # attn.c_attn
        ((dim, dim), "matrix"),  # attn.c_proj
        ((dim,), "vector"),  # ln_2
        ((4 * dim, dim), "matrix"),  # mlp.c_fc
        ((dim, 4 * dim), "matrix"),  # mlp.c_proj
    ]
    return [((vocab, dim), "embedding"), ((ctx, dim), "embedding")] + block * n_layer + [((dim,), "vector")]


# %% timing ------------------------------------------------------------------------------------------
def time_interleaved(fns: dict, reps: int, warmup: int) -> dict[str, list[float]]:
    """Median-ready per-call times (ms) of every fn, with rounds interleaving all of them."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        marks = []
        for name, fn in fns.items():
            start, end = _Mark(), _Mark()
            start.record()
            fn()
            end.record()
            marks.append((name, start, end))
        _sync()
        for name, start, end in marks:
            times[name].append(start.elapsed_time(end))
    return times


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class _Mark:
    """A CUDA event (host clock in --dry-run)."""

    def __init__(self) -> None:
        self.event = torch.cuda.Event(enable_timing=True) if DEVICE == "cuda" else None
        self.t = 0.0

    def record(self) -> None:
        if self.event is not None:
            self.event.record()
        else:
            self.t = time.perf_counter()

    def elapsed_time(self, end: _Mark) -> float:
        return self.event.elapsed_time(end.event) if self.event is not None else 1e3 * (end.t - self.t)


def ceilings(d: int, n: int, reps: int) -> dict[str, float]:
    src = torch.randn(d, device=DEVICE)
    dst = torch.empty_like(src)
    perm = torch.randperm(d, device=DEVICE)
    b = d // n
    x = torch.randn(b, n, device=DEVICE)
    r = torch.randn(n, n, device=DEVICE)
    out = torch.empty(b, n, device=DEVICE)

    def gemm(tf32: bool):
        def run():
            torch.backends.cuda.matmul.allow_tf32 = tf32
            torch.mm(x, r, out=out)

        return run

    t = time_interleaved(
        {
            "copy": lambda: dst.copy_(src),
            "gather": lambda: torch.index_select(src, 0, perm, out=dst),
            "gemm_fp32": gemm(False),
            "gemm_tf32": gemm(True),
        },
        reps,
        warmup=3,
    )
    torch.backends.cuda.matmul.allow_tf32 = False
    med = {k: statistics.median(v) for k, v in t.items()}
    flops = 2.0 * b * n * n
    return {
        "copy_GBps": 2 * 4 * d / med["copy"] / 1e6,
        "gather_ms_per_d": med["gather"],  # index_select of d fp32 elements
        "gather_Gelem_per_s": d / med["gather"] / 1e6,
        "fp32_TFLOPs": flops / med["gemm_fp32"] / 1e9,
        "tf32_TFLOPs": flops / med["gemm_tf32"] / 1e9,
        "copy_ms": med["copy"],
    }


# %% floors ------------------------------------------------------------------------------------------
def rotation_work(opt: RotatedAdamW) -> tuple[float, float]:
    """(FLOPs of both rotations, fraction of coordinates behind a permutation) of one step."""
    flops, permuted, total = 0.0, 0, 0
    for gi in range(len(opt.param_groups)):
        for u in opt.units(gi):
            k, length = u.shape
            total += k * length
            if u.rotation is None:
                continue
            rot = u.rotation
            blocks = [rot.block_size] * rot.num_blocks + ([rot.residual] if rot.residual else [])
            flops += k * sum(4.0 * nb * nb for nb in blocks)  # forward + back, 2 nb^2 each
            if rot.perm_stream is not None:
                permuted += k * length
    return flops, permuted / max(total, 1)


def floor_ms(d: int, ceil: dict, flops: float = 0.0, permuted: float = 0.0, precision: str | None = None) -> float:
    stream = 28.0 * d / ceil["copy_GBps"] / 1e6
    gather = 2.0 * permuted * ceil["gather_ms_per_d"]
    rate = {"ieee": ceil["fp32_TFLOPs"], "tf32": ceil["tf32_TFLOPs"], "tf32x3": ceil["tf32_TFLOPs"] / 3}
    dot = flops / rate[precision] / 1e9 if precision and flops else 0.0
    return max(stream + gather, dot)


# %% main --------------------------------------------------------------------------------------------
def environment() -> dict[str, str]:
    sha = "unknown"
    try:
        sha = (ROOT / ".gitsha").read_text().strip() if (ROOT / ".gitsha").exists() else ""
        sha = (
            sha
            or subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "triton": triton_version,
        "python": platform.python_version(),
        "git": sha,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results", help="directory for the CSV and markdown")
    ap.add_argument("--quick", action="store_true", help="2 layers, vocab 8192, fewer repetitions")
    ap.add_argument("--reps", type=int, default=None, help="interleaved rounds (default 25, quick 5)")
    ap.add_argument("--scopes", default=",".join(SCOPES), help="comma-separated scopes")
    ap.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated fused precisions")
    ap.add_argument("--no-eager", action="store_true", help="skip the eager RotatedAdamW rows")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    args = ap.parse_args(argv)
    global DEVICE
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if args.dry_run:
        if not interpret:
            print("bench_optimizer_step: --dry-run runs the kernels through the interpreter: set TRITON_INTERPRET=1")
            return 2
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        print("bench_optimizer_step: no CUDA device here; the benchmark needs a GPU. Nothing to do.")
        return 0
    elif interpret:
        print("bench_optimizer_step: TRITON_INTERPRET=1 is set; unset it to benchmark compiled kernels.")
        return 2
    t_start = time.perf_counter()
    reps = args.reps or (2 if args.dry_run else 5 if args.quick else 25)
    scopes = [s for s in args.scopes.split(",") if s]
    precisions = [p for p in args.precisions.split(",") if p]
    n = 768
    if args.dry_run:
        n = 32
        shapes = gpt2_shapes(n_layer=1, vocab=96, ctx=40, dim=n)
    else:
        shapes = gpt2_shapes(n_layer=2, vocab=8192) if args.quick else gpt2_shapes()
    torch.manual_seed(0)
    params = [torch.randn(s, device=DEVICE) * 0.02 for s, _ in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    d = sum(p.numel() for p in params)
    group = {"params": params, "roles": [r for _, r in shapes], "decay_mask": [p.dim() >= 2 for p in params]}
    env = environment()
    print(f"bench_optimizer_step: {env['gpu']} | torch {env['torch']} | triton {env['triton']} | git {env['git']}")
    print(f"d = {d:,} params in {len(params)} tensors, block n = {n}, {reps} interleaved rounds")

    ceil = ceilings(d, n, reps)
    print(
        f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s | random gather {ceil['gather_Gelem_per_s']:.2f} Gelem/s "
        f"({ceil['gather_ms_per_d']:.2f} ms per d) | GEMM fp32 {ceil['fp32_TFLOPs']:.1f} TFLOP/s, "
        f"tf32 {ceil['tf32_TFLOPs']:.1f} TFLOP/s"
    )

    rows: dict[str, dict] = {}
    fns: dict[str, callable] = {}
    for impl, kw in (("fused", dict(fused=True)), ("foreach", dict(foreach=True)), ("for-loop", dict(foreach=False))):
        opt = torch.optim.AdamW(params, **HYPER, **kw)
        name = f"torch AdamW {impl}"
        fns[name] = opt.step
        rows[name] = dict(
            optimizer="torch.optim.AdamW", impl=impl, scope="none", precision="fp32", floor=floor_ms(d, ceil)
        )

    def rotated(cls, scope, **kw):
        return cls([dict(group)], **HYPER, rotation=scope, block_size=n, seed=0, **kw)

    for scope in scopes:
        if not args.no_eager:
            opt = rotated(RotatedAdamW, scope)
            flops, permuted = rotation_work(opt)
            name = f"RotatedAdamW eager {scope}"
            fns[name] = opt.step
            rows[name] = dict(
                optimizer="RotatedAdamW", impl="eager", scope=scope, precision="fp32",
                floor=floor_ms(d, ceil, flops, permuted, "ieee"),
            )  # fmt: skip
        fused = rotated(FusedRotatedAdamW, scope, backend="triton")
        flops, permuted = rotation_work(fused)
        for prec in precisions if scope != "none" else precisions[:1]:
            name = f"FusedRotatedAdamW {scope}" + (f" {prec}" if scope != "none" else "")

            def step(opt=fused, prec=prec):
                opt.precision = prec  # one optimizer (one cached plan) per scope, every precision
                opt.step()

            fns[name] = step
            rows[name] = dict(
                optimizer="FusedRotatedAdamW", impl="triton", scope=scope, precision=prec if scope != "none" else "-",
                floor=floor_ms(d, ceil, flops, permuted, prec),
            )  # fmt: skip
    print(f"timing {len(fns)} rows (warm-up builds plans and compiles kernels)...")
    times = time_interleaved(fns, reps, warmup=3)
    fused_adamw = statistics.median(times["torch AdamW fused"])
    for name, row in rows.items():
        t = times[name]
        row.update(
            name=name,
            median_ms=statistics.median(t),
            p20_ms=sorted(t)[len(t) // 5],
            p80_ms=sorted(t)[min(len(t) - 1, (4 * len(t)) // 5)],
            of_floor=row["floor"] / statistics.median(t),
            vs_fused_adamw=statistics.median(t) / fused_adamw,
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fields = ["name", "optimizer", "impl", "scope", "precision", "median_ms", "p20_ms", "p80_ms", "floor",
              "of_floor", "vs_fused_adamw"]  # fmt: skip
    with open(out / "bench_optimizer_step.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows.values():
            w.writerow({k: (f"{row[k]:.4f}" if isinstance(row[k], float) else row[k]) for k in fields})
    lines = [
        "# Optimizer step, GPT-2 124M shapes"
        + (" (--quick)" if args.quick else " (--dry-run)" if args.dry_run else ""),
        "",
        f"{env['gpu']}; torch {env['torch']} (CUDA {env['cuda']}); triton {env['triton']}; python {env['python']}; "
        f"git {env['git']}. d = {d:,}, n = {n}, fp32 params, median of {reps} interleaved rounds.",
        "",
        f"Ceilings (same run): copy {ceil['copy_GBps']:.0f} GB/s; random gather {ceil['gather_ms_per_d']:.2f} ms per "
        f"d elements; cuBLAS (b x {n})@({n} x {n}) fp32 {ceil['fp32_TFLOPs']:.1f} TFLOP/s, tf32 "
        f"{ceil['tf32_TFLOPs']:.1f} TFLOP/s. Floor = max(stream + gather, dot) (see the script's docstring).",
        "",
        "| row | median ms | p20-p80 ms | floor ms | of floor | vs fused AdamW |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows.values():
        lines.append(
            f"| {row['name']} | {row['median_ms']:.3f} | {row['p20_ms']:.3f}-{row['p80_ms']:.3f} | {row['floor']:.3f} "
            f"| {row['of_floor']:.2f} | {row['vs_fused_adamw']:.2f}x |"
        )
    (out / "bench_optimizer_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[6:]))
    print(f"wrote {out / 'bench_optimizer_step.csv'} and .md in {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

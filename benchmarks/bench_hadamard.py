"""Randomized Hadamard vs dense Haar blocks: the eager rotation of one scope's units, same reach.

For each parameter count d and block size n: ``BlockRotation.rotate`` then ``unrotate`` of a global unit (one
vector of length d, permuted) and of a GPT-shaped matrix's output-wise rows, once with Haar blocks (one
(rows x n) @ (n x n) GEMM per block row: 2 n flops per element each way) and once with
``structure="hadamard"`` (the fast transform: log2(n) butterfly passes). Candidates interleaved in one
process, warm-up first, medians of ``--rounds`` rounds; CPU or CUDA (CUDA events). Writes
``results/hadamard.{json,md}``.

    python benchmarks/bench_hadamard.py                       # d = 4M and 16M, n = 256 and 1024, CPU
    python benchmarks/bench_hadamard.py --sizes 1000000 --rounds 3 --out /tmp/h   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from rotkern.rotations import BlockRotation

HERE = Path(__file__).resolve().parent


def _timer(device: torch.device):
    if device.type == "cuda":

        def run(fn) -> float:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop)

        return run

    def run_cpu(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return run_cpu


def cases(d: int, n: int, device: torch.device) -> dict:
    """name -> a callable doing rotate + unrotate of the scope's units with that structure."""
    out = {}
    rows = max(d // (4 * 768), 1)  # an output-wise (rows, 4 * 768) weight: each row its own unit vector
    for structure in ("haar", "hadamard"):
        flat = BlockRotation(d, n, 0, perm_stream=("bench",), structure=structure)
        x = torch.randn(1, d, device=device)
        flat.permutation(device)  # built outside the timing (cached)
        row = BlockRotation(4 * 768, n, 0, perm_stream=("row",), structure=structure)
        xr = torch.randn(rows, 4 * 768, device=device)
        row.permutation(device)
        out[f"global {structure}"] = lambda r=flat, x=x: r.unrotate(r.rotate(x))
        out[f"output {structure}"] = lambda r=row, x=xr: r.unrotate(r.rotate(x))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="4000000,16000000")
    p.add_argument("--blocks", default="256,1024")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(HERE / "results"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    run = _timer(device)
    load_before = os.getloadavg()[0]
    rows = []
    for d in map(int, args.sizes.split(",")):
        for n in map(int, args.blocks.split(",")):
            fns = cases(d, n, device)
            for fn in fns.values():
                fn()  # warm-up (and any lazy construction)
            times: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(args.rounds):
                for name, fn in fns.items():
                    times[name].append(run(fn))
            med = {k: statistics.median(v) for k, v in times.items()}
            for scope in ("global", "output"):
                haar, had = med[f"{scope} haar"], med[f"{scope} hadamard"]
                samples = {k: v for k, v in times.items() if scope in k}
                row = dict(d=d, n=n, scope=scope, haar_ms=haar, hadamard_ms=had, speedup=haar / had)
                rows.append({**row, "samples": samples})
                print(f"d={d:,} n={n} {scope}: haar {haar:.1f} ms, hadamard {had:.1f} ms ({haar / had:.2f}x)")
    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": args.threads if device.type == "cpu" else None,
        "torch": torch.__version__,
        "command": "python benchmarks/bench_hadamard.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rounds": args.rounds,
        "load1_before": load_before,
        "load1_after": os.getloadavg()[0],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hadamard.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# Randomized Hadamard vs Haar blocks: eager rotate + unrotate, same reach",
        "",
        f"Command: `{meta['command'].strip()}` ({meta['date']}); {meta['device']}, torch {meta['torch']}"
        + (f", {args.threads} thread(s)" if device.type == "cpu" else "")
        + f". Medians of {args.rounds} interleaved rounds after a warm-up; 1-minute load {meta['load1_before']:.2f}"
        f" before, {meta['load1_after']:.2f} after.",
        "",
        "| d | n | scope | Haar (ms) | Hadamard (ms) | Haar / Hadamard |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = f"{r['haar_ms']:.1f} | {r['hadamard_ms']:.1f}"
        lines.append(f"| {r['d']:,} | {r['n']} | {r['scope']} | {ms} | {r['speedup']:.2f}x |")
    (out / "hadamard.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

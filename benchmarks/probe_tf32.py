"""TF32 probe: the signed bias of each TF32 product against float64, on the device that runs it.

Why: Triton's ``tl.dot(..., input_precision="tf32")`` passes its fp32 operands to the tensor cores as they are,
and the tensor cores read their top 19 bits (truncation toward zero: about -2^-11 per operand, -2^-10 on every
product), while cuBLAS under ``allow_tf32`` rounds to nearest. rotkern's ``precision="tf32"`` therefore rounds
its dot operands to the nearest tf32 first (``rotkern.kernels._tl.round_tf32``). This probe measures, for X R^T
with X (rows, n) standard normal and R a Haar block of rotkern's (n = 768):

    cublas-fp32     torch.matmul, allow_tf32 off (the fp32 baseline)
    cublas-tf32     torch.matmul, allow_tf32 on
    triton-tf32     a Triton dot, input_precision="tf32", operands as they are (truncated by the hardware)
    triton-tf32-rn  the same dot on operands rounded to nearest first (what rotkern's kernels do)
    emulated-trunc  fp64 product of operands truncated to tf32 on the host (what the hardware is expected to do)
    emulated-rn     fp64 product of operands rounded to nearest tf32

and, for rotkern's own step at precision="tf32" (output scope: rows read in place; global: staged through the
workspace), the rotated gradient of its first step (exp_avg / (1 - beta1) from zero state) against the float64
rotation, and the update of its third step against the float64 unrotation of its own u (from its stored
moments). Per row: bias = sum((y - y64) sign(y64)) / sum|y64| (negative: shrunk toward zero) and the relative
RMS error ||y - y64|| / ||y64||. An unbiased product has |bias| well below its RMS error.

    python benchmarks/probe_tf32.py [--out DIR]           # on a GPU
    TRITON_INTERPRET=1 python benchmarks/probe_tf32.py --dry-run --out DIR   # CPU plumbing: the interpreter's
        dots are fp32, so there only the emulated rows and rotkern's rounded step show TF32 behaviour

Writes DIR/tf32_probe.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from rotkern import FusedRotatedAdamW  # noqa: E402
from rotkern.kernels._tl import round_tf32 as _round_tf32  # noqa: E402
from rotkern.kernels.reference import round_to_tf32  # noqa: E402
from rotkern.optim._base import moment  # noqa: E402
from rotkern.rotations import haar_orthogonal  # noqa: E402
from rotkern.trainers.common import device_name, versions  # noqa: E402


@triton.jit
def _dot_kernel(
    x_ptr,  # fp32 (M, K), row-major
    r_ptr,  # fp32 (N, K), row-major: the product is X R^T
    y_ptr,  # fp32 (M, N)
    M,
    N,
    K,
    ROUND: tl.constexpr,  # round the operands to the nearest tf32 before the dot
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of Y = X R^T with a tf32 dot."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        rt = tl.load(r_ptr + cols[None, :] * K + ks[:, None], mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0)
        if ROUND:
            x = _round_tf32(x)
            rt = _round_tf32(rt)
        acc = tl.dot(x, rt, acc, input_precision="tf32")
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc, mask=(rows[:, None] < M) & (cols[None, :] < N))


def triton_dot(x: torch.Tensor, r: torch.Tensor, round_operands: bool) -> torch.Tensor:
    """X R^T through ``_dot_kernel``. x: (M, K) fp32, r: (N, K) fp32 -> (M, N) fp32."""
    m, k = x.shape
    n = r.shape[0]
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, 64), triton.cdiv(n, 64))
    _dot_kernel[grid](x, r, y, m, n, k, ROUND=round_operands, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
    return y


def truncate_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> tf32 by dropping the 13 low mantissa bits (toward zero), as the tensor cores read fp32 registers."""
    return (x.contiguous().view(torch.int32) & -0x2000).view(torch.float32)


def bias_and_rms(y: torch.Tensor, y64: torch.Tensor) -> dict:
    y, y64 = y.double().reshape(-1).cpu(), y64.double().reshape(-1).cpu()
    diff = y - y64
    return {
        "bias": (diff * torch.sign(y64)).sum().item() / y64.abs().sum().item(),
        "rel_rms": (diff.norm() / y64.norm()).item(),
    }


def probe_products(device: torch.device, rows: int, n: int) -> dict[str, dict]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    r = haar_orthogonal(n, 0, dtype=torch.float64)
    y64 = x @ r.T
    xf, rf = x.float().to(device), r.float().to(device)
    out = {}
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        out["cublas-fp32"] = bias_and_rms(xf @ rf.T, y64)
        torch.backends.cuda.matmul.allow_tf32 = True
        out["cublas-tf32"] = bias_and_rms(xf @ rf.T, y64)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    out["triton-tf32"] = bias_and_rms(triton_dot(xf, rf, False), y64)
    out["triton-tf32-rn"] = bias_and_rms(triton_dot(xf, rf, True), y64)
    xc, rc = x.float(), r.float()
    out["emulated-trunc"] = bias_and_rms(truncate_to_tf32(xc).double() @ truncate_to_tf32(rc).double().T, y64)
    out["emulated-rn"] = bias_and_rms(round_to_tf32(xc).double() @ round_to_tf32(rc).double().T, y64)
    return out


def probe_step(device: torch.device, scope: str, shape: tuple[int, int], n: int, steps: int = 3) -> dict[str, dict]:
    """FusedRotatedAdamW at precision="tf32" from zero state: the rotated gradient of its first step, and the update
    of its last one (by then |u| varies: a first step's u = +-(1 - beta1) is one constant, whose own rounding
    would read as a bias)."""
    gen = torch.Generator().manual_seed(1)
    lr, beta1, beta2, eps = 1e-3, 0.9, 0.95, 1e-8
    p = torch.randn(shape, generator=gen).to(device)
    opt = FusedRotatedAdamW([p], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=0.0, rotation=scope,
                            block_size=n, backend="triton", precision="tf32")  # fmt: skip
    unit = opt.units(0)[0]
    rot = unit.rotation
    out = {}
    for t in range(1, steps + 1):
        g = torch.randn(shape, generator=gen)
        p.grad = g.to(device)
        before = p.double().cpu().reshape(-1)
        opt.step()
        state = {k: unit.view([moment(opt.state[p], k).double().cpu().reshape(-1)]) for k in ("exp_avg", "exp_avg_sq")}
        if t == 1:  # exp_avg = (1 - beta1) g~ exactly: the kernel's rotation of g, in the moments' layout
            y64 = rot.rotate(unit.view([g.double().reshape(-1)]))
            out[f"rotkern-{scope}-g~"] = bias_and_rms(moment(state, "exp_avg") / (1 - beta1), y64)
    # The unrotation alone: float64 R^T on the kernel's own u (from its stored moments, its formula), so that what is
    # measured is the dot's rounding, not the sign flips the rotation's rounding causes in u.
    u64 = moment(state, "exp_avg") / (moment(state, "exp_avg_sq").sqrt() / (1 - beta2**steps) ** 0.5 + eps)
    delta64 = torch.zeros_like(before)
    unit.write([delta64], -lr / (1 - beta1**steps) * rot.unrotate(u64))
    out[f"rotkern-{scope}-update"] = bias_and_rms(p.double().cpu().reshape(-1) - before, delta64)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/latest", help="folder for tf32_probe.json")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    if args.dry_run:
        device, rows, n, shape = torch.device("cpu"), 64, 32, (40, 64)
    elif torch.cuda.is_available():
        device, rows, n, shape = torch.device("cuda"), 8192, 768, (3072, 768)
    else:
        print("probe_tf32: no CUDA device here (use --dry-run with TRITON_INTERPRET=1 on a CPU)")
        return 0
    results = probe_products(device, rows, n)
    for scope in ("output", "global"):
        results.update(probe_step(device, scope, shape, n))
    record = {"device": device_name(device), **versions(), "rows": rows, "n": n, "step_shape": shape,
              "results": results}  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tf32_probe.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"tf32 probe on {record['device']} (X: {rows} x {n}, R: Haar {n}; rotkern step on {shape}):")
    print("| product | signed bias | relative RMS error |\n|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['bias']:+.2e} | {r['rel_rms']:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

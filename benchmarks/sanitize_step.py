"""One small FusedRotatedAdamW step per scope, to run under ``compute-sanitizer`` (benchmarks/gpu_run.sh).

    compute-sanitizer --tool memcheck python benchmarks/sanitize_step.py [--scopes none,output,global]
    compute-sanitizer --tool racecheck python benchmarks/sanitize_step.py
    TRITON_INTERPRET=1 python benchmarks/sanitize_step.py --dry-run       # the same steps on the CPU

Small on purpose (the sanitizers slow every access by orders of magnitude) but with every access pattern the
kernels have: a fused QKV weight with only its k third rotated (an identity piece starting at element 1089, off
any 16-byte boundary: the partial chunk before the aligned ones), rows and columns with residual blocks (n = 24),
a vector, fp32 and bf16 params, amsgrad, two steps (the second reuses the cached plan and workspace). Each step is
checked against the eager reference, so a step that the sanitizer passes but computes wrong still fails. Run it
with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so every tensor is its own allocation (memcheck cannot see an access
past a tensor into the caching allocator's next block otherwise); gpu_run.sh does.

Prints one ``sanitize_step: <scope> <dtype> ok`` line per step; exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from rotkern import FusedRotatedAdamW, RotatedAdamW  # noqa: E402

SHAPES = [((99, 33), "qkv"), ((40, 30), "matrix"), ((30, 40), "matrix"), ((30,), "vector")]


def _group(params, pieces: str, scope: str) -> dict:
    group = {"params": params, "roles": [r for _, r in SHAPES], "decay_mask": [p.dim() >= 2 for p in params]}
    if scope != "none":
        group["qkv_pieces"] = pieces
    return group


def step_once(scope: str, dtype: torch.dtype, device: torch.device) -> float:
    """Two fused steps against the eager reference; returns the largest parameter difference."""
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen).to(device, dtype) for s, _ in SHAPES]
    fused_p, eager_p = [p.clone() for p in init], [p.clone() for p in init]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, amsgrad=True, rotation=scope, block_size=24, seed=0)
    fused = FusedRotatedAdamW([_group(fused_p, "qv", scope)], backend="triton", **kw)
    eager = RotatedAdamW([_group(eager_p, "qv", scope)], **kw)
    for _ in range(2):
        grads = [torch.randn(s, generator=gen).to(device, dtype) for s, _ in SHAPES]
        for ps in (fused_p, eager_p):
            for p, g in zip(ps, grads, strict=True):
                p.grad = g.clone()
        fused.step()
        eager.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(fused_p, eager_p, strict=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scopes", default="none,output,global", help="scopes to step (default none,output,global)")
    ap.add_argument("--dry-run", action="store_true", help="CPU tensors (needs TRITON_INTERPRET=1)")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("sanitize_step: no CUDA device (use --dry-run with TRITON_INTERPRET=1 on a CPU)")
        return 2
    bad = 0
    for scope in args.scopes.split(","):
        for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2**-6)):
            diff = step_once(scope, dtype, device)
            ok = diff <= tol
            bad += not ok
            print(f"sanitize_step: {scope} {str(dtype).removeprefix('torch.')} {'ok' if ok else 'MISMATCH'} "
                  f"(max |fused - eager| = {diff:.2e}, limit {tol:g})", flush=True)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

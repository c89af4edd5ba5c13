"""Communication of a rotated optimizer step under FSDP2, per scope, measured with the profiler.

    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/fsdp_comm.py \
        [--model gpt-tiny] [--out benchmarks/results/fsdp_comm.md]

Every rank trains gpt-tiny (rotkern.trainers.models; each block its own FSDP unit, then the root) on the same
random tokens; after 2 warm-up steps one training step is profiled (torch.profiler, CPU activities): every
``c10d::`` collective of the forward + backward (FSDP's own: parameter all-gathers, gradient reduce-scatters) and
of ``opt.step()`` (rotkern's) is counted, with the bytes each rank contributes (input tensor elements x element
size). The unsharded optimizer step, one process, issues none. Rank 0 writes the markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rotkern import RotatedAdamW, param_groups_for  # noqa: E402
from rotkern.trainers.fsdp import shard_model  # noqa: E402
from rotkern.trainers.models import MODELS, build_model  # noqa: E402

SCOPES = ("none", "output", "input", "layer", "global", "input:gather", "layer:gather", "global:gather", "svd", "eigen")
ELEM_BYTES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8}


def collectives(prof) -> tuple[int, int]:
    """(count, bytes per rank) of the c10d collectives in a profile."""
    count, nbytes = 0, 0
    for e in prof.events():
        if not e.name.startswith("c10d::") or "barrier" in e.name:
            continue
        count += 1
        shapes, types = e.input_shapes or [], getattr(e, "input_dtypes", None) or []
        sent = shapes[1] if len(shapes) > 1 and shapes[1] else (shapes[0] if shapes else [])
        elem = ELEM_BYTES.get(types[1] if len(types) > 1 else (types[0] if types else "float"), 4)
        n = 1
        for d in sent:
            n *= d
        nbytes += n * elem
    return count, nbytes


def run_scope(spec: str, model_name: str) -> dict:
    scope, _, mode = spec.partition(":")
    cfg = MODELS[model_name]
    torch.manual_seed(0)
    model = shard_model(build_model(cfg))
    groups = param_groups_for(model, weight_decay=0.1)
    if mode:
        groups[0]["shard_mode"] = mode
    opt = RotatedAdamW(groups, lr=1e-3, rotation=scope, block_size=32, svd_every=1, precondition_every=1)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (4, cfg.block_size), generator=gen)

    def fwd_bwd():
        opt.zero_grad()
        model(x, x)[1].backward()

    for _ in range(2):
        fwd_bwd()
        opt.step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p1:
        fwd_bwd()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p2:
        opt.step()
    n_params = sum(p.numel() for p in model.parameters())
    return {"fsdp": collectives(p1), "step": collectives(p2), "params": n_params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt-tiny")
    ap.add_argument("--out", default="benchmarks/results/fsdp_comm.md")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    rows = {spec: run_scope(spec, args.model) for spec in SCOPES}
    if dist.get_rank() == 0:
        n = rows["none"]["params"]
        fb = rows["none"]["fsdp"]
        lines = [
            f"# Optimizer-step communication under FSDP2 ({args.model}, {n:,} params, {world} gloo ranks)",
            "",
            f"Command: `python -m torch.distributed.run --standalone --nproc_per_node={world} benchmarks/fsdp_comm.py"
            f" --model {args.model}`; torch {torch.__version__}. Bytes are what each rank contributes to the "
            "collectives of one step (profiler `c10d::` events); the unsharded step (one process) issues none. For "
            f"scale, FSDP's own forward + backward of the same step: {fb[0]} collectives, {fb[1]:,} bytes per rank.",
            "svd and eigen are measured at a basis recompute every step (svd_every = precondition_every = 1); "
            "their collectives are the same on the other steps.",
            "",
            "| scope | sharded semantics | collectives in opt.step() | bytes per rank | x FSDP fwd+bwd bytes |",
            "|---|---|---|---|---|",
        ]
        what = {
            "none": "shard-local, exact",
            "output": "rows shard-local, exact; the embedding (transposed reading) gathered",
            "input": "shard-local rotation",
            "layer": "shard-local rotation",
            "global": "shard-local rotation",
            "input:gather": "gathered, exact",
            "layer:gather": "gathered, exact",
            "global:gather": "gathered, exact",
            "svd": "gathered, exact",
            "eigen": "gathered, exact",
        }
        for spec, r in rows.items():
            c, b = r["step"]
            ratio = f"{b / fb[1]:.2f}" if fb[1] else "-"
            lines.append(f"| `{spec}` | {what[spec]} | {c} | {b:,} | {ratio} |")
        text = "\n".join(lines) + "\n"
        print(text)
        with open(args.out, "w") as f:
            f.write(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Worker of tests/test_fsdp.py: ``python -m torch.distributed.run --nproc_per_node=W tests/_fsdp_worker.py JOB OUT``.

Every rank trains a small GPT-style block (tests/optim/_models.TinyBlock, its parameters sharded on dim 0 by FSDP2
``fully_shard`` over a CPU mesh; gloo, on any machine) with a rotated optimizer on the same batches, and rank 0
writes what the test checks to OUT (a torch.save'd dict). The single-process reference trains an unsharded copy of
the same model on the same batches in the same process (every rank sees the same batch, so FSDP's averaged gradient
is the full-batch gradient).

Jobs:
    match SCOPES          per scope: 20 steps sharded and unsharded -> final params (full) of both
    resume SCOPE CKPT K   20 steps with a DCP save after K, then a fresh model+optimizer loads it and redoes
                          K+1..20 -> both final params; also the collectives of one optimizer step
    load SCOPE CKPT K     load a DCP checkpoint written by ``resume`` (another world size) -> the error, or the
                          final params after steps K+1..20
"""

from __future__ import annotations

import copy
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rotkern import FusedRotatedAdamW, RotatedAdamW, param_groups_for  # noqa: E402
from tests.optim._models import TinyBlock, batch_for, loss_of  # noqa: E402

STEPS = 20
KW = dict(lr=1e-2, betas=(0.9, 0.95), block_size=4, seed=3, svd_every=5, precondition_every=3)


def scope_options(spec: str) -> dict:
    """'layer' | 'layer:gather' | 'output:transposed' | 'svd' ... -> optimizer keyword arguments."""
    scope, _, mode = spec.partition(":")
    if mode == "transposed":  # the embedding orientation of the workshop text's B.1
        return {"rotation": scope, "embedding": mode}
    return {"rotation": scope, **({"shard_mode": mode} if mode else {})}


def build(spec: str, backend: str = "eager"):
    torch.manual_seed(0)
    model = TinyBlock(vocab=11, dim=8)
    ref = copy.deepcopy(model)
    # On the CPU on any machine: without a mesh FSDP shards over the accelerator's, moving the model onto CUDA
    # wherever a GPU is visible (and the test compares with the CPU reference, over gloo).
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in (model.c_attn, model.c_fc):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opts = scope_options(spec)
    mode = opts.pop("shard_mode", None)
    groups = param_groups_for(model, weight_decay=0.1)
    if mode:
        groups[0]["shard_mode"] = mode
    cls = FusedRotatedAdamW if backend != "eager" else RotatedAdamW
    extra = {"backend": backend} if backend != "eager" else {}
    opt = cls(groups, **KW, **opts, **extra)
    ref_opt = RotatedAdamW(param_groups_for(ref, weight_decay=0.1), **KW, **opts)
    return model, opt, ref, ref_opt


def batches(n: int):
    gen = torch.Generator().manual_seed(7)
    model = TinyBlock(vocab=11, dim=8)
    return [batch_for(model, gen) for _ in range(n)]


def train(model, opt, data) -> None:
    for b in data:
        opt.zero_grad()
        loss_of(model, b).backward()
        opt.step()


def full_params(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()
    }


class CommCounter:
    """Counts the collectives (and bytes, per rank) that go through torch.distributed while active."""

    NAMES = ("all_gather_into_tensor", "all_gather", "all_reduce", "reduce_scatter_tensor", "broadcast")

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        self._saved: dict = {}

    def __enter__(self):
        for name in self.NAMES:
            real = getattr(dist, name)
            self._saved[name] = real

            def wrapped(*args, _real=real, _name=name, **kwargs):
                t = args[0] if args and torch.is_tensor(args[0]) else kwargs.get("tensor", kwargs.get("output"))
                self.calls[_name] = self.calls.get(_name, 0) + 1
                if torch.is_tensor(t):
                    self.bytes[_name] = self.bytes.get(_name, 0) + t.numel() * t.element_size()
                return _real(*args, **kwargs)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for name, real in self._saved.items():
            setattr(dist, name, real)


def job_match(specs: list[str], backend: str) -> dict:
    out = {}
    data = batches(STEPS)
    for spec in specs:
        model, opt, ref, ref_opt = build(spec, backend)
        train(model, opt, data[:-1])
        with CommCounter() as comm:  # one optimizer step's collectives (the backward's are FSDP's own)
            opt.zero_grad()
            loss_of(model, data[-1]).backward()
            before = dict(comm.calls), dict(comm.bytes)
            opt.step()
        step_calls = {k: v - before[0].get(k, 0) for k, v in comm.calls.items() if v - before[0].get(k, 0)}
        step_bytes = {k: v - before[1].get(k, 0) for k, v in comm.bytes.items() if v - before[1].get(k, 0)}
        train(ref, ref_opt, data)
        out[spec] = {
            "sharded": full_params(model),
            "single": full_params(ref),
            "step_calls": step_calls,
            "step_bytes": step_bytes,
            "fwd_bwd_bytes": {k: v for k, v in before[1].items()},
            "steps": float(opt.state[next(iter(model.parameters()))]["step"]),
        }
    return out


def job_resume(spec: str, ckpt: str, k: int, backend: str) -> dict:
    data = batches(STEPS)
    model, opt, _, _ = build(spec, backend)
    train(model, opt, data[:k])
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
    train(model, opt, data[k:])
    straight = full_params(model)
    again, opt2, _, _ = build(spec, backend)
    msd, osd = get_state_dict(again, opt2)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(again, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(again, opt2, data[k:])
    return {"straight": straight, "resumed": full_params(again)}


def job_load(spec: str, ckpt: str, k: int, backend: str) -> dict:
    model, opt, _, _ = build(spec, backend)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    try:
        dcp.load(state, checkpoint_id=ckpt)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except Exception as exc:  # what the test checks: the message
        return {"error": f"{type(exc).__name__}: {exc}"}
    train(model, opt, batches(STEPS)[k:])
    return {"error": None, "params": full_params(model)}


def _detached(tree):
    """A deep copy of a state dict whose tensors no longer alias the live state (DTensors kept as DTensors)."""
    return copy.deepcopy(tree)


def job_ecosystem(specs: list[str], ckpt: str, k: int, backend: str) -> dict:
    """Per scope, the round trips torchtitan-style code does, each resumed at step K and compared with the
    straight run: get/set_optimizer_state_dict with and without flatten_optimizer_state_dict, and
    torch.distributed.checkpoint save/load of the flattened dicts."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    data = batches(STEPS)
    out = {}
    for spec in specs:
        model, opt, _, _ = build(spec, backend)
        train(model, opt, data[:k])
        saved = {}
        for flat in (False, True):
            options = StateDictOptions(flatten_optimizer_state_dict=flat)
            osd = get_optimizer_state_dict(model, opt, options=options)
            saved[flat] = (_detached(get_model_state_dict(model)), _detached(osd))
        path = f"{ckpt}/{spec.replace(':', '_')}"
        dcp.save({"model": saved[True][0], "optim": saved[True][1]}, checkpoint_id=path)
        train(model, opt, data[k:])
        res = {"straight": full_params(model)}
        for how in ("memory", "memory-flat", "dcp-flat"):
            flat = how != "memory"
            options = StateDictOptions(flatten_optimizer_state_dict=flat)
            again, opt2, _, _ = build(spec, backend)
            if how == "dcp-flat":
                osd = get_optimizer_state_dict(again, opt2, options=options)
                state = {"model": get_model_state_dict(again), "optim": osd}
                dcp.load(state, checkpoint_id=path)
                msd, osd = state["model"], state["optim"]
            else:
                msd, osd = saved[flat]
            set_model_state_dict(again, msd)
            set_optimizer_state_dict(again, opt2, osd, options=options)
            train(again, opt2, data[k:])
            res[how] = full_params(again)
        out[spec] = res
    return out


def job_zero(specs: list[str], k: int, backend: str) -> dict:
    """ZeroRedundancyOptimizer over a rotated optimizer: consolidate, save, load into a fresh one, step on."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    data = batches(STEPS)
    out = {}
    for spec in specs:
        opts = scope_options(spec)
        cls = FusedRotatedAdamW if backend != "eager" else RotatedAdamW
        extra = {"backend": backend} if backend != "eager" else {}

        def fresh(cls=cls, opts=opts, extra=extra):
            torch.manual_seed(0)
            model = TinyBlock(vocab=11, dim=8)
            zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, **KW, **opts, **extra)
            return model, zero

        def run(model, zero, chunk):
            for b in chunk:
                zero.zero_grad()
                loss_of(model, b).backward()
                for p in model.parameters():  # data-parallel: every rank has the same batch, so the mean is it
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
                zero.step()

        model, zero = fresh()
        run(model, zero, data[:k])
        at_k = [p.detach().clone() for p in model.parameters()]
        zero.consolidate_state_dict(to=0)
        sd = [copy.deepcopy(zero.state_dict()) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(sd, src=0)  # every rank loads the whole state, keeping its own partition
        run(model, zero, data[k:])
        again, zero2 = fresh()
        with torch.no_grad():
            for p, q in zip(at_k, again.parameters(), strict=True):
                q.copy_(p)
        zero2.load_state_dict(sd[0])
        run(again, zero2, data[k:])
        out[spec] = {"straight": full_params(model), "resumed": full_params(again)}
    return out


def main() -> None:
    job, out_path, *rest = sys.argv[1:]
    backend = os.environ.get("ROTKERN_TEST_BACKEND", "eager")
    dist.init_process_group("gloo")
    try:
        if job == "ecosystem":
            result = job_ecosystem(rest[0].split(","), rest[1], int(rest[2]), backend)
        elif job == "zero":
            result = job_zero(rest[0].split(","), int(rest[1]), backend)
        elif job == "match":
            result = job_match(rest[0].split(","), backend)
        elif job == "resume":
            result = job_resume(rest[0], rest[1], int(rest[2]), backend)
        else:
            result = job_load(rest[0], rest[1], int(rest[2]), backend)
        if dist.get_rank() == 0:
            torch.save(result, out_path)
        dist.barrier()  # no rank tears gloo down while another still works (an abort in its teardown otherwise)
    except Exception:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()
    # Done, the result saved: leave without the interpreter's finalisation, where gloo's worker threads can still
    # free work objects that hold tensors and abort the process ("terminate called without an active exception",
    # an intermittent failure of this test on a loaded 2-core machine after every rank had finished).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

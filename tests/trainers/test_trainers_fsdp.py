"""``train --fsdp`` with 2 gloo processes (torchrun): gpt-tiny sharded by FSDP2 against one process, and a
shard-local run stopped, resumed from its DCP checkpoint and continued bit-identically."""

from __future__ import annotations

import json

import pytest
import torch

from rotkern.trainers.train import TrainConfig, train

from .._trainer_helpers import CPU, torchrun_train

ARGS = dict(steps=20, warmup_steps=2, batch_size=2, grad_accum=4, context=16, block_size=64, eval_batches=1,
            eval_every=0, print_every=0)  # fmt: skip
pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")


def torchrun(out_dir, *extra: str, world: int = 2) -> None:
    argv = [f"--{k}={v}" for k, v in ARGS.items()] + [f"--out_dir={out_dir}", "--fsdp", *extra]
    run = torchrun_train(world, *argv, timeout=180)  # --device=cpu: gloo, also where a GPU is visible
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-4000:]


def sharded_params(run_dir) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    meta = torch.load(run_dir / "ckpt.pt", weights_only=True)
    assert meta["dcp"] == "ckpt_dcp" and meta["model"] is None
    dcp_to_torch_save(run_dir / "ckpt_dcp", run_dir / "full.pt")
    return torch.load(run_dir / "full.pt", weights_only=False)["model"]


@pytest.mark.parametrize(
    ("world", "scope"),
    [
        (2, "none"),
        (2, "output"),
        (2, "layer --shard_mode=gather"),
        (2, "global --shard_mode=gather"),
        (4, "none"),
        (4, "output"),
        (4, "input --shard_mode=gather"),
    ],
)
def test_fsdp_training_matches_one_process(world, scope, tmp_path):
    """20 steps of gpt-tiny, the exact scopes: within fp32 noise of one process. (svd and eigen are exact too when
    both see the same gradient bits, tests/test_fsdp.py; here the reduction order differs, and their first basis
    amplifies that through near-equal singular values / eigenvalues, as any fp32 noise.)"""
    rotation, *extra = scope.split()
    torchrun(tmp_path / "fsdp", f"--rotation={rotation}", *extra, world=world)
    got = sharded_params(tmp_path / "fsdp")
    one = train(TrainConfig(**ARGS, **CPU, rotation=rotation, out_dir=str(tmp_path / "one")))["model"].state_dict()
    for name, p in one.items():
        # Each rank takes its share of the 4 micro-batches: FSDP's reduction order differs from one process's.
        torch.testing.assert_close(got[name], p, rtol=1e-5, atol=1e-5, msg=name)
    final = [json.loads(line) for line in open(tmp_path / "fsdp" / "log.jsonl")][-1]
    assert final["type"] == "final" and "ddp_max_param_diff" not in final


def test_fsdp_shard_local_run_resumes_bit_identically(tmp_path):
    torchrun(tmp_path / "straight", "--rotation=layer")
    torchrun(tmp_path / "cut", "--rotation=layer", "--stop_step=9")
    torchrun(tmp_path / "resumed", "--rotation=layer", f"--resume={tmp_path / 'cut'}")  # saves over cut's checkpoint
    a, b = sharded_params(tmp_path / "straight"), sharded_params(tmp_path / "cut")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log = tmp_path / "cut" / "log.jsonl"  # a resumed run's log continues beside its checkpoint
    steps = [json.loads(line)["step"] for line in open(log) if '"type": "step"' in line]
    assert steps == list(range(1, 21)) and not (tmp_path / "resumed").exists()


def test_fsdp_needs_torchrun(tmp_path):
    from rotkern.trainers.common import TrainerError

    with pytest.raises(TrainerError, match="--fsdp shards over the torchrun processes"):
        train(TrainConfig(**ARGS, **CPU, fsdp=True, out_dir=str(tmp_path)))

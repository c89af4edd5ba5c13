"""DDP on CPU with gloo: two ranks agree with each other and with one process on the same global batch."""

import json

import torch

from rotkern.trainers.train import TrainConfig, train

from .._trainer_helpers import CPU, torchrun_train

ARGS = dict(steps=4, warmup_steps=1, batch_size=2, grad_accum=2, context=16, block_size=64, eval_batches=1)


def test_two_gloo_ranks_match_one_process(tmp_path):
    argv = [f"--{k}={v}" for k, v in ARGS.items()] + ["--print_every=0", f"--out_dir={tmp_path / 'ddp'}"]
    run = torchrun_train(2, *argv, timeout=120)  # --device=cpu: gloo, also where a GPU is visible
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    final = [json.loads(line) for line in open(tmp_path / "ddp" / "log.jsonl")][-1]
    assert final["ddp_max_param_diff"] == 0.0  # every rank holds the same parameters
    ddp = torch.load(tmp_path / "ddp" / "ckpt.pt", weights_only=True)["model"]
    single = train(TrainConfig(**ARGS, **CPU, print_every=0, out_dir=str(tmp_path / "one")))["model"].state_dict()
    for name, p in single.items():
        torch.testing.assert_close(ddp[name], p, rtol=1e-5, atol=1e-5, msg=name)

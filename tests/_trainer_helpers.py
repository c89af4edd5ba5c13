"""Shared bits of the trainer tests: fast configs, the torchrun launcher and a deliberately broken fused optimizer.

The trainer tests mean the CPU on every machine (their numbers, the compiled CPU extension, gloo): the trainers'
``device="auto"`` would pick CUDA wherever a GPU is visible, and cuda:LOCAL_RANK in each torchrun process (cuda:1
on a one-GPU machine). So every config and command line here names the CPU (CPU, CPU_ARGV; tests/conftest.py
fails a non-gpu test whose trainer is left on "auto"), and torchrun runs of CUDA ranks skip where the machine has
fewer GPUs than ranks (gpu_shortage).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import rotkern
from rotkern.trainers.train import TrainConfig

CPU = dict(device="cpu")  # for TrainConfig / ValidateConfig / CompareConfig / AnalyzeConfig
CPU_ARGV = ["--device=cpu"]  # for python -m rotkern.trainers train|compare|validate|analyze

# Small enough that 20 steps take about a second on one CPU core.
# optimizer: the eager reference, whose steps are the same on every machine whether or not the compiled
# extension is built; the default (rotated-fused) has tests of its own (test_trainers_train.py).
FAST = dict(steps=20, warmup_steps=5, batch_size=8, eval_every=0, eval_batches=2, print_every=0, block_size=64,
            optimizer="rotated-eager", **CPU)  # fmt: skip


def fast_config(tmp_path, preset: str = "tiny", **overrides) -> TrainConfig:
    from rotkern.trainers.train import PRESETS

    image = "vit" in preset or "resnet" in preset
    extra = {"batch_size": 32, "lr": 1e-2} if image else {"context": 32}
    return TrainConfig(**{**PRESETS[preset], **FAST, **extra, "out_dir": str(tmp_path), **overrides})


def gpu_shortage(world: int) -> str | None:
    """Why ``world`` torchrun processes cannot each take a CUDA device of their own here; None when they can."""
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have >= world:
        return None
    return f"{world} CUDA ranks need {world} CUDA devices (cuda:LOCAL_RANK each); this machine has {have}"


def torchrun(world: int, *argv: str, timeout: float, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node=WORLD ARGV...`` (ARGV: a script or ``-m
    module``, then its arguments), one OpenMP thread per process; stdout and stderr captured."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun_train(world: int, *options: str, timeout: float, device: str = "cpu") -> subprocess.CompletedProcess:
    """``rotkern.trainers train --device=DEVICE OPTIONS...`` in ``world`` torchrun processes. On the CPU (the
    default) the ranks use gloo on any machine; on CUDA (nccl, cuda:LOCAL_RANK) the test skips where the machine
    has fewer GPUs than ranks."""
    if device != "cpu" and (why := gpu_shortage(world)):
        pytest.skip(why)
    return torchrun(world, "-m", "rotkern.trainers", "train", f"--device={device}", *options, timeout=timeout)


class BrokenFused(rotkern.FusedRotatedAdamW):
    """Nudges every parameter after each step: validate must notice."""

    @torch.no_grad()
    def step(self, closure=None):
        out = super().step(closure)
        for g in self.param_groups:
            for p in g["params"]:
                p.mul_(1 + 1e-3)
        return out

"""Shared bits of the trainer tests: fast configs and a deliberately broken fused optimizer."""

from __future__ import annotations

import torch

import rotkern
from rotkern.trainers.train import TrainConfig

# Small enough that 20 steps take about a second on one CPU core.
FAST = dict(steps=20, warmup_steps=5, batch_size=8, eval_every=0, eval_batches=2, print_every=0, block_size=64)


def fast_config(tmp_path, preset: str = "tiny", **overrides) -> TrainConfig:
    from rotkern.trainers.train import PRESETS

    image = "vit" in preset or "resnet" in preset
    extra = {"batch_size": 32, "lr": 1e-2} if image else {"context": 32}
    return TrainConfig(**{**PRESETS[preset], **FAST, **extra, "out_dir": str(tmp_path), **overrides})


class BrokenFused(rotkern.FusedRotatedAdamW):
    """Nudges every parameter after each step: validate must notice."""

    @torch.no_grad()
    def step(self, closure=None):
        out = super().step(closure)
        for g in self.param_groups:
            for p in g["params"]:
                p.mul_(1 + 1e-3)
        return out

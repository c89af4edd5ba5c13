"""Writes tests/data/format{N}.pt: checkpoints of an older rotkern (format 1 or 2), for the loader's tests.

Run with that version of rotkern first on the path, e.g. from a worktree of the commit::

    git worktree add /tmp/old <commit> && PYTHONPATH=/tmp/old python tests/data/make_old_checkpoints.py FORMAT OUT

Per scope: a small model trained 3 steps, its params and optimizer state_dict, and the params after 3 more
steps of the same run (what a resumed run must reproduce). Everything the file holds is built here, so the
file does not depend on the tests' helpers of either version.
"""

import copy
import sys

import torch
from torch import nn

import rotkern

SCOPES = ("none", "global", "layer", "output", "svd")


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(7, 6), nn.Linear(6, 10), nn.LayerNorm(10), nn.Linear(10, 7))


def grads(net: nn.Module, k: int) -> None:
    gen = torch.Generator().manual_seed(100 + k)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def run(scope: str) -> dict:
    net = model()
    opt = rotkern.RotatedAdamW(net.named_parameters(), lr=1e-2, rotation=scope, block_size=4, seed=5, svd_every=2)
    for k in range(3):
        grads(net, k)
        opt.step()
    params = {n: p.detach().clone() for n, p in net.named_parameters()}
    saved = {"params": params, "optim": copy.deepcopy(opt.state_dict())}  # state_dict() holds live tensors
    for k in range(3, 6):
        grads(net, k)
        opt.step()
    saved["final"] = {n: p.detach().clone() for n, p in net.named_parameters()}
    return saved


if __name__ == "__main__":
    fmt, out = int(sys.argv[1]), sys.argv[2]
    result = {scope: run(scope) for scope in SCOPES}
    assert result["global"]["optim"]["rotkern"]["format"] == fmt
    torch.save({"format": fmt, "rotkern_version": getattr(rotkern, "__version__", "?"), "runs": result}, out)

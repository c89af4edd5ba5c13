"""Checkpoint format 3 (live and saved keys equal, tensors and numbers only) and the older formats' loading.

tests/data/format1.pt and format2.pt were written by older rotkern versions (tests/data/make_old_checkpoints.py,
run from worktrees of those commits): each run's state after 3 steps, and its params after 3 more.
"""

from __future__ import annotations

import numbers
from pathlib import Path

import pytest
import torch

import rotkern
from tests.data.make_old_checkpoints import SCOPES, grads, model

DATA = Path(__file__).parents[1] / "data"


def _build():
    net = model()
    return net, rotkern.RotatedAdamW(net.named_parameters(), lr=1e-2, block_size=4, seed=5, svd_every=2)


@pytest.mark.parametrize("fmt", [1, 2])
@pytest.mark.parametrize("scope", SCOPES)
def test_older_checkpoints_load_and_resume(fmt, scope):
    saved = torch.load(DATA / f"format{fmt}.pt", weights_only=False)
    assert saved["format"] == fmt
    run = saved["runs"][scope]
    net = model()
    kw = dict(lr=1e-2, rotation=scope, block_size=4, seed=5, svd_every=2)
    if any(g.get("embedding") == "transposed" for g in run["optim"]["param_groups"]):
        # Written when 'transposed' was the default: today's default refuses it with the fix, and nothing changes.
        # (rotation="none" rotates nothing, so the orientation is not compared there.)
        fresh = rotkern.RotatedAdamW(model().named_parameters(), **kw)
        if scope != "none":
            with pytest.raises(ValueError, match="build the optimizer with embedding='transposed' to resume it"):
                fresh.load_state_dict(run["optim"])
            assert not fresh.state and fresh.param_groups[0]["embedding"] == "as_linear"
        kw["embedding"] = "transposed"
    opt = rotkern.RotatedAdamW(net.named_parameters(), **kw)
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(run["params"][n])
    opt.load_state_dict(run["optim"])
    for k in range(3, 6):
        grads(net, k)
        opt.step()
    for n, p in net.named_parameters():
        # the same steps as the old version took (its float order unchanged since: measured 0 difference)
        torch.testing.assert_close(p.detach(), run["final"][n], rtol=0, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
    # and it saves in today's format, with the live keys
    sd = opt.state_dict()
    assert sd["rotkern"]["format"] == 3
    for p, st in opt.state.items():
        assert set(sd["state"][_index(opt, p)]) == set(st)


def _index(opt, p):
    return [id(q) for g in opt.param_groups for q in g["params"]].index(id(p))


@pytest.mark.parametrize("scope", SCOPES)
def test_format3_live_and_saved_keys_are_equal_and_plain(scope):
    net = model()
    opt = rotkern.RotatedAdamW(net.named_parameters(), lr=1e-2, rotation=scope, block_size=4, seed=5, svd_every=2)
    for k in range(3):
        grads(net, k)
        opt.step()
    sd = opt.state_dict()
    rotated = {id(g["params"][i]) for gi, g in enumerate(opt.param_groups) for i in opt.rotated_params(gi)}
    for p, st in opt.state.items():
        entry = sd["state"][_index(opt, p)]
        assert entry.keys() == st.keys()
        assert all(torch.is_tensor(v) or isinstance(v, numbers.Number) for v in entry.values())
        moments = {k for k in st if "exp_avg" in k}
        if id(p) in rotated:  # torch finds no exp_avg: it cannot step these moments in the wrong basis
            assert moments == {"rotated_exp_avg", "rotated_exp_avg_sq"}
        else:
            assert moments == {"exp_avg", "exp_avg_sq"}
    assert bool(rotated) == (scope != "none")


@pytest.mark.parametrize("scope", ["global", "output", "svd"])
def test_torch_adamw_given_a_rotated_state_fails_loudly_at_its_first_step(scope):
    net = model()
    opt = rotkern.RotatedAdamW(net.named_parameters(), lr=1e-2, rotation=scope, block_size=4, seed=5, svd_every=2)
    grads(net, 0)
    opt.step()
    target = torch.optim.AdamW(net.parameters())
    target.load_state_dict(opt.state_dict())
    with pytest.raises(KeyError, match="exp_avg"):
        target.step()


def test_a_format3_state_without_rotkern_metadata_is_recognised():
    """torch.distributed.checkpoint keeps only state and param_groups; the groups' rotation options still say it."""
    net = model()
    opt = rotkern.RotatedAdamW(net.named_parameters(), lr=1e-2, rotation="global", block_size=4, seed=5)
    grads(net, 0)
    opt.step()
    sd = opt.state_dict()
    bare = {"state": sd["state"], "param_groups": sd["param_groups"]}
    again = model()
    opt2 = rotkern.RotatedAdamW(again.named_parameters(), lr=1e-2, rotation="global", block_size=4, seed=5)
    opt2.load_state_dict(bare)
    for p, q in zip(net.parameters(), again.parameters(), strict=True):
        assert all(torch.equal(opt.state[p][k], opt2.state[q][k]) for k in opt.state[p])

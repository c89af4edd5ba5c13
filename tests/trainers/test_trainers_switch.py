"""Switching the optimizer's basis mid-run (--switch_at, --switch_to, --switch_state)."""

import dataclasses
import json
import math

import pytest
import torch

import rotkern
from rotkern.trainers.__main__ import main
from rotkern.trainers.common import TrainerError
from rotkern.trainers.train import lr_at, train

from .._trainer_helpers import fast_config

# adamw into the global basis and back out of it: the two directions of the converters.
DIRECTIONS = [("adamw", "global"), ("rotated-eager", "adamw")]


def _log(res) -> list[dict]:
    return [json.loads(line) for line in open(res["log"])]


def _steps(opt: torch.optim.Optimizer) -> set[float]:
    return {float(st["step"]) for st in opt.state.values()}


@pytest.mark.parametrize("state", ["convert", "reset"])
def test_switch_happens_before_the_update_after_switch_at(tmp_path, state):
    cfg = fast_config(tmp_path, steps=10, switch_at=6, switch_to="global", switch_state=state, optimizer="adamw")
    res = train(cfg)
    opt = res["optimizer"]
    assert type(opt) is rotkern.RotatedAdamW and all(g["rotation"] == "global" for g in opt.param_groups)
    log = _log(res)
    assert log[0]["optimizer"] == "adamw"
    kinds = [(r["type"], r.get("step")) for r in log if r["type"] in ("step", "switch")]
    assert kinds == [("step", n) for n in range(1, 7)] + [("switch", 6)] + [("step", n) for n in range(7, 11)]
    switch = next(r for r in log if r["type"] == "switch")
    assert (switch["from"], switch["to"], switch["state"]) == ("adamw", "rotated-eager:global", state)
    labels = [r["optimizer"] for r in log if r["type"] == "step"]
    assert labels == ["adamw"] * 6 + ["rotated-eager:global"] * 4
    # convert carries Adam's step count over (bias correction continues); reset starts it again.
    assert _steps(opt) == ({10.0} if state == "convert" else {4.0})
    # The schedule carries on into the new optimizer.
    assert all(g["lr"] == lr_at(cfg, 9) for g in opt.param_groups)
    assert [r["lr"] for r in log if r["type"] == "step"] == [lr_at(cfg, k) for k in range(10)]
    assert log[-1]["type"] == "final" and log[-1]["backend"].startswith("eager")


def test_rotated_runs_switch_to_torch_adamw_or_another_scope(tmp_path):
    res = train(fast_config(tmp_path / "a", steps=6, switch_at=3, switch_to="adamw", rotation="layer"))
    assert type(res["optimizer"]) is torch.optim.AdamW and _steps(res["optimizer"]) == {6.0}
    assert [r["optimizer"] for r in res["records"]] == ["rotated-eager:layer"] * 3 + ["adamw"] * 3
    res = train(fast_config(tmp_path / "b", steps=6, switch_at=3, switch_to="output", rotation="layer"))
    assert type(res["optimizer"]) is rotkern.RotatedAdamW
    assert {g["rotation"] for g in res["optimizer"].param_groups} == {"output"}


@pytest.mark.parametrize("optimizer, target", DIRECTIONS)
def test_convert_continues_where_reset_restarts(tmp_path, optimizer, target):
    """A fresh Adam's first update is lr * sign(g) per coordinate, so its norm is ~lr sqrt(d); with the moments
    carried over the first update after the switch is about as large as the one before it."""
    steps, k = 30, 20
    norms = {}
    for state in ("convert", "reset"):
        cfg = fast_config(
            tmp_path / state, steps=steps, switch_at=k, switch_to=target, switch_state=state, optimizer=optimizer
        )
        res = train(cfg)
        recs = res["records"]
        assert "update_norm" not in recs[k - 2] and "update_norm" not in recs[k + 1]
        norms[state] = (recs[k - 1]["update_norm"], recs[k]["update_norm"])
    d = sum(p.numel() for p in res["model"].parameters())
    sign_step = lr_at(cfg, k) * math.sqrt(d)
    before, after = norms["convert"]
    assert norms["reset"][0] == before  # identical up to the switch
    assert 0.4 < after / before < 1.5, norms
    assert 0.9 < norms["reset"][1] / sign_step < 1.1, (norms, sign_step)
    assert norms["reset"][1] > 2 * after, norms


@pytest.mark.parametrize("optimizer, target", DIRECTIONS)
@pytest.mark.parametrize("stop", [4, 6, 9])  # checkpoint before the switch, at it (still to come), after it
def test_resume_across_the_switch_is_bit_identical(tmp_path, optimizer, target, stop):
    kw = dict(steps=12, switch_at=6, switch_to=target, optimizer=optimizer)
    straight = train(fast_config(tmp_path / "a", **kw))
    cfg = fast_config(tmp_path / "b", stop_step=stop, **kw)
    first = train(cfg)
    ckpt = torch.load(first["checkpoint"], weights_only=True)
    assert ckpt["optimizer_name"] == (optimizer if stop <= 6 else target.replace("global", "rotated-eager"))
    resumed = train(dataclasses.replace(cfg, stop_step=0, resume=first["checkpoint"]))
    assert type(resumed["optimizer"]) is type(straight["optimizer"])
    recs = first["records"] + resumed["records"]
    assert [r["loss"] for r in recs] == [r["loss"] for r in straight["records"]]
    assert [r["optimizer"] for r in recs] == [r["optimizer"] for r in straight["records"]]
    for pa, pb in zip(straight["model"].parameters(), resumed["model"].parameters(), strict=True):
        assert torch.equal(pa, pb)
    log = _log(resumed)
    assert [r["type"] for r in log].count("switch") == 1 and log[-1]["step"] == 12


def test_resume_refuses_a_checkpoint_that_does_not_match_the_switch(tmp_path):
    kw = dict(steps=12, optimizer="adamw")
    after = train(fast_config(tmp_path / "a", stop_step=8, switch_at=6, switch_to="global", **kw))["checkpoint"]
    before = train(fast_config(tmp_path / "b", stop_step=4, switch_at=6, switch_to="global", **kw))["checkpoint"]
    # Past the switch without switching: the checkpoint holds rotated state, the run builds torch AdamW.
    with pytest.raises(TrainerError, match="holds rotated-eager state at step 8"):
        train(fast_config(tmp_path / "c", resume=after, **kw))
    # The switch moved before the checkpoint's step: it holds AdamW state, the run expects the rotated one.
    with pytest.raises(TrainerError, match="holds adamw state at step 4"):
        train(fast_config(tmp_path / "d", resume=before, switch_at=2, switch_to="global", **kw))
    # Into another scope than the checkpoint's: the rotated state_dict's own check.
    with pytest.raises(TrainerError, match="rotation is 'global' in the checkpoint but 'layer'"):
        train(fast_config(tmp_path / "e", resume=after, switch_at=6, switch_to="layer", **kw))
    # Switching later than planned from a checkpoint before the switch is fine.
    res = train(fast_config(tmp_path / "f", resume=before, switch_at=10, switch_to="global", **kw))
    assert [r["optimizer"] for r in res["records"]] == ["adamw"] * 6 + ["rotated-eager:global"] * 2


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    "args, match",
    [
        (["--switch_at=5", "--switch_to=diagonal"], "--switch_to='diagonal' is not one of adamw, none, global"),
        (["--switch_at=-1", "--switch_to=global"], "--switch_at=-1 is out of range: it must be >= 0"),
        (["--switch_at=10", "--switch_to=global"], "--switch_at=10 must lie in [0, steps=10)"),
        (["--switch_to=global"], "--switch_to needs --switch_at"),
        (["--switch_at=5"], "--switch_at needs --switch_to"),
        (["--switch_at=5", "--switch_to=adamw", "--switch_state=keep"], "--switch_state='keep' is not one of"),
        (["--switch_at=5", "--switch_to=adamw", "--optimizer=sgdm"], "not sgdm"),
        (["--switch_at=5", "--switch_to=adamw", "--optimizer=adamw"], "what this run already uses (adamw)"),
        (["--switch_at=5", "--switch_to=layer", "--rotation=layer"], "already uses (rotated-fused:layer)"),
    ],
)
def test_bad_switch_options_are_refused(tmp_path, capsys, args, match):
    assert match in _error(capsys, ["train", "--steps=10", *args, f"--out_dir={tmp_path}"])
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_switch_options_belong_to_train(tmp_path, capsys):
    argv = ["--switch_at=5", "--switch_to=global", f"--out_dir={tmp_path}"]
    assert "belong to train" in _error(capsys, ["compare", *argv])
    assert "belong to train" in _error(capsys, ["validate", "--switch_at=5", "--switch_to=adamw"])


def test_reset_into_the_same_optimizer_restarts_the_moments(tmp_path):
    res = train(fast_config(tmp_path, steps=6, switch_at=3, switch_to="adamw", switch_state="reset", optimizer="adamw"))
    assert type(res["optimizer"]) is torch.optim.AdamW and _steps(res["optimizer"]) == {3.0}

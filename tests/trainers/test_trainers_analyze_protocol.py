"""``rotkern analyze --resume_steps``: the paper's protocol (resume from the checkpoint, the CV after every step).

The trajectory must be what the run's own training steps give (checked against steps taken by hand with train's
machinery), and must leave the checkpoint's measurements exactly as they are without it.
"""

import dataclasses
import json
import math
import statistics
from pathlib import Path

import pytest
import torch

from rotkern import metrics as M
from rotkern.optim._base import moment
from rotkern.trainers.__main__ import main
from rotkern.trainers.analyze import AnalyzeConfig, analyze, cv_trajectory, rebuild, resumed_summary
from rotkern.trainers.common import TrainerError
from rotkern.trainers.train import load_checkpoint, make_optimizer, make_setup, restore, train, train_step

from .._trainer_helpers import fast_config

STEPS = 12  # the checkpoints' step
RESUME = 3
TYPES = {"Q", "K", "V", "O", "W1", "W2"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny gpt runs (rotated global, torch adamw, sgdm), analysed with and without --resume_steps."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("protocol")
    cfgs = {
        "global": fast_config(root / "runs" / "global", steps=STEPS, rotation="global"),
        "adamw": fast_config(root / "runs" / "adamw", steps=STEPS, optimizer="adamw", rotation="none"),
        "sgdm": fast_config(root / "runs" / "sgdm", steps=STEPS, optimizer="sgdm"),
    }
    for cfg in cfgs.values():
        train(cfg)
    base = dict(batches=2, device="cpu")
    with_traj = analyze([str(root / "runs")], AnalyzeConfig(**base, resume_steps=RESUME, out_dir=str(root / "with")))
    without = analyze([str(root / "runs")], AnalyzeConfig(**base, plot=False, out_dir=str(root / "without")))
    return root, cfgs, with_traj, without


def _run(analysis, scope):
    return next(r for r in analysis["runs"] if r["scope"] == scope)


def _by_hand(cfg, steps):
    """The run resumed from its checkpoint with train's own machinery: (model, optimizer, per-step records)."""
    s = make_setup(dataclasses.replace(cfg, device="cpu", workers=0, out_dir=""))
    model = s.build_model()
    opt = make_optimizer(cfg, model)
    path = str(cfg.out_dir)
    start = restore(s, load_checkpoint(path), path, model, opt)
    assert start == STEPS
    recs = [train_step(s, model, opt, step) for step in range(start, start + steps)]
    return model, opt, recs


def test_trajectory_in_json_summary_and_figure(runs):
    root, _, analysis, _ = runs
    out = root / "with"
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["config"]["resume_steps"] == RESUME
    for scope in ("global", "adamw"):
        traj = _run(saved, scope)["cv_trajectory"]
        assert [t["step"] for t in traj] == list(range(STEPS + 1, STEPS + 1 + RESUME))
        for t in traj:
            assert math.isfinite(t["cv"]) and t["cv"] > 0 and math.isfinite(t["loss"]) and t["lr"] > 0
            assert set(t["cv_per_layer_type"]) == TYPES and all(
                math.isfinite(v) for v in t["cv_per_layer_type"].values()
            )
        # The CV moves off the checkpoint's as training goes on.
        assert traj[0]["cv"] != _run(saved, scope)["orthogonality"]["run"]["cv"]
        res = saved["scopes"][scope]["resumed"]
        cvs = [t["cv"] for t in traj]
        assert res["steps"] == RESUME and res["cv_first"] == cvs[0] and res["cv_last"] == cvs[-1]
        assert res["cv_mean"] == pytest.approx(statistics.fmean(cvs)) and res["cv_std"] == pytest.approx(
            statistics.stdev(cvs)
        )
    sgdm = _run(saved, "sgdm")
    assert sgdm["cv_trajectory"] is None and saved["scopes"]["sgdm"]["resumed"] is None
    assert any("no CV trajectory" in n for n in sgdm["notes"])
    assert (out / "cv_trajectory.png").stat().st_size > 1000 and str(out / "cv_trajectory.png") in saved["figures"]
    summary = (out / "summary.md").read_text()
    assert f"## CV over {RESUME} resumed training steps" in summary
    rows = [line for line in summary.splitlines() if line.startswith(("| global |", "| adamw |", "| sgdm |"))]
    resumed_rows = [r for r in rows if f"| {STEPS + 1}–{STEPS + RESUME} |" in r]
    assert len(resumed_rows) == 2 and not any(r.startswith("| sgdm |") for r in resumed_rows)
    g = saved["scopes"]["global"]["resumed"]
    assert f"| {g['cv_first']:.4f} | {g['cv_last']:.4f} | {g['cv_mean']:.4f} ± {g['cv_std']:.4f} |" in summary
    assert "no CV trajectory" in summary
    # Without the option: no trajectory anywhere, no figure, no table.
    plain = json.loads((root / "without" / "analysis.json").read_text())
    assert all(r["cv_trajectory"] is None for r in plain["runs"])
    assert "resumed training steps" not in (root / "without" / "summary.md").read_text()


def test_the_checkpoint_measurements_are_untouched(runs):
    _, _, with_traj, without = runs
    for a, b in zip(with_traj["runs"], without["runs"], strict=True):
        assert a["label"] == b["label"]
        for key in ("orthogonality", "second_moment", "loss"):
            assert a[key] == b[key], (a["label"], key)
        assert a["gradient_bound"]["per_batch"] == b["gradient_bound"]["per_batch"]
    for scope in with_traj["scopes"]:
        assert with_traj["scopes"][scope]["cv"] == without["scopes"][scope]["cv"]


def test_trajectory_is_what_the_runs_own_steps_give(runs):
    _, cfgs, analysis, _ = runs
    # Rotated run: the mean CV after each step taken by hand equals the logged one.
    model, opt, recs = _by_hand(cfgs["global"], 1)
    traj = _run(analysis, "global")["cv_trajectory"]
    want = M.update_cv(opt, model)
    assert traj[0]["cv"] == pytest.approx(math.fsum(want.values()) / len(want), rel=1e-9)
    assert traj[0]["loss"] == pytest.approx(recs[0]["loss"], rel=1e-6)
    # torch AdamW run: its moments after the last step, read in the standard basis (the proxy is reloaded).
    model, opt, recs = _by_hand(cfgs["adamw"], RESUME)
    traj = _run(analysis, "adamw")["cv_trajectory"]
    cvs = []
    for depth in (0, 1):
        st = opt.state[model.get_parameter(f"transformer.h.{depth}.attn.c_proj.weight")]
        cvs.append(M.cv_singular_values(moment(st, "exp_avg") / (moment(st, "exp_avg_sq").sqrt() + cfgs["adamw"].eps)))
    assert traj[-1]["cv_per_layer_type"]["O"] == pytest.approx(sum(cvs) / 2, rel=1e-6)
    assert [t["loss"] for t in traj] == pytest.approx([r["loss"] for r in recs], rel=1e-6)


def test_cv_trajectory_leaves_the_run_and_the_rng_alone(runs):
    _, cfgs, _, _ = runs
    path = Path(cfgs["global"].out_dir) / "ckpt.pt"
    acfg = AnalyzeConfig(device="cpu", resume_steps=2)
    run = rebuild(path, load_checkpoint(str(path)), acfg, math_attention=False)
    params = [p.detach().clone() for p in run.model.parameters()]
    state = {k: v.clone() for k, v in run.opt.state[next(run.model.parameters())].items() if torch.is_tensor(v)}
    rng = torch.get_rng_state()
    traj = cv_trajectory(run, acfg)
    assert len(traj) == 2 and torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(p, q) for p, q in zip(run.model.parameters(), params, strict=True))
    after = run.opt.state[next(run.model.parameters())]
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert cv_trajectory(run, dataclasses.replace(acfg, resume_steps=0)) is None


def test_a_switch_inside_the_resumed_steps_is_noted(tmp_path):
    torch.set_num_threads(1)
    cfg = fast_config(tmp_path / "run", steps=20, stop_step=4, switch_at=5, switch_to="adamw")
    train(cfg)
    path = tmp_path / "run" / "ckpt.pt"
    acfg = AnalyzeConfig(device="cpu", resume_steps=2)
    run = rebuild(path, load_checkpoint(str(path)), acfg, math_attention=False)
    assert [t["step"] for t in cv_trajectory(run, acfg)] == [5, 6]
    assert any("the run itself switched to adamw after step 5" in n for n in run.notes)


def test_resumed_summary_averages_seeds_step_by_step():
    def traj(*cvs):
        return [{"step": 10 + k, "cv": cv, "loss": 1.0 + k} for k, cv in enumerate(cvs)]

    got = resumed_summary([traj(1.0, 2.0, 3.0), None, traj(3.0, 4.0, 5.0, 6.0)])
    assert got["runs"] == 2 and got["steps"] == 3 and got["cv"] == [2.0, 3.0, 4.0]
    assert (got["cv_first"], got["cv_last"], got["cv_mean"], got["cv_std"]) == (2.0, 4.0, 3.0, 1.0)
    assert resumed_summary([None, []]) is None


def test_cli_accepts_resume_steps(runs, capsys):
    root, _, _, _ = runs
    out = root / "cli"
    args = ["analyze", str(root / "runs" / "global"), "--batches=1", "--device=cpu", "--plot=false"]
    assert main([*args, "--resume_steps=3", f"--out_dir={out}"]) == 0
    saved = json.loads((out / "analysis.json").read_text())
    assert len(saved["runs"][0]["cv_trajectory"]) == 3
    assert "resumed training steps" in capsys.readouterr().out
    assert main([*args, "--resume_steps=-1", f"--out_dir={root / 'cli2'}"]) == 2
    assert "--resume_steps=-1 is out of range: it must be >= 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    assert "--resume_steps" in capsys.readouterr().out
    with pytest.raises(TrainerError, match="resume_steps"):
        analyze([str(root / "runs")], AnalyzeConfig(resume_steps=-2, out_dir=str(root / "cli3")))

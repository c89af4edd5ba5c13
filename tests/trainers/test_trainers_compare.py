import dataclasses
import json
import math
import re
import shutil
import statistics

import pytest

from rotkern.trainers import compare as compare_mod
from rotkern.trainers.__main__ import main
from rotkern.trainers.common import TrainerError
from rotkern.trainers.compare import (
    AGGREGATED,
    JUDGED,
    CompareConfig,
    _table,
    aggregate,
    compare,
    parse_seeds,
    slowdowns,
    vs_baseline,
)

from .._trainer_helpers import CPU, fast_config


def test_slowdown_is_extra_steps_to_the_baseline_final_loss():
    base = [10.0 - i for i in range(10)]  # reaches 1.0 at step 10
    late = [10.0 - i / 2 for i in range(20)]  # reaches 1.0 at step 19 (index 18)
    never = [5.0] * 10
    out = slowdowns({"none": base, "global": late, "layer": never}, "none", decay=0.0)
    assert out["none"]["steps_to_target"] == 10 and out["none"]["slowdown_pct"] == 0.0
    assert out["global"]["steps_to_target"] == 19 and out["global"]["slowdown_pct"] == pytest.approx(90.0)
    assert out["layer"]["steps_to_target"] is None and out["layer"]["slowdown_pct"] is None
    # The baseline needed 6 steps to reach 5.0, where "layer" ends after 10: 10 / 6 - 1.
    assert out["layer"]["equivalent_slowdown_pct"] == pytest.approx(100 * (10 / 6 - 1))


def test_table_marks_seeds_that_miss_the_target_and_judges_gaps_by_two_standard_errors():
    def row(scope, seed, loss, steps, slowdown):
        keys = dict(final_train_loss=loss, smoothed_train_loss=loss, final_val_loss=loss, final_val_acc=None)
        return dict(scope=scope, seed=seed, steps_to_target=steps, slowdown_pct=slowdown, **keys)

    def agg(scope, seeds):
        return aggregate(scope, [{**row(scope, *s), "equivalent_slowdown_pct": None} for s in seeds])

    base = agg("none", [(0, 2.0, 100, 0.0), (1, 2.1, 90, 0.0), (2, 2.05, 95, 0.0)])
    late = agg("layer", [(0, 2.2, None, None), (1, 2.3, 120, 33.0), (2, 2.25, 110, 15.8)])
    close = agg("global", [(0, 2.02, 95, 0.0), (1, 2.12, 90, 0.0), (2, 2.07, 100, 5.3)])
    for r in (late, close):
        r["vs_baseline"] = {key: vs_baseline(r, base, key) for key, _, _ in JUDGED}
    # sd 0.05 on both sides, n = 3: 2 SE = 2 sqrt(2 x 0.05^2 / 3) = 0.0816.
    assert late["vs_baseline"]["final_val_loss"]["verdict"] == "worse"
    assert close["vs_baseline"]["final_val_loss"]["two_se"] == pytest.approx(2 * math.sqrt(2 * 0.05**2 / 3))
    assert close["vs_baseline"]["final_val_loss"]["verdict"] == "within noise"
    # Lower is better: a gap below -2 SE is an improvement, and says so.
    ahead = agg("input", [(0, 1.8, 80, -20.0), (1, 1.9, 75, -16.7), (2, 1.85, 78, -17.9)])
    assert vs_baseline(ahead, base, "final_val_loss")["verdict"] == "better"
    assert late["steps_to_target"] == 115 and late["steps_to_target_n"] == 2
    per_seed = {str(s): {"loss": x, "baseline_steps": t} for s, x, t in [(0, 2.0, 100), (1, 2.1, 90), (2, 2.05, 95)]}
    table = _table([base, late, close], {"baseline": "none", "per_seed": per_seed}, CompareConfig(), [0, 1, 2])
    assert "| layer | 3 | 2.2500 ± 0.0500 |" in table and "115.0 ± 7.1 (2/3 seeds reached)" in table
    assert "- layer: val loss +0.2000 (2 SE 0.0816: worse)" in table
    assert "slowdown undetermined (target not reached in every seed)" in table
    assert "- global: val loss +0.0200 (2 SE 0.0816: within noise)" in table and "slowdown +1.8 % (2 SE" in table


def _cfg(tmp_path, name: str = "cmp", **overrides) -> CompareConfig:
    """compare over fast_config's tiny run: 4 steps, one eval at the end, no plot."""
    base = dataclasses.asdict(fast_config(tmp_path, steps=4, warmup_steps=1, batch_size=4))
    return CompareConfig(
        **{**base, "scopes": "none,global", "out_dir": str(tmp_path / name), "plot": False, **overrides}
    )


def _summary(path) -> dict:
    """summary.json without the one entry that names the folder it was written to."""
    out = json.loads((path / "summary.json").read_text())
    del out["config"]["out_dir"]
    return out


def test_compare_writes_table_plot_and_runs(tmp_path, capsys):
    cfg = CompareConfig(
        scopes="none,global",
        seeds="2",
        steps=8,
        warmup_steps=2,
        batch_size=4,
        context=32,
        eval_every=4,
        eval_batches=1,
        block_size=64,
        out_dir=str(tmp_path),
        plot=True,
        **CPU,
    )
    res = compare(cfg)
    out = capsys.readouterr().out
    assert re.search(r"\[4/4 global seed 1\] 8 steps loss \d\.\d{4} val \d\.\d{4} \(", out) and "| scope | n |" in out
    assert len([line for line in out.splitlines() if "steps loss" in line]) == 4  # one line per run
    assert [r["scope"] for r in res["rows"]] == ["none", "global"]
    assert res["rows"][0]["slowdown_pct"] == pytest.approx(0.0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["curves"]["global"]) == 8 and [e["step"] for e in summary["evals"]["none"]] == [4, 8]
    assert (tmp_path / "summary.md").exists() and (tmp_path / "none" / "seed1" / "log.jsonl").exists()
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib")
    assert (tmp_path / "compare.png").stat().st_size > 1000


def test_seeds_parse_counts_and_lists():
    assert parse_seeds("", 7) == [7]  # the default: --seed alone, as before --seeds existed
    assert parse_seeds("3", 5) == [5, 6, 7]
    assert parse_seeds("0,2", 5) == [0, 2] and parse_seeds(" 4 , 1 ", 0) == [4, 1]
    for bad, why in [
        (",", "integer"),
        ("0,,1", "integer"),
        ("a,b", "integer"),
        ("1.5", "count"),
        ("0,0", "repeated"),
        ("-1", ">= 1"),
        ("0", ">= 1"),
        ("1,-2", ">= 0"),
    ]:
        with pytest.raises(TrainerError, match="--seeds") as e:
            parse_seeds(bad, 0)
        assert why in str(e.value), (bad, str(e.value))


@pytest.mark.parametrize("bad", ["a,b", "0,0", "-1", ","])
def test_bad_seeds_on_the_command_line(tmp_path, capsys, bad):
    assert main(["compare", f"--seeds={bad}", f"--out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --seeds="), err
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_two_seeds_give_two_runs_per_entry_and_mean_std(tmp_path):
    res = compare(_cfg(tmp_path, scopes="none,adamw,global", seeds="2", seed=3))
    out = tmp_path / "cmp"
    assert res["seeds"] == [3, 4] and len(res["runs"]) == 6
    for run in res["runs"]:
        folder = out / run["scope"] / f"seed{run['seed']}"
        assert run["dir"] == f"{run['scope']}/seed{run['seed']}" and (folder / "ckpt.pt").exists()
        assert json.loads((folder / "log.jsonl").open().readline())["config"]["seed"] == run["seed"]
    # The seed changes init and batches: every run of an entry differs from its other seed's.
    for scope in ("none", "adamw", "global"):
        a, b = (r["curve"] for r in res["runs"] if r["scope"] == scope)
        assert a != b
    # Each seed is measured against its own baseline run.
    for seed in (3, 4):
        base = next(r for r in res["runs"] if r["scope"] == "none" and r["seed"] == seed)["row"]
        assert base["slowdown_pct"] == 0.0
        assert res["target"]["per_seed"][str(seed)]["loss"] == base["smoothed_train_loss"]
    for row in res["rows"]:
        per_seed = [r["row"] for r in res["runs"] if r["scope"] == row["scope"]]
        assert row["n"] == 2 and row["seeds"] == [3, 4]
        for key in AGGREGATED:
            xs = [r[key] for r in per_seed if r[key] is not None]
            if len(xs) == 2:
                assert row[key] == pytest.approx(sum(xs) / 2) and row[f"{key}_std"] == pytest.approx(
                    abs(xs[0] - xs[1]) / math.sqrt(2)
                )
    base_row, glob = res["rows"][0], res["rows"][2]
    verdict = glob["vs_baseline"]["final_val_loss"]
    two_se = 2 * math.sqrt(glob["final_val_loss_std"] ** 2 / 2 + base_row["final_val_loss_std"] ** 2 / 2)
    assert verdict["two_se"] == pytest.approx(two_se)
    gap = glob["final_val_loss"] - base_row["final_val_loss"]
    assert verdict["verdict"] == ("worse" if gap > two_se else "better" if gap < -two_se else "within noise")
    assert res["curves"]["none"] == [
        statistics.fmean(c) for c in zip(*(r["curve"] for r in res["runs"] if r["scope"] == "none"), strict=True)
    ]
    table = (out / "summary.md").read_text()
    assert "| global | 2 |" in table and " ± " in table and "Differences from 'none'" in table
    assert f"- global: val loss {verdict['diff']:+.4f}" in table
    assert "Optimizer steps ran on: eager (rotkern.kernels.reference.rotated_adamw_ref)" in table
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["runs"]) == 6 and summary["rows"] == res["rows"]


def test_interrupted_compare_retrains_only_the_missing_runs(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, seeds="0,2")
    out = tmp_path / "cmp"
    compare(cfg)
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*/seed*/ckpt.pt")}
    assert len(mtimes) == 4
    # One run lost entirely, one interrupted before its (only, final) checkpoint: its log has no final record.
    shutil.rmtree(out / "global" / "seed2")
    (out / "none" / "seed0" / "ckpt.pt").unlink()
    log = out / "none" / "seed0" / "log.jsonl"
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:3]))
    calls = []
    real_train = compare_mod.train
    monkeypatch.setattr(compare_mod, "train", lambda c, **kw: calls.append(c.out_dir) or real_train(c, **kw))
    compare(cfg)
    assert sorted(calls) == sorted([str(out / "global" / "seed2"), str(out / "none" / "seed0")])
    kept = {p: t for p, t in mtimes.items() if str(p.parent) not in calls}
    assert len(kept) == 2 and all(p.stat().st_mtime_ns == t for p, t in kept.items())
    # A third run of the same command trains nothing; its summary equals a fresh, uninterrupted compare's.
    calls.clear()
    compare(cfg)
    assert calls == []
    compare(dataclasses.replace(cfg, out_dir=str(tmp_path / "fresh")))
    assert _summary(out) == _summary(tmp_path / "fresh")


def test_unfinished_run_continues_from_its_checkpoint(tmp_path, capsys):
    # A single seed keeps the old layout, out_dir/<entry>/. stop_step stands in for an interruption after the
    # step-2 checkpoint; the re-run without it continues from there.
    cfg = _cfg(tmp_path, scopes="none", steps=6, save_every=2)
    compare(dataclasses.replace(cfg, stop_step=3))
    assert (tmp_path / "cmp" / "none" / "log.jsonl").exists()
    res = compare(cfg)
    assert "resuming from" in capsys.readouterr().out
    fresh = compare(dataclasses.replace(cfg, out_dir=str(tmp_path / "fresh")))
    assert res["curves"] == fresh["curves"] and res["rows"] == fresh["rows"] and len(res["curves"]["none"]) == 6
    assert _summary(tmp_path / "cmp") == _summary(tmp_path / "fresh")


def test_a_different_command_into_the_same_out_dir_is_refused(tmp_path):
    cfg = _cfg(tmp_path, scopes="none")
    out = tmp_path / "cmp"
    compare(cfg)
    before = (out / "summary.json").read_bytes()
    for change, named in [
        (dict(steps=5), "steps: 4 there, 5 now"),
        (dict(scopes="none,global"), "scopes"),
        (dict(seeds="2"), "seeds: [0] there, [0, 1] now"),
        (dict(model="vit-tiny"), "model"),
    ]:
        with pytest.raises(TrainerError, match="holds a compare run with other settings") as e:
            compare(dataclasses.replace(cfg, **change))
        assert named in str(e.value)
    assert (out / "summary.json").read_bytes() == before
    # The summary's own options may change: the runs are reused and the summary rewritten.
    assert compare(dataclasses.replace(cfg, ema=0.5, seeds="1"))["config"]["ema"] == 0.5  # seeds 1 = [seed]
    # Without compare.json, a run folder from other settings is still caught, by its checkpoint or log.
    (out / "compare.json").unlink()
    for name in ("summary.md", "summary.json"):
        (out / name).unlink()
    with pytest.raises(TrainerError, match=r"log.jsonl is a run with other settings \(lr: 0.003 there, 0.01 now\)"):
        compare(dataclasses.replace(cfg, lr=0.01))
    assert not (out / "compare.json").exists()  # the refused command left no record that would bind the folder
    # A folder with a summary but no compare.json is not a compare's to resume.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "summary.md").write_text("x")
    with pytest.raises(TrainerError, match="does not"):
        compare(dataclasses.replace(cfg, out_dir=str(tmp_path / "other")))

import json

import pytest

from rotkern.trainers.compare import CompareConfig, compare, slowdowns


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


def test_compare_writes_table_plot_and_runs(tmp_path, capsys):
    cfg = CompareConfig(
        scopes="none,global",
        steps=12,
        warmup_steps=3,
        batch_size=4,
        context=32,
        eval_every=6,
        eval_batches=1,
        block_size=64,
        out_dir=str(tmp_path),
        plot=True,
    )
    res = compare(cfg)
    out = capsys.readouterr().out
    assert "[2/2 global] step    12/12" in out and "| scope |" in out
    assert [r["scope"] for r in res["rows"]] == ["none", "global"]
    assert res["rows"][0]["slowdown_pct"] == pytest.approx(0.0)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["curves"]["global"]) == 12
    assert (tmp_path / "summary.md").exists() and (tmp_path / "none" / "log.jsonl").exists()
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib")
    assert (tmp_path / "compare.png").stat().st_size > 1000

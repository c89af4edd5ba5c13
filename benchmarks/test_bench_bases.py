"""The plumbing of bench_bases.py (fused svd / eigen step vs eager): its --dry-run writes the rows it should.

    pytest benchmarks/test_bench_bases.py                       # eager (+ ext where built) rows, ~5 s
    TRITON_INTERPRET=1 pytest benchmarks/test_bench_bases.py    # + the triton rows in the interpreter, ~15 s

The figures of a dry run mean nothing (tiny shapes, 2 rounds); the test checks that every expected row is there
with positive times, that the ratios are the quotients of those times, and that the derived rows are computed
from the measured ones.
"""

from __future__ import annotations

import json

import bench_bases
import pytest

from rotkern._backend import ext_available, interpret_mode


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("bases")
    argv = ["--dry-run", "--out", str(out)]
    if interpret_mode():
        argv += ["--max-measured-period", "0"]  # the interpreter's 10-step samples take ~7 s: checked without it
    assert bench_bases.main(argv) == 0
    return json.loads((out / "bench_bases.json").read_text()), (out / "bench_bases.md").read_text()


def test_expected_rows(dry):
    data, _ = dry
    m = data["meta"]
    assert m["dry_run"] and m["complete"] and m["device_type"] == "cpu" and not data["errors"]
    assert m["torch"] and m["git"] and "triton" in m and m["load1_before"] >= 0 and m["load1_after"] >= 0
    impls = ["eager"] + (["ext"] if ext_available() else []) + (["triton"] if interpret_mode() else [])
    want = {("none", "step"), ("output", "step")}
    want |= {(r, k) for r in ("svd", "eigen") for k in ("steady", "refresh", "amortized")}
    if not interpret_mode():
        want.add(("eigen", "period"))  # precondition_every's default 10 <= --max-measured-period
    ok = {(r["rotation"], r["kind"], r["impl"]) for r in data["rows"] if r["status"] == "ok"}
    assert ok == {(rot, kind, impl) for rot, kind in want for impl in impls}
    skipped = [r for r in data["rows"] if r["status"] == "skipped"]
    assert all(r["impl"] == "triton" for r in skipped) and bool(skipped) != interpret_mode()
    assert not any(r["status"] == "error" for r in data["rows"])
    periods = bench_bases.default_periods()
    for r in data["rows"]:
        if r["status"] == "ok" and r["kind"] in ("amortized", "period"):
            assert r["period"] == periods[r["rotation"]]
        if r["status"] == "ok" and r["kind"] == "steady":
            assert r["period"] == bench_bases.NEVER
        if r["status"] == "ok" and r["kind"] == "refresh":
            assert r["period"] == 1


def test_times_and_ratios(dry):
    data, _ = dry
    rows = [r for r in data["rows"] if r["status"] == "ok"]
    by = {(r["rotation"], r["kind"], r["impl"]): r for r in rows}
    for r in rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"], r
        if not r["derived"]:
            assert r["reps"] == 2 and len(r["all_ms"]) == 2 and all(t > 0 for t in r["all_ms"])
            assert r["cpu_median_ms"] > 0 and r["first_call_s"] > 0
        eager = by[(r["rotation"], r["kind"], "eager")]
        none = by[("none", "step", r["impl"])]
        if r["impl"] == "eager":
            assert r["x_eager"] is None
        else:
            assert r["x_eager"] == pytest.approx(r["median_ms"] / eager["median_ms"])
        assert r["x_none"] == pytest.approx(r["median_ms"] / none["median_ms"])
    assert by[("none", "step", "eager")]["x_none"] == pytest.approx(1.0)
    for (rot, kind, impl), r in by.items():
        if kind != "amortized":
            continue
        p, st, rf = r["period"], by[(rot, "steady", impl)], by[(rot, "refresh", impl)]
        assert r["derived"]
        assert r["median_ms"] == pytest.approx((rf["median_ms"] + (p - 1) * st["median_ms"]) / p)
        assert min(st["median_ms"], rf["median_ms"]) <= r["median_ms"] <= max(st["median_ms"], rf["median_ms"])


def test_what_ran(dry):
    data, _ = dry
    rows = {(r["rotation"], r["kind"], r["impl"]): r for r in data["rows"] if r["status"] == "ok"}
    for (rot, _kind, impl), r in rows.items():
        if impl == "ext" and rot in ("svd", "eigen") and not r["derived"]:
            # The extension has no dynamic-basis path: those units ran the eager reference, and the output says so.
            assert r["backend_used"] == ["eager"] and "eager reference" in r["ran"]
        if impl == "ext" and rot in ("none", "output"):
            assert r["backend_used"] == ["ext"]
        if impl == "triton" and rot == "eigen" and not r["derived"]:
            assert r["two_sided_per_step"] == 6  # q, k, v, attn.c_proj, c_fc, mlp.c_proj of the one block
            assert "two-sided kernel" in r["ran"]
        if impl == "eager":
            assert r["two_sided_per_step"] in (None, 0)


def test_markdown(dry):
    data, md = dry
    assert md.startswith("# Dynamic bases") and "Dry run" in md and "python benchmarks/bench_bases.py --dry-run" in md
    assert "| eigen | amortized (derived) | 10 |" in md and "eager x none" in md
    assert ("ext x eager" in md) == ext_available() and ("triton x eager" in md) == interpret_mode()
    if not interpret_mode():
        assert "needs CUDA tensors" in md  # why the triton rows are missing


def test_budget_cut_is_recorded(tmp_path):
    """A budget too small for the refresh group: its rows are skipped with the reason, the JSON still written."""
    argv = ["--dry-run", "--out", str(tmp_path), "--impls", "eager", "--rotations", "none,svd", "--budget-seconds", "0"]
    assert bench_bases.main(argv) == 0
    data = json.loads((tmp_path / "bench_bases.json").read_text())
    assert all(r["status"] == "skipped" for r in data["rows"]) and data["skipped"]
    assert "budget" in data["rows"][0]["reason"]

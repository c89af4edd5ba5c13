"""The CPU step benchmark's plumbing (bench_cpu_step.py): load accounting, round flagging, floors, the report.

Run with ``pytest benchmarks/test_bench_cpu_step.py`` (under a minute); the figures themselves come from the script.
"""

from __future__ import annotations

import json

import bench_cpu_step as bcs
import pytest
import torch

from rotkern._backend import ext_available


def _snap(t, busy, own, steal=0, load1=0.5):
    return bcs.Snapshot(t=t, busy=busy, steal=steal, own=own, load1=load1)


def test_foreign_cores_subtract_this_process():
    meter = bcs.LoadMeter()
    meter.hz = 100
    # 2 s: 300 busy jiffies on the machine, 180 of them ours -> others used 0.6 cores; 20 jiffies stolen.
    a, b = _snap(0.0, 1000, 500, steal=0), _snap(2.0, 1300, 680, steal=20)
    foreign, steal = meter.cores(a, b)
    assert foreign == pytest.approx(0.6) and steal == pytest.approx(0.1)


def test_windows_are_at_least_the_span_and_keep_a_burst_visible():
    meter = bcs.LoadMeter()
    meter.hz = 100
    # 0.5 s samples; others idle except for one second at a full core.
    own = [0, 50, 100, 150, 200, 250, 300]
    others = [0, 0, 0, 50, 100, 100, 100]
    snaps = [_snap(0.5 * i, own[i] + others[i], own[i]) for i in range(7)]
    wins = meter.windows(snaps, span=1.0)
    assert all(w[0] >= 1.0 for w in wins)
    assert max(w[1] for w in wins) == pytest.approx(1.0)  # the burst, not its average over the round (0.33)
    # A short tail joins the window before it instead of standing alone (10 ms ticks make short windows noise).
    wins = meter.windows(snaps[:6] + [_snap(2.6, 250, 250)], span=1.0)
    assert all(w[0] >= 1.0 for w in wins) and sum(w[0] for w in wins) == pytest.approx(2.6)
    # A round shorter than the span is one window.
    assert len(meter.windows(snaps[:2], span=1.0)) == 1


def test_each_sample_is_judged_on_a_window_around_it():
    # Snapshots 0.2 s apart; a sample is widened with its neighbours to at least the span, on both sides.
    snaps = [_snap(0.2 * i, 0, 0) for i in range(11)]
    a, b = bcs._around(snaps, 5, 1.0)
    assert b.t - a.t >= 1.0 - 1e-9 and a.t <= 0.8 and b.t >= 1.0
    a, b = bcs._around(snaps, 1, 1.0)  # the first sample widens to the right once the left side is used up
    assert a.t == 0.0 and b.t >= 1.0 - 1e-9
    a, b = bcs._around(snaps[:3], 1, 5.0)  # never wider than the round
    assert (a.t, b.t) == (0.0, snaps[2].t)


def _cand(times, quiet):
    c = bcs.Cand("x", "ext", "global", None)
    c.times, c.quiet = list(times), list(quiet)
    return c


def test_medians_come_from_quiet_samples_or_are_marked_noisy():
    row = bcs.summarize(_cand([10, 11, 50, 12, 60], [True, True, False, True, False]))
    assert row["median_ms"] == 11 and row["reps"] == 3 and not row["noisy"]
    row = bcs.summarize(_cand([10, 50, 60], [True, False, False]))
    assert row["median_ms"] == 50 and row["noisy"]  # all samples, flagged


def test_wait_quiet_returns_at_once_without_proc():
    meter = bcs.LoadMeter()
    meter.available = False
    assert meter.wait_quiet(0.25, 1.5, 10.0) < 3.0


def _group(ext_none=10.0, fused=9.0, ext_global=150.0, eager=300.0, compile_=200.0, floor=120.0, noisy=False):
    rows = [
        {"candidate": "torch-fused", "median_ms": fused},
        {"candidate": "ext none", "median_ms": ext_none},
        {"candidate": "ext global", "median_ms": ext_global, "of_floor": ext_global / floor},
        {"candidate": "eager global", "median_ms": eager},
        {"candidate": "compile global", "median_ms": compile_},
    ]
    floors = {"global": {"floor_ms": floor, "bound": "gemm", "gemm_ms": floor, "perm_ms": 80.0, "stream_ms": 5.0}}
    return {"set": "x", "block_size": 8, "threads": 1, "rows": rows, "floors": floors, "noisy": noisy}


def test_acceptance_checks_each_point():
    acc = bcs.acceptance({"groups": [_group()]})
    by = {a["check"]: a for a in acc}
    assert by["none: ext <= 1.2x torch fused"]["ok"]
    assert by["global: ext faster than eager"]["ok"] and by["global: ext faster than compile"]["ok"]
    assert by["global: ext within 1.5x of its floor (gemm)"]["ok"]
    acc = bcs.acceptance({"groups": [_group(ext_none=20.0, ext_global=250.0, floor=100.0)]})
    by = {a["check"]: a for a in acc}
    assert not by["none: ext <= 1.2x torch fused"]["ok"]
    assert not by["global: ext faster than compile"]["ok"]
    assert not by["global: ext within 1.5x of its floor (gemm)"]["ok"]
    fit = {"slope": 3e-5, "intercept": 1.0, "r2": 0.999, "loglog_slope": 0.98, "points": [(1, 2), (2, 3)]}
    scaling = {"params": {"fits_ms_vs_params": {"ext global": fit}}, "block": {"fits_ms_vs_n": {"ext global": fit}}}
    acc = bcs.acceptance({"groups": [], "scaling": scaling})
    assert [a["ok"] for a in acc] == [True, True]


def test_perm_floor_covers_the_permuted_coordinates():
    ps = bcs.build_set("tiny")
    for scope in ("none", "global", "layer", "output", "input"):
        opt = bcs.RotatedAdamW([dict(g) for g in ps.rotated_groups], lr=1e-3, rotation=scope, block_size=16)
        units = [u for gi in range(len(opt.param_groups)) for u in opt.units(gi)]
        want = sum(u.shape[0] * u.shape[1] for u in units if u.rotation is not None and u.rotation.perm_stream)
        pf = bcs.PermFloor(opt)
        assert pf.coords == want and bool(pf.jobs) == (want > 0)
        if scope in ("global", "layer"):
            assert want == ps.d  # every coordinate goes through a permutation
        pf()


def test_dry_run_writes_json_and_markdown(tmp_path):
    argv = ["--dry-run", "--out", str(tmp_path), "--no-compile", "--threads", "1", "--blocks", "16"]
    assert bcs.main(argv) == 0
    data = json.loads((tmp_path / "cpu_step.json").read_text())
    assert data["meta"]["dry_run"] and data["groups"]
    assert bool(data["acceptance"]) == ext_available()  # the acceptance is about the extension
    g = data["groups"][0]
    assert g["rounds"] and {"load1_before", "load1_after", "foreign_cores_max", "flagged"} <= set(g["rounds"][0])
    rows = {r["candidate"]: r for r in g["rows"]}
    assert all(len(r["quiet"]) == len(r["all_ms"]) == len(r["foreign_cores"]) for r in rows.values())
    names = set(rows)
    assert {"torch-fused", "eager global", "floor-perm global", "probe-gemm", "probe-stream"} <= names
    if ext_available():
        ext = {r["candidate"]: r for r in g["rows"]}["ext global"]
        assert ext["median_ms"] and ext["of_floor"] and ext["bytes_per_param"] > 0
    assert set(g["floors"]) == set(bcs.SCOPES) and g["floors"]["global"]["gemm_ms"] > 0
    assert data["scaling"]["params"]["fits_ms_vs_params"]
    assert bool(data["scaling"]["block"]["fits_ms_vs_n"]) == ext_available()  # the n sweep times the extension
    md = (tmp_path / "cpu_step.md").read_text()
    assert "Dry run" in md and "python benchmarks/bench_cpu_step.py --dry-run" in md and "## Acceptance" in md
    assert torch.get_num_threads() >= 1

"""CPU-sized optimizer-step benchmarks (pytest-benchmark), and the plumbing of bench_step.py and report.py.

    pytest benchmarks/test_bench_step.py --benchmark-disable    # every case runs once: a check, < 30 s
    pytest benchmarks/test_bench_step.py                        # CPU timings (never the performance claims:
                                                                # those come from bench_step.py on a GPU)
    TRITON_INTERPRET=1 pytest benchmarks/test_bench_step.py -m interpret   # the fused step in the interpreter
    pytest benchmarks/test_bench_step.py -m slow --benchmark-json=benchmarks/results/cpu_step.json
                                                                # CPU timings at 10.3M params: eager vs ext

Providers: torch.optim.AdamW (fused / foreach / for-loop), RotatedAdamW (eager) per scope, FusedRotatedAdamW
per scope with backend="triton" (on the CPU only under TRITON_INTERPRET=1) and backend="ext" (the compiled
extension's CPU path; after ``make ext``). Sizes: ``tiny`` is bench_step's dry-run GPT-2 (one block, n_embd 32,
15,456 parameters, block size 32); ``cpu`` (marked slow) is a 4-layer GPT with n_embd 384 and a vocabulary of
8192 (10.3M parameters, block size 384).
"""

from __future__ import annotations

import dataclasses
import json

import bench_step
import pytest
import report
import torch

from rotkern import SCOPES, FusedRotatedAdamW, RotatedAdamW
from rotkern._backend import ext_available, interpret_mode
from rotkern.optim._base import has_moment
from rotkern.trainers.models import GPTConfig

BLOCK = bench_step.DRY.block_size
CPU = dataclasses.replace(
    bench_step.DRY,
    block_size=384,
    gpt=GPTConfig(block_size=256, vocab_size=8192, n_layer=4, n_head=6, n_embd=384, attention="math"),
)
SIZES = ["tiny", pytest.param("cpu", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return bench_step.build_set("gpt2", bench_step.DRY, torch.device("cpu"))


@pytest.fixture(scope="module")
def cpu_set():
    torch.manual_seed(0)
    return bench_step.build_set("gpt2", CPU, torch.device("cpu"))


@pytest.fixture
def sized(request, small):
    return (small, BLOCK) if request.param == "tiny" else (request.getfixturevalue("cpu_set"), CPU.block_size)


def _extra_info(benchmark, ps, provider: str, scope: str, block: int = BLOCK) -> None:
    env = bench_step.environment(torch.device("cpu"))
    benchmark.extra_info.update(
        provider=provider,
        scope=scope,
        params=ps.d,
        shapes=[list(p.shape) for p in ps.params],
        dtype="float32",
        block_size=block,
        threads=torch.get_num_threads(),
        # bytes the step must move (28 per parameter); GB/s = this / the benchmark's mean time
        bytes_per_step=bench_step.BYTES_PER_PARAM * ps.d,
        **{k: env[k] for k in ("gpu", "torch", "triton", "git")},
    )


def _run(benchmark, opt, ps) -> None:
    grads = bench_step.Grads(ps.params, 2)
    before = [p.detach().clone() for p in ps.params]

    def step():
        grads.feed()
        opt.step()
        if torch.cuda.is_available() and ps.params[0].is_cuda:
            torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=5, warmup_rounds=1, iterations=1)
    # It executed: every parameter moved and has its moments, and nothing blew up.
    assert all(not torch.equal(a, p) for a, p in zip(before, ps.params, strict=True))
    assert all(torch.isfinite(p).all() for p in ps.params)
    assert all(has_moment(opt.state[p], "exp_avg_sq") for p in ps.params)
    grads.release()


@pytest.mark.parametrize("sized", SIZES, indirect=True)
@pytest.mark.parametrize("impl", ["fused", "foreach", "for-loop"])
def test_torch_adamw(benchmark, sized, impl):
    ps, block = sized
    groups = [dict(g) for g in ps.torch_groups]  # torch.optim fills its defaults into the dicts it gets
    opt = torch.optim.AdamW(groups, **bench_step.HYPER, **bench_step.ANCHORS[f"torch-{impl}"])
    _extra_info(benchmark, ps, f"torch-{impl}", "none", block)
    _run(benchmark, opt, ps)


@pytest.mark.parametrize("sized", SIZES, indirect=True)
@pytest.mark.parametrize("scope", SCOPES)
def test_rotated_eager(benchmark, sized, scope):
    ps, block = sized
    groups = [dict(g) for g in ps.rotated_groups]
    opt = RotatedAdamW(groups, **bench_step.HYPER, rotation=scope, block_size=block)
    _extra_info(benchmark, ps, "rotated-eager", scope, block)
    _run(benchmark, opt, ps)


@pytest.mark.ext
@pytest.mark.skipif(not ext_available(), reason="rotkern._C is not built (make ext)")
@pytest.mark.parametrize("sized", SIZES, indirect=True)
@pytest.mark.parametrize("scope", SCOPES)
def test_rotated_ext(benchmark, sized, scope):
    ps, block = sized
    groups = [dict(g) for g in ps.rotated_groups]
    opt = FusedRotatedAdamW(groups, **bench_step.HYPER, rotation=scope, block_size=block, backend="ext")
    _extra_info(benchmark, ps, "rotated-ext", scope, block)
    _run(benchmark, opt, ps)
    assert opt.backend_used == "ext"


@pytest.mark.interpret
@pytest.mark.parametrize("scope", SCOPES)
def test_rotated_fused(benchmark, small, scope):
    if not interpret_mode():
        pytest.skip("the Triton kernels need TRITON_INTERPRET=1 on CPU tensors")
    groups = [dict(g) for g in small.rotated_groups]
    opt = FusedRotatedAdamW(groups, **bench_step.HYPER, rotation=scope, block_size=BLOCK, backend="triton")
    _extra_info(benchmark, small, "rotated-fused", scope)
    _run(benchmark, opt, small)


# %% the script's plumbing ----------------------------------------------------------------------------
def test_dry_run_writes_everything(tmp_path):
    """A short dry run (eager rows; fused ones too under the interpreter) leaves JSON, CSV, markdown, plots."""
    argv = ["--dry-run", "--out", str(tmp_path), "--sets", "gpt2", "--scopes", "none,output", "--reps", "2"]
    argv += ["--phases", "ceilings,table,crosscheck,e2e,scale-d,scale-n,compile", "--precisions", "tf32x3,ieee"]
    argv += ["--max-params", "4096"]
    assert bench_step.main(argv) == 0
    data = json.loads((tmp_path / "bench_step.json").read_text())
    assert data["meta"]["complete"] and data["meta"]["dry_run"] and not data["errors"]
    timed = {(r["backend"], r["scope"], r["precision"]) for r in data["rows"] if r["phase"] == "table" and r["reps"]}
    assert ("torch-fused", "none", "-") in timed and ("rotated-eager", "output", "ieee") in timed
    fused = ("rotated-fused", "output", "tf32x3")
    assert (fused in timed) == interpret_mode()
    assert any(r["backend"] == "rotated-compile" for r in data["rows"])
    assert [e["backend"] for e in data["e2e"]["rows"]].count("torch-fused") == 1
    assert data["crosscheck"] and data["scaling"]["params"]["fits_ms_vs_params"]
    assert {r["d"] for r in data["rows"] if r["phase"] == "scale-d"} == {1024, 2048, 4096}
    assert any(s["what"].startswith("8,192") for s in data["skipped"])  # past --max-params: recorded as skipped
    md = (tmp_path / "bench_step.md").read_text()
    assert md.startswith("## Performance") and "Dry run" in md and "End to end" in md
    assert (tmp_path / "bench_step.csv").read_text().count("\n") == len(data["rows"]) + 1
    assert "scaling_params.png" in data["plots"] and (tmp_path / "scaling_params.png").exists()
    assert report.main([str(tmp_path / "bench_step.json"), "-o", str(tmp_path / "section.md")]) == 0
    assert f"]({tmp_path.as_posix()}/scaling_params.png)" in (tmp_path / "section.md").read_text()


def test_no_cuda_exits_cleanly(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the script would benchmark")
    assert bench_step.main(["--out", "unused"]) == 0
    assert "no CUDA device" in capsys.readouterr().out


def test_linear_fit_r2():
    fit = bench_step._linear_fit([1, 2, 3, 4], [3, 5, 7, 9])
    assert fit["slope"] == pytest.approx(2) and fit["intercept"] == pytest.approx(1) and fit["r2"] == pytest.approx(1)
    assert bench_step._linear_fit([1, 2, 3], [1, 3, 2])["r2"] < 0.5


# %% --keep-first-table and interrupts ----------------------------------------------------------------
class _StandInFused(RotatedAdamW):
    """FusedRotatedAdamW's interface on the eager step, so the fused table rows step (and get medians) on a
    CPU without the Triton interpreter: these tests check the script's budget and interrupt plumbing only."""

    def __init__(self, *args, backend: str = "triton", precision: str = "tf32x3", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.precision = precision


@pytest.fixture
def fused_stand_in(monkeypatch):
    monkeypatch.setattr(bench_step, "FusedRotatedAdamW", _StandInFused)
    monkeypatch.setattr(bench_step, "why_not_triton", lambda t: None)


TABLE_ARGV = ["--dry-run", "--sets", "gpt2", "--phases", "ceilings,table", "--scopes", "none,output", "--reps", "2"]
TABLE_ARGV += ["--precisions", "tf32x3,tf32,ieee", "--budget-seconds", "1e6"]  # tests that cut give their own


def _table_rows(data: dict) -> dict:
    return {(r["backend"], r["scope"], r["precision"]): r for r in data["rows"] if r["phase"] == "table"}


def test_keep_first_table_cuts_precisions_from_the_end(tmp_path, fused_stand_in, capsys):
    # The budget counts from bench_step's import, long ago: 1 s leaves nothing, so only the first precision stays.
    assert bench_step.main([*TABLE_ARGV, "--out", str(tmp_path), "--budget-seconds", "1", "--keep-first-table"]) == 0
    data = json.loads((tmp_path / "bench_step.json").read_text())
    rows = _table_rows(data)
    for key in [(a, "none", "-") for a in bench_step.ANCHORS] + [("rotated-eager", "none", "-")]:
        assert rows[key]["median_ms"] is not None, key  # anchors and scope none always run
    fused = rows[("rotated-fused", "output", "tf32x3")]
    assert fused["status"] == "ok" and fused["median_ms"] is not None and fused["vs_torch_fused"] is not None
    assert rows[("rotated-eager", "output", "tf32x3")]["status"] == "n/a"
    assert not {p for (_, _, p) in rows} & {"tf32", "ieee"}  # the cut precisions have no rows at all
    cut = [s for s in data["skipped"] if s["phase"] == "table"]
    assert [s["what"] for s in cut] == ["gpt2 tf32", "gpt2 ieee"]
    assert all(s["reason"].startswith("budget: estimated") for s in cut)
    assert data["meta"]["keep_first_table"]["precisions"] == ["tf32x3"]
    out = capsys.readouterr().out
    assert "skipped table gpt2 ieee" in out and "runs over budget" in out


def test_keep_first_table_keeps_what_fits(tmp_path, fused_stand_in):
    """With the budget to spare nothing is cut; the per-row estimate grows with the precisions kept."""
    assert bench_step.main([*TABLE_ARGV, "--out", str(tmp_path), "--keep-first-table"]) == 0
    data = json.loads((tmp_path / "bench_step.json").read_text())
    assert not data["skipped"] and data["meta"]["keep_first_table"]["precisions"] == ["tf32x3", "tf32", "ieee"]
    assert _table_rows(data)[("rotated-eager", "output", "ieee")]["median_ms"] is not None
    # 25 rows in the whole GPT-2 table (3 anchors, 2 of scope none, 5 per rotated scope) share its 150 s prior.
    assert bench_step.timed_rows(list(bench_step.SCOPES), list(bench_step.PRECISIONS)) == 25
    assert bench_step.timed_rows(["output"], ["tf32x3"], anchors=False) == 1  # tf32x3 has no eager row
    assert data["meta"]["keep_first_table"]["estimate_s"] > 5.0


def test_without_keep_first_table_the_set_is_skipped(tmp_path, fused_stand_in):
    assert bench_step.main([*TABLE_ARGV, "--out", str(tmp_path), "--budget-seconds", "1"]) == 0
    data = json.loads((tmp_path / "bench_step.json").read_text())
    assert not _table_rows(data)
    assert [(s["phase"], s["what"]) for s in data["skipped"]] == [("table", "gpt2")]
    assert data["meta"]["keep_first_table"] is None and not data["meta"]["interrupted"]


def _interrupt_anchor_on_call(monkeypatch, n: int) -> None:
    """The table's torch-fused step raises KeyboardInterrupt (what SIGINT raises) on its n-th call."""
    make_rows = bench_step.Bench.make_rows

    def patched(self, ps, phase, *args, **kwargs):
        rows = make_rows(self, ps, phase, *args, **kwargs)
        for r in rows:
            if phase == "table" and r.backend == "torch-fused":
                step, calls = r.fn, []

                def fn(step=step, calls=calls):
                    calls.append(1)
                    if len(calls) == n:
                        raise KeyboardInterrupt
                    return step()

                r.fn = fn
        return rows

    monkeypatch.setattr(bench_step.Bench, "make_rows", patched)


def _main_interrupted(argv: list[str]) -> int:
    try:
        return bench_step.main(argv)
    except KeyboardInterrupt:  # escaping, it would stop the whole pytest session instead of failing the test
        pytest.fail("bench_step.main let the KeyboardInterrupt through")


def test_interrupt_in_rounds_keeps_completed_rounds(tmp_path, fused_stand_in, monkeypatch, capsys):
    # Calls: 1 first call, warmup - 1 warm-up steps, then one per round: raising on the next one cuts round 3.
    done = 2
    _interrupt_anchor_on_call(monkeypatch, bench_step.DRY.warmup + done + 1)
    argv = [*TABLE_ARGV, "--out", str(tmp_path), "--reps", "10"]
    assert _main_interrupted(argv) == 130
    data = json.loads((tmp_path / "bench_step.json").read_text())
    meta = data["meta"]
    assert meta["interrupted"] and not meta["complete"]
    assert meta["interrupted_at"] == {"phase": "table gpt2", "stage": "timing rounds", "rounds_done": done}
    timed = [r for r in _table_rows(data).values() if r["status"] == "ok"]
    assert len(timed) == 10  # 5 of scope none and the anchors, 1 tf32x3 + 2 tf32 + 2 ieee of scope output
    for r in timed:  # the cut round is left out of every row; the completed ones give medians and ratios
        assert r["reps"] == done and r["median_ms"] is not None and r["p20_ms"] <= r["p80_ms"], r
        assert r["vs_torch_fused"] is not None
    assert (tmp_path / "bench_step.csv").read_text().count("\n") == len(data["rows"]) + 1
    assert "did not finish" in (tmp_path / "bench_step.md").read_text()
    cap = capsys.readouterr()
    assert "bench_step: interrupted in table gpt2, timing rounds (2 completed); saved" in cap.out
    assert "rotated-fused output tf32x3" in cap.out.split("interrupted group")[1]  # the rows measured so far
    assert "Traceback" not in cap.out + cap.err


def test_interrupt_in_first_call_still_saves(tmp_path, fused_stand_in, monkeypatch):
    _interrupt_anchor_on_call(monkeypatch, 1)
    assert _main_interrupted([*TABLE_ARGV, "--out", str(tmp_path)]) == 130
    data = json.loads((tmp_path / "bench_step.json").read_text())
    assert data["meta"]["interrupted"] and data["meta"]["interrupted_at"]["stage"] == "first calls"
    assert data["ceilings"] and _table_rows(data) and not any(r["reps"] for r in data["rows"])

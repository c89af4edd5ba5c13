"""CPU-sized optimizer-step benchmarks (pytest-benchmark), and the plumbing of bench_step.py and report.py.

    pytest benchmarks/test_bench_step.py --benchmark-disable    # every case runs once: a check, < 30 s
    pytest benchmarks/test_bench_step.py                        # CPU timings (never the performance claims:
                                                                # those come from bench_step.py on a GPU)
    TRITON_INTERPRET=1 pytest benchmarks/test_bench_step.py -m interpret   # the fused step in the interpreter

Providers: torch.optim.AdamW (fused / foreach / for-loop), RotatedAdamW (eager) per scope, FusedRotatedAdamW
per scope (Triton; on the CPU only under TRITON_INTERPRET=1). The parameter set is bench_step's dry-run GPT-2
(one block, n_embd 32, 15,456 parameters) with block size 32.
"""

from __future__ import annotations

import json

import bench_step
import pytest
import report
import torch

from rotkern import SCOPES, FusedRotatedAdamW, RotatedAdamW
from rotkern._backend import interpret_mode

BLOCK = bench_step.DRY.block_size


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    return bench_step.build_set("gpt2", bench_step.DRY, torch.device("cpu"))


def _extra_info(benchmark, ps, provider: str, scope: str) -> None:
    env = bench_step.environment(torch.device("cpu"))
    benchmark.extra_info.update(
        provider=provider,
        scope=scope,
        params=ps.d,
        shapes=[list(p.shape) for p in ps.params],
        dtype="float32",
        block_size=BLOCK,
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
    assert all("exp_avg_sq" in opt.state[p] for p in ps.params)
    grads.release()


@pytest.mark.parametrize("impl", ["fused", "foreach", "for-loop"])
def test_torch_adamw(benchmark, small, impl):
    groups = [dict(g) for g in small.torch_groups]  # torch.optim fills its defaults into the dicts it gets
    opt = torch.optim.AdamW(groups, **bench_step.HYPER, **bench_step.ANCHORS[f"torch-{impl}"])
    _extra_info(benchmark, small, f"torch-{impl}", "none")
    _run(benchmark, opt, small)


@pytest.mark.parametrize("scope", SCOPES)
def test_rotated_eager(benchmark, small, scope):
    groups = [dict(g) for g in small.rotated_groups]
    opt = RotatedAdamW(groups, **bench_step.HYPER, rotation=scope, block_size=BLOCK)
    _extra_info(benchmark, small, "rotated-eager", scope)
    _run(benchmark, opt, small)


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

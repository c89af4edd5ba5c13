"""The Triton step's kernels compiled ahead of time for sm_90 and sm_80, on a machine without a GPU.

Every variant that the launcher produces for GPT-2 124M, ViT-S/16 and ResNet-50 (block size 768, every fixed
scope, fp32 and bf16 params, each tl.dot precision, the launcher's other defaults) is compiled to a cubin with
the wheel's ptxas (``benchmarks/compile_report.py``). The test fails on a compile error, on a register
spill (the tolerated exceptions are those of ``Report.spill_note``: a variant running <= 1 % of its step's
programs; on sm_80, ptxas' occupancy trades, reported), or on shared memory above the target's per-CTA limit,
and prints one line per variant: registers, spill stores / loads, stack frame, shared memory, CTAs per SM.

Time (2 cores, quiet): 100 distinct variants, about 2 minutes; peak memory about 4.3 GB (GPT-2's global
permutation is hashed on the host). ``make test-compile`` runs it with ``-s``, which shows the tables. Triton 3.6
(the GPU machine's) and 3.9 both pass.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

# The report is a developer tool, not part of the library: it lives in benchmarks/ (its spawned compile workers
# inherit this sys.path).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import compile_report as report  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [
    pytest.mark.compile,
    pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION"),  # Triton 3.9's notice of a future default
    pytest.mark.skipif(INTERPRET, reason="compiles for CUDA: needs TRITON_INTERPRET unset (interpreter tiles differ)"),
]


def test_ctas_per_sm_follows_the_occupancy_calculator():
    sm90, sm80 = report.TARGETS["sm_90"], report.TARGETS["sm_80"]
    # 255 registers: 8 warps fill the register file; 57 KB of shared memory would allow 3 CTAs.
    assert report.ctas_per_sm(255, 57 * 1024, 8, sm90) == 1
    assert report.ctas_per_sm(255, 0, 4, sm90) == 2
    assert report.ctas_per_sm(168, 0, 8, sm90) == 1  # 168 x 32 rounds to 5376: 3 warps per sub-partition
    assert report.ctas_per_sm(128, 0, 8, sm90) == 2
    assert report.ctas_per_sm(128, 0, 4, sm90) == 4
    assert report.ctas_per_sm(32, 0, 4, sm90) == 16  # the warp limit, 64 per SM
    assert report.ctas_per_sm(64, 100 * 1024, 4, sm90) == 2  # shared memory: 2 x 101 KB of 228 KB
    assert report.ctas_per_sm(64, 100 * 1024, 4, sm80) == 1
    assert report.ctas_per_sm(64, 200 * 1024, 4, sm80) == 0  # above sm_80's 163 KB per CTA


def test_parse_ptxas_log():
    log = (
        "ptxas info    : Compiling entry function '_k' for 'sm_90a'\n"
        "ptxas info    : Function properties for _k\n"
        "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers, 8 bytes cumulative stack size\n"
    )
    figures = report.parse_ptxas_log(log)
    assert figures == dict(registers=255, stack=8, spill_stores=4, spill_loads=12, static_shared=0)
    with pytest.raises(ValueError, match="registers"):
        report.parse_ptxas_log("ptxas fatal   : something else")


def _report(target, registers, spilled, share):
    variant = report.Variant("k", {}, {}, {}, {"num_warps": 8, "num_stages": 2}, 90, {}, {("m", "s", "d", "p"): share})
    return report.Report(variant, report.TARGETS[target], registers, spilled, spilled, spilled, 1024, 8)


def test_spill_policy():
    assert not _report("sm_90", 200, 0, 0.5).problems()
    assert _report("sm_90", 128, 8, 0.5).problems()  # strict target: an occupancy spill fails
    assert _report("sm_90", 255, 8, 0.5).problems()
    assert not _report("sm_90", 255, 8, 0.005).problems()  # 0.5 % of the step's programs: negligible
    assert "negligible" in _report("sm_90", 255, 8, 0.005).spill_note()
    assert not _report("sm_80", 128, 8, 0.5).problems()  # reported only
    assert "reported" in _report("sm_80", 128, 8, 0.5).spill_note()
    assert _report("sm_80", 255, 8, 0.5).problems()  # out of registers fails everywhere


def test_gpt2_group_is_124m():
    shapes, roles, _ = report.model_group("gpt2-124m")
    assert sum(s.numel() for s in shapes) == 124_373_760  # nanoGPT GPT-2 124M (tied head, no biases)
    assert roles[:3] == ["embedding", "embedding", "vector"] and roles.count("qkv") == 12


@pytest.fixture(scope="module")
def reports():
    pytest.importorskip("triton", reason="triton is not installed")
    variants = report.default_variants(report.TARGETS.values())
    return report.compile_variants(variants)


@pytest.mark.parametrize("target", list(report.TARGETS))
def test_default_variants_compile_without_spills(reports, target):
    rs = [r for r in reports if r.target.name == target]
    notes = [f"NOTE {r.variant.label()}: {r.spill_note()}" for r in rs if r.spill_note()]
    _emit(f"{target}.md", "\n".join([report.format_table(rs), report.summary(rs), *notes]),
          f"{report.summary(rs)}; {len(notes)} tolerated spill notes")  # fmt: skip
    # Every configuration was launched and compiled: nothing was lost on the way from the launcher.
    uses = set().union(*(r.variant.uses for r in rs))
    dtypes = [str(d).removeprefix("torch.") for d in report.P_DTYPES]
    want = {(m, s, d, p) for m in report.MODELS for s in report.SCOPES for d in dtypes for p in report.PRECISIONS}
    assert uses == want
    assert {r.variant.kernel for r in rs} == set(report.KERNELS)
    problems = [f"{r.variant.label()}: {p}" for r in rs for p in r.problems()]
    assert not problems, f"{len(problems)} of {len(rs)} {target} variants:\n" + "\n".join(problems)


def test_the_report_restores_the_launcher():
    pytest.importorskip("triton", reason="triton is not installed")
    from rotkern.kernels import rotated_adamw_step as module

    before = {name: getattr(module, name) for name in (*report.KERNELS, "why_not_triton")}
    shapes, roles, mask = [torch.Size([40, 24]), torch.Size([24])], ["matrix", "vector"], [True, False]
    launches = report.launched_kernels(shapes, roles, mask, "output", [torch.float32], ["tf32x3"], block_size=16)
    kernels = [x.kernel for x in launches[(torch.float32, "tf32x3")]]
    # Rows of 24 at n = 16: blocks of 16 and residuals of 8 (two launches); the vector is unrotated.
    assert kernels == ["_rotated_adamw_kernel", "_rotated_adamw_kernel", "_adamw_kernel"]
    assert {name: getattr(module, name) for name in before} == before


@pytest.mark.parametrize("target", ["sm_90", "sm_80"])
def test_two_sided_kernel_compiles_without_spills(target):
    """The eigen scope's two-sided kernel at GPT-2's weight shapes (768 x 768, 3072 x 768, 768 x 3072; fp32 and
    bf16 params; every precision): compiles, no spill, shared memory within the target's limit."""
    tgt = report.TARGETS[target]
    variants = {}
    for launch in report.two_sided_launches():
        var = report.compile_inputs(launch, tgt.capability)
        variants.setdefault(var.key(), var)
    _assert_compile_without_spills(variants.values(), tgt, f"two_sided_{target}.md")


def _emit(name: str, text: str, line: str) -> None:
    """The full table to a file under ROTKERN_COMPILE_REPORT (default runs/compile/), one line to the console."""
    folder = Path(os.environ.get("ROTKERN_COMPILE_REPORT", "runs/compile"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text + "\n")
    print(f"\n{line} (table: {folder / name})")


def _assert_compile_without_spills(variants, tgt, name: str) -> None:
    """Compile each variant for ``tgt``: no error, no spill, shared memory within the per-CTA limit (the table
    of registers, spills and shared memory goes to a file, see _emit)."""
    lines = []
    for var in variants:
        res = report._compile(var)
        assert "error" not in res, f"{var.label()}: {res.get('error')}"
        lines.append(f"{tgt.name} {var.label()[:100]}: {res['registers']} registers, spills {res['spill_stores']}/"
                     f"{res['spill_loads']} B, {res['shared'] // 1024} KB shared")  # fmt: skip
        assert res["spill_stores"] == 0 and res["spill_loads"] == 0, var.label()
        assert res["shared"] <= tgt.max_shared_per_cta, var.label()
    _emit(name, "\n".join(lines), f"{tgt.name}: {len(lines)} variants compiled, no spills")


@pytest.mark.parametrize("scope", ["none", "output", "global"])
def test_gradscaler_variants_compile_without_spills(scope):
    """The UNSCALE variants (GradScaler's grad_scale / found_inf read in the kernels, tensor lr and betas) at GPT-2
    block shapes (a 768 x 2304 fused QKV weight, a 3072 x 768 MLP weight, a vector; n = 768), fp32 and bf16, the
    default precision: compile for sm_90 and sm_80 without a spill, within shared memory."""
    pytest.importorskip("triton", reason="triton is not installed")
    shapes = [torch.Size([2304, 768]), torch.Size([768]), torch.Size([3072, 768])]
    launches = report.launched_kernels(shapes, ["qkv", "vector", "matrix"], [True, False, True], scope,
                                       precisions=["tf32x3"], scaled=True)  # fmt: skip
    calls = [c for cs in launches.values() for c in cs]
    assert calls and all(c.kwargs["UNSCALE"] for c in calls)
    for tgt in report.TARGETS.values():
        variants = {}
        for launch in calls:
            var = report.compile_inputs(launch, tgt.capability)
            variants.setdefault(var.key(), var)
        _assert_compile_without_spills(variants.values(), tgt, f"gradscaler_{scope}_{tgt.name}.md")


@pytest.mark.parametrize("target", ["sm_90", "sm_80"])
def test_gpt2_elementwise_variants_keep_16_byte_vector_accesses(target):
    """GPT-2's element-wise (identity) chunks, fp32 and bf16 params, the launcher's aligned variant: every global
    access of a full chunk is a 16-byte vector (ld/st.global.v4). The plan starts chunks on absolute multiples of
    the block, so the kernel's alignment hints are true (tests/kernels/test_rotated_adamw_plan.py); this shows they
    still buy the vector accesses. The masked partial chunks are scalar, as before."""
    pytest.importorskip("triton", reason="triton is not installed")
    import re

    shapes, roles, mask = report.model_group("gpt2-124m")
    tgt = report.TARGETS[target]
    launches = report.launched_kernels(shapes, roles, mask, "none", precisions=["tf32x3"])
    calls = [c for cs in launches.values() for c in cs if c.kernel == "_adamw_kernel"]
    assert len(calls) == 2 and all(c.kwargs["ALIGNED"] for c in calls)  # fp32 and bf16, meta tensors are aligned
    for call in calls:
        ptx = report.compile_ptx(report.compile_inputs(call, tgt.capability))
        loads = re.findall(r"ld\.global(?:\.\w+)*?\.v(\d)\.b32", ptx)
        stores = re.findall(r"st\.global(?:\.\w+)*?\.v(\d)\.b32", ptx)
        dtype = call.kwargs["P_DTYPE"]
        print(f"\n{target} {dtype}: {len(loads)} vector loads {sorted(set(loads))}, {len(stores)} vector stores")
        # p, g, m, v read and p, m, v written as 16-byte vectors (bf16 p and g: 8 elements per v4.b32).
        assert loads.count("4") >= 4 and stores.count("4") >= 3, ptx[:2000]

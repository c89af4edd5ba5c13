"""Device memory of the Triton step's plan (rotkern.kernels._rotated_adamw_plan), measured from the plan itself:
no kernel runs, so this holds on any machine. Issue 10's statement, at GPT-2 124M's layer shapes (2 of 12
blocks, the full vocabulary), n = 768."""

import pytest
import torch

from rotkern.kernels._rotated_adamw_plan import build_plan
from rotkern.scopes import SCOPES, build_units

from ..optim.test_fused_rotated_adamw import GPT2_SHAPES

SHAPES = GPT2_SHAPES[:2] + GPT2_SHAPES[2 : 2 + 12] + GPT2_SHAPES[-1:]  # wte, wpe, blocks 0-1, ln_f


@pytest.mark.parametrize("scope", SCOPES)
def test_plan_memory_beyond_params_grads_and_state(scope, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU tile configuration
    shapes = [torch.Size(s) for s, _ in SHAPES]
    units = build_units(shapes, scope, block_size=768, seed=0, roles=[r for _, r in SHAPES])
    dtypes = [torch.float32] * len(shapes)
    plan = build_plan(units, dtypes, dtypes, None, torch.device("cpu"))
    d = sum(s.numel() for s in shapes)
    workspace, tables = 4 * plan.ws_numel, plan.metadata_bytes
    perm = plan.perm.numel() * plan.perm.element_size()
    # One fp32 workspace of at most d elements (none for rotation="none").
    assert workspace <= 4 * d and (workspace == 0) == (scope == "none")
    # Tables: the permutation (int32, d entries) for the element-wise permuted scopes, ~1-3 % of d otherwise.
    if scope in ("global", "layer"):
        assert perm == 4 * d
    else:
        assert perm <= 0.01 * 4 * d  # only the vectors longer than n are permuted
    # Block-row tables, R and tiles: 3-4 % of an fp32 d-vector at full GPT-2 (output: 14.7 MiB of 474 MiB).
    assert tables - perm <= 0.06 * 4 * d
    print(f"{scope}: workspace {workspace / (4 * d):.2f}, tables {tables / (4 * d):.3f} fp32 d-vectors")

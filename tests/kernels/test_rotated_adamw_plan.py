"""Device memory of the Triton step's plan (rotkern.kernels._rotated_adamw_plan), measured from the plan itself:
no kernel runs, so this holds on any machine. The memory bound, at GPT-2 124M's layer shapes (2 of 12
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


@pytest.mark.parametrize(
    "shapes, roles, pieces",
    [
        ([(99, 33)], ["qkv"], "qv"),  # the k third starts at element 1089: 4 bytes past a 16-byte boundary
        ([(99, 33)], ["qkv"], "q"),
        ([(3 * 700, 11), (5,), (2304, 768)], ["qkv", "vector", "qkv"], "k"),
        ([(37,), (4099,), (13, 7)], ["vector", "vector", "matrix"], "qkv"),
    ],
)
@pytest.mark.parametrize("scope", ["none", "output", "layer", "global"])
def test_identity_chunks_start_on_absolute_multiples_of_the_block(shapes, roles, pieces, scope):
    """The element-wise kernel declares its chunk bases multiples of ID_BLOCK and, with aligned params, its pointers
    16-byte aligned (vector loads): a base inside a param's piece would be a misaligned access on a GPU. Every
    chunk's base is an absolute multiple of ID_BLOCK, and the chunks of each identity piece cover it exactly once."""
    from rotkern.kernels._rotated_adamw_plan import CHUNK_FIELDS, ID_BLOCK

    shapes = [torch.Size(s) for s in shapes]
    if scope == "none" and pieces != "qkv":
        pytest.skip("qkv_pieces is for the rotated static scopes")
    units = build_units(shapes, scope, block_size=16, seed=0, roles=roles, qkv_pieces=pieces)
    dtypes = [torch.float32] * len(shapes)
    plan = build_plan(units, dtypes, dtypes, None, torch.device("cpu"))
    tables = [x.table for x in plan.launches if not x.rotated]  # none where every piece is rotated
    chunks = torch.cat(tables).reshape(-1, CHUNK_FIELDS) if tables else torch.zeros(0, CHUNK_FIELDS, dtype=torch.long)
    param, base, first, stop = (chunks[:, k] for k in range(4))
    assert (base % ID_BLOCK == 0).all()
    assert ((base <= first) & (first < stop) & (first < base + ID_BLOCK)).all()
    covered = {}
    for p, b, f, s in zip(param.tolist(), base.tolist(), first.tolist(), stop.tolist(), strict=True):
        covered.setdefault(p, []).extend(range(f, min(s, b + ID_BLOCK)))
    want = {}
    for u in units:
        if u.rotation is None:
            seg = u.segments[0]
            want.setdefault(seg.param, []).extend(range(seg.start, seg.stop))
    assert {p: sorted(v) for p, v in covered.items()} == {p: sorted(v) for p, v in want.items()}
    if pieces == "qv" and scope != "none":
        assert 1089 in first.tolist()  # the unaligned piece start is a partial chunk's first element, not a base

import pytest
import torch
from torch import nn

from rotkern.scopes import ALL_SCOPES, build_units, infer_roles, param_groups_for, unit_index_map


def _coverage(units, numels):
    """Every flat position of every param is gathered by exactly one unit."""
    seen = torch.zeros(sum(numels), dtype=torch.int64)
    for u in units:
        idx = unit_index_map(u, numels)
        assert idx.shape == torch.Size(u.shape)
        seen.index_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=torch.int64))
    return seen


@pytest.mark.parametrize("scope", ALL_SCOPES)
def test_units_cover_every_coordinate_once(scope):
    shapes = [torch.Size(s) for s in [(12, 5), (5,), (6, 3, 3, 3), (9, 4), (30, 8)]]
    roles = ["matrix", "vector", "matrix", "qkv", "embedding"]
    units = build_units(shapes, scope, block_size=4, seed=0, roles=roles)
    seen = _coverage(units, [s.numel() for s in shapes])
    assert torch.equal(seen, torch.ones_like(seen))


def test_scope_structure():
    shapes = [torch.Size((6, 10)), torch.Size((10,))]
    g = build_units(shapes, "global", block_size=4)
    assert len(g) == 1 and g[0].shape == (1, 70) and g[0].rotation.num_blocks == 17 and g[0].rotation.residual == 2
    lay = build_units(shapes, "layer", block_size=4)
    assert [u.shape for u in lay] == [(1, 60), (1, 10)]
    out = build_units(shapes, "output", block_size=4)
    assert [(u.layout, u.shape) for u in out] == [("rows", (6, 10)), ("identity", (1, 10))]
    assert out[0].rotation.perm_stream is not None  # 10 > block: permuted within the neuron
    inp = build_units(shapes, "input", block_size=8)
    assert (inp[0].layout, inp[0].shape) == ("cols", (10, 6)) and inp[0].rotation.perm_stream is None
    assert build_units(shapes, "output", vectors="rotate")[1].layout == "flat"
    assert build_units(shapes, "global", vectors="none")[1].layout == "identity"


def test_qkv_split_and_embedding_orientation():
    qkv = [torch.Size((12, 4))]
    assert [u.shape for u in build_units(qkv, "input", roles=["qkv"])] == [(4, 4)] * 3
    assert [u.shape for u in build_units(qkv, "input", roles=["qkv"], split_qkv=False)] == [(4, 12)]
    assert [u.shape for u in build_units(qkv, "layer", roles=["qkv"])] == [(1, 16)] * 3
    emb = [torch.Size((50, 8))]  # (vocab, dim), stored (in, out)
    out_t = build_units(emb, "output", roles=["embedding"])
    assert (out_t[0].layout, out_t[0].shape) == ("cols", (8, 50))  # per-dim columns over the vocabulary
    out_l = build_units(emb, "output", roles=["embedding"], embedding="as_linear")
    assert (out_l[0].layout, out_l[0].shape) == ("rows", (50, 8))  # per-token rows (paper App. C.2 reading)


def test_bad_options():
    s = [torch.Size((3, 3))]
    with pytest.raises(ValueError, match="rotation"):
        build_units(s, "diagonal")
    with pytest.raises(ValueError, match="embedding"):
        build_units(s, "output", embedding="sideways")
    with pytest.raises(ValueError, match="role"):
        build_units([torch.Size((3,))], "layer", roles=["matrix"])
    with pytest.raises(ValueError, match="block_size"):
        build_units(s, "global", block_size=0)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(20, 8)
        self.c_attn = nn.Linear(8, 24, bias=False)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.wte.weight  # tied


def test_param_groups_for_roles_and_decay():
    groups = param_groups_for(_Tiny(), weight_decay=0.1, rotation="output")
    assert len(groups) == 1
    g = groups[0]
    assert g["names"] == ["wte.weight", "c_attn.weight", "ln.weight", "ln.bias"]
    assert g["roles"] == ["embedding", "qkv", "vector", "vector"]
    assert g["decay_mask"] == [True, True, False, False] and g["rotation"] == "output"
    assert infer_roles([torch.Size((4,)), torch.Size((4, 4))]) == ["vector", "matrix"]

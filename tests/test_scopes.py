import copy

import pytest
import torch
from torch import nn

from rotkern import RotatedAdamW
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
    out_t = build_units(emb, "output", roles=["embedding"], embedding="transposed")
    assert (out_t[0].layout, out_t[0].shape) == ("cols", (8, 50))  # per-dim columns over the vocabulary (B.1)
    out_l = build_units(emb, "output", roles=["embedding"])  # the default
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


def _decay_model():
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3, bias=False))


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.SGD, torch.optim.Adam])
def test_a_torch_optimizer_refuses_the_masked_decay_group(cls):
    """torch.optim would decay the norm weight and the biases of the one masked group: it must refuse it."""
    groups = param_groups_for(_decay_model(), weight_decay=0.1)
    with pytest.raises(TypeError, match=f"{cls.__name__} ignores this param group's decay_mask.*split_decay=True"):
        cls(groups, lr=1e-3)


def test_split_decay_groups_mean_the_same_to_torch_and_rotkern():
    torch.manual_seed(0)
    model = _decay_model()
    split = param_groups_for(model, weight_decay=0.1, split_decay=True)
    assert [g["weight_decay"] for g in split] == [0.1, 0.0]
    assert [g["roles"] for g in split] == [["matrix", "matrix"], ["vector", "vector", "vector"]]
    # The same decay per parameter as the masked form, whichever optimizer reads them.
    masked = param_groups_for(model, weight_decay=0.1)[0]
    want = {n: 0.1 if d else 0.0 for n, d in zip(masked["names"], masked["decay_mask"], strict=True)}
    assert {n: g["weight_decay"] for g in split for n in g["names"]} == want
    # rotation="none" RotatedAdamW on either form equals torch AdamW on the split groups, decay included.
    models = [copy.deepcopy(model) for _ in range(3)]
    opts = [
        torch.optim.AdamW(param_groups_for(models[0], weight_decay=0.1, split_decay=True), lr=0.1),
        RotatedAdamW(param_groups_for(models[1], weight_decay=0.1, split_decay=True), lr=0.1, rotation="none"),
        RotatedAdamW(param_groups_for(models[2], weight_decay=0.1), lr=0.1, rotation="none"),
    ]
    x = torch.randn(7, 6)
    for _ in range(3):
        for m, o in zip(models, opts, strict=True):
            o.zero_grad()
            m(x).square().sum().backward()
            o.step()
    for m in models[1:]:
        for a, b in zip(models[0].parameters(), m.parameters(), strict=True):
            torch.testing.assert_close(a, b)


def test_rotkern_accepts_the_masked_group_and_zero_refuses_annotated_groups(tmp_path):
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from rotkern import FusedRotatedAdamW, RotatedSGD

    for cls in (RotatedAdamW, FusedRotatedAdamW, RotatedSGD):
        cls(param_groups_for(_decay_model(), weight_decay=0.1), lr=1e-3, rotation="global")
    groups = param_groups_for(_decay_model(), weight_decay=0.1)
    groups[0].setdefault("lr", 1e-3)  # a script's own setdefault is no optimizer adding the group
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        # ZeRO sorts a group's params by size but not its per-param lists: refused, whatever the inner class.
        for inner in (RotatedAdamW, torch.optim.AdamW):
            with pytest.raises(TypeError, match="ZeroRedundancyOptimizer sorts each group's params"):
                ZeroRedundancyOptimizer(param_groups_for(_decay_model(), weight_decay=0.1), optimizer_class=inner)
        model = _decay_model()
        plain = [{"params": [p for p in model.parameters() if p.dim() >= 2]}]  # what the message proposes
        ZeroRedundancyOptimizer(plain, optimizer_class=RotatedAdamW, lr=1e-3, rotation="global").step()
    finally:
        dist.destroy_process_group()

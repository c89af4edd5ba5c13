"""qkv_pieces: a scope restricted to some thirds (q, k, v) of a fused QKV weight (paper C.2: value alone)."""

from __future__ import annotations

import pytest
import torch

from rotkern import RotatedAdamW
from rotkern.optim._base import moment
from rotkern.scopes import build_units, check_qkv_pieces

# A fused (3 * 4, 4) qkv weight, a (4, 4) matrix and a vector.
SHAPES = [torch.Size([12, 4]), torch.Size([4, 4]), torch.Size([4])]
ROLES = ["qkv", "matrix", "vector"]


def _pieces(units, param=0):
    """{(start, stop): layout} of the units over the qkv param's values."""
    out = {}
    for u in units:
        for s in u.segments:
            if s.param == param:
                out[s.start, s.stop] = u.layout
    return out


@pytest.mark.parametrize(
    "scope, rotated", [("layer", "flat"), ("output", "rows"), ("input", "cols")], ids=["layer", "output", "input"]
)
def test_unselected_thirds_are_identity_units(scope, rotated):
    full = _pieces(build_units(SHAPES, scope, block_size=8, roles=ROLES))
    assert full == {(0, 16): rotated, (16, 32): rotated, (32, 48): rotated}
    assert _pieces(build_units(SHAPES, scope, block_size=8, roles=ROLES, qkv_pieces="v")) == {
        (0, 16): "identity",
        (16, 32): "identity",
        (32, 48): rotated,
    }
    assert _pieces(build_units(SHAPES, scope, block_size=8, roles=ROLES, qkv_pieces="kq")) == {
        (0, 16): rotated,
        (16, 32): rotated,
        (32, 48): "identity",
    }
    # The other parameters keep their units.
    a = build_units(SHAPES, scope, block_size=8, roles=ROLES)
    b = build_units(SHAPES, scope, block_size=8, roles=ROLES, qkv_pieces="v")
    assert [u.layout for u in a if u.params != (0,)] == [u.layout for u in b if u.params != (0,)]


def test_global_scope_takes_only_the_chosen_thirds():
    units = build_units(SHAPES, "global", block_size=8, roles=ROLES, qkv_pieces="v")
    shared = units[0]
    assert shared.layout == "flat"
    assert [(s.param, s.start, s.stop) for s in shared.segments] == [(0, 32, 48), (1, 0, 16), (2, 0, 4)]
    assert sorted((s.start, s.stop) for u in units[1:] for s in u.segments) == [(0, 16), (16, 32)]
    assert all(u.layout == "identity" for u in units[1:])


def test_none_scope_and_default_are_unchanged():
    for scope in ("none", "global", "layer", "output"):
        a = build_units(SHAPES, scope, block_size=8, roles=ROLES)
        b = build_units(SHAPES, scope, block_size=8, roles=ROLES, qkv_pieces="qkv")
        assert [(u.layout, u.segments, u.shape) for u in a] == [(u.layout, u.segments, u.shape) for u in b]


@pytest.mark.parametrize("bad", ["", "x", "vv", "qkvq", 3, None])
def test_bad_pieces_are_refused(bad):
    with pytest.raises(ValueError, match="qkv_pieces"):
        check_qkv_pieces(bad)
    with pytest.raises(ValueError, match="qkv_pieces"):
        build_units(SHAPES, "layer", roles=ROLES, qkv_pieces=bad)


def test_pieces_need_a_split_and_a_static_scope():
    with pytest.raises(ValueError, match="split_qkv=True"):
        build_units(SHAPES, "layer", roles=ROLES, split_qkv=False, qkv_pieces="v")
    build_units(SHAPES, "global", roles=ROLES, split_qkv=False, qkv_pieces="v")  # global needs no split
    for scope in ("svd", "eigen"):
        with pytest.raises(ValueError, match="static scopes"):
            build_units(SHAPES, scope, roles=ROLES, qkv_pieces="v")


def _group(**options):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    return params, {"params": params, "names": ["attn.c_attn.weight", "w", "ln.weight"], "roles": ROLES, **options}


def test_optimizer_group_option_is_checked_stored_and_saved():
    _, group = _group(qkv_pieces="vq")
    opt = RotatedAdamW([group], rotation="layer", block_size=8)
    assert opt.param_groups[0]["qkv_pieces"] == "qv"  # canonical order
    _, group = _group(qkv_pieces="qkv")
    assert "qkv_pieces" not in RotatedAdamW([group], rotation="layer").param_groups[0]  # the default: no key
    for bad, match in (("w", "qkv_pieces"), ("v", "split_qkv=True")):
        _, group = _group(qkv_pieces=bad, split_qkv=False)
        with pytest.raises(ValueError, match=match):
            RotatedAdamW([group], rotation="layer")
    _, group = _group(qkv_pieces="v")
    with pytest.raises(ValueError, match="static scopes"):
        RotatedAdamW([group], rotation="svd")
    # state_dict round trip: the same pieces load; a checkpoint of other pieces is refused by name.
    params, group = _group(qkv_pieces="v")
    opt = RotatedAdamW([group], rotation="layer", block_size=8)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    params2, group2 = _group(qkv_pieces="v")
    again = RotatedAdamW([group2], rotation="layer", block_size=8)
    again.load_state_dict(sd)
    for p, q in zip(params, params2, strict=True):
        assert torch.equal(moment(opt.state[p], "exp_avg"), moment(again.state[q], "exp_avg"))
    _, group3 = _group()
    with pytest.raises(ValueError, match="qkv_pieces"):
        RotatedAdamW([group3], rotation="layer", block_size=8).load_state_dict(sd)


def test_unselected_thirds_step_as_plain_adamw():
    """Over 5 steps, the q and k thirds under qkv_pieces='v' equal an unrotated optimizer's, bit for bit."""
    params, group = _group(qkv_pieces="v")
    ref_params, ref_group = _group()
    opt = RotatedAdamW([group], rotation="output", block_size=8, weight_decay=0.1)
    ref = RotatedAdamW([ref_group], rotation="none", weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, q in zip(params, ref_params, strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        opt.step()
        ref.step()
    assert torch.equal(params[0][:8], ref_params[0][:8])
    assert not torch.equal(params[0][8:], ref_params[0][8:])

"""Randomized Hadamard blocks (structure="hadamard"): orthogonality, the fast transform against the dense
blocks, power-of-two tails, determinism, every static scope against the dense oracle, every backend."""

import io

import pytest
import torch

from rotkern import FusedRotatedAdamW, RotatedAdamW, param_groups_for
from rotkern._backend import ext_available, interpret_mode, triton_available
from rotkern.rotations import BlockRotation, fwht, hadamard_block
from rotkern.scopes import SCOPES, build_units
from rotkern.testing import assert_close_to_ref, dense_adamw_oracle

from .optim._models import MLP, TinyBlock, batch_for, loss_of


@pytest.mark.parametrize("m", [1, 2, 8, 64, 1024, 4096])
def test_blocks_are_orthogonal_with_entries_of_one_size(m):
    h = hadamard_block(m, seed=0, dtype=torch.float32)
    torch.testing.assert_close(h @ h.T, torch.eye(m), rtol=0, atol=1e-6)
    torch.testing.assert_close(h.abs(), torch.full((m, m), m**-0.5), rtol=1e-6, atol=0)


def test_fwht_is_sylvesters_hadamard():
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    h8 = torch.kron(torch.kron(h2, h2), h2)
    x = torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ h8, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="power of two"):
        fwht(torch.zeros(6))


@pytest.mark.parametrize(
    "length, n, perm", [(1000, 256, ("u", 0)), (37, 64, None), (512, 128, None), (7, 4, ("x",)), (1, 1, None)]
)
def test_fast_path_is_the_dense_rotation(length, n, perm):
    rot = BlockRotation(length, n, 3, perm, structure="hadamard")
    dense = rot.dense()
    torch.testing.assert_close(dense @ dense.T, torch.eye(length, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(3, length, dtype=torch.float64)
    torch.testing.assert_close(rot.rotate(x), x @ dense.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(rot.unrotate(rot.rotate(x)), x, rtol=0, atol=1e-12)
    torch.testing.assert_close(rot.rotate(x, squared=True), x @ (dense * dense).T, rtol=0, atol=1e-12)


def test_tails_are_power_of_two_blocks_not_padding():
    rot = BlockRotation(1000, 256, 0, structure="hadamard")  # 3 x 256 + 232 = 128 + 64 + 32 + 8
    tail = rot.residual_block(torch.float64)
    assert tail.shape == (232, 232)
    starts = [0, 128, 192, 224, 232]
    for a, b in zip(starts, starts[1:], strict=False):
        torch.testing.assert_close(tail[a:b, a:b], hadamard_block(b - a, 0), rtol=0, atol=0)
        assert tail[a:b, b:].abs().sum() == 0 and tail[b:, a:b].abs().sum() == 0


def test_signs_are_seeded_and_shared():
    a, b = hadamard_block(64, 5), hadamard_block(64, 5)
    assert torch.equal(a, b) and not torch.equal(a, hadamard_block(64, 6))
    r1 = BlockRotation(300, 64, 5, structure="hadamard")
    r2 = BlockRotation(9000, 64, 5, structure="hadamard")
    assert torch.equal(r1.block(), r2.block())  # one R_n per (seed, n), as for Haar blocks


def test_block_size_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power-of-two block_size.*512 or 1024"):
        RotatedAdamW([torch.zeros(4, 4)], structure="hadamard")  # the default 768
    with pytest.raises(ValueError, match="structure"):
        RotatedAdamW([torch.zeros(4, 4)], structure="dct")
    with pytest.raises(ValueError, match="power-of-two"):
        build_units([torch.Size((4, 4))], "global", block_size=6, structure="hadamard")


def _flat(ts):
    return torch.cat([t.detach().reshape(-1).double() for t in ts])


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("model_cls", [MLP, TinyBlock])
def test_every_static_scope_matches_the_dense_oracle(scope, model_cls):
    model = model_cls()
    groups = param_groups_for(model, weight_decay=0.1)
    params = groups[0]["params"]
    theta0 = _flat(params)
    opt = RotatedAdamW(groups, lr=1e-2, betas=(0.9, 0.95), rotation=scope, block_size=8, seed=3, structure="hadamard")
    gen = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(15):
        opt.zero_grad()
        loss_of(model, batch_for(model, gen)).backward()
        grads.append(_flat([p.grad for p in params]))
        opt.step()
    mask = groups[0]["decay_mask"]
    decay = torch.cat([torch.full((p.numel(),), float(m)) for p, m in zip(params, mask, strict=True)])
    rot = opt.rotation_matrix()
    torch.testing.assert_close(rot @ rot.T, torch.eye(rot.shape[0], dtype=torch.float64), rtol=0, atol=1e-12)
    theta, _, _ = dense_adamw_oracle(
        rot, theta0, grads, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, decay=decay
    )
    assert_close_to_ref(_flat(params), theta, "ref_vs_oracle", what=f"hadamard {scope}")


def _backends():
    out = []
    if ext_available():
        out.append(pytest.param("ext", marks=pytest.mark.ext))
    out.append(
        pytest.param(
            "triton",
            marks=[
                pytest.mark.interpret,
                pytest.mark.skipif(not (triton_available() and interpret_mode()), reason="needs TRITON_INTERPRET=1"),
            ],
        )
    )
    return out


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("scope", ["global", "layer", "output", "input"])
def test_fused_backends_run_hadamard_blocks(scope, backend):
    torch.manual_seed(0)
    model = TinyBlock()
    ref_model = TinyBlock()
    ref_model.load_state_dict(model.state_dict())
    kw = dict(lr=1e-2, betas=(0.9, 0.95), rotation=scope, block_size=16, seed=2, structure="hadamard")
    fused = FusedRotatedAdamW(param_groups_for(model, weight_decay=0.1), backend=backend, **kw)
    ref = RotatedAdamW(param_groups_for(ref_model, weight_decay=0.1), **kw)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        batch = batch_for(model, gen)
        for m, o in ((model, fused), (ref_model, ref)):
            o.zero_grad()
            loss_of(m, batch).backward()
            o.step()
    assert fused.backend_used == backend
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert_close_to_ref(a, b, "fused_fp32", what=f"hadamard {scope} {backend}")


def test_checkpoints_record_the_structure():
    w = torch.randn(8, 8)
    opt = RotatedAdamW([w], rotation="layer", block_size=4, structure="hadamard")
    w.grad = torch.randn(8, 8)
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="structure"):
        RotatedAdamW([w.clone()], rotation="layer", block_size=4).load_state_dict(sd)
    # Checkpoints from before the option are Haar.
    haar = RotatedAdamW([w.clone()], rotation="layer", block_size=4)
    v = haar.param_groups[0]["params"][0]
    v.grad = torch.randn(8, 8)
    haar.step()
    old = haar.state_dict()
    del old["param_groups"][0]["structure"]
    buf = io.BytesIO()
    torch.save(old, buf)
    buf.seek(0)
    RotatedAdamW([v.clone()], rotation="layer", block_size=4).load_state_dict(torch.load(buf))

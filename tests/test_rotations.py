import subprocess
import sys

import pytest
import torch

from rotkern.rotations import MAX_BLOCK_SIZE, BlockRotation, Stream, haar_orthogonal, random_permutation
from rotkern.testing import assert_close_to_ref


@pytest.mark.parametrize("n", [1, 2, 7, 64, 768])
def test_haar_is_orthogonal_fp32(n):
    r = haar_orthogonal(n, 3)
    assert r.dtype == torch.float32 and r.is_contiguous()
    err = (r @ r.T - torch.eye(n)).abs().max().item()
    assert err <= 1e-6, err


def _haar_stats(sampler, n=256, seeds=(1, 2, 3, 4)):
    """Entries of sqrt(n) R should look N(0, 1); the diagonal must not be biased (the sign fix)."""
    mats = [sampler(n, s).double() * n**0.5 for s in seeds]
    e = torch.cat([m.flatten() for m in mats])
    kurt = (((e - e.mean()) ** 4).mean() / e.var() ** 2).item()
    diag = torch.cat([torch.diagonal(m) for m in mats])
    return {"mean": e.mean().item(), "var": e.var().item(), "kurtosis": kurt, "diag_mean": diag.mean().item()}


def _stats_ok(s, n=256, k=4):
    # 4-sigma bands; the diagonal mean of k*n N(0,1) entries has sd 1/sqrt(k n).
    return (
        abs(s["mean"]) < 0.03
        and abs(s["var"] - 1) < 0.03
        and abs(s["kurtosis"] - 3) < 0.15
        and abs(s["diag_mean"]) < 4 / (k * n) ** 0.5
    )


def test_haar_statistics_and_negative_control():
    good = _haar_stats(lambda n, s: haar_orthogonal(n, s, dtype=torch.float64))
    assert _stats_ok(good), good

    def qr_without_sign_fix(n, s):
        g = torch.from_numpy(Stream(s, "haar", n).normal(n * n).reshape(n, n))
        return torch.linalg.qr(g)[0]

    bad = _haar_stats(qr_without_sign_fix)
    assert not _stats_ok(bad), f"a non-Haar sampler passed the check: {bad}"


def test_haar_keeps_reflections():
    dets = {round(torch.linalg.det(haar_orthogonal(5, s, dtype=torch.float64)).item()) for s in range(40)}
    assert dets == {-1, 1}


def test_stream_is_deterministic_and_seed_sensitive():
    a = Stream(7, "x", 3).uint64(10)
    b = Stream(7, "x", 3).uint64(10)
    c = Stream(8, "x", 3).uint64(10)
    assert (a == b).all() and not (a == c).all()
    with pytest.raises(TypeError):
        Stream(1.5)


def test_random_permutation_is_a_permutation():
    p = random_permutation(1001, 5)
    assert torch.equal(torch.sort(p).values, torch.arange(1001))
    assert not torch.equal(p, torch.arange(1001))
    assert torch.equal(p, random_permutation(1001, 5))


@pytest.mark.parametrize("length", [1, 7, 769, 100003])
@pytest.mark.parametrize("block", [1, 2, 768])
@pytest.mark.parametrize("permute", [True, False])
def test_rotate_unrotate_roundtrip(length, block, permute):
    rot = BlockRotation(length, block, seed=11, perm_stream=("t",) if permute else None)
    x = torch.randn(3, length)
    y = rot.rotate(x)
    assert y.shape == x.shape
    # Orthogonal: norms are preserved, and unrotate inverts rotate.
    assert_close_to_ref(y.norm(dim=1), x.norm(dim=1), "roundtrip_fp32", what="norm")
    back = rot.unrotate(y)
    rel = ((back - x).norm() / x.norm()).item()
    assert rel <= 1e-6, rel
    assert rot.num_blocks == length // block and rot.residual == length - (length // block) * block


def test_rotate_matches_dense_construction():
    rot = BlockRotation(23, 5, seed=2, perm_stream=("u",))
    dense = rot.dense()
    x = torch.randn(4, 23, dtype=torch.float64)
    assert torch.allclose(rot.rotate(x), x @ dense.T, atol=1e-12)
    assert torch.allclose(rot.unrotate(x), x @ dense, atol=1e-12)
    # Built by hand: B P with B = diag(R5, R5, R5, R5, R3) and (P x)[i] = x[perm[i]].
    perm = rot.permutation()
    r5, r3 = rot.block(torch.float64), rot.residual_block(torch.float64)
    xp = x[:, perm]
    y = torch.cat([xp[:, 5 * j : 5 * j + 5] @ r5.T for j in range(4)] + [xp[:, 20:] @ r3.T], dim=1)
    assert torch.allclose(rot.rotate(x), y, atol=1e-12)


def test_blocks_are_shared_across_rotations_with_one_seed():
    a = BlockRotation(1000, 16, seed=4, perm_stream=("a",))
    b = BlockRotation(77, 16, seed=4, perm_stream=("b",))
    assert torch.equal(a.block(), b.block())
    assert not torch.equal(a.block(), BlockRotation(32, 16, seed=5).block())


@pytest.mark.parametrize("bad", [0, -3, MAX_BLOCK_SIZE + 1, 2.5, True])
def test_bad_block_size(bad):
    with pytest.raises(ValueError, match="block_size"):
        BlockRotation(10, bad, seed=0)


_PRINT_ROTATION = """
import hashlib, torch
from rotkern.rotations import BlockRotation
r = BlockRotation(5000, 768, seed=123, perm_stream=("unit", 0))
h = hashlib.sha256()
h.update(r.block().numpy().tobytes()); h.update(r.residual_block().numpy().tobytes())
h.update(r.permutation().numpy().tobytes())
print(h.hexdigest())
"""


def test_same_seed_same_rotation_in_fresh_processes():
    outs = [
        subprocess.run([sys.executable, "-c", _PRINT_ROTATION], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    assert outs[0] == outs[1] and len(outs[0].strip()) == 64

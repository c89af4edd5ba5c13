"""FSDP2 (``fully_shard``, DTensor params sharded on dim 0) with 2 and 4 gloo processes on the CPU.

Each test launches tests/_fsdp_worker.py with torchrun (bounded by a timeout) and checks what rank 0 wrote:
exact scopes (none, output's row units, gathered units, svd, eigen) against single-process training on the same
batches, shard-local scopes for determinism and bit-identical resume through torch.distributed.checkpoint,
resharding (allowed where the rotation does not depend on the world size, refused where it does) and the
collectives one optimizer step issues.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from ._trainer_helpers import torchrun

WORKER = Path(__file__).with_name("_fsdp_worker.py")
pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs gloo"
)


def launch(world: int, out: Path, *args: str, backend: str = "eager") -> dict:
    # The worker runs on the CPU with gloo wherever it runs (its FSDP mesh is a CPU one, also where a GPU is visible).
    run = torchrun(world, str(WORKER), args[0], str(out), *args[1:], env={"ROTKERN_TEST_BACKEND": backend}, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    return torch.load(out, weights_only=False)


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


EXACT = "none,output,output:transposed,input:gather,layer:gather,global:gather,svd,eigen"


@pytest.mark.parametrize("world", [2, 4])
def test_exact_scopes_match_single_process_training(world, tmp_path):
    res = launch(world, tmp_path / "m.pt", "match", EXACT if world == 2 else "none,output,layer:gather,svd")
    for spec, r in res.items():
        # Every rank sees the same batch, so FSDP's averaged gradient is the full one bit for bit; the row units and
        # the gathered ones then step exactly as unsharded (measured: identical; 1e-6 leaves room for BLAS blocking).
        assert max_diff(r["sharded"], r["single"]) <= 1e-6, spec
        assert r["steps"] == 20.0
    # Communication of one optimizer step: none and output's row units need none (the embedding's too: its
    # default reading rotates each token's row); under embedding="transposed" output gathers the embedding, whose
    # length-vocab columns span the shards.
    assert res["none"]["step_calls"] == {}
    assert res["output"]["step_calls"] == {}
    if "output:transposed" in res:
        assert res["output:transposed"]["step_calls"] == {"all_gather_into_tensor": 4}  # param, grad, m, v
    assert res["layer:gather"]["step_calls"]["all_gather_into_tensor"] == 4 * 6  # 6 params (wte tied to head)


def test_shard_local_scopes_are_deterministic_and_resume_bit_identically(tmp_path):
    match = launch(2, tmp_path / "m.pt", "match", "layer,global,input")
    for spec in ("layer", "global", "input"):
        r = match[spec]
        assert r["step_calls"] == {}, spec  # shard-local: no communication in the optimizer step
        assert max_diff(r["sharded"], r["single"]) > 1e-4, spec  # a different rotation from unsharded training
    res = launch(2, tmp_path / "r.pt", "resume", "layer", str(tmp_path / "ckpt"), "10")
    assert max_diff(res["straight"], res["resumed"]) == 0.0  # save with DCP, load, continue: bit-identical
    assert max_diff(res["straight"], match["layer"]["sharded"]) == 0.0  # and the same as a run without the save
    refused = launch(4, tmp_path / "l.pt", "load", "layer", str(tmp_path / "ckpt"), "10")
    assert "shard_layout is [2] in the checkpoint but [4]" in refused["error"]
    assert "rotation='layer' with shard_mode='local'" in refused["error"]


def test_exact_scopes_reshard_through_dcp(tmp_path):
    res = launch(2, tmp_path / "r.pt", "resume", "svd", str(tmp_path / "ckpt"), "10")
    assert max_diff(res["straight"], res["resumed"]) == 0.0
    loaded = launch(4, tmp_path / "l.pt", "load", "svd", str(tmp_path / "ckpt"), "10")
    assert loaded["error"] is None
    assert max_diff(loaded["params"], res["straight"]) <= 1e-6  # saved by 2 ranks, continued by 4


@pytest.mark.ext
def test_the_extension_steps_the_local_shards(tmp_path):
    from rotkern._backend import ext_available

    if not ext_available():
        pytest.skip("needs the compiled extension (make ext)")
    res = launch(2, tmp_path / "m.pt", "match", "none,output,layer:gather,layer", backend="ext")
    for spec in ("none", "output", "layer:gather"):  # the eager single-process run is the reference
        assert max_diff(res[spec]["sharded"], res[spec]["single"]) <= 1e-5, spec
    assert res["layer"]["step_calls"] == {}


@pytest.mark.interpret
def test_the_triton_kernels_step_the_local_shards(tmp_path):
    from rotkern._backend import triton_available

    if not (triton_available() and os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs TRITON_INTERPRET=1 on a CPU")
    # (svd and eigen: their fused steps diverge from eager ones through ill-conditioned bases on this tiny model,
    # as unsharded; tests/optim/test_svd_scope.py judges them against float64)
    res = launch(2, tmp_path / "m.pt", "match", "output,layer:gather,global:gather", backend="triton")
    for spec, r in res.items():
        assert max_diff(r["sharded"], r["single"]) <= 1e-5, spec


def test_unsupported_layouts_are_refused_before_any_change():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from rotkern import RotatedAdamW

    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        col = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)])
        with pytest.raises(ValueError, match=r"placements \(Shard\(dim=1\),\).*sharded on dim 0"):
            RotatedAdamW([col], rotation="output")
        row = distribute_tensor(torch.randn(4, 6), mesh, [Shard(0)])
        with pytest.raises(ValueError, match="plain tensor in a param group of DTensors"):
            RotatedAdamW([row, torch.randn(3)], rotation="output")
        with pytest.raises(ValueError, match="shard_mode='nope' is not one of"):
            RotatedAdamW([{"params": [row], "shard_mode": "nope"}], rotation="layer")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("world", [1, 2])
def test_the_ecosystem_checkpoint_round_trips_resume_bit_identically(world, tmp_path):
    """torchtitan's path: get/set_optimizer_state_dict with and without flatten_optimizer_state_dict=True, and
    torch.distributed.checkpoint save/load of the flattened dicts, each resumed at step 10 of 20."""
    scopes = "none,global,layer,output,input,svd,eigen"
    res = launch(world, tmp_path / "e.pt", "ecosystem", scopes, str(tmp_path / "ckpt"), "10")
    assert set(res) == set(scopes.split(","))
    for spec, r in res.items():
        for how in ("memory", "memory-flat", "dcp-flat"):
            assert max_diff(r[how], r["straight"]) == 0.0, (spec, how)


def test_zero_redundancy_optimizer_checkpoint_resumes_bit_identically(tmp_path):
    """ZeroRedundancyOptimizer over 2 ranks: consolidate, save, load into a fresh one at step 10 of 20. Its
    load copies rank 0's group keys (per-param lists included) into every rank's local optimizer."""
    scopes = "none,global,layer,output,input,svd,eigen"
    res = launch(2, tmp_path / "z.pt", "zero", scopes, "10")
    assert set(res) == set(scopes.split(","))
    for spec, r in res.items():
        assert max_diff(r["resumed"], r["straight"]) == 0.0, spec

"""The CPU suite on a machine with one CUDA GPU, shown without one: torch is made to report CUDA with one device.

The trainers' ``--device=auto`` then means CUDA, and cuda:LOCAL_RANK in each torchrun process (cuda:1 does not
exist). The shared helpers (tests/_trainer_helpers.py, tests/_fsdp_worker.py) must still put the trainer tests on
the CPU with gloo, FSDP must still shard over a CPU mesh, and a torchrun run of CUDA ranks must skip for want of
GPUs (a trainer launched so anyway stops with one error naming --nproc_per_node and --device=cpu).
"""

from __future__ import annotations

import inspect
import subprocess

import pytest
import torch
import torch.distributed as dist

from rotkern.trainers import train as train_mod
from rotkern.trainers.__main__ import main
from rotkern.trainers.common import TrainerError

from . import _fsdp_worker as fsdp_worker
from . import _trainer_helpers as helpers


class _Stop(Exception):
    """Raised in place of init_process_group: the backend was chosen, nothing more to run."""


def test_the_cpu_suite_stays_on_the_cpu_on_a_one_gpu_host(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    resolve = inspect.unwrap(train_mod.resolve_device)  # the trainer's own (conftest's guard refuses "auto")

    # What the helpers avoid: "auto" is CUDA here, and torchrun's second process would ask for cuda:1.
    assert resolve("auto") == torch.device("cuda", 0)
    with pytest.raises(TrainerError, match=r"--device=auto means cuda:1 .*has 1 CUDA device.*--nproc_per_node.*cpu"):
        resolve("auto", 1)
    assert helpers.gpu_shortage(1) is None

    # The helpers' configs name the CPU, for every rank.
    assert resolve(helpers.fast_config(tmp_path).device, 1) == torch.device("cpu")
    assert resolve(train_mod.TrainConfig(**helpers.CPU).device, 1) == torch.device("cpu")

    # The launcher: CUDA ranks skip for want of GPUs; the default command line puts every rank on gloo.
    launched = []

    def run(cmd, **kw):
        launched.append(cmd)
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(helpers.subprocess, "run", run)
    with pytest.raises(pytest.skip.Exception, match=r"2 CUDA ranks need 2 CUDA devices .*this machine has 1"):
        helpers.torchrun_train(2, "--steps=1", timeout=1, device="cuda")
    assert launched == []
    helpers.torchrun_train(2, "--steps=1", f"--out_dir={tmp_path / 'ddp'}", timeout=1)
    (cmd,) = launched
    assert "--nproc_per_node=2" in cmd
    options = cmd[cmd.index("train") + 1 :]
    backends = []

    def init_process_group(backend=None, **kw):
        backends.append(backend)
        raise _Stop

    with monkeypatch.context() as m:  # rank 1 of 2, as torchrun starts it
        m.setenv("WORLD_SIZE", "2")
        m.setenv("RANK", "1")
        m.setenv("LOCAL_RANK", "1")
        m.setattr(dist, "init_process_group", init_process_group)
        with pytest.raises(_Stop):
            main(["train", *options])
        with pytest.raises(_Stop):
            train_mod.train(helpers.fast_config(tmp_path / "one"))
    assert backends == ["gloo", "gloo"]

    # FSDP: the trainer's shard_model for a CPU run and the worker of tests/test_fsdp.py shard over CPU meshes
    # (FSDP's default mesh is the accelerator's: it would move their models onto CUDA).
    meshes = []
    real = fsdp_worker.fully_shard

    def fully_shard(module, *args, mesh=None, **kw):
        meshes.append(mesh.device_type if mesh is not None else None)
        return real(module, *args, mesh=mesh, **kw)

    monkeypatch.setattr(torch.distributed.fsdp, "fully_shard", fully_shard)
    monkeypatch.setattr(fsdp_worker, "fully_shard", fully_shard)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        from rotkern.trainers.fsdp import shard_model
        from rotkern.trainers.models import MODELS, build_model

        model = shard_model(build_model(MODELS["gpt-tiny"]), torch.device("cpu"))
        model, *_ = fsdp_worker.build("none")
        assert meshes and set(meshes) == {"cpu"}, meshes
        assert {p.device.type for p in model.parameters()} == {"cpu"}
    finally:
        dist.destroy_process_group()

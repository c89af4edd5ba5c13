"""``train --fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) over the torchrun processes, with rotkern's
shard-aware optimizers (:mod:`rotkern.optim._sharded`) and checkpoints through ``torch.distributed.checkpoint``.

Sharding: every element of the model's ``nn.ModuleList`` containers (GPT blocks, ViT layers) is its own FSDP
unit, then the root (embeddings, head, norms; a tied embedding and head stay one parameter). Parameters, their
gradients and the optimizer's moments are DTensors sharded on dim 0.

Checkpoints: rank 0 writes ``ckpt.pt`` as without FSDP but with ``model`` and ``optimizer`` left out and
``"dcp": "ckpt_dcp"``, and every rank writes its shards into the ``ckpt_dcp/`` folder beside it (DCP's format;
``python -m torch.distributed.checkpoint.format_utils dcp_to_torch RUN/ckpt_dcp out.pt`` gives one file).
A resume with another number of processes reshards everything except the moments of a shard-local rotation
(``input``/``layer``/``global`` under ``shard_mode=local``), which the optimizer refuses with the scope named.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

DCP_FOLDER = "ckpt_dcp"


def shard_model(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """Apply FSDP2 in place: each ModuleList element, then the root. Returns the model (now FSDP-managed).

    ``device``: shard over a mesh of its type. Without it FSDP's default mesh is the machine's accelerator, which
    moves a model meant for the CPU (``--device=cpu`` under gloo) onto CUDA wherever a GPU is visible."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),)) if device is not None else None
    for mod in list(model.modules()):
        if isinstance(mod, nn.ModuleList):
            for block in mod:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def save(model: nn.Module, opt: torch.optim.Optimizer, folder: Path) -> None:
    """Every rank writes its shards of the model and optimizer state (collective: call on all ranks)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(folder))


def load(model: nn.Module, opt: torch.optim.Optimizer, folder: Path) -> None:
    """Load what :func:`save` wrote, resharded to this world size (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optimizer": osd}
    dcp.load(state, checkpoint_id=str(folder))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_tensor(x: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a collective), else x."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x

"""Baseline optimizers for the trainers beside rotated AdamW: Muon (paper Alg 6) and SOAP (the eigen scope).

``--optimizer muon``: ``torch.optim.Muon`` (rotkern's :class:`rotkern.optim.muon.Muon` where the installed torch
lacks it) on the 2-D hidden weight matrices, with Moonshot's lr adjustment (``match_rms_adamw``) so that AdamW's lr
and schedule carry over, and AdamW on the embeddings, the input/output layers, vectors and conv kernels (paper
App. E; :func:`rotkern.optim.muon.muon_param_split`), stepped together as one optimizer.

``--optimizer soap``: :class:`rotkern.RotatedAdamW` with ``rotation="eigen"`` and SOAP's basis options
(``basis_change="transport_m"``; ``precondition_every``, ``shampoo_beta``, ``max_precond_dim`` from the config).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..optim.muon import Muon as _RotkernMuon
from ..optim.muon import muon_param_split

__all__ = ["MuonWithAdamW", "muon_class"]


def muon_class() -> type:
    """torch.optim.Muon where the installed torch has it, else rotkern's implementation of Alg 6."""
    return getattr(torch.optim, "Muon", _RotkernMuon)


class MuonWithAdamW:
    """Muon on a model's hidden matrices and AdamW on the rest, behaving as one optimizer for a training loop.

    ``param_groups`` lists Muon's groups, then AdamW's (setting ``lr`` on each sets both schedules);
    ``state_dict()`` is ``{"muon": ..., "adamw": ...}``.

    Args:
        model: the module; its trainable parameters are split by :func:`muon_param_split`.
        lr, betas, eps, weight_decay: AdamW's; Muon gets the same lr and weight decay.
        momentum: Muon's momentum (default 0.95, with Nesterov).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        momentum: float = 0.95,
    ) -> None:
        hidden, rest = muon_param_split(model)
        if not hidden:
            raise ValueError(
                "optimizer=muon: the model has no 2-D hidden weight matrix for Muon (conv kernels and the "
                "embedding / head layers stay on AdamW); use adamw"
            )
        self.muon = muon_class()(
            [p for _, p in hidden], lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw"
        )
        decay = [p for _, p in rest if p.dim() >= 2]
        no_decay = [p for _, p in rest if p.dim() < 2]
        both = ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        groups = [g for g in both if g["params"]]
        self.adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps) if groups else None
        self.hidden_names = [n for n, _ in hidden]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.muon, self.adamw) if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": None if self.adamw is None else self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or set(state_dict) != {"muon", "adamw"}:
            raise ValueError("MuonWithAdamW.load_state_dict: expected {'muon': ..., 'adamw': ...} like state_dict()")
        if (state_dict["adamw"] is None) != (self.adamw is None):
            raise ValueError("MuonWithAdamW.load_state_dict: the checkpoint splits the parameters differently")
        self.muon.load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])

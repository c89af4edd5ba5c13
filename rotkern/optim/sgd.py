"""RotatedSGD: SGD with momentum in a rotated basis. SGD-M is rotation-equivariant (paper Prop. 2.2), so
its trajectory equals plain SGD-M's; it exists to show that contrast with Adam."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..kernels.reference import rotated_sgdm_ref
from ._base import RotatedOptimizerBase, as_real, check_hyper, moment

__all__ = ["RotatedSGD"]


class RotatedSGD(RotatedOptimizerBase):
    """torch.optim.SGD (momentum, dampening, coupled weight decay, nesterov) with the momentum buffer in a
    rotated basis. Same rotation options as :class:`rotkern.RotatedAdamW`.

    State per param: ``step`` and ``momentum_buffer`` (param shape, rotated layout, compute dtype).
    """

    _moment_keys = ("momentum_buffer",)

    def _check_hyperparameters(self, group: dict[str, Any], where: str) -> None:
        check_hyper("learning rate", group["lr"], where=where, tensor_name="lr")
        check_hyper("momentum value", group["momentum"], where=where)
        check_hyper("weight_decay value", group["weight_decay"], where=where)

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        rotation: str = "global",
        block_size: int = 768,
        seed: int = 0,
        structure: str = "haar",
        split_qkv: bool = True,
        embedding: str = "as_linear",
        vectors: str = "auto",
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        check_hyper("learning rate", lr, tensor_name="lr")
        check_hyper("momentum value", momentum)
        check_hyper("weight_decay value", weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            rotation=rotation,
            block_size=block_size,
            seed=seed,
            structure=structure,
            split_qkv=split_qkv,
            embedding=embedding,
            vectors=vectors,
        )
        super().__init__(params, defaults, compute_dtype)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step. closure: re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for plan in self._plan_steps():
            run = self._run_group(plan)
            if run is None:
                continue
            params, grads, states = run
            group = plan.group
            rotated_sgdm_ref(
                params,
                grads,
                [s and as_real(moment(s, "momentum_buffer")) for s in states],
                [s and s["step"] for s in states],
                plan.units,
                lr=float(group["lr"]),
                momentum=group["momentum"],
                dampening=group["dampening"],
                weight_decay=group["weight_decay"],
                decay_mask=group["decay_mask"],
                nesterov=group["nesterov"],
                maximize=group["maximize"],
            )
            self._finish_group(plan)
        return loss

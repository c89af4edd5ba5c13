"""RotatedAdamW: AdamW in a rotated parameter space (paper Alg 4), the eager fp32 reference."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..kernels.reference import rotated_adamw_ref
from ._base import RotatedOptimizerBase, check_hyper

__all__ = ["RotatedAdamW"]


class RotatedAdamW(RotatedOptimizerBase):
    """AdamW whose moments live in a seeded, permuted, block-rotated basis.

    Forward and backward stay in the standard basis. Each step the gradient is permuted and rotated,
    ``g~ = B(pi g)``; Adam's ``exp_avg`` and ``exp_avg_sq`` are updated on ``g~``; the update
    ``m^/(sqrt(v^)+eps)`` is rotated back, un-permuted and applied with decoupled weight decay in the
    standard basis (SPEC section 1). ``rotation="none"`` is exactly ``torch.optim.AdamW``.

    Arguments mirror :class:`torch.optim.AdamW` (same defaults); the keyword-only rotation options are
    defaults for every param group, and each group may override them.

    Args:
        rotation: scope: ``none`` | ``global`` | ``layer`` | ``output`` | ``input``.
        block_size: Haar block size n (default 768, the paper's).
        seed: rotation seed; the same seed gives the same rotations on any machine.
        split_qkv: rotate the thirds of fused QKV weights (role ``qkv``) as separate layers.
        embedding: ``transposed`` (paper B.1) or ``as_linear``; see :mod:`rotkern.scopes`.
        vectors: policy for 1-D params: ``auto`` | ``rotate`` | ``none``.
        compute_dtype: torch.float32 (default) or torch.float64 (for precision tests); moments are
            stored in this dtype whatever the param dtype.

    State per param (torch.optim.AdamW's keys): ``step`` (float32 scalar), ``exp_avg``, ``exp_avg_sq``
    and with amsgrad ``max_exp_avg_sq``, each with the param's shape, holding the rotated-layout moments.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        rotation: str = "global",
        block_size: int = 768,
        seed: int = 0,
        split_qkv: bool = True,
        embedding: str = "transposed",
        vectors: str = "auto",
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        check_hyper("learning rate", lr)
        check_hyper("epsilon value", eps)
        check_hyper("beta parameter at index 0", betas[0], 0.0, 1.0)
        check_hyper("beta parameter at index 1", betas[1], 0.0, 1.0)
        check_hyper("weight_decay value", weight_decay)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            rotation=rotation,
            block_size=block_size,
            seed=seed,
            split_qkv=split_qkv,
            embedding=embedding,
            vectors=vectors,
        )
        super().__init__(params, defaults, compute_dtype)

    _moment_keys = ("exp_avg", "exp_avg_sq")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step. closure: re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            prepared = self._prepare(gi, group, ("max_exp_avg_sq",) if group["amsgrad"] else ())
            if prepared is None:
                continue
            grads, units, states = prepared
            params = group["params"]
            beta1, beta2 = group["betas"]
            self._rotated_adamw(
                group,
                params,
                grads,
                [s and s["exp_avg"] for s in states],
                [s and s["exp_avg_sq"] for s in states],
                [s and s.get("max_exp_avg_sq") for s in states] if group["amsgrad"] else None,
                [s and s["step"] for s in states],
                units,
                lr=group["lr"],
                beta1=_scalar(beta1),
                beta2=_scalar(beta2),
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                decay_mask=group["decay_mask"],
                amsgrad=group["amsgrad"],
                maximize=group["maximize"],
            )
        return loss

    def _rotated_adamw(self, group: dict, *args, lr: float | torch.Tensor, **kwargs) -> None:
        """The functional step; subclasses swap in a fused implementation with this signature.

        ``lr`` is the group's as given (a tensor lr stays a tensor, so fused steps can read it on the device).
        """
        rotated_adamw_ref(*args, lr=_scalar(lr), **kwargs)


def _scalar(x: float | torch.Tensor) -> float:
    return x.item() if torch.is_tensor(x) else float(x)

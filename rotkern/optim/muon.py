"""Muon (paper Alg. 6, App. E), for torch versions without ``torch.optim.Muon``, and the split of a model's
parameters that Muon is meant for.

    B_t = mu B_{t-1} + G_t                      (momentum buffer)
    B'  = G_t + mu B_t  (nesterov)  or  B_t
    O   = NS5(B' / (||B'||_F + eps))            (quintic Newton-Schulz: approximately U V^T of B')
    W  <- W (1 - lr wd) - lr' O                 (lr' = lr, scaled per adjust_lr_fn)

Newton-Schulz: X <- a X + (b A + c A^2) X with A = X X^T on the wide orientation, 5 steps, (a, b, c) =
(3.4445, -4.775, 2.0315), which maps every singular value of the normalised B' into about [0.7, 1.2]. The update
runs in float32 here (torch's runs its iterations in bfloat16), so the two agree to bf16 precision, not bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.optim import Optimizer

from ._base import check_hyper

__all__ = ["Muon", "muon_param_split", "newton_schulz5", "NS_COEFFICIENTS"]

NS_COEFFICIENTS = (3.4445, -4.775, 2.0315)
# Names of the input and output layers the paper keeps on AdamW with the embeddings and the vectors (rotkern's GPT,
# SimpleViT and ResNet, and common names elsewhere).
HEAD_NAMES = ("lm_head.weight", "head.weight", "linear_head.weight", "fc.weight", "classifier.weight",
              "patch_proj.weight")  # fmt: skip


def newton_schulz5(b: torch.Tensor, steps: int = 5, eps: float = 1e-7, coefficients=NS_COEFFICIENTS) -> torch.Tensor:
    """NS5 of a 2-D matrix b (any float dtype; computed in float32): approximately U V^T of b's SVD."""
    a_, b_, c_ = coefficients
    x = b.float()
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    x = x / (x.norm() + eps)
    for _ in range(steps):
        a = x @ x.T
        x = a_ * x + (b_ * a + c_ * a @ a) @ x
    return (x if wide else x.T).to(b.dtype)


class Muon(Optimizer):
    """Muon (paper Alg 6) for 2-D parameters; ``torch.optim.Muon``'s arguments and defaults.

    Args:
        params: 2-D tensors (hidden weight matrices); anything else raises ValueError.
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps: as ``torch.optim.Muon``.
        adjust_lr_fn: ``None`` / ``"original"`` (lr x sqrt(max(1, rows / cols)), Keller Jordan's) or
            ``"match_rms_adamw"`` (lr x 0.2 sqrt(max(rows, cols)), Moonshot's: AdamW's lr carries over).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = None,
    ) -> None:
        check_hyper("learning rate", lr, tensor_name="lr")
        check_hyper("weight_decay value", weight_decay)
        check_hyper("momentum value", momentum, 0.0, 1.0)
        if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
            raise ValueError(f"adjust_lr_fn={adjust_lr_fn!r} is not None, 'original' or 'match_rms_adamw'")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=ns_coefficients,
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(
                        f"Muon takes 2-D parameters only (got shape {tuple(p.shape)}); give vectors, embeddings and "
                        "the output layer to AdamW (rotkern.optim.muon.muon_param_split)"
                    )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            mu = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Muon does not support sparse gradients")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                b = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
                o = newton_schulz5(b, group["ns_steps"], group["eps"], group["ns_coefficients"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(o, alpha=-_adjusted_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return loss


def _adjusted_lr(lr: float, fn: str | None, shape: Sequence[int]) -> float:
    rows, cols = shape[0], shape[1]
    if fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * math.sqrt(max(1.0, rows / cols))


def muon_param_split(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(Muon's, AdamW's) trainable named parameters, as the paper (Alg 6) splits them: Muon takes the 2-D hidden
    weight matrices; AdamW the embeddings (``nn.Embedding`` weights, and a head tied to one), the input and output
    layers (names in :data:`HEAD_NAMES`, matched as the last name parts), vectors, and conv kernels (Muon here is
    for 2-D matrices only)."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = any(name == h or name.endswith("." + h) for h in HEAD_NAMES)
        hidden = p.dim() == 2 and id(p) not in embedding_ids and not head
        (muon if hidden else adamw).append((name, p))
    return muon, adamw

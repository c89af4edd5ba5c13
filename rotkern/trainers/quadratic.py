"""The paper's Figure 4 in miniature: Adam, rotated Adam and SGD-M on an ill-conditioned quadratic,
axis-aligned and after a rotation of the problem.

f(x) = 1/2 (x - x*)^T H (x - x*) with H = diag(lambda) (axis-aligned) or Q diag(lambda) Q^T (rotated
by a Haar Q). Adam exploits an axis-aligned curvature; rotating the problem, or running Adam in a
rotated basis, takes that away. SGD-M cannot tell the two problems apart (Prop. 2.2).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

from ..optim import RotatedAdamW
from ..rotations import MAX_BLOCK_SIZE, haar_orthogonal
from .common import Range, check_ranges


@dataclass
class QuadraticConfig:
    dim: int = 64  # dimension of the loss-table problem
    condition: float = 1000.0  # lambda_max / lambda_min, log-spaced spectrum
    steps: int = 300  # optimizer steps per run
    adam_lr: float = 0.05  # learning rate of Adam and rotated Adam
    sgdm_lr: float = 1.0e-3  # ~ 1 / lambda_max
    momentum: float = 0.9  # SGD-M's momentum
    seed: int = 0  # seeds the problem and the optimizer rotation
    out_dir: str = "runs/quadratic"  # where the table and the trajectory plot go
    plot: bool = True  # write trajectories.png (needs matplotlib)

    # dim is also the rotation's block size (one Haar block over the whole problem)
    RANGES: ClassVar[dict[str, Range]] = {
        "dim": Range(1, MAX_BLOCK_SIZE), "condition": Range(1), "steps": Range(1), "adam_lr": Range(0, open_lo=True),
        "sgdm_lr": Range(0, open_lo=True), "momentum": Range(0, 1, open_hi=True), "seed": Range(0, 2**63 - 1),
    }  # fmt: skip


def _problem(dim: int, condition: float, rotate: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lam = torch.logspace(0, math.log10(condition), dim, dtype=torch.float64)
    h = torch.diag(lam)
    gen = torch.Generator().manual_seed(seed)
    x_star = torch.randn(dim, generator=gen, dtype=torch.float64)
    e0 = torch.randn(dim, generator=gen, dtype=torch.float64)
    if rotate:
        # Rotate the whole problem, start included, so that only the basis differs between the two.
        q = haar_orthogonal(dim, seed + 1000, dtype=torch.float64)
        h, e0 = q @ h @ q.T, q @ e0
    return h, x_star, x_star + e0


def _make_opt(name: str, x: torch.Tensor, cfg: QuadraticConfig):
    if name == "adam":
        return torch.optim.Adam([x], lr=cfg.adam_lr)
    if name == "rotated adam":
        return RotatedAdamW(
            [x],
            lr=cfg.adam_lr,
            weight_decay=0.0,
            rotation="global",
            block_size=x.numel(),
            seed=cfg.seed,
            compute_dtype=torch.float64,
        )
    if name == "sgd-m":
        return torch.optim.SGD([x], lr=cfg.sgdm_lr, momentum=cfg.momentum)
    raise ValueError(name)


OPTIMIZERS = ("adam", "rotated adam", "sgd-m")


def run_one(name: str, h: torch.Tensor, x_star: torch.Tensor, x0: torch.Tensor, cfg: QuadraticConfig):
    """Losses and iterates of one optimizer: (steps + 1,) losses, (steps + 1, dim) iterates."""
    x = x0.clone().requires_grad_()
    opt = _make_opt(name, x, cfg)
    losses, path = [], [x0.clone()]

    def loss_fn():
        e = x - x_star
        return 0.5 * e @ h @ e

    for _ in range(cfg.steps):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        losses.append(loss.item())
        opt.step()
        path.append(x.detach().clone())
    losses.append(loss_fn().item())
    return losses, torch.stack(path)


def main(cfg: QuadraticConfig) -> dict:
    check_ranges(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    print(f"quadratic: dim={cfg.dim} condition={cfg.condition:g} steps={cfg.steps} seed={cfg.seed}")
    table = {}
    for rotate in (False, True):
        h, xs, x0 = _problem(cfg.dim, cfg.condition, rotate, cfg.seed)
        for name in OPTIMIZERS:
            losses, _ = run_one(name, h, xs, x0, cfg)
            table[(name, rotate)] = losses[-1]
    lines = [
        "| optimizer | axis-aligned H | rotated H | rotated / aligned |",
        "|---|---|---|---|",
    ]
    for name in OPTIMIZERS:
        a, r = table[(name, False)], table[(name, True)]
        lines.append(f"| {name} | {a:.3e} | {r:.3e} | {r / max(a, 1e-300):.3g} |")
    text = "\n".join(lines)
    h, xs, x0 = _problem(cfg.dim, cfg.condition, False, cfg.seed)
    print(
        f"final loss after {cfg.steps} steps, from initial loss {0.5 * (x0 - xs) @ h @ (x0 - xs):.3e} on both problems:"
    )
    print(text)
    result = {
        "config": asdict(cfg),
        "final_loss": {f"{n}|{'rotated' if r else 'aligned'}": v for (n, r), v in table.items()},
    }
    with open(os.path.join(cfg.out_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(cfg.out_dir, "result.json"), "w") as f:
        json.dump(result, f, indent=2)
    if cfg.plot:
        result["plot"] = _plot(cfg)
        print(f"trajectory plot: {result['plot']}")
    return result


def _plot(cfg: QuadraticConfig) -> str:
    """2-D trajectories on the aligned and the rotated problem (the Figure 4 picture)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    small = QuadraticConfig(
        **{**asdict(cfg), "dim": 2, "condition": 25.0, "steps": 60, "adam_lr": 0.1, "sgdm_lr": 0.02}
    )
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, rotate in zip(axes, (False, True), strict=True):
        h, xs, x0 = _problem(2, small.condition, rotate, cfg.seed)
        span = (x0 - xs).abs().max().item() * 1.4
        gx, gy = torch.meshgrid(
            torch.linspace(-span, span, 200, dtype=torch.float64),
            torch.linspace(-span, span, 200, dtype=torch.float64),
            indexing="xy",
        )
        e = torch.stack([gx, gy], -1)
        z = 0.5 * torch.einsum("...i,ij,...j->...", e, h, e)
        ax.contour((gx + xs[0]).numpy(), (gy + xs[1]).numpy(), z.numpy(), levels=15, cmap="Greys", linewidths=0.6)
        for name, color in zip(OPTIMIZERS, ("tab:blue", "tab:red", "tab:green"), strict=True):
            _, path = run_one(name, h, xs, x0, small)
            ax.plot(path[:, 0].numpy(), path[:, 1].numpy(), ".-", ms=3, lw=1, color=color, label=name)
        ax.plot([xs[0].item()], [xs[1].item()], "k*", ms=10)
        ax.set_title(("rotated H: " if rotate else "axis-aligned H: ") + "the 2-D problem's two coordinates")
        ax.set_xlabel("x[0] (standard basis)")
        ax.set_ylabel("x[1] (standard basis)")
        ax.set_aspect("equal")
    axes[0].legend(loc="best")
    fig.suptitle("Iterates on loss contours (star: the minimum): Adam depends on the basis; SGD-M does not")
    path = os.path.join(cfg.out_dir, "trajectories.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""SimpleViT, following "Better plain ViT baselines" (Beyer et al. 2022; lucidrains' simple_vit.py; paper
App. B.2): patch embedding with LayerNorms, fixed 2-D sin-cos positions, pre-norm blocks with a fused
``to_qkv``, mean pooling. Attention: SDPA on the ``attention`` backend (math by default, as for GPT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._common import QKV_TYPES, register, sdpa_context

__all__ = ["ViTConfig", "posemb_sincos_2d", "ViTAttention", "FeedForward", "SimpleViT"]


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    num_classes: int = 1000
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_dim: int = 1536
    channels: int = 3
    patch_norm: bool = True  # LayerNorm over each flattened patch (SimpleViT's); off for 1-channel 2x2 patches
    attention: str = "math"


def posemb_sincos_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(h w, dim) fixed 2-D sin-cos position embedding (dim divisible by 4)."""
    assert dim % 4 == 0, "the sin-cos embedding needs dim divisible by 4"
    y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    omega = torch.arange(dim // 4) / max(dim // 4 - 1, 1)
    omega = 1.0 / (temperature**omega)
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).float()


class ViTAttention(nn.Module):
    def __init__(self, dim: int, heads: int, attention: str) -> None:
        super().__init__()
        self.heads, self.attention = heads, attention
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.to_qkv(self.norm(x)).split(c, dim=2)
        q, k, v = (z.view(b, n, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        with sdpa_context(self.attention):
            y = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(y.transpose(1, 2).reshape(b, n, c))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class SimpleViT(nn.Module):
    """x: (b, channels, image_size, image_size) -> logits (b, num_classes)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.config = cfg
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        g = cfg.image_size // cfg.patch_size
        patch_dim = cfg.channels * cfg.patch_size**2
        self.patch_norm = nn.LayerNorm(patch_dim) if cfg.patch_norm else nn.Identity()
        self.patch_proj = nn.Linear(patch_dim, cfg.dim)
        self.embed_norm = nn.LayerNorm(cfg.dim)
        self.register_buffer("pos_embedding", posemb_sincos_2d(g, g, cfg.dim), persistent=False)
        self.layers = nn.ModuleList(
            nn.ModuleList([ViTAttention(cfg.dim, cfg.heads, cfg.attention), FeedForward(cfg.dim, cfg.mlp_dim)])
            for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self.linear_head = nn.Linear(cfg.dim, cfg.num_classes)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        b, c, h, w = img.shape
        p = self.config.patch_size
        # b c (h p1) (w p2) -> b (h w) (p1 p2 c)
        x = img.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), -1)
        x = self.embed_norm(self.patch_proj(self.patch_norm(x)))
        x = x + self.pos_embedding.to(x.dtype)
        for attn, ff in self.layers:
            x = x + attn(x)
            x = x + ff(x)
        return self.linear_head(self.norm(x).mean(dim=1))


# SimpleViT's patch projection is its `embedding`; its FeedForward is (LayerNorm, Linear, GELU, Linear).
register(
    ViTConfig,
    SimpleViT,
    kind="image",
    order=1,
    presets={
        "vit-s16": ViTConfig(),
        # A LayerNorm over 4 grey pixels would erase each patch's brightness: no patch norm at this size.
        "vit-tiny": ViTConfig(
            image_size=8, patch_size=2, num_classes=10, dim=64, depth=2, heads=2, mlp_dim=128, patch_norm=False
        ),
    },
    patterns=(
        (r"(^|\.)patch_proj\.", ("embedding",)),
        (r"(^|\.)(patch_norm|embed_norm|norm)\.", ("norm",)),
        (r"\.to_qkv\.", QKV_TYPES),
        (r"\.to_out\.", ("attn_out",)),
        (r"\.\d+\.1\.0\.", ("norm",)),
        (r"\.\d+\.1\.1\.", ("mlp_in",)),
        (r"\.\d+\.1\.3\.", ("mlp_out",)),
        (r"(^|\.)linear_head\.", ("head",)),
    ),
)

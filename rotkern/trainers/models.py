"""The paper's three models in plain torch (paper App. B.2): nanoGPT's GPT, SimpleViT and ResNet.

GPT follows nanoGPT's model.py: no biases, tied wte / lm_head, fused ``c_attn`` (role ``qkv`` for the
scopes), GELU MLP, init N(0, 0.02) with residual projections scaled by 1/sqrt(2 n_layer). SimpleViT follows
"Better plain ViT baselines" (Beyer et al. 2022; lucidrains' simple_vit.py): patch embedding with
LayerNorms, fixed 2-D sin-cos positions, pre-norm blocks with a fused ``to_qkv``, mean pooling. ResNet is
torchvision's v1.5 (stride on the 3x3 conv) with a small-image stem option.

Attention runs through ``F.scaled_dot_product_attention`` on the math backend by default: the paper
turned FlashAttention off [N B.2]. ``attention=`` picks another backend (``auto`` lets torch choose).
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_BACKENDS = ("math", "auto", "flash", "efficient", "cudnn")


def sdpa_context(backend: str):
    """Context manager restricting SDPA to one backend (``auto``: no restriction)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention={backend!r}; choose one of {ATTENTION_BACKENDS}")
    if backend == "auto":
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return contextlib.nullcontext()
    which = {
        "math": SDPBackend.MATH,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[backend]
    return sdpa_kernel([which])


# -- GPT (nanoGPT) -------------------------------------------------------------------------------------


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length
    vocab_size: int = 50304  # GPT-2's 50257 padded to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = False
    attention: str = "math"


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head, self.n_embd, self.dropout, self.attention = cfg.n_head, cfg.n_embd, cfg.dropout, cfg.attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        with sdpa_context(self.attention):
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
            )
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c)))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """idx: (b, t) int64 token ids, t <= block_size; returns (logits (b, t, vocab), mean cross-entropy or None)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        b, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} > block_size {self.config.block_size}")
        pos = torch.arange(t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss


# -- SimpleViT -----------------------------------------------------------------------------------------


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


# -- ResNet (torchvision v1.5) -------------------------------------------------------------------------


@dataclass
class ResNetConfig:
    block: str = "bottleneck"  # basic | bottleneck
    layers: str = "3,4,6,3"  # blocks per stage
    width: int = 64  # channels of the first stage
    num_classes: int = 1000
    channels: int = 3
    stem: str = "imagenet"  # imagenet: 7x7/2 conv + max-pool; small: 3x3/1 conv (8x8 .. 32x32 images)
    image_size: int = 224


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + identity)


class ResNet(nn.Module):
    """x: (b, channels, h, w) -> logits (b, num_classes)."""

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        self.config = cfg
        block = {"basic": BasicBlock, "bottleneck": Bottleneck}[cfg.block]
        layers = [int(n) for n in cfg.layers.split(",")]
        if cfg.stem == "imagenet":
            self.conv1 = nn.Conv2d(cfg.channels, cfg.width, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(cfg.channels, cfg.width, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(cfg.width)
        self.inplanes = cfg.width
        stages = []
        for i, n in enumerate(layers):
            stages.append(self._make_layer(block, cfg.width * 2**i, n, stride=1 if i == 0 else 2))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(self.inplanes, cfg.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        out = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        out += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# -- presets -------------------------------------------------------------------------------------------

MODELS: dict[str, GPTConfig | ViTConfig | ResNetConfig] = {
    "gpt2-124m": GPTConfig(),
    "gpt-tiny": GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=64),
    "vit-s16": ViTConfig(),
    # A LayerNorm over 4 grey pixels would erase each patch's brightness: no patch norm at this size.
    "vit-tiny": ViTConfig(
        image_size=8, patch_size=2, num_classes=10, dim=64, depth=2, heads=2, mlp_dim=128, patch_norm=False
    ),
    "resnet50": ResNetConfig(),
    "resnet18": ResNetConfig(block="basic", layers="2,2,2,2"),
    "resnet-tiny": ResNetConfig(block="basic", layers="1,1,1", width=16, num_classes=10, stem="small", image_size=8),
}


# -- layer types (paper C.2's per-type ablation) ------------------------------------------------------------

# Every layer type a model may define, in the paper's order (C.2: Q, K, V, attention output, MLP in, MLP out,
# embedding), then the types the paper's GPT-2 ablation has no row for.
LAYER_TYPES = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out", "embedding", "norm", "conv", "head")
QKV_TYPES = ("q", "k", "v")

# Per model class: (regex searched in the parameter name, its types), first match wins. A bias has its layer's
# type. A fused QKV weight has the three types q, k, v: its thirds along dim 0 (role qkv in rotkern.scopes).
# GPT's lm_head is tied to wte, so the one tensor is `embedding` (GPT defines no `head`); wpe is `embedding` too.
# SimpleViT's patch projection is its `embedding`; its FeedForward is (LayerNorm, Linear, GELU, Linear).
LAYER_TYPE_PATTERNS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "GPT": (
        (r"(^|\.)(wte|wpe|lm_head)\.", ("embedding",)),
        (r"(^|\.)ln_(\d+|f)\.", ("norm",)),
        (r"\.attn\.c_attn\.", QKV_TYPES),
        (r"\.attn\.c_proj\.", ("attn_out",)),
        (r"\.mlp\.c_fc\.", ("mlp_in",)),
        (r"\.mlp\.c_proj\.", ("mlp_out",)),
    ),
    "SimpleViT": (
        (r"(^|\.)patch_proj\.", ("embedding",)),
        (r"(^|\.)(patch_norm|embed_norm|norm)\.", ("norm",)),
        (r"\.to_qkv\.", QKV_TYPES),
        (r"\.to_out\.", ("attn_out",)),
        (r"\.\d+\.1\.0\.", ("norm",)),
        (r"\.\d+\.1\.1\.", ("mlp_in",)),
        (r"\.\d+\.1\.3\.", ("mlp_out",)),
        (r"(^|\.)linear_head\.", ("head",)),
    ),
    "ResNet": (
        (r"(^|\.)(conv\d+|downsample\.0)\.", ("conv",)),
        (r"(^|\.)(bn\d+|downsample\.1)\.", ("norm",)),
        (r"(^|\.)fc\.", ("head",)),
    ),
}


def layer_types(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Parameter name (``named_parameters()``, trainable ones) -> its layer types (three for a fused QKV weight).

    ValueError for a model class without patterns or a parameter no pattern matches."""
    import re

    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    patterns = LAYER_TYPE_PATTERNS.get(type(model).__name__)
    if patterns is None:
        raise ValueError(f"no layer types are defined for {type(model).__name__} (models.LAYER_TYPE_PATTERNS)")
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        types = next((t for pat, t in patterns if re.search(pat, name)), None)
        if types is None:
            raise ValueError(f"parameter {name!r} of {type(model).__name__} matches no layer type pattern")
        out[name] = types
    return out


@functools.cache
def model_layer_types(name: str) -> tuple[str, ...]:
    """The layer types a model preset defines, in LAYER_TYPES order (the model is built on the meta device)."""
    with torch.device("meta"):
        model = build_model(MODELS[name])
    found = {t for types in layer_types(model).values() for t in types}
    return tuple(t for t in LAYER_TYPES if t in found)


def model_kind(name: str) -> str:
    """``text`` (GPT) or ``image`` (ViT, ResNet)."""
    if name not in MODELS:
        raise KeyError(name)
    return "text" if isinstance(MODELS[name], GPTConfig) else "image"


def model_config(name: str, **overrides) -> GPTConfig | ViTConfig | ResNetConfig:
    """The preset's config with the given fields replaced (unknown fields are ignored)."""
    cfg = MODELS[name]
    known = {k: v for k, v in overrides.items() if k in cfg.__dataclass_fields__ and v is not None}
    return replace(cfg, **known)


def build_model(cfg: GPTConfig | ViTConfig | ResNetConfig) -> nn.Module:
    if isinstance(cfg, GPTConfig):
        return GPT(cfg)
    if isinstance(cfg, ViTConfig):
        return SimpleViT(cfg)
    return ResNet(cfg)

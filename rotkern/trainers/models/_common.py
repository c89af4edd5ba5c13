"""What every model family shares: the SDPA backend switch, the layer types, and the registry that the family
files fill (``register``) and ``build_model`` / ``model_config`` / ``model_kind`` / ``layer_types`` read.

A family file calls ``register(ConfigClass, ModelClass, kind=..., presets={...}, patterns=(...), order=...)``
once at import. ``order`` fixes where its presets and patterns sit in ``MODELS`` and ``LAYER_TYPE_PATTERNS``
(CLIs print MODELS' keys as choices), independent of the order the package imports its files in.
"""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass, replace
from typing import Any

import torch
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


# -- layer types (paper C.2's per-type ablation) ------------------------------------------------------------

# Every layer type a model may define, in the paper's order (C.2: Q, K, V, attention output, MLP in, MLP out,
# embedding), then the types the paper's GPT-2 ablation has no row for.
LAYER_TYPES = ("q", "k", "v", "attn_out", "mlp_in", "mlp_out", "embedding", "norm", "conv", "head")
QKV_TYPES = ("q", "k", "v")

# -- the registry ------------------------------------------------------------------------------------------

# preset name -> config (a dataclass instance of a registered config class), in family order, then each
# family's own preset order.
MODELS: dict[str, Any] = {}
# Per model class name: (regex searched in the parameter name, its types), first match wins. A bias has its
# layer's type. A fused QKV weight has the three types q, k, v: its thirds along dim 0 (role qkv in
# rotkern.scopes). Each family file documents its own patterns.
LAYER_TYPE_PATTERNS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {}


@dataclass(frozen=True)
class Family:
    config: type  # the config dataclass
    model: type  # nn.Module subclass, built as model(config)
    kind: str  # "text" or "image"
    order: int


_FAMILIES: list[Family] = []
_ORDER: dict[str, int] = {}  # preset / pattern key -> its family's order, for the sort in _reorder


def register(
    config: type,
    model: type,
    *,
    kind: str,
    presets: dict[str, Any],
    patterns: tuple[tuple[str, tuple[str, ...]], ...],
    order: int,
) -> None:
    """Register a model family: its config class, model class, ``kind`` (``text`` / ``image``), its presets
    (name -> config instance) and its layer-type patterns (keyed by the model class's name)."""
    if kind not in ("text", "image"):
        raise ValueError(f"kind={kind!r}; choose text or image")
    if any(f.config is config for f in _FAMILIES):
        raise ValueError(f"{config.__name__} is registered twice")
    clash = set(presets) & set(MODELS)
    if clash or model.__name__ in LAYER_TYPE_PATTERNS:
        raise ValueError(f"{model.__name__}: presets {sorted(clash)} or its patterns are registered already")
    _FAMILIES.append(Family(config, model, kind, order))
    _FAMILIES.sort(key=lambda f: f.order)  # stable: equal orders keep registration order
    for name, cfg in presets.items():
        MODELS[name] = cfg
        _ORDER[name] = order
    LAYER_TYPE_PATTERNS[model.__name__] = patterns
    _ORDER[model.__name__] = order
    _reorder(MODELS)
    _reorder(LAYER_TYPE_PATTERNS)


def _reorder(table: dict) -> None:
    """Sort ``table`` in place by family order (stable: a family's own entries keep their order)."""
    items = sorted(table.items(), key=lambda kv: _ORDER[kv[0]])
    table.clear()
    table.update(items)


def _family(cfg) -> Family:
    for f in _FAMILIES:
        if isinstance(cfg, f.config):
            return f
    raise TypeError(f"no model family is registered for {type(cfg).__name__} (models.register)")


def layer_types(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Parameter name (``named_parameters()``, trainable ones) -> its layer types (three for a fused QKV weight).

    ValueError for a model class without patterns or a parameter no pattern matches."""
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
    """``text`` (GPT) or ``image`` (ViT, ResNet): the ``kind`` its family registered."""
    if name not in MODELS:
        raise KeyError(name)
    return _family(MODELS[name]).kind


def model_config(name: str, **overrides):
    """The preset's config with the given fields replaced (unknown fields are ignored)."""
    cfg = MODELS[name]
    known = {k: v for k, v in overrides.items() if k in cfg.__dataclass_fields__ and v is not None}
    return replace(cfg, **known)


def build_model(cfg) -> nn.Module:
    """The registered model class of ``cfg``'s config class, built from ``cfg``."""
    return _family(cfg).model(cfg)

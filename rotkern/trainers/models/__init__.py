"""The trainers' models in plain torch, one file per family (paper App. B.2): ``gpt.py`` (nanoGPT's GPT),
``vit.py`` (SimpleViT), ``resnet.py`` (torchvision's ResNet v1.5). ``_common.py`` holds what they share: the
SDPA backend switch (``ATTENTION_BACKENDS``, ``sdpa_context``), ``LAYER_TYPES`` / ``QKV_TYPES``, the registry
(``MODELS``, ``LAYER_TYPE_PATTERNS``, ``register``) and the functions that read it (``build_model``,
``model_config``, ``model_kind``, ``layer_types``, ``model_layer_types``).

Adding a model = adding one file here, ``rotkern/trainers/models/<family>.py`` (no leading underscore; this
package imports every such module with pkgutil, nothing else to edit). The file must define:

- a config ``@dataclass`` (its fields are what ``model_config(name, **overrides)`` may override) and an
  ``nn.Module`` built as ``Model(cfg)``;
- ``__all__``: its public names, re-exported here (``from rotkern.trainers.models import Model``);
- one call ``register(Config, Model, kind="text" | "image", order=N, presets={name: Config(...)},
  patterns=((regex, layer types), ...))``: ``presets`` go into ``MODELS`` (the CLIs' ``--model`` choices),
  ``patterns`` into ``LAYER_TYPE_PATTERNS[Model.__name__]`` (every trainable parameter must match one; types
  from ``LAYER_TYPES``), ``order`` places the family in both tables (GPT 0, ViT 1, ResNet 2).
"""

from __future__ import annotations

import importlib
import pkgutil

from ._common import (
    ATTENTION_BACKENDS,
    LAYER_TYPE_PATTERNS,
    LAYER_TYPES,
    MODELS,
    QKV_TYPES,
    build_model,
    layer_types,
    model_config,
    model_kind,
    model_layer_types,
    register,
    sdpa_context,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "LAYER_TYPE_PATTERNS",
    "LAYER_TYPES",
    "MODELS",
    "QKV_TYPES",
    "build_model",
    "layer_types",
    "model_config",
    "model_kind",
    "model_layer_types",
    "register",
    "sdpa_context",
]

for _info in pkgutil.iter_modules(__path__):
    if _info.name.startswith("_"):
        continue
    _module = importlib.import_module(f"{__name__}.{_info.name}")
    for _name in _module.__all__:
        globals()[_name] = getattr(_module, _name)
    __all__ += _module.__all__
del _info, _module, _name

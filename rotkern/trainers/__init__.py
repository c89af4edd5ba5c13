"""Stage 6: runnable experiments (``python -m rotkern.trainers <command>``). Nothing in the core imports them.

Models live in the package ``rotkern.trainers.models``, one file per family (``gpt.py``, ``vit.py``,
``resnet.py``; shared code and the registry in ``_common.py``). A new model is one new file
``rotkern/trainers/models/<family>.py``, picked up by the package's pkgutil import: it defines a config
dataclass, the ``nn.Module`` (built as ``Model(cfg)``), ``__all__``, and calls ``register(Config, Model, kind=...,
order=..., presets={...}, patterns=(...))`` so ``MODELS``, ``build_model``, ``model_kind`` and ``layer_types``
know it (details in ``rotkern/trainers/models/__init__.py``).
"""

"""The trainers' optimizer options, declared once: each is a field of :class:`rotkern.trainers.train.TrainConfig`
made by :func:`option`, which records (beside the default; the help is the field's comment, as for every option)
the optimizer keyword it becomes, the optimizers that take it, its choices or its Range. The CLI (``--help``,
refusals), ``TrainConfig.RANGES``, ``check_config`` and ``make_optimizer`` all read these records, so a new
optimizer option is one field line (and its comment) in TrainConfig.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .common import Range

# The optimizers make_optimizer builds (soap is rotated-eager with SOAP's basis options; see make_optimizer).
ADAMW = "adamw"
SGDM = "sgdm"
MUON = "muon"
ROTATED_SGDM = "rotated-sgdm"
ROTATED_EAGER = "rotated-eager"
ROTATED_FUSED = "rotated-fused"
ROTATED_ADAMW = (ROTATED_EAGER, ROTATED_FUSED)
ROTATED = (ROTATED_SGDM, *ROTATED_ADAMW)  # the rotation options (scope, blocks, orientation)
ADAM = (ADAMW, MUON, *ROTATED_ADAMW)  # betas, eps
ALL = (ADAMW, SGDM, MUON, *ROTATED)


@dataclass(frozen=True)
class OptimizerOption:
    """What a TrainConfig field means to the optimizers: ``kwarg`` (with ``index``: that item of a tuple keyword,
    as beta1 / beta2 make betas) for each optimizer in ``takes``, its value passed through ``convert`` (per
    optimizer, e.g. muon's own momentum default)."""

    kwarg: str | None = None
    takes: tuple[str, ...] = ()
    index: int | None = None
    convert: Mapping[str, Callable[[Any], Any]] = dataclasses.field(default_factory=dict)


def option(
    default: Any,
    kwarg: str | None = None,
    takes: tuple[str, ...] = (),
    *,
    range: Range | None = None,  # noqa: A002 - the Range of the field
    choices: tuple[str, ...] | None = None,
    index: int | None = None,
    convert: Mapping[str, Callable[[Any], Any]] | None = None,
) -> Any:
    """A TrainConfig field with its optimizer keyword, the optimizers that take it, its Range or its choices."""
    meta = {"optimizer": OptimizerOption(kwarg, tuple(takes), index, dict(convert or {}))}
    if range is not None:
        meta["range"] = range
    if choices is not None:
        meta["choices"] = tuple(choices)
    return dataclasses.field(default=default, metadata=meta)


def ranges(cfg_cls, extra: Mapping[str, Range]) -> dict[str, Range]:
    """The class's RANGES: ``extra`` (the other options') and the options' own, in field order."""
    out = {}
    for f in dataclasses.fields(cfg_cls):
        allowed = f.metadata.get("range", extra.get(f.name))
        if allowed is not None:
            out[f.name] = allowed
    return out


def choices(cfg_cls) -> dict[str, tuple[str, ...]]:
    """Field name -> its allowed values, for the fields declared with choices (in field order)."""
    return {f.name: f.metadata["choices"] for f in dataclasses.fields(cfg_cls) if "choices" in f.metadata}


def optimizer_kwargs(cfg, cfg_cls, name: str) -> dict[str, Any]:
    """The keywords the options of ``cfg`` (fields declared on ``cfg_cls``) give optimizer ``name``."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg_cls):
        opt = f.metadata.get("optimizer")
        if opt is None or opt.kwarg is None or name not in opt.takes:
            continue
        value = getattr(cfg, f.name)
        value = opt.convert[name](value) if name in opt.convert else value
        if opt.index is None:
            out[opt.kwarg] = value
        else:
            items = list(out.get(opt.kwarg, ()))
            items[opt.index : opt.index + 1] = [value]
            out[opt.kwarg] = tuple(items)
    return out

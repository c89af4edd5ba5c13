"""Rotation scopes: which coordinates are rotated together (paper Sec. 3.1, App. B.1).

A scope turns a parameter group into *units*. A unit is a family of equal-length vectors, gathered
from the parameters as the rows of a (num_vectors, L) matrix, that all share one :class:`BlockRotation`:

=========  ==========================================================================================
scope      units
=========  ==========================================================================================
none       one identity unit per parameter
global     one ``flat`` unit: all (unfrozen) parameters flattened and concatenated, element-wise permutation
layer      one ``flat`` unit per weight (q, k, v separately when a fused QKV weight is split)
output     one ``rows`` unit per weight: each row of the (out, in) matrix, i.e. the weights that end at
           one output neuron
input      one ``cols`` unit per weight: each column, i.e. the weights that start at one input neuron
svd        one ``svd`` unit per weight (q, k, v separately): the (out, in) matrix, rotated on both sides by
           the singular bases of its gradient, recomputed every ``svd_every`` steps (paper Alg 5)
eigen      one ``eigen`` unit per weight (q, k, v separately): the (out, in) matrix, rotated on both sides by
           the eigenbases of EMAs of G G^T and G^T G, refreshed every ``precondition_every`` steps (SOAP)
=========  ==========================================================================================

Layouts. ``flat``: the segments' flattened values concatenated into one row. ``rows``: a parameter's
contiguous row range viewed as (k, w) with ``w = numel / shape[0]`` (conv kernels flatten their trailing
dims). ``cols``: the same view transposed, (w, k). ``svd`` / ``eigen``: the ``rows`` view, rotated as one
(k, w) matrix. Adam's moments are stored per parameter with the parameter's shape, holding the rotated value at
the same position the unit gathered it from; in the global scope the moment of parameter i is therefore
the i-th chunk of the rotated global vector.

Roles. Each parameter has a role: ``matrix`` (an (out, in, ...) weight), ``qkv`` (a fused q/k/v weight,
split into three along dim 0 when ``split_qkv``), ``embedding`` (stored (in, out) = (vocab, dim)) or
``vector`` (biases, norm weights; any tensor with ndim <= 1).

Defaults where the paper is silent (each configurable):

- ``embedding="as_linear"``: output-wise rotates each token's row of the (vocab, dim) table, the reading
  of the paper's C.2 ("within weights of a same token"), which is also what a tied lm_head (vocab, dim)
  gets; only this reading reproduces the paper's output ~ none (README, "Results").
  ``"transposed"`` follows the workshop text's B.1, which transposes embeddings before rotating, so
  output-wise rotates the length-vocab columns of the table.
- ``vectors="auto"``: 1-D parameters join the global vector, are their own vector in the layer scope
  and stay unrotated in neuron-wise scopes. ``"rotate"`` rotates them as one vector in neuron-wise scopes
  too; ``"none"`` never rotates them.
- ``qkv_pieces="qkv"``: which thirds (q, k, v) of a fused ``qkv`` weight the scope rotates; the others get
  identity units (plain Adam), so that one layer type (paper C.2: value only) can be rotated alone. Any
  non-empty subset of ``"qkv"`` (written in that order); needs ``split_qkv`` in the per-layer scopes (in the
  global scope the chosen thirds join the global vector), and is not offered for the dynamic scopes.
- Neuron-wise vectors longer than the block are permuted within the vector (one permutation per unit,
  shared by its rows) and split into blocks plus a residual; shorter ones get one Haar block of their
  own length. Every unit with the same seed shares the same R_n.

The ``svd`` (paper Sec. 3.2, Alg. 5) and ``eigen`` scopes are dynamic: their units are structural here (which matrix,
which piece), and the bases live in the optimizer's per-parameter state; see :mod:`rotkern.bases`. Everything
below about ``svd`` holds for ``eigen`` too; an ``eigen`` matrix whose both sides exceed ``max_precond_dim``
has no basis to keep and is an identity unit (plain Adam), as in SOAP. Its
matricisation is the other scopes' (out, in * kh * kw for conv kernels); embeddings are taken as stored,
(vocab, dim), whatever ``embedding`` says, because the SVD of G^T is the SVD of G with the two sides swapped
and Adam is element-wise, so the orientation cannot change the trajectory. 1-D parameters follow
``vectors`` as in the neuron-wise scopes: unrotated under ``auto`` and ``none``, one seeded Haar-rotated
vector under ``rotate`` (Alg 5 takes "the gradient matrix of each layer"; a vector has no two sides).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .bases import DYNAMIC_BASES, DynamicRotation, EigenRotation, SvdRotation
from .rotations import BlockRotation, check_block_size, check_structure

__all__ = [
    "ALL_SCOPES",
    "DYNAMIC_SCOPES",
    "SCOPES",
    "ROLES",
    "Unit",
    "Segment",
    "DynamicRotation",
    "EigenRotation",
    "SvdRotation",
    "build_units",
    "infer_roles",
    "AnnotatedGroup",
    "param_groups_for",
    "unit_index_map",
]

# The seeded, fixed scopes: every backend (Triton kernels included) runs these.
SCOPES = ("none", "global", "layer", "output", "input")
# Scopes whose rotation is recomputed from the gradient during training: eager torch ops only.
DYNAMIC_SCOPES = tuple(DYNAMIC_BASES)  # svd, eigen (rotkern.bases), and any family registered there
# Every accepted value of the ``rotation`` option.
ALL_SCOPES = SCOPES + DYNAMIC_SCOPES
ROLES = ("matrix", "qkv", "embedding", "vector")
EMBEDDING_ORIENTATIONS = ("transposed", "as_linear")
VECTOR_POLICIES = ("auto", "rotate", "none")
QKV_PIECES = "qkv"
DEFAULT_QKV_PATTERNS = ("c_attn.weight", "qkv.weight", "in_proj_weight", "to_qkv.weight")


@dataclass(frozen=True)
class Segment:
    """A contiguous range ``[start, stop)`` of parameter ``param``'s flattened values."""

    param: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Unit:
    """Vectors rotated together.

    layout: "identity" | "flat" | "rows" | "cols" | "svd" | "eigen".
    segments: one segment, except for a multi-parameter ``flat`` unit (global scope).
    width: row width w of the (k, w) view of a ``rows``/``cols``/``svd``/``eigen`` segment (ignored otherwise).
    shape: (num_vectors, L) of the gathered matrix; (k, w) for an ``svd``/``eigen`` unit.
    rotation: the shared rotation of length L (None for identity units); for an ``svd`` unit the
        :class:`SvdRotation` of the whole (k, w) matrix.
    """

    layout: str
    segments: tuple[Segment, ...]
    width: int
    shape: tuple[int, int]
    rotation: BlockRotation | DynamicRotation | None

    @functools.cached_property
    def params(self) -> tuple[int, ...]:
        """Indices of the member params, in order (read on every step: cached)."""
        return tuple(dict.fromkeys(s.param for s in self.segments))

    def view(self, flats: Sequence[torch.Tensor]) -> torch.Tensor:
        """The unit's (num_vectors, L) view of per-parameter flat tensors (a copy for global units)."""
        if self.layout == "flat" and len(self.segments) > 1:
            return torch.cat([flats[s.param][s.start : s.stop] for s in self.segments]).unsqueeze(0)
        s = self.segments[0]
        x = flats[s.param][s.start : s.stop]
        if self.layout in ("flat", "identity"):
            return x.unsqueeze(0)
        x = x.view(-1, self.width)
        return x if self.layout in ("rows", "svd", "eigen") else x.t()

    def write(self, flats: Sequence[torch.Tensor], value: torch.Tensor) -> None:
        """Copy a (num_vectors, L) matrix back into the per-parameter flat tensors."""
        if self.layout == "flat" and len(self.segments) > 1:
            off = 0
            row = value.reshape(-1)
            for s in self.segments:
                flats[s.param][s.start : s.stop].copy_(row[off : off + s.numel])
                off += s.numel
            return
        dst = self.view(flats)
        if dst.data_ptr() != value.data_ptr() or dst.stride() != value.stride():
            dst.copy_(value)


def infer_roles(
    shapes: Sequence[torch.Size], names: Sequence[str] | None = None, qkv_patterns: Sequence[str] = DEFAULT_QKV_PATTERNS
) -> list[str]:
    """Roles from shapes (and names, to find fused QKV weights): ndim <= 1 -> vector, else matrix."""
    roles = []
    for i, shape in enumerate(shapes):
        if len(shape) <= 1:
            roles.append("vector")
        elif names is not None and any(names[i].endswith(p) for p in qkv_patterns) and shape[0] % 3 == 0:
            roles.append("qkv")
        else:
            roles.append("matrix")
    return roles


def _check_choice(value: str, choices: Sequence[str], name: str) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}")
    return value


def check_qkv_pieces(value: object, name: str = "qkv_pieces") -> str:
    """Validate a ``qkv_pieces`` option (a non-empty subset of the letters q, k, v); returns it in q, k, v order."""
    if not isinstance(value, str) or not value or set(value) - set(QKV_PIECES) or len(set(value)) != len(value):
        raise ValueError(
            f"{name}={value!r} must name which thirds of a fused QKV weight are rotated: a non-empty subset of "
            "'q', 'k', 'v' written as one string, each letter once (e.g. 'v', 'qk', 'qkv')"
        )
    return "".join(c for c in QKV_PIECES if c in value)


def _dynamic_rotation(
    scope: str, k: int, width: int, piece: int, num_pieces: int, max_precond_dim: int
) -> DynamicRotation:
    """The rotation of one (k, width) piece of a dynamic scope (a family of :data:`rotkern.bases.DYNAMIC_BASES`)."""
    return DYNAMIC_BASES[scope].for_unit(k, width, piece, num_pieces, max_precond_dim=max_precond_dim)


def _check_build_args(
    shapes, scope, block_size, roles, names, split_qkv, embedding, vectors, frozen, structure, qkv_pieces
) -> tuple[list[torch.Size], list[str], list[bool], str, bool]:
    """build_units' argument checks; returns shapes, roles, frozen, qkv_pieces (checked) and whether the scope
    rotates only some thirds of qkv parameters."""
    _check_choice(scope, ALL_SCOPES, "rotation")
    _check_choice(embedding, EMBEDDING_ORIENTATIONS, "embedding")
    _check_choice(vectors, VECTOR_POLICIES, "vectors")
    check_block_size(block_size)
    check_structure(structure, block_size)
    qkv_pieces = check_qkv_pieces(qkv_pieces)
    partial = qkv_pieces != QKV_PIECES and scope != "none"
    if partial and scope in DYNAMIC_SCOPES:
        raise ValueError(f"qkv_pieces={qkv_pieces!r} is for the static scopes; rotation={scope!r} takes 'qkv' only")
    if partial and scope != "global" and not split_qkv:
        raise ValueError(
            f"qkv_pieces={qkv_pieces!r} rotates some thirds of a fused QKV weight: it needs split_qkv=True"
        )
    shapes = [torch.Size(s) for s in shapes]
    roles = list(roles) if roles is not None else infer_roles(shapes, names)
    if len(roles) != len(shapes):
        raise ValueError(f"roles has {len(roles)} entries for {len(shapes)} parameters")
    frozen = [bool(f) for f in frozen] if frozen is not None else [False] * len(shapes)
    if len(frozen) != len(shapes):
        raise ValueError(f"frozen has {len(frozen)} entries for {len(shapes)} parameters")
    for i, r in enumerate(roles):
        _check_choice(r, ROLES, f"roles[{i}]")
        if r != "vector" and len(shapes[i]) < 2:
            raise ValueError(f"parameter {_pname(names, i)} has role {r!r} but shape {tuple(shapes[i])}; use 'vector'")
    return shapes, roles, frozen, qkv_pieces, partial


@dataclass
class _UnitBuilder:
    """build_units' state: the checked arguments and the units so far, with one method per kind of unit."""

    shapes: list[torch.Size]
    scope: str
    block_size: int
    seed: int
    roles: list[str]
    names: Sequence[str] | None
    split_qkv: bool
    structure: str
    qkv_pieces: str
    max_precond_dim: int

    def __post_init__(self) -> None:
        self.numels = [s.numel() for s in self.shapes]
        self.units: list[Unit] = []

    def identity(self, i: int, start: int = 0, stop: int | None = None) -> None:
        stop = self.numels[i] if stop is None else stop
        if stop > start:
            self.units.append(Unit("identity", (Segment(i, start, stop),), 0, (1, stop - start), None))

    def thirds(self, i: int) -> list[tuple[Segment, bool]]:
        """A partially rotated qkv param's thirds as segments, each with whether it is rotated."""
        n0, width = self.shapes[i][0], self.numels[i] // self.shapes[i][0] if self.shapes[i][0] else 0
        return [
            (Segment(i, j * n0 // 3 * width, (j + 1) * n0 // 3 * width), c in self.qkv_pieces)
            for j, c in enumerate(QKV_PIECES)
        ]

    def flat(self, segs: list[Segment]) -> None:
        total = sum(s.numel for s in segs)
        if total:
            rot = BlockRotation(
                total, self.block_size, self.seed, perm_stream=("unit", len(self.units)), structure=self.structure
            )
            self.units.append(Unit("flat", tuple(segs), 0, (1, total), rot))

    def neuron(self, i: int, start_row: int, stop_row: int, layout: str) -> None:
        width = self.numels[i] // self.shapes[i][0]
        k = stop_row - start_row
        if k * width == 0:
            return
        rows, length = (k, width) if layout == "rows" else (width, k)
        perm = ("unit", len(self.units)) if length > self.block_size else None
        rot = BlockRotation(length, self.block_size, self.seed, perm_stream=perm, structure=self.structure)
        self.units.append(Unit(layout, (Segment(i, start_row * width, stop_row * width),), width, (rows, length), rot))

    def dynamic(self, i: int, start_row: int, stop_row: int, piece: int, num_pieces: int) -> None:
        width = self.numels[i] // self.shapes[i][0]
        k = stop_row - start_row
        if k * width == 0:
            return
        seg = (Segment(i, start_row * width, stop_row * width),)
        if self.scope == "eigen" and min(k, width) > self.max_precond_dim:
            self.units.append(Unit("identity", seg, 0, (1, k * width), None))
            return
        rot = _dynamic_rotation(self.scope, k, width, piece, num_pieces, self.max_precond_dim)
        self.units.append(Unit(self.scope, seg, width, (k, width), rot))

    def pieces(self, i: int) -> list[tuple[int, int]]:
        n0 = self.shapes[i][0]
        if self.roles[i] == "qkv" and self.split_qkv:
            if self.scope in DYNAMIC_SCOPES and n0 % 3:
                # The pieces' bases are stacked in one state tensor per parameter: they must have one shape.
                raise ValueError(
                    f"parameter {_pname(self.names, i)} has role 'qkv' but {n0} rows, not a multiple of 3: "
                    f"rotation={self.scope!r} splits it into three equal matrices"
                )
            return [(j * n0 // 3, (j + 1) * n0 // 3) for j in range(3)]
        return [(0, n0)]


def _global_units(b: _UnitBuilder, vectors: str, frozen: list[bool], partial: bool) -> None:
    """The global scope: one shared unit over every rotated, unfrozen param, then the rest."""
    shapes, roles, numels = b.shapes, b.roles, b.numels
    unrotated = [roles[i] == "vector" and vectors == "none" for i in range(len(shapes))]
    split = [partial and roles[i] == "qkv" and numels[i] > 0 for i in range(len(shapes))]

    def rotated(i: int) -> list[Segment]:
        return [s for s, keep in b.thirds(i) if keep and s.numel] if split[i] else [Segment(i, 0, numels[i])]

    members = [i for i in range(len(shapes)) if not unrotated[i] and not frozen[i]]
    b.flat([s for i in members if numels[i] for s in rotated(i)])
    # After the shared unit, so that its permutation stream does not depend on the frozen parameters.
    for i in range(len(shapes)):
        if unrotated[i]:
            b.identity(i)
            continue
        if frozen[i]:
            b.flat(rotated(i))
        for s, keep in b.thirds(i) if split[i] else []:
            if not keep:
                b.identity(i, s.start, s.stop)


def _per_param_units(b: _UnitBuilder, embedding: str, vectors: str, frozen: list[bool], partial: bool) -> None:
    """Every scope but none and global: units within each param (frozen params last)."""
    shapes, roles, numels, scope = b.shapes, b.roles, b.numels, b.scope
    # Frozen parameters last: the permutation streams of the others are those they would get without them.
    for i in sorted(range(len(shapes)), key=lambda i: frozen[i]):
        if numels[i] == 0:
            continue
        if roles[i] == "vector":
            rotate_vector = vectors == "rotate" or (vectors == "auto" and scope == "layer")
            b.flat([Segment(i, 0, numels[i])]) if rotate_vector else b.identity(i)
            continue
        width = numels[i] // shapes[i][0] if shapes[i][0] else 0
        parts = b.pieces(i)
        for j, (a, c) in enumerate(parts):
            if partial and roles[i] == "qkv" and QKV_PIECES[j] not in b.qkv_pieces:
                b.identity(i, a * width, c * width)
                continue
            if scope == "layer":
                b.flat([Segment(i, a * width, c * width)])
                continue
            if scope in DYNAMIC_SCOPES:
                b.dynamic(i, a, c, j, len(parts))
                continue
            # An embedding stored (in, out) is transposed before rotating, which swaps rows and columns.
            swap = roles[i] == "embedding" and embedding == "transposed"
            want_rows = (scope == "output") != swap
            b.neuron(i, a, c, "rows" if want_rows else "cols")


def build_units(
    shapes: Sequence[torch.Size],
    scope: str,
    *,
    block_size: int = 768,
    seed: int = 0,
    roles: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    split_qkv: bool = True,
    embedding: str = "as_linear",
    vectors: str = "auto",
    frozen: Sequence[bool] | None = None,
    max_precond_dim: int = 10000,
    structure: str = "haar",
    qkv_pieces: str = "qkv",
) -> list[Unit]:
    """Split a parameter group into rotation units.

    Args:
        shapes: the parameters' shapes, in group order.
        scope: one of :data:`ALL_SCOPES`.
        block_size: n, the Haar block size (default 768, the paper's).
        seed: seed of every rotation in the group.
        roles: one of :data:`ROLES` per parameter; inferred from shapes (and names) when None.
        frozen: per parameter, True for a parameter frozen when the group was built. Frozen parameters are
            invisible to the others: in the global scope they stay outside the shared rotation, and in every
            scope their units come after all others, so the other parameters get exactly the rotations (and
            follow the trajectory) they would without them. Each frozen parameter still gets the units its scope
            gives it (a rotation of its own in the global scope), which act only if it is unfrozen later.
        max_precond_dim: ``eigen`` scope: sides longer than this are the identity (SOAP's max_precond_dim).
        structure: the blocks of the static scopes' rotations: ``haar`` or ``hadamard`` (see
            :class:`rotkern.rotations.BlockRotation`; a power-of-two block_size).
        qkv_pieces: the thirds (q, k, v) of ``qkv`` parameters the scope rotates; the others are identity units.
    Returns:
        Units covering every parameter of nonzero size exactly once; zero-size parameters (what FSDP leaves on
        tail ranks) get no unit.
    """
    shapes, roles, frozen, qkv_pieces, partial = _check_build_args(
        shapes, scope, block_size, roles, names, split_qkv, embedding, vectors, frozen, structure, qkv_pieces
    )
    b = _UnitBuilder(shapes, scope, block_size, seed, roles, names, split_qkv, structure, qkv_pieces, max_precond_dim)
    if scope == "none":
        for i in range(len(shapes)):
            b.identity(i)
    elif scope == "global":
        _global_units(b, vectors, frozen, partial)
    else:
        _per_param_units(b, embedding, vectors, frozen, partial)
    return b.units


def _pname(names: Sequence[str] | None, i: int) -> str:
    return repr(names[i]) if names is not None and i < len(names) else f"#{i}"


def unit_index_map(unit: Unit, numels: Sequence[int]) -> torch.Tensor:
    """(num_vectors, L) int64 positions of the unit's entries in the group's concatenated flat vector.

    ``numels[i]`` is parameter i's size. Used by tests and the dense oracle.
    """
    flats, off = [], 0
    for n in numels:
        flats.append(torch.arange(off, off + n, dtype=torch.int64))
        off += n
    return unit.view(flats).clone()


def _adding_optimizer(frame) -> tuple[torch.optim.Optimizer | None, type | None]:
    """The optimizer whose ``add_param_group`` is on the call stack above ``frame`` (None when a script's own
    code calls ``setdefault``), and for ZeroRedundancyOptimizer the inner optimizer class it was given."""
    owner = None
    for _ in range(16):
        if frame is None:
            break
        here = frame.f_locals.get("self")
        if owner is None and isinstance(here, torch.optim.Optimizer):
            owner = here
        elif owner is not None and here is owner and isinstance(frame.f_locals.get("optimizer_class"), type):
            return owner, frame.f_locals["optimizer_class"]  # ZeRO adds groups before it builds its inner optimizer
        frame = frame.f_back
    return owner, None


class AnnotatedGroup(dict):
    """A param group as :func:`param_groups_for` builds it: per-parameter lists (``names``, ``roles``, and with
    one masked group a ``decay_mask``) beside ``params``. An optimizer that would misread those lists refuses the
    group with a TypeError when it adds it: torch.optim's (or any without ``understands_decay_mask``) would
    apply the group's ``weight_decay`` to every parameter, norm weights and biases included, and
    ZeroRedundancyOptimizer reorders a group's params but not its lists."""

    # torch.optim.Optimizer.add_param_group sets group["params"] = list(...) and fills the defaults with
    # setdefault: the hooks it offers to a group that an optimizer would misread.
    def __setitem__(self, key, value) -> None:
        if key == "params":
            self._check_consumer(*_adding_optimizer(sys._getframe(1)))
        super().__setitem__(key, value)

    def setdefault(self, key, default=None):
        self._check_consumer(*_adding_optimizer(sys._getframe(1)))
        return super().setdefault(key, default)

    def _check_consumer(self, owner: torch.optim.Optimizer | None, inner: type | None) -> None:
        if owner is None:  # the script's own code, not an optimizer adding the group
            return
        if inner is not None:
            raise TypeError(
                f"{type(owner).__name__} sorts each group's params by size and hands every rank the group's other "
                "keys unchanged, so this group's per-parameter lists (names, roles, decay_mask) would describe "
                "the wrong params. Give it groups of params only, e.g. "
                "[{'params': decayed}, {'params': not_decayed, 'weight_decay': 0.0}] (rotkern then infers "
                "the roles from shapes)"
            )
        mask = self.get("decay_mask")
        if mask is not None and not all(mask) and not getattr(type(owner), "understands_decay_mask", False):
            raise TypeError(
                f"{type(owner).__name__} ignores this param group's decay_mask: it would apply weight_decay="
                f"{self.get('weight_decay')} to all {len(self['params'])} parameters, norm weights and biases "
                "included. Build its groups with rotkern.param_groups_for(model, weight_decay=..., "
                "split_decay=True) (nanoGPT's decay and no-decay groups, which mean the same to torch.optim and "
                "rotkern)"
            )


def param_groups_for(
    model: nn.Module,
    *,
    weight_decay: float | None = None,
    no_decay_1d: bool = True,
    split_decay: bool = False,
    qkv_patterns: Sequence[str] = DEFAULT_QKV_PATTERNS,
    **group_options,
) -> list[dict]:
    """Parameter groups of a model, annotated with names and roles for the rotation scopes.

    Embedding weights (``nn.Embedding``) get role ``embedding``; weights whose name ends with one of
    ``qkv_patterns`` and whose first dim divides by 3 get ``qkv``; other >= 2-D tensors ``matrix``;
    the rest ``vector``. A weight shared by several modules (tied wte / lm_head) appears once, with the
    role of its first owner in ``named_modules()`` order.

    With ``weight_decay`` set, nanoGPT's decay rule: >= 2-D tensors decayed, the others not (``no_decay_1d``).
    By default as one group with a per-parameter ``decay_mask``, so that a global rotation spans every
    parameter (paper Sec. 3.1, App. B.1); torch.optim's optimizers ignore such a mask, and refuse the group with
    a TypeError rather than decay every parameter (see :class:`AnnotatedGroup`, the type of every group returned;
    ZeroRedundancyOptimizer refuses them too). With ``split_decay=True``, nanoGPT's two
    groups (``weight_decay`` and 0.0), each with its names and roles: they mean the same to torch.optim and
    rotkern (under ``rotation="global"`` each group is then its own global vector). Extra keyword options
    (``rotation=``, ``block_size=``, ``seed=`` ...) are copied into every group.

    Returns:
        A list of param-group dicts (``params``, ``names``, ``roles``, and the decay keys above).
    """
    roles: dict[int, str] = {}
    for _, mod in model.named_modules():
        if isinstance(mod, nn.Embedding):
            roles.setdefault(id(mod.weight), "embedding")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    inferred = infer_roles([p.shape for _, p in named], names, qkv_patterns)
    for (_, p), r in zip(named, inferred, strict=True):
        roles.setdefault(id(p), r)

    def group(items: list[tuple[str, torch.Tensor]], **extra) -> dict:
        return AnnotatedGroup({
            "params": [p for _, p in items],
            "names": [n for n, _ in items],
            "roles": [roles[id(p)] for _, p in items],
            **group_options,
            **extra,
        })

    if weight_decay is None:
        return [group(named)]
    decayed = [p.dim() >= 2 or not no_decay_1d for _, p in named]
    if split_decay:
        groups = [
            group([x for x, d in zip(named, decayed, strict=True) if d == keep], weight_decay=wd)
            for keep, wd in ((True, weight_decay), (False, 0.0))
        ]
        return [g for g in groups if g["params"]]
    # One group with a per-parameter decay mask, not nanoGPT's two groups: a global rotation spans all
    # parameters of a group, and the paper's global scope covers every weight (paper Sec. 3.1, App. B.1).
    return [group(named, weight_decay=weight_decay, decay_mask=decayed)]

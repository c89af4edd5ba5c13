"""Rotation scopes: which coordinates are rotated together (SPEC section 2).

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
=========  ==========================================================================================

Layouts. ``flat``: the segments' flattened values concatenated into one row. ``rows``: a parameter's
contiguous row range viewed as (k, w) with ``w = numel / shape[0]`` (conv kernels flatten their trailing
dims). ``cols``: the same view transposed, (w, k). ``svd``: the ``rows`` view, rotated as one (k, w)
matrix. Adam's moments are stored per parameter with the parameter's shape, holding the rotated value at
the same position the unit gathered it from; in the global scope the moment of parameter i is therefore
the i-th chunk of the rotated global vector.

Roles. Each parameter has a role: ``matrix`` (an (out, in, ...) weight), ``qkv`` (a fused q/k/v weight,
split into three along dim 0 when ``split_qkv``), ``embedding`` (stored (in, out) = (vocab, dim)) or
``vector`` (biases, norm weights; any tensor with ndim <= 1).

Defaults where the paper is silent (each configurable):

- ``embedding="transposed"``: the paper (B.1) transposes embeddings before rotating, so output-wise
  rotates the length-vocab columns of the (vocab, dim) table. ``"as_linear"`` gives C.2's reading
  (output-wise = per token rows), which is also what a tied lm_head (vocab, dim) would get.
- ``vectors="auto"``: 1-D parameters join the global vector, are their own vector in the layer scope
  and stay unrotated in neuron-wise scopes. ``"rotate"`` rotates them as one vector in neuron-wise scopes
  too; ``"none"`` never rotates them.
- Neuron-wise vectors longer than the block are permuted within the vector (one permutation per unit,
  shared by its rows) and split into blocks plus a residual; shorter ones get one Haar block of their
  own length. Every unit with the same seed shares the same R_n.

The ``svd`` scope (SPEC section 3) is the only dynamic one: its units are structural here (which matrix,
which piece), and the bases live in the optimizer's per-parameter state; see :class:`SvdRotation`. Its
matricisation is the other scopes' (out, in * kh * kw for conv kernels); embeddings are taken as stored,
(vocab, dim), whatever ``embedding`` says, because the SVD of G^T is the SVD of G with the two sides swapped
and Adam is element-wise, so the orientation cannot change the trajectory. 1-D parameters follow
``vectors`` as in the neuron-wise scopes: unrotated under ``auto`` and ``none``, one seeded Haar-rotated
vector under ``rotate`` (Alg 5 takes "the gradient matrix of each layer"; a vector has no two sides).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .rotations import BlockRotation, check_block_size

__all__ = [
    "ALL_SCOPES",
    "DYNAMIC_SCOPES",
    "SCOPES",
    "ROLES",
    "Unit",
    "Segment",
    "SvdRotation",
    "build_units",
    "infer_roles",
    "param_groups_for",
    "unit_index_map",
]

# The seeded, fixed scopes: every backend (Triton kernels included) runs these.
SCOPES = ("none", "global", "layer", "output", "input")
# Scopes whose rotation is recomputed from the gradient during training: eager torch ops only.
DYNAMIC_SCOPES = ("svd",)
# Every accepted value of the ``rotation`` option.
ALL_SCOPES = SCOPES + DYNAMIC_SCOPES
ROLES = ("matrix", "qkv", "embedding", "vector")
EMBEDDING_ORIENTATIONS = ("transposed", "as_linear")
VECTOR_POLICIES = ("auto", "rotate", "none")
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


class SvdRotation:
    """The two-sided rotation ``G -> L^T G R`` of one (k, w) matrix unit of the ``svd`` scope (paper Alg 5).

    At a recompute step the optimizer takes the reduced SVD of the current gradient, ``G = U_r S V_r^T`` with
    r = min(k, w), and the bases become ``L = [U_r, U_perp]`` (k, k) and ``R = [V_r, V_perp]`` (w, w): the
    singular vectors completed to full orthogonal matrices. A true rotation needs the complement (later
    gradients leave span(U_r), and Adam must see those coordinates too), but a full U of a 50304 x 768
    embedding would hold 50304^2 floats. So a side longer than r is kept implicitly, in O(n r): the Householder
    reflectors of ``torch.geqrf(U_r)`` (n, r) and their scalars tau (r,). Their product Q is orthogonal, and
    its first r columns are ``U_r diag(R_ii)`` with ``R_ii = +-1`` (U_r has orthonormal columns); flipping
    those signs back gives ``L = Q diag(R_11..R_rr, 1..1)``, whose first r columns are exactly U_r and whose
    complement is ``Q[:, r:]``, a deterministic function of U_r. ``torch.ormqr`` applies it in O(n r w) without
    forming it (LAPACK / cuSOLVER, blocked). A side of length r (both sides when k = w) is square already and
    stored as is, applied with one matmul.

    State per parameter, the ``num_pieces`` pieces (3 for a split qkv weight, else 1) stacked on dim 0:

    ==============  =========  ================================================================================
    ``svd_u``       (P, k, r)  U_r when k == r, else the Householder reflectors of U_r (geqrf's ``a``)
    ``svd_u_tau``   (P, r)     their scalars tau; only when k > r
    ``svd_v``       (P, w, r)  the same for V_r
    ``svd_v_tau``   (P, r)     only when w > r
    ==============  =========  ================================================================================

    The unit itself is structural (shapes only). The optimizer binds the rotation to its state
    (:meth:`bind`), so ``rotate(x)`` / ``unrotate(x)`` act with the current bases like a
    :class:`BlockRotation`'s; before the first recompute there is no basis yet and both are the identity (the
    moments are still zero then). The step itself passes the bases explicitly.

    Args:
        rows, cols: k and w, the matrix piece's shape.
        piece, num_pieces: which piece of its parameter this is, and how many there are.
    """

    def __init__(self, rows: int, cols: int, piece: int = 0, num_pieces: int = 1) -> None:
        if rows < 1 or cols < 1:
            raise ValueError(f"SvdRotation: shape must be positive, got ({rows}, {cols})")
        if not 0 <= piece < num_pieces:
            raise ValueError(f"SvdRotation: piece {piece} out of range for {num_pieces} pieces")
        self.rows, self.cols = int(rows), int(cols)
        self.rank = min(self.rows, self.cols)
        self.piece, self.num_pieces = int(piece), int(num_pieces)
        self._state: Mapping | None = None
        self._param: torch.Tensor | None = None

    @property
    def left_implicit(self) -> bool:
        """Whether L is kept as Householder reflectors (k > r), not as a dense matrix."""
        return self.rows > self.rank

    @property
    def right_implicit(self) -> bool:
        """Whether R is kept as Householder reflectors (w > r)."""
        return self.cols > self.rank

    def spec(self) -> dict:
        return {"rows": self.rows, "cols": self.cols, "piece": self.piece, "num_pieces": self.num_pieces}

    def __repr__(self) -> str:
        return f"SvdRotation({self.rows}, {self.cols}, piece={self.piece}, num_pieces={self.num_pieces})"

    # -- state ----------------------------------------------------------------------------------------
    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the per-parameter state tensors that hold this unit's bases (all pieces)."""
        p, r = self.num_pieces, self.rank
        shapes = {"svd_u": (p, self.rows, r), "svd_v": (p, self.cols, r)}
        if self.left_implicit:
            shapes["svd_u_tau"] = (p, r)
        if self.right_implicit:
            shapes["svd_v_tau"] = (p, r)
        return shapes

    def compute(self, g: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The bases of this piece from the current gradient.

        Args:
            g: (k, w) gradient, in the dtype the SVD runs in (the optimizer's compute dtype).
        Returns:
            (S, bases): the singular values (r,), descending, and this piece's state tensors (the
            :meth:`state_shapes` keys, without the piece dim). Raises for non-finite g (LAPACK cannot converge).
        """
        u, s, vh = torch.linalg.svd(g, full_matrices=False)
        bases = {}
        for key, x, implicit in (("svd_u", u, self.left_implicit), ("svd_v", vh.mT, self.right_implicit)):
            if implicit:
                bases[key], bases[key + "_tau"] = torch.geqrf(x)
            else:
                bases[key] = x
        return s, bases

    def save(self, store: MutableMapping[str, torch.Tensor], bases: dict[str, torch.Tensor]) -> None:
        """Copy one piece's ``bases`` into the stacked tensors of ``store`` (a param's state; made on first use)."""
        for key, shape in self.state_shapes().items():
            val = bases[key]
            if key not in store:
                store[key] = torch.zeros(shape, dtype=val.dtype, device=val.device)
            store[key][self.piece].copy_(val)

    def load(self, store: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """This piece's bases (views into ``store``), or None when ``store`` holds none yet."""
        if store is None or "svd_u" not in store:
            return None
        return {key: store[key][self.piece] for key in self.state_shapes()}

    def bind(self, state: Mapping, param: torch.Tensor) -> None:
        """Read the bases from ``state[param]`` (an optimizer's state mapping) when none are passed."""
        self._state, self._param = state, param

    def _bound(self) -> dict[str, torch.Tensor] | None:
        if self._state is None:
            return None
        return self.load(self._state.get(self._param))

    def identity_bases(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> dict:
        """This piece's state tensors for L = I, R = I (the standard basis), in the stored form.

        A side kept as Householder reflectors is ``geqrf([I_r; 0])``: no reflection (tau = 0) and R_ii = 1.
        """
        bases = {}
        for key, n, implicit in (("svd_u", self.rows, self.left_implicit), ("svd_v", self.cols, self.right_implicit)):
            eye = torch.eye(n, self.rank, dtype=dtype, device=device)
            if implicit:
                bases[key], bases[key + "_tau"] = torch.geqrf(eye)
            else:
                bases[key] = eye
        return bases

    # -- action ---------------------------------------------------------------------------------------
    def rotate(
        self, x: torch.Tensor, bases: dict[str, torch.Tensor] | None = None, *, squared: bool = False
    ) -> torch.Tensor:
        """g~ = L^T x R. x: (k, w) -> (k, w); ``bases`` default to the bound state's (identity if none).

        ``squared=True``: ``(L o L)^T x (R o R)`` with the element-wise squares, the map that carries second
        moments into the basis. A side kept as reflectors is rebuilt a block of columns at a time: O(n^2 r) for
        a side of length n (seconds on a GPU for a 50304 x 768 embedding; long on a CPU).
        """
        b = self._bases_for(x, bases)
        if b is None:
            return x
        if squared:
            return self._squared(self._squared(x, b, "left", transpose=True), b, "right", transpose=False)
        return self._right(self._left(x, b, transpose=True), b, transpose=False)

    def unrotate(
        self, y: torch.Tensor, bases: dict[str, torch.Tensor] | None = None, *, squared: bool = False
    ) -> torch.Tensor:
        """x = L y R^T, the inverse of :meth:`rotate`. y: (k, w) -> (k, w). ``squared=True``:
        ``(L o L) y (R o R)^T``."""
        b = self._bases_for(y, bases)
        if b is None:
            return y
        if squared:
            return self._squared(self._squared(y, b, "right", transpose=True), b, "left", transpose=False)
        return self._left(self._right(y, b, transpose=True), b, transpose=False)

    def _basis_columns(self, b: dict, side: str, start: int, stop: int) -> torch.Tensor:
        """Columns [start, stop) of the dense basis L (side "left", (k, c)) or R ("right", (w, c))."""
        n = self.rows if side == "left" else self.cols
        ref = b["svd_u"]
        eye = torch.eye(n, dtype=ref.dtype, device=ref.device)[:, start:stop]
        if side == "left":
            return self._left(eye, b, transpose=False)  # L e_j
        return self._right(eye.T.contiguous(), b, transpose=True).T  # (e_j^T R^T)^T = R e_j

    def _squared(self, x: torch.Tensor, b: dict, side: str, transpose: bool, chunk: int = 256) -> torch.Tensor:
        """(L o L)^T x / (L o L) x (side "left") or x (R o R) / x (R o R)^T (side "right"), column blocks of the
        basis at a time so that no n x n matrix is formed."""
        n = self.rows if side == "left" else self.cols
        out = torch.zeros_like(x)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            sq = self._basis_columns(b, side, start, stop).square()  # (n, c)
            if side == "left" and transpose:  # rows [start, stop) of (L o L)^T x
                out[start:stop] = sq.T @ x
            elif side == "left":  # (L o L) x = sum over column blocks
                out += sq @ x[start:stop]
            elif not transpose:  # columns [start, stop) of x (R o R)
                out[:, start:stop] = x @ sq
            else:  # x (R o R)^T = sum over column blocks
                out += x[:, start:stop] @ sq.T
        return out

    def matrices(
        self, bases: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (L (k, k), R (w, w)) in ``dtype`` (testing; the identity before the first recompute)."""
        b = bases if bases is not None else self._bound()
        if b is None:
            return torch.eye(self.rows, dtype=dtype), torch.eye(self.cols, dtype=dtype)
        b = {k: v.to(dtype) for k, v in b.items()}
        eye_k = torch.eye(self.rows, dtype=dtype, device=b["svd_u"].device)
        eye_w = torch.eye(self.cols, dtype=dtype, device=b["svd_u"].device)
        return self._left(eye_k, b, transpose=False), self._right(eye_w, b, transpose=False)

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(k w, k w) matrix ``kron(L^T, R^T)``: ``vec(L^T G R)`` for row-major ``vec`` (testing; small only)."""
        if self.rows * self.cols > 8192:
            raise ValueError(f"dense(): refusing to materialise a {self.rows * self.cols}-square matrix")
        left, right = self.matrices(dtype=dtype)
        return torch.kron(left.T.contiguous(), right.T.contiguous()).cpu()

    def _bases_for(self, x: torch.Tensor, bases: dict | None) -> dict | None:
        if x.shape != (self.rows, self.cols):
            raise ValueError(f"{self!r} applied to a tensor of shape {tuple(x.shape)}")
        b = bases if bases is not None else self._bound()
        if b is not None and (b["svd_u"].dtype != x.dtype or b["svd_u"].device != x.device):
            # Like BlockRotation, act in x's dtype and device (the step's x already matches: no copy there).
            b = {k: v.to(dtype=x.dtype, device=x.device) for k, v in b.items()}
        return b

    def _left(self, x: torch.Tensor, b: dict, transpose: bool) -> torch.Tensor:
        """L^T x (transpose) or L x, for x (k, n)."""
        if not self.left_implicit:
            u = b["svd_u"]
            return (u.mT if transpose else u) @ x
        a, tau, r = b["svd_u"], b["svd_u_tau"], self.rank
        d = _reflector_signs(a, r).unsqueeze(1)
        if transpose:  # L^T x = D (Q^T x)
            y = torch.ormqr(a, tau, x, left=True, transpose=True)
            return torch.cat([y[:r] * d, y[r:]])
        return torch.ormqr(a, tau, torch.cat([x[:r] * d, x[r:]]), left=True, transpose=False)  # Q (D x)

    def _right(self, x: torch.Tensor, b: dict, transpose: bool) -> torch.Tensor:
        """x R^T (transpose) or x R, for x (n, w)."""
        if not self.right_implicit:
            v = b["svd_v"]
            return x @ (v.mT if transpose else v)
        a, tau, r = b["svd_v"], b["svd_v_tau"], self.rank
        d = _reflector_signs(a, r)
        if transpose:  # x R^T = (x D) Q^T
            return torch.ormqr(a, tau, torch.cat([x[:, :r] * d, x[:, r:]], 1), left=False, transpose=True)
        y = torch.ormqr(a, tau, x, left=False, transpose=False)  # (x Q) D
        return torch.cat([y[:, :r] * d, y[:, r:]], 1)


def _reflector_signs(a: torch.Tensor, r: int) -> torch.Tensor:
    """sign(R_ii) of a geqrf factorisation (R's diagonal sits on a's), as +-1 in a's dtype."""
    diag = torch.diagonal(a)[:r]
    return torch.where(diag >= 0, 1.0, -1.0).to(a.dtype)


@dataclass(frozen=True)
class Unit:
    """Vectors rotated together.

    layout: "identity" | "flat" | "rows" | "cols" | "svd".
    segments: one segment, except for a multi-parameter ``flat`` unit (global scope).
    width: row width w of the (k, w) view of a ``rows``/``cols``/``svd`` segment (ignored otherwise).
    shape: (num_vectors, L) of the gathered matrix; (k, w) for an ``svd`` unit.
    rotation: the shared rotation of length L (None for identity units); for an ``svd`` unit the
        :class:`SvdRotation` of the whole (k, w) matrix.
    """

    layout: str
    segments: tuple[Segment, ...]
    width: int
    shape: tuple[int, int]
    rotation: BlockRotation | SvdRotation | None

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
        return x if self.layout in ("rows", "svd") else x.t()

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


def build_units(
    shapes: Sequence[torch.Size],
    scope: str,
    *,
    block_size: int = 768,
    seed: int = 0,
    roles: Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    split_qkv: bool = True,
    embedding: str = "transposed",
    vectors: str = "auto",
    frozen: Sequence[bool] | None = None,
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
    Returns:
        Units covering every parameter of nonzero size exactly once; zero-size parameters (what FSDP leaves on
        tail ranks) get no unit.
    """
    _check_choice(scope, ALL_SCOPES, "rotation")
    _check_choice(embedding, EMBEDDING_ORIENTATIONS, "embedding")
    _check_choice(vectors, VECTOR_POLICIES, "vectors")
    check_block_size(block_size)
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

    numels = [s.numel() for s in shapes]
    units: list[Unit] = []

    def identity(i: int) -> None:
        if numels[i]:
            units.append(Unit("identity", (Segment(i, 0, numels[i]),), 0, (1, numels[i]), None))

    def flat(segs: list[Segment]) -> None:
        total = sum(s.numel for s in segs)
        if total:
            rot = BlockRotation(total, block_size, seed, perm_stream=("unit", len(units)))
            units.append(Unit("flat", tuple(segs), 0, (1, total), rot))

    def neuron(i: int, start_row: int, stop_row: int, layout: str) -> None:
        width = numels[i] // shapes[i][0]
        k = stop_row - start_row
        if k * width == 0:
            return
        rows, length = (k, width) if layout == "rows" else (width, k)
        perm = ("unit", len(units)) if length > block_size else None
        rot = BlockRotation(length, block_size, seed, perm_stream=perm)
        units.append(Unit(layout, (Segment(i, start_row * width, stop_row * width),), width, (rows, length), rot))

    def svd(i: int, start_row: int, stop_row: int, piece: int, num_pieces: int) -> None:
        width = numels[i] // shapes[i][0]
        k = stop_row - start_row
        if k * width == 0:
            return
        rot = SvdRotation(k, width, piece, num_pieces)
        units.append(Unit("svd", (Segment(i, start_row * width, stop_row * width),), width, (k, width), rot))

    def pieces(i: int) -> list[tuple[int, int]]:
        n0 = shapes[i][0]
        if roles[i] == "qkv" and split_qkv:
            if scope == "svd" and n0 % 3:
                # The pieces' bases are stacked in one state tensor per parameter: they must have one shape.
                raise ValueError(
                    f"parameter {_pname(names, i)} has role 'qkv' but {n0} rows, not a multiple of 3: "
                    "rotation='svd' splits it into three equal matrices"
                )
            return [(j * n0 // 3, (j + 1) * n0 // 3) for j in range(3)]
        return [(0, n0)]

    if scope == "none":
        for i in range(len(shapes)):
            identity(i)
        return units
    if scope == "global":
        unrotated = [roles[i] == "vector" and vectors == "none" for i in range(len(shapes))]
        members = [i for i in range(len(shapes)) if not unrotated[i] and not frozen[i]]
        flat([Segment(i, 0, numels[i]) for i in members if numels[i]])
        # After the shared unit, so that its permutation stream does not depend on the frozen parameters.
        for i in range(len(shapes)):
            if unrotated[i]:
                identity(i)
            elif frozen[i]:
                flat([Segment(i, 0, numels[i])])
        return units
    # Frozen parameters last: the permutation streams of the others are those they would get without them.
    for i in sorted(range(len(shapes)), key=lambda i: frozen[i]):
        if numels[i] == 0:
            continue
        if roles[i] == "vector":
            rotate_vector = vectors == "rotate" or (vectors == "auto" and scope == "layer")
            flat([Segment(i, 0, numels[i])]) if rotate_vector else identity(i)
            continue
        width = numels[i] // shapes[i][0] if shapes[i][0] else 0
        parts = pieces(i)
        for j, (a, b) in enumerate(parts):
            if scope == "layer":
                flat([Segment(i, a * width, b * width)])
                continue
            if scope == "svd":
                svd(i, a, b, j, len(parts))
                continue
            # An embedding stored (in, out) is transposed before rotating, which swaps rows and columns.
            swap = roles[i] == "embedding" and embedding == "transposed"
            want_rows = (scope == "output") != swap
            neuron(i, a, b, "rows" if want_rows else "cols")
    return units


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


def param_groups_for(
    model: nn.Module,
    *,
    weight_decay: float | None = None,
    no_decay_1d: bool = True,
    qkv_patterns: Sequence[str] = DEFAULT_QKV_PATTERNS,
    **group_options,
) -> list[dict]:
    """Parameter groups of a model, annotated with names and roles for the rotation scopes.

    Embedding weights (``nn.Embedding``) get role ``embedding``; weights whose name ends with one of
    ``qkv_patterns`` and whose first dim divides by 3 get ``qkv``; other >= 2-D tensors ``matrix``;
    the rest ``vector``. A weight shared by several modules (tied wte / lm_head) appears once, with the
    role of its first owner in ``named_modules()`` order.

    With ``weight_decay`` set, the group gets nanoGPT's decay rule as a ``decay_mask``: >= 2-D tensors
    decayed, the others not (``no_decay_1d``). Extra keyword options (``rotation=``, ``block_size=``,
    ``seed=`` ...) are copied into every group.
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
        return {
            "params": [p for _, p in items],
            "names": [n for n, _ in items],
            "roles": [roles[id(p)] for _, p in items],
            **group_options,
            **extra,
        }

    if weight_decay is None:
        return [group(named)]
    # One group with a per-parameter decay mask, not nanoGPT's two groups: a global rotation spans all
    # parameters of a group, and the paper's global scope covers every weight (SPEC section 2).
    mask = [p.dim() >= 2 or not no_decay_1d for _, p in named]
    return [group(named, weight_decay=weight_decay, decay_mask=mask)]

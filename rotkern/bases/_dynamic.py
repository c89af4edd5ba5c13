"""The interface every dynamic basis family implements, its registry, and the moments across a basis change.

A family is one :class:`DynamicRotation` subclass, decorated with :func:`register` under its ``rotation=`` name
(the scope). What the optimizer's step does with a unit of it, in order (:func:`rotkern.bases.step_dynamic_units`
runs this loop for the eager and the fused step alike):

1. :meth:`DynamicRotation.jobs`: the decompositions this step will run, so that the step can batch them across
   units (:func:`rotkern.bases.batched_decompositions`);
2. :meth:`DynamicRotation.before_step`: new bases where this step makes them (moments carried across per
   ``basis_change``), then ``(g~, bases)``, or None for a step that takes no Adam step;
3. the caller's Adam step on ``g~`` with :meth:`DynamicRotation.rotate` / :meth:`DynamicRotation.unrotate`;
4. :meth:`DynamicRotation.after_step`: what the family does once the step is applied (an eigen refresh).

The bases live in the param's state (:meth:`DynamicRotation.state_shapes`, :meth:`DynamicRotation.save`,
:meth:`DynamicRotation.load`), which is what checkpoints hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Mapping, MutableMapping, Sequence
from typing import ClassVar

import torch

__all__ = ["BASIS_CHANGES", "DYNAMIC_BASES", "BasisOptions", "DynamicRotation", "register"]

BASIS_CHANGES = ("keep", "transport", "transport_m", "reset")

# rotation= name (the scope) -> the family's class, in registration order (svd, eigen, then any other family).
DYNAMIC_BASES: dict[str, type[DynamicRotation]] = {}

# A decomposition job for batched_decompositions, without its key: (kind, x, what).
Job = tuple[str, torch.Tensor, str]


@dataclasses.dataclass(frozen=True)
class BasisOptions:
    """A param group's options of the dynamic bases (see :class:`rotkern.RotatedAdamW`).

    Attributes:
        svd_every: F; svd bases are recomputed at steps t with (t - 1) % F == 0.
        precondition_every, shampoo_beta: eigen bases: refresh period and the factors' EMA coefficient.
        basis_change: ``auto`` (the family's :attr:`DynamicRotation.default_change`) or one of
            :data:`BASIS_CHANGES`.
        stats: counts of decomposition fallbacks (the optimizer's ``basis_stats``), or None.
    """

    svd_every: int = 250
    precondition_every: int = 10
    shampoo_beta: float = 0.95
    basis_change: str = "auto"
    stats: MutableMapping[str, int] | None = None

    def change_for(self, rot: DynamicRotation) -> str:
        """The resolved basis change for units of ``rot``'s family (never ``auto``)."""
        return rot.default_change if self.basis_change == "auto" else self.basis_change


def register(cls: type[DynamicRotation]) -> type[DynamicRotation]:
    """Class decorator: make ``cls`` the family of ``rotation=cls.scope``."""
    if not cls.scope:
        raise TypeError(f"{cls.__name__}: a dynamic basis family needs a scope name (class attribute 'scope')")
    if cls.scope in DYNAMIC_BASES and DYNAMIC_BASES[cls.scope] is not cls:
        raise ValueError(f"rotation={cls.scope!r} is already {DYNAMIC_BASES[cls.scope].__name__}")
    if cls.default_change not in BASIS_CHANGES:
        raise ValueError(f"{cls.__name__}.default_change={cls.default_change!r} is not one of {BASIS_CHANGES}")
    DYNAMIC_BASES[cls.scope] = cls
    return cls


class DynamicRotation:
    """A two-sided rotation ``G -> L^T G R`` of one (k, w) matrix piece, with bases kept in a param's state.

    Subclasses say which state tensors hold the bases (:meth:`state_shapes`) and how L and R act on a matrix
    (:meth:`_left`, :meth:`_right`); rotation, the squared maps for second moments, the change of basis between
    two sets of bases, and the dense oracle are shared. Before the first basis exists both sides are the identity.

    Args:
        rows, cols: k and w, the matrix piece's shape.
        piece, num_pieces: which piece of its parameter this is, and how many there are.
    """

    prefix = ""  # the state keys of this kind of basis start with it

    def __init__(self, rows: int, cols: int, piece: int = 0, num_pieces: int = 1) -> None:
        if rows < 1 or cols < 1:
            raise ValueError(f"{type(self).__name__}: shape must be positive, got ({rows}, {cols})")
        if not 0 <= piece < num_pieces:
            raise ValueError(f"{type(self).__name__}: piece {piece} out of range for {num_pieces} pieces")
        self.rows, self.cols = int(rows), int(cols)
        self.piece, self.num_pieces = int(piece), int(num_pieces)
        self._state: Mapping | None = None
        self._param: torch.Tensor | None = None

    def spec(self) -> dict:
        return {"rows": self.rows, "cols": self.cols, "piece": self.piece, "num_pieces": self.num_pieces}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.rows}, {self.cols}, piece={self.piece}, num_pieces={self.num_pieces})"

    # -- the family's lifecycle (see the module docstring) ---------------------------------------------------
    scope: ClassVar[str] = ""  # the rotation= name of the family
    default_change: ClassVar[str] = "keep"  # basis_change="auto" means this for the family

    @classmethod
    def for_unit(cls, rows: int, cols: int, piece: int, num_pieces: int, *, max_precond_dim: int) -> DynamicRotation:
        """The rotation of one (rows, cols) matrix piece, as :func:`rotkern.scopes.build_units` makes it."""
        del max_precond_dim
        return cls(rows, cols, piece, num_pieces)

    def needs_finite_grad(self, step: int, opts: BasisOptions) -> bool:
        """Whether this step builds a basis from the gradient (the optimizer refuses a non-finite one then)."""
        raise NotImplementedError

    def jobs(
        self, g: torch.Tensor, store: Mapping[str, torch.Tensor], step: int, opts: BasisOptions
    ) -> tuple[dict[Hashable, Job], Callable[[dict], dict]] | None:
        """The decompositions this step will run, keyed, and a function that turns their results (same keys) into
        the ``decomposed`` argument of :meth:`before_step` / :meth:`after_step`; None when there are none.

        Args: ``g`` the (k, w) gradient as the step uses it (compute dtype, negated under maximize); ``store`` the
        param's state; ``step`` the param's step after this step's increment.
        """
        return None

    def before_step(
        self,
        g: torch.Tensor,
        store: MutableMapping[str, torch.Tensor],
        step: float,
        *,
        opts: BasisOptions,
        moments: Sequence[torch.Tensor],
        rotate: bool = True,
        decomposed: Mapping | None = None,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]] | None:
        """New bases where this step makes them (``moments``, [m, v] (+ amsgrad's max), carried across in place per
        ``opts.change_for(self)``), then (g~, bases), or None when the step takes no Adam step.

        ``rotate=False``: g~ is None wherever it would be ``L^T g R`` (a fused caller computes it); only a g~ that
        is not that product is returned. ``decomposed``: this unit's results of :meth:`jobs` (None: decompose
        here).
        """
        raise NotImplementedError

    def after_step(
        self,
        g: torch.Tensor,
        bases: Mapping[str, torch.Tensor],
        store: MutableMapping[str, torch.Tensor],
        step: float,
        *,
        opts: BasisOptions,
        moments: Sequence[torch.Tensor],
        decomposed: Mapping | None = None,
    ) -> None:
        """What the family does once the Adam step is applied (arguments as :meth:`before_step`). Default: none."""

    def fits_two_sided_kernel(self) -> bool:
        """Whether the fused two-sided kernel can step this unit (:meth:`kernel_sides` gives its dense bases)."""
        return False

    def kernel_sides(self, bases: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Dense L (k, k) and R (w, w) for the two-sided kernel (None: an identity side)."""
        raise NotImplementedError

    @property
    def kernel_sides_formed(self) -> bool:
        """Whether :meth:`kernel_sides` forms new matrices (worth caching until the bases change), rather than
        returning views of the stored bases."""
        return False

    def reorder(self, x: torch.Tensor, order: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """x (k, w) with its slots reordered as a refresh reordered the basis vectors (families that reorder)."""
        return x

    def change_moments(
        self,
        moments: Sequence[torch.Tensor],
        old: Mapping[str, torch.Tensor],
        new: Mapping[str, torch.Tensor],
        change: str,
        store: MutableMapping[str, torch.Tensor],
        done_steps: float,
        order: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Carry m, v (and amsgrad's max) from the ``old`` bases into the ``new`` ones, in place, per ``change``;
        ``order``: a refresh's slot order (``keep`` follows it); ``done_steps``: steps before the change (a reset
        counts the bias corrections from there: state ``basis_reset_at``)."""
        m, *second = moments
        if change == "reset":
            for t in moments:
                t.zero_()
            store["basis_reset_at"] = torch.tensor(float(done_steps), dtype=torch.float32, device=m.device)
            return
        old = {k: t.clone() for k, t in old.items()}  # views into the store, which the caller overwrites next
        if change in ("transport", "transport_m"):
            m.copy_(self.change_basis(m, old, new))
        elif order is not None:
            m.copy_(self.reorder(m, order))
        for t in second:
            if change == "transport":
                t.copy_(self.change_basis(t, old, new, squared=True).clamp_(min=0))
            elif order is not None:
                t.copy_(self.reorder(t, order))

    # -- state ----------------------------------------------------------------------------------------
    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the per-parameter state tensors that hold this unit's bases (all pieces)."""
        raise NotImplementedError

    def save(self, store: MutableMapping[str, torch.Tensor], bases: Mapping[str, torch.Tensor]) -> None:
        """Copy one piece's ``bases`` into the stacked tensors of ``store`` (a param's state; made on first use)."""
        for key, shape in self.state_shapes().items():
            val = bases[key]
            if key not in store:
                store[key] = torch.zeros(shape, dtype=val.dtype, device=val.device)
            store[key][self.piece].copy_(val)

    def load(self, store: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
        """This piece's bases (views into ``store``), or None when ``store`` holds none yet."""
        keys = self.state_shapes()
        if store is None or not keys or next(iter(keys)) not in store:
            return None
        return {key: store[key][self.piece] for key in keys}

    def bind(self, state: Mapping, param: torch.Tensor) -> None:
        """Read the bases from ``state[param]`` (an optimizer's state mapping) when none are passed."""
        self._state, self._param = state, param

    def _bound(self) -> dict[str, torch.Tensor] | None:
        if self._state is None:
            return None
        return self.load(self._state.get(self._param))

    def identity_bases(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> dict:
        """This piece's state tensors for L = I, R = I (the standard basis), in the stored form."""
        raise NotImplementedError

    # -- action ---------------------------------------------------------------------------------------
    def rotate(
        self, x: torch.Tensor, bases: Mapping[str, torch.Tensor] | None = None, *, squared: bool = False
    ) -> torch.Tensor:
        """g~ = L^T x R. x: (k, w) -> (k, w); ``bases`` default to the bound state's (identity if none).

        ``squared=True``: ``(L o L)^T x (R o R)`` with the element-wise squares, the map that carries second
        moments into the basis (built a block of columns at a time: O(n^2 r) for an implicit side of length n).
        """
        b = self._bases_for(x, bases)
        if b is None:
            return x
        if squared:
            return self._squared(self._squared(x, b, "left", transpose=True), b, "right", transpose=False)
        return self._right(self._left(x, b, transpose=True), b, transpose=False)

    def unrotate(
        self, y: torch.Tensor, bases: Mapping[str, torch.Tensor] | None = None, *, squared: bool = False
    ) -> torch.Tensor:
        """x = L y R^T, the inverse of :meth:`rotate`. y: (k, w) -> (k, w). ``squared=True``:
        ``(L o L) y (R o R)^T``."""
        b = self._bases_for(y, bases)
        if b is None:
            return y
        if squared:
            return self._squared(self._squared(y, b, "right", transpose=True), b, "left", transpose=False)
        return self._left(self._right(y, b, transpose=True), b, transpose=False)

    def change_basis(
        self,
        x: torch.Tensor,
        old: Mapping[str, torch.Tensor] | None,
        new: Mapping[str, torch.Tensor],
        *,
        squared: bool = False,
        chunk: int = 256,
    ) -> torch.Tensor:
        """A moment held in the ``old`` bases, carried into the ``new`` ones (``old`` None: the standard basis).

        Exact (``squared=False``): ``C_L^T x C_R`` with ``C_L = L_old^T L_new``, ``C_R = R_old^T R_new``, i.e.
        ``rotate(unrotate(x, old), new)``. ``squared=True``: ``(C_L o C_L)^T x (C_R o C_R)``, for second moments.
        x: (k, w) in the compute dtype; returns a new tensor.
        """
        old_b = self._bases_for(x, old)
        new_b = self._bases_for(x, new)
        if not squared:
            y = x if old_b is None else self.unrotate(x, old_b)
            return self.rotate(y, new_b)
        out = torch.empty_like(x)
        for start in range(0, self.rows, chunk):  # rows of (C_L o C_L)^T x
            stop = min(self.rows, start + chunk)
            c = self._basis_columns(new_b, "left", start, stop)  # L_new[:, start:stop]
            if old_b is not None:
                c = self._left(c, old_b, transpose=True)
            out[start:stop] = c.square().T @ x
        res = torch.empty_like(x)
        for start in range(0, self.cols, chunk):  # columns of (.) (C_R o C_R)
            stop = min(self.cols, start + chunk)
            c = self._basis_columns(new_b, "right", start, stop)  # R_new[:, start:stop]
            if old_b is not None:
                c = self._right(c.T.contiguous(), old_b, transpose=False).T  # R_old^T c = (c^T R_old)^T
            res[:, start:stop] = out @ c.square()
        return res

    def _basis_columns(self, b: Mapping, side: str, start: int, stop: int) -> torch.Tensor:
        """Columns [start, stop) of the dense basis L (side "left", (k, c)) or R ("right", (w, c))."""
        n = self.rows if side == "left" else self.cols
        ref = next(iter(b.values()))
        eye = torch.eye(n, dtype=ref.dtype, device=ref.device)[:, start:stop]
        if side == "left":
            return self._left(eye, b, transpose=False)  # L e_j
        return self._right(eye.T.contiguous(), b, transpose=True).T  # (e_j^T R^T)^T = R e_j

    def _squared(self, x: torch.Tensor, b: Mapping, side: str, transpose: bool, chunk: int = 256) -> torch.Tensor:
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
        self, bases: Mapping[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (L (k, k), R (w, w)) in ``dtype`` (testing; the identity before the first basis)."""
        b = bases if bases is not None else self._bound()
        if b is None:
            return torch.eye(self.rows, dtype=dtype), torch.eye(self.cols, dtype=dtype)
        b = {k: v.to(dtype) for k, v in b.items()}
        dev = next(iter(b.values())).device
        eye_k = torch.eye(self.rows, dtype=dtype, device=dev)
        eye_w = torch.eye(self.cols, dtype=dtype, device=dev)
        return self._left(eye_k, b, transpose=False), self._right(eye_w, b, transpose=False)

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """(k w, k w) matrix ``kron(L^T, R^T)``: ``vec(L^T G R)`` for row-major ``vec`` (testing; small only)."""
        if self.rows * self.cols > 8192:
            raise ValueError(f"dense(): refusing to materialise a {self.rows * self.cols}-square matrix")
        left, right = self.matrices(dtype=dtype)
        return torch.kron(left.T.contiguous(), right.T.contiguous()).cpu()

    def _bases_for(self, x: torch.Tensor, bases: Mapping | None) -> dict | None:
        if x.shape != (self.rows, self.cols):
            raise ValueError(f"{self!r} applied to a tensor of shape {tuple(x.shape)}")
        b = bases if bases is not None else self._bound()
        if b is None:
            return None
        ref = next(iter(b.values()), None)
        if ref is not None and (ref.dtype != x.dtype or ref.device != x.device):
            # Like BlockRotation, act in x's dtype and device (the step's x already matches: no copy there).
            return {k: v.to(dtype=x.dtype, device=x.device) for k, v in b.items()}
        return dict(b)

    def _left(self, x: torch.Tensor, b: Mapping, transpose: bool) -> torch.Tensor:
        """L^T x (transpose) or L x, for x (k, n)."""
        raise NotImplementedError

    def _right(self, x: torch.Tensor, b: Mapping, transpose: bool) -> torch.Tensor:
        """x R^T (transpose) or x R, for x (n, w)."""
        raise NotImplementedError

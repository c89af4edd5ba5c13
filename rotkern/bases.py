"""Dynamic bases: two-sided rotations ``G -> L^T G R`` of a (k, w) matrix, recomputed from the gradients.

Two bases (each a :class:`DynamicRotation`; units of the ``svd`` and ``eigen`` scopes, see :mod:`rotkern.scopes`):

- :class:`SvdRotation` (paper Alg. 5, Sec. 3.2): the singular vectors of the current gradient, completed to
  full orthogonal matrices, recomputed every ``svd_every`` steps.
- :class:`EigenRotation` (SOAP, Vyas et al. 2024, arXiv 2409.11321 Alg 3): the eigenvectors of exponential moving
  averages of ``G G^T`` and ``G^T G`` (Shampoo's two preconditioner factors), first by ``eigh``, refreshed every
  ``precondition_every`` steps by one power iteration and a QR.

The rotation objects are structural (shapes only); the bases live in the optimizer's per-parameter state, the
pieces of one parameter (q, k, v of a split fused weight) stacked on dim 0. A rotation is bound to that state
(:meth:`DynamicRotation.bind`) so that ``rotate`` / ``unrotate`` act with the current bases.

**Moments across a basis change** (``basis_change``, per param group):

==============  ============================================================================================
``keep``        m and v stay as they are, slot by slot (paper Alg 5; the eigen scope first reorders the slots
                as its eigenvalue sort reorders the basis vectors, as SOAP does for v)
``transport``   m is rotated exactly into the new basis, ``m' = C_L^T m C_R`` with ``C = Q_old^T Q_new`` per
                side; v (and amsgrad's max) by the element-wise squares, ``v' = (C_L o C_L)^T v (C_R o C_R)``,
                which keeps it non-negative and is exact for a diagonal second moment
``transport_m`` m rotated exactly, v kept (reordered as in ``keep``): SOAP's choice, which holds m in the
                standard basis and projects it every step
``reset``       m and v (and amsgrad's max) zeroed, and bias correction restarted (state ``basis_reset_at``)
==============  ============================================================================================

**Failures.** A decomposition that fails (LAPACK / cuSOLVER non-convergence on an ill-conditioned matrix, or a
non-finite result) is retried in float64, then in float64 on the CPU; when all fail the previous basis is kept
(the identity when there is none). Each fallback is counted in the ``stats`` mapping passed in (the optimizer's
``basis_stats``) and logged at WARNING; none raises.

**Batching.** The decompositions one optimizer step needs are known before it starts (an svd recompute takes the
step's gradient; an eigen refresh takes the factors after this step's update and the current Q), so the
optimizers collect them first and :func:`batched_decompositions` runs those of equal kind, shape, dtype and
(CUDA) device as one batched ``torch.linalg`` call (the q, k, v pieces and the output projection of every layer of a
GPT are one batch); an item of a batch that fails goes through the fallbacks above on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Mapping, MutableMapping
from typing import Any

import torch

__all__ = [
    "BASIS_CHANGES",
    "DECOMPOSITIONS",
    "batched_decompositions",
    "DynamicRotation",
    "EigenRotation",
    "SvdRotation",
    "robust_decomposition",
]

BASIS_CHANGES = ("keep", "transport", "transport_m", "reset")
# The default basis change per scope when a group says "auto": the paper's for svd, SOAP's for eigen.
DEFAULT_BASIS_CHANGE = {"svd": "keep", "eigen": "transport_m"}

log = logging.getLogger("rotkern")


def robust_decomposition(
    fn: Callable[[torch.Tensor], tuple[torch.Tensor, ...]],
    x: torch.Tensor,
    what: str,
    stats: MutableMapping[str, int] | None = None,
) -> tuple[torch.Tensor, ...] | None:
    """``fn(x)`` in x's dtype, else in float64, else in float64 on the CPU; None when all three fail.

    Results come back in x's dtype and device. A result with non-finite values counts as a failure (cuSOLVER can
    return NaN instead of raising). ``stats`` gets ``fallback_float64``, ``fallback_cpu`` or ``basis_kept`` counted
    up; every fallback is logged at WARNING with ``what`` (the unit) in the message.
    """
    tries = [(x.dtype, x.device, None), (torch.float64, x.device, "fallback_float64")]
    if x.device.type != "cpu":
        tries.append((torch.float64, torch.device("cpu"), "fallback_cpu"))
    elif x.dtype == torch.float64:
        tries = tries[:1]
    reason = ""
    for dtype, device, counter in tries:
        try:
            out = fn(x.to(dtype=dtype, device=device))
        except RuntimeError as err:  # torch.linalg.LinAlgError is a RuntimeError
            reason = str(err).splitlines()[0]
            continue
        if not all(bool(torch.isfinite(t).all()) for t in out):
            reason = "non-finite result"
            continue
        if counter is not None:
            _count(stats, counter)
            log.warning("rotkern: %s: decomposition failed (%s); succeeded in %s on %s", what, reason, dtype, device)
        return tuple(t.to(dtype=x.dtype, device=x.device) for t in out)
    _count(stats, "basis_kept")
    log.warning("rotkern: %s: decomposition failed in every dtype and device (%s); the previous basis is kept", what,
                reason)  # fmt: skip
    return None


_RUN: Any = object()  # "not decomposed yet": the method runs its decomposition itself


def _svd(a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.linalg.svd(a, full_matrices=False)


def _eigh(a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.linalg.eigh(a)


def _qr_q(a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (torch.linalg.qr(a)[0],)


# The decompositions the dynamic bases run, by kind; each takes (..., k, w) and returns a tuple of tensors.
DECOMPOSITIONS: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, ...]]] = {
    "svd": _svd,
    "eigh": _eigh,
    "qr": _qr_q,
}


# LAPACK loops over a batch anyway, and stacking costs a copy: on the CPU a batched QR of 8 1024 x 1024 matrices
# took 636 ms against 591 ms for a loop (1 thread), and an eigen refresh step 13 % longer. Batches run on GPUs
# only (one cuSOLVER call instead of one launch per matrix); the CPU decomposes one by one.
BATCH_ON_CPU = False


def batched_decompositions(
    jobs: list[tuple[Hashable, str, torch.Tensor, str]], stats: MutableMapping[str, int] | None = None
) -> dict[Hashable, tuple[torch.Tensor, ...] | None]:
    """Run decompositions, those of equal kind, shape, dtype and device as one batched call (not on the CPU unless
    :data:`BATCH_ON_CPU`).

    Args:
        jobs: (key, kind, x, what): ``kind`` one of :data:`DECOMPOSITIONS`, ``x`` a (k, w) matrix, ``what`` the
            unit, for log messages.
    Returns:
        {key: the decomposition's tensors (views into the batch's results), or None where it failed
        everywhere}. A job alone in its batch, and any item of a batch that raised or came back non-finite, runs
        :func:`robust_decomposition` (same fallbacks, same ``stats`` counts as unbatched).
    """
    groups: dict[tuple, list[tuple[Hashable, str, torch.Tensor, str]]] = {}
    for job in jobs:
        x = job[2]
        groups.setdefault((job[1], tuple(x.shape), x.dtype, x.device), []).append(job)
    out: dict[Hashable, tuple[torch.Tensor, ...] | None] = {}
    for (kind, _, _, device), items in groups.items():
        fn = DECOMPOSITIONS[kind]
        if len(items) > 1 and (device.type != "cpu" or BATCH_ON_CPU):
            try:
                res = fn(torch.stack([x for _, _, x, _ in items]))
            except RuntimeError:  # one bad matrix fails the whole call: every item retries alone below
                res = None
            if res is not None:
                finite = torch.stack([torch.isfinite(t).flatten(1).all(1) for t in res]).all(0).tolist()
                for i, (key, *_rest) in enumerate(items):
                    if finite[i]:
                        out[key] = tuple(t[i] for t in res)
                items = [item for item, ok in zip(items, finite, strict=True) if not ok]
        for key, _, x, what in items:
            out[key] = robust_decomposition(fn, x, what, stats)
    return out


def _count(stats: MutableMapping[str, int] | None, key: str) -> None:
    if stats is not None:
        stats[key] = stats.get(key, 0) + 1


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


class SvdRotation(DynamicRotation):
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
    """

    prefix = "svd_"

    def __init__(self, rows: int, cols: int, piece: int = 0, num_pieces: int = 1) -> None:
        super().__init__(rows, cols, piece, num_pieces)
        self.rank = min(self.rows, self.cols)

    @property
    def left_implicit(self) -> bool:
        """Whether L is kept as Householder reflectors (k > r), not as a dense matrix."""
        return self.rows > self.rank

    @property
    def right_implicit(self) -> bool:
        """Whether R is kept as Householder reflectors (w > r)."""
        return self.cols > self.rank

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        p, r = self.num_pieces, self.rank
        shapes = {"svd_u": (p, self.rows, r), "svd_v": (p, self.cols, r)}
        if self.left_implicit:
            shapes["svd_u_tau"] = (p, r)
        if self.right_implicit:
            shapes["svd_v_tau"] = (p, r)
        return shapes

    def compute_job(self, g: torch.Tensor) -> tuple[str, torch.Tensor, str]:
        """(kind, input, what) of the decomposition :meth:`compute` runs, for :func:`batched_decompositions`."""
        return "svd", g, repr(self)

    def compute(
        self, g: torch.Tensor, stats: MutableMapping[str, int] | None = None, decomposed: Any = _RUN
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """The bases of this piece from the current gradient.

        Args:
            g: (k, w) gradient, in the dtype the SVD runs in (the optimizer's compute dtype); finite.
            stats: counts of fallbacks (see :func:`robust_decomposition`).
            decomposed: the SVD of g (U, S, Vh) already computed (:func:`batched_decompositions` of
                :meth:`compute_job`; None where it failed); by default it is computed here.
        Returns:
            (S, bases): the singular values (r,), descending, and this piece's state tensors (the
            :meth:`state_shapes` keys, without the piece dim); None when the SVD failed everywhere.
        """
        out = robust_decomposition(_svd, g, repr(self), stats) if decomposed is _RUN else decomposed
        if out is None:
            return None
        u, s, vh = out
        bases = {}
        for key, x, implicit in (("svd_u", u, self.left_implicit), ("svd_v", vh.mT, self.right_implicit)):
            if implicit:
                bases[key], bases[key + "_tau"] = torch.geqrf(x)
            else:
                bases[key] = x
        return s, bases

    def identity_bases(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> dict:
        """A side kept as Householder reflectors is ``geqrf([I_r; 0])``: no reflection (tau = 0) and R_ii = 1."""
        bases = {}
        for key, n, implicit in (("svd_u", self.rows, self.left_implicit), ("svd_v", self.cols, self.right_implicit)):
            eye = torch.eye(n, self.rank, dtype=dtype, device=device)
            if implicit:
                bases[key], bases[key + "_tau"] = torch.geqrf(eye)
            else:
                bases[key] = eye
        return bases

    def dense_sides(self, b: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """L (k, k) and R (w, w) of this piece's bases ``b`` as dense orthogonal matrices, for a kernel that takes
        dense bases: a square side as stored, a side kept as Householder reflectors formed by
        ``torch.linalg.householder_product`` (O(n^2 r) time, n^2 memory), its first r columns' signs fixed as in
        :meth:`_left`. Same dtype and device as ``b``."""
        sides = []
        for key, implicit in (("svd_u", self.left_implicit), ("svd_v", self.right_implicit)):
            if not implicit:
                sides.append(b[key])
                continue
            a, tau, r = b[key], b[key + "_tau"], self.rank
            n = a.shape[0]
            q = torch.linalg.householder_product(torch.cat([a, a.new_zeros(n, n - r)], 1), tau)
            q[:, :r] *= _reflector_signs(a, r)
            sides.append(q)
        return sides[0], sides[1]

    def _left(self, x: torch.Tensor, b: Mapping, transpose: bool) -> torch.Tensor:
        if not self.left_implicit:
            u = b["svd_u"]
            return (u.mT if transpose else u) @ x
        a, tau, r = b["svd_u"], b["svd_u_tau"], self.rank
        d = _reflector_signs(a, r).unsqueeze(1)
        if transpose:  # L^T x = D (Q^T x)
            y = torch.ormqr(a, tau, x, left=True, transpose=True)
            return torch.cat([y[:r] * d, y[r:]])
        return torch.ormqr(a, tau, torch.cat([x[:r] * d, x[r:]]), left=True, transpose=False)  # Q (D x)

    def _right(self, x: torch.Tensor, b: Mapping, transpose: bool) -> torch.Tensor:
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


class EigenRotation(DynamicRotation):
    """The eigenbasis rotation of one (k, w) matrix unit of the ``eigen`` scope (SOAP, arXiv 2409.11321 Alg 3).

    Each side n of the matrix (k for the left, w for the right) with ``n <= max_dim`` keeps Shampoo's factor, an
    exponential moving average ``GG_L = EMA(G G^T)`` (k, k) / ``GG_R = EMA(G^T G)`` (w, w), and an orthogonal
    basis Q_L / Q_R of its eigenvectors, ordered by decreasing eigenvalue; a side longer than ``max_dim`` is the
    identity and keeps nothing (SOAP's ``max_precond_dim`` rule: an n x n factor of a 50304-row embedding would
    not fit). Adam runs on ``g~ = Q_L^T G Q_R``.

    The optimizer's step (:func:`rotkern.kernels.reference.rotated_adamw_ref`) at step t, SOAP's order:

    1. t = 1: ``GG = G G^T`` and Q from ``eigh(GG)``, eigenvalues descending, and nothing else: the param, its
       moments and weight decay wait for step 2, whose bias corrections count from 1 (``basis_reset_at`` = 1).
       This is SOAP's skipped first step: in a basis made from G itself, ``Q_L^T G Q_R`` is diagonal in exact
       arithmetic, and Adam's first update (v = 0) would turn the rounding noise of its zero entries into
       full +-lr steps along random directions;
    2. the Adam step in the current basis;
    3. after it: ``GG <- beta GG + (1 - beta) G G^T`` (beta = ``shampoo_beta``), so the gradient of a step never
       shapes the basis it is applied in;
    4. when t is a multiple of ``precondition_every``: one power iteration and a QR, ``Q <- qr(GG Q[:, s])``,
       with s the order of decreasing ``diag(Q^T GG Q)`` (the eigenvalue estimates), and the moments carried
       across per ``basis_change`` (see the module docstring; ``keep`` reorders the slots by s).

    State per parameter, pieces stacked on dim 0 (only for sides with n <= max_dim):
    ``eigen_gg_l`` (P, k, k), ``eigen_q_l`` (P, k, k), ``eigen_gg_r`` (P, w, w), ``eigen_q_r`` (P, w, w).

    Args:
        rows, cols, piece, num_pieces: as :class:`DynamicRotation`.
        max_dim: sides longer than this are the identity (SOAP's ``max_precond_dim``, default 10000).
    """

    prefix = "eigen_"

    def __init__(self, rows: int, cols: int, piece: int = 0, num_pieces: int = 1, max_dim: int = 10000) -> None:
        super().__init__(rows, cols, piece, num_pieces)
        self.max_dim = int(max_dim)
        self.left_eigen = self.rows <= self.max_dim
        self.right_eigen = self.cols <= self.max_dim

    def spec(self) -> dict:
        return {**super().spec(), "max_dim": self.max_dim}

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        p, shapes = self.num_pieces, {}
        for side, n, on in (("l", self.rows, self.left_eigen), ("r", self.cols, self.right_eigen)):
            if on:
                shapes[f"eigen_q_{side}"] = (p, n, n)
                shapes[f"eigen_gg_{side}"] = (p, n, n)
        return shapes

    def _sides(self):
        return [(s, n) for s, n, on in (("l", self.rows, self.left_eigen), ("r", self.cols, self.right_eigen)) if on]

    @staticmethod
    def _gram(g: torch.Tensor, side: str) -> torch.Tensor:
        return g @ g.mT if side == "l" else g.mT @ g

    def initial_jobs(self, g: torch.Tensor) -> dict[str, tuple[str, torch.Tensor, str]]:
        """Per side, (kind, input, what) of the ``eigh`` :meth:`initial` runs."""
        return {side: ("eigh", self._gram(g, side), f"{self!r} eigh ({side})") for side, _ in self._sides()}

    def initial(
        self, g: torch.Tensor, stats: MutableMapping[str, int] | None = None, decomposed: Mapping | None = None
    ) -> dict[str, torch.Tensor]:
        """The first bases from the first gradient g (k, w): ``GG = G G^T`` (and ``G^T G``), Q by ``eigh``.

        A side whose ``eigh`` fails everywhere starts from Q = I (counted in ``stats``). ``decomposed``: per side,
        the ``eigh`` of :meth:`initial_jobs` already computed (None where it failed); by default computed here.
        """
        bases = {}
        for side, n in self._sides():
            gg = self._gram(g, side)
            if decomposed is None:
                out = robust_decomposition(_eigh, gg, f"{self!r} eigh ({side})", stats)
            else:
                out = decomposed[side]
            q = torch.eye(n, dtype=g.dtype, device=g.device) if out is None else out[1].flip(-1)
            bases[f"eigen_gg_{side}"], bases[f"eigen_q_{side}"] = gg, q.contiguous()
        return bases

    def accumulate(self, bases: Mapping[str, torch.Tensor], g: torch.Tensor, beta: float) -> None:
        """``GG <- beta GG + (1 - beta) G G^T`` (and ``G^T G``), in place in ``bases`` (views into the state)."""
        for side, _ in self._sides():
            bases[f"eigen_gg_{side}"].lerp_(self._gram(g, side), 1 - beta)

    @staticmethod
    def _power_step(gg: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, GG Q[:, s]): one power iteration, columns in decreasing order of diag(Q^T GG Q) (the eigenvalue
        estimates)."""
        power = gg @ q
        s = torch.argsort((q * power).sum(0), descending=True)
        return s, power[:, s]

    def refresh_jobs(
        self, bases: Mapping[str, torch.Tensor], g: torch.Tensor, beta: float
    ) -> dict[str, tuple[torch.Tensor, tuple[str, torch.Tensor, str]]]:
        """Per side, (s, (kind, input, what)) of the QR that :meth:`refresh` will run once :meth:`accumulate` has
        taken in ``g`` (computed here out of place, with the same arithmetic; ``bases`` is not changed)."""
        jobs = {}
        for side, _ in self._sides():
            gg = bases[f"eigen_gg_{side}"].lerp(self._gram(g, side), 1 - beta)
            s, x = self._power_step(gg, bases[f"eigen_q_{side}"])
            jobs[side] = (s, ("qr", x, f"{self!r} qr ({side})"))
        return jobs

    def refresh(
        self,
        bases: Mapping[str, torch.Tensor],
        stats: MutableMapping[str, int] | None = None,
        decomposed: Mapping | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """New bases by one power iteration and a QR per side, and the slot order s of each side.

        Returns (new bases, {"l": s_l, "r": s_r} for the eigen sides): new column j continues old column s[j].
        A side whose QR fails everywhere keeps its basis (s = identity order). ``decomposed``: per side, (s, the
        QR of :meth:`refresh_jobs`, None where it failed) already computed; by default computed here.
        """
        new, order = {}, {}
        for side, n in self._sides():
            gg, q = bases[f"eigen_gg_{side}"], bases[f"eigen_q_{side}"]
            if decomposed is None:
                s, x = self._power_step(gg, q)
                out = robust_decomposition(_qr_q, x, f"{self!r} qr ({side})", stats)
            else:
                s, out = decomposed[side]
            if out is None:
                s = torch.arange(n, device=q.device)
                out = (q.clone(),)
            new[f"eigen_gg_{side}"], new[f"eigen_q_{side}"] = gg.clone(), out[0].contiguous()
            order[side] = s
        return new, order

    def reorder(self, x: torch.Tensor, order: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """x (k, w) with its slots reordered as :meth:`refresh` reordered the basis vectors."""
        if "l" in order:
            x = x.index_select(0, order["l"])
        if "r" in order:
            x = x.index_select(1, order["r"])
        return x

    def identity_bases(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> dict:
        """Q = I and GG = 0 per eigen side: the next refresh builds the basis from the factors gathered by then."""
        bases = {}
        for side, n in self._sides():
            bases[f"eigen_gg_{side}"] = torch.zeros(n, n, dtype=dtype, device=device)
            bases[f"eigen_q_{side}"] = torch.eye(n, dtype=dtype, device=device)
        return bases

    def _left(self, x: torch.Tensor, b: Mapping, transpose: bool) -> torch.Tensor:
        if not self.left_eigen:
            return x
        q = b["eigen_q_l"]
        return (q.mT if transpose else q) @ x

    def _right(self, x: torch.Tensor, b: Mapping, transpose: bool) -> torch.Tensor:
        if not self.right_eigen:
            return x
        q = b["eigen_q_r"]
        return x @ (q.mT if transpose else q)

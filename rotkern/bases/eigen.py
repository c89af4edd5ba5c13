"""The eigen family: bases from the eigenvectors of Shampoo's factors (SOAP, Vyas et al. 2024, arXiv 2409.11321).

See :class:`EigenRotation`; :mod:`rotkern.bases` has what the families share.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import torch

from ._decompose import DECOMPOSITIONS, robust_decomposition
from ._dynamic import BasisOptions, DynamicRotation, register

__all__ = ["EigenRotation"]


@register
class EigenRotation(DynamicRotation):
    """The eigenbasis rotation of one (k, w) matrix unit of the ``eigen`` scope (SOAP, arXiv 2409.11321 Alg 3).

    Each side n of the matrix (k for the left, w for the right) with ``n <= max_dim`` keeps Shampoo's factor, an
    exponential moving average ``GG_L = EMA(G G^T)`` (k, k) / ``GG_R = EMA(G^T G)`` (w, w), and an orthogonal
    basis Q_L / Q_R of its eigenvectors, ordered by decreasing eigenvalue; a side longer than ``max_dim`` is the
    identity and keeps nothing (SOAP's ``max_precond_dim`` rule: an n x n factor of a 50304-row embedding would
    not fit). Adam runs on ``g~ = Q_L^T G Q_R``.

    The optimizer's step (:func:`rotkern.bases.step_dynamic_units`) at step t, SOAP's order:

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
    scope = "eigen"
    default_change = "transport_m"  # SOAP's: m projected exactly, v kept (reordered)

    def __init__(self, rows: int, cols: int, piece: int = 0, num_pieces: int = 1, max_dim: int = 10000) -> None:
        super().__init__(rows, cols, piece, num_pieces)
        self.max_dim = int(max_dim)
        self.left_eigen = self.rows <= self.max_dim
        self.right_eigen = self.cols <= self.max_dim

    # -- lifecycle ---------------------------------------------------------------------------------------
    @classmethod
    def for_unit(cls, rows, cols, piece, num_pieces, *, max_precond_dim):
        return cls(rows, cols, piece, num_pieces, max_dim=max_precond_dim)

    def needs_finite_grad(self, step: int, opts: BasisOptions) -> bool:
        return True  # every gradient enters the factors

    def jobs(self, g, store, step, opts):
        bases = self.load(store)
        if bases is None or int(step) == 1:
            sides = [side for side, _ in self._sides()]
            return dict(self.initial_jobs(g)), lambda done: {"before": {side: done[side] for side in sides}}
        if int(step) % opts.precondition_every == 0:
            refresh = self.refresh_jobs(bases, g, opts.shampoo_beta)
            orders = {side: s for side, (s, _) in refresh.items()}
            return ({side: job for side, (_, job) in refresh.items()},
                    lambda done: {"after": {side: (s, done[side]) for side, s in orders.items()}})  # fmt: skip
        return None

    def before_step(self, g, store, step, *, opts, moments, rotate=True, decomposed=None):
        """(g~, bases), or None at step 1, which only builds the first factors and basis (SOAP's skipped first
        step). The pieces of a param share its state tensors, so the step, not the tensors' presence, says whether
        this piece has a basis yet."""
        bases = self.load(store)
        if bases is None or int(step) == 1:
            self.save(store, self.initial(g, opts.stats, (decomposed or {}).get("before")))
            store["basis_reset_at"] = torch.tensor(float(step), dtype=torch.float32, device=g.device)
            return None
        return (self.rotate(g, bases) if rotate else None), bases

    def after_step(self, g, bases, store, step, *, opts, moments, decomposed=None):
        # SOAP's order: the factors take in this step's gradient after it was applied, then maybe a refresh.
        self.accumulate(bases, g, opts.shampoo_beta)
        if int(step) % opts.precondition_every == 0:
            new, order = self.refresh(bases, opts.stats, (decomposed or {}).get("after"))
            self.change_moments(moments, bases, new, opts.change_for(self), store, step, order)  # views: in place
            self.save(store, new)

    def fits_two_sided_kernel(self) -> bool:
        return True

    def kernel_sides(self, bases):
        return bases.get("eigen_q_l"), bases.get("eigen_q_r")

    # -- the bases ---------------------------------------------------------------------------------------
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
                out = robust_decomposition(DECOMPOSITIONS["eigh"], gg, f"{self!r} eigh ({side})", stats)
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
                out = robust_decomposition(DECOMPOSITIONS["qr"], x, f"{self!r} qr ({side})", stats)
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

"""The paper's analysis metrics, as pure functions (paper Sec. 4, App. B.3, C.3, C.4).

- Update orthogonality (paper Sec. 4.2): :func:`update_matrix` rebuilds ``A = R^T m / (sqrt(v) + eps)`` of a weight
  in the standard basis from a rotated optimizer's state; :func:`cv_singular_values` and the alternatives of
  C.4 score it; :func:`update_cv` does every linear matrix of a model (q/k/v split, embeddings excluded).
- Gradient bound (paper Alg. 1, App. B.3): :func:`rotated_grad_inf_norm` and the running max :class:`GradientBound`.
- Hessian rows (paper Sec. 4.1, App. C.3): :func:`hessian_rows` (HVPs, optionally of the rotated loss ``f(R^T w)``),
  :func:`row_partition` (I_N / I_L / I_notL), :func:`l11_estimate`, and :class:`ParamLayout` to map flat ids
  to tensors.
- Second moments (paper Sec. 3.2, Fig. 6): :func:`second_moment_stats`.

Nothing here changes the optimizer or the model: states are read, never written, and HVPs use
``torch.autograd.grad`` (``.grad`` untouched). Rotations are applied only through ``Unit.view`` /
``Unit.write`` and ``rotation.rotate`` / ``unrotate``, so any unit type (including a dynamic SVD rotation)
works. They run in the optimizer's compute dtype (the dtype the optimizer itself rotates in); reductions
are accumulated in float64.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn

from .optim._base import RotatedOptimizerBase, has_moment, moment
from .scopes import infer_roles, param_groups_for

__all__ = [
    "update_matrix",
    "update_matrices",
    "singular_values",
    "cv_singular_values",
    "scaled_deviation",
    "cv_gram_eigenvalues",
    "scaled_gram_deviation",
    "svd_entropy",
    "orthogonality_metrics",
    "update_cv",
    "mean_over_depth",
    "to_rotated_basis",
    "to_standard_basis",
    "rotated_grad_inf_norm",
    "GradientBound",
    "hessian_rows",
    "hessian_row",
    "FlatPosition",
    "ParamLayout",
    "row_partition",
    "l11_estimate",
    "second_moment_stats",
]

Tensors = Sequence[torch.Tensor | None]


# -- basis changes --


def _all_params(opt) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def _map_basis(opt, tensors: Tensors, forward: bool, wanted: set[int] | None = None):
    """Yield ``(group offset, group size, unit, mapped (num_vectors, L) block)`` for every group's units.

    ``tensors`` is aligned with the concatenated params of all groups (None = zeros). ``forward`` rotates
    (standard -> optimizer layout), else un-rotates. With ``wanted`` (flat param positions), only units that
    touch one of them are mapped.
    """
    dtype = opt.compute_dtype
    offset = 0
    for gi, group in enumerate(opt.param_groups):
        params = group["params"]
        flats: list[torch.Tensor | None] = [None] * len(params)
        for unit in opt.units(gi):
            if wanted is not None and not any(offset + i in wanted for i in unit.params):
                continue
            for i in unit.params:
                if flats[i] is None:
                    t = tensors[offset + i]
                    t = torch.zeros_like(params[i], dtype=dtype) if t is None else t.detach().to(dtype)
                    flats[i] = t.reshape(-1)
            x = unit.view(flats)
            if unit.rotation is not None:
                x = unit.rotation.rotate(x) if forward else unit.rotation.unrotate(x)
            yield offset, len(params), unit, x
        offset += len(params)


def _mapped(opt, tensors: Tensors, forward: bool, wanted: set[int] | None) -> list[torch.Tensor | None]:
    params = _all_params(opt)
    if len(tensors) != len(params):
        raise ValueError(f"got {len(tensors)} tensors for the optimizer's {len(params)} params")
    out: list[torch.Tensor | None] = [None] * len(params)
    for offset, size, unit, x in _map_basis(opt, tensors, forward, wanted):
        # Unit.write indexes its group's flats: hand it this group's slice of the outputs.
        local = out[offset : offset + size]
        for i in unit.params:
            if local[i] is None:
                local[i] = torch.zeros(params[offset + i].numel(), dtype=x.dtype, device=x.device)
        unit.write(local, x)
        out[offset : offset + size] = local
    return [None if t is None else t.view(p.shape) for t, p in zip(out, params, strict=True)]


def to_rotated_basis(opt: RotatedOptimizerBase, tensors: Tensors) -> list[torch.Tensor]:
    """Per-parameter tensors in the standard basis -> the optimizer's rotated layout (where its moments live).

    tensors: aligned with the optimizer's params, all groups concatenated (None counts as zeros); each has its
    param's shape. Returns the same shapes, in ``opt.compute_dtype``. For small models this equals
    ``opt.rotation_matrix() @ vec(tensors)``.
    """
    return _filled(opt, _mapped(opt, tensors, True, None))


def to_standard_basis(opt: RotatedOptimizerBase, tensors: Tensors) -> list[torch.Tensor]:
    """The inverse of :func:`to_rotated_basis`: ``D^T vec(tensors)``, per parameter."""
    return _filled(opt, _mapped(opt, tensors, False, None))


def _filled(opt, out: list[torch.Tensor | None]) -> list[torch.Tensor]:
    # Only empty params belong to no unit.
    params = _all_params(opt)
    return [torch.zeros_like(p, dtype=opt.compute_dtype) if t is None else t for t, p in zip(out, params, strict=True)]


# -- update orthogonality (paper Sec. 4.2, App. C.4) --


def update_matrices(opt: RotatedOptimizerBase, params: Sequence[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """Adam's update direction of each param in the standard basis: ``A = R^T (m / (sqrt(v) + eps))``.

    Raw moments (no bias correction), no lr, no weight decay, as the paper's C.4; eps is the param group's.
    A param split over several units (q/k/v thirds, rows) gets each unit's piece; a global unit is un-rotated
    once and every requested member takes its segment. Params without state (no step yet) raise.

    Returns: one tensor per requested param (default: every param with state), with the param's shape, in
    ``opt.compute_dtype``.
    """
    everything = _all_params(opt)
    if params is None:
        params = [p for p in everything if has_moment(opt.state.get(p), "exp_avg")]
    position = {id(p): k for k, p in enumerate(everything)}
    wanted = set()
    for p in params:
        if id(p) not in position:
            raise ValueError(f"param of shape {tuple(p.shape)} is not in this optimizer")
        st = opt.state.get(p, {})
        if not (has_moment(st, "exp_avg") and has_moment(st, "exp_avg_sq")):
            raise ValueError(
                f"param of shape {tuple(p.shape)} has no exp_avg/exp_avg_sq state: take an Adam step first"
            )
        wanted.add(position[id(p)])
    directions: list[torch.Tensor | None] = [None] * len(everything)
    offset = 0
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            st = opt.state.get(p, {})
            if has_moment(st, "exp_avg"):
                directions[offset + i] = moment(st, "exp_avg") / (moment(st, "exp_avg_sq").sqrt() + group["eps"])
        offset += len(group["params"])
    out = _mapped(opt, directions, False, wanted)
    return [out[position[id(p)]] for p in params]


def update_matrix(opt: RotatedOptimizerBase, param: torch.Tensor) -> torch.Tensor:
    """``A`` of one parameter (see :func:`update_matrices`); shape of ``param`` (e.g. (out, in))."""
    return update_matrices(opt, [param])[0]


def singular_values(a: torch.Tensor) -> torch.Tensor:
    """Singular values in float64 of ``a`` viewed as (shape[0], -1) (conv kernels flatten); (min(m, n),)."""
    return torch.linalg.svdvals(a.detach().reshape(a.shape[0], -1).to(torch.float64))


def _cv(x: torch.Tensor, unbiased: bool) -> float:
    mean = x.mean()
    if x.numel() < 1 + unbiased or mean == 0:
        return math.nan
    return (x.std(correction=int(unbiased)) / mean).item()


def cv_singular_values(a: torch.Tensor, *, unbiased: bool = False) -> float:
    """CV(A) = sigma_s / mu_s over the singular values of A (paper App. C.4): 0 iff A is a scaled (semi-)orthogonal
    matrix, scale-invariant.

    a: (m, n). ``unbiased=False`` (default) uses the population std; ``True`` the sample std (n - 1). The paper
    does not say which. Returns nan for a zero matrix.
    """
    return _cv(singular_values(a), unbiased)


def _scaled_dev(x: torch.Tensor) -> float:
    # alpha* = sum x / sum x^2 minimises sum (alpha x - 1)^2; report the RMS residual.
    sq = x.square().sum()
    if sq == 0:
        return math.nan
    return (x * (x.sum() / sq) - 1).square().mean().sqrt().item()


def scaled_deviation(a: torch.Tensor) -> float:
    """min_alpha RMS(alpha s - 1) over the singular values s, alpha* = sum s / sum s^2 (C.4 alternative).

    Equals CV / sqrt(1 + CV^2) with the population CV, so it ranks matrices exactly as CV does. a: (m, n).
    """
    return _scaled_dev(singular_values(a))


def cv_gram_eigenvalues(a: torch.Tensor, *, unbiased: bool = False) -> float:
    """CV of the eigenvalues of A A^T (C.4 alternative). a: (m, n).

    Uses the min(m, n) eigenvalues s_i^2 of the smaller Gram matrix (A A^T or A^T A), so that a semi-orthogonal
    A scores 0 (the extra |m - n| zero eigenvalues of the larger one are left out; the paper does not say).
    """
    return _cv(singular_values(a).square(), unbiased)


def scaled_gram_deviation(a: torch.Tensor) -> float:
    """||alpha* G - I||_F / sqrt(k) with G the smaller Gram matrix of A and alpha* = sum lambda / sum lambda^2.

    The "scaled A A^T" alternative of C.4; normalised by sqrt(k), k = min(m, n), to compare shapes. a: (m, n).
    """
    return _scaled_dev(singular_values(a).square())


def _entropy(s: torch.Tensor) -> float:
    p = s.square()
    if p.numel() < 2 or p.sum() == 0:
        return math.nan
    p = p / p.sum()
    return (-(p * p.clamp_min(1e-300).log()).sum() / math.log(p.numel())).item()


def svd_entropy(a: torch.Tensor) -> float:
    """SVD entropy (Liu & Su 2025): -sum p_i log p_i / log k with p_i = s_i^2 / sum s^2, k = min(m, n).

    1 for a scaled (semi-)orthogonal A, lower for a peaked spectrum (the opposite direction to CV). a: (m, n).
    """
    return _entropy(singular_values(a))


def orthogonality_metrics(a: torch.Tensor, *, unbiased: bool = False) -> dict[str, float]:
    """All the scores above from one SVD: keys cv, scaled_deviation, cv_gram, scaled_gram, svd_entropy."""
    s = singular_values(a)
    return {
        "cv": _cv(s, unbiased),
        "scaled_deviation": _scaled_dev(s),
        "cv_gram": _cv(s.square(), unbiased),
        "scaled_gram": _scaled_dev(s.square()),
        "svd_entropy": _entropy(s),
    }


def _param_names(opt, named: nn.Module | Iterable[tuple[str, torch.Tensor]] | None) -> dict[int, str]:
    names: dict[int, str] = {}
    for gi, g in enumerate(opt.param_groups):
        for i, p in enumerate(g["params"]):
            gn = g.get("names")
            names[id(p)] = gn[i] if gn is not None and gn[i] is not None else f"group{gi}.param{i}"
    if named is not None:
        items = named.named_parameters() if isinstance(named, nn.Module) else named
        for n, p in items:
            names[id(p)] = n
    return names


def update_cv(
    opt: RotatedOptimizerBase,
    named: nn.Module | Iterable[tuple[str, torch.Tensor]] | None = None,
    *,
    unbiased: bool = False,
    split_qkv: bool = True,
    metric: Callable[[torch.Tensor], float] | None = None,
    include: Callable[[str], bool] | None = None,
) -> dict[str, float]:
    """CV of the update of every linear matrix (paper Sec. 4.2 protocol): ``{name: CV(A)}``.

    Matrices: params with >= 2 dims whose optimizer role is not ``embedding`` (nor weights of an
    ``nn.Embedding`` when ``named`` is a module: the tied wte/lm_head is excluded, as in the paper). A param
    with role ``qkv`` (or role ``matrix`` and a fused-QKV name such as ``c_attn.weight``) is scored as three
    matrices ``name[q]``, ``name[k]``, ``name[v]`` (rows split in thirds) when ``split_qkv``. Params without
    optimizer state are skipped.

    named: a module or (name, param) pairs for the names; default the optimizer's group names.
    metric: scores one (m, n) matrix; default :func:`cv_singular_values` with ``unbiased``.
    include: optional filter on the name (before the [q]/[k]/[v] suffix).
    """
    metric = metric or (lambda a: cv_singular_values(a, unbiased=unbiased))
    names = _param_names(opt, named)
    skip = set()
    if isinstance(named, nn.Module):
        skip = {id(m.weight) for m in named.modules() if isinstance(m, nn.Embedding)}
    chosen, roles = [], {}
    for g in opt.param_groups:
        for p, role in zip(g["params"], g["roles"], strict=True):
            if p.dim() < 2 or role == "embedding" or id(p) in skip or not has_moment(opt.state.get(p), "exp_avg"):
                continue
            if include is not None and not include(names[id(p)]):
                continue
            chosen.append(p)
            # Names given here can reveal a fused QKV the optimizer was built without names for.
            roles[id(p)] = infer_roles([p.shape], [names[id(p)]])[0] if role == "matrix" else role
    out: dict[str, float] = {}
    for p, a in zip(chosen, update_matrices(opt, chosen), strict=True):
        name = names[id(p)]
        if roles[id(p)] == "qkv" and split_qkv:
            for tag, part in zip("qkv", a.chunk(3, dim=0), strict=True):
                out[f"{name}[{tag}]"] = metric(part)
        else:
            out[name] = metric(a)
    return out


def mean_over_depth(values: Mapping[str, float]) -> dict[str, float]:
    """Plain mean per layer type over depth (Fig. 10): names that differ only in ``.<int>.`` share a key.

    E.g. ``transformer.h.3.attn.c_attn.weight[q]`` -> ``transformer.h.*.attn.c_attn.weight[q]``.
    """
    groups: dict[str, list[float]] = {}
    for name, v in values.items():
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", name), []).append(v)
    return {k: math.fsum(v) / len(v) for k, v in groups.items()}


# -- gradient bound (paper Alg. 1, App. B.3) --


def _grads_of(opt, grads) -> list[torch.Tensor | None]:
    params = _all_params(opt)
    if grads is None:
        return [p.grad for p in params]
    if isinstance(grads, Mapping):
        return [grads.get(p) for p in params]
    grads = list(grads)
    if len(grads) != len(params):
        raise ValueError(f"got {len(grads)} gradients for the optimizer's {len(params)} params")
    return grads


def rotated_grad_inf_norm(
    opt: RotatedOptimizerBase, grads: Sequence[torch.Tensor | None] | Mapping[torch.Tensor, torch.Tensor] | None = None
) -> float:
    """||g~||_inf of the gradient in the optimizer's basis, ``g~ = R g`` (the quantity of Alg 1).

    grads: per-param gradients in the standard basis, aligned with the optimizer's params (all groups), a
    {param: grad} mapping, or None to read ``p.grad``. Missing gradients count as zeros.
    """
    grads = _grads_of(opt, grads)
    best = 0.0
    for _, _, _, x in _map_basis(opt, grads, True):
        if x.numel():
            best = max(best, x.abs().max().item())
    return best


class GradientBound:
    """Alg 1: the running max C~ = max_t ||g~_t||_inf over T minibatches at a fixed checkpoint w_R.

    ``update(grads)`` (same arguments as :func:`rotated_grad_inf_norm`) returns this minibatch's norm;
    ``value`` is the bound so far, ``count`` the number of minibatches seen.
    """

    def __init__(self, opt: RotatedOptimizerBase) -> None:
        self.opt = opt
        self.value = 0.0
        self.count = 0

    def update(self, grads: Sequence[torch.Tensor | None] | Mapping[torch.Tensor, torch.Tensor] | None = None) -> float:
        norm = rotated_grad_inf_norm(self.opt, grads)
        self.value = max(self.value, norm)
        self.count += 1
        return norm


# -- Hessian rows (paper Sec. 4.1, App. C.3) --


def hessian_rows(
    loss_fn: Callable[[int], torch.Tensor],
    params: Sequence[torch.Tensor],
    indices: Sequence[int],
    *,
    num_batches: int = 1,
    opt: RotatedOptimizerBase | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Rows ``r_i = (1/k) sum_b H_b e_i`` of the minibatch Hessian by Hessian-vector products (paper Sec. 4.1).

    Each HVP is ``grad <grad f_b(w), v>`` (double backward), ``v = e_i``; the first backward of a batch is shared
    by all rows. ``loss_fn(b)`` returns the scalar loss of minibatch ``b`` for ``b in range(num_batches)``
    (k = num_batches; the paper uses 5000). Flat ids index the concatenation of ``params`` flattened in order
    (nanoGPT ``named_parameters()`` order for the paper's ids; see :class:`ParamLayout`).

    With ``opt``, rows are of the rotated loss f^(R)(w~) = f(D^T w~) whose Hessian is ``D H D^T``, indexed in the
    optimizer's layout (where its moments live): ``r_i = D H D^T e_i``. ``params`` must then be exactly the
    optimizer's params, all groups, in order.

    The model must be twice differentiable: attention through SDPA's math backend (rotkern's GPT default, and
    the paper's setting; the flash kernels have no double backward). The model's mode (dropout) is the caller's.

    dtype: of the accumulator; float64 by default (use float32 for many rows of a 124M model: (rows, d)).
    Returns: (len(indices), d) in ``dtype``, on the params' device.
    """
    params = list(params)
    starts = [0]
    for p in params:
        starts.append(starts[-1] + p.numel())
    d = starts[-1]
    for i in indices:
        if not 0 <= i < d:
            raise IndexError(f"flat index {i} out of range for d={d}")
    directions = None
    if opt is not None:
        if [id(p) for p in params] != [id(p) for p in _all_params(opt)]:
            raise ValueError("with opt=, params must be the optimizer's params (all groups, in order)")
        directions = []
        for i in indices:
            j = _locate(starts, i)
            onehot: list[torch.Tensor | None] = [None] * len(params)
            onehot[j] = torch.zeros(params[j].numel(), dtype=opt.compute_dtype, device=params[j].device)
            onehot[j][i - starts[j]] = 1.0
            # D^T e_i only touches the unit holding coordinate i; the other params stay None (zero).
            directions.append(_mapped(opt, onehot, False, {j}))
    acc = torch.zeros(len(indices), d, dtype=dtype, device=params[0].device)
    with torch.enable_grad():
        for b in range(num_batches):
            grads = torch.autograd.grad(loss_fn(b), params, create_graph=True, allow_unused=True)
            for r, i in enumerate(indices):
                if directions is None:
                    j = _locate(starts, i)
                    terms = [] if grads[j] is None else [grads[j].reshape(-1)[i - starts[j]]]
                else:
                    terms = [
                        (g * v.to(g.dtype)).sum()
                        for g, v in zip(grads, directions[r], strict=True)
                        if g is not None and v is not None
                    ]
                inner = sum(terms)
                # A gradient without a graph (loss linear in those params) has a zero Hessian there.
                if not torch.is_tensor(inner) or not inner.requires_grad:
                    continue
                hv = torch.autograd.grad(inner, params, retain_graph=True, allow_unused=True)
                for j, h in enumerate(hv):
                    if h is not None:
                        acc[r, starts[j] : starts[j + 1]] += h.detach().reshape(-1).to(dtype)
    acc /= num_batches
    if opt is not None:
        # Averaging is linear, so rotate the mean once: D (mean_b H_b D^T e_i).
        for r in range(len(indices)):
            chunks = [acc[r, starts[j] : starts[j + 1]].view(p.shape) for j, p in enumerate(params)]
            acc[r] = torch.cat([t.reshape(-1).to(dtype) for t in to_rotated_basis(opt, chunks)])
    return acc


def hessian_row(
    loss_fn: Callable[[int], torch.Tensor],
    params: Sequence[torch.Tensor],
    index: int,
    *,
    num_batches: int = 1,
    opt: RotatedOptimizerBase | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """One row ``r_i = H e_i`` of :func:`hessian_rows`; (d,)."""
    return hessian_rows(loss_fn, params, [index], num_batches=num_batches, opt=opt, dtype=dtype)[0]


def _locate(starts: Sequence[int], index: int) -> int:
    lo, hi = 0, len(starts) - 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if starts[mid] <= index:
            lo = mid
        else:
            hi = mid - 1
    return lo


class FlatPosition(NamedTuple):
    """Where a flat id lands: param name and index, offset in the flattened param, and (row, col) of its
    (shape[0], -1) view (a 1-D param is a column: row = offset, col = 0)."""

    name: str
    param: int
    offset: int
    row: int
    col: int


class ParamLayout:
    """The flat concatenation of named parameters: names, shapes, roles and start offsets.

    Build it from shapes only (:meth:`from_shapes`), a model (:meth:`from_model`, nanoGPT ``named_parameters()``
    order, roles as :func:`rotkern.param_groups_for`) or an optimizer (:meth:`from_optimizer`).
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]], roles: Sequence[str] | None = None):
        self.names = list(names)
        self.shapes = [tuple(int(s) for s in shape) for shape in shapes]
        sizes = [torch.Size(s) for s in self.shapes]
        self.roles = list(roles) if roles is not None else infer_roles(sizes, self.names)
        self.starts = [0]
        for s in sizes:
            self.starts.append(self.starts[-1] + s.numel())

    @classmethod
    def from_shapes(cls, named_shapes: Iterable[tuple[str, Sequence[int]]], roles: Sequence[str] | None = None):
        named_shapes = list(named_shapes)
        return cls([n for n, _ in named_shapes], [s for _, s in named_shapes], roles)

    @classmethod
    def from_model(cls, model: nn.Module) -> ParamLayout:
        g = param_groups_for(model)[0]
        return cls(g["names"], [p.shape for p in g["params"]], g["roles"])

    @classmethod
    def from_optimizer(cls, opt: RotatedOptimizerBase) -> ParamLayout:
        names = _param_names(opt, None)
        params = _all_params(opt)
        roles = [r for g in opt.param_groups for r in g["roles"]]
        return cls([names[id(p)] for p in params], [p.shape for p in params], roles)

    @property
    def numel(self) -> int:
        return self.starts[-1]

    def _width(self, j: int) -> int:
        shape = self.shapes[j]
        return math.prod(shape[1:]) if len(shape) > 1 else 1

    def locate(self, index: int) -> FlatPosition:
        """Flat id -> :class:`FlatPosition` (param name, row, col)."""
        if not 0 <= index < self.numel:
            raise IndexError(f"flat index {index} out of range for d={self.numel}")
        j = _locate(self.starts, index)
        offset = index - self.starts[j]
        w = self._width(j)
        return FlatPosition(self.names[j], j, offset, offset // w, offset % w)


def _as_flat(x: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    if torch.is_tensor(x):
        return x.detach().reshape(-1)
    return torch.cat([t.detach().reshape(-1) for t in x])


def _dot64(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 24) -> float:
    # Chunked so that a d-long float64 copy is never made.
    return math.fsum(
        torch.dot(a[k : k + chunk].to(torch.float64), b[k : k + chunk].to(torch.float64)).item()
        for k in range(0, a.numel(), chunk)
    )


def row_partition(
    row: torch.Tensor | Sequence[torch.Tensor],
    delta: torch.Tensor | Sequence[torch.Tensor],
    index: int,
    layout: ParamLayout,
    *,
    split_qkv: bool = True,
    embedding: str = "as_linear",
) -> dict[str, float]:
    """Split ``r_i . dw`` into the paper's three blocks (Sec. 4.1, Table 1): keys neuron, layer, other, total.

    neuron = sum over I_N (weights into the same output neuron as w_i, w_i included: its row of the (out, in)
    weight); layer = over I_L (the rest of w_i's layer); other = over I_notL (all other layers). neuron +
    layer + other = total = r . dw.

    row, delta: (d,) flat, or per-param tensors, in the same basis and ``layout`` order. ``split_qkv``: a
    ``qkv`` param counts as three layers (q, k, v); not stated by the paper. ``embedding="transposed"``: an
    ``embedding`` param is stored (in, out), so its output neuron is a column (paper B.1); ``"as_linear"``
    uses rows.
    """
    r, dw = _as_flat(row), _as_flat(delta)
    if r.numel() != layout.numel or dw.numel() != layout.numel:
        raise ValueError(f"row has {r.numel()} and delta {dw.numel()} entries; the layout has {layout.numel}")
    pos = layout.locate(index)
    j, shape = pos.param, layout.shapes[pos.param]
    start, w = layout.starts[j], layout._width(j)
    rows = shape[0] if shape else 1
    a, b = start, layout.starts[j + 1]
    if layout.roles[j] == "qkv" and split_qkv:
        third = rows // 3
        part = pos.row // third
        a, b = start + part * third * w, start + (part + 1) * third * w
    prod = (r[a:b].to(torch.float64) * dw[a:b].to(torch.float64)).view(-1, w)
    if layout.roles[j] == "embedding" and embedding == "transposed":
        neuron_mask = torch.zeros_like(prod, dtype=torch.bool)
        neuron_mask[:, pos.col] = True
    else:
        neuron_mask = torch.zeros_like(prod, dtype=torch.bool)
        neuron_mask[pos.row - (a - start) // w] = True
    neuron = prod[neuron_mask].sum().item()
    layer = prod[~neuron_mask].sum().item()
    other = _dot64(r[:a], dw[:a]) + _dot64(r[b:], dw[b:])
    return {"neuron": neuron, "layer": layer, "other": other, "total": _dot64(r, dw)}


def l11_estimate(rows: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """Mean L1 norm of sampled Hessian rows, the paper's estimate of ||H||_(1,1) / d (paper Sec. 4.1, App. C.3).

    rows: (k, d) or k flat (d,) tensors.
    """
    rows = list(rows) if not torch.is_tensor(rows) else list(rows.reshape(rows.shape[0], -1))
    if not rows:
        raise ValueError("l11_estimate needs at least one row")
    return math.fsum(r.detach().abs().to(torch.float64).sum().item() for r in rows) / len(rows)


# -- second moments (paper Sec. 3.2, Fig. 6) --

DEFAULT_QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)


def _quantiles(x: torch.Tensor, qs: Sequence[float]) -> list[float]:
    # Sort-based (torch.quantile refuses inputs over 2^24 elements); linear interpolation, as torch.quantile.
    if x.numel() == 0:
        return [math.nan] * len(qs)
    s = x.reshape(-1).sort().values
    out = []
    for q in qs:
        pos = q * (s.numel() - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, s.numel() - 1)
        lo_v, hi_v = s[lo].double().item(), s[hi].double().item()
        out.append(lo_v + (hi_v - lo_v) * (pos - lo))
    return out


def _v_stats(v: torch.Tensor, qs: Sequence[float], lo: float, hi: float, bins: int) -> dict:
    v = v.detach().reshape(-1)
    pos = v[v > 0]
    logv = pos.log10()
    return {
        "numel": v.numel(),
        "zeros": int((v == 0).sum()),
        "mean": (v.sum(dtype=torch.float64) / v.numel()).item() if v.numel() else math.nan,
        "min": v.min().item() if v.numel() else math.nan,
        "max": v.max().item() if v.numel() else math.nan,
        "quantiles": dict(zip(qs, _quantiles(v, qs), strict=True)),
        "counts": torch.histc(logv.to(torch.float64), bins=bins, min=lo, max=hi).long().tolist(),
        "below": int((logv < lo).sum()),
        "above": int((logv > hi).sum()),
    }


def second_moment_stats(
    opt: RotatedOptimizerBase,
    *,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    log10_range: tuple[float, float] = (-24.0, 0.0),
    bins: int = 96,
    bias_correction: bool = False,
    key: str = "exp_avg_sq",
) -> dict:
    """Distribution of Adam's second moment v, in the optimizer's (rotated) layout, for Fig. 6-like plots.

    Returns ``{"edges": log10 bin edges (bins + 1,), "per_param": {name: stats}, "pooled": stats}`` where stats
    has numel, zeros, mean, min, max, quantiles ({q: value}, linear interpolation), counts (histogram of
    log10 v over ``log10_range`` for v > 0), below / above (positive values outside the range). Everything is
    plain Python (JSON-ready). ``bias_correction`` divides v by 1 - beta2^t (the paper's figure does not say;
    default raw v, as in paper Sec. 4.2, App. C.4).
    """
    lo, hi = log10_range
    names = _param_names(opt, None)
    per_param, pooled = {}, []
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt.state.get(p, {})
            if not has_moment(st, key):
                continue
            v = moment(st, key).detach()
            if bias_correction:
                v = v / (1 - g["betas"][1] ** float(st["step"]))
            per_param[names[id(p)]] = _v_stats(v, quantiles, lo, hi, bins)
            pooled.append(v.reshape(-1))
    pooled_v = torch.cat([t.to(pooled[0].device) for t in pooled]) if pooled else torch.zeros(0)
    return {
        "edges": torch.linspace(lo, hi, bins + 1, dtype=torch.float64).tolist(),
        "per_param": per_param,
        "pooled": _v_stats(pooled_v, quantiles, lo, hi, bins),
    }

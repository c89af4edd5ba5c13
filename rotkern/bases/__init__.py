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

**Where things are.** One file per family (:mod:`rotkern.bases.svd`, :mod:`rotkern.bases.eigen`), each a
:class:`DynamicRotation` subclass registered under its ``rotation=`` name; the interface and the registry
(:mod:`rotkern.bases._dynamic`), the decompositions (:mod:`rotkern.bases._decompose`) and the loop that runs a
step's units (:func:`step_dynamic_units`, :mod:`rotkern.bases._lifecycle`).

**A new family** is one new file here, ``rotkern/bases/<name>.py``, defining a subclass decorated with
:func:`register`, with ``scope = "<name>"`` and ``default_change``, the state (``prefix``, ``state_shapes``,
``identity_bases``), the action (``_left``, ``_right``) and the lifecycle (``for_unit``, ``needs_finite_grad``,
``jobs``, ``before_step``, ``after_step``; ``fits_two_sided_kernel`` / ``kernel_sides`` for the fused kernel),
plus its test. The package imports every public module in it, so ``rotation="<name>"`` then works in
:func:`rotkern.scopes.build_units`, both optimizers and their checkpoints.
"""

from __future__ import annotations

import importlib
import pkgutil

from ._decompose import DECOMPOSITIONS, batched_decompositions, robust_decomposition
from ._dynamic import BASIS_CHANGES, DYNAMIC_BASES, BasisOptions, DynamicRotation, register
from ._lifecycle import UnitStep, prefetch_decompositions, step_dynamic_units
from .eigen import EigenRotation
from .svd import SvdRotation

__all__ = [
    "BASIS_CHANGES",
    "DECOMPOSITIONS",
    "DEFAULT_BASIS_CHANGE",
    "DYNAMIC_BASES",
    "BasisOptions",
    "DynamicRotation",
    "EigenRotation",
    "SvdRotation",
    "UnitStep",
    "batched_decompositions",
    "prefetch_decompositions",
    "register",
    "robust_decomposition",
    "step_dynamic_units",
]

# Every public module of the package is a family: importing it registers it.
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

# The default basis change per scope when a group says "auto": the paper's for svd, SOAP's for eigen.
DEFAULT_BASIS_CHANGE = {scope: cls.default_change for scope, cls in DYNAMIC_BASES.items()}

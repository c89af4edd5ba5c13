"""Testing helpers: the one tolerance table, ``assert_close_to_ref`` and the dense-matrix oracle.

Every precision test in rotkern takes its tolerances from :data:`TOLERANCES`; change them here only.

Two rules, and where each holds:

- a fixed ``(rtol, atol)`` against the eager fp32 reference: only where it is provably stable, i.e. where no
  rotated gradient coordinate comes near an fp32 sign tie (:func:`sign_ties` returns 0; tiny shapes). On
  Adam's first steps the update is ~ ``lr sign(g~)``, so at scale a coordinate whose rotated gradient is below
  the fp32 rounding of the rotation flips with summation order and moves the parameters by ``2 lr`` along one
  row of R: a correct kernel then differs from eager by ~1e-3 while both are within rounding of float64;
- the float64-anchored (Dao) rule: ``err(kernel, fp64) <= 2 err(eager fp32, fp64) + floor``, per element
  (max) for the moments, which live in the rotated layout and carry no such amplification, and on L2 norms for
  parameters, with the floor ``atol sqrt(numel)`` plus an allowance of ``2 lr sqrt(k)`` for the k sign ties of
  the first step (each flip moves the parameters by 2 lr along an orthonormal direction).

The Triton interpreter computes every ``tl.dot`` in plain fp32 whatever ``input_precision`` says, so on a CPU
``tf32x3`` is exercised only as fp32. ``tf32`` is not: the kernels round their dot operands to the nearest tf32
value themselves (Triton's tf32 dot would truncate them), so under the interpreter a ``tf32`` step is a TF32
step, and :class:`tf32_matmuls` gives the eager reference the same TF32 matmuls on a CPU that
``torch.backends.cuda.matmul.allow_tf32`` gives it on a GPU. A ``tf32`` kernel is judged against that eager
TF32 step, on a CPU and on a GPU alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.overrides import TorchFunctionMode

from .kernels.reference import round_to_tf32

__all__ = [
    "TOLERANCES",
    "tolerance",
    "assert_close_to_ref",
    "dense_adamw_oracle",
    "error_summary",
    "sign_ties",
    "tf32_matmuls",
]

# (what is compared) -> (rtol, atol). Keys name the comparison, not the test.
TOLERANCES: dict[str, tuple[float, float]] = {
    # rotation="none" against torch.optim.AdamW (same fp32 op order; rounding of addcdiv differs).
    "identity_vs_torch": (1e-6, 1e-7),
    # fp32 rotated optimizer against the dense fp64 oracle, 20 steps.
    "ref_vs_oracle": (1e-5, 1e-6),
    # rotate/unrotate round trip, fp32.
    "roundtrip_fp32": (1e-6, 1e-6),
    # rotated SGD-M against plain SGD-M (equivariance, fp32).
    "sgdm_equivariance": (1e-5, 1e-6),
    # fused kernels against the eager fp32 reference, fp32-accurate dot modes (ieee, tf32x3).
    "fused_fp32": (1e-5, 1e-6),
    # fused kernels with plain tf32 dots (10-bit mantissa products).
    "fused_tf32": (5e-2, 5e-3),
    # bf16 params computed in fp32 by two implementations and rounded once: at most one bf16 ulp (2^-7) apart.
    "bf16_one_ulp": (2.0**-7, 1e-6),
    # bf16 params: the Dao rule floor, err(kernel, fp64) <= 2 err(eager, fp64) + atol.
    "bf16_floor": (0.0, 1e-2),
    # fp32 floor for the Dao rule against a float64 reference.
    "fp32_floor": (0.0, 1e-6),
    # tf32 floor for the Dao rule (GPU only: a tf32 kernel against an eager reference with TF32 matmuls).
    "tf32_floor": (0.0, 1e-4),
}


def tolerance(name: str) -> tuple[float, float]:
    """(rtol, atol) for a named comparison."""
    return TOLERANCES[name]


def error_summary(actual: torch.Tensor, expected: torch.Tensor) -> str:
    a, e = actual.detach().double().reshape(-1).cpu(), expected.detach().double().reshape(-1).cpu()
    diff = (a - e).abs()
    worst = int(diff.argmax()) if diff.numel() else 0
    rel_rms = (diff.square().mean().sqrt() / e.square().mean().sqrt().clamp_min(1e-300)).item() if e.numel() else 0.0
    return (
        f"max|diff|={diff.max().item() if diff.numel() else 0.0:.3e} at flat index {worst} "
        f"(got {a[worst].item() if a.numel() else 0:.9g}, want {e[worst].item() if e.numel() else 0:.9g}), "
        f"relative RMS error={rel_rms:.3e}"
    )


def assert_close_to_ref(
    actual: torch.Tensor,
    expected: torch.Tensor,
    name: str,
    *,
    eager: torch.Tensor | None = None,
    norm: bool = False,
    allowance: float = 0.0,
    what: str = "",
) -> None:
    """Assert ``actual`` matches ``expected`` under the named tolerance.

    With ``eager`` given, applies the Dao rule instead: ``expected`` is a float64 reference and
    ``max|actual - expected| <= 2 max|eager - expected| + atol``; with ``norm=True`` on L2 norms,
    ``||actual - expected|| <= 2 ||eager - expected|| + atol sqrt(numel) + allowance`` (see the module docstring).
    """
    rtol, atol = tolerance(name)
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if eager is not None:
        ref = expected.double()
        if norm:
            err = (actual.double() - ref).norm().item()
            eager_err = (eager.double() - ref).norm().item()
            floor = atol * ref.numel() ** 0.5 + allowance
        else:
            err = (actual.double() - ref).abs().max().item() if ref.numel() else 0.0
            eager_err = (eager.double() - ref).abs().max().item() if ref.numel() else 0.0
            floor = atol + allowance
        if not err <= 2 * eager_err + floor:
            kind = "L2" if norm else "max"
            raise AssertionError(
                f"{what}: kernel {kind} error {err:.3e} > 2 x eager error {eager_err:.3e} + {floor:.3g}; "
                + error_summary(actual, expected)
            )
        return
    try:
        torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)
    except AssertionError as exc:
        raise AssertionError(
            f"{what} [{name}: rtol={rtol:g}, atol={atol:g}]: {error_summary(actual, expected)}"
        ) from exc


def sign_ties(units: Sequence, grads: Sequence[torch.Tensor | None], factor: float = 4.0) -> int:
    """Rotated gradient coordinates whose sign fp32 arithmetic cannot decide.

    Per rotated unit, the coordinates with ``|g~_64| <= factor * max|g~_32 - g~_64|``, where g~_32 is the eager
    fp32 rotation of the (fp32) gradient and g~_64 the float64 one. ``grads``: per param, aligned with the units'
    param indices (None: no gradient).
    """
    flats32 = [None if g is None else g.detach().reshape(-1).float() for g in grads]
    flats64 = [None if g is None else g.double() for g in flats32]
    count = 0
    for unit in units:
        rot = unit.rotation
        if rot is None or any(flats32[i] is None for i in unit.params):
            continue
        if hasattr(rot, "bind"):  # svd units: their bases come from the step itself
            continue
        y32 = rot.rotate(unit.view(flats32)).double()
        y64 = rot.rotate(unit.view(flats64))
        scale = (y32 - y64).abs().max()
        count += int((y64.abs() <= factor * scale).sum())
    return count


def dense_adamw_oracle(
    rotation: torch.Tensor,
    params0: torch.Tensor,
    grads: Sequence[torch.Tensor],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    decay: torch.Tensor | None = None,
    amsgrad: bool = False,
    maximize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AdamW in the basis ``D = rotation`` by dense float64 matmuls: the textbook Alg 4.

    Args:
        rotation: (d, d) orthogonal D (from ``optimizer.rotation_matrix()``).
        params0: (d,) initial flat parameters.
        grads: per step, a (d,) flat gradient (in the standard basis).
        decay: (d,) 0/1 mask of decayed coordinates, or None for all.
    Returns:
        (params, exp_avg, exp_avg_sq): flat (d,) float64, moments in the rotated layout.
    """
    dt = torch.float64
    d_mat = rotation.to(dt)
    theta = params0.to(dt).clone()
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    vmax = torch.zeros_like(theta)
    b1, b2 = betas
    wd = weight_decay * (decay.to(dt) if decay is not None else 1.0)
    for t, g in enumerate(grads, start=1):
        g = g.to(dt)
        if maximize:
            g = -g
        gt = d_mat @ g
        m = b1 * m + (1 - b1) * gt
        v = b2 * v + (1 - b2) * gt * gt
        vmax = torch.maximum(vmax, v)
        vv = vmax if amsgrad else v
        u = (m / (1 - b1**t)) / (vv.sqrt() / (1 - b2**t) ** 0.5 + eps)
        theta = theta * (1 - lr * wd) - lr * (d_mat.T @ u)
    return theta, m, v


_MATMULS = {
    torch.matmul, torch.mm, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
    torch.Tensor.mm, torch.Tensor.bmm, torch.nn.functional.linear,
}  # fmt: skip


class tf32_matmuls(TorchFunctionMode):
    """Within it, fp32 matmuls are TF32 matmuls on any device: both operands rounded to the nearest tf32 value
    (:func:`rotkern.kernels.reference.round_to_tf32`, as cuBLAS does under ``allow_tf32``), then multiplied in
    fp32, where products of tf32 values are exact. The eager reference of a ``precision="tf32"`` kernel on a CPU;
    other dtypes and ops pass through unchanged.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _MATMULS:
            args = tuple(
                round_to_tf32(a) if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a for a in args
            )
        return func(*args, **(kwargs or {}))

"""Triton helpers the fused kernels share (the block step :mod:`rotkern.kernels.rotated_adamw_step` and the
two-sided step :mod:`rotkern.kernels.two_sided_adamw`): Adam's moment update and direction in torch's rounding,
dtype rounding, and the host side of a launch.

    m  = lerp(m, g, 1 - b1)          (torch.lerp's two-sided formula)
    v  = b2 v + (1 - b2) g^2
    u  = m / (sqrt(v) / sqrt(1 - b2^t) + eps)     (IEEE-rounded sqrt and division)
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["TL_DTYPES", "adam_direction", "adam_moments", "device_guard", "launch_kernel", "round_tf32", "round_to"]

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}


@triton.jit
def adam_moments(g, m, v, w1, b2, omb2):
    # torch.lerp's two-sided formula, so exp_avg rounds as torch.optim.AdamW's does.
    d = g - m
    m = tl.where(w1 < 0.5, m + w1 * d, g - d * (1.0 - w1))
    v = v * b2 + omb2 * g * g
    return m, v


@triton.jit
def adam_direction(m, vv, bc2_sqrt, eps):
    # IEEE-rounded sqrt and division, as torch (Triton's defaults are approximate on NVIDIA).
    denom = tl.math.div_rn(tl.math.sqrt_rn(vv), tl.zeros_like(vv) + bc2_sqrt) + eps
    return tl.math.div_rn(m, denom)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE rounding to nearest even (for bf16 by hand: the interpreter's cast truncates)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)  # NaN must not carry into the sign
    return x.to(DTYPE)


@triton.jit
def round_tf32(x):
    """fp32 -> the nearest tf32 (10-bit mantissa; ties away from zero, as cvt.rna.tf32.f32), still in fp32.

    Triton's ``tf32`` dot hands its fp32 operands to the tensor cores as they are, which read the top 19 bits:
    truncation toward zero, a bias of about -2^-11 per operand (-1e-3 relative on every rotated coordinate, the
    update shrunk as much again), where cuBLAS's TF32 (``allow_tf32``) rounds to nearest. Rounding the operands
    here first makes the hardware's truncation exact and the dot unbiased. Under the interpreter, whose dots are
    fp32, the rounded operands emulate a TF32 dot (products of 11-bit mantissas are exact in fp32).
    """
    bits = x.to(tl.uint32, bitcast=True)
    rounded = ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)  # a NaN's payload must not carry into the sign


def launch_kernel(kernel, grid, *args, **kwargs) -> None:
    """Every kernel launch of a step goes through here (tests count and check them)."""
    kernel[grid](*args, **kwargs)


def device_guard(device: torch.device):
    """Make the params' device current for the launches: Triton launches on the current device's current
    stream, while the tables, workspace and step increments live on the params' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()

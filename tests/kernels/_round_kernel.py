"""A one-program Triton kernel applying the kernels' tf32 rounding (``round_tf32``) to a vector: for its test."""

import triton
import triton.language as tl

from rotkern.kernels._tl import round_tf32


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(y_ptr + i, round_tf32(tl.load(x_ptr + i, mask=i < n)), mask=i < n)

"""Seeded rotations: Haar-orthogonal blocks, permutations and block-diagonal rotations.

The paper's rotation of a length-L vector is ``x -> B(pi x)``: a random permutation ``pi`` followed
by a block-diagonal matrix ``B = diag(R_n, ..., R_n, R_p)`` that repeats one n x n Haar-orthogonal block
``b = L // n`` times and closes with a residual ``p x p`` block, ``p = L - b n`` (paper App. A.1-A.3).
Memory is O(n^2 + L) and the product is a batched matmul; no L x L matrix is ever formed.

``structure="hadamard"`` replaces the Haar blocks by randomized Walsh-Hadamard blocks, ``H_m D_m / sqrt(m)``
(Sylvester's H, random signs D): block size and every block a power of two, the residual split into
power-of-two blocks by its binary digits (a padded-and-truncated transform would not be orthogonal). The eager
path applies them by the fast transform in O(L log n) time and O(n) memory; the fused kernels take them as
the same dense blocks.

Determinism: every random number comes from a counter-based hash (SplitMix64) of ``(seed, tag...)``,
evaluated with numpy integer arithmetic, so the same seed gives the same bits on any machine, torch
version or device. Haar blocks are computed in float64 on the CPU and cast afterwards; permutations
are a stable argsort of hashed keys, so ties (if any) break the same way everywhere.
"""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import torch

__all__ = [
    "MAX_BLOCK_SIZE",
    "Stream",
    "haar_orthogonal",
    "random_permutation",
    "BlockRotation",
    "STRUCTURES",
    "fwht",
    "hadamard_block",
]

STRUCTURES = ("haar", "hadamard")

# The fused kernels tile the rotation block in shared memory / registers; past 4096 a block no longer
# fits a K-tiled loop sensibly, so every backend enforces the same limit.
MAX_BLOCK_SIZE = 4096

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x.copy()
        z ^= z >> np.uint64(30)
        z *= _M1
        z ^= z >> np.uint64(27)
        z *= _M2
        z ^= z >> np.uint64(31)
    return z


class Stream:
    """A reproducible stream of random numbers identified by ``(seed, *tags)``.

    Two streams with the same seed and tags produce identical numbers on every platform.
    """

    def __init__(self, seed: int, *tags: object) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = int(seed)
        self.tags = tags
        digest = hashlib.blake2b(repr((self.seed,) + tuple(tags)).encode(), digest_size=8).digest()
        self._key = np.uint64(int.from_bytes(digest, "little"))
        self._counter = 0

    def uint64(self, count: int) -> np.ndarray:
        """Next ``count`` 64-bit words of the stream."""
        idx = np.arange(self._counter + 1, self._counter + count + 1, dtype=np.uint64)
        self._counter += count
        with np.errstate(over="ignore"):
            return _mix64(self._key + idx * _GAMMA)

    def uniform(self, count: int) -> np.ndarray:
        """Uniform float64 samples in the open interval (0, 1)."""
        bits = self.uint64(count) >> np.uint64(11)
        return (bits.astype(np.float64) + 0.5) * (1.0 / 9007199254740992.0)

    def normal(self, count: int) -> np.ndarray:
        """Standard normal float64 samples (Box-Muller)."""
        half = (count + 1) // 2
        u1, u2 = self.uniform(half), self.uniform(half)
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2.0 * math.pi * u2), r * np.sin(2.0 * math.pi * u2)])
        return z[:count]


def _as_stream(generator: Stream | int, *tags: object) -> Stream:
    return generator if isinstance(generator, Stream) else Stream(generator, *tags)


def haar_orthogonal(n: int, generator: Stream | int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sample an n x n orthogonal matrix from the Haar measure on O(n).

    QR of a Gaussian matrix with the sign correction ``Q diag(sign(diag R))`` (Mezzadri 2007); without
    it Q is not Haar. Reflections (det = -1) are kept, as in the paper (Adam is reflection-equivariant).
    Computed in float64 on the CPU; returned contiguous (row-major) in ``dtype`` on the CPU.

    Args:
        n: block size, >= 1.
        generator: a :class:`Stream`, or an int seed (then the stream is ``Stream(seed, "haar", n)``).
    Returns:
        R: (n, n) with R @ R.T = I.
    """
    if n < 1:
        raise ValueError(f"haar_orthogonal: n must be >= 1, got {n}")
    stream = _as_stream(generator, "haar", n)
    g = torch.from_numpy(stream.normal(n * n).reshape(n, n))
    q, r = torch.linalg.qr(g)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1.0
    # linalg.qr hands back a column-major Q; kernels index R row-major, so normalise strides here.
    return (q * d.unsqueeze(0)).to(dtype).contiguous()


def random_permutation(
    length: int, generator: Stream | int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """A uniformly random permutation of ``range(length)`` as int64.

    A stable sort of hashed 62-bit keys: the result is identical on every device, so large permutations
    can be built directly on the GPU.
    """
    stream = _as_stream(generator, "perm", length)
    keys = torch.from_numpy((stream.uint64(length) >> np.uint64(2)).view(np.int64))
    if device is not None:
        keys = keys.to(device)
    return torch.sort(keys, stable=True).indices


# R_n and R_p by (structure, sizes, seed, dtype, device): looked up in a plain dict, which torch.compile traces
# (the matrix becomes a constant of the graph); built outside the graph (tracing would re-run the QR every step).
_BLOCKS: dict[tuple, torch.Tensor] = {}


def _block_matrix(structure: str, parts: tuple[int, ...], seed: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    hit = _BLOCKS.get((structure, parts, seed, dtype, device))
    return hit if hit is not None else _build_block_matrix(structure, parts, seed, dtype, device)


@torch.compiler.disable
def _build_block_matrix(structure: str, parts: tuple[int, ...], seed: int, dtype: torch.dtype, device: str):
    if len(_BLOCKS) >= 256:
        _BLOCKS.clear()
    if structure == "hadamard":
        block = _hadamard_cached(parts, seed, dtype, device)
    else:
        block = _haar_cached(parts[0], seed, dtype, device)
    _BLOCKS[(structure, parts, seed, dtype, device)] = block
    return block


@torch.compiler.disable  # built once and cached; tracing it would re-run the QR in every compiled step
@functools.lru_cache(maxsize=128)
def _haar_cached(n: int, seed: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    # One R_n per (seed, n) is shared by every block and every layer of a run (paper App. A.1-A.3), and one
    # copy per device serves every BlockRotation that uses it.
    if device != "cpu" or dtype != torch.float64:
        return _haar_cached(n, seed, torch.float64).to(device=device, dtype=dtype)
    return haar_orthogonal(n, Stream(seed, "haar", n), dtype=torch.float64)


def fwht(x: torch.Tensor, radix: int = 16) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform along the last dim (a power of two m): ``x H_m`` (H symmetric,
    Sylvester order, entries +-1). x: (..., m) -> (..., m).

    ``H_m`` is the Kronecker product of small Sylvester blocks (``H_ab = H_a (x) H_b``), so the transform is
    ceil(log_radix m) passes, each one batched (radix x radix) matmul over a strided view: O(m log m) work, done
    by the BLAS instead of one elementwise butterfly pass per factor of two.
    """
    m = x.shape[-1]
    if m & (m - 1):
        raise ValueError(f"fwht: length {m} is not a power of two")
    lead = x.shape[:-1]
    y = x.reshape(-1, m)
    h = 1
    while h < m:
        r = min(radix, m // h)
        hr = _sylvester(r, y.dtype, y.device)
        if h == 1:  # adjacent entries: one plain GEMM (H_r is symmetric)
            y = (y.reshape(-1, r) @ hr).view(-1, m)
        else:  # axis 2 of (rows, m / (r h), r, h) holds the r entries this pass combines, h apart
            y = torch.matmul(hr, y.view(-1, m // (r * h), r, h))
        h *= r
    return y.reshape(*lead, m)


@functools.lru_cache(maxsize=64)
def _sylvester(r: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < r:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h.to(dtype=dtype, device=device)


def _hadamard_signs(m: int, seed: int) -> torch.Tensor:
    """D_m's diagonal, +-1 float64 (CPU): one per (seed, m), like the Haar blocks."""
    bits = Stream(seed, "hadamard", m).uint64(m) >> np.uint64(63)
    return torch.from_numpy(1.0 - 2.0 * bits.astype(np.float64))


@functools.lru_cache(maxsize=64)
def _hadamard_scale(m: int, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return (_hadamard_signs(m, seed) / math.sqrt(m)).to(dtype=dtype, device=device)


def hadamard_block(m: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense (m, m) block ``H_m D_m / sqrt(m)`` (m a power of two): orthogonal, entries +-1/sqrt(m)."""
    # fwht(I) = H; scaling its columns by the signs gives H D.
    return (fwht(torch.eye(m, dtype=torch.float64)) * _hadamard_signs(m, seed)).div_(math.sqrt(m)).to(dtype)


def _pow2_parts(p: int) -> list[int]:
    """p as a sum of distinct powers of two, largest first (its binary digits)."""
    return [1 << k for k in range(p.bit_length() - 1, -1, -1) if p >> k & 1]


class BlockRotation:
    """The orthogonal map ``x -> B(pi x)`` on vectors of length ``length``.

    ``B = diag(R_n x b, R_p)`` with ``b = length // n`` copies of one Haar block ``R_n`` and a residual
    Haar block ``R_p`` of size ``p = length - b n`` (absent when p = 0). Blocks of equal size drawn with
    the same seed are the same matrix, so every vector rotated with one seed shares one ``R_n``.

    Args:
        length: L, the vector length.
        block_size: n, 1 <= n <= MAX_BLOCK_SIZE. Vectors shorter than n get a single L x L block.
        seed: int seed of the rotation blocks.
        perm_stream: tags that identify this vector family's permutation, or None for no permutation.
        structure: ``haar`` (default) or ``hadamard`` (block_size a power of two; see the module docstring:
            R_n is ``H_n D_n / sqrt(n)``, R_p the block-diagonal of p's power-of-two parts).
    """

    def __init__(
        self, length: int, block_size: int, seed: int, perm_stream: tuple | None = None, structure: str = "haar"
    ) -> None:
        if length < 1:
            raise ValueError(f"BlockRotation: length must be >= 1, got {length}")
        check_block_size(block_size)
        check_structure(structure, block_size)
        self.structure = structure
        self.length = int(length)
        self.block_size = int(block_size)
        self.seed = int(seed)
        self.num_blocks = self.length // self.block_size
        self.residual = self.length - self.num_blocks * self.block_size
        self.perm_stream = perm_stream
        self._cache: dict = {}

    # -- components ---------------------------------------------------------------------------------
    def block(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """R_n, (n, n), or None when the vector is shorter than one block."""
        if self.num_blocks == 0:
            return None
        return _block_matrix(self.structure, (self.block_size,), self.seed, dtype, str(torch.device(device)))

    def residual_block(
        self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> torch.Tensor | None:
        """R_p, (p, p), or None when p = 0."""
        if self.residual == 0:
            return None
        parts = tuple(_pow2_parts(self.residual)) if self.structure == "hadamard" else (self.residual,)
        return _block_matrix(self.structure, parts, self.seed, dtype, str(torch.device(device)))

    def permutation(self, device: torch.device | str = "cpu", *, cache: bool = True) -> torch.Tensor | None:
        """pi as int64 (L,) with ``(pi x)[i] = x[pi[i]]``, or None for no permutation.

        ``cache=False`` builds a fresh tensor and keeps no copy (for callers that store pi their own way,
        e.g. the fused kernels' int32 tables; a d-long int64 copy would cost 8 bytes per parameter).
        """
        if self.perm_stream is None:
            return None
        key = ("perm", str(device))

        def build() -> torch.Tensor:
            stream = Stream(self.seed, "perm", self.length, *self.perm_stream)
            return random_permutation(self.length, stream, device=device)

        if not cache and key not in self._cache:
            return build()
        return self._get(key, build)

    def inverse_permutation(self, device: torch.device | str = "cpu") -> torch.Tensor | None:
        perm = self.permutation(device)
        if perm is None:
            return None

        def build() -> torch.Tensor:
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(self.length, device=perm.device)
            return inv

        return self._get(("iperm", str(device)), build)

    def _get(self, key, make):
        # A plain dict lookup, which torch.compile traces (the tensor becomes a guarded constant of the graph); only
        # the construction (numpy streams, sorting: host work) is hidden from it.
        hit = self._cache.get(key)
        return hit if hit is not None else self._build(key, make)

    @torch.compiler.disable
    def _build(self, key, make):
        self._cache[key] = make()
        return self._cache[key]

    def spec(self) -> dict:
        spec = {"length": self.length, "block_size": self.block_size, "seed": self.seed, "perm": self.perm_stream}
        return spec if self.structure == "haar" else {**spec, "structure": self.structure}

    # -- action on row vectors ----------------------------------------------------------------------
    def rotate(self, x: torch.Tensor, *, squared: bool = False) -> torch.Tensor:
        """y = B(pi x) for every row. x: (..., L) -> (..., L).

        ``squared=True`` applies the element-wise square of the matrix instead, ``(B o B)(pi x)``: the map that
        carries second moments (non-negative stays non-negative; exact for a diagonal covariance) into the
        rotated basis. It is not orthogonal and not inverted by ``unrotate(squared=True)``.
        """
        return self._apply(x, forward=True, squared=squared)

    def unrotate(self, y: torch.Tensor, *, squared: bool = False) -> torch.Tensor:
        """x = pi^-1(B^T y) for every row; the inverse of :meth:`rotate`. y: (..., L) -> (..., L).

        ``squared=True``: ``pi^-1((B o B)^T y)``, second moments back to the standard basis.
        """
        return self._apply(y, forward=False, squared=squared)

    def _apply(self, x: torch.Tensor, forward: bool, squared: bool = False) -> torch.Tensor:
        if x.shape[-1] != self.length:
            raise ValueError(f"BlockRotation of length {self.length} applied to a tensor of shape {tuple(x.shape)}")
        dev, dt = x.device, x.dtype
        lead = x.shape[:-1]
        x = x.reshape(-1, self.length)
        if forward and self.perm_stream is not None:
            x = x[:, self.permutation(dev)]
        full = self.num_blocks * self.block_size
        if self.structure == "hadamard" and not squared:
            out = self._hadamard(x, forward)
            if not forward and self.perm_stream is not None:
                out = out[:, self.inverse_permutation(dev)]
            return out.reshape(*lead, self.length)
        out = torch.empty_like(x)
        r_n, r_p = self.block(dt, dev), self.residual_block(dt, dev)
        if squared:
            r_n, r_p = (None if r is None else r.square() for r in (r_n, r_p))
        # Row-vector form: y = x R^T rotates, x = y R un-rotates.
        if r_n is not None:
            xb = x[:, :full].reshape(-1, self.block_size)
            out[:, :full] = (xb @ (r_n.T if forward else r_n)).reshape(x.shape[0], full)
        if r_p is not None:
            out[:, full:] = x[:, full:] @ (r_p.T if forward else r_p)
        if not forward and self.perm_stream is not None:
            out = out[:, self.inverse_permutation(dev)]
        return out.reshape(*lead, self.length)

    def _hadamard(self, x: torch.Tensor, forward: bool) -> torch.Tensor:
        """Rows of x (already permuted when forward) through the Hadamard blocks by the fast transform.

        Per block of size m: forward ``y = x (H D / sqrt(m))^T = fwht(x D) / sqrt(m)``, backward
        ``x = y (H D / sqrt(m)) = fwht(y) D / sqrt(m)`` (H symmetric)."""
        out = torch.empty_like(x)
        start = 0
        sizes = [self.block_size] * min(self.num_blocks, 1) + _pow2_parts(self.residual)
        for k, m in enumerate(sizes):
            stop = start + (self.num_blocks * m if k == 0 and self.num_blocks else m)
            seg = x[:, start:stop].reshape(-1, m)
            scale = _hadamard_scale(m, self.seed, x.dtype, x.device)  # D / sqrt(m), one pass with the signs
            y = fwht(seg * scale) if forward else fwht(seg).mul_(scale)
            out[:, start:stop] = y.reshape(x.shape[0], stop - start)
            start = stop
        return out

    def dense(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The L x L matrix ``B P`` (testing oracle; only for small L). Built from the components."""
        if self.length > 8192:
            raise ValueError(f"dense(): refusing to materialise a {self.length} x {self.length} matrix")
        blocks = [self.block(dtype)] * self.num_blocks
        if self.residual:
            blocks.append(self.residual_block(dtype))
        b = torch.block_diag(*blocks)
        perm = self.permutation()
        if perm is None:
            return b
        p = torch.zeros(self.length, self.length, dtype=dtype)
        p[torch.arange(self.length), perm] = 1.0
        return b @ p


@torch.compiler.disable
@functools.lru_cache(maxsize=128)
def _hadamard_cached(parts: tuple[int, ...], seed: int, dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """block_diag of hadamard_block(m) over ``parts``: R_n (one part) or a residual block (its binary parts)."""
    if device != "cpu" or dtype != torch.float64:
        return _hadamard_cached(parts, seed, torch.float64).to(device=device, dtype=dtype)
    return torch.block_diag(*[hadamard_block(m, seed) for m in parts]).contiguous()


def check_structure(structure: object, block_size: int, name: str = "structure") -> str:
    """Validate a block structure (``haar`` or ``hadamard``, the latter with a power-of-two block size)."""
    if structure not in STRUCTURES:
        raise ValueError(f"{name}={structure!r} is not one of {STRUCTURES}")
    if structure == "hadamard" and block_size & (block_size - 1):
        lo = 1 << (block_size.bit_length() - 1)
        raise ValueError(
            f"{name}='hadamard' needs a power-of-two block_size (Walsh-Hadamard blocks), got {block_size}; "
            f"use block_size={lo} or {2 * lo}"
        )
    return structure


def check_block_size(block_size: object, name: str = "block_size") -> int:
    """Validate a rotation block size; returns it as int."""
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {block_size!r}")
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(
            f"{name}={block_size} is out of range: it must be between 1 and {MAX_BLOCK_SIZE} "
            f"(the paper uses 768; larger blocks change little, paper App. A.1-A.3)"
        )
    return int(block_size)

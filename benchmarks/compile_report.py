"""Ahead-of-time compile report of the Triton step's kernels for CUDA targets, on a machine without a GPU.

What it measures, per kernel variant: registers per thread, spill stores / loads and stack frame (ptxas ``-v``,
from the very ptxas run that Triton makes for the cubin), shared memory per CTA (Triton's dynamic allocation
plus ptxas' static ``smem``), and occupancy: resident CTAs per SM from registers, shared memory and warps
(:func:`ctas_per_sm`). Nothing runs; the numbers are the compiler's.

Which variants: exactly those the launcher launches. :func:`launched_kernels` calls
:func:`rotkern.kernels.rotated_adamw_step.rotated_adamw_step` itself, on ``meta`` tensors, with its two
kernels swapped for recorders, so the constexprs, ``num_warps`` / ``num_stages`` and the arguments (hence
Triton's specialisation of pointers and integers) are whatever the launcher and its plan
(:mod:`rotkern.kernels._rotated_adamw_plan`) produce today. The param groups are the real models of
:mod:`rotkern.trainers.models` (GPT-2 124M, ViT-S/16, ResNet-50), built on the meta device and annotated by
:func:`rotkern.scopes.param_groups_for`; the launcher's defaults (no amsgrad, no maximize, one pass).

How: Triton's own binder (``create_function_from_signature``) and ``JITFunction._pack_args`` turn the recorded
call into ``(signature, constexprs, attrs, options)`` for a :class:`triton.backends.compiler.GPUTarget`, as
``JITFunction.run`` would on that GPU; ``triton.compile(ASTSource(...), target=...)`` then compiles it (PTX
through the wheel's ptxas) with ``always_compile`` and ``dump_ptxas_log`` set, and the log is parsed. Works on
Triton 3.6 and 3.9 (same internal API). Variants are deduplicated on that compile key and compiled in
parallel processes (one per core): 100 for the three models on sm_90 and sm_80, about 2 minutes on 2 cores.

What fails (:meth:`Report.problems`): a compile error, shared memory above the target's per-CTA limit, and a
spill, except where :meth:`Report.spill_note` says why it is tolerated (a negligible share of the step, or on
a non-strict target an occupancy spill, which is reported).

Run ``python benchmarks/compile_report.py [--targets sm_90,sm_80]`` for the table; the test is
``tests/kernels/test_kernel_compile.py``. triton is imported inside functions only: importing this module does
not need it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import torch

from rotkern._backend import PRECISIONS, interpret_mode
from rotkern.scopes import SCOPES, build_units, param_groups_for

KERNEL_MODULE = "rotkern.kernels.rotated_adamw_step"
KERNELS = ("_rotated_adamw_kernel", "_adamw_kernel")
TWO_SIDED_MODULE = "rotkern.kernels.two_sided_adamw"
# Where each kernel a LaunchedKernel names is defined.
_MODULES = {**{k: KERNEL_MODULE for k in KERNELS}, "_two_sided_kernel": TWO_SIDED_MODULE}


def _kernel_fn(name: str):
    return getattr(importlib.import_module(_MODULES[name]), name)


MODELS = ("gpt2-124m", "vit-s16", "resnet50")
P_DTYPES = (torch.float32, torch.bfloat16)
BLOCK_SIZE = 768  # the optimizer's default n


MAX_REGISTERS = 255  # per thread, on every target here
# A spilling variant that runs at most this share of the programs its step launches of that kernel (in every
# configuration that launches it) is tolerated: it cannot cost the step more than about that share, however
# slow the spill makes it. ResNet-50's conv1 (64 rows of 147, the only unaligned rows of the output scope: a
# launch of one program, 0.14 % of that step's 731 rotated programs) is the case.
NEGLIGIBLE_SHARE = 0.01


@dataclass(frozen=True)
class Target:
    """A CUDA target and the per-SM limits that decide occupancy (CUDA C Programming Guide, compute
    capabilities table; the same figures as NVIDIA's occupancy calculator).

    ``strict``: every spill fails (but negligible ones, :data:`NEGLIGIBLE_SHARE`). Otherwise an *occupancy*
    spill (ptxas lowered the registers below the maximum to fit more CTAs per SM, and spilled to get there) is
    reported but does not fail; a spill at the register maximum still does.
    """

    name: str
    capability: int
    max_shared_per_cta: int  # opt-in maximum of dynamic + static shared memory per CTA, bytes
    shared_per_sm: int  # bytes
    regs_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_ctas_per_sm: int = 32
    reserved_shared_per_cta: int = 1024  # the driver's per-CTA reservation (sm_80 and later)
    reg_alloc_unit: int = 256  # registers are allocated per warp in units of 256
    sub_partitions: int = 4  # each SM sub-partition has a quarter of the register file
    strict: bool = True


TARGETS = {
    "sm_90": Target("sm_90", 90, max_shared_per_cta=232448, shared_per_sm=233472),  # H100 / H200
    # Compiled for coverage; the project's GPU is an H200. ptxas' occupancy trades here are reported until timed.
    "sm_80": Target("sm_80", 80, max_shared_per_cta=166912, shared_per_sm=167936, strict=False),  # A100
}


def ctas_per_sm(registers: int, shared: int, num_warps: int, target: Target) -> int:
    """Resident CTAs per SM of a kernel with ``registers`` per thread, ``shared`` bytes per CTA, ``num_warps``.

    Registers as in NVIDIA's ``cuda_occupancy.h``: a warp takes ``ceil(32 * registers / 256) * 256`` registers
    of one sub-partition (a quarter of the file), so an SM holds ``4 * floor(16384 / that)`` warps. Shared memory
    adds the driver's 1 KB per CTA. 0: the CTA cannot be resident.
    """
    per_warp = math.ceil(32 * registers / target.reg_alloc_unit) * target.reg_alloc_unit
    if per_warp * num_warps > target.regs_per_sm:
        return 0
    warps_per_part = (target.regs_per_sm // target.sub_partitions) // per_warp if per_warp else target.max_warps_per_sm
    by_regs = warps_per_part * target.sub_partitions // num_warps
    by_warps = target.max_warps_per_sm // num_warps
    need = shared + target.reserved_shared_per_cta
    by_shared = target.shared_per_sm // need if shared <= target.max_shared_per_cta else 0
    return max(0, min(by_regs, by_warps, by_shared, target.max_ctas_per_sm))


# %% which variants the launcher launches ------------------------------------------------------------------
def model_group(name: str) -> tuple[list[torch.Size], list[str], list[bool]]:
    """(shapes, roles, decay mask) of a preset of :mod:`rotkern.trainers.models`, built on the meta device."""
    from rotkern.trainers.models import build_model, model_config

    with torch.device("meta"):
        model = build_model(model_config(name))
    group = param_groups_for(model, weight_decay=0.1)[0]
    return [p.shape for p in group["params"]], group["roles"], group["decay_mask"]


@dataclass
class LaunchedKernel:
    """One kernel launch as the launcher made it: the kernel's name, its grid size and its arguments."""

    kernel: str
    programs: int
    args: tuple
    kwargs: dict


class _Recorder:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kwargs)`` appends the call instead of running it."""

    def __init__(self, name: str, calls: list[LaunchedKernel]) -> None:
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            self.calls.append(LaunchedKernel(self.name, math.prod(grid), args, kwargs))

        return launch


@contextlib.contextmanager
def _recording(calls: list[LaunchedKernel]):
    module = importlib.import_module(KERNEL_MODULE)
    saved = {name: getattr(module, name) for name in (*KERNELS, "why_not_triton")}
    try:
        for name in KERNELS:
            setattr(module, name, _Recorder(name, calls))
        # meta tensors stand in for CUDA ones: shapes, dtypes and layouts without memory
        module.why_not_triton = lambda t: None if t.device.type == "meta" else saved["why_not_triton"](t)
        yield module
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def launched_kernels(
    shapes: Sequence[torch.Size],
    roles: Sequence[str],
    decay_mask: Sequence[bool],
    scope: str,
    p_dtypes: Sequence[torch.dtype] = P_DTYPES,
    precisions: Sequence[str] = PRECISIONS,
    block_size: int = BLOCK_SIZE,
    scaled: bool = False,
) -> dict[tuple[torch.dtype, str], list[LaunchedKernel]]:
    """Per (param dtype, precision), the kernel launches of one step at the launcher's defaults, on meta tensors.

    Grads have the params' dtype, moments are fp32, lr is a float: what :class:`FusedRotatedAdamW` passes.
    ``scaled``: as under a GradScaler with tensor lr and betas instead (``grad_scale``, ``found_inf``; the UNSCALE
    variants).
    """
    if interpret_mode():
        raise RuntimeError("the compile report needs TRITON_INTERPRET unset (the interpreter has other tiles)")
    from rotkern.kernels._rotated_adamw_plan import PlanCache

    meta = torch.device("meta")
    units = build_units(shapes, scope, block_size=block_size, roles=roles)
    for u in units:
        # Cached on the rotation, which build_plan then reuses for every dtype: GPT-2's global permutation is
        # 124M elements, hashed on the host each time it is built (values are irrelevant here, on meta).
        if u.rotation is not None and hasattr(u.rotation, "permutation"):
            u.rotation.permutation(meta)
    out: dict[tuple[torch.dtype, str], list[LaunchedKernel]] = {}
    for p_dtype in p_dtypes:
        params = [torch.empty(s, dtype=p_dtype, device=meta) for s in shapes]
        grads = [torch.empty_like(p) for p in params]
        exp_avgs = [torch.empty(s, device=meta) for s in shapes]
        exp_avg_sqs = [torch.empty(s, device=meta) for s in shapes]
        steps = [torch.zeros((), device=meta) for _ in shapes]
        cache = PlanCache(maxsize=1)  # one plan per dtype, shared by the precisions
        for precision in precisions:
            calls: list[LaunchedKernel] = []
            with _recording(calls) as module:
                module.rotated_adamw_step(
                    params,
                    grads,
                    exp_avgs,
                    exp_avg_sqs,
                    None,
                    steps,
                    units,
                    lr=torch.empty((), device=meta) if scaled else 6e-4,
                    beta1=torch.empty((), device=meta) if scaled else 0.9,
                    beta2=torch.empty((), device=meta) if scaled else 0.95,
                    eps=1e-8,
                    weight_decay=0.1,
                    decay_mask=decay_mask,
                    precision=precision,
                    plan_cache=cache,
                    **(dict(grad_scale=torch.empty((), device=meta), found_inf=torch.empty((), device=meta))
                       if scaled else {}),
                )  # fmt: skip
            out[(p_dtype, precision)] = calls
    return out


def two_sided_launches(
    shapes: Sequence[tuple[int, int]] = ((768, 768), (3072, 768), (768, 3072)),
    p_dtypes: Sequence[torch.dtype] = P_DTYPES,
    precisions: Sequence[str] = PRECISIONS,
) -> list[LaunchedKernel]:
    """The launches of :func:`rotkern.kernels.two_sided_adamw.two_sided_adamw_step` for (k, w) matrices with dense
    bases on both sides (the eigen scope's GPT-2 weights), on meta tensors."""
    if interpret_mode():
        raise RuntimeError("the compile report needs TRITON_INTERPRET unset (the interpreter has other tiles)")
    module = importlib.import_module(TWO_SIDED_MODULE)
    saved = {name: getattr(module, name) for name in ("_two_sided_kernel", "why_not_triton")}
    calls: list[LaunchedKernel] = []
    meta = torch.device("meta")
    try:
        module._two_sided_kernel = _Recorder("_two_sided_kernel", calls)
        module.why_not_triton = lambda t: None if t.device.type == "meta" else saved["why_not_triton"](t)
        for k, w in shapes:
            for p_dtype in p_dtypes:
                for precision in precisions:
                    p = torch.empty(k, w, dtype=p_dtype, device=meta)
                    m, v = torch.empty(k, w, device=meta), torch.empty(k, w, device=meta)
                    left, right = torch.empty(k, k, device=meta), torch.empty(w, w, device=meta)
                    module.two_sided_adamw_step(p, torch.empty_like(p), m, v, None, left, right, lr=6e-4, beta1=0.9,
                                                beta2=0.95, eps=1e-8, weight_decay=0.1, step=3.0,
                                                precision=precision)  # fmt: skip
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
    return calls


@dataclass
class Variant:
    """One distinct compiled kernel for a target, and the configurations that launch it."""

    kernel: str
    signature: dict
    constexprs: dict  # {(arg index,): value}
    attrs: dict
    options: dict
    capability: int
    names: dict  # constexpr (and specialised integer) name -> value, for the table
    # (model, scope, dtype, precision) -> the variant's share of that step's programs of its kernel
    uses: dict = field(default_factory=dict)

    @property
    def max_share(self) -> float:
        return max(self.uses.values(), default=0.0)

    def label(self) -> str:
        args = ", ".join(f"{k}={_short(v)}" for k, v in self.names.items() if k not in _HIDDEN)
        return f"{self.kernel}({args})"

    def key(self) -> tuple:
        return (
            self.kernel,
            tuple(self.signature.items()),
            tuple(sorted((k, str(v)) for k, v in self.constexprs.items())),
            repr(sorted(self.attrs.items())),
            repr(sorted(self.options.items())),
            self.capability,
        )


@functools.cache
def _backend(capability: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", capability, 32))


@functools.cache
def _binder(kernel: str, capability: int):
    from triton.runtime.jit import create_function_from_signature

    fn = _kernel_fn(kernel)
    return create_function_from_signature(fn.signature, fn.params, _backend(capability))


def compile_inputs(launch: LaunchedKernel, capability: int) -> Variant:
    """What ``JITFunction.run`` would hand ``triton.compile`` for this launch on a GPU of ``capability``."""
    from triton import knobs

    fn = _kernel_fn(launch.kernel)
    backend = _backend(capability)
    kwargs = dict(launch.kwargs)
    # The options JITFunction.run adds before it binds (those this Triton knows).
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    binder = _binder(launch.kernel, capability)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    names = {p.name: launch.kwargs[p.name] for p in fn.params if p.is_constexpr and p.name in launch.kwargs}
    for p in fn.params:  # integer arguments Triton specialised on: == 1 (a constant) or divisible by 16
        if p.is_constexpr or signature[p.name].startswith("*"):
            continue
        if (p.num,) in constexprs:
            names[p.name] = constexprs[(p.num,)]
        elif attrs.get((p.num,)):
            names[p.name] = "%16"
    return Variant(launch.kernel, signature, constexprs, attrs, dict(options.__dict__), capability, names)


def default_variants(
    targets: Iterable[Target],
    models: Iterable[str] = MODELS,
    scopes: Iterable[str] = SCOPES,
    p_dtypes: Iterable[torch.dtype] = P_DTYPES,
    precisions: Sequence[str] = PRECISIONS,
    block_sizes: Iterable[int] = (BLOCK_SIZE,),
) -> list[Variant]:
    """Every distinct variant the launcher compiles for these models, scopes, dtypes and precisions, per target.

    ``uses`` of a variant: (model, scope, dtype, precision), the model suffixed ``@n`` for a block size n other
    than the default, mapped to the variant's share of the programs that step launches of the same kernel.
    """
    targets, p_dtypes = list(targets), list(p_dtypes)
    found: dict[tuple, Variant] = {}
    for model in models:
        shapes, roles, mask = model_group(model)
        for n in block_sizes:
            name = model if n == BLOCK_SIZE else f"{model}@{n}"
            for scope in scopes:
                per_config = launched_kernels(shapes, roles, mask, scope, p_dtypes, precisions, n)
                for (p_dtype, precision), launches in per_config.items():
                    use = (name, scope, str(p_dtype).removeprefix("torch."), precision)
                    total = {k: sum(x.programs for x in launches if x.kernel == k) for k in KERNELS}
                    for launch in launches:
                        for target in targets:
                            v = compile_inputs(launch, target.capability)
                            v = found.setdefault(v.key(), v)
                            v.uses[use] = v.uses.get(use, 0.0) + launch.programs / max(total[launch.kernel], 1)
    return list(found.values())


# %% compiling -------------------------------------------------------------------------------------------------
@dataclass
class Report:
    """ptxas' and Triton's figures for one variant on one target."""

    variant: Variant
    target: Target
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    shared: int = 0  # bytes per CTA: Triton's dynamic + ptxas' static
    num_warps: int = 0
    seconds: float = 0.0
    error: str | None = None

    @property
    def ctas_per_sm(self) -> int:
        return ctas_per_sm(self.registers, self.shared, self.num_warps, self.target) if not self.error else 0

    @property
    def spills(self) -> str:
        return f"{self.spill_stores} B stored / {self.spill_loads} B loaded at {self.registers} registers"

    def spill_note(self) -> str | None:
        """Why a spill of this variant is tolerated (see :data:`NEGLIGIBLE_SHARE`, :class:`Target`), else None."""
        if not (self.spill_stores or self.spill_loads) or self.error:
            return None
        share = f"{self.variant.max_share:.2%} of its step's programs"
        if self.variant.max_share <= NEGLIGIBLE_SHARE:
            return f"tolerated, negligible: spills {self.spills}, at most {share}"
        if not self.target.strict and self.registers < MAX_REGISTERS:
            return f"reported, not failed ({self.target.name}): occupancy spill {self.spills}, up to {share}"
        return None

    def problems(self) -> list[str]:
        """Why this default variant is not acceptable: a compile error, a spill not tolerated by
        :meth:`spill_note`, too much shared memory, or no resident CTA."""
        if self.error:
            return [f"compile error: {self.error.strip().splitlines()[-1] if self.error.strip() else '?'}"]
        out = []
        if (self.spill_stores or self.spill_loads) and self.spill_note() is None:
            out.append(f"spills {self.spills}, up to {self.variant.max_share:.1%} of its step's programs")
        if self.shared > self.target.max_shared_per_cta:
            out.append(f"shared memory {self.shared} B > {self.target.max_shared_per_cta} B")
        if not self.ctas_per_sm:
            out.append("no CTA fits on an SM")
        return out


_PTXAS_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "stack": r"(\d+) bytes stack frame",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
    "static_shared": r"(\d+) bytes smem",
}


def parse_ptxas_log(log: str) -> dict[str, int]:
    """The ``ptxas -v`` figures of the (single) entry function in ``log``; absent ones (smem) read 0."""
    if not re.search(_PTXAS_PATTERNS["registers"], log):
        raise ValueError(f"no 'Used N registers' in the ptxas log: {log[-500:]!r}")
    return {k: int(m.group(1)) if (m := re.search(p, log)) else 0 for k, p in _PTXAS_PATTERNS.items()}


def _quiet_worker() -> None:
    # Triton 3.9's notice (at import) that a future version changes the default of fp fusion: not ours to act on.
    warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def _compile(variant: Variant) -> dict:
    """Compile one variant (in a worker process); returns the Report's fields."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    fn = _kernel_fn(variant.kernel)
    src = ASTSource(fn, variant.signature, variant.constexprs, variant.attrs)
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with knobs.compilation.scope(), knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.compilation.always_compile = True  # a cache hit would skip ptxas, and its log
            knobs.nvidia.dump_ptxas_log = True  # make_cubin prints ptxas -v's stderr
            kernel = compile(src, target=GPUTarget("cuda", variant.capability, 32), options=variant.options)
        figures = parse_ptxas_log(log.getvalue())
    except Exception as e:  # a compile error is a result of the report, not a crash of it
        return dict(error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
    return dict(
        registers=figures["registers"],
        spill_stores=figures["spill_stores"],
        spill_loads=figures["spill_loads"],
        stack=figures["stack"],
        shared=int(kernel.metadata.shared) + figures["static_shared"],
        num_warps=int(kernel.metadata.num_warps),
        seconds=time.perf_counter() - t0,
    )


def compile_ptx(variant: Variant) -> str:
    """The PTX Triton generates for one variant (in this process; no ptxas log): what the access widths are."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    fn = _kernel_fn(variant.kernel)
    src = ASTSource(fn, variant.signature, variant.constexprs, variant.attrs)
    return compile(src, target=GPUTarget("cuda", variant.capability, 32), options=variant.options).asm["ptx"]


def compile_variants(variants: Sequence[Variant], workers: int | None = None) -> list[Report]:
    """Compile every variant, ``workers`` processes at once (default: one per core), in the given order."""
    by_capability = {t.capability: t for t in TARGETS.values()}
    workers = max(1, min(workers or os.cpu_count() or 1, len(variants)))
    if workers == 1:
        fields = [_compile(v) for v in variants]
    else:
        # spawn: fresh interpreters, so the workers see the real kernels and no state of this process
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_quiet_worker) as pool:
            fields = list(pool.map(_compile, variants))
    return [Report(v, by_capability[v.capability], **f) for v, f in zip(variants, fields, strict=True)]


# %% the table --------------------------------------------------------------------------------------------------
_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int32": "i32", "int64": "i64"}
_HIDDEN = {"PHASE", "AMSGRAD", "MAXIMIZE"}  # the launcher's defaults, the same in every row


def _short(value) -> str:
    text = str(getattr(value, "name", value))
    text = _SHORT.get(text.removeprefix("torch."), text)
    return {"True": "1", "False": "0"}.get(text, text)


def _uses(uses: dict) -> str:
    by_model: dict[str, set] = {}
    for model, scope, _, _ in uses:
        by_model.setdefault(model, set()).add(scope)
    return " ".join(f"{m}:{','.join(s for s in SCOPES if s in scopes)}" for m, scopes in sorted(by_model.items()))


def format_table(reports: Sequence[Report]) -> str:
    """One line per variant: its constexprs and options, registers, spills, stack, shared memory, CTAs per SM,
    its largest share of a step's programs (of its kernel), compile seconds and the configurations using it."""
    import triton

    lines = []
    for kernel in dict.fromkeys(r.variant.kernel for r in reports):
        rows = [r for r in reports if r.variant.kernel == kernel]
        keys = [k for k in dict.fromkeys(k for r in rows for k in r.variant.names) if k not in _HIDDEN]
        options = ["num_warps", "num_stages"]
        options += ["maxnreg"] if any(r.variant.options.get("maxnreg") for r in rows) else []
        head = [*keys, *(o.removeprefix("num_") for o in options)]
        head += ["regs", "spill st/ld", "stack", "smem KB", "CTAs/SM", "share %", "s", "used by"]
        table = [head]
        for r in rows:
            v = r.variant
            cells = [_short(v.names.get(k, "")) for k in keys]
            cells += [str(v.options.get(o) or "") for o in options]
            if r.error:
                cells += ["ERROR", "", "", "", "", f"{100 * v.max_share:.1f}", f"{r.seconds:.0f}", _uses(v.uses)]
            else:
                cells += [
                    str(r.registers),
                    f"{r.spill_stores}/{r.spill_loads}",
                    str(r.stack),
                    f"{r.shared / 1024:.1f}",
                    str(r.ctas_per_sm),
                    f"{100 * v.max_share:.1f}",
                    f"{r.seconds:.0f}",
                    _uses(v.uses),
                ]
            table.append(cells)
        widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
        targets = ", ".join(dict.fromkeys(f"{r.target.name} (cc {r.variant.capability})" for r in rows))
        lines.append(f"{kernel}: {len(rows)} variants, {targets}, Triton {triton.__version__}")
        for row in table:
            lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return "\n".join(lines)


def summary(reports: Sequence[Report]) -> str:
    """Max registers, total spills, max shared memory and min occupancy, per target and kernel."""
    out = []
    for target in dict.fromkeys(r.target.name for r in reports):
        for kernel in dict.fromkeys(r.variant.kernel for r in reports):
            rs = [r for r in reports if r.target.name == target and r.variant.kernel == kernel and not r.error]
            if not rs:
                continue
            spilled = [r for r in rs if r.spill_stores or r.spill_loads]
            out.append(
                f"{target} {kernel}: {len(rs)} variants, registers {min(r.registers for r in rs)}-"
                f"{max(r.registers for r in rs)}, spilling {len(spilled)} (max {max(r.spill_stores for r in rs)} B "
                f"stores), shared <= {max(r.shared for r in rs) / 1024:.1f} KB, CTAs/SM "
                f"{min(r.ctas_per_sm for r in rs)}-{max(r.ctas_per_sm for r in rs)}"
            )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--targets", default="sm_90,sm_80", help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--scopes", default=",".join(SCOPES))
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--block-sizes", default=str(BLOCK_SIZE), help="comma-separated n (default: the optimizer's)")
    parser.add_argument("--workers", type=int, default=None)
    a = parser.parse_args(argv)
    targets = [TARGETS[t] for t in a.targets.split(",")]
    t0 = time.perf_counter()
    variants = default_variants(
        targets,
        a.models.split(","),
        a.scopes.split(","),
        [getattr(torch, d) for d in a.dtypes.split(",")],
        a.precisions.split(","),
        [int(n) for n in a.block_sizes.split(",")],
    )
    t1 = time.perf_counter()
    reports = compile_variants(variants, a.workers)
    for target in targets:
        print(format_table([r for r in reports if r.target is target]), end="\n\n")
    print(summary(reports))
    print(f"{len(variants)} variants: collected in {t1 - t0:.0f} s, compiled in {time.perf_counter() - t1:.0f} s")
    for r in reports:
        if r.spill_note():
            print(f"NOTE {r.target.name} {r.variant.label()}: {r.spill_note()}")
    bad = [(r, p) for r in reports for p in r.problems()]
    for r, p in bad:
        print(f"FAIL {r.target.name} {r.variant.label()}: {p}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

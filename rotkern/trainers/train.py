"""``rotkern train``: one training run of GPT, SimpleViT or ResNet under AdamW, rotated AdamW or SGD-M.

nanoGPT's loop: linear warm-up then cosine decay to a floor, gradient clipping, gradient accumulation,
optional bf16 autocast, DDP under torchrun, weight decay on >= 2-D tensors only. The log is JSONL: a header
(versions, device, optimizer backend, git sha, data, full config), one record per step (loss, lr, grad norm,
throughput, step and optimizer time), eval records and a final record. Checkpoints hold the model, the
optimizer, the step and the config; they are written atomically and never over a file this run did not
resume from. Batches are a function of (seed, step), so a resumed run continues bit-identically.

--switch_at=K --switch_to=<adamw|scope> changes the optimizer's basis after K updates: a new optimizer is built
as at the start and, with --switch_state=convert, continues from the old one's Adam moments and step
(rotkern.from_adamw_state / to_adamw_state); the lr schedule runs on. The log gets a "switch" record between
steps K and K + 1, every step record names its optimizer, and steps K and K + 1 carry their update norm. A
checkpoint past step K holds the new optimizer; one at or before it resumes into the old one and switches later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .._backend import PRECISIONS
from ..bases import BASIS_CHANGES
from ..rotations import MAX_BLOCK_SIZE, STRUCTURES, check_structure
from ..scopes import ALL_SCOPES, DYNAMIC_SCOPES, EMBEDDING_ORIENTATIONS, VECTOR_POLICIES, param_groups_for
from .common import JsonlLog, Range, TrainerError, atomic_save, check_ranges, header
from .data import (
    BatchLoader,
    ImageData,
    TextData,
    auto_workers,
    load_images,
    load_text,
    train_loader,
    worker_failure,
)
from .models import (
    ATTENTION_BACKENDS,
    MODELS,
    QKV_TYPES,
    GPTConfig,
    build_model,
    layer_types,
    model_config,
    model_kind,
    model_layer_types,
)
from .options import ADAM, ALL, MUON, ROTATED, ROTATED_ADAMW, ROTATED_FUSED, ROTATED_SGDM, SGDM, option, ranges
from .options import choices as option_choices
from .options import optimizer_kwargs as _optimizer_kwargs

OPTIMIZERS = ("adamw", "rotated-eager", "rotated-fused", "sgdm", "rotated-sgdm", "muon", "soap")
SWITCH_STATES = ("convert", "reset")
CHECKPOINT_FORMAT = 1
# option(convert=...): what an option's value becomes as some optimizer's keyword
_STATE_DTYPE = {name: (lambda v: torch.bfloat16 if v == "bfloat16" else None) for name in ROTATED_ADAMW}
_MUON_MOMENTUM = {MUON: lambda v: 0.95 if v == 0.9 else v}


@dataclass
class TrainConfig:
    # start from a preset, then apply the other options: tiny (= gpt-tiny, the defaults) | vit-tiny | resnet-tiny
    # (CPU-sized) | gpt2-124m | vit-s16 | resnet50 (the paper's setups, App. B.2)
    preset: str = ""
    # --- model and data
    # gpt2-124m | gpt-tiny | vit-s16 | vit-tiny | resnet50 | resnet18 | resnet-tiny
    model: str = option("gpt-tiny", choices=tuple(MODELS))
    data: str = ""  # "" = embedded (stdlib text / digits or synthetic images); file, folder, train.bin+val.bin folder
    data_max_bytes: int = 4_000_000  # cap on the text read from files (train + val)
    workers: int = -1  # batch-decoding processes; 0 = in this process; -1 = min(8, CPUs) for image folders, else 0
    prefetch: int = 2  # batches each worker decodes ahead
    context: int = 0  # GPT sequence length; 0 = the model's
    # SDPA backend: math (the paper ran without FlashAttention) | auto | flash | efficient
    attention: str = option("math", choices=ATTENTION_BACKENDS)
    # --- optimizer
    # adamw (torch) | rotated-eager (RotatedAdamW) | rotated-fused | sgdm (torch) | rotated-sgdm (RotatedSGD) |
    # muon (Muon on hidden matrices + AdamW, Alg 6) | soap (RotatedAdamW, rotation=eigen with SOAP's basis options)
    optimizer: str = option("rotated-fused", choices=OPTIMIZERS)
    # none | global | layer | output | input | svd | eigen
    rotation: str = option("global", "rotation", ROTATED, choices=ALL_SCOPES)
    # Haar block size n (the paper's)
    block_size: int = option(768, "block_size", ROTATED, range=Range(1, MAX_BLOCK_SIZE))
    # rotation blocks: haar (the paper's) | hadamard (randomized Walsh-Hadamard; 2^k blocks)
    structure: str = option("haar", "structure", ROTATED, choices=STRUCTURES)
    # embedding orientation: as_linear (C.2's "within weights of a same token": output-wise rotates each token's
    # row, as for the tied lm_head) | transposed (the workshop text's B.1: the (vocab, dim) table is transposed
    # before rotating, so output-wise rotates each length-vocab column, one per embedding dimension)
    embedding: str = option("as_linear", "embedding", ROTATED, choices=EMBEDDING_ORIENTATIONS)
    # rotate the q, k, v thirds of a fused QKV weight as separate layers (paper B.1)
    split_qkv: bool = option(True, "split_qkv", ROTATED)
    # 1-D params (norm weights, biases): auto (join the global vector, their own vector under layer, unrotated
    # under output / input) | rotate (also rotated under output / input) | none (never rotated)
    vectors: str = option("auto", "vectors", ROTATED, choices=VECTOR_POLICIES)
    # rotate only these layer types (comma or + list), the others step as plain AdamW in the same optimizer
    # (paper C.2): q, k, v, attn_out, mlp_in, mlp_out, embedding, norm, conv, head, as the model defines them
    # (gpt: no head, its lm_head is the tied embedding; resnet: conv, norm, head); "" = every type
    rotate_only: str = ""
    rotate_except: str = ""  # rotate every layer type but these (comma or + list, types as --rotate_only)
    # rotation=svd: steps between SVD basis recomputes (F; the paper's 250)
    svd_every: int = option(250, "svd_every", ROTATED_ADAMW, range=Range(1))
    # rotation=eigen / soap: steps between eigenbasis refreshes (SOAP's 10)
    precondition_every: int = option(10, "precondition_every", ROTATED_ADAMW, range=Range(1))
    # rotation=eigen / soap: EMA coefficient of G G^T and G^T G (SOAP's)
    shampoo_beta: float = option(0.95, "shampoo_beta", ROTATED_ADAMW, range=Range(0, 1, open_hi=True))
    # rotation=eigen / soap: matrix sides longer than this keep no basis
    max_precond_dim: int = option(10000, "max_precond_dim", ROTATED_ADAMW, range=Range(1))
    # svd / eigen: moments at a basis change: auto | keep | transport | transport_m | reset
    basis_change: str = option("auto", "basis_change", ROTATED_ADAMW, choices=("auto", *BASIS_CHANGES))
    # rotated-fused dot precision: ieee | tf32x3 | tf32
    precision: str = option("tf32x3", "precision", (ROTATED_FUSED,), choices=PRECISIONS)
    # rotated AdamW: the dtype Adam's moments are stored in between steps: float32 | bfloat16 (half the optimizer
    # memory; lossy: small updates of v are lost to rounding; the README's drop-in table)
    state_dtype: str = option(
        "float32", "state_dtype", ROTATED_ADAMW, choices=("float32", "bfloat16"), convert=_STATE_DTYPE
    )
    backend: str = option("auto", "backend", (ROTATED_FUSED,))  # rotated-fused backend (see rotkern._backend)
    lr: float = option(3e-3, "lr", ALL, range=Range(0, open_lo=True))  # peak learning rate
    min_lr: float = 3e-4  # cosine floor
    warmup_steps: int = 20  # linear warm-up, in optimizer steps
    decay_steps: int = 0  # cosine length, warm-up included; 0 = steps
    # Adam's first-moment coefficient
    beta1: float = option(0.9, "betas", ADAM, index=0, range=Range(0, 1, open_hi=True))
    # Adam's second-moment coefficient
    beta2: float = option(0.95, "betas", ADAM, index=1, range=Range(0, 1, open_hi=True))
    eps: float = option(1e-8, "eps", ADAM, range=Range(0, open_lo=True))  # Adam's epsilon, added to sqrt(v_hat)
    # on >= 2-D tensors only (nanoGPT)
    weight_decay: float = option(0.1, "weight_decay", (MUON, *ROTATED_ADAMW), range=Range(0))
    # sgdm, rotated-sgdm, muon (muon uses 0.95 when this is left at 0.9)
    momentum: float = option(
        0.9, "momentum", (SGDM, ROTATED_SGDM, MUON), range=Range(0, 1, open_hi=True), convert=_MUON_MOMENTUM
    )
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    # --- optimizer switch: change the basis mid-run (the lr schedule carries on across it)
    switch_at: int = 0  # switch after this many updates, before the next one; 0 = never
    switch_to: str = ""  # adamw (from a rotated run) | a scope: adamw becomes rotated-eager, rotated-* keep their class
    # convert: Adam's moments and step carried over (rotkern.from/to_adamw_state) | reset
    switch_state: str = option("convert", choices=SWITCH_STATES)
    # --- run
    steps: int = 200  # optimizer steps (the schedule spans them)
    stop_step: int = 0  # stop after this step (0 = steps); the schedule still spans `steps`; resume later
    batch_size: int = 16  # micro-batch per process
    grad_accum: int = 1  # micro-batches per step over all processes (nanoGPT's); a multiple of the world size
    bf16: bool = False  # bf16 autocast for forward and backward; the optimizer stays fp32
    # shard params, grads and optimizer state over the torchrun processes with FSDP2 (fully_shard; needs >= 2
    # processes; rotkern.trainers.fsdp); checkpoints through torch.distributed.checkpoint (a ckpt_dcp/ folder)
    fsdp: bool = False
    # --fsdp: input / layer / global units that span shards: local (each rank's shard rotated on its own; tied to
    # the world size) | gather (all-gathered: exact, 4 all-gathers of the params per step)
    shard_mode: str = option("local", choices=("local", "gather"))
    tf32: bool = False  # allow TF32 matmuls on CUDA (would also touch the eager optimizer's rotations)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = option(0, "seed", ROTATED, range=Range(0, 2**63 - 1))  # model init, batches and rotations
    eval_every: int = 50  # 0 = only at the end
    eval_batches: int = 8  # validation batches per evaluation (0 = the whole image val split)
    print_every: int = 20  # console progress; 0 = quiet
    save_every: int = 0  # checkpoint every N steps (0 = at the end only)
    save: bool = True  # write a checkpoint at the end
    out_dir: str = "runs/train"  # folder for log.jsonl and ckpt.pt; an existing run there is never overwritten
    resume: str = ""  # checkpoint (or run folder with ckpt.pt) to continue; saves replace it, the log goes beside it

    # The numeric options' allowed values (rotkern.trainers.common.Range); the CLI refuses others in one line.
    # The optimizer options' ranges are declared with them (option(range=...)); TrainConfig.RANGES, set below the
    # class, holds both in field order.
    RANGES: ClassVar[dict[str, Range]] = {}


TrainConfig.RANGES = ranges(TrainConfig, {
    "data_max_bytes": Range(1), "workers": Range(-1), "prefetch": Range(1), "context": Range(0),
    "min_lr": Range(0), "warmup_steps": Range(0), "decay_steps": Range(0), "grad_clip": Range(0),
    "switch_at": Range(0), "steps": Range(1), "stop_step": Range(0), "batch_size": Range(1),
    "grad_accum": Range(1), "eval_every": Range(0), "eval_batches": Range(0),
    "print_every": Range(0), "save_every": Range(0),
})  # fmt: skip


# Each preset is a set of overrides on top of the defaults (the defaults are the CPU `tiny` run).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {},
    "gpt-tiny": {},
    "vit-tiny": dict(model="vit-tiny", lr=3e-3, min_lr=3e-4, beta2=0.999, batch_size=64, weight_decay=0.1),
    "resnet-tiny": dict(model="resnet-tiny", lr=3e-3, min_lr=3e-4, beta2=0.999, batch_size=64, weight_decay=1e-4),
    # The paper's setups (paper App. B.2). ImageNet epochs in steps: 1,281,167 images / batch.
    "gpt2-124m": dict(
        model="gpt2-124m",
        lr=6e-4,
        min_lr=6e-5,
        warmup_steps=2000,
        steps=100_000,
        batch_size=12,
        grad_accum=40,
        beta2=0.95,
        weight_decay=0.1,
        bf16=True,
        eval_every=2000,
        eval_batches=200,
        print_every=10,
        save_every=5000,
    ),
    "vit-s16": dict(
        model="vit-s16",
        lr=1e-3,
        min_lr=0.0,
        warmup_steps=6255,
        steps=125_100,
        batch_size=128,
        grad_accum=8,
        beta2=0.999,
        weight_decay=0.1,
        bf16=True,
        eval_every=1251,
        eval_batches=0,
        print_every=10,
        save_every=6255,
    ),
    "resnet50": dict(
        model="resnet50",
        lr=1e-3,
        min_lr=0.0,
        warmup_steps=25_025,
        steps=500_500,
        batch_size=256,
        grad_accum=1,
        beta2=0.999,
        weight_decay=1e-4,
        eval_every=5005,
        eval_batches=0,
        print_every=10,
        save_every=25_025,
    ),
}


def check_config(cfg: TrainConfig, world: int = 1) -> None:
    choices = option_choices(TrainConfig)
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise TrainerError(f"--{key}={getattr(cfg, key)!r} is not one of {', '.join(allowed)}")
    if cfg.state_dtype != "float32" and cfg.optimizer not in ("rotated-eager", "rotated-fused", "soap"):
        raise TrainerError(
            f"--state_dtype={cfg.state_dtype} sets rotated AdamW's moments; --optimizer={cfg.optimizer} does not use it"
        )
    check_ranges(cfg)
    try:
        check_structure(cfg.structure, cfg.block_size, "--structure")
    except ValueError as e:
        raise TrainerError(str(e).replace("block_size=", "--block_size=")) from None
    if cfg.grad_accum % world:
        raise TrainerError(f"--grad_accum={cfg.grad_accum} is not a multiple of the world size {world}")
    if cfg.stop_step < 0 or cfg.stop_step > cfg.steps:
        raise TrainerError(f"--stop_step={cfg.stop_step} must lie in [0, steps={cfg.steps}]")
    check_switch(cfg)
    rotated_types(cfg)
    if cfg.fsdp:
        if world < 2:
            raise TrainerError(
                "--fsdp shards over the torchrun processes: launch with python -m torch.distributed.run "
                "--nproc_per_node=N (N >= 2) -m rotkern.trainers train --fsdp ..."
            )
        if cfg.optimizer in ("muon", "rotated-sgdm") or cfg.switch_at:
            raise TrainerError(
                f"--fsdp runs adamw, sgdm, rotated-eager, rotated-fused and soap without switching; got "
                f"--optimizer={cfg.optimizer}" + (f" --switch_at={cfg.switch_at}" if cfg.switch_at else "")
            )


# Optimizers whose param groups carry a rotation, so that --rotate_only / --rotate_except can restrict it.
RESTRICTABLE = ("rotated-eager", "rotated-fused", "rotated-sgdm")


def parse_types(text: str) -> list[str]:
    """A --rotate_only / --rotate_except list: layer types separated by commas or '+', in the order given."""
    return list(dict.fromkeys(t.strip() for t in text.replace("+", ",").split(",") if t.strip()))


def rotated_types(cfg: TrainConfig) -> tuple[str, ...] | None:
    """The layer types --rotate_only / --rotate_except leave rotated (in models.LAYER_TYPES order), or None when
    neither is given (every parameter rotated). TrainerError for a bad combination or a type the model lacks."""
    only, exclude = parse_types(cfg.rotate_only), parse_types(cfg.rotate_except)
    if not only and not exclude:
        return None
    flag = "--rotate_only" if only else "--rotate_except"
    if only and exclude:
        raise TrainerError("--rotate_only and --rotate_except exclude each other; give one of them")
    if cfg.optimizer not in RESTRICTABLE:
        raise TrainerError(f"{flag} restricts a rotation: it needs --optimizer one of {', '.join(RESTRICTABLE)}")
    if cfg.rotation == "none":
        raise TrainerError(f"{flag} restricts a rotation; --rotation=none rotates nothing")
    valid = model_layer_types(cfg.model)
    bad = [t for t in only + exclude if t not in valid]
    if bad:
        raise TrainerError(
            f"{flag}={cfg.rotate_only or cfg.rotate_except!r}: {', '.join(map(repr, bad))} is not a layer type of "
            f"{cfg.model}; choose from {', '.join(valid)}"
        )
    keep = tuple(t for t in valid if t in only) if only else tuple(t for t in valid if t not in exclude)
    if not keep:
        raise TrainerError(f"{flag}={cfg.rotate_except!r} leaves no layer type of {cfg.model} rotated")
    qkv = [t for t in QKV_TYPES if t in valid]
    partial = qkv and 0 < sum(t in keep for t in qkv) < len(qkv)
    if partial and cfg.rotation in DYNAMIC_SCOPES:
        raise TrainerError(
            f"{flag} rotates some of q, k, v, which share one fused weight; --rotation={cfg.rotation} rotates whole "
            "matrices (select all of q, k, v or none of them)"
        )
    if partial and not cfg.split_qkv and cfg.rotation != "global":
        raise TrainerError(f"{flag} rotates some of q, k, v of the fused QKV weight: it needs --split_qkv=true")
    return keep


def check_switch(cfg: TrainConfig) -> None:
    if cfg.switch_at < 0 or cfg.switch_at >= cfg.steps:
        raise TrainerError(f"--switch_at={cfg.switch_at} must lie in [0, steps={cfg.steps}) (0 = no switch)")
    if bool(cfg.switch_at) != bool(cfg.switch_to):
        given, missing = ("--switch_at", "--switch_to") if cfg.switch_at else ("--switch_to", "--switch_at")
        raise TrainerError(f"{given} needs {missing} (switch_at=K, switch_to=adamw or a scope)")
    if not cfg.switch_to:
        return
    targets = ("adamw", *ALL_SCOPES)
    if cfg.switch_to not in targets:
        raise TrainerError(f"--switch_to={cfg.switch_to!r} is not one of {', '.join(targets)}")
    if cfg.optimizer not in ("adamw", "rotated-eager", "rotated-fused"):
        raise TrainerError(
            f"--switch_to switches an AdamW run (adamw, rotated-eager, rotated-fused), not {cfg.optimizer}"
        )
    if optimizer_label(cfg) == optimizer_label(optimizer_after(cfg, cfg.steps)) and cfg.switch_state == "convert":
        # Into its own basis the conversion is no identity: v goes out and back through D o D and gets blurred.
        raise TrainerError(
            f"--switch_to={cfg.switch_to} is what this run already uses ({optimizer_label(cfg)}); "
            "only --switch_state=reset makes sense there"
        )


def optimizer_after(cfg: TrainConfig, done: int) -> TrainConfig:
    """The config of the optimizer in use after `done` updates, i.e. the one a checkpoint at step `done` holds:
    the run's own up to step switch_at (the switch comes before the next update), the switch_to one past it."""
    if not cfg.switch_at or done <= cfg.switch_at:
        return cfg
    if cfg.switch_to == "adamw":
        return dataclasses.replace(cfg, optimizer="adamw")
    name = cfg.optimizer if cfg.optimizer.startswith("rotated") else "rotated-eager"
    return dataclasses.replace(cfg, optimizer=name, rotation=cfg.switch_to)


def optimizer_label(cfg: TrainConfig) -> str:
    """adamw, sgdm, muon, soap, or rotated-<eager|fused|sgdm>:<scope>: what the step records call the optimizer."""
    return f"{cfg.optimizer}:{cfg.rotation}" if cfg.optimizer.startswith("rotated") else cfg.optimizer


def lr_at(cfg: TrainConfig, step: int) -> float:
    """nanoGPT's schedule: linear warm-up over warmup_steps, cosine from lr to min_lr until decay_steps, then min_lr."""
    decay = cfg.decay_steps or cfg.steps
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if step >= decay:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / max(decay - cfg.warmup_steps, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


# -- set-up --------------------------------------------------------------------------------------------


@dataclass
class Setup:
    cfg: TrainConfig
    device: torch.device
    data: TextData | ImageData
    model_cfg: Any
    context: int
    rank: int = 0
    world: int = 1
    loader: BatchLoader | None = None  # batches decoded ahead in worker processes (start_loader)

    @property
    def kind(self) -> str:
        return self.data.kind

    @property
    def global_rows(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum

    @property
    def unit(self) -> str:
        return "tokens" if self.kind == "text" else "images"

    def items_per_step(self) -> int:
        return self.global_rows * (self.context if self.kind == "text" else 1)

    def build_model(self) -> nn.Module:
        torch.manual_seed(self.cfg.seed)
        return build_model(self.model_cfg).to(self.device)

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.loader is not None:
            x, y = self.loader.get((step, micro))
        else:
            x, y = self.data.batch(
                step, micro, self.rank, self.world, self.cfg.batch_size, self.global_rows, self.context, self.cfg.seed
            )
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    @property
    def workers(self) -> int:
        return auto_workers(self.data) if self.cfg.workers < 0 else self.cfg.workers

    def start_loader(self, start: int, stop: int) -> None:
        """With workers > 0, decode the micro-batches of steps [start, stop) ahead in worker processes; batch()
        then hands them out (the same tensors as in-process, bit for bit). Pair with stop_loader()."""
        if self.workers > 0 and start < stop:
            self.loader = train_loader(
                self.data,
                range(start, stop),
                self.cfg.grad_accum // self.world,
                self.rank,
                self.world,
                self.cfg.batch_size,
                self.global_rows,
                self.context,
                self.cfg.seed,
                workers=self.workers,
                prefetch=self.cfg.prefetch,
                pin_memory=self.device.type == "cuda",
            )

    def stop_loader(self) -> None:
        loader, self.loader = self.loader, None
        if loader is not None:
            loader.close()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    asked = name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainerError(f"--device={name!r} is not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainerError("--device=cuda but CUDA is not available")
        per_rank = dev.index is None
        if per_rank:
            dev = torch.device("cuda", local_rank)  # torchrun's process r on a node takes cuda:r
        count = torch.cuda.device_count()
        if dev.index >= count:
            which = f"cuda:{dev.index} (this process's LOCAL_RANK)" if per_rank else f"cuda:{dev.index}"
            fix = "launch at most that many processes per node (--nproc_per_node)" if per_rank else "pick one of those"
            raise TrainerError(
                f"--device={asked} means {which} but this machine has {count} CUDA device(s): {fix}, or pass "
                "--device=cpu"
            )
    return dev


def check_backend(backend: str, device: torch.device) -> None:
    """TrainerError, before any work, when --backend cannot run on ``device`` (the optimizer would raise at its
    first step)."""
    from .._backend import resolve_backend

    try:
        resolve_backend(backend, torch.empty(0, device=device))
    except (RuntimeError, ValueError) as e:
        raise TrainerError(
            f"--backend={backend}: {e}; use --backend=auto (the fastest one this device has) or another --device"
        ) from None


def make_setup(cfg: TrainConfig, rank: int = 0, world: int = 1, local_rank: int = 0) -> Setup:
    check_config(cfg, world)
    device = resolve_device(cfg.device, local_rank)
    if cfg.optimizer == "rotated-fused":
        check_backend(cfg.backend, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    base = MODELS[cfg.model]
    if model_kind(cfg.model) == "text":
        assert isinstance(base, GPTConfig)
        context = cfg.context or base.block_size
        data = load_text(cfg.data, cfg.data_max_bytes)
        data.check(base.vocab_size, context)
        mcfg = model_config(cfg.model, block_size=max(context, base.block_size), attention=cfg.attention)
    else:
        data = load_images(cfg.data, base.image_size)
        if data.image_size != base.image_size and hasattr(base, "patch_size") and data.image_size % base.patch_size:
            raise TrainerError(
                f"{cfg.model} uses {base.patch_size}px patches, which do not tile the data's "
                f"{data.image_size}px images; use vit-tiny or image data of another size"
            )
        mcfg = model_config(
            cfg.model,
            num_classes=data.num_classes,
            channels=data.channels,
            image_size=data.image_size,
            attention=cfg.attention,
        )
        context = 0
    return Setup(cfg, device, data, mcfg, context, rank, world)


def param_groups(cfg: TrainConfig, model: nn.Module) -> list[dict]:
    """nanoGPT's decay rule (>= 2-D decayed): one group with a decay mask for the rotated optimizers (a global
    rotation spans every parameter), two groups for torch's."""
    if cfg.optimizer.startswith("rotated") or cfg.optimizer == "soap":
        groups = param_groups_for(model, weight_decay=cfg.weight_decay)
        if cfg.shard_mode != "local":
            for g in groups:
                g["shard_mode"] = cfg.shard_mode
        keep = rotated_types(cfg)
        return groups if keep is None else restrict_rotation(groups, model, keep)
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def restrict_rotation(groups: list[dict], model: nn.Module, keep: tuple[str, ...]) -> list[dict]:
    """Split param groups for --rotate_only / --rotate_except: the parameters of the kept layer types stay in their
    group (the optimizer's scope), the others move to a twin group with ``rotation="none"`` (plain AdamW, same
    optimizer). A fused QKV weight whose thirds are only partly kept stays rotated with the group option
    ``qkv_pieces`` naming the kept thirds (the others step as AdamW)."""
    types = layer_types(model)
    out = []
    for g in groups:
        per_param = {k: g[k] for k in ("params", "names", "roles", "decay_mask") if g.get(k) is not None}
        rotated: dict[str, list] = {k: [] for k in per_param}
        plain: dict[str, list] = {k: [] for k in per_param}
        pieces = set()
        for i, name in enumerate(g["names"]):
            kept = [t for t in types[name] if t in keep]
            if kept and set(types[name]) <= set(QKV_TYPES) and len(kept) < len(types[name]):
                pieces.add("".join(t for t in QKV_TYPES if t in kept))
            for k, values in per_param.items():
                (rotated if kept else plain)[k].append(values[i])
        extra = {k: v for k, v in g.items() if k not in per_param}
        if pieces:
            (only,) = pieces  # one selection for every fused QKV weight
            extra["qkv_pieces"] = only
        if rotated["params"]:
            out.append({**extra, **rotated})
        if plain["params"]:
            out.append({**{k: v for k, v in extra.items() if k != "qkv_pieces"}, **plain, "rotation": "none"})
    return out


def fused_class():
    import rotkern

    cls = getattr(rotkern, "FusedRotatedAdamW", None)
    if cls is None:
        raise TrainerError(
            "--optimizer=rotated-fused needs rotkern.FusedRotatedAdamW, which this install lacks"
        )
    return cls


def optimizer_kwargs(cfg: TrainConfig, name: str) -> dict[str, Any]:
    """The keywords the options of ``cfg`` give optimizer ``name`` (adamw, sgdm, muon, rotated-sgdm, rotated-eager,
    rotated-fused), as their option() declarations in TrainConfig say."""
    return _optimizer_kwargs(cfg, TrainConfig, name)


def make_optimizer(
    cfg: TrainConfig, model: nn.Module, optimizer: str | None = None, compute_dtype: torch.dtype = torch.float32
) -> torch.optim.Optimizer:
    name = optimizer or cfg.optimizer
    if name == "muon":
        from .baselines import MuonWithAdamW

        return MuonWithAdamW(model, **optimizer_kwargs(cfg, name))  # type: ignore[return-value]
    groups = param_groups(dataclasses.replace(cfg, optimizer=name), model)
    if name == "adamw":
        return torch.optim.AdamW(groups, **optimizer_kwargs(cfg, name))
    if name == "sgdm":
        return torch.optim.SGD(groups, **optimizer_kwargs(cfg, name))
    soap = name == "soap"
    if soap:
        name = "rotated-eager"
    kwargs = optimizer_kwargs(cfg, name)
    if soap:
        kwargs.update(rotation="eigen", basis_change="transport_m" if cfg.basis_change == "auto" else cfg.basis_change)
    if name == "rotated-sgdm":
        from ..optim import RotatedSGD

        if cfg.rotation in DYNAMIC_SCOPES:
            raise TrainerError(f"--optimizer=rotated-sgdm runs the static scopes; --rotation={cfg.rotation} is AdamW's")
        return RotatedSGD(groups, compute_dtype=compute_dtype, **kwargs)
    if name == "rotated-eager":
        from ..optim import RotatedAdamW

        return RotatedAdamW(groups, compute_dtype=compute_dtype, **kwargs)
    cls = fused_class()
    try:
        return cls(groups, **kwargs)
    except (RuntimeError, ValueError) as e:
        raise TrainerError(f"rotated-fused (precision={cfg.precision}, backend={cfg.backend}): {e}") from None


def switch_optimizer(cfg: TrainConfig, model: nn.Module, old: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The switch_to optimizer, built like the run's own; with switch_state=convert it continues from `old`'s
    Adam moments and step, carried into (or out of) its basis. Its lr is set by the next train_step."""
    new_cfg = optimizer_after(cfg, cfg.switch_at + 1)
    new = make_optimizer(new_cfg, model)
    if cfg.switch_state == "reset":
        return new
    from ..optim import from_adamw_state, to_adamw_state

    try:
        if new_cfg.optimizer == "adamw":
            new.load_state_dict(to_adamw_state(old, new))
        else:
            new.load_state_dict(from_adamw_state(new, old))
    except (TypeError, ValueError, KeyError) as e:
        raise TrainerError(
            f"cannot carry the {optimizer_label(cfg)} state into {optimizer_label(new_cfg)} "
            f"at step {cfg.switch_at}: {e}"
        ) from None
    return new


def optimizer_backend(opt: torch.optim.Optimizer) -> str:
    """What actually ran the last optimizer step."""
    name = type(opt).__name__
    if isinstance(opt, (torch.optim.AdamW, torch.optim.SGD)):
        return f"torch.optim.{name}"
    if name == "MuonWithAdamW":
        return f"{type(opt.muon).__module__}.Muon + torch.optim.AdamW"
    if name == "RotatedAdamW":
        return "eager (rotkern.kernels.reference.rotated_adamw_ref)"
    used = getattr(opt, "backend_used", None)  # FusedRotatedAdamW: "triton" or "eager", after a step
    return f"{name}: {used or 'no step taken yet'}"


# -- steps ---------------------------------------------------------------------------------------------


def loss_of(kind: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if kind == "text":
        return model(x, y)[1]
    return F.cross_entropy(model(x).float(), y)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(s: Setup, model: nn.Module, opt: torch.optim.Optimizer, step: int) -> dict[str, float]:
    """One optimizer step over grad_accum / world micro-batches; returns the step's log fields."""
    cfg, ddp = s.cfg, isinstance(model, nn.parallel.DistributedDataParallel)
    t0 = time.perf_counter()
    lr = lr_at(cfg, step)
    for g in opt.param_groups:
        g["lr"] = lr
    model.train()
    local = cfg.grad_accum // s.world
    loss_sum = torch.zeros((), device=s.device)
    for micro in range(local):
        x, y = s.batch(step, micro)
        if x.is_floating_point():  # a float64 model (validate's reference side) takes float64 images
            x = x.to(next(model.parameters()).dtype)
        sync = model.no_sync() if ddp and micro < local - 1 else contextlib.nullcontext()
        with sync:
            with s.autocast():
                loss = loss_of(s.kind, model, x, y) / local
            loss.backward()
        loss_sum += loss.detach().float()
    if s.world > 1:
        torch.distributed.all_reduce(loss_sum)
        loss_sum /= s.world
    params = [p for g in opt.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    _sync(s.device)
    t1 = time.perf_counter()
    opt.step()
    _sync(s.device)
    t2 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    return {
        "step": step + 1,
        "loss": loss_sum.item(),
        "lr": lr,
        "grad_norm": grad_norm.item(),
        f"{s.unit}_per_s": s.items_per_step() / dt,
        "step_time": dt,
        "optimizer_time": t2 - t1,
    }


@torch.no_grad()
def evaluate(s: Setup, model: nn.Module) -> dict[str, float]:
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    losses, correct, count = [], 0, 0
    if s.kind == "text":
        batches = (s.data.val_batch(i, s.cfg.batch_size, s.context) for i in range(max(s.cfg.eval_batches, 1)))
    else:
        pin = s.device.type == "cuda"
        batches = s.data.val_batches(
            s.cfg.batch_size, s.cfg.eval_batches, workers=s.workers, prefetch=s.cfg.prefetch, pin_memory=pin
        )
    for x, y in batches:
        x, y = x.to(s.device), y.to(s.device)
        with s.autocast():
            if s.kind == "text":
                losses.append(model(x, y)[1].item() * len(x))
            else:
                logits = model(x).float()
                losses.append(F.cross_entropy(logits, y, reduction="sum").item())
                correct += int((logits.argmax(-1) == y).sum())
        count += len(x)
    model.train(was_training)
    out = {"val_loss": sum(losses) / max(count, 1)}
    if s.kind == "image":
        out["val_acc"] = correct / max(count, 1)
    return out


# -- checkpoints ---------------------------------------------------------------------------------------


def checkpoint_state(s: Setup, model: nn.Module, opt: torch.optim.Optimizer, step: int) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "model_name": s.cfg.model,
        "model_config": asdict(s.model_cfg),
        "model": None if model is None else getattr(model, "module", model).state_dict(),
        "optimizer": None if opt is None else opt.state_dict(),
        # After a switch the state is not --optimizer's; checkpoints without this key predate switching.
        "optimizer_name": optimizer_after(s.cfg, step).optimizer,
        "config": asdict(s.cfg),
        "data_fingerprint": s.data.fingerprint,
    }


def save_checkpoint(s: Setup, model: nn.Module, opt: torch.optim.Optimizer, step: int, path: Path, main: bool) -> None:
    """Rank 0 writes ``path``; under --fsdp every rank first writes its shards to the DCP folder beside it and
    ``path`` holds everything else (collective then: call on every rank)."""
    if not s.cfg.fsdp:
        if main:
            atomic_save(checkpoint_state(s, model, opt, step), path)
        return
    from . import fsdp

    fsdp.save(model, opt, path.parent / fsdp.DCP_FOLDER)
    if main:
        meta = checkpoint_state(s, None, None, step)
        atomic_save({**meta, "dcp": fsdp.DCP_FOLDER}, path)


def load_checkpoint(path: str) -> dict:
    """A checkpoint file, or the ``ckpt.pt`` of a run folder (what ``--resume`` and analyze accept)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "ckpt.pt").is_file():
            raise TrainerError(f"run folder {path!r} holds no ckpt.pt (give the checkpoint file, or the run's out_dir)")
        p = p / "ckpt.pt"
    if not p.is_file():
        raise TrainerError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file or a foreign pickle: say which, not a traceback
        raise TrainerError(
            f"cannot read checkpoint {path!r}: {e.__class__.__name__}: {str(e).splitlines()[0][:200]}"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise TrainerError(f"{path!r} is not a rotkern trainer checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def restore(s: Setup, ckpt: dict, path: str, model: nn.Module, opt: torch.optim.Optimizer) -> int:
    """Load model and optimizer state; a checkpoint from another model or optimizer is a TrainerError."""
    if ckpt["model_name"] != s.cfg.model or ckpt["model_config"] != asdict(s.model_cfg):
        diff = {
            k: (v, asdict(s.model_cfg).get(k))
            for k, v in ckpt["model_config"].items()
            if asdict(s.model_cfg).get(k) != v
        }
        raise TrainerError(
            f"checkpoint {path!r} holds model {ckpt['model_name']!r} but this run builds {s.cfg.model!r}"
            + (f" (checkpoint vs run: {diff})" if diff else "")
        )
    step = int(ckpt["step"])
    saved_opt = ckpt.get("optimizer_name", ckpt["config"]["optimizer"])
    want = optimizer_after(s.cfg, step).optimizer
    rotated = {"rotated-eager", "rotated-fused", "soap"}
    if saved_opt != want and not {saved_opt, want} <= rotated:
        saved_cfg = ckpt["config"]
        if saved_opt == saved_cfg["optimizer"] and want == s.cfg.optimizer:
            raise TrainerError(f"checkpoint {path!r} was saved with --optimizer={saved_opt}, this run uses {want}")
        raise TrainerError(
            f"checkpoint {path!r} holds {saved_opt} state at step {step} (--optimizer={saved_cfg['optimizer']} "
            f"--switch_at={saved_cfg.get('switch_at', 0)} --switch_to={saved_cfg.get('switch_to', '')!r}), this run "
            f"has {want} there (--optimizer={s.cfg.optimizer} --switch_at={s.cfg.switch_at} "
            f"--switch_to={s.cfg.switch_to!r})"
        )
    if bool(ckpt.get("dcp")) != s.cfg.fsdp:
        raise TrainerError(
            f"checkpoint {path!r} was saved "
            + ("with --fsdp (sharded, in its ckpt_dcp/ folder): resume it with --fsdp under torchrun" if ckpt.get("dcp")
               else "without --fsdp: resume it without --fsdp")
        )  # fmt: skip
    if ckpt.get("dcp"):
        from . import fsdp

        folder = (Path(path) if Path(path).is_dir() else Path(path).parent) / ckpt["dcp"]
        try:
            fsdp.load(model, opt, folder)
        except (ValueError, KeyError, RuntimeError) as e:
            raise TrainerError(
                f"checkpoint {path!r} ({folder}) does not fit this run: {str(e).splitlines()[0]}"
            ) from None
        return step
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise TrainerError(f"checkpoint {path!r} does not fit the model: {str(e).splitlines()[0]}") from None
    try:
        opt.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        why = str(e).replace("build the optimizer with embedding=", "pass --embedding=")  # the CLI's spelling
        raise TrainerError(f"cannot resume from {path!r}: {why}") from None
    if ckpt.get("data_fingerprint") != s.data.fingerprint:
        print(
            f"warning: {path} was trained on other data (fingerprint {ckpt.get('data_fingerprint')} != "
            f"{s.data.fingerprint})"
        )
    return step


# -- the run -------------------------------------------------------------------------------------------


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def train(cfg: TrainConfig, on_step: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) one training run. Returns the per-step records, the eval records, the final record,
    the trained (unwrapped) model and the paths written."""
    rank, world, local_rank = _dist_env()
    ddp = world > 1
    if ddp and not torch.distributed.is_initialized():
        device = resolve_device(cfg.device, local_rank)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        result = _train(cfg, rank, world, local_rank, on_step)
        if ddp:
            # Every rank done (rank 0 writes last) before any tears gloo down: a rank that destroys its process
            # group while a peer still works can abort in gloo's teardown ("terminate called without an active
            # exception", seen under FSDP on a loaded CPU).
            torch.distributed.barrier()
        return result
    except RuntimeError as e:
        failure = worker_failure(e)  # a data-loading worker died: one error line, not a traceback
        if failure is None:
            raise
        raise failure from None
    finally:
        if ddp and torch.distributed.is_initialized():
            # Collective work objects still referenced (they hold tensors) are freed while gloo is alive, not by the
            # interpreter's finalisation after it, where freeing them can abort the process.
            gc.collect()
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, local_rank: int, on_step) -> dict:
    s = make_setup(cfg, rank, world, local_rank)
    main = rank == 0
    # out_dir="" writes nothing (no log, no checkpoint) unless resuming, which saves over the resumed file. A resumed
    # run's log continues beside its checkpoint (not in out_dir, whose default may hold another run's log).
    log_path, ckpt_path = _run_paths(cfg)
    save = cfg.save and ckpt_path is not None
    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    if ckpt is None and save and ckpt_path.exists():
        raise TrainerError(
            f"{ckpt_path} already exists; pass --resume={ckpt_path} to continue it or pick another out_dir"
        )
    model = s.build_model()
    if cfg.fsdp:
        from .fsdp import shard_model

        shard_model(model, s.device)
    # A checkpoint past switch_at holds the switched optimizer's state: build that one to load it into.
    active = optimizer_after(cfg, int(ckpt["step"]) if ckpt is not None else 0)
    opt = make_optimizer(active, model)
    start = restore(s, ckpt, cfg.resume, model, opt) if ckpt is not None else 0
    stop = cfg.stop_step or cfg.steps
    if start > stop:
        raise TrainerError(f"checkpoint {cfg.resume!r} is at step {start}, past the stop step {stop}")
    log = JsonlLog(log_path if main else None, append=ckpt is not None)
    n_params = sum(p.numel() for p in model.parameters())
    log.write(
        header(
            cfg,
            s.device,
            backend=optimizer_backend(opt),
            optimizer=optimizer_label(active),
            world_size=world,
            start_step=start,
            resumed_from=cfg.resume or None,
            data=s.data.description,
            data_fingerprint=s.data.fingerprint,
            model={"name": cfg.model, "params": n_params, **asdict(s.model_cfg)},
        )
    )
    if main and cfg.print_every:
        _print_start(cfg, s, n_params, world, start, stop, log_path)
    net = model
    if world > 1 and not cfg.fsdp:
        ids = [s.device.index] if s.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    records, evals = [], []
    t_start = time.perf_counter()
    try:
        s.start_loader(start, stop)
        for step in range(start, stop):
            switching = cfg.switch_at > 0 and step == cfg.switch_at
            if switching:
                opt, active = _switch(cfg, model, opt, step, log, main)
            # The update norm on both sides of the switch shows whether the new optimizer picked up where the old
            # one left off (a fresh Adam's first update is ~lr per coordinate); two parameter copies, once a run.
            watch = cfg.switch_at > 0 and step in (cfg.switch_at - 1, cfg.switch_at)
            before = [p.detach().clone() for p in model.parameters()] if watch else None
            rec = train_step(s, net, opt, step)
            rec["optimizer"] = optimizer_label(active)
            if before is not None:
                rec["update_norm"] = _distance(model, before)
            if step == start or switching:
                rec["backend"] = optimizer_backend(opt)
            if not math.isfinite(rec["loss"]):
                raise TrainerError(f"loss is {rec['loss']} at step {rec['step']}; lower --lr or enable --grad_clip")
            records.append(rec)
            log.write({"type": "step", **rec})
            done = rec["step"]
            # FSDP: every rank takes part in the forward passes (the params are all-gathered); rank 0 logs
            if (main or cfg.fsdp) and ((cfg.eval_every and done % cfg.eval_every == 0) or done == stop):
                ev = {"type": "eval", "step": done, **evaluate(s, model)}
                evals.append(ev)
                log.write(ev)
            if on_step is not None:
                on_step({**rec, **(evals[-1] if evals and evals[-1]["step"] == done else {})})
            if main and cfg.print_every and (done % cfg.print_every == 0 or done == stop):
                _print_step(cfg, rec, evals)
            if save and cfg.save_every and done % cfg.save_every == 0 and done != stop:
                save_checkpoint(s, model, opt, done, ckpt_path, main)
        final = _final(cfg, s, model, opt, records, evals, stop, t_start, world, save, ckpt_path, main)
        log.write(final)
    finally:
        s.stop_loader()
        log.close()
    return {
        "records": records,
        "evals": evals,
        "final": final,
        "model": model,
        "optimizer": opt,
        "log": str(log_path) if log_path else None,
        "checkpoint": str(ckpt_path) if save else None,
    }


def _run_paths(cfg: TrainConfig) -> tuple[Path | None, Path | None]:
    """(log.jsonl, ckpt.pt) of a run: beside the resumed checkpoint, else in out_dir (None: out_dir="")."""
    resume = Path(cfg.resume) / "ckpt.pt" if cfg.resume and Path(cfg.resume).is_dir() else Path(cfg.resume)
    log_dir = (resume.parent if cfg.resume else Path(cfg.out_dir)) if cfg.out_dir else None
    log_path = log_dir / "log.jsonl" if log_dir is not None else None
    ckpt_path = resume if cfg.resume else Path(cfg.out_dir) / "ckpt.pt" if cfg.out_dir else None
    return log_path, ckpt_path


def _print_start(cfg: TrainConfig, s: Setup, n_params: int, world: int, start: int, stop: int, log_path) -> None:
    """The console's first lines of a run."""
    print(f"train: {cfg.model} ({n_params / 1e6:.2f}M params) on {s.data.description}")
    print(
        f"       {cfg.optimizer} rotation={cfg.rotation}{_restriction(cfg)} block={cfg.block_size} seed={cfg.seed} "
        f"device={s.device} world={world} steps {start}->{stop} of {cfg.steps}; log {log_path}"
    )
    if cfg.switch_at:
        print(
            f"       switch to {optimizer_label(optimizer_after(cfg, cfg.switch_at + 1))} after step "
            f"{cfg.switch_at} ({cfg.switch_state})"
        )


def _switch(cfg: TrainConfig, model: nn.Module, opt, step: int, log: JsonlLog, main: bool):
    """Switch the optimizer after `step` updates: (the new optimizer, its config); the log gets a switch record."""
    t_switch = time.perf_counter()
    opt = switch_optimizer(cfg, model, opt)
    active = optimizer_after(cfg, step + 1)
    switch = {
        "type": "switch",
        "step": step,  # after this many updates; the next step record is the new optimizer's first
        "from": optimizer_label(cfg),
        "to": optimizer_label(active),
        "state": cfg.switch_state,
        "switch_time": time.perf_counter() - t_switch,
    }
    log.write(switch)
    if main and cfg.print_every:
        print(
            f"switch after step {step}: {switch['from']} -> {switch['to']} ({cfg.switch_state}, "
            f"{switch['switch_time']:.2f} s)"
        )
    return opt, active


def _print_step(cfg: TrainConfig, rec: dict, evals: list[dict]) -> None:
    """The console line of one step (with the validation metrics when it was evaluated)."""
    done = rec["step"]
    extra = (
        "".join(f" | {k} {v:.4f}" for k, v in evals[-1].items() if k.startswith("val"))
        if evals and evals[-1]["step"] == done
        else ""
    )
    print(
        f"step {done:6d}/{cfg.steps} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
        f"grad {rec['grad_norm']:.3f} | {rec['step_time'] * 1e3:7.1f} ms "
        f"(opt {rec['optimizer_time'] * 1e3:.1f}){extra}"
    )


def _final(cfg, s: Setup, model, opt, records, evals, stop: int, t_start: float, world: int, save, ckpt_path, main):
    """The final record (and the last checkpoint, when the run saves)."""
    final: dict[str, Any] = {
        "type": "final",
        "step": stop,
        "backend": optimizer_backend(opt),
        "wall_time": time.perf_counter() - t_start,
    }
    if records:
        final["loss"] = records[-1]["loss"]
    if evals:
        final.update({k: v for k, v in evals[-1].items() if k.startswith("val")})
    if world > 1 and not cfg.fsdp:
        final["ddp_max_param_diff"] = _rank_param_diff(model)
    if save:
        save_checkpoint(s, model, opt, stop, ckpt_path, main)
        final["checkpoint"] = str(ckpt_path)
    return final


def _restriction(cfg: TrainConfig) -> str:
    """The console's note of the rotation options that differ from the defaults (rotate_only=v, ...)."""
    keys = ("embedding", "split_qkv", "vectors", "rotate_only", "rotate_except")
    return "".join(f" {k}={getattr(cfg, k)}" for k in keys if getattr(cfg, k) != getattr(TrainConfig, k))


@torch.no_grad()
def _distance(model: nn.Module, before: list[torch.Tensor]) -> float:
    sq = sum(((p.detach().double() - b.double()) ** 2).sum() for p, b in zip(model.parameters(), before, strict=True))
    return float(sq) ** 0.5


@torch.no_grad()
def _rank_param_diff(model: nn.Module) -> float:
    """max |p - p_rank0| over all parameters and ranks (0 when the ranks agree exactly)."""
    flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])
    ref = flat.clone()
    torch.distributed.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
    return diff.item()

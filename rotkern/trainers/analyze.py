"""``rotkern analyze``: the paper's analyses (rotkern.metrics) on checkpoints of ``train`` / ``compare``.

Each input is a checkpoint (``ckpt.pt``), a run folder holding one, or a compare ``out_dir`` (every ``ckpt.pt``
below it); several inputs put their runs side by side. A run is labelled by its scope (the rotation of a
rotated-AdamW run, else the optimizer: adamw, soap, muon, sgdm) and seed from the checkpoint's saved config.

For each checkpoint the model and the optimizer it was trained with are rebuilt from the saved config (the one
in use at the checkpoint's step, after a ``--switch_at``), both states are loaded, and on the run's own data
(or ``--data``):

1. update orthogonality (paper Sec. 4.2): CV(A) of ``A = R^T m / (sqrt(v) + eps)`` (raw moments) per linear matrix,
   q/k/v split, embeddings excluded (:func:`rotkern.metrics.update_cv`), with the C.4 alternatives
   (:func:`rotkern.metrics.orthogonality_metrics`); averaged per layer type over depth and per run;
2. the L-infinity gradient bound of Alg 1 (:class:`rotkern.metrics.GradientBound`) over ``--batches`` T
   minibatches: micro-batch 0 of steps ``step .. step + T - 1`` of the run's batch stream (the batches the
   run would have seen next), in train mode (dropout as in training, with a fixed seed per batch; BatchNorm
   buffers are put back afterwards), the raw gradient (no clipping);
3. the spread of Adam's second moment v (raw exp_avg_sq, in the optimizer's basis): quantiles and a log10
   histogram (:func:`rotkern.metrics.second_moment_stats`);
4. with ``--hessian_rows N``: N rows of the Hessian of the rotated loss f(D^T w~), by HVPs averaged over
   ``--hvp_batches`` minibatches (:func:`rotkern.metrics.hessian_rows`), at flat ids (optimizer layout, linear
   matrices only) drawn from ``--hessian_seed``; each row's l1 norm, the (1,1)-norm estimate and the
   neuron / layer / other split (:func:`rotkern.metrics.row_partition`) of ``r_i . dw`` for a random unit
   direction dw and for the update dw = w_(t+1) - w_t of one more training step from the checkpoint;
5. with ``--resume_steps N`` (the paper's protocol, Sec. 4.2: resume from the checkpoint and log the CV every
   step): a fresh copy of the run (rebuilt from the checkpoint, as the optimizer it was trained with, so the
   measurements above are untouched) trains N more steps, ``step .. step + N - 1`` of its own batch stream
   (``train_step``: its lr schedule, clipping and gradient accumulation; past the schedule's end lr stays at
   min_lr), and after each step the CV of item 1 is measured again: per step the training step, its loss and
   lr, the mean CV over the matrices and the mean CV per layer type. The copy keeps the checkpoint's optimizer
   even where the run itself switched (``--switch_at``) inside those N steps (a note says so).

A torch AdamW run is measured through a RotatedAdamW with rotation ``none`` holding its moments (D = I, so the
state carries over exactly; in item 5 reloaded after every step); runs without Adam moments (sgdm,
rotated-sgdm, muon) get the gradient bound (and the Hessian) only: no CV, no CV trajectory.

Output in ``--out_dir`` (default ``analysis/`` in the first input's folder; an existing analysis.json there is
never overwritten): analysis.json, summary.md (tables and a sentence per ordering of the paper's Sec. 4.2 that these
runs can check; with ``--resume_steps``, per scope the CV at the first and last resumed step and its mean ± std over
the N steps), cv_by_layer.png, v_hist.png, with ``--resume_steps`` cv_trajectory.png (mean CV against the
training step, one line per run) and, when a baseline (none or adamw) is among several runs,
delta_loss_vs_delta_cv.png (paper Fig. 11). analysis.json holds each run's ``cv_trajectory`` (a list of
per-step records; null when off or when the run has no Adam moments).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from .. import metrics as M
from ..optim import RotatedAdamW, from_adamw_state
from ..optim._base import RotatedOptimizerBase
from ..scopes import ALL_SCOPES, param_groups_for
from .common import Range, TrainerError
from .train import (
    Setup,
    TrainConfig,
    evaluate,
    load_checkpoint,
    loss_of,
    make_optimizer,
    make_setup,
    optimizer_after,
    optimizer_label,
    train_step,
)

ANALYSIS_FORMAT = 1
BASELINE_SCOPES = ("none", "adamw")
ALTERNATIVES = ("scaled_deviation", "cv_gram", "scaled_gram", "svd_entropy")
LAYER_TYPES = (  # (pattern on the matrix name, layer type), first match wins
    (r"attn\.c_attn\.weight\[q\]$", "Q"),
    (r"attn\.c_attn\.weight\[k\]$", "K"),
    (r"attn\.c_attn\.weight\[v\]$", "V"),
    (r"attn\.c_proj\.weight$", "O"),
    (r"mlp\.c_fc\.weight$", "W1"),
    (r"mlp\.c_proj\.weight$", "W2"),
    # SimpleViT (models/vit.py): layers.<depth>.0 = attention, layers.<depth>.1 = LayerNorm, Linear, GELU, Linear
    (r"to_qkv\.weight\[q\]$", "Q"),
    (r"to_qkv\.weight\[k\]$", "K"),
    (r"to_qkv\.weight\[v\]$", "V"),
    (r"to_out\.weight$", "O"),
    (r"^layers\.\d+\.1\.1\.weight$", "W1"),
    (r"^layers\.\d+\.1\.3\.weight$", "W2"),
)


@dataclass
class AnalyzeConfig:
    out_dir: str = ""  # where the results go; "" = analysis/ in the first input's folder (never overwritten)
    batches: int = 20  # T minibatches for the gradient bound of Alg 1 (the paper's 1000)
    hessian_rows: int = 0  # N Hessian rows by HVP per checkpoint (paper Sec. 4.1, App. C.3); 0 = off
    hvp_batches: int = 1  # k minibatches each Hessian row is averaged over (the paper's 5000)
    hessian_seed: int = 0  # draws the flat ids of the rows (same model -> same ids for every run) and the random dw
    hessian_ids: str = ""  # comma-separated flat ids (optimizer layout) to use instead of drawn ones
    unbiased: bool = False  # CV with the sample std (n - 1) instead of the population std (the paper does not say)
    bins: int = 96  # histogram bins of log10 v
    v_log10_min: float = -24.0  # histogram range of log10 v
    v_log10_max: float = 0.0  # upper end of that range
    approx_tol: float = 0.1  # "output ~ none" holds when their mean CVs differ by at most this fraction of none's
    data: str = ""  # "" = each checkpoint's own data (its saved --data; embedded when that was "")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    plot: bool = True  # write the PNG figures (needs matplotlib)
    # With N > 0: from each checkpoint, a copy of the run (its own optimizer, the next N batches of its own stream)
    # trains N more optimizer steps and the update-orthogonality CV is logged after every step (the paper's
    # protocol, Sec. 4.2); an integer >= 0, 0 = off. Runs without Adam moments (sgdm, muon) get no trajectory.
    resume_steps: int = 0

    RANGES: ClassVar[dict[str, Range]] = {
        "batches": Range(1), "hessian_rows": Range(0), "hvp_batches": Range(1), "hessian_seed": Range(0),
        "bins": Range(1), "v_log10_min": Range(), "v_log10_max": Range(), "approx_tol": Range(0),
        "resume_steps": Range(0),
    }  # fmt: skip


# -- inputs ----------------------------------------------------------------------------------------------


def find_checkpoints(paths: Iterable[str]) -> list[Path]:
    """Checkpoint files from the inputs: a file as given, a folder's ckpt.pt, else every ckpt.pt below it."""
    found: list[Path] = []
    for text in paths:
        p = Path(text)
        if not p.exists():
            raise TrainerError(f"{text!r} does not exist (give a ckpt.pt, a run folder or a compare out_dir)")
        if p.is_file():
            hits = [p]
        elif (p / "ckpt.pt").is_file():
            hits = [p / "ckpt.pt"]
        else:
            hits = sorted(p.rglob("ckpt.pt"))
            if not hits:
                raise TrainerError(f"{text!r} holds no ckpt.pt (give a ckpt.pt, a run folder or a compare out_dir)")
        for h in hits:
            if h.resolve() not in {f.resolve() for f in found}:
                found.append(h)
    if not found:
        raise TrainerError("analyze needs at least one checkpoint, run folder or compare out_dir")
    return found


def default_out_dir(first_input: str) -> Path:
    p = Path(first_input)
    return (p.parent if p.is_file() else p) / "analysis"


def scope_of(cfg: TrainConfig) -> str:
    """The name compare gives this run: the rotation of a rotated-AdamW run, else the optimizer."""
    if cfg.optimizer in ("rotated-eager", "rotated-fused"):
        return cfg.rotation
    if cfg.optimizer == "rotated-sgdm":
        return f"rotated-sgdm:{cfg.rotation}"
    return cfg.optimizer


def run_scope(cfg: TrainConfig, step: int, keys: Iterable[str] = ()) -> str:
    """:func:`scope_of` the optimizer in use at ``step``; "<from>-><to>" for a run switched before it. ``keys``:
    per-run options (compare's variants and sweeps) that differ between the runs analysed side by side; each one
    this run sets away from TrainConfig's default is appended as ``,key=value``, so that e.g. ``layer`` and
    ``layer,rotate_only=v`` stay apart."""
    active = scope_of(optimizer_after(cfg, step))
    label = active if optimizer_after(cfg, step) is cfg else f"{scope_of(cfg)}->{active}"
    for key in keys:
        value = getattr(cfg, key)
        if value != getattr(TrainConfig, key):
            label += f",{key}={value}"
    return label


def varying_keys(cfgs: list[TrainConfig]) -> list[str]:
    """The per-run options (:data:`rotkern.trainers.compare.VARIANT_KEYS`) whose values differ between ``cfgs``."""
    from .compare import VARIANT_KEYS

    return [k for k in VARIANT_KEYS if len({repr(getattr(c, k)) for c in cfgs}) > 1]


def layer_type(name: str) -> str:
    """Q, K, V, O, W1, W2 for GPT's and SimpleViT's matrices; other names (ResNet's): the name with its first
    index (the block / stage) replaced by '*'."""
    for pattern, kind in LAYER_TYPES:
        if re.search(pattern, name):
            return kind
    return re.sub(r"(?<=\.)\d+(?=\.)", "*", name, count=1)


# -- progress --------------------------------------------------------------------------------------------


def progress(items: Iterable, total: int, desc: str) -> Iterator:
    """A tqdm progress bar on a TTY; nothing when stdout is not one (logs, CI)."""
    from tqdm import tqdm

    yield from tqdm(items, total=total, desc=f"  {desc}", leave=False, disable=not sys.stdout.isatty())


# -- rebuilding a run ------------------------------------------------------------------------------------


@dataclass
class Run:
    path: Path
    ckpt: dict
    cfg: TrainConfig  # the saved run config, with analyze's device / data
    active: TrainConfig  # the optimizer config in use at the checkpoint's step
    setup: Setup
    model: torch.nn.Module
    opt: Any  # the optimizer the run was trained with
    mopt: RotatedOptimizerBase  # what the metrics read: opt itself, or a rotation-none proxy
    adam: bool  # mopt holds Adam moments
    step: int
    notes: list[str]


def saved_config(ckpt: dict) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in names})


def rebuild(path: Path, ckpt: dict, acfg: AnalyzeConfig, *, math_attention: bool) -> Run:
    notes: list[str] = []
    saved = saved_config(ckpt)
    over: dict[str, Any] = dict(device=acfg.device, workers=0, out_dir="", resume="", stop_step=0)
    if acfg.data:
        over["data"] = acfg.data
    if math_attention and saved.attention != "math":
        over["attention"] = "math"  # HVPs need double backward: flash / efficient kernels have none
        notes.append(f"attention {saved.attention} -> math for the HVPs")
    cfg = dataclasses.replace(saved, **over)
    s = make_setup(cfg)
    if ckpt.get("data_fingerprint") != s.data.fingerprint:
        notes.append(f"analysed on other data than trained on ({s.data.description})")
    step = int(ckpt["step"])
    active = optimizer_after(cfg, step)
    if active is not cfg:
        notes.append(f"switched from {optimizer_label(cfg)} to {optimizer_label(active)} after step {cfg.switch_at}")
    model = s.build_model()
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise TrainerError(f"{path}: the checkpoint does not fit {cfg.model}: {str(e).splitlines()[0]}") from None
    saved_opt = ckpt.get("optimizer_name", active.optimizer)
    if saved_opt != active.optimizer:
        active = dataclasses.replace(active, optimizer=saved_opt)
    try:
        opt = make_optimizer(active, model)
    except TrainerError as e:
        if active.optimizer != "rotated-fused":
            raise
        active = dataclasses.replace(active, optimizer="rotated-eager")  # same state, same rotations
        opt = make_optimizer(active, model)
        notes.append(f"rotated-fused rebuilt as rotated-eager ({e})")
    try:
        opt.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise TrainerError(f"{path}: cannot load the optimizer state into {optimizer_label(active)}: {e}") from None
    if isinstance(opt, RotatedOptimizerBase):
        mopt, adam = opt, "exp_avg" in opt._moment_keys
    else:
        # The standard basis: a rotation-none RotatedAdamW over the same params (D = I), holding AdamW's moments.
        mopt = RotatedAdamW(
            param_groups_for(model, weight_decay=active.weight_decay),
            lr=active.lr,
            betas=(active.beta1, active.beta2),
            eps=active.eps,
            weight_decay=active.weight_decay,
            rotation="none",
        )
        adam = isinstance(opt, torch.optim.AdamW)
    if not adam:
        notes.append(f"{optimizer_label(active)} keeps no Adam moments: gradient bound (and Hessian) only")
    run = Run(path, ckpt, cfg, active, s, model, opt, mopt, adam, step, notes)
    load_proxy(run)
    return run


def load_proxy(run: Run) -> None:
    """Copy a torch AdamW's moments into its rotation-none proxy ``run.mopt`` (after every step it takes); nothing
    when the metrics read the optimizer itself or it keeps no Adam moments."""
    if run.adam and run.mopt is not run.opt:
        run.mopt.load_state_dict(from_adamw_state(run.mopt, run.opt))


def _params(run: Run) -> list[torch.Tensor]:
    return [p for g in run.mopt.param_groups for p in g["params"]]


class _TrainMode:
    """Train mode (dropout and BatchNorm as in training) under a forked RNG; on exit the model's buffers
    (BatchNorm's running statistics) and mode are put back, so the analyses leave the model as loaded. Wrap the
    backward passes too: BatchNorm's backward reads the buffers its forward saw."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        self.buffers = [b.detach().clone() for b in self.model.buffers()]
        devices = [p.device for p in self.model.parameters() if p.device.type == "cuda"][:1]
        self.rng = torch.random.fork_rng(devices=devices)
        self.rng.__enter__()
        self.model.train()
        return self

    def __exit__(self, *exc):
        self.rng.__exit__(*exc)
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), self.buffers, strict=True):
                b.copy_(saved)
        self.model.train(self.was)
        return False


def minibatch_loss(run: Run, b: int) -> torch.Tensor:
    """Loss of analysis minibatch b: micro-batch 0 of step ``step + b`` of the run's stream, with a seed of its own
    (dropout); call it inside ``_TrainMode(run.model)``."""
    x, y = run.setup.batch(run.step + b, 0)
    if x.is_floating_point():
        x = x.to(next(run.model.parameters()).dtype)
    torch.manual_seed(1_000_003 * run.cfg.seed + b)
    return loss_of(run.setup.kind, run.model, x, y)


# -- the analyses ----------------------------------------------------------------------------------------


def _mean(xs: Iterable[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return math.fsum(xs) / len(xs) if xs else None


def orthogonality(run: Run, acfg: AnalyzeConfig, *, alternatives: bool = True) -> dict | None:
    """Item 1: the CV (and with ``alternatives`` the C.4 scores) per matrix, per layer type and per run; None for
    a run without Adam moments. Without ``alternatives`` only the key cv (the same numbers, fewer to compute)."""
    if not run.adam:
        return None
    keys = ("cv", *ALTERNATIVES) if alternatives else ("cv",)

    def metric(a: torch.Tensor) -> dict[str, float]:
        if alternatives:
            return M.orthogonality_metrics(a, unbiased=acfg.unbiased)
        return {"cv": M.cv_singular_values(a, unbiased=acfg.unbiased)}

    per_matrix = M.update_cv(run.mopt, run.model, unbiased=acfg.unbiased, metric=metric)
    if not per_matrix:
        return None
    types: dict[str, list[str]] = {}
    for name in per_matrix:
        types.setdefault(layer_type(name), []).append(name)
    per_type = {t: {k: _mean(per_matrix[n][k] for n in names) for k in keys} for t, names in types.items()}
    for t, names in types.items():
        per_type[t]["matrices"] = len(names)
    cvs = [per_matrix[n]["cv"] for n in per_matrix]
    overall = {k: _mean(m[k] for m in per_matrix.values()) for k in keys}
    overall.update(cv_median=statistics.median(cvs), cv_max=max(cvs), cv_min=min(cvs), matrices=len(cvs))
    return {"per_matrix": per_matrix, "per_layer_type": per_type, "run": overall}


def gradient_bound(run: Run, batches: int) -> dict:
    params = _params(run)
    bound = M.GradientBound(run.mopt)
    per_batch = []
    t0 = time.perf_counter()
    with _TrainMode(run.model):
        for b in progress(range(batches), batches, "gradient bound"):
            grads = torch.autograd.grad(minibatch_loss(run, b), params, allow_unused=True)
            per_batch.append(bound.update(list(grads)))
    return {
        "value": bound.value,
        "batches": bound.count,
        "per_batch": per_batch,
        "steps": [run.step, run.step + batches - 1],
        "rows_per_batch": run.cfg.batch_size,
        "seconds": time.perf_counter() - t0,
    }


def second_moments(run: Run, acfg: AnalyzeConfig) -> dict | None:
    if not run.adam:
        return None
    return M.second_moment_stats(run.mopt, log10_range=(acfg.v_log10_min, acfg.v_log10_max), bins=acfg.bins)


def parse_ids(text: str) -> list[int]:
    try:
        return sorted({int(t) for t in text.split(",")})
    except ValueError:
        raise TrainerError(f"--hessian_ids={text!r}: give comma-separated integers") from None


def hessian_ids(layout: M.ParamLayout, acfg: AnalyzeConfig) -> list[int]:
    """``--hessian_ids``, else N distinct flat ids drawn uniformly over the linear (>= 2-D, non-embedding) params."""
    if acfg.hessian_ids.strip():
        ids = parse_ids(acfg.hessian_ids)
        for i in ids:
            if not 0 <= i < layout.numel:
                raise TrainerError(f"--hessian_ids: {i} is outside the model's flat ids [0, {layout.numel})")
        return ids
    spans = [
        (layout.starts[j], layout.starts[j + 1])
        for j, shape in enumerate(layout.shapes)
        if len(shape) >= 2 and layout.roles[j] != "embedding"
    ]
    if not spans:
        spans = [(0, layout.numel)]
    total = sum(b - a for a, b in spans)
    n = min(acfg.hessian_rows, total)
    gen = torch.Generator().manual_seed(acfg.hessian_seed)
    picked: set[int] = set()
    while len(picked) < n:
        for r in torch.randint(total, (n,), generator=gen).tolist():
            if len(picked) == n:
                break
            for a, b in spans:  # offset among the eligible ids -> flat id
                if r < b - a:
                    picked.add(a + r)
                    break
                r -= b - a
    return sorted(picked)


def update_delta(run: Run, acfg: AnalyzeConfig) -> list[torch.Tensor]:
    """dw = w_(t+1) - w_t of one more training step from the checkpoint, on a fresh copy of the run."""
    other = rebuild(run.path, run.ckpt, acfg, math_attention=False)
    before = [p.detach().clone() for p in _params(other)]
    train_step(other.setup, other.model, other.opt, other.step)
    return [p.detach() - b for p, b in zip(_params(other), before, strict=True)]


def hessian(run: Run, acfg: AnalyzeConfig, label: str) -> dict:
    params = _params(run)
    layout = M.ParamLayout.from_optimizer(run.mopt)
    ids = hessian_ids(layout, acfg)
    k = acfg.hvp_batches
    dtype = torch.float64 if len(ids) * layout.numel <= 1 << 27 else torch.float32
    t0 = time.perf_counter()
    with _TrainMode(run.model):
        M.hessian_rows(lambda b: minibatch_loss(run, b), params, ids[:1], num_batches=1, opt=run.mopt, dtype=dtype)
    one = time.perf_counter() - t0
    print(
        f"  [{label}] hessian: {len(ids)} rows x {k} minibatches; one HVP (with its forward and backward) took "
        f"{one:.3g} s, so about {one * len(ids) * k:.3g} s at most",
        flush=True,
    )
    bar = iter(progress(range(k), k, "hessian rows"))

    def loss_fn(b: int) -> torch.Tensor:
        next(bar, None)
        return minibatch_loss(run, b)

    t0 = time.perf_counter()
    with _TrainMode(run.model):
        rows = M.hessian_rows(loss_fn, params, ids, num_batches=k, opt=run.mopt, dtype=dtype)
    next(bar, None)
    seconds = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(acfg.hessian_seed + 1)
    rand = torch.randn(layout.numel, generator=gen, dtype=torch.float64)
    rand /= rand.norm()
    upd = torch.cat([t.reshape(-1).double().cpu() for t in M.to_rotated_basis(run.mopt, update_delta(run, acfg))])
    out_rows = []
    parts = {"split_qkv": run.cfg.split_qkv, "embedding": run.cfg.embedding}  # the run's own layer boundaries
    for r, i in enumerate(ids):
        row = rows[r].cpu()
        pos = layout.locate(i)
        out_rows.append(
            {
                "id": i,
                "param": pos.name,
                "row": pos.row,
                "col": pos.col,
                "l1": row.abs().double().sum().item(),
                "diagonal": row[i].item(),
                "random_dw": M.row_partition(row, rand, i, layout, **parts),
                "update_dw": M.row_partition(row, upd, i, layout, **parts),
            }
        )
    return {
        "ids": ids,
        "hvp_batches": k,
        "basis": "optimizer (rotated) layout: rows of D H D^T",
        "l11_estimate": M.l11_estimate(rows),
        "rows": out_rows,
        "mean_partition": {
            kind: {part: _mean(r[kind][part] for r in out_rows) for part in ("neuron", "layer", "other", "total")}
            for kind in ("random_dw", "update_dw")
        },
        "seconds_per_hvp": one,
        "seconds": seconds,
        "dtype": str(dtype).replace("torch.", ""),
    }


def cv_trajectory(run: Run, acfg: AnalyzeConfig) -> list[dict] | None:
    """Item 5, the paper's protocol: ``resume_steps`` more training steps from the checkpoint on a fresh copy of
    the run (``run`` itself is not touched), the CV after each. Per step: step (the training step just done, as in
    train's log), loss (its training loss), lr, grad_norm (before clipping), cv (mean over the matrices),
    cv_median and cv_per_layer_type. None when off or without Adam moments; notes go to ``run.notes``."""
    n = acfg.resume_steps
    if n < 1:
        return None
    if not run.adam:
        run.notes.append("no CV trajectory (--resume_steps): the optimizer keeps no Adam moments")
        return None
    cfg = run.cfg
    if cfg.switch_at and run.step <= cfg.switch_at < run.step + n:
        run.notes.append(
            f"the resumed steps keep {optimizer_label(run.active)}; the run itself switched to "
            f"{optimizer_label(optimizer_after(cfg, cfg.switch_at + 1))} after step {cfg.switch_at}"
        )
    if run.step + n > (cfg.decay_steps or cfg.steps):
        run.notes.append(f"resumed steps past the schedule's end (step {cfg.decay_steps or cfg.steps}) use min_lr")
    copy = rebuild(run.path, run.ckpt, acfg, math_attention=False)
    devices = [copy.setup.device] if copy.setup.device.type == "cuda" else []
    records = []
    with torch.random.fork_rng(devices=devices):  # dropout draws of its own; the caller's RNG is left as it was
        for step in progress(range(copy.step, copy.step + n), n, "resumed steps"):
            torch.manual_seed(2_000_003 * cfg.seed + step)
            rec = train_step(copy.setup, copy.model, copy.opt, step)
            load_proxy(copy)
            orth = orthogonality(copy, acfg, alternatives=False)
            records.append(
                {
                    "step": rec["step"],
                    "loss": rec["loss"],
                    "lr": rec["lr"],
                    "grad_norm": rec["grad_norm"],
                    "cv": orth["run"]["cv"] if orth else None,
                    "cv_median": orth["run"]["cv_median"] if orth else None,
                    "cv_per_layer_type": {t: v["cv"] for t, v in orth["per_layer_type"].items()} if orth else {},
                }
            )
            if not math.isfinite(rec["loss"]):
                run.notes.append(f"resumed step {rec['step']}: loss {rec['loss']}; the CV trajectory stops there")
                break
    return records


def final_loss(run: Run) -> dict:
    """The run's final losses at the checkpoint's step from its log.jsonl, else a fresh evaluation."""
    out: dict[str, Any] = {"train_loss": None, "val_loss": None, "source": None}
    log = run.path.parent / "log.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("step") != run.step:
                continue
            if rec.get("type") == "step":
                out["train_loss"] = rec.get("loss")
            elif rec.get("type") in ("eval", "final") and rec.get("val_loss") is not None:
                out["val_loss"] = rec["val_loss"]
            if rec.get("type") == "final" and rec.get("loss") is not None:
                out["train_loss"] = rec["loss"]
        if out["train_loss"] is not None or out["val_loss"] is not None:
            out["source"] = str(log)
    if out["val_loss"] is None:
        out["val_loss"] = evaluate(run.setup, run.model)["val_loss"]
        out["source"] = (out["source"] + " + " if out["source"] else "") + "evaluated now"
    return out


# -- the command -----------------------------------------------------------------------------------------


def analyze(paths: list[str], acfg: AnalyzeConfig) -> dict:
    """Analyse the checkpoints found under ``paths`` (see the module docstring); returns analysis.json's dict."""
    for key in ("batches", "hvp_batches", "bins"):
        if getattr(acfg, key) < 1:
            raise TrainerError(f"--{key} must be >= 1, got {getattr(acfg, key)}")
    for key in ("hessian_rows", "resume_steps"):
        if getattr(acfg, key) < 0:
            raise TrainerError(f"--{key} must be >= 0, got {getattr(acfg, key)}")
    if not acfg.v_log10_min < acfg.v_log10_max:
        raise TrainerError("--v_log10_min must be below --v_log10_max")
    if acfg.hessian_ids.strip():
        parse_ids(acfg.hessian_ids)
    found = find_checkpoints(paths)
    out = Path(acfg.out_dir) if acfg.out_dir else default_out_dir(paths[0])
    if (out / "analysis.json").exists():
        raise TrainerError(f"{out / 'analysis.json'} already exists; pick another --out_dir or remove it")
    ckpts = [(p, load_checkpoint(str(p))) for p in found]
    keys = varying_keys([saved_config(ckpt) for _, ckpt in ckpts])
    labels = _labels(ckpts, keys)
    want_hessian = acfg.hessian_rows > 0 or bool(acfg.hessian_ids.strip())
    print(f"analyze: {len(ckpts)} checkpoint(s) -> {out}", flush=True)
    runs = []
    for (path, ckpt), label in zip(ckpts, labels, strict=True):
        t0 = time.perf_counter()
        run = rebuild(path, ckpt, acfg, math_attention=want_hessian)
        n_params = sum(p.numel() for p in run.model.parameters())
        what = f"{run.cfg.model} ({n_params / 1e6:.2f}M params), {optimizer_label(run.active)}, step {run.step}"
        result: dict[str, Any] = {
            "label": label,
            "scope": run_scope(run.cfg, run.step, keys),
            "optimizer": optimizer_label(run.active),
            "seed": run.cfg.seed,
            "checkpoint": str(path),
            "step": run.step,
            "model": run.cfg.model,
            "block_size": run.cfg.block_size,
            "data": run.setup.data.description,
            "notes": run.notes,
        }
        result["loss"] = final_loss(run)
        result["orthogonality"] = orthogonality(run, acfg)
        result["gradient_bound"] = gradient_bound(run, acfg.batches)
        result["second_moment"] = second_moments(run, acfg)
        result["hessian"] = hessian(run, acfg, label) if want_hessian else None
        result["cv_trajectory"] = cv_trajectory(run, acfg)  # last: a copy of the run trains on
        orth, traj = result["orthogonality"], result["cv_trajectory"]
        cv = f"mean CV {orth['run']['cv']:.4f}, " if orth else ""
        if traj:
            cv += f"after {len(traj)} resumed steps {_f(traj[0]['cv'])} -> {_f(traj[-1]['cv'])}, "
        print(
            f"  [{label}] {what}: {cv}gradient bound {result['gradient_bound']['value']:.4g} "
            f"({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
        runs.append(result)
    scopes = aggregate_scopes(runs)
    orderings = all_orderings(scopes, acfg.approx_tol)
    analysis: dict[str, Any] = {
        "format": ANALYSIS_FORMAT,
        "config": dataclasses.asdict(acfg),
        "inputs": list(paths),
        "runs": runs,
        "scopes": scopes,
        "baselines": {model: _baseline(rows) for model, rows in by_model(scopes).items()},
        "orderings": orderings,
        "figures": [],
    }
    analysis["delta_points"] = delta_points(analysis)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "analysis.json").exists():  # written meanwhile by another analyze
        raise TrainerError(f"{out / 'analysis.json'} already exists; pick another --out_dir or remove it")
    if acfg.plot:
        analysis["figures"] = plot(analysis, out)
    summary = summary_md(analysis)
    (out / "summary.md").write_text(summary)
    (out / "analysis.json").write_text(json.dumps(_clean(analysis), indent=2, allow_nan=False))
    print(console_summary(summary, len(runs)))
    print(f"analysis: {out / 'analysis.json'}, {out / 'summary.md'}" + "".join(f", {f}" for f in analysis["figures"]))
    return analysis


def _clean(x: Any) -> Any:
    """JSON-ready: nan / inf -> None (strict JSON has neither), dict keys -> str, tuples -> lists."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if torch.is_tensor(x):
        return _clean(x.tolist())
    return x


def _labels(ckpts: list[tuple[Path, dict]], keys: Iterable[str] = ()) -> list[str]:
    """``scope seedS``; made unique by the run's folder where two checkpoints would share a label."""
    base = []
    for _, ckpt in ckpts:
        cfg = saved_config(ckpt)
        base.append(f"{run_scope(cfg, int(ckpt['step']), keys)} seed{cfg.seed}")
    out = []
    for (path, _), label in zip(ckpts, base, strict=True):
        out.append(label if base.count(label) == 1 else f"{label} ({path.parent})")
    return out


def aggregate_scopes(runs: list[dict]) -> dict[str, dict]:
    """Per scope (per model and scope when the runs hold several models: key "<model> <scope>"), over its seeds:
    mean and sample std of the run-level numbers, and the per-layer-type CV."""
    scopes: dict[str, dict] = {}
    multi = len({r["model"] for r in runs}) > 1
    for model, scope in dict.fromkeys((r["model"], r["scope"]) for r in runs):
        mine = [r for r in runs if (r["model"], r["scope"]) == (model, scope)]
        row: dict[str, Any] = {
            "model": model,
            "scope": scope,
            "n": len(mine),
            "seeds": [r["seed"] for r in mine],
            "labels": [r["label"] for r in mine],
        }
        values = {
            "cv": [r["orthogonality"]["run"]["cv"] if r["orthogonality"] else None for r in mine],
            **{k: [r["orthogonality"]["run"][k] if r["orthogonality"] else None for r in mine] for k in ALTERNATIVES},
            "gradient_bound": [r["gradient_bound"]["value"] for r in mine],
            "val_loss": [r["loss"]["val_loss"] for r in mine],
            "train_loss": [r["loss"]["train_loss"] for r in mine],
            "v_median": [r["second_moment"]["pooled"]["quantiles"][0.5] if r["second_moment"] else None for r in mine],
            "l11_estimate": [r["hessian"]["l11_estimate"] if r["hessian"] else None for r in mine],
        }
        for key, xs in values.items():
            xs = [x for x in xs if x is not None and math.isfinite(x)]
            row[key] = statistics.fmean(xs) if xs else None
            row[f"{key}_std"] = statistics.stdev(xs) if len(xs) > 1 else None
        types: dict[str, list[float]] = {}
        for r in mine:
            for t, v in (r["orthogonality"] or {}).get("per_layer_type", {}).items():
                types.setdefault(t, []).append(v["cv"])
        row["cv_per_layer_type"] = {t: _mean(v) for t, v in types.items()}
        row["resumed"] = resumed_summary([r.get("cv_trajectory") for r in mine])
        scopes[f"{model} {scope}" if multi else scope] = row
    return scopes


def resumed_summary(trajectories: list[list[dict] | None]) -> dict | None:
    """One scope's CV trajectories (item 5), its seeds averaged step by step (the k-th resumed step of each):
    the CV and loss at the first and last resumed step, and the mean and sample std over the steps of that
    seed-averaged CV. None when no run of the scope has one."""
    trajs = [t for t in trajectories if t]
    if not trajs:
        return None
    n = min(len(t) for t in trajs)
    cv = [_mean(t[k]["cv"] for t in trajs) for k in range(n)]
    loss = [_mean(t[k]["loss"] for t in trajs) for k in range(n)]
    finite = [x for x in cv if x is not None]
    return {
        "runs": len(trajs),
        "steps": n,
        "first_step": [t[0]["step"] for t in trajs],
        "last_step": [t[n - 1]["step"] for t in trajs],
        "cv": cv,
        "cv_first": cv[0],
        "cv_last": cv[-1],
        "cv_mean": statistics.fmean(finite) if finite else None,
        "cv_std": statistics.stdev(finite) if len(finite) > 1 else None,
        "loss_first": loss[0],
        "loss_last": loss[-1],
    }


def by_model(scopes: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """{model: {scope: row}} from :func:`aggregate_scopes`' rows."""
    out: dict[str, dict[str, dict]] = {}
    for row in scopes.values():
        out.setdefault(row["model"], {})[row["scope"]] = row
    return out


def _baseline(scopes: dict[str, dict]) -> str | None:
    """none, else adamw, among one model's scopes (with a CV)."""
    return next((b for b in BASELINE_SCOPES if b in scopes and scopes[b]["cv"] is not None), None)


def all_orderings(scopes: dict[str, dict], tol: float) -> list[dict]:
    """:func:`check_orderings` for each model's scopes; the sentences name the model when there are several."""
    models = by_model(scopes)
    out = []
    for model, rows in models.items():
        for o in check_orderings(rows, tol):
            o["model"] = model
            if len(models) > 1:
                o["sentence"] = f"{model}: {o['sentence']}"
            out.append(o)
    return out


def check_orderings(scopes: dict[str, dict], tol: float) -> list[dict]:
    """The paper's (Sec. 4.2) orderings of the mean CV over scopes (seed means): each with holds True / False,
    or None (with the reason) when these runs cannot check it."""
    cv = {s: r["cv"] for s, r in scopes.items() if r["cv"] is not None}
    out = []

    def add(claim: str, holds: bool | None, sentence: str) -> None:
        out.append({"claim": claim, "holds": holds, "sentence": sentence})

    fmt = ", ".join(f"{s} {v:.4f}" for s, v in sorted(cv.items(), key=lambda kv: kv[1]))
    claim = "CV is lowest for svd"
    if "svd" in cv and len(cv) > 1:
        holds = min(cv, key=cv.get) == "svd"
        add(claim, holds, f"{claim}: {'holds' if holds else 'does not hold'} here (mean CV {fmt}).")
    else:
        add(claim, None, f"{claim}: not checkable here (needs an svd run and another run with Adam moments).")
    claim = "CV of output ≈ none"
    base = "none" if "none" in cv else "adamw" if "adamw" in cv else None
    if "output" in cv and base is not None:
        rel = abs(cv["output"] - cv[base]) / abs(cv[base]) if cv[base] else math.inf
        holds = rel <= tol
        add(
            claim,
            holds,
            f"{claim}: {'holds' if holds else 'does not hold'} here (output {cv['output']:.4f} vs {base} "
            f"{cv[base]:.4f}, {100 * rel:.1f} % apart; tolerance {100 * tol:.0f} %).",
        )
    else:
        add(claim, None, f"{claim}: not checkable here (needs an output run and a none or adamw run).")
    claim = "CV is highest for global"
    if "global" in cv and len(cv) > 1:
        holds = max(cv, key=cv.get) == "global"
        add(claim, holds, f"{claim}: {'holds' if holds else 'does not hold'} here (mean CV {fmt}).")
    else:
        add(claim, None, f"{claim}: not checkable here (needs a global run and another run with Adam moments).")
    claim = "the CV ranking matches the loss ranking"
    both = {s: (cv[s], scopes[s]["val_loss"]) for s in cv if scopes[s]["val_loss"] is not None}
    if len(both) >= 3:
        by_cv = sorted(both, key=lambda s: both[s][0])
        by_loss = sorted(both, key=lambda s: both[s][1])
        holds = by_cv == by_loss
        add(
            claim,
            holds,
            f"{claim}: {'holds' if holds else 'does not hold'} here (by CV: {' < '.join(by_cv)}; by final val "
            f"loss: {' < '.join(by_loss)}).",
        )
    else:
        add(claim, None, f"{claim}: not checkable here (needs three or more scopes with a CV and a loss).")
    return out


# -- report ----------------------------------------------------------------------------------------------


def _f(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _pm(row: dict, key: str, spec: str = ".4f") -> str:
    if row[key] is None:
        return "—"
    std = row.get(f"{key}_std")
    return format(row[key], spec) + ("" if std is None else f" ± {format(std, spec)}")


def console_summary(summary: str, n_runs: int) -> str:
    """What the console shows of summary.md: all of it for a few runs; past 5, the per-run tables stay in the
    file (the per-scope table, the orderings and the notes are printed)."""
    if n_runs <= 5:
        return summary
    per_run = ("## Runs", "## CV per layer type")
    sections = re.split(r"\n(?=## )", summary)
    kept = [x for x in sections[1:] if not x.startswith(per_run)]
    return "\n".join(["(per-run tables in summary.md)", "", *kept])


def summary_md(a: dict) -> str:
    runs = a["runs"]
    lines = ["# Analysis", ""]
    lines += _runs_md(a)
    lines += _scopes_md(a)
    lines += _hessian_md(runs)
    lines += ["", "## Orderings of the paper (Sec. 4.2, App. C.4)", ""]
    lines += [f"- {o['sentence']}" for o in a["orderings"]]
    notes = [f"- {r['label']}: {n}" for r in runs for n in r["notes"]]
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def _runs_md(a: dict) -> list[str]:
    """summary.md's per-run table, its legend and the CV per layer type."""
    runs = a["runs"]
    lines: list[str] = []
    lines += [
        "## Runs",
        "",
        "| run | optimizer | step | val loss | train loss | mean CV | median CV | scaled dev. | CV(AAᵀ) | "
        "scaled AAᵀ | SVD entropy | grad bound C~ | median v | v q0.01 | v q0.99 |",
        "|" + "---|" * 15,
    ]
    for r in runs:
        o = (r["orthogonality"] or {}).get("run", {})
        q = r["second_moment"]["pooled"]["quantiles"] if r["second_moment"] else {}
        lines.append(
            f"| {r['label']} | {r['optimizer']} | {r['step']} | {_f(r['loss']['val_loss'])} | "
            f"{_f(r['loss']['train_loss'])} | {_f(o.get('cv'))} | {_f(o.get('cv_median'))} | "
            f"{_f(o.get('scaled_deviation'))} | {_f(o.get('cv_gram'))} | {_f(o.get('scaled_gram'))} | "
            f"{_f(o.get('svd_entropy'))} | {_f(r['gradient_bound']['value'], '.4g')} | {_f(q.get(0.5), '.3g')} | "
            f"{_f(q.get(0.01), '.3g')} | {_f(q.get(0.99), '.3g')} |"
        )
    lines += [
        "",
        f"CV = std / mean of the singular values of A = Rᵀ m / (√v + ε) (raw moments; "
        f"{'sample' if a['config']['unbiased'] else 'population'} std), averaged over the linear matrices "
        "(q/k/v split, embeddings excluded); the C.4 alternatives likewise (SVD entropy: 1 = orthogonal). "
        f"Gradient bound: max over {a['config']['batches']} minibatches of ‖R g‖∞ (Alg 1). v: raw exp_avg_sq "
        "pooled over all parameters, in the optimizer's basis.",
    ]
    types = list(dict.fromkeys(t for r in runs for t in ((r["orthogonality"] or {}).get("per_layer_type", {}))))
    if types:
        lines += ["", "## CV per layer type (mean over depth)", "", "| run | " + " | ".join(types) + " |"]
        lines.append("|" + "---|" * (len(types) + 1))
        for r in runs:
            per = (r["orthogonality"] or {}).get("per_layer_type", {})
            lines.append(f"| {r['label']} | " + " | ".join(_f(per.get(t, {}).get("cv")) for t in types) + " |")
    return lines


def _scopes_md(a: dict) -> list[str]:
    """summary.md's per-scope table and the CV over resumed training steps."""
    scopes = a["scopes"]
    lines: list[str] = []
    if any(s["n"] > 1 for s in scopes.values()) or len(scopes) > 1:
        lines += [
            "",
            "## Per scope (mean ± sample std over seeds)",
            "",
            "| scope | n | mean CV | grad bound C~ | val loss | median v |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in scopes.items():
            lines.append(
                f"| {name} | {s['n']} | {_pm(s, 'cv')} | {_pm(s, 'gradient_bound', '.4g')} | {_pm(s, 'val_loss')} | "
                f"{_pm(s, 'v_median', '.3g')} |"
            )
    resumed = {name: s for name, s in scopes.items() if s.get("resumed")}
    if resumed:
        lines += [
            "",
            f"## CV over {a['config']['resume_steps']} resumed training steps (the paper's protocol)",
            "",
            "| scope | n | resumed steps | CV at checkpoint | CV first step | CV last step | mean CV ± std over "
            "steps | train loss first → last |",
            "|" + "---|" * 8,
        ]
        for name, s in resumed.items():
            t = s["resumed"]
            first, last = sorted(set(t["first_step"])), sorted(set(t["last_step"]))
            span = f"{first[0]}–{last[-1]}" if len(first) == len(last) == 1 else f"{t['steps']} each"
            mean = _f(t["cv_mean"]) + ("" if t["cv_std"] is None else f" ± {_f(t['cv_std'])}")
            lines.append(
                f"| {name} | {t['runs']} | {span} | {_pm(s, 'cv')} | {_f(t['cv_first'])} | {_f(t['cv_last'])} | "
                f"{mean} | {_f(t['loss_first'])} → {_f(t['loss_last'])} |"
            )
        lines += [
            "",
            "From each checkpoint a copy of the run trained on (its own optimizer and batch stream) and the mean CV "
            "over the matrices was measured after every step; with several seeds the CVs are averaged per resumed "
            "step first, and ± is the sample std over the steps. CV at checkpoint: the table above (± over seeds).",
        ]
    return lines


def _hessian_md(runs: list[dict]) -> list[str]:
    """summary.md's Hessian rows table (runs that measured them)."""
    lines: list[str] = []
    hess = [r for r in runs if r["hessian"]]
    if hess:
        lines += [
            "",
            "## Hessian rows (rotated loss, optimizer layout)",
            "",
            "| run | rows | minibatches | ‖H‖₁,₁/d estimate | update dw: neuron | layer | other | random dw: neuron | "
            "layer | other |",
            "|" + "---|" * 10,
        ]
        for r in hess:
            h = r["hessian"]
            u, d = h["mean_partition"]["update_dw"], h["mean_partition"]["random_dw"]
            lines.append(
                f"| {r['label']} | {len(h['ids'])} | {h['hvp_batches']} | {_f(h['l11_estimate'], '.4g')} | "
                + " | ".join(_f(x[k], ".3e") for x in (u, d) for k in ("neuron", "layer", "other"))
                + " |"
            )
        lines += [
            "",
            "Row i's r_i · dw split into I_N (same output neuron), I_L (rest of the layer) and I_¬L (other layers), "
            "averaged over the rows; update dw = one more training step from the checkpoint, random dw = a random "
            "unit vector.",
        ]
    return lines


def _by_scope(runs: list[dict]) -> dict[str, list[dict]]:
    """Runs grouped by scope (and model, where several are analysed), in order of appearance: one colour each."""
    models = len({r["model"] for r in runs}) > 1
    # Fig. 1's order (none, output, input, layer, global), then the other scopes and baselines as they come.
    paper = ("none", "output", "input", "layer", "global")
    order = {s: k for k, s in enumerate(dict.fromkeys((*paper, *ALL_SCOPES)))}
    groups: dict[str, list[dict]] = {}
    for r in sorted(runs, key=lambda r: (r["model"], order.get(r["scope"].split()[0], len(order)))):
        groups.setdefault(_scope_name(r, models), []).append(r)
    return groups


def _scope_name(r: dict, models: bool) -> str:
    return f"{r['model']} {r['scope']}" if models else r["scope"]


def _colours(names: Iterable[str], plt) -> dict[str, Any]:
    names = list(names)
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {n: cmap(k % cmap.N) for k, n in enumerate(names)}


def _seeds_text(groups: dict[str, list[dict]], spread: bool = True) -> str:
    counts = sorted({len(g) for g in groups.values()})
    n = "/".join(map(str, counts))
    how = "; mean ± std over seeds" if spread else "; bold: mean over seeds"
    return f"{n} seed{'s' if counts != [1] else ''} per scope" + (how if counts[-1] > 1 else "")


def _plot_cv_by_layer(runs: list[dict], model: str, plt, colours: dict):
    groups = _by_scope(runs)
    types = list(dict.fromkeys(t for r in runs for t in r["orthogonality"]["per_layer_type"]))
    fig, ax = plt.subplots(figsize=(min(max(7.0, 0.16 * len(types) * len(groups) + 2.5), 14.0), 4.8))
    width = 0.8 / len(groups)
    for k, (name, rs) in enumerate(groups.items()):
        xs = [i - 0.4 + width * (k + 0.5) for i in range(len(types))]
        per_seed = [[_type_cv(r, t) for r in rs] for t in types]
        means = [_nanmean(v) for v in per_seed]
        errs = [_nanstd(v) if len(rs) > 1 else 0.0 for v in per_seed]
        ax.bar(xs, means, width, yerr=errs if len(rs) > 1 else None, capsize=2, label=name, color=colours[name],
               error_kw={"lw": 0.8})  # fmt: skip
    ax.set_xticks(range(len(types)), types, rotation=30 if max(map(len, types)) > 4 else 0, ha="right")
    ax.set(xlabel="layer type", ylabel="CV of the singular values of A\n(mean over depth; dimensionless)")
    ax.set_title(f"{model}: update orthogonality per layer type, lower = closer to orthogonal\n"
                 f"({_seeds_text(groups)})", fontsize=10)  # fmt: skip
    top = max((m + e for name, rs in groups.items() for m, e in _bar_tops(rs, types)), default=1.0)
    ax.set_ylim(0, top * 1.25)  # room above the bars for the legend
    ax.legend(fontsize=8, title="scope", title_fontsize=8, ncol=min(len(groups), 5), loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def _bar_tops(rs: list[dict], types: list[str]):
    for t in types:
        v = [_type_cv(r, t) for r in rs]
        m = _nanmean(v)
        if not math.isnan(m):
            yield m, _nanstd(v)


def _type_cv(r: dict, t: str) -> float:
    per = r["orthogonality"]["per_layer_type"]
    return per[t]["cv"] if t in per and per[t]["cv"] is not None else math.nan


def _nanmean(xs: list[float]) -> float:
    ok = [x for x in xs if not math.isnan(x)]
    return sum(ok) / len(ok) if ok else math.nan


def _nanstd(xs: list[float]) -> float:
    ok = [x for x in xs if not math.isnan(x)]
    if len(ok) < 2:
        return 0.0
    m = sum(ok) / len(ok)
    return math.sqrt(sum((x - m) ** 2 for x in ok) / (len(ok) - 1))


def _plot_cv_trajectory(truns: list[dict], model: str, plt, colours: dict):
    groups = _by_scope(truns)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, rs in groups.items():
        c = colours[name]
        for r in rs:  # each seed faint, its checkpoint's own CV as an open circle
            traj = r["cv_trajectory"]
            ax.plot([t["step"] for t in traj], [math.nan if t["cv"] is None else t["cv"] for t in traj], lw=0.8,
                    alpha=0.35 if len(rs) > 1 else 1.0, color=c)  # fmt: skip
            if r["orthogonality"]:
                ax.plot([r["step"]], [r["orthogonality"]["run"]["cv"]], "o", mfc="none", color=c, alpha=0.6)
        if len(rs) > 1 and len({len(r["cv_trajectory"]) for r in rs}) == 1:
            steps = [t["step"] for t in rs[0]["cv_trajectory"]]
            mean = [_nanmean([math.nan if r["cv_trajectory"][i]["cv"] is None else r["cv_trajectory"][i]["cv"]
                              for r in rs]) for i in range(len(steps))]  # fmt: skip
            ax.plot(steps, mean, lw=2.0, color=c, label=f"{name} (mean of {len(rs)})")
        else:
            ax.plot([], [], lw=1.5, color=c, label=name)
    ax.set(xlabel="training step", ylabel="mean CV of the singular values of A\n(over the matrices; dimensionless)")
    n = max(len(r["cv_trajectory"]) for r in truns)
    ax.set_title(f"{model}: update-orthogonality CV after each of {n} steps resumed from each checkpoint\n"
                 f"(thin: one seed; open circle: the checkpoint's own CV; {_seeds_text(groups, spread=False)})",
                 fontsize=9)  # fmt: skip
    ax.legend(fontsize=8, title="scope", title_fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _plot_v_hist(vruns: list[dict], model: str, plt, colours: dict):
    groups = _by_scope(vruns)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    used, edges = [], None
    for name, rs in groups.items():
        fractions = []
        for r in rs:
            sm = r["second_moment"]
            edges = [10.0**e for e in sm["edges"]]
            counts = sm["pooled"]["counts"]
            total = max(sum(counts), 1)
            fractions.append([c / total for c in counts])
            used += [i for i, c in enumerate(counts) if c]
            if len(rs) > 1:
                ax.stairs(fractions[-1], edges, lw=0.6, alpha=0.35, color=colours[name])
        mean = [sum(col) / len(col) for col in zip(*fractions, strict=True)]
        label = f"{name} (mean of {len(rs)})" if len(rs) > 1 else name
        ax.stairs(mean, edges, lw=1.8, color=colours[name], label=label)
    ax.set_xscale("log")
    if used and edges:  # zoom on the occupied bins
        ax.set_xlim(edges[max(min(used) - 1, 0)], edges[min(max(used) + 2, len(edges) - 1)])
    ax.set(xlabel="v (raw exp_avg_sq in the optimizer's basis; squared gradient units)",
           ylabel="fraction of entries per bin")  # fmt: skip
    ax.set_title(f"{model}: distribution of Adam's second moment v at the checkpoint\n"
                 f"(thin: one seed; {_seeds_text(groups, spread=False)})", fontsize=10)  # fmt: skip
    ax.legend(fontsize=8, title="scope", title_fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _plot_delta(points: list[dict], runs: list[dict], model: str, plt, colours: dict):
    models = len({x["model"] for x in runs}) > 1
    scope_of = {r["label"]: _scope_name(r, models) for r in runs}
    names = [n for n in colours if any(scope_of.get(p["label"]) == n for p in points)]
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for name in names:
        mine = [p for p in points if scope_of.get(p["label"], p["label"]) == name]
        ax.scatter([p["delta_cv"] for p in mine], [p["delta_loss"] for p in mine], color=colours[name],
                   label=f"{name} ({len(mine)} seed{'s' if len(mine) > 1 else ''})")  # fmt: skip
    ax.axhline(0, color="gray", lw=0.5)
    ax.axvline(0, color="gray", lw=0.5)
    loss = " / ".join(dict.fromkeys(p["loss_kind"] for p in points))
    base = " / ".join(dict.fromkeys(p["baseline"] for p in points))
    ax.set(xlabel=f"Δ mean CV (run − '{base}', same seed; dimensionless)",
           ylabel=f"Δ final {loss} (run − '{base}', nats)")  # fmt: skip
    ax.set_title(f"{model}: Δ{loss} vs ΔCV relative to '{base}' (paper Fig. 11)", fontsize=10)
    ax.legend(fontsize=8, title="scope", title_fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot(a: dict, out: Path) -> list[str]:
    """The PNG figures of an analysis (one colour per scope, seeds averaged); returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no figures (pip install matplotlib)")
        return []
    model = ", ".join(dict.fromkeys(r["model"] for r in a["runs"]))
    colours = _colours(_by_scope(a["runs"]), plt)  # one colour per scope, the same in every figure
    written = []
    runs = [r for r in a["runs"] if r["orthogonality"]]
    if runs:
        written.append(_save(_plot_cv_by_layer(runs, model, plt, colours), out / "cv_by_layer.png", plt))
    truns = [r for r in a["runs"] if r.get("cv_trajectory")]
    if truns:
        written.append(_save(_plot_cv_trajectory(truns, model, plt, colours), out / "cv_trajectory.png", plt))
    vruns = [r for r in a["runs"] if r["second_moment"]]
    if vruns:
        written.append(_save(_plot_v_hist(vruns, model, plt, colours), out / "v_hist.png", plt))
    if a["delta_points"]:
        fig = _plot_delta(a["delta_points"], a["runs"], model, plt, colours)
        written.append(_save(fig, out / "delta_loss_vs_delta_cv.png", plt))
    return written


def delta_points(a: dict) -> list[dict]:
    """Fig. 11's points: each non-baseline run against the baseline run of its model and seed (else the mean of
    its model's baseline runs); the loss is the final val loss (train loss where some run lacks one)."""
    points = []
    for model, base in a["baselines"].items():
        runs = [r for r in a["runs"] if r["orthogonality"] and r["model"] == model]
        if base is None or len(runs) < 2:
            continue
        kind = "val_loss" if all(r["loss"]["val_loss"] is not None for r in runs) else "train_loss"
        if any(r["loss"][kind] is None for r in runs):
            continue
        bases = {r["seed"]: r for r in runs if r["scope"] == base}
        mean_cv = _mean(r["orthogonality"]["run"]["cv"] for r in bases.values())
        mean_loss = _mean(r["loss"][kind] for r in bases.values())
        for r in runs:
            if r["scope"] == base:
                continue
            b = bases.get(r["seed"])
            ref_cv, ref_loss = (b["orthogonality"]["run"]["cv"], b["loss"][kind]) if b else (mean_cv, mean_loss)
            points.append(
                {
                    "model": model,
                    "label": r["label"],
                    "baseline": base,
                    "delta_cv": r["orthogonality"]["run"]["cv"] - ref_cv,
                    "delta_loss": r["loss"][kind] - ref_loss,
                    "loss_kind": kind.replace("_", " "),
                    "against": b["label"] if b else f"{base} mean",
                }
            )
    return points


def _save(fig, path: Path, plt) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)

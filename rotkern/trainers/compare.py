"""``rotkern compare``: the paper's Figure 1 in miniature. The same model, data, seed and batches are trained
under several rotation scopes; the result is a loss-curve plot and a table of final losses and slowdowns.

Slowdown (the paper does not define it, paper Sec. 3.1, Fig. 1; we take extra steps to the same loss): the train-loss
curves are smoothed by a bias-corrected EMA (``ema``, default 0.95, i.e. a ~20-step window);
``target`` = the baseline's smoothed loss at its last step; T(scope) = the first step where a scope's smoothed
curve reaches ``target``; slowdown = (T(scope) / T(baseline) - 1) x 100 %, "not reached" if it never does.
A second reading, defined when a scope ends above the target: the baseline-equivalent slowdown,
(N(scope) / t(scope) x T(baseline) / N(baseline) - 1) x 100 %, with N the steps run and t the steps the
baseline needed to reach the scope's final smoothed loss (0 % for the baseline itself).
The baseline is ``none`` (plain AdamW) when it is among the scopes, else ``adamw`` when it is, else the first.

Besides scopes, ``--scopes`` takes the baseline optimizers of :data:`BASELINES` (``adamw``: torch AdamW; ``muon``:
Muon + AdamW, paper Alg 6; ``soap``: the eigen scope with SOAP's options; ``sgdm``: torch SGD with momentum), so
e.g. ``--scopes adamw,global,svd,eigen,muon`` puts them side by side on the same batches.

Variants and sweeps (the paper's ablations): ``--variants "none; output; output,embedding=as_linear;
layer,rotate_only=v"`` runs entries with TrainConfig options of their own (:data:`VARIANT_KEYS`; the label is the
entry as written, its folder a filesystem-safe form of it, ``layer__rotate_only-v``); ``--scopes`` is the list
of variants without options. ``--sweep key=v1,v2,..`` crosses every entry with each value (Fig. 12:
``--scopes none,global --sweep block_size=16,64,256,768``; B.2: ``--scopes none,global --sweep
beta2=0.9,0.95,0.99``); an entry the swept option cannot change (rotation none and the baseline optimizers bar soap,
under a rotation option) runs once and belongs to every value. Each value's runs are then measured against that
value's baseline (slowdowns, 2-SE verdicts); summary.md opens with a value x entry table of the final loss and
sweep.png plots it against the value with ±1 std error bars.

Seeds: ``--seeds K`` runs every entry under seeds ``seed .. seed+K-1``, ``--seeds 0,3,7`` under those; a seed sets
the model init, the batch order and the rotations. Each seed is measured on its own (its target is its own
baseline run's final smoothed loss); the table then shows mean +- sample std over the seeds, and its footnote says
which differences from the baseline exceed 2 standard errors (:func:`vs_baseline`). Runs live in
``out_dir/<entry>/`` for a single seed (the layout of one-seed compares before seeds existed) and in
``out_dir/<entry>/seed<s>/`` for several.

Resuming: the command's settings are kept in ``out_dir/compare.json``. Re-running the same command over the same
``out_dir`` reuses every finished run (its log ends in a final record at the stop step and, when checkpoints are
saved, its ``ckpt.pt`` is at that step; both from the same run settings), continues an unfinished one from its
last checkpoint (``--save_every``; bit-identical to an uninterrupted run), starts the others afresh and rewrites
the summary. A different command into that ``out_dir`` is refused, naming the settings that differ; so is a run
folder whose checkpoint or log holds other settings. Only the summary's options (:data:`SUMMARY_ONLY`) may change.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from tqdm.auto import tqdm

from ..scopes import ALL_SCOPES
from .common import Range, TrainerError, _parse_bool, ema, field_types
from .train import TrainConfig, check_config, load_checkpoint, parse_types, train

BASELINES = ("adamw", "muon", "soap", "sgdm")
MANIFEST = "compare.json"  # the command that filled an out_dir: a re-run must match it to resume there
MANIFEST_FORMAT = 1
# Options that change neither a run's trajectory nor which runs there are, only the summary, the console or how
# far the runs go now (stop_step: a compare cut short with it is continued by re-running without it). `seeds` is
# compared as the resolved list, which `seed` only feeds, so `--seeds 2` and `--seed 0 --seeds 0,1` are one command.
SUMMARY_ONLY = frozenset(
    {"ema", "plot", "print_every", "out_dir", "workers", "prefetch", "save_every", "stop_step", "preset", "resume"}
    | {"seed"}
)
# The same for one run's saved TrainConfig (checkpoint or log header) against the one compare would run now.
RUN_ONLY = frozenset({"out_dir", "resume", "print_every", "workers", "prefetch", "save_every", "stop_step", "preset"})
# Per-seed row fields that are averaged over the seeds.
AGGREGATED = (
    "final_train_loss",
    "smoothed_train_loss",
    "final_val_loss",
    "final_val_acc",
    "steps_to_target",
    "slowdown_pct",
    "equivalent_slowdown_pct",
)
# Differences from the baseline that the footnote judges by vs_baseline (the slowdown is judged too, against the
# baseline's 0 %, in _judgement): field, label, format.
JUDGED = (("final_val_loss", "val loss", ".4f"), ("smoothed_train_loss", "EMA train loss", ".4f"))


@dataclass
class CompareConfig(TrainConfig):
    # TrainConfig settings compare sets itself per run (rotation from --scopes) or refuses (switching, --resume:
    # compare resumes from its out_dir): no option for them
    HIDDEN_OPTIONS: ClassVar[frozenset[str]] = frozenset(
        {"rotation", "switch_at", "switch_to", "switch_state", "resume"}
    )
    # comma-separated runs: rotation scopes (rotated AdamW, --optimizer) or baseline optimizers (adamw, muon, soap,
    # sgdm), one run each
    scopes: str = "none,output,input,layer,global"
    # semicolon-separated runs, each "entry[,key=value...]": an entry of --scopes plus TrainConfig options of its
    # own (keys: block_size structure embedding split_qkv vectors rotate_only rotate_except svd_every
    # precondition_every shampoo_beta max_precond_dim basis_change precision lr min_lr warmup_steps beta1 beta2 eps
    # weight_decay momentum grad_clip state_dtype), e.g. "none; output; output,embedding=as_linear; layer,rotate_only=v"
    # (a type list is q+k or q,k). Labels are the texts; replaces --scopes when given
    variants: str = ""
    # one option swept over values, crossed with every entry of --scopes (or --variants): "key=v1,v2,..", e.g.
    # block_size=16,32,64 (Fig. 12) or beta2=0.9,0.95,0.99 (B.2). none and the baseline optimizers run once when
    # the key is a rotation option they ignore. The table groups the runs by value; sweep.png: final loss vs value
    sweep: str = ""
    # seeds per run: K (an integer >= 1) = seed, seed+1, .., seed+K-1; a comma list (0,3,7) = those seeds;
    # "" = --seed alone. Each seed sets the init, the batch order and the rotations; the table gives mean +- std
    seeds: str = ""
    ema: float = 0.95  # smoothing of the train-loss curves before measuring slowdowns
    plot: bool = True  # write compare.png (needs matplotlib)
    steps: int = 600  # about a minute per scope for gpt-tiny on a CPU core
    warmup_steps: int = 30
    eval_every: int = 100
    out_dir: str = "runs/compare"
    print_every: int = 0  # per-run console lines; compare prints its own progress
    RANGES: ClassVar[dict[str, Range]] = {**TrainConfig.RANGES, "ema": Range(0, 1, open_hi=True)}


def parse_seeds(spec: str, seed: int) -> list[int]:
    """``--seeds``: "" -> [seed]; "K" -> [seed, .., seed+K-1]; "a,b,c" -> [a, b, c] (distinct, >= 0)."""
    text = spec.strip()
    if not text:
        return [seed]
    where = f"--seeds={spec!r}"
    if "," not in text:
        try:
            count = int(text)
        except ValueError:
            raise TrainerError(f"{where}: give a count K >= 1 or a comma-separated list of seeds (0,1,2)") from None
        if count < 1:
            raise TrainerError(f"{where}: a count of seeds must be >= 1 (a single seed s is --seed=s)")
        return list(range(seed, seed + count))
    parts = [p.strip() for p in text.split(",")]
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise TrainerError(f"{where}: every entry of a seed list must be an integer >= 0") from None
    if any(s < 0 for s in seeds):
        raise TrainerError(f"{where}: seeds must be >= 0")
    if len(set(seeds)) != len(seeds):
        raise TrainerError(f"{where}: a seed is repeated; each seed runs once")
    return seeds


# TrainConfig options a variant (or --sweep) may set per run; the others are the compare's own, shared by all runs.
VARIANT_KEYS = (
    "block_size", "structure", "embedding", "split_qkv", "vectors", "rotate_only", "rotate_except", "svd_every",
    "precondition_every", "shampoo_beta", "max_precond_dim", "basis_change", "precision", "lr", "min_lr",
    "warmup_steps", "beta1", "beta2", "eps", "weight_decay", "momentum", "grad_clip", "state_dtype",
)  # fmt: skip
# Options that change nothing for rotation none and the baseline optimizers other than soap (a sweep over one of
# them runs those entries once, shared by every value).
ROTATION_KEYS = (
    "block_size", "structure", "embedding", "split_qkv", "vectors", "rotate_only", "rotate_except", "svd_every",
    "precondition_every", "shampoo_beta", "max_precond_dim", "basis_change",
)  # fmt: skip
_TYPE_LISTS = ("rotate_only", "rotate_except")


@dataclass(frozen=True)
class Variant:
    """One entry of a compare: a scope (or baseline optimizer) and its own TrainConfig options.

    label: what the table, plot and summary call it (the entry as written, normalised); folder: its run folder
    under out_dir (the label made filesystem-safe; a plain scope keeps its name); sweep: (key, value) when --sweep
    made it, None otherwise (and for an entry a sweep leaves alone: it belongs to every value)."""

    label: str
    scope: str
    options: tuple[tuple[str, Any], ...] = ()
    sweep: tuple[str, Any] | None = None

    @property
    def folder(self) -> str:
        name = self.label.replace(",", "__").replace("=", "-")
        return re.sub(r"[^A-Za-z0-9._+-]", "_", name)

    def overrides(self) -> dict[str, Any]:
        opt = {"optimizer": self.scope, "rotation": "none"} if self.scope in BASELINES else {"rotation": self.scope}
        return {**opt, **dict(self.options)}


def _value(key: str, raw: str, where: str) -> tuple[Any, str]:
    """A variant option's typed value and its text in labels (type lists joined with '+')."""
    kind = field_types(TrainConfig)[key]
    raw = raw.strip()
    if key in _TYPE_LISTS:
        types = parse_types(raw)
        if not types:
            raise TrainerError(f"{where}: {key} needs a list of layer types (q+k or q,k)")
        return ",".join(types), "+".join(types)
    try:
        value = _parse_bool(raw) if kind is bool else kind(raw)
    except (ValueError, argparse.ArgumentTypeError):
        raise TrainerError(f"{where}: {key}={raw!r} is not a {kind.__name__}") from None
    return value, raw


def parse_variant(text: str) -> Variant:
    """``scope[,key=value...]`` (see --variants). A piece without '=' continues the previous value, so a type list
    may keep its commas (``layer,rotate_only=q,k``)."""
    where = f"variant {text.strip()!r}"
    pieces = [p.strip() for p in text.split(",")]
    scope = pieces[0]
    if scope not in ALL_SCOPES + BASELINES:
        raise TrainerError(
            f"{where}: {scope!r} is not a scope or baseline; choose from {', '.join(ALL_SCOPES + BASELINES)}"
        )
    raw: dict[str, str] = {}
    last = None
    for piece in pieces[1:]:
        if "=" not in piece:
            if last is None or not piece:
                raise TrainerError(f"{where}: {piece!r} is not key=value (options follow the scope: scope,key=value)")
            raw[last] += "," + piece
            continue
        key, value = (x.strip() for x in piece.split("=", 1))
        if key not in VARIANT_KEYS:
            hint = " (the scope comes first, without a key)" if key in ("rotation", "scope", "optimizer") else ""
            raise TrainerError(f"{where}: {key!r} is not a per-run option{hint}; choose from {', '.join(VARIANT_KEYS)}")
        if key in raw:
            raise TrainerError(f"{where}: {key} is given twice")
        raw[key], last = value, key
    options, label = [], scope
    for key, value in raw.items():
        typed, shown = _value(key, value, where)
        options.append((key, typed))
        label += f",{key}={shown}"
    return Variant(label, scope, tuple(options))


def parse_sweep(spec: str) -> tuple[str, list[tuple[Any, str]]]:
    """``--sweep key=v1,v2,..``: the key and its (typed value, text) pairs, in the order given."""
    where = f"--sweep={spec!r}"
    if "=" not in spec:
        raise TrainerError(f"{where}: give key=v1,v2,.. (e.g. block_size=16,32,64 or beta2=0.9,0.95,0.99)")
    key, values = (x.strip() for x in spec.split("=", 1))
    if key not in VARIANT_KEYS:
        raise TrainerError(f"{where}: {key!r} is not a per-run option; choose from {', '.join(VARIANT_KEYS)}")
    if key in _TYPE_LISTS:
        texts = [v.strip() for v in values.split(";") if v.strip()]  # one type list per value: q+k;v
    else:
        texts = [v.strip() for v in values.split(",") if v.strip()]
    if not texts:
        raise TrainerError(f"{where}: no values to sweep")
    parsed = [_value(key, t, where) for t in texts]
    if len({v for v, _ in parsed}) != len(parsed):
        raise TrainerError(f"{where}: a value is repeated")
    return key, parsed


def compare_variants(cfg: CompareConfig) -> list[Variant]:
    """The runs of a compare: --variants (or --scopes), crossed with --sweep; TrainerError naming the bad part."""
    if cfg.variants.strip():
        base = [parse_variant(v) for v in cfg.variants.split(";") if v.strip()]
        what = f"--variants={cfg.variants!r}"
    else:
        scopes = [s.strip() for s in cfg.scopes.split(",") if s.strip()]
        bad = [s for s in scopes if s not in ALL_SCOPES + BASELINES]
        if not scopes or bad or len(set(scopes)) != len(scopes):
            raise TrainerError(
                f"--scopes={cfg.scopes!r}: {', '.join(bad) or 'empty or repeated'}; choose from "
                f"{', '.join(ALL_SCOPES + BASELINES)}"
            )
        base = [Variant(s, s) for s in scopes]
        what = f"--scopes={cfg.scopes!r}"
    if not base:
        raise TrainerError(f"{what}: no runs")
    out = base
    if cfg.sweep.strip():
        key, values = parse_sweep(cfg.sweep)
        out = []
        for value, text in values:
            for v in base:
                if any(k == key for k, _ in v.options):
                    raise TrainerError(f"--sweep={cfg.sweep!r} sweeps {key}, which variant {v.label!r} sets itself")
                if key in ROTATION_KEYS and v.scope in ("none", "adamw", "sgdm", "muon"):
                    if v not in out:
                        out.append(v)  # unaffected by the swept option: one run, in every value's group
                    continue
                out.append(Variant(f"{v.label},{key}={text}", v.scope, v.options + ((key, value),), (key, value)))
    labels = [v.label for v in out]
    if len(set(labels)) != len(labels):
        raise TrainerError(
            f"{what}: a run is repeated ({', '.join(sorted({x for x in labels if labels.count(x) > 1}))})"
        )
    folders = [v.folder for v in out]
    if len(set(folders)) != len(folders):
        raise TrainerError(f"{what}: two runs map to one folder name ({', '.join(folders)}); write them differently")
    return out


def _sweep_groups(variants: list[Variant], cfg: CompareConfig) -> list[tuple[Any, list[str]]]:
    """[(value, labels)] per swept value (entries the sweep leaves alone belong to every value); without a sweep,
    one group [(None, every label)]."""
    if not cfg.sweep.strip():
        return [(None, [v.label for v in variants])]
    _, values = parse_sweep(cfg.sweep)
    return [(value, [v.label for v in variants if v.sweep is None or v.sweep[1] == value]) for value, _ in values]


def _baseline_of(labels: list[str], variants: dict[str, Variant]) -> str:
    """none (plain AdamW) when among the runs, else adamw, else the first."""
    for scope in ("none", "adamw"):
        hit = next((x for x in labels if variants[x].scope == scope), None)
        if hit is not None:
            return hit
    return labels[0]


def slowdowns(curves: dict[str, list[float]], baseline: str, decay: float) -> dict[str, dict]:
    """Per scope: smoothed final loss, steps to the baseline's final smoothed loss, slowdown in % (or None)."""
    smooth = {k: ema(v, decay) for k, v in curves.items()}
    target = smooth[baseline][-1]

    def first_hit(xs: list[float]) -> int | None:
        return next((i + 1 for i, x in enumerate(xs) if x <= target), None)

    t_base = first_hit(smooth[baseline])
    out = {}
    for k, xs in smooth.items():
        t = first_hit(xs)
        t_eq = next((i + 1 for i, x in enumerate(smooth[baseline]) if x <= xs[-1]), None)
        out[k] = {
            "baseline_steps_to_final": t_eq,
            "equivalent_slowdown_pct": None
            if t_eq is None or t_base is None
            else 100.0 * (len(xs) / t_eq * t_base / len(smooth[baseline]) - 1.0),
            "smoothed_final_loss": xs[-1],
            "steps_to_target": t,
            "slowdown_pct": None if t is None or t_base is None else 100.0 * (t / t_base - 1.0),
        }
    out["_target"] = {"loss": target, "baseline": baseline, "baseline_steps": t_base}
    return out


def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample (n - 1) standard deviation of the values that are not None, and how many there were;
    the std is None below two values (one seed says nothing about the spread)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None, len(xs)


def aggregate(scope: str, seed_rows: list[dict]) -> dict:
    """One table row from a run's per-seed rows: for each field of AGGREGATED, the mean (under the field's own
    name), ``<field>_std`` and ``<field>_n`` (seeds where it is defined: steps and slowdowns are undefined where
    a seed's run never reaches its target, and their mean is then over the seeds that did)."""
    row: dict[str, Any] = {"scope": scope, "n": len(seed_rows), "seeds": [r["seed"] for r in seed_rows]}
    for key in AGGREGATED:
        mean, std, n = mean_std([r[key] for r in seed_rows])
        row.update({key: mean, f"{key}_std": std, f"{key}_n": n})
    return row


def vs_baseline(row: dict, base: dict, key: str) -> dict:
    """Welch-style check of ``row[key] - base[key]`` (a loss: lower is better): "worse" when the difference is
    above 2 SE, "better" when below -2 SE, with
    SE = sqrt(sd_a^2 / n_a + sd_b^2 / n_b) over the seeds where both are defined, else "within noise";
    "undetermined" below two seeds, or when a run misses its target in some seeds (the means would cover
    different seeds). Unpaired, so conservative: the runs of one seed share init and batches."""
    n_a, n_b = row[f"{key}_n"], base[f"{key}_n"]
    if row[key] is None or base[key] is None:
        return {"diff": None, "two_se": None, "verdict": "undetermined"}
    diff = row[key] - base[key]
    if n_a < 2 or n_b < 2 or n_a < row["n"] or n_b < base["n"]:
        return {"diff": diff, "two_se": None, "verdict": "undetermined"}
    two_se = 2.0 * math.sqrt(row[f"{key}_std"] ** 2 / n_a + base[f"{key}_std"] ** 2 / n_b)
    return {"diff": diff, "two_se": two_se, "verdict": verdict(diff, two_se)}


def verdict(diff: float, two_se: float) -> str:
    """A gap to the baseline in a lower-is-better quantity (loss, slowdown), judged against 2 SE."""
    return "worse" if diff > two_se else "better" if diff < -two_se else "within noise"


# -- runs on disk ----------------------------------------------------------------------------------------


def config_diff(
    saved: dict, now: dict, ignore: frozenset[str] = frozenset(), defaults: dict | None = None
) -> dict[str, tuple[Any, Any]]:
    """{key: (saved, now)} for every setting that differs (a key missing on one side shows as None there). With
    ``defaults``, a key the saved side lacks takes its default: settings added since were saved with their default
    behaviour, so older runs and compares stay resumable."""
    saved = {**{k: v for k, v in (defaults or {}).items() if k not in saved}, **saved}
    keys = sorted((saved.keys() | now.keys()) - ignore)
    return {k: (saved.get(k), now.get(k)) for k in keys if saved.get(k) != now.get(k)}


def _describe(diff: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())


def read_log(path: Path, stop: int, eval_every: int) -> dict:
    """A run's JSONL log as compare needs it: the header configs, the train-loss curve of steps 1..stop and the
    eval records, with a resumed run's records replacing those of the attempt it resumed (later lines win), and
    whether it ends in a final record at ``stop``. Only the evals an uninterrupted run makes are kept (every
    ``eval_every`` steps and at ``stop``): an attempt cut short by --stop_step also evaluated where it stopped."""
    headers, losses, evals, final = [], {}, {}, None
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # the last line of a killed run may be cut off
                continue
            kind = rec.get("type")
            if kind == "header":
                headers.append(rec.get("config", {}))
                final = None  # a later attempt has to finish again
            elif kind == "step" and rec["step"] <= stop:
                losses[rec["step"]] = rec["loss"]
            elif (
                kind == "eval"
                and rec["step"] <= stop
                and (rec["step"] == stop or eval_every and rec["step"] % eval_every == 0)
            ):
                evals[rec["step"]] = {k: v for k, v in rec.items() if k != "type"}
            elif kind == "final":
                final = rec
    finished = final is not None and final.get("step") == stop and sorted(losses) == list(range(1, stop + 1))
    return {
        "headers": headers,
        "curve": [losses[i] for i in sorted(losses)],
        "evals": [evals[i] for i in sorted(evals)],
        "finished": finished,
        "backend": (final or {}).get("backend"),  # what ran the optimizer steps (train's final record)
    }


_TRAIN_DEFAULTS = dataclasses.asdict(TrainConfig())


def run_state(run_cfg: TrainConfig) -> tuple[str, str]:
    """What to do with a run folder: ("done", "") when it holds this run finished, ("resume", checkpoint) when it
    holds a checkpoint of it short of the stop step, ("fresh", "") otherwise (leftovers of an attempt that saved
    no checkpoint are removed first). A checkpoint or log from other settings is a TrainerError."""
    folder = Path(run_cfg.out_dir)
    log_path, ckpt_path = folder / "log.jsonl", folder / "ckpt.pt"
    now = dataclasses.asdict(run_cfg)
    stop = run_cfg.stop_step or run_cfg.steps
    log = read_log(log_path, stop, run_cfg.eval_every) if log_path.exists() else None
    for saved in log["headers"] if log else []:
        diff = config_diff(saved, now, RUN_ONLY, _TRAIN_DEFAULTS)
        if diff:
            raise TrainerError(f"{log_path} is a run with other settings ({_describe(diff)}); pick another --out_dir")
    ckpt_step = None
    if ckpt_path.exists():
        ckpt = load_checkpoint(str(ckpt_path))
        diff = config_diff(ckpt["config"], now, RUN_ONLY, _TRAIN_DEFAULTS)
        if diff:
            raise TrainerError(f"{ckpt_path} is a run with other settings ({_describe(diff)}); pick another --out_dir")
        ckpt_step = int(ckpt["step"])
        if ckpt_step > stop:
            raise TrainerError(f"{ckpt_path} is at step {ckpt_step}, past this compare's stop step {stop}")
    if log is not None and log["finished"] and (ckpt_step == stop or not run_cfg.save):
        return "done", ""
    if log is not None and ckpt_step is not None and ckpt_step < stop:
        return "resume", str(ckpt_path)
    # Nothing to continue from (or a checkpoint at the stop step whose log lacks the final eval): start over.
    # Only the two files train() refuses to overwrite go; anything else in the folder is left alone.
    for p in (log_path, ckpt_path):
        if p.exists():
            p.unlink()
    return "fresh", ""


def _check_manifest(out: Path, cfg: CompareConfig, seeds: list[int]) -> None:
    """Refuse an out_dir that another command filled (see the module docstring); writes nothing."""
    path = out / MANIFEST
    now = {**dataclasses.asdict(cfg), "seeds": seeds}
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TrainerError(f"cannot read {path} ({e}); pick another --out_dir") from None
        defaults = dataclasses.asdict(CompareConfig())
        diff = config_diff({**saved.get("config", {}), "seeds": saved.get("seeds")}, now, SUMMARY_ONLY, defaults)
        # A command that failed before any run wrote a log (a bad --data path, say) binds nothing: replace it.
        if diff and any(out.rglob("log.jsonl")):
            raise TrainerError(
                f"{out} holds a compare run with other settings ({_describe(diff)}); re-run that command to "
                "resume it, or pick another --out_dir"
            )
    else:
        for name in ("summary.md", "summary.json", "compare.png"):
            if (out / name).exists():
                raise TrainerError(
                    f"{out / name} exists but {path} does not (not this compare's); pick another --out_dir"
                )


def _write_manifest(out: Path, cfg: CompareConfig, seeds: list[int]) -> None:
    path = out / MANIFEST
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    now = {**dataclasses.asdict(cfg), "seeds": seeds}
    tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "config": now, "seeds": seeds}, indent=2))
    os.replace(tmp, path)


# -- compare ---------------------------------------------------------------------------------------------


def compare(cfg: CompareConfig) -> dict:
    variants = compare_variants(cfg)
    by_label = {v.label: v for v in variants}
    labels = list(by_label)
    _refuse(cfg, variants)
    seeds = parse_seeds(cfg.seeds, cfg.seed)
    out = Path(cfg.out_dir)
    base_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in base_fields})
    stop = cfg.stop_step or cfg.steps
    # Seeds outermost: a compare interrupted half-way has whole seeds (every entry side by side) to show.
    jobs = []
    for seed in seeds:
        for v in variants:
            folder = out / v.folder if len(seeds) == 1 else out / v.folder / f"seed{seed}"
            run_cfg = dataclasses.replace(base, **v.overrides(), seed=seed, out_dir=str(folder), resume="")
            try:
                check_config(run_cfg)  # a bad option fails here, before compare.json records the command
            except TrainerError as e:
                raise TrainerError(f"{v.label}: {e}" if v.options else str(e)) from None
            jobs.append((seed, v.label, run_cfg))
    _check_manifest(out, cfg, seeds)
    # Every run folder is checked before compare.json records this command, so a refused command leaves the
    # out_dir as it found it (bar the leftovers of unfinished runs of this very command).
    states = [run_state(run_cfg) for _, _, run_cfg in jobs]
    _write_manifest(out, cfg, seeds)
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
    kinds = "scopes" if all(not v.options for v in variants) else "runs"
    print(
        f"compare: {cfg.model}, {stop} steps x {len(labels)} {kinds} ({'; '.join(labels)}), "
        f"{cfg.optimizer}, block {cfg.block_size}, {seed_text}; results in {out}"
    )
    width = max(6, *(len(x) for x in labels)) if kinds == "runs" else 6
    runs: dict[tuple[str, int], dict] = {}
    for i, ((seed, label, run_cfg), (state, ckpt)) in enumerate(zip(jobs, states, strict=True)):
        runs[label, seed] = _run(
            cfg, out, stop, seeds, width, f"{i + 1}/{len(jobs)}", seed, label, run_cfg, state, ckpt
        )
    groups = []
    for value, members in _sweep_groups(variants, cfg):
        groups.append({"value": value, **_summarise(cfg, runs, members, by_label, seeds)})
    per_seed = [r for g in groups for r in g.pop("per_seed")]
    per_seed = list({(r["scope"], r["seed"]): r for r in per_seed}.values())  # shared entries: once
    if cfg.sweep.strip():
        key, _ = parse_sweep(cfg.sweep)
        table = _sweep_table(cfg, key, groups, seeds)
        for g in groups:
            for row in g["rows"]:
                row["sweep_value"] = g["value"]
        rows = [row for g in groups for row in g["rows"]]
        target = None
    else:
        key, (group,) = None, groups
        rows, target = group["rows"], group["target"]
        table = _table(rows, target, cfg, seeds)
    curves = {x: _mean_curve([runs[x, seed]["curve"] for seed in seeds])[0] for x in labels}
    # Say what ran the steps: on a CPU the fused optimizer runs the compiled extension when it is built, else the
    # eager reference (and the two are checked against each other by validate).
    backends = sorted({str(runs[k].get("backend")) for k in runs if runs[k].get("backend")})
    if backends:
        table += "\n\nOptimizer steps ran on: " + "; ".join(backends) + "."
    print(table)
    (out / "summary.md").write_text(table + "\n")
    result = {
        "config": dataclasses.asdict(cfg),
        "seeds": seeds,
        "rows": rows,  # one per entry (per swept value and entry with --sweep), aggregated over the seeds
        "target": target,
        "curves": curves,  # per entry: the raw train loss averaged over the seeds, step by step
        "evals": {x: _mean_evals([runs[x, seed]["evals"] for seed in seeds]) for x in labels},
        "runs": per_seed,  # every (entry, seed) run: its folder, curve, evals and row
    }
    if key is not None:
        result["sweep"] = {"key": key, "groups": groups}
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    if cfg.plot:
        result["plot"] = _plot(cfg, runs, labels, seeds, out / "compare.png")
        if result["plot"]:
            print(f"loss curves: {result['plot']}")
        if key is not None:
            result["sweep_plot"] = _sweep_plot(cfg, key, groups, by_label, seeds, out / "sweep.png")
            if result["sweep_plot"]:
                print(f"sweep: {result['sweep_plot']}")
    return result


def _refuse(cfg: CompareConfig, variants: list[Variant]) -> None:
    """TrainerError for a compare that cannot run: no scope for the optimizer, switching, no out_dir, torchrun."""
    if any(v.scope in ALL_SCOPES for v in variants) and cfg.optimizer not in ("rotated-eager", "rotated-fused"):
        raise TrainerError(f"compare runs rotated AdamW under each scope; --optimizer={cfg.optimizer} has no scope")
    if cfg.switch_at or cfg.switch_to:
        raise TrainerError(
            "compare runs each scope throughout; --switch_at/--switch_to belong to train "
            "(benchmarks/switch_basis.py compares switched runs)"
        )
    if not 0.0 <= cfg.ema < 1.0:
        raise TrainerError(f"--ema={cfg.ema} must lie in [0, 1)")
    if not cfg.out_dir:
        raise TrainerError("compare reads its runs back from --out_dir; it cannot be empty")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # The summary is read from the logs, which only rank 0 writes.
        raise TrainerError("compare runs one process; launch it without torchrun (train takes torchrun)")


def _run(
    cfg: CompareConfig,
    out: Path,
    stop: int,
    seeds: list[int],
    width: int,
    count: str,
    seed: int,
    label: str,
    run_cfg: TrainConfig,
    state: str,
    ckpt,
) -> dict:
    """Train (or resume) one run of a compare unless it finished earlier; its log read back, with its folder."""
    folder = Path(run_cfg.out_dir)
    tag = f"[{count} {label:>{width}}" + (f" seed {seed}]" if len(seeds) > 1 else "]")
    if state != "done":
        t0 = time.perf_counter()
        last: dict = {}
        # A live bar on a terminal (stderr, gone when the run ends); one line per run either way.
        bar = tqdm(total=stop, desc=f"  {tag}", unit="step", leave=False, disable=None, file=sys.stderr)

        def progress(rec: dict, bar=bar, last=last) -> None:
            last.update(rec)
            bar.update(rec["step"] - bar.n)
            bar.set_postfix_str(f"loss {rec['loss']:.4f}", refresh=False)

        if state == "resume":
            print(f"  {tag} resuming from {ckpt}", flush=True)
        try:
            train(dataclasses.replace(run_cfg, resume=ckpt), on_step=progress)
        finally:
            bar.close()
        val = f" val {last['val_loss']:.4f}" if "val_loss" in last else ""
        loss = f" loss {last['loss']:.4f}" if "loss" in last else ""
        print(f"  {tag} {stop} steps{loss}{val} ({time.perf_counter() - t0:.1f} s)", flush=True)
    # Finished runs, whether trained now or earlier, are read back from their logs alike, so a resumed
    # compare's summary is the one an uninterrupted compare writes.
    log = read_log(folder / "log.jsonl", stop, cfg.eval_every)
    if not log["finished"]:
        raise TrainerError(f"{folder / 'log.jsonl'} does not hold steps 1..{stop} and a final record")
    if state == "done":
        print(f"  {tag} finished earlier in {folder}: loss {log['curve'][-1]:.4f}", flush=True)
    return {"dir": str(folder.relative_to(out)), **log}


def _summarise(
    cfg: CompareConfig, runs: dict, labels: list[str], by_label: dict[str, Variant], seeds: list[int]
) -> dict:
    """Rows (aggregated over the seeds, with 2-SE verdicts against the baseline), target and per-seed rows of a
    set of entries measured against one baseline (every entry of a compare, or one swept value's)."""
    baseline = _baseline_of(labels, by_label)
    per_seed, targets = [], {}
    for seed in seeds:
        slow = slowdowns({x: runs[x, seed]["curve"] for x in labels}, baseline, cfg.ema)
        targets[str(seed)] = slow["_target"]
        for label in labels:
            run = runs[label, seed]
            ev = run["evals"][-1] if run["evals"] else {}
            per_seed.append(
                {
                    "scope": label,
                    "seed": seed,
                    "dir": run["dir"],
                    "curve": run["curve"],
                    "evals": run["evals"],
                    "row": {
                        "scope": label,
                        "seed": seed,
                        "final_train_loss": run["curve"][-1],
                        "smoothed_train_loss": slow[label]["smoothed_final_loss"],
                        "final_val_loss": ev.get("val_loss"),
                        "final_val_acc": ev.get("val_acc"),
                        "steps_to_target": slow[label]["steps_to_target"],
                        "slowdown_pct": slow[label]["slowdown_pct"],
                        "equivalent_slowdown_pct": slow[label]["equivalent_slowdown_pct"],
                    },
                }
            )
    rows = [aggregate(x, [r["row"] for r in per_seed if r["scope"] == x]) for x in labels]
    base_row = rows[labels.index(baseline)]
    for row in rows:
        if row["scope"] != baseline:
            row["vs_baseline"] = {key: vs_baseline(row, base_row, key) for key, _, _ in JUDGED}
    loss, loss_std, _ = mean_std([t["loss"] for t in targets.values()])
    target = {
        "baseline": baseline,
        "loss": loss,
        "loss_std": loss_std,
        "baseline_steps": mean_std([t["baseline_steps"] for t in targets.values()])[0],
        "per_seed": targets,
    }
    return {"baseline": baseline, "rows": rows, "target": target, "per_seed": per_seed}


def _mean_curve(curves: list[list[float]]) -> tuple[list[float], list[float]]:
    """Step-by-step mean and sample std over equally long curves (std 0 for a single curve)."""
    cols = list(zip(*curves, strict=True))
    return [statistics.fmean(c) for c in cols], [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols]


def _mean_evals(per_seed: list[list[dict]]) -> list[dict]:
    """Eval records averaged over the seeds (every seed evaluates at the same steps), with ``<key>_std``."""
    out = []
    for recs in zip(*per_seed, strict=True):
        avg: dict[str, Any] = {"step": recs[0]["step"]}
        for key in (k for k in recs[0] if k.startswith("val")):
            avg[key], avg[f"{key}_std"], _ = mean_std([r.get(key) for r in recs])
        out.append(avg)
    return out


# -- table and plot ----------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def _pm(row: dict, key: str, spec: str = ".4f") -> str:
    """mean ± std of an aggregated field (just the value for one seed); a count of seeds wherever some lack it."""
    mean, std = row[key], row[f"{key}_std"]
    if mean is None:
        return "—"
    if row[f"{key}_n"] == 1 and spec == "d":
        return format(round(mean), "d")
    spec = ".1f" if spec == "d" else spec
    return format(mean, spec) + ("" if std is None else f" ± {format(std, spec.lstrip('+'))}")


def _table(rows: list[dict], target: dict, cfg: CompareConfig, seeds: list[int]) -> str:
    n = len(seeds)
    has_acc = any(r["final_val_acc"] is not None for r in rows)
    head = (
        "| scope | n | final train loss | EMA train loss | final val loss |"
        + (" val acc |" if has_acc else "")
        + " steps to target | slowdown | baseline-equivalent slowdown |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        reached = r["steps_to_target_n"]
        missing = "" if reached in (0, n) else f" ({reached}/{n} seeds reached)"
        sd = "not reached" if reached == 0 else f"{_pm(r, 'slowdown_pct', '+.1f')} %"
        acc = f" {_pm(r, 'final_val_acc', '.3f')} |" if has_acc else ""
        eq_n = r["equivalent_slowdown_pct_n"]
        eq = (
            "— (below the baseline's curve)"
            if eq_n == 0
            else f"{_pm(r, 'equivalent_slowdown_pct', '+.1f')} %" + ("" if eq_n == n else f" ({eq_n}/{n} seeds)")
        )
        lines.append(
            f"| {r['scope']} | {r['n']} | {_pm(r, 'final_train_loss')} | {_pm(r, 'smoothed_train_loss')} | "
            f"{_pm(r, 'final_val_loss')} |{acc} {_pm(r, 'steps_to_target', 'd')}{missing} | {sd} | {eq} |"
        )
    if n == 1:
        note = (
            f"\nTarget: the '{target['baseline']}' run's EMA-smoothed train loss at its last step, "
            f"{target['loss']:.4f} (first reached at step {_fmt(target['baseline_steps'], '.0f')}); EMA decay "
            f"{cfg.ema} with bias correction."
        )
    else:
        each = ", ".join(
            f"seed {s}: {t['loss']:.4f} (step {_fmt(t['baseline_steps'], '.0f')})"
            for s, t in target["per_seed"].items()
        )
        note = (
            f"\nTarget, per seed: the '{target['baseline']}' run's EMA-smoothed train loss at its last step ({each}); "
            f"EMA decay {cfg.ema} with bias correction. Every seed's runs are measured against their own seed's "
            f"target; cells are mean ± sample standard deviation over the n = {n} seeds ({', '.join(map(str, seeds))});"
            " steps and slowdowns average the seeds whose run reached the target (a count shows when some did not)."
        )
    note += (
        " Slowdown = extra steps to reach the target, relative to the baseline. Baseline-equivalent: steps run / "
        "steps the baseline needed to reach the scope's final EMA loss, relative to the same ratio for the baseline."
    )
    return "\n".join(lines) + "\n" + note + "\n" + _judgement(rows, target["baseline"], n)


def _judgement(rows: list[dict], baseline: str, n: int) -> str:
    """The footnote's verdict on each run's gap to the baseline (see vs_baseline)."""
    if n < 2:
        return (
            "\nOne seed: no spread, so no gap can be told from seed noise; --seeds K (K >= 2) repeats every run "
            "under K seeds and says which gaps exceed 2 standard errors."
        )
    lines = [
        f"\nDifferences from '{baseline}' (run − baseline; lower is better): 'worse' / 'better' = above +2 SE / "
        "below −2 SE, "
        "SE = sqrt(sd_run²/n + sd_baseline²/n) (Welch-style, unpaired: conservative, as the runs of a seed share init "
        "and batches); 'within noise' = not distinguishable from seed-to-seed variation at this scale."
    ]
    for r in rows:
        if r["scope"] == baseline:
            continue
        parts = []
        for key, label, spec in JUDGED:
            v = r["vs_baseline"][key]
            if v["diff"] is None:
                continue
            gap = format(v["diff"], "+" + spec)
            why = "undetermined" if v["two_se"] is None else f"2 SE {format(v['two_se'], spec)}: {v['verdict']}"
            parts.append(f"{label} {gap} ({why})")
        sd_mean, sd_n = r["slowdown_pct"], r["slowdown_pct_n"]
        if sd_mean is not None and sd_n == r["n"] and sd_n >= 2:
            # The baseline's own slowdown is 0 % in every seed, so its SE term vanishes.
            two_se = 2.0 * r["slowdown_pct_std"] / math.sqrt(sd_n)
            parts.append(f"slowdown {sd_mean:+.1f} % (2 SE {two_se:.1f} %: {verdict(sd_mean, two_se)})")
        else:
            parts.append("slowdown undetermined (target not reached in every seed)")
        lines.append(f"- {r['scope']}: " + "; ".join(parts))
    return "\n".join(lines)


def _plot(cfg: CompareConfig, runs: dict, scopes: list[str], seeds: list[int], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot (pip install matplotlib)")
        return None
    many = len(seeds) > 1
    has_val = any(runs[s, seed]["evals"] for s in scopes for seed in seeds)
    fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(12 if has_val else 7, 4.5), squeeze=False)
    tail = []
    for scope in scopes:
        raw, _ = _mean_curve([runs[scope, seed]["curve"] for seed in seeds])
        mean, std = _mean_curve([ema(runs[scope, seed]["curve"], cfg.ema) for seed in seeds])
        xs = range(1, len(mean) + 1)
        (line,) = axes[0, 0].plot(xs, mean, lw=1.5, label=scope)
        axes[0, 0].plot(xs, raw, lw=0.5, alpha=0.25, color=line.get_color())
        if many:
            lo = [m - s for m, s in zip(mean, std, strict=True)]
            hi = [m + s for m, s in zip(mean, std, strict=True)]
            axes[0, 0].fill_between(xs, lo, hi, alpha=0.2, lw=0, color=line.get_color())
            tail += lo[max(len(mean) // 10, 1) :] + hi[max(len(mean) // 10, 1) :]
        else:
            tail += mean[max(len(mean) // 10, 1) :]
        if has_val:
            ev = _mean_evals([runs[scope, seed]["evals"] for seed in seeds])
            steps, val = [e["step"] for e in ev], [e["val_loss"] for e in ev]
            axes[0, 1].plot(steps, val, "o-", ms=3, label=scope, color=line.get_color())
            if many:
                spread = [e["val_loss_std"] or 0.0 for e in ev]
                axes[0, 1].fill_between(
                    steps,
                    [v - s for v, s in zip(val, spread, strict=True)],
                    [v + s for v, s in zip(val, spread, strict=True)],
                    alpha=0.2,
                    lw=0,
                    color=line.get_color(),
                )
    # The first tenth of training spans most of the loss range: zoom on the rest, where the scopes differ.
    if tail:
        lo, hi = min(tail), max(tail)
        axes[0, 0].set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    band = ", mean ± 1 std over seeds" if many else ""
    axes[0, 0].set(xlabel="step", ylabel=f"train loss (EMA {cfg.ema}{band})", title="train loss")
    if has_val:
        axes[0, 1].set(xlabel="step", ylabel=f"val loss{band.replace(', ', ' (') + ')' if many else ''}")
        axes[0, 1].set_title("validation loss")
    for ax in axes[0]:
        ax.legend()
        ax.grid(alpha=0.3)
    plain = all(s.split(",")[0] in ALL_SCOPES for s in scopes)
    what = "AdamW under rotation scopes" if plain else "rotation scopes and baselines"
    seed_text = f"seed {seeds[0]}" if not many else f"{len(seeds)} seeds: {', '.join(map(str, seeds))}"
    fig.suptitle(f"{cfg.model}: {what} (block {cfg.block_size}, {seed_text})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# -- sweeps ------------------------------------------------------------------------------------------------


def _metric(rows: list[dict]) -> tuple[str, str]:
    """The sweep's headline: the final val loss where the runs evaluate, else the EMA train loss."""
    if all(r["final_val_loss"] is not None for r in rows):
        return "final_val_loss", "final val loss"
    return "smoothed_train_loss", "EMA train loss"


def _entry_name(label: str, key: str) -> str:
    """A swept run's entry without the swept option (``global,block_size=64`` -> ``global``)."""
    return re.sub(rf",{re.escape(key)}=[^,]*$", "", label)


def _sweep_table(cfg: CompareConfig, key: str, groups: list[dict], seeds: list[int]) -> str:
    """One line per swept value, one column per entry (the headline loss, mean ± std, with its difference from the
    value's baseline and the 2-SE verdict), then each value's full table."""
    rows = [r for g in groups for r in g["rows"]]
    field, what = _metric(rows)
    entries = list(dict.fromkeys(_entry_name(r["scope"], key) for r in rows))
    head = f"| {key} | " + " | ".join(entries) + " |"
    lines = [
        f"Sweep of {key}: {what} at the last step, mean ± sample std over n = {len(seeds)} seeds "
        f"({', '.join(map(str, seeds))}); Δ = difference from that value's baseline, with the 2-SE verdict "
        "('worse' / 'better' = Δ above +2 SE / below −2 SE; see below).",
        "",
        head,
        "|" + "---|" * (len(entries) + 1),
    ]
    for g in groups:
        cells = {}
        for r in g["rows"]:
            cell = _pm(r, field)
            v = r.get("vs_baseline", {}).get(field)
            if v is not None and v["diff"] is not None:
                cell += f"; Δ {v['diff']:+.4f} ({v['verdict']})"
            cells[_entry_name(r["scope"], key)] = cell
        lines.append(f"| {g['value']} | " + " | ".join(cells.get(e, "—") for e in entries) + " |")
    out = "\n".join(lines)
    for g in groups:
        out += f"\n\n### {key} = {g['value']} (baseline: {g['baseline']})\n\n" + _table(
            g["rows"], g["target"], cfg, seeds
        )
    return out


def _sweep_plot(
    cfg: CompareConfig, key: str, groups: list[dict], by_label: dict[str, Variant], seeds: list[int], path: Path
) -> str | None:
    """Headline loss against the swept value, one line per entry, ±1 std error bars over the seeds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no sweep plot (pip install matplotlib)")
        return None
    rows = [r for g in groups for r in g["rows"]]
    field, what = _metric(rows)
    values = [g["value"] for g in groups]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    xs = values if numeric else list(range(len(values)))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for entry in dict.fromkeys(_entry_name(r["scope"], key) for r in rows):
        pts = [
            (x, r[field], r[f"{field}_std"] or 0.0)
            for x, g in zip(xs, groups, strict=True)
            for r in g["rows"]
            if _entry_name(r["scope"], key) == entry and r[field] is not None
        ]
        shared = all(
            by_label[r["scope"]].sweep is None
            for g in groups
            for r in g["rows"]
            if _entry_name(r["scope"], key) == entry
        )
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            yerr=[p[2] for p in pts] if len(seeds) > 1 else None,
            fmt="--" if shared else "o-",
            capsize=3,
            label=entry + (f" (independent of {key})" if shared else ""),
        )
    if numeric and key == "block_size":
        ax.set_xscale("log", base=2)
    if numeric:
        ax.set_xticks(values)
        ax.set_xticklabels([str(v) for v in values])
    else:
        ax.set_xticks(xs)
        ax.set_xticklabels([str(v) for v in values])
    band = f", mean ± 1 std over {len(seeds)} seeds" if len(seeds) > 1 else ""
    ax.set(xlabel=key, ylabel=f"{what} at step {cfg.stop_step or cfg.steps}{band}")
    ax.set_title(f"{cfg.model}: {what} vs {key}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)

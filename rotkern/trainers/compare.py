"""``rotkern compare``: the paper's Figure 1 in miniature. The same model, data, seed and batches are trained
under several rotation scopes; the result is a loss-curve plot and a table of final losses and slowdowns.

Slowdown (the paper does not define it, SPEC section 7; we take extra steps to the same loss): the train-loss
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
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..scopes import ALL_SCOPES
from .common import TrainerError, ema
from .train import TrainConfig, train

BASELINES = ("adamw", "muon", "soap", "sgdm")


@dataclass
class CompareConfig(TrainConfig):
    # comma-separated runs: rotation scopes (rotated AdamW, --optimizer) or baseline optimizers (adamw, muon, soap,
    # sgdm), one run each
    scopes: str = "none,output,input,layer,global"
    ema: float = 0.95  # smoothing of the train-loss curves before measuring slowdowns
    plot: bool = True  # write compare.png (needs matplotlib)
    steps: int = 600  # about a minute per scope for gpt-tiny on a CPU core
    warmup_steps: int = 30
    eval_every: int = 100
    out_dir: str = "runs/compare"
    print_every: int = 0  # per-run console lines; compare prints its own progress


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


def compare(cfg: CompareConfig) -> dict:
    scopes = [s.strip() for s in cfg.scopes.split(",") if s.strip()]
    bad = [s for s in scopes if s not in ALL_SCOPES + BASELINES]
    if not scopes or bad or len(set(scopes)) != len(scopes):
        raise TrainerError(
            f"--scopes={cfg.scopes!r}: {', '.join(bad) or 'empty or repeated'}; choose from "
            f"{', '.join(ALL_SCOPES + BASELINES)}"
        )
    if any(s in ALL_SCOPES for s in scopes) and cfg.optimizer not in ("rotated-eager", "rotated-fused"):
        raise TrainerError(f"compare runs rotated AdamW under each scope; --optimizer={cfg.optimizer} has no scope")
    if cfg.switch_at or cfg.switch_to:
        raise TrainerError(
            "compare runs each scope throughout; --switch_at/--switch_to belong to train "
            "(benchmarks/switch_basis.py compares switched runs)"
        )
    if not 0.0 <= cfg.ema < 1.0:
        raise TrainerError(f"--ema={cfg.ema} must lie in [0, 1)")
    out = Path(cfg.out_dir)
    for name in ("summary.md", "summary.json", "compare.png"):
        if (out / name).exists():
            raise TrainerError(f"{out / name} already exists; pick another --out_dir")
    base_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    base = TrainConfig(**{k: v for k, v in dataclasses.asdict(cfg).items() if k in base_fields})
    print(
        f"compare: {cfg.model}, {cfg.steps} steps x {len(scopes)} scopes ({', '.join(scopes)}), "
        f"{cfg.optimizer}, block {cfg.block_size}, seed {cfg.seed}; results in {out}"
    )
    runs = {}
    for i, scope in enumerate(scopes):
        if scope in BASELINES:
            run_cfg = dataclasses.replace(base, optimizer=scope, rotation="none", out_dir=str(out / scope), resume="")
        else:
            run_cfg = dataclasses.replace(base, rotation=scope, out_dir=str(out / scope), resume="")
        t0 = time.perf_counter()
        every = max(cfg.steps // 10, 1)

        def progress(rec: dict, scope=scope, t0=t0, i=i, every=every) -> None:
            if rec["step"] % every == 0 or rec["step"] == cfg.steps:
                val = f" val {rec['val_loss']:.4f}" if "val_loss" in rec else ""
                print(
                    f"  [{i + 1}/{len(scopes)} {scope:>6}] step {rec['step']:5d}/{cfg.steps} loss {rec['loss']:.4f}"
                    f"{val} ({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )

        runs[scope] = train(run_cfg, on_step=progress)
    curves = {k: [r["loss"] for r in v["records"]] for k, v in runs.items()}
    baseline = "none" if "none" in scopes else "adamw" if "adamw" in scopes else scopes[0]
    slow = slowdowns(curves, baseline, cfg.ema)
    rows = []
    for scope in scopes:
        ev = runs[scope]["evals"][-1] if runs[scope]["evals"] else {}
        sd = slow[scope]["slowdown_pct"]
        rows.append(
            {
                "scope": scope,
                "final_train_loss": curves[scope][-1],
                "smoothed_train_loss": slow[scope]["smoothed_final_loss"],
                "final_val_loss": ev.get("val_loss"),
                "final_val_acc": ev.get("val_acc"),
                "steps_to_target": slow[scope]["steps_to_target"],
                "slowdown_pct": sd,
                "equivalent_slowdown_pct": slow[scope]["equivalent_slowdown_pct"],
            }
        )
    table = _table(rows, slow["_target"], cfg)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(table + "\n")
    result = {
        "config": dataclasses.asdict(cfg),
        "rows": rows,
        "target": slow["_target"],
        "curves": curves,
        "evals": {k: v["evals"] for k, v in runs.items()},
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2))
    if cfg.plot:
        result["plot"] = _plot(cfg, runs, curves, scopes, out / "compare.png")
        if result["plot"]:
            print(f"loss curves: {result['plot']}")
    return result


def _fmt(x: float | None, spec: str = ".4f") -> str:
    return "—" if x is None else format(x, spec)


def _table(rows: list[dict], target: dict, cfg: CompareConfig) -> str:
    has_acc = any(r["final_val_acc"] is not None for r in rows)
    head = (
        "| scope | final train loss | EMA train loss | final val loss |"
        + (" val acc |" if has_acc else "")
        + " steps to target | slowdown | baseline-equivalent slowdown |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        sd = "not reached" if r["steps_to_target"] is None else f"{r['slowdown_pct']:+.1f} %"
        acc = f" {_fmt(r['final_val_acc'], '.3f')} |" if has_acc else ""
        eq = r["equivalent_slowdown_pct"]
        eq = "— (below the baseline's curve)" if eq is None else f"{eq:+.1f} %"
        lines.append(
            f"| {r['scope']} | {_fmt(r['final_train_loss'])} | {_fmt(r['smoothed_train_loss'])} | "
            f"{_fmt(r['final_val_loss'])} |{acc} {_fmt(r['steps_to_target'], 'd')} | {sd} | {eq} |"
        )
    note = (
        f"\nTarget: the '{target['baseline']}' run's EMA-smoothed train loss at its last step, "
        f"{target['loss']:.4f} (first reached at step {target['baseline_steps']}); EMA decay {cfg.ema} with bias "
        f"correction. Slowdown = extra steps to reach it, relative to the baseline. Baseline-equivalent: steps run / "
        "steps the baseline needed to reach the scope's final EMA loss, relative to the same ratio for the baseline."
    )
    return "\n".join(lines) + "\n" + note


def _plot(cfg: CompareConfig, runs: dict, curves: dict, scopes: list[str], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed; no plot (pip install matplotlib)")
        return None
    has_val = any(runs[s]["evals"] for s in scopes)
    fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(12 if has_val else 7, 4.5), squeeze=False)
    for scope in scopes:
        xs = range(1, len(curves[scope]) + 1)
        (line,) = axes[0, 0].plot(xs, ema(curves[scope], cfg.ema), lw=1.5, label=scope)
        axes[0, 0].plot(xs, curves[scope], lw=0.5, alpha=0.25, color=line.get_color())
        if has_val:
            ev = runs[scope]["evals"]
            axes[0, 1].plot(
                [e["step"] for e in ev], [e["val_loss"] for e in ev], "o-", ms=3, label=scope, color=line.get_color()
            )
    # The first tenth of training spans most of the loss range: zoom on the rest, where the scopes differ.
    tail = [x for c in curves.values() for x in ema(c, cfg.ema)[max(len(c) // 10, 1) :]]
    if tail:
        lo, hi = min(tail), max(tail)
        axes[0, 0].set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    axes[0, 0].set(xlabel="step", ylabel=f"train loss (EMA {cfg.ema})", title="train loss")
    if has_val:
        axes[0, 1].set(xlabel="step", ylabel="val loss", title="validation loss")
    for ax in axes[0]:
        ax.legend()
        ax.grid(alpha=0.3)
    what = "AdamW under rotation scopes" if all(s in ALL_SCOPES for s in scopes) else "rotation scopes and baselines"
    fig.suptitle(f"{cfg.model}: {what} (block {cfg.block_size}, seed {cfg.seed})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)

"""Switching AdamW into a rotated basis mid-run: does carrying the moments over avoid a loss jump?

    python benchmarks/switch_basis.py [--steps 600] [--switch-at 300] [--scope global] [--out benchmarks/results]

Four runs of gpt-tiny on the embedded text (the `tiny` preset with `rotkern compare`'s run length and warm-up:
600 steps, 30 warm-up steps, block size 768; seed 0, so the same init and the same batches in every run), on
the CPU:

  adamw    torch.optim.AdamW throughout
  convert  AdamW, then at step K RotatedAdamW(rotation=scope) with the moments carried into the rotated basis
           (rotkern.from_adamw_state: m exactly, v through the element-wise square of the rotation, step kept)
  reset    the same switch with fresh moments (Adam's first step again: lr * sign(g~) per rotated coordinate)
  <scope>  RotatedAdamW(rotation=scope) throughout

Notation: L_i is the training loss of update i (0-based), measured on batch i with the parameters after i
updates; the switch comes before update K, so L_0 ... L_K are the same in the first three runs (checked) and
L_(K+1) is the first loss that sees the new optimizer. Figures (in the JSON and the markdown):

  noise            standard deviation of the successive differences L_i - L_(i-1) of the adamw run over the
                   `--window` (30) differences before the switch, i = K-29 ... K
  change_5         mean(L_(K+1..K+5)) - mean(L_(K-4..K)): the loss change across the switch
  max_jump_10      the largest single-step rise L_i - L_(i-1), i = K+1 ... K+10
  paired_5 / _10   the same run minus the adamw run on the same batches (which removes the batch-to-batch
                   noise that dominates the raw figures): mean over K+1..K+5, largest over K+1..K+10
  update_norm      ||theta after - theta before|| of updates K-1 (old optimizer) and K (new one), from the logs
  final            last train loss, its EMA (0.95, bias-corrected, as `compare` smooths), and the val loss

Outputs in --out: switch_basis.json (config, figures, every loss), switch_basis.md, switch_basis.png
(loss curves with the switch marked, a zoom around it, and the paired difference to the adamw run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from rotkern.trainers.common import device_name, ema, git_sha, versions  # noqa: E402
from rotkern.trainers.compare import CompareConfig  # noqa: E402
from rotkern.trainers.models import MODELS  # noqa: E402
from rotkern.trainers.train import PRESETS, TrainConfig, train  # noqa: E402


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "load average: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def base_config(args: argparse.Namespace) -> TrainConfig:
    # `rotkern compare --preset=tiny`'s run (CompareConfig's length and warm-up on top of the preset), minus its
    # periodic evals: one at the end is enough here and keeps the four runs inside the time budget.
    cmp = CompareConfig(**PRESETS["tiny"])
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in dataclasses.asdict(cmp).items() if k in fields})
    return dataclasses.replace(
        cfg, steps=args.steps, seed=args.seed, device="cpu", eval_every=0, print_every=0, out_dir="", save=False
    )


def runs(args: argparse.Namespace) -> dict[str, TrainConfig]:
    base = base_config(args)
    adamw = dataclasses.replace(base, optimizer="adamw")
    switch = dict(switch_at=args.switch_at, switch_to=args.scope)
    return {
        "adamw": adamw,
        "convert": dataclasses.replace(adamw, **switch, switch_state="convert"),
        "reset": dataclasses.replace(adamw, **switch, switch_state="reset"),
        args.scope: dataclasses.replace(base, optimizer="rotated-eager", rotation=args.scope),
    }


def figures(losses: dict[str, list[float]], records: dict[str, list[dict]], k: int, window: int) -> dict:
    a = losses["adamw"]
    diffs = [a[i] - a[i - 1] for i in range(k - window + 1, k + 1)]
    out: dict = {
        "noise": {
            "sd_successive_diff": statistics.stdev(diffs),
            "sd_loss": statistics.stdev(a[k - window : k + 1]),
            "window": [k - window + 1, k],
        },
        "same_until_switch": all(losses[r][: k + 1] == a[: k + 1] for r in ("convert", "reset")),
        "runs": {},
    }
    for name, xs in losses.items():
        row = {
            "change_5": statistics.fmean(xs[k + 1 : k + 6]) - statistics.fmean(xs[k - 4 : k + 1]),
            "max_jump_10": max(xs[i] - xs[i - 1] for i in range(k + 1, k + 11)),
            "final_loss": xs[-1],
            "final_ema_loss": ema(xs, 0.95)[-1],
        }
        if name != "adamw":
            d = [x - y for x, y in zip(xs, a, strict=True)]
            row["paired_5"] = statistics.fmean(d[k + 1 : k + 6])
            row["paired_max_10"] = max(d[k + 1 : k + 11])
            row["paired_last_50"] = statistics.fmean(d[-50:])
        norms = [r.get("update_norm") for r in records[name][k - 1 : k + 1]]
        if all(n is not None for n in norms):
            row["update_norm_before"], row["update_norm_after"] = norms
        out["runs"][name] = row
    return out


def plot(losses: dict[str, list[float]], k: int, scope: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"adamw": "C0", "convert": "C2", "reset": "C3", scope: "C1"}
    labels = {
        "adamw": "AdamW throughout",
        "convert": f"AdamW -> {scope} at K, moments converted",
        "reset": f"AdamW -> {scope} at K, moments reset",
        scope: f"{scope} throughout",
    }
    # Drawn in this order, AdamW on top of a wider convert line (they nearly coincide); the switched runs equal
    # AdamW up to K, so they start there.
    order = [scope, "reset", "convert", "adamw"]
    first = {scope: 0, "reset": k, "convert": k, "adamw": 0}
    width = {scope: 1.5, "reset": 1.5, "convert": 3.0, "adamw": 1.2}
    n = len(losses["adamw"])
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    ax = axes[0]
    for name in order:
        xs, smooth, i0 = losses[name], ema(losses[name], 0.95), first[name]
        ax.plot(range(i0, n), xs[i0:], lw=0.4, alpha=0.2, color=colors[name])
        ax.plot(range(i0, n), smooth[i0:], lw=width[name], color=colors[name], label=labels[name])
    tail = [x for xs in losses.values() for x in ema(xs, 0.95)[n // 10 :]]
    lo, hi = min(tail), max(tail)
    ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.set(xlabel="update i", ylabel="train loss (EMA 0.95; raw faint)", title=f"train loss (K = {k})")
    ax = axes[1]
    lo_i, hi_i = max(k - 20, 0), min(k + 41, n)
    for name in order:
        i0 = max(lo_i, first[name])
        xs = losses[name][i0:hi_i]
        ax.plot(range(i0, hi_i), xs, ".-", ms=3, lw=width[name] / 1.5, color=colors[name], label=labels[name])
    ax.set(xlabel="update i", ylabel="train loss (raw)", title=f"around the switch (updates {lo_i}-{hi_i - 1})")
    ax = axes[2]
    lo_i, hi_i = max(k - 10, 0), min(k + 151, n)
    for name in (scope, "reset", "convert"):
        d = [x - y for x, y in zip(losses[name], losses["adamw"], strict=True)][lo_i:hi_i]
        ax.plot(range(lo_i, hi_i), d, lw=0.5, alpha=0.35, color=colors[name])
        ax.plot(range(lo_i, hi_i), ema(d, 0.8), lw=1.5, color=colors[name], label=labels[name] + " (EMA 0.8)")
    ax.axhline(0.0, color=colors["adamw"], lw=0.8)
    ax.set(xlabel="update i", ylabel="loss - AdamW's loss on the same batch", title="paired difference to AdamW")
    for ax in axes:
        ax.axvline(k, color="k", ls="--", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"gpt-tiny: AdamW switched into the {scope} basis before update K = {k} (seed 0, block 768, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(res: dict) -> str:
    k, scope, f = res["switch_at"], res["scope"], res["figures"]
    noise = f["noise"]
    lines = [
        f"# Switching AdamW into the {scope} basis mid-run (gpt-tiny, CPU)",
        "",
        f"Command: `{res['command']}` ({res['wall_s']:.0f} s in all). gpt-tiny on the embedded text, "
        f"{res['steps']} steps, warm-up {res['config']['warmup_steps']}, lr {res['config']['lr']:g} cosine to "
        f"{res['config']['min_lr']:g}, batch {res['config']['batch_size']} x {res['context']} tokens, block "
        f"{res['config']['block_size']}, seed {res['config']['seed']}; switch before update K = {k} "
        f"(lr there {res['lr_at_switch']:.2e}).",
        f"Machine: {res['device']}; torch {res['versions']['torch']}, Python {res['versions']['python']}, "
        f"git {res['git']}. Load: `{res['uptime_before']}` before, `{res['uptime_after']}` after "
        "(a shared 2-core machine: wall times are noisy; the losses are deterministic).",
        "",
        f"L_i = loss of update i, on batch i, with the parameters after i updates; L_0..L_{k} are identical in "
        f"the adamw, convert and reset runs: {f['same_until_switch']}.",
        f"Noise of AdamW's loss before the switch: sd of the {len(range(*noise['window'])) + 1} successive "
        f"differences L_i - L_(i-1), i = {noise['window'][0]}..{noise['window'][1]}: "
        f"**{noise['sd_successive_diff']:.4f}** (sd of L itself over that window: {noise['sd_loss']:.4f}).",
        "",
        "| run | change across the switch (mean of 5 after - 5 before) | largest step rise in 10 after | "
        "paired: mean(L - L_adamw), 5 after | paired: max, 10 after | update norm K-1 -> K | final loss | "
        "final EMA loss | final val loss | paired: mean of last 50 | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in f["runs"].items():
        un = f"{row['update_norm_before']:.4f} -> {row['update_norm_after']:.4f}" if "update_norm_after" in row else "—"
        p5 = f"{row['paired_5']:+.4f}" if "paired_5" in row else "0"
        p10 = f"{row['paired_max_10']:+.4f}" if "paired_max_10" in row else "0"
        p50 = f"{row['paired_last_50']:+.4f}" if "paired_last_50" in row else "0"
        lines.append(
            f"| {name} | {row['change_5']:+.4f} | {row['max_jump_10']:+.4f} | {p5} | {p10} | {un} | "
            f"{row['final_loss']:.4f} | {row['final_ema_loss']:.4f} | {res['val_loss'][name]:.4f} | {p50} | "
            f"{res['run_wall_s'][name]:.0f} |"
        )
    c, r = f["runs"]["convert"], f["runs"]["reset"]
    lines += [
        "",
        f"In units of the pre-switch noise ({noise['sd_successive_diff']:.4f}): paired change over the 5 updates "
        f"after the switch {c['paired_5'] / noise['sd_successive_diff']:+.2f} (convert) vs "
        f"{r['paired_5'] / noise['sd_successive_diff']:+.2f} (reset); the first update after it is "
        f"{c['update_norm_after'] / c['update_norm_before']:.2f}x (convert) and "
        f"{r['update_norm_after'] / r['update_norm_before']:.2f}x (reset) the last AdamW update.",
        f"Over the last 50 updates, on the same batches, the runs are above AdamW by {c['paired_last_50']:+.4f} "
        f"(convert), {r['paired_last_50']:+.4f} (reset) and {f['runs'][scope]['paired_last_50']:+.4f} "
        f"({scope} throughout).",
        "",
        "Definitions: benchmarks/switch_basis.py (docstring). Figure: switch_basis.png.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600, help="steps per run (default 600, compare's)")
    ap.add_argument("--switch-at", type=int, default=300, help="K: switch before update K (default 300)")
    ap.add_argument("--scope", default="global", help="rotation scope switched into (default global)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--window", type=int, default=30, help="successive differences before K for the noise")
    # gpt-tiny gains little from a second intra-op thread, and on a shared 2-core machine the spinning threads of
    # a 2-thread pool made steps 4-9x slower than one thread (45 ms vs 180-440 ms per step at load 5).
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for switch_basis.{json,md,png}")
    args = ap.parse_args(argv)
    if not args.window + 5 <= args.switch_at <= args.steps - 50:
        ap.error(f"--switch-at must lie in [window + 5, steps - 50] = [{args.window + 5}, {args.steps - 50}]")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/switch_basis.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    up_before = uptime()
    t0 = time.perf_counter()
    losses, records, vals, walls = {}, {}, {}, {}
    for name, cfg in runs(args).items():
        t = time.perf_counter()
        res = train(cfg)
        walls[name] = time.perf_counter() - t
        records[name] = res["records"]
        losses[name] = [r["loss"] for r in res["records"]]
        vals[name] = res["evals"][-1]["val_loss"]
        print(f"{name:>8}: final loss {losses[name][-1]:.4f}, val {vals[name]:.4f} ({walls[name]:.1f} s)", flush=True)
    cfg = runs(args)["convert"]
    result = {
        "command": command,
        "steps": args.steps,
        "switch_at": args.switch_at,
        "scope": args.scope,
        "context": cfg.context or MODELS[cfg.model].block_size,
        "lr_at_switch": records["convert"][args.switch_at]["lr"],
        "config": dataclasses.asdict(cfg),
        "device": device_name(torch.device("cpu")),
        "versions": versions(),
        "git": git_sha(),
        "uptime_before": up_before,
        "uptime_after": uptime(),
        "wall_s": time.perf_counter() - t0,
        "run_wall_s": walls,
        "val_loss": vals,
        "figures": figures(losses, records, args.switch_at, args.window),
        "losses": losses,
    }
    (out / "switch_basis.json").write_text(json.dumps(result, indent=1))
    (out / "switch_basis.md").write_text(markdown(result))
    plot(losses, args.switch_at, args.scope, out / "switch_basis.png")
    print(markdown(result))
    print(f"wrote {out}/switch_basis.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Turn bench_step.json into the README's performance section (markdown) and its PNG plots.

    python benchmarks/report.py [benchmarks/results/latest/bench_step.json] [-o FILE] [--plots]
        [--image-prefix PATH/]

Markdown goes to stdout (or -o). Image links are ``<image-prefix><name>.png``; the prefix defaults to the
JSON's folder as given, so the section works when pasted into the README at the repository root. --plots
(re)draws the PNGs next to the JSON (bench_step.py draws them at the end of a run; this redraws a cut run's).
Needs only the standard library, plus matplotlib for --plots.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SCOPE_ORDER = ("none", "global", "layer", "output", "input")
BACKEND_ORDER = ("torch-fused", "torch-foreach", "torch-for-loop", "rotated-fused", "rotated-compile", "rotated-eager")
PRECISION_ORDER = ("-", "tf32x3", "tf32", "ieee")
SET_ORDER = ("gpt2", "vit", "resnet", "synthetic")
SET_TITLES = {"gpt2": "GPT-2 124M", "vit": "ViT-S/16", "resnet": "ResNet-50", "synthetic": "synthetic"}


def _key(r: dict) -> tuple:
    def idx(seq, x):
        return seq.index(x) if x in seq else len(seq)

    return idx(BACKEND_ORDER, r["backend"]), idx(SCOPE_ORDER, r["scope"]), idx(PRECISION_ORDER, r["precision"])


def _f(x, fmt: str = ".3f", none: str = "–") -> str:
    return none if x is None else format(x, fmt)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _label(r: dict) -> str:
    return f"{r['backend']} {r['scope']}" + (f" {r['precision']}" if r["precision"] != "-" else "")


def _status(r: dict, width: int = 100) -> str:
    s = f"{r['status']}: {r['reason']}" if r.get("reason") else r["status"]
    return s if len(s) <= width else s[: width - 1] + "…"


def _title(data: dict, s: str) -> str:
    return ("tiny " + s) if data["meta"].get("dry_run") else SET_TITLES.get(s, s)


def _table_rows(rows: list[dict]) -> list[dict]:
    """The tables' rows: the table phase, plus the compiled rows (their phase re-times anchors and eager rows)."""
    return [r for r in rows if r["phase"] == "table" or (r["phase"] == "compile" and r["backend"] == "rotated-compile")]


# %% markdown ------------------------------------------------------------------------------------------
def render(data: dict, image_prefix: str = "") -> str:
    """The performance section, as markdown."""
    m, rows = data["meta"], data["rows"]
    out = ["## Performance", ""]
    if m.get("dry_run"):
        out += ["> **Dry run on the CPU**: tiny shapes, host-clock timings. These numbers check the plumbing only.", ""]
    if not m.get("complete"):
        out += ["> The run did not finish: these are the phases it completed.", ""]
    out += [
        f"Measured on {m['gpu']} with torch {m['torch']} (CUDA {m.get('cuda')}), Triton {m.get('triton')}, "
        f"git `{str(m.get('git'))[:12]}`, {m.get('date', '')}; `python benchmarks/bench_step.py` took "
        f"{m['wall_s']:.0f} s of a {m['budget_s']:.0f} s budget. Medians of up to {m['reps']} interleaved rounds "
        f"(CUDA events; p20–p80 in brackets), fp32 params and moments, block size n = {m['block_size']}, AdamW "
        "hyperparameters as nanoGPT's; all rows step the same parameters, each with its own state. "
        "× torch fused = time / `torch.optim.AdamW(fused=True)` timed in the same interleaved rounds.",
        "",
    ]
    c = data.get("ceilings")
    if c:
        gemm = c["gemm_TFLOPs"].get(str(m["block_size"])) or next(iter(c["gemm_TFLOPs"].values()), {})
        out += [
            f"**Ceilings (same run).** Device copy {c['copy_GBps']:.0f} GB/s (read + write); random gather "
            f"{c['gather_Gelem_per_s']:.2f} Gelem/s (`index_select` through a random permutation), scatter "
            f"{c['scatter_Gelem_per_s']:.2f} Gelem/s; cuBLAS (b×n)@(n×n) at n = {m['block_size']}: "
            f"{_f(gemm.get('fp32'), '.3g')} TFLOP/s fp32, {_f(gemm.get('tf32'), '.3g')} TFLOP/s TF32. "
            "A row's floor is max(stream, GEMM, permutation): 28 bytes per parameter at copy bandwidth; the "
            "rotations' FLOPs (4 nb² per block) at the GEMM rate of the row's precision (tf32x3 = 3 TF32 "
            "products); two random passes over the permuted coordinates at the gather rate. "
            "Of floor = floor / time.",
            "",
        ]
    table = _table_rows(rows)
    sets = [s for s in SET_ORDER if any(r["set"] == s for r in table)]
    titles = {s: _title(data, s) for s in sets}
    for s in sets[:1]:
        info = data["sets"].get(s, {})
        out += [f"### Optimizer step: {titles[s]} ({info.get('params', 0):,} parameters)", ""]
        out += _step_table([r for r in table if r["set"] == s])
    if len(sets) > 1:
        out += ["### Every parameter set: step ms (× torch fused)", ""]
        out += _pivot(table, sets, data["sets"], titles)
    out += _e2e(data.get("e2e") or {}, _title(data, "gpt2"))
    out += _scaling(data, image_prefix)
    out += _crosscheck(data.get("crosscheck") or [])
    plots = [p for p in data.get("plots", []) if p.startswith("overhead_")]
    if plots:
        out += ["Overhead vs torch fused AdamW per scope: " + ", ".join(f"[{p}]({image_prefix}{p})" for p in plots), ""]
    notes = [(s["phase"], f"skipped: {s['reason']}", s["what"]) for s in data.get("skipped", [])]
    notes += [(r["phase"], _status(r, 300), f"{r['set']} {_label(r)}") for r in rows if r["status"] != "ok"]
    notes += [(e["phase"], "error", e["error"]) for e in data.get("errors", [])]
    if notes:
        grouped: dict[tuple[str, str], list[str]] = {}
        for phase, why, what in notes:
            grouped.setdefault((phase, why), []).append(what)
        out += ["<details><summary>Skipped, n/a and errors</summary>", ""]
        out += [f"- {phase}, {why}: {', '.join(whats)}" for (phase, why), whats in grouped.items()]
        out += ["", "</details>", ""]
    return "\n".join(out) + "\n"


def _step_table(rows: list[dict]) -> list[str]:
    out = [
        "| backend | scope | precision | ms (p20–p80) | floor ms (bound) | of floor | × torch fused | extra MB "
        "| state MB |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=_key):
        if r["median_ms"] is None:
            out.append(f"| {r['backend']} | {r['scope']} | {r['precision']} | {_status(r)} | | | | | |")
            continue
        out.append(
            f"| {r['backend']} | {r['scope']} | {r['precision']} | {r['median_ms']:.3f} ({r['p20_ms']:.3f}–"
            f"{r['p80_ms']:.3f}) | {_f(r.get('floor_ms'))} ({r.get('bound') or '–'}) | {_f(r.get('of_floor'), '.2f')} "
            f"| {_f(r.get('vs_torch_fused'), '.2f')} | {_f(r.get('step_extra_mb'), '.0f')} "
            f"| {_f(r.get('persistent_mb'), '.0f')} |"
        )
    return out + ["", "extra MB: peak allocation over one step beyond what is held before it; state MB: memory "
                  "the optimizer's first step kept (moments, permutations, plans).", ""]  # fmt: skip


def _pivot(rows: list[dict], sets: list[str], info: dict, titles: dict) -> list[str]:
    head = " | ".join(f"{titles[s]} ({info.get(s, {}).get('params', 0) / 1e6:.3g}M)" for s in sets)
    out = [f"| row | {head} |", "|---|" + "---:|" * len(sets)]
    keys = sorted({(r["backend"], r["scope"], r["precision"]) for r in rows}, key=lambda k: _key(dict(zip(
        ("backend", "scope", "precision"), k, strict=True))))  # fmt: skip
    for k in keys:
        cells = []
        for s in sets:
            r = next((x for x in rows if x["set"] == s and (x["backend"], x["scope"], x["precision"]) == k), None)
            if r is None:
                cells.append("")
            elif r["median_ms"] is None:
                cells.append(r["status"])
            else:
                cells.append(f"{r['median_ms']:.2f} ({_f(r.get('vs_torch_fused'), '.1f')}×)")
        label = f"{k[0]} {k[1]}" + (f" {k[2]}" if k[2] != "-" else "")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out + [""]


def _e2e(e: dict, title: str) -> list[str]:
    if not e.get("rows"):
        return []
    out = [
        f"### End to end: {title} training iteration ({e['batch']}×{e['seq']} tokens, {e['autocast']} autocast, "
        f"{e['attention']} attention)",
        "",
        "| optimizer | scope | precision | iteration ms (p20–p80) | fwd+bwd ms | step ms | step share "
        "| adds vs AdamW |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(e["rows"], key=_key):
        out.append(
            f"| {r['backend']} | {r['scope']} | {r['precision']} | {r['iter_ms']:.1f} ({r['iter_p20_ms']:.1f}–"
            f"{r['iter_p80_ms']:.1f}) | {r['fwd_bwd_ms']:.1f} | {r['step_ms']:.2f} | {_pct(r['step_share'])} "
            f"| {_pct(r.get('adds_vs_adamw'))} |"
        )
    acc = e.get("acceptance", {}).get("rows", [])
    verdict = ", ".join(
        f"{a['scope']} {a['precision']} {_pct(a['adds_vs_adamw'])} {'✓' if a['ok'] else '✗'}" for a in acc
    )
    out += [
        "",
        "Step share = step / iteration, the step timed from the end of backward (CUDA events, as in training: the "
        "host may queue the step while backward still runs). Adds vs AdamW = (step − AdamW's step) / AdamW's "
        "iteration: what replacing fused AdamW costs the iteration. Acceptance (the fused step adds ≤ 5 % for "
        "output and layer): " + (verdict or "not measured") + ".",
        "",
    ]
    return out


def _scaling(data: dict, prefix: str) -> list[str]:
    sc = data.get("scaling") or {}
    out = []
    fits_d = (sc.get("params") or {}).get("fits_ms_vs_params") or {}
    fits_n = (sc.get("block") or {}).get("fits_ms_vs_n") or {}
    if not (fits_d or fits_n):
        return out
    out += ["### Scaling", "", "| series | x | fit: ms = a + b·x | R² | points |", "|---|---|---|---:|---:|"]
    for name, f in fits_d.items():
        if f:
            out.append(
                f"| {name} | params | {f['intercept']:.3f} + {f['slope'] * 1e6:.4f}·(params/1M) | {f['r2']:.4f} | "
                f"{f['points']} |"
            )
    for name, f in fits_n.items():
        if f:
            fit = f"{f['intercept']:.3f} + {f['slope']:.5f}·n"
            out.append(f"| {name} | block n | {fit} | {f['r2']:.4f} | {f['points']} |")
    out.append("")
    plots = data.get("plots", [])
    for p, alt in (("scaling_params.png", "step time vs parameters"), ("scaling_block.png", "step time vs n")):
        if p in plots:
            out.append(f"![{alt}]({prefix}{p})")
    return out + [""]


def _crosscheck(cc: list[dict]) -> list[str]:
    if not cc:
        return []
    out = [
        "### Cross-check of the timing method",
        "",
        "| row | events ms | Timer ms (ratio) | do_bench ms (ratio) |",
        "|---|---:|---:|---:|",
    ]
    for c in cc:
        db = f"{c['do_bench_ms']:.3f} ({c['do_bench_ratio']:.3f})" if "do_bench_ms" in c else "–"
        timer = f"{c['timer_ms']:.3f} ({c['timer_ratio']:.3f})"
        out.append(f"| {c['set']} {c['row']} | {c['events_ms']:.3f} | {timer} | {db} |")
    ok = all(c["ok"] for c in cc)
    out += [
        "",
        "Timer: `torch.utils.benchmark.Timer.blocked_autorange` (host clock, synchronised, back-to-back calls); "
        "do_bench: `triton.testing.do_bench` (CUDA events, L2 flushed before every call). Acceptance, every ratio "
        f"within 10 %: {'✓' if ok else '✗'}.",
        "",
    ]
    return out


# %% plots ---------------------------------------------------------------------------------------------
def plot(data: dict, out_dir: str | Path) -> list[str]:
    """Write the PNGs next to the JSON; returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    written = []
    rows = [r for r in data["rows"] if r["median_ms"] is not None]
    title = f"{data['meta']['gpu']}, torch {data['meta']['torch']}"

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        written.append(name)

    for phase, key, name, xlabel in (
        ("scale-d", "d", "scaling_params.png", "parameters"),
        ("scale-n", "block_size", "scaling_block.png", "block size n"),
    ):
        pts = [r for r in rows if r["phase"] == phase]
        if not pts:
            continue
        fits = data["scaling"].get("params" if phase == "scale-d" else "block") or {}
        fits = fits.get("fits_ms_vs_params" if phase == "scale-d" else "fits_ms_vs_n") or {}
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label in sorted({_label(r) for r in pts}, key=lambda s: s):
            xs, ys = zip(*sorted((r[key], r["median_ms"]) for r in pts if _label(r) == label), strict=True)
            f = fits.get(label)
            extra = f" (R² {f['r2']:.3f})" if f else ""
            (line,) = ax.plot(xs, ys, "o", label=label + extra)
            if f:
                ax.plot(xs, [f["intercept"] + f["slope"] * x for x in xs], "-", color=line.get_color(), lw=1)
        ax.set_xscale("log", base=2 if phase == "scale-n" else 10)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("step ms (median)")
        ax.set_title(f"step time vs {xlabel}\n{title}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        save(fig, name)

    table = [r for r in _table_rows(rows) if r.get("vs_torch_fused")]
    for scope in SCOPE_ORDER:
        sel = [r for r in table if r["scope"] == scope and not r["backend"].startswith("torch-")]
        if not sel:
            continue
        sets = [s for s in SET_ORDER if any(r["set"] == s for r in sel)]
        labels = sorted({(r["backend"], r["precision"]) for r in sel})
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(len(labels), 1)
        for i, (backend, prec) in enumerate(labels):
            ys = [next((r["vs_torch_fused"] for r in sel if r["set"] == s and (r["backend"], r["precision"]) ==
                        (backend, prec)), 0) for s in sets]  # fmt: skip
            ax.bar([j + i * width for j in range(len(sets))], ys, width, label=f"{backend} {prec}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(sets))], [_title(data, s) for s in sets])
        ax.set_yscale("log")
        ax.set_ylabel("step time / torch fused AdamW")
        ax.set_title(f"scope {scope}: overhead vs torch fused AdamW\n{title}", fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        save(fig, f"overhead_{scope}.png")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="?", default="benchmarks/results/latest/bench_step.json")
    ap.add_argument("-o", "--output", help="write the markdown here instead of stdout")
    ap.add_argument("--image-prefix", default=None, help="prefix of image links (default: the JSON's folder + /)")
    ap.add_argument("--plots", action="store_true", help="(re)draw the PNGs next to the JSON")
    args = ap.parse_args(argv)
    path = Path(args.json)
    if not path.exists():
        print(f"report: {path} does not exist; run benchmarks/bench_step.py first", file=sys.stderr)
        return 2
    data = json.loads(path.read_text())
    if args.plots:
        data["plots"] = plot(data, path.parent)
    prefix = args.image_prefix if args.image_prefix is not None else f"{path.parent.as_posix()}/"
    md = render(data, image_prefix=prefix)
    if args.output:
        Path(args.output).write_text(md)
    else:
        sys.stdout.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""summary.md of a ``benchmarks/gpu_run.sh`` run: each phase's status and seconds, and the headline figures.

    python benchmarks/gpu_summary.py OUT        # reads OUT/phases.tsv, the phase logs and JSONs; writes OUT/summary.md

gpu_run.sh calls it after every phase, so a run cut anywhere still leaves a summary of what it did. Statuses:
``pass`` (exit 0), ``fail`` (another exit status), ``cut`` (stopped by its time limit: SIGINT, its failures
so far printed), ``stand-in`` (compute-sanitizer absent: the step ran without it), ``skipped`` (no time left to
start it), ``not run`` (not reached yet, or not in this mode).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# Phases in the order gpu_run.sh runs them (its `all` mode), with what each is for.
PHASES = {
    "env": "GPU, driver, torch, Triton, git sha",
    "correctness": "GPT-2 124M shapes, every static scope, tf32x3: fused vs eager vs float64; no host sync",
    "memcheck": "compute-sanitizer memcheck: one small fused step each, none / output / global",
    "racecheck": "compute-sanitizer racecheck: the same steps",
    "speed": "GPT-2 124M step: fused vs torch.optim.AdamW(fused=True) and eager, per scope and precision",
    "tf32_probe": "signed bias of TF32 products and of the tf32 step against float64",
    "gpu_tests": "the remaining GPU tests (-m 'gpu or interpret', tests/kernels, tests/optim)",
    "bases": "svd / eigen steps (bench_bases.py)",
    "e2e": "share of the optimizer step in a GPT-2 training iteration",
}


def read_phases(out: Path) -> dict[str, dict]:
    rows = {}
    tsv = out / "phases.tsv"
    if tsv.exists():
        for line in tsv.read_text().splitlines():
            name, status, seconds, rc, limit = (line.split("\t") + [""] * 5)[:5]
            rows[name] = dict(status=status, seconds=seconds, rc=rc, limit=limit)
    return rows


def _log(out: Path, name: str) -> str:
    f = out / f"{name}.log"
    return f.read_text(errors="replace") if f.exists() else ""


def _pytest_line(log: str) -> str:
    """pytest's final counts line, e.g. '12 passed, 2 skipped in 31.9s'."""
    lines = [ln.strip("= ") for ln in log.splitlines() if re.search(r"\d+ (passed|failed|error|skipped)", ln)]
    return lines[-1] if lines else "no pytest summary"


def _failures(log: str, limit: int = 12) -> list[str]:
    return [ln for ln in log.splitlines() if ln.startswith(("FAILED ", "ERROR "))][:limit]


def headline(out: Path, name: str) -> str:
    log = _log(out, name)
    if name == "env":
        first = next((ln for ln in log.splitlines() if ln.strip()), "")
        return first[:160]
    if name in ("correctness", "gpu_tests"):
        return _pytest_line(log)
    if name in ("memcheck", "racecheck"):
        verdicts = re.findall(r"ERROR SUMMARY: (\d+) error", log)
        steps = len(re.findall(r"^sanitize_step: .* ok", log, flags=re.M))
        bad = len(re.findall(r"^sanitize_step: .* MISMATCH", log, flags=re.M))
        tool = f"ERROR SUMMARY {', '.join(verdicts)} errors" if verdicts else "no sanitizer verdict"
        return f"{tool}; {steps} steps ok, {bad} mismatched"
    if name == "speed":
        return _speed_line(out / "bench_step.json")
    if name == "tf32_probe":
        return _probe_line(out / "tf32_probe.json")
    if name == "bases":
        return "bench_bases.md written" if (out / "bench_bases.md").exists() else "no bench_bases.md"
    if name == "e2e":
        return _e2e_line(out / "e2e" / "bench_step.json")
    return ""


def _speed_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return [r for r in data.get("rows", []) if r.get("set") == "gpt2" and r.get("phase") == "table"]


def _speed_line(path: Path) -> str:
    rows = [r for r in _speed_rows(path) if r["backend"] == "rotated-fused" and r.get("vs_torch_fused")]
    if not rows:
        return "no fused GPT-2 row timed"
    best = {}
    for r in rows:
        if r["scope"] not in best or r["vs_torch_fused"] < best[r["scope"]]["vs_torch_fused"]:
            best[r["scope"]] = r
    return "fused x torch fused AdamW: " + ", ".join(
        f"{s} {r['vs_torch_fused']:.2f} ({r['precision']})" for s, r in best.items()
    )


def speed_table(path: Path) -> list[str]:
    """The GPT-2 table: per scope and precision, median ms of each backend and the fused step x torch fused."""
    rows = _speed_rows(path)
    if not rows:
        return []
    anchor = next((r for r in rows if r["backend"] == "torch-fused" and r.get("median_ms")), None)
    dry = json.loads(path.read_text()).get("meta", {}).get("dry_run")
    how = "dry run: tiny GPT on the CPU, fused rows under the interpreter" if dry else "CUDA events"
    out = ["", f"### GPT-2 124M step ({how}; median ms)", ""]
    if anchor:
        out.append(f"torch.optim.AdamW(fused=True): {anchor['median_ms']:.3f} ms")
        out.append("")
    out += ["| scope | precision | fused ms | x torch fused | eager ms | status |", "|---|---|---|---|---|---|"]
    keyed = {(r["backend"], r["scope"], r["precision"]): r for r in rows}
    for (backend, scope, precision), r in keyed.items():
        if backend != "rotated-fused":
            continue
        eager = keyed.get(("rotated-eager", scope, precision), {})
        fmt = lambda x, f: format(x, f) if isinstance(x, (int, float)) else "-"  # noqa: E731
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {str(r.get('reason'))[:60]}"
        out.append(
            f"| {scope} | {precision} | {fmt(r.get('median_ms'), '.3f')} | {fmt(r.get('vs_torch_fused'), '.2f')} | "
            f"{fmt(eager.get('median_ms'), '.3f')} | {status} |"
        )
    data = json.loads(path.read_text())
    cut = [s for s in data.get("skipped", []) if s.get("phase") == "table"]
    if cut:
        out += [""] + [f"- cut: {s['what']} ({s['reason']})" for s in cut]
    if data.get("meta", {}).get("interrupted"):
        out += ["", f"- interrupted at {data['meta'].get('interrupted_at')}"]
    return out


def _probe_line(path: Path) -> str:
    if not path.exists():
        return "no tf32_probe.json"
    res = json.loads(path.read_text())["results"]
    keys = ("cublas-tf32", "triton-tf32", "triton-tf32-rn", "rotkern-output-g~", "rotkern-global-g~")
    return "bias: " + ", ".join(f"{k} {res[k]['bias']:+.1e}" for k in keys if k in res)


def _e2e_line(path: Path) -> str:
    if not path.exists():
        return "no e2e results"
    rows = json.loads(path.read_text()).get("e2e", {}).get("rows", [])
    parts = [
        f"{r['backend']} {r['scope']} {r['precision']} +{100 * r['adds_vs_adamw']:.1f}%"
        for r in rows
        if "adds_vs_adamw" in r and r["backend"] != "torch-fused"
    ]
    return ("step adds to the iteration: " + ", ".join(parts)) if parts else "no e2e rows"


def write_summary(out: Path) -> Path:
    phases = read_phases(out)
    env = _log(out, "env").strip().splitlines()
    lines = ["# gpu_run.sh summary", ""]
    lines += [f"    {ln}" for ln in env[:8]] + [""]
    lines += ["| phase | status | seconds (limit) | headline |", "|---|---|---|---|"]
    for name, what in PHASES.items():
        p = phases.get(name)
        if p is None:
            lines.append(f"| {name} | not run | - | {what} |")
            continue
        head = headline(out, name) if p["status"] != "skipped" else what
        lines.append(f"| {name} | {p['status']} | {p['seconds']} ({p['limit']}) | {head} |")
    for name in ("correctness", "memcheck", "racecheck", "gpu_tests"):
        if name in phases:
            fails = _failures(_log(out, name))
            if fails:
                lines += ["", f"### {name}: failures", ""] + [f"    {f}" for f in fails]
    lines += speed_table(out / "bench_step.json")
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/gpu_summary.py OUT")
    print(write_summary(Path(sys.argv[1])))

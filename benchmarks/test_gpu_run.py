"""benchmarks/gpu_run.sh on the CPU (GPU_RUN_DRY=1): a phase cut by its limit prints its failures, the phases after
it still run, and summary.md says what happened; a phase with no time left is skipped; OUT never holds more than
8 files. (The whole dry run is `make test-gpu-dry`.)"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"

PLANTED = """
import time


def test_planted_failure():
    assert 1 == 2, "planted failure before the cut"


def test_planted_slow_phase():
    time.sleep(120)
"""


def _run(tmp_path: Path, phases: str, timeout: float = 180, **env) -> subprocess.CompletedProcess:
    full = {
        **os.environ,
        "GPU_RUN_DRY": "1",
        "OUT": str(tmp_path / "out"),
        "PYTHON": sys.executable,
        "GPU_RUN_PHASES": phases,
        "TMPDIR": str(tmp_path),
        **env,
    }
    return subprocess.run(["bash", str(SCRIPT), "all"], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _summary_rows(out: Path) -> dict[str, list[str]]:
    rows = {}
    for line in (out / "summary.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("phase", "---"):
            rows[cells[0]] = cells
    return rows


@pytest.mark.slow
def test_a_slow_phase_is_cut_with_its_failures_printed_and_the_next_phase_runs(tmp_path):
    planted = tmp_path / "test_planted.py"
    planted.write_text(PLANTED)
    run = _run(
        tmp_path,
        "env,correctness,tf32_probe",
        GPU_RUN_CMD_correctness=f"{sys.executable} -m pytest -q -rfE -p no:cacheprovider {planted}",
        GPU_RUN_LIMIT_correctness="8",
    )
    out = tmp_path / "out"
    assert run.returncode == 1, run.stdout + run.stderr  # a phase did not pass
    # The cut phase printed pytest's failure text and counts (SIGINT, not SIGTERM), then the next phase ran.
    assert "planted failure before the cut" in run.stdout
    assert "FAILED" in run.stdout and "1 failed" in run.stdout
    assert "== correctness: cut" in run.stdout and "== tf32_probe: pass" in run.stdout
    rows = _summary_rows(out)
    assert rows["env"][1] == "pass"
    assert rows["correctness"][1] == "cut" and rows["correctness"][2].endswith("(8)")
    assert "1 failed" in rows["correctness"][3]
    assert rows["tf32_probe"][1] == "pass" and "bias" in rows["tf32_probe"][3]
    assert rows["speed"][1] == "not run"
    assert "planted failure" in (out / "summary.md").read_text()  # the failures section
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "results.tgz" in files, files
    with tarfile.open(out / "results.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"correctness.log", "tf32_probe.json", "phases.tsv", "summary.md"} <= names


def test_a_phase_without_time_left_is_skipped_and_said_so(tmp_path):
    # env takes a fixed 22 s (not the box's speed): 40 - 5 leaves 35 s before it, 40 - 22 - 5 = 13 after it.
    run = _run(tmp_path, "env,correctness", GPU_RUN_SECONDS="40", GPU_RUN_LIMIT_env="30",
               GPU_RUN_CMD_env="sleep 22", GPU_RUN_CMD_correctness="echo never")  # fmt: skip
    rows = _summary_rows(tmp_path / "out")
    assert rows["env"][1] == "pass", run.stdout + run.stderr
    assert rows["correctness"][1] == "skipped"
    assert "== correctness: skipped" in run.stdout and "never" not in run.stdout


def test_an_unknown_mode_is_refused(tmp_path):
    run = subprocess.run(["bash", str(SCRIPT), "everything"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "OUT": str(tmp_path / "out")})  # fmt: skip
    assert run.returncode == 2 and "unknown mode 'everything'" in run.stderr


def test_the_readme_phase_table_is_the_script_s():
    """The top README's phase table (names, order, limits) is gpu_run.sh's LIMIT table and `all` order."""
    import re

    script = SCRIPT.read_text()
    limits = dict(re.findall(r"\[(\w+)\]=(\d+)", script.split("declare -A LIMIT=(", 1)[1].split(")", 1)[0]))
    order = re.search(r"all\) phases=\"([^\"]+)\"", script).group(1).split()
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (`[^|]+`) \| [^|]+ \| ([^|]+) \|$", readme.split("**What ran where.**", 1)[1], re.M)
    documented, doc_limits = [], {}
    for names, limit in rows:
        phases = re.findall(r"`(\w+)`", names)
        values = [v.strip() for v in limit.split(",")]
        for name, value in zip(phases, values * len(phases) if len(values) == 1 else values, strict=True):
            documented.append(name)
            doc_limits[name] = "0" if value == "the rest" else value
    assert documented == order
    assert doc_limits == limits

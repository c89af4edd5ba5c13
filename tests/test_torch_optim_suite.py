"""PyTorch's own optimizer suite (``TestOptimRenewed`` in pytorch's ``test/test_optim.py``) run against
rotkern's optimizers, registered as entries derived from torch's AdamW ``OptimizerInfo``
(``tests/_torch_suite_plugin.py``: RotatedAdamW and FusedRotatedAdamW with rotation none, global with a
4-wide block, and output).

Every test that ``torch.optim.AdamW`` passes in the same run must pass for every entry, except the tests in
:data:`EXCLUDED`, each with the reason it does not apply. The suite is not in the torch wheel and is never
downloaded: point ``ROTKERN_TORCH_TEST_OPTIM`` at ``test/test_optim.py`` of a pytorch checkout for the torch
version installed (its ``test/optim/`` siblings beside it); without it this test skips, saying so.

    ROTKERN_TORCH_TEST_OPTIM=~/pytorch/test/test_optim.py .venv/bin/pytest tests/test_torch_optim_suite.py -s
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

from ._torch_suite_plugin import VARIANTS

SUITE = os.environ.get("ROTKERN_TORCH_TEST_OPTIM")
ROOT = Path(__file__).resolve().parents[1]

# Test (the suite's name, without the optimizer, device and dtype) -> (the entries' scopes it does not apply to,
# why). Every other test torch's AdamW passes must pass for all six entries.
ALL = frozenset({"None", "Global", "Output"})
EXCLUDED: dict[str, tuple[frozenset, str]] = {
    "test_step_is_noop_for_zero_grads": (
        ALL,
        "the test lowers lr to 1e-5 only for classes named AdamW, whose default weight_decay=1e-2 moves params "
        "without gradients; at the default lr=1e-3 torch.optim.AdamW moves them by the same 1e-5 and fails too",
    ),
    "test_fused_error_on_params_on_meta": (
        ALL,
        "expects torch's fused kernels' refusal of meta params; rotkern keeps fused= only as a compatibility flag "
        "(its fused path is chosen by backend=) and steps meta params as any others, computing nothing",
    ),
    "test_complex_2d": (
        frozenset({"Global"}),
        "compares a complex param with its real and imaginary parts as two params: a rotation across params "
        "meets their coordinates in another order (interleaved vs one part after the other)",
    ),
    "test_complex": (
        frozenset({"Output"}),
        "its real twin of a complex vector is an (n, 2) matrix, whose rows the output scope rotates; rotkern "
        "steps a complex vector as the vector of its 2n coordinates",
    ),
}


def _scope(entry: str) -> str:
    return next(s for s in ALL if entry.endswith(s))


def _outcomes(junit: Path) -> dict[str, str]:
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = case.get("name")
        status = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                status = "failed"
            elif child.tag == "skipped":
                status = "skipped"
        out[name] = status
    return out


def _base(name: str) -> str:
    """The suite's test without the optimizer, device and dtype: test_foo_AdamW_cpu_float32 -> test_foo."""
    return re.sub(r"_AdamW_.*$", "", name)


@pytest.mark.skipif(
    not SUITE,
    reason="set ROTKERN_TORCH_TEST_OPTIM to a pytorch checkout's test/test_optim.py for the installed torch "
    "(not in the torch wheel; never downloaded)",
)
def test_torch_optim_suite_passes_what_torch_adamw_passes(tmp_path):
    suite = Path(SUITE).expanduser().resolve()
    if not suite.is_file():
        pytest.fail(f"ROTKERN_TORCH_TEST_OPTIM={SUITE}: no such file")
    pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest (pip install -e '.[test]')")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    junit = tmp_path / "junit.xml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(suite.parent)]), "ROTKERN_BACKEND": ""}
    cmd = [
        sys.executable, "-m", "pytest", str(suite), "-p", "tests._torch_suite_plugin", "-k",
        "TestOptimRenewed and AdamW", "-q", "-c", str(tmp_path / "pytest.ini"), "--rootdir", str(suite.parent),
        "-p", "no:cacheprovider", f"--junitxml={junit}",
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=suite.parent, env=env, capture_output=True, text=True, timeout=3000)
    assert junit.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    outcomes = _outcomes(junit)
    adamw = {n: s for n, s in outcomes.items() if "_AdamW_" in n}
    assert adamw, "the suite generated no AdamW tests: is this pytorch's test/test_optim.py?"
    counts = {e: Counter() for e in ["AdamW", *VARIANTS]}
    missing = []
    for name, status in adamw.items():
        counts["AdamW"][status] += 1
        for entry in VARIANTS:
            ours = outcomes.get(name.replace("_AdamW_", f"_{entry}_"), "not generated")
            counts[entry][ours] += 1
            excluded = EXCLUDED.get(_base(name))
            if excluded and _scope(entry) in excluded[0]:
                continue
            if status == "passed" and ours != "passed":
                missing.append(f"{name.replace('_AdamW_', f'_{entry}_')}: {ours}")
    print("\n" + "\n".join(f"{e}: {dict(c)}" for e, c in counts.items()))
    assert not missing, f"{len(missing)} tests torch's AdamW passes do not pass:\n" + "\n".join(sorted(missing))

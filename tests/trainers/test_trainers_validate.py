import os
import subprocess
import sys

import pytest

import rotkern
from rotkern.trainers.__main__ import main
from rotkern.trainers.validate import ValidateConfig, validate

from .._trainer_helpers import CPU, CPU_ARGV, BrokenFused

SMALL = dict(steps=3, batch_size=4, print_every=0, block_size=64, **CPU)


@pytest.mark.parametrize("model", ["gpt-tiny", "vit-tiny", "resnet-tiny"])
def test_validate_plumbing_for_every_scope(model):
    """Without the interpreter the fused optimizer runs its eager fallback on CPU: this checks the plumbing."""
    extra = {"context": 16} if model == "gpt-tiny" else {}
    report = validate(ValidateConfig(model=model, **SMALL, **extra))
    assert report["passed"], report
    assert set(report["scopes"]) == set(rotkern.SCOPES)
    for r in report["scopes"].values():
        assert r["backends"]["eager"].startswith("eager") and r["backends"]["fused"]
        assert len(r["steps"]) == 3


def test_validate_fails_past_tolerance(monkeypatch, capsys):
    monkeypatch.setattr(rotkern, "FusedRotatedAdamW", BrokenFused, raising=False)
    argv = ["validate", "--scopes=global", "--steps=2", "--batch_size=2", "--context=16", "--block_size=64", *CPU_ARGV]
    assert main(argv) == 1
    assert "FAIL" in capsys.readouterr().out


def test_validate_says_when_there_is_no_fused_optimizer(monkeypatch, capsys):
    monkeypatch.delattr(rotkern, "FusedRotatedAdamW", raising=False)
    assert main(["validate", "--steps=1", *CPU_ARGV]) == 2
    assert "FusedRotatedAdamW" in capsys.readouterr().err


@pytest.mark.interpret
@pytest.mark.parametrize("model", ["gpt-tiny", "vit-tiny", "resnet-tiny"])
def test_validate_under_the_triton_interpreter(tmp_path, model):
    """The Triton kernels (interpreted) track the eager optimizer for 5 steps in every scope."""
    pytest.importorskip("triton", reason="the interpreter needs triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    argv = ["validate", f"--model={model}", "--steps=5", "--batch_size=2", "--context=16", "--block_size=64",
            "--backend=triton", *CPU_ARGV, f"--out_dir={tmp_path}"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "rotkern.trainers", *argv], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "validate: passed" in run.stdout
    assert run.stdout.count("fused side: FusedRotatedAdamW: triton") == len(rotkern.SCOPES), run.stdout

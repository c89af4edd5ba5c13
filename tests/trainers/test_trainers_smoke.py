import os

import pytest

from rotkern.trainers.__main__ import main
from rotkern.trainers.quadratic import QuadraticConfig
from rotkern.trainers.quadratic import main as quadratic_main


def test_quadratic_shows_the_basis_dependence(tmp_path):
    res = quadratic_main(QuadraticConfig(dim=16, steps=150, out_dir=str(tmp_path), plot=False))
    fl = res["final_loss"]
    # Adam is much better on the axis-aligned problem than on the rotated one...
    assert fl["adam|rotated"] > 100 * fl["adam|aligned"]
    # ...rotated Adam loses that advantage, and SGD-M cannot tell the problems apart.
    assert fl["rotated adam|aligned"] > 100 * fl["adam|aligned"]
    assert fl["sgd-m|rotated"] == pytest.approx(fl["sgd-m|aligned"], rel=1e-6)
    assert os.path.exists(tmp_path / "table.md")


def test_cli_writes_the_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs matplotlib (a test extra)")
    assert main(["quadratic", "--steps=20", "--dim=8", f"--out_dir={tmp_path}"]) == 0
    assert os.path.getsize(tmp_path / "trajectories.png") > 1000

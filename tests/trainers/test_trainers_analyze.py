"""``rotkern analyze``: the numbers are rotkern.metrics' on the checkpoint's optimizer state; files, refusals, CLI."""

import dataclasses
import json
import math

import pytest
import torch

from rotkern import metrics as M
from rotkern.optim._base import moment
from rotkern.trainers.__main__ import main
from rotkern.trainers.analyze import (
    AnalyzeConfig,
    analyze,
    check_orderings,
    find_checkpoints,
    layer_type,
)
from rotkern.trainers.common import TrainerError
from rotkern.trainers.train import loss_of, make_setup, train

from .._trainer_helpers import fast_config

BATCHES = 3
FIGURES = ("cv_by_layer.png", "v_hist.png", "delta_loss_vs_delta_cv.png")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny gpt runs laid out as a one-seed compare out_dir (none, global, torch adamw), then analysed once."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("compare")
    trained = {}
    for scope, opt in (("none", {"rotation": "none"}), ("global", {"rotation": "global"}), ("adamw", {})):
        extra = {"optimizer": "adamw", "rotation": "none"} if scope == "adamw" else opt
        cfg = fast_config(root / scope, steps=12, **extra)
        trained[scope] = {**train(cfg), "config": cfg}
    cfg = AnalyzeConfig(batches=BATCHES, hessian_rows=2, hvp_batches=1, device="cpu", out_dir=str(root / "out"))
    analysis = analyze([str(root)], cfg)
    return root, trained, analysis


def _run(analysis, scope):
    return next(r for r in analysis["runs"] if r["scope"] == scope)


def test_analysis_json_and_figures(runs):
    root, _, analysis = runs
    out = root / "out"
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["format"] == 1 and saved["config"]["batches"] == BATCHES
    assert sorted(r["label"] for r in saved["runs"]) == ["adamw seed0", "global seed0", "none seed0"]
    assert set(saved["scopes"]) == {"none", "global", "adamw"} and saved["baselines"] == {"gpt-tiny": "none"}
    for r in saved["runs"]:
        assert r["step"] == 12 and r["checkpoint"].endswith("ckpt.pt")
        orth = r["orthogonality"]
        assert set(orth["per_layer_type"]) == {"Q", "K", "V", "O", "W1", "W2"}
        # gpt-tiny: 2 blocks x (q, k, v, o, w1, w2); wte / wpe excluded.
        assert orth["run"]["matrices"] == 12 and len(orth["per_matrix"]) == 12
        assert {"cv", "scaled_deviation", "cv_gram", "scaled_gram", "svd_entropy"} <= set(orth["run"])
        assert r["gradient_bound"]["batches"] == BATCHES and len(r["gradient_bound"]["per_batch"]) == BATCHES
        assert r["gradient_bound"]["value"] == max(r["gradient_bound"]["per_batch"]) > 0
        sm = r["second_moment"]
        assert len(sm["edges"]) == 97 and len(sm["pooled"]["counts"]) == 96 and "0.5" in sm["pooled"]["quantiles"]
        assert r["loss"]["val_loss"] is not None and r["loss"]["train_loss"] is not None
        h = r["hessian"]
        assert len(h["ids"]) == 2 and h["l11_estimate"] > 0
        for row in h["rows"]:
            parts = row["update_dw"]
            assert parts["neuron"] + parts["layer"] + parts["other"] == pytest.approx(parts["total"], abs=1e-9)
    # The same flat ids for every run of one model (drawn from --hessian_seed).
    assert len({tuple(r["hessian"]["ids"]) for r in saved["runs"]}) == 1
    holds = [o["holds"] for o in saved["orderings"]]
    assert holds[:2] == [None, None]  # no svd run, no output run
    assert all(isinstance(h, bool) for h in holds[2:])  # global highest; CV vs loss ranking over three scopes
    assert {p["label"] for p in saved["delta_points"]} == {"global seed0", "adamw seed0"}
    for name in FIGURES:
        assert (out / name).stat().st_size > 1000, name
    assert [str(out / n) for n in ("cv_by_layer.png", "v_hist.png", "delta_loss_vs_delta_cv.png")] == saved["figures"]
    summary = (out / "summary.md").read_text()
    assert "| Q | K | V | O | W1 | W2 |" in summary and "CV is highest for global:" in summary
    assert "CV is lowest for svd: not checkable here" in summary
    assert analysis["runs"][0]["label"] == saved["runs"][0]["label"]


def test_numbers_are_the_metrics_of_the_trained_optimizer(runs):
    _, trained, analysis = runs
    for scope in ("none", "global"):
        res, got = trained[scope], _run(analysis, scope)
        model, opt = res["model"], res["optimizer"]
        want = M.update_cv(opt, model)
        assert {n: v["cv"] for n, v in got["orthogonality"]["per_matrix"].items()} == want
        name = "transformer.h.1.mlp.c_fc.weight"
        a = M.update_matrix(opt, model.get_parameter(name))
        assert got["orthogonality"]["per_matrix"][name]["svd_entropy"] == M.svd_entropy(a)
        assert got["orthogonality"]["run"]["cv"] == pytest.approx(sum(want.values()) / len(want), rel=1e-12)
        qs = M.second_moment_stats(opt)["pooled"]["quantiles"]
        assert got["second_moment"]["pooled"]["quantiles"] == qs
        # Alg 1 by hand: micro-batch 0 of the T steps after the checkpoint, raw gradients.
        s = make_setup(dataclasses.replace(res["config"], device="cpu", workers=0))
        params = [p for g in opt.param_groups for p in g["params"]]
        bound = M.GradientBound(opt)
        model.train()
        for b in range(BATCHES):
            x, y = s.batch(12 + b, 0)
            bound.update(list(torch.autograd.grad(loss_of("text", model, x, y), params)))
        assert got["gradient_bound"]["value"] == pytest.approx(bound.value, rel=1e-6)


def test_torch_adamw_run_is_measured_in_the_standard_basis(runs):
    _, trained, analysis = runs
    res, got = trained["adamw"], _run(analysis, "adamw")
    opt = res["optimizer"]
    assert isinstance(opt, torch.optim.AdamW) and got["optimizer"] == "adamw"
    name = "transformer.h.0.attn.c_proj.weight"
    p = res["model"].get_parameter(name)
    st = opt.state[p]
    a = moment(st, "exp_avg") / (moment(st, "exp_avg_sq").sqrt() + opt.param_groups[0]["eps"])
    assert got["orthogonality"]["per_matrix"][name]["cv"] == pytest.approx(M.cv_singular_values(a), rel=1e-6)
    # The fused c_attn is scored as q, k, v thirds, as for the rotated runs.
    st = opt.state[res["model"].get_parameter("transformer.h.0.attn.c_attn.weight")]
    q = (moment(st, "exp_avg") / (moment(st, "exp_avg_sq").sqrt() + 1e-8)).chunk(3)[0]
    got_q = got["orthogonality"]["per_matrix"]["transformer.h.0.attn.c_attn.weight[q]"]["cv"]
    assert math.isfinite(got_q) and got_q == pytest.approx(M.cv_singular_values(q), rel=1e-6)


def test_a_second_analyze_into_the_same_out_dir_is_refused(runs):
    root, _, _ = runs
    before = (root / "out" / "analysis.json").read_bytes()
    with pytest.raises(TrainerError, match="analysis.json already exists"):
        analyze([str(root / "none")], AnalyzeConfig(batches=1, device="cpu", out_dir=str(root / "out")))
    assert (root / "out" / "analysis.json").read_bytes() == before


def test_missing_path_or_empty_folder_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(TrainerError, match="does not exist"):
        analyze([str(tmp_path / "nope")], AnalyzeConfig())
    with pytest.raises(TrainerError, match="holds no ckpt.pt"):
        find_checkpoints([str(tmp_path)])
    assert main(["analyze", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "does not exist" in err[0]


def test_cli_analyzes_one_checkpoint_into_its_folder(runs, capsys):
    root, _, _ = runs
    ckpt = root / "global" / "ckpt.pt"
    assert main(["analyze", str(ckpt), "--batches=2", "--device=cpu", "--plot=false"]) == 0
    saved = json.loads((root / "global" / "analysis" / "analysis.json").read_text())
    assert [r["label"] for r in saved["runs"]] == ["global seed0"] and saved["runs"][0]["hessian"] is None
    assert saved["figures"] == [] and saved["delta_points"] == []
    assert "not checkable here" in capsys.readouterr().out


def test_compare_layout_with_seeds_is_found(tmp_path):
    for scope in ("none", "global"):
        for seed in (0, 1):
            (tmp_path / scope / f"seed{seed}").mkdir(parents=True)
            (tmp_path / scope / f"seed{seed}" / "ckpt.pt").write_bytes(b"")
    found = find_checkpoints([str(tmp_path), str(tmp_path / "none" / "seed0")])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "global/seed0/ckpt.pt",
        "global/seed1/ckpt.pt",
        "none/seed0/ckpt.pt",
        "none/seed1/ckpt.pt",
    ]


def test_layer_types_and_the_paper_orderings():
    assert layer_type("transformer.h.3.attn.c_attn.weight[k]") == "K"
    assert layer_type("transformer.h.3.mlp.c_proj.weight") == "W2"
    assert layer_type("transformer.h.3.attn.c_proj.weight") == "O"
    assert layer_type("layers.1.0.to_qkv.weight[v]") == "V" and layer_type("layers.1.1.3.weight") == "W2"
    assert layer_type("layers.2.0.downsample.0.weight") == "layers.*.0.downsample.0.weight"  # ResNet: stage -> *

    def scopes(sign=1.0, **cv):
        return {s: {"cv": v, "val_loss": sign * v} for s, v in cv.items()}

    holds = [o["holds"] for o in check_orderings(scopes(svd=0.5, none=1.0, output=1.05, global_=2.0), 0.1)]
    assert holds == [True, True, None, True]  # "global_" is not global: not checkable
    holds = [o["holds"] for o in check_orderings(scopes(-1.0, svd=1.5, none=1.0, output=1.4, **{"global": 1.2}), 0.1)]
    assert holds == [False, False, False, False]
    sentences = [o["sentence"] for o in check_orderings(scopes(none=1.0), 0.1)]
    assert all("not checkable here" in s for s in sentences)


def test_progress_is_quiet_off_a_tty_and_a_bar_on_one(monkeypatch, capsys):
    from rotkern.trainers import analyze as mod

    assert list(mod.progress(range(3), 3, "x")) == [0, 1, 2]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""  # pytest's stdout is no TTY
    monkeypatch.setattr(mod.sys.stdout, "isatty", lambda: True)
    assert list(mod.progress(range(3), 3, "grad")) == [0, 1, 2]
    assert "grad" in capsys.readouterr().err  # tqdm draws on stderr


def test_variants_of_one_scope_stay_apart(tmp_path):
    """compare --variants / --sweep runs share a scope: their per-run options that differ keep them apart."""
    torch.set_num_threads(1)
    for name, extra in (("layer", {}), ("layer_v", {"rotate_only": "v"}), ("layer_b2", {"beta2": 0.99})):
        train(fast_config(tmp_path / name, steps=4, rotation="layer", **extra))
    cfg = AnalyzeConfig(batches=1, device="cpu", plot=False, out_dir=str(tmp_path / "out"))
    analysis = analyze([str(tmp_path)], cfg)
    assert sorted(r["scope"] for r in analysis["runs"]) == ["layer", "layer,beta2=0.99", "layer,rotate_only=v"]
    assert len(analysis["scopes"]) == 3

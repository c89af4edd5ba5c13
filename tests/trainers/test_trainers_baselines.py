"""Baseline optimizers in the trainers: Muon (paper Alg 6) + AdamW, SOAP (the eigen scope), rotated SGD-M,
and compare running them beside the scopes."""

import dataclasses
import json

import pytest
import torch

from rotkern.optim.muon import Muon, muon_param_split, newton_schulz5
from rotkern.trainers.baselines import MuonWithAdamW
from rotkern.trainers.compare import CompareConfig, compare
from rotkern.trainers.models import build_model, model_config
from rotkern.trainers.train import train

from .._trainer_helpers import fast_config


# %% Muon ---------------------------------------------------------------------------------------------------
def _alg6(w0, grads, *, lr, wd, mu, nesterov=True, eps=1e-7):
    """Paper Alg 6 with an exact orthogonalisation (U V^T by SVD) in place of NS5, float64."""
    w, b = w0.double().clone(), torch.zeros_like(w0, dtype=torch.float64)
    for g in grads:
        g = g.double()
        b = mu * b + g
        bp = g + mu * b if nesterov else b
        u, _, vh = torch.linalg.svd(bp / (bp.norm() + eps), full_matrices=False)
        scale = max(1.0, w.shape[0] / w.shape[1]) ** 0.5
        w = w * (1 - lr * wd) - lr * scale * (u @ vh)
    return w


def test_newton_schulz5_is_close_to_u_v_transpose():
    torch.manual_seed(0)
    for shape in [(16, 32), (32, 16), (24, 24)]:
        g = torch.randn(shape)
        o = newton_schulz5(g)
        s = torch.linalg.svdvals(o)
        # NS5's quintic pushes every singular value into about [0.7, 1.2], with U and V those of g.
        assert 0.6 < s.min() and s.max() < 1.25
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        cos = (o * (u @ vh)).sum() / (o.norm() * (u @ vh).norm())
        assert cos > 0.97


@pytest.mark.parametrize("nesterov", [True, False])
def test_rotkern_muon_follows_alg6(nesterov):
    torch.manual_seed(1)
    w = torch.randn(12, 20)
    w0 = w.clone()
    grads = [torch.randn(12, 20) for _ in range(6)]
    opt = Muon([w], lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov)
    for g in grads:
        w.grad = g.clone()
        opt.step()
    want = _alg6(w0, grads, lr=0.02, wd=0.1, mu=0.9, nesterov=nesterov)
    # NS5 is U S' V^T with S' in [0.7, 1.2], not U V^T: the paths agree in direction, not to rounding.
    rel = ((w - w0).double() - (want - w0.double())).norm() / (want - w0.double()).norm()
    assert rel < 0.25


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")
@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_rotkern_muon_matches_torch_muon(adjust):
    torch.manual_seed(2)
    a = torch.randn(10, 30)
    b = a.clone()
    mine = Muon([a], lr=0.01, adjust_lr_fn=adjust)
    theirs = torch.optim.Muon([b], lr=0.01, adjust_lr_fn=adjust)
    for _ in range(5):
        g = torch.randn(10, 30)
        a.grad, b.grad = g.clone(), g.clone()
        mine.step(), theirs.step()
    # torch runs Newton-Schulz in bfloat16, rotkern in float32.
    torch.testing.assert_close(a, b, rtol=0, atol=2e-3)
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.zeros(3)])


def test_muon_takes_hidden_matrices_and_adamw_the_rest():
    model = build_model(model_config("gpt-tiny"))
    hidden, rest = muon_param_split(model)
    assert hidden and all(p.dim() == 2 for _, p in hidden)
    assert all("wte" not in n and "wpe" not in n for n, _ in hidden)
    assert {n for n, _ in rest} >= {"transformer.wte.weight", "transformer.wpe.weight"}
    opt = MuonWithAdamW(model, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    n_params = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_params
    sd = opt.state_dict()
    assert set(sd) == {"muon", "adamw"}
    with pytest.raises(ValueError, match="muon"):
        opt.load_state_dict({"adamw": sd["adamw"]})


# %% trainers -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["muon", "soap", "rotated-sgdm"])
def test_baselines_learn_and_resume_bit_identically(tmp_path, optimizer):
    kw = dict(optimizer=optimizer, lr=0.05 if optimizer == "rotated-sgdm" else 3e-3, rotation="layer")
    if optimizer == "soap":
        kw.update(precondition_every=3)
    straight = train(fast_config(tmp_path / "a", steps=10, **kw))
    losses = [r["loss"] for r in straight["records"]]
    assert all(map(torch.isfinite, torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3])
    cfg = fast_config(tmp_path / "b", steps=10, stop_step=5, **kw)
    first = train(cfg)
    resumed = train(dataclasses.replace(cfg, stop_step=0, resume=first["checkpoint"]))
    assert [r["loss"] for r in first["records"] + resumed["records"]] == losses
    head = json.loads(open(straight["log"]).readline())
    assert head["optimizer"] == (optimizer if optimizer != "rotated-sgdm" else "rotated-sgdm:layer")


def test_soap_is_the_eigen_scope_with_soaps_basis_options(tmp_path):
    soap = train(fast_config(tmp_path / "s", steps=6, optimizer="soap", precondition_every=2))["model"]
    eigen = train(
        fast_config(tmp_path / "e", steps=6, rotation="eigen", precondition_every=2, basis_change="transport_m")
    )["model"]
    for a, b in zip(soap.parameters(), eigen.parameters(), strict=True):
        assert torch.equal(a, b)


def test_compare_runs_scopes_and_baselines_side_by_side(tmp_path):
    cfg = CompareConfig(
        **{
            **dataclasses.asdict(fast_config(tmp_path, steps=6)),
            "scopes": "adamw,global,eigen,muon",
            "out_dir": str(tmp_path / "cmp"),
            "plot": False,
            "eval_every": 0,
        }
    )
    res = compare(cfg)
    assert [r["scope"] for r in res["rows"]] == ["adamw", "global", "eigen", "muon"]
    assert res["target"]["baseline"] == "adamw"
    assert all(len(c) == 6 for c in res["curves"].values())
    assert len({c[-1] for c in res["curves"].values()}) == 4  # four different trajectories

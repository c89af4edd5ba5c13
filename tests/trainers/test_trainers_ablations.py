"""The paper's ablations as trainer options: per-layer-type rotation (C.2), embedding orientation,
QKV split, vectors, block size and beta2, and compare's --variants / --sweep."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from rotkern.testing import assert_close_to_ref
from rotkern.trainers import compare as compare_mod
from rotkern.trainers.common import TrainerError
from rotkern.trainers.compare import CompareConfig, compare, compare_variants, parse_sweep, parse_variant
from rotkern.trainers.models import (
    LAYER_TYPES,
    MODELS,
    GPTConfig,
    build_model,
    layer_types,
    model_layer_types,
)
from rotkern.trainers.train import TrainConfig, check_config, fused_class, make_optimizer

from .._trainer_helpers import fast_config

C_ATTN = "transformer.h.{}.attn.c_attn.weight"


def test_every_parameter_of_every_model_has_a_layer_type():
    for name in ("gpt-tiny", "vit-tiny", "resnet-tiny"):
        model = build_model(MODELS[name])
        types = layer_types(model)
        assert set(types) == {n for n, p in model.named_parameters()}
        assert all(t in LAYER_TYPES for ts in types.values() for t in ts)
    gpt = layer_types(build_model(MODELS["gpt-tiny"]))
    assert gpt[C_ATTN.format(0)] == ("q", "k", "v")
    assert gpt["transformer.wte.weight"] == ("embedding",)  # tied with lm_head: GPT has no separate head
    assert gpt["transformer.h.1.attn.c_proj.weight"] == ("attn_out",)
    assert gpt["transformer.h.1.mlp.c_proj.weight"] == ("mlp_out",)
    assert model_layer_types("gpt-tiny") == ("q", "k", "v", "attn_out", "mlp_in", "mlp_out", "embedding", "norm")
    assert model_layer_types("resnet-tiny") == ("norm", "conv", "head")
    assert "head" in model_layer_types("vit-tiny")


def _fused_or_skip():
    try:
        fused_class()
    except TrainerError:
        pytest.skip("no FusedRotatedAdamW")
    return "rotated-fused"


def _run(cfg: TrainConfig, model: torch.nn.Module, steps: int = 10) -> torch.optim.Optimizer:
    """``steps`` optimizer steps on fixed pseudo-random gradients (the same for every call): the optimizers'
    trajectories can then be compared parameter by parameter, free of the model's coupling."""
    opt = make_optimizer(cfg, model)
    gen = torch.Generator().manual_seed(123)
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=gen)
        for g in opt.param_groups:
            g["lr"] = 1e-2
        opt.step()
    return opt


@pytest.mark.parametrize("optimizer", ["rotated-eager", "rotated-fused"])
def test_rotate_only_v_leaves_every_other_type_bit_identical(optimizer):
    """rotate_only=v under the layer scope: over 10 steps every parameter but the value thirds of c_attn is
    bit-identical to the same optimizer with rotation none (what the unrotated group runs; rotkern guarantees bit
    equality there, not with torch: its none scope matches torch.optim.AdamW within the identity_vs_torch
    tolerance, checked too); v differs."""
    if optimizer == "rotated-fused":
        _fused_or_skip()
    torch.manual_seed(0)
    base = build_model(MODELS["gpt-tiny"])
    models = {k: copy.deepcopy(base) for k in ("v", "none", "torch")}
    cfg = TrainConfig(optimizer=optimizer, block_size=64, weight_decay=0.1)
    opt = _run(dataclasses.replace(cfg, rotation="layer", rotate_only="v"), models["v"])
    assert [(g["rotation"], g.get("qkv_pieces")) for g in opt.param_groups] == [("layer", "v"), ("none", None)]
    _run(dataclasses.replace(cfg, rotation="none"), models["none"])
    _run(dataclasses.replace(cfg, optimizer="adamw"), models["torch"])
    n = 64
    ref = dict(models["none"].named_parameters())
    via_torch = dict(models["torch"].named_parameters())
    for name, p in models["v"].named_parameters():
        if "c_attn" in name:
            assert torch.equal(p[: 2 * n], ref[name][: 2 * n]), name  # q and k
            assert not torch.equal(p[2 * n :], ref[name][2 * n :]), name  # v rotated
        else:
            assert torch.equal(p, ref[name]), name
        assert_close_to_ref(ref[name], via_torch[name], "identity_vs_torch", what=name)


def test_rotate_except_rotates_the_rest():
    torch.manual_seed(0)
    base = build_model(MODELS["gpt-tiny"])
    restricted, plain = copy.deepcopy(base), copy.deepcopy(base)
    cfg = TrainConfig(optimizer="rotated-eager", block_size=64)
    _run(dataclasses.replace(cfg, rotation="layer", rotate_except="embedding,norm"), restricted, steps=3)
    _run(dataclasses.replace(cfg, rotation="none"), plain, steps=3)
    ref = dict(plain.named_parameters())
    types = layer_types(base)
    for name, p in restricted.named_parameters():
        same = torch.equal(p, ref[name])
        assert same == (types[name][0] in ("embedding", "norm")), name


def _small_gpt() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(GPTConfig(block_size=4, vocab_size=8, n_layer=1, n_head=1, n_embd=4))


def _coupled(opt, offset: int, shape: tuple[int, int]) -> tuple[bool, bool]:
    """Whether the dense rotation mixes entries of one row, and entries of one column, of the (r, c) tensor stored
    at flat ``offset``."""
    d = opt.rotation_matrix()
    r, c = shape
    idx = torch.arange(offset, offset + r * c).view(r, c)
    block = d[idx.reshape(-1)][:, idx.reshape(-1)].view(r, c, r, c)
    same_row = any(block[i, j, i, k].abs() > 1e-12 for i in range(r) for j in range(c) for k in range(c) if j != k)
    same_col = any(block[i, j, k, j].abs() > 1e-12 for i in range(r) for k in range(r) for j in range(c) if i != k)
    return same_row, same_col


def test_embedding_orientation_changes_which_coordinates_share_a_block():
    """output scope: transposed (B.1) rotates each embedding column (one per dimension, across tokens); as_linear
    (C.2) each token's row. The optimizer follows the dense oracle in both."""
    from rotkern.testing import dense_adamw_oracle

    for orientation, expect in (("transposed", (False, True)), ("as_linear", (True, False))):
        model = _small_gpt()
        cfg = TrainConfig(optimizer="rotated-eager", rotation="output", embedding=orientation, block_size=768)
        opt = make_optimizer(cfg, model)
        assert opt.param_groups[0]["embedding"] == orientation
        names = opt.param_groups[0]["names"]
        assert names[0] == "transformer.wte.weight"
        assert _coupled(opt, 0, (8, 4)) == expect, orientation
        # A linear weight is rotated per output row whatever the orientation.
        params = opt.param_groups[0]["params"]
        i = names.index("transformer.h.0.attn.c_proj.weight")
        assert _coupled(opt, sum(p.numel() for p in params[:i]), (4, 4)) == (True, False)
        # The trajectory is AdamW in the basis rotation_matrix() describes.
        flat0 = torch.cat([p.detach().reshape(-1) for p in params]).double()
        gen = torch.Generator().manual_seed(5)
        grads = []
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
            opt.step()
        decay = torch.cat([torch.full((p.numel(),), float(p.dim() >= 2)) for p in params])
        g = opt.param_groups[0]
        theta, _, _ = dense_adamw_oracle(
            opt.rotation_matrix(), flat0, grads, lr=g["lr"], betas=g["betas"], eps=g["eps"],
            weight_decay=g["weight_decay"], decay=decay,
        )  # fmt: skip
        flat = torch.cat([p.detach().reshape(-1) for p in params]).double()
        torch.testing.assert_close(flat, theta, rtol=1e-5, atol=1e-6)


def test_rotation_options_reach_the_optimizer():
    model = _small_gpt()
    cfg = TrainConfig(
        optimizer="rotated-eager", rotation="output", embedding="as_linear", split_qkv=False, vectors="rotate",
        block_size=32, beta2=0.99,
    )  # fmt: skip
    g = make_optimizer(cfg, model).param_groups[0]
    assert (g["embedding"], g["split_qkv"], g["vectors"], g["block_size"], g["betas"]) == (
        "as_linear", False, "rotate", 32, (0.9, 0.99),
    )  # fmt: skip
    sgd = make_optimizer(dataclasses.replace(cfg, optimizer="rotated-sgdm", rotate_only="mlp_in"), model)
    assert [(g["rotation"], g["embedding"], g["vectors"]) for g in sgd.param_groups] == [
        ("output", "as_linear", "rotate"), ("none", "as_linear", "rotate"),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(rotate_only="value"), r"'value' is not a layer type of gpt-tiny; choose from q, k, v, attn_out"),
        (dict(rotate_only="head"), "not a layer type of gpt-tiny"),
        (dict(rotate_only="v", rotate_except="k"), "exclude each other"),
        (dict(rotate_only="v", optimizer="adamw"), "needs --optimizer"),
        (dict(rotate_only="v", rotation="none"), "rotates nothing"),
        (dict(rotate_except="q,k,v,attn_out,mlp_in,mlp_out,embedding,norm"), "leaves no layer type"),
        (dict(rotate_only="v", rotation="svd"), "share one fused weight"),
        (dict(rotate_only="v", rotation="layer", split_qkv=False), "needs --split_qkv=true"),
        (dict(embedding="rows"), "--embedding='rows' is not one of transposed, as_linear"),
        (dict(vectors="some"), "--vectors"),
    ],
)
def test_bad_rotation_options_are_trainer_errors(overrides, match):
    with pytest.raises(TrainerError, match=match):
        check_config(TrainConfig(**{"rotation": "layer", **overrides}))


def test_whole_qkv_selections_work_with_the_dynamic_scopes():
    check_config(TrainConfig(rotation="svd", rotate_only="q,k,v"))
    opt = make_optimizer(TrainConfig(rotation="svd", rotate_only="q+k+v,mlp_in", block_size=64), _small_gpt())
    assert [g["rotation"] for g in opt.param_groups] == ["svd", "none"]
    assert opt.param_groups[0]["names"] == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.mlp.c_fc.weight",
    ]


# -- compare --variants / --sweep ---------------------------------------------------------------------------


def test_variants_parse_into_labels_options_and_safe_folders():
    v = parse_variant(" layer , rotate_only = q,k , beta2=0.99")
    assert (v.label, v.scope, v.options) == (
        "layer,rotate_only=q+k,beta2=0.99",
        "layer",
        (("rotate_only", "q,k"), ("beta2", 0.99)),
    )  # noqa: E501
    assert v.folder == "layer__rotate_only-q+k__beta2-0.99"
    assert v.overrides() == {"rotation": "layer", "rotate_only": "q,k", "beta2": 0.99}
    assert parse_variant("adamw,beta2=0.9").overrides() == {"optimizer": "adamw", "rotation": "none", "beta2": 0.9}
    assert parse_variant("output,split_qkv=false").options == (("split_qkv", False),)
    assert parse_variant("none").folder == "none"  # plain scopes keep the folders of older compares
    cfg = CompareConfig(variants="none; output; output,embedding=as_linear; layer,rotate_only=v")
    assert [x.label for x in compare_variants(cfg)] == [
        "none", "output", "output,embedding=as_linear", "layer,rotate_only=v",
    ]  # fmt: skip
    assert [x.label for x in compare_variants(CompareConfig(scopes="none,global"))] == ["none", "global"]


@pytest.mark.parametrize(
    "variants, match",
    [
        ("layer,beta3=0.9", r"variant 'layer,beta3=0.9': 'beta3' is not a per-run option"),
        ("layer,seed=3", "'seed' is not a per-run option"),
        ("layer,rotation=global", "the scope comes first"),
        ("sideways", r"'sideways' is not a scope or baseline"),
        ("layer,beta2=high", r"beta2='high' is not a float"),
        ("layer,block_size=1.5", "block_size='1.5' is not a int"),
        ("layer,oops", r"'oops' is not key=value"),
        ("layer,beta2=0.9,beta2=0.99", "beta2 is given twice"),
        ("none; none", "a run is repeated"),
        ("layer,rotate_only=", "needs a list of layer types"),
    ],
)
def test_bad_variants_are_trainer_errors_naming_the_part(variants, match):
    with pytest.raises(TrainerError, match=match):
        compare_variants(CompareConfig(variants=variants))


def test_sweep_crosses_every_entry_and_runs_unaffected_ones_once():
    labels = [v.label for v in compare_variants(CompareConfig(scopes="none,global", sweep="block_size=16,32"))]
    assert labels == ["none", "global,block_size=16", "global,block_size=32"]
    labels = [v.label for v in compare_variants(CompareConfig(scopes="none,global", sweep="beta2=0.9,0.99"))]
    assert labels == ["none,beta2=0.9", "global,beta2=0.9", "none,beta2=0.99", "global,beta2=0.99"]
    assert parse_sweep("beta2=0.9, 0.95") == ("beta2", [(0.9, "0.9"), (0.95, "0.95")])
    for spec, match in (("beta2", "key=v1,v2"), ("beta2=0.9,0.9", "repeated"), ("gamma=1", "not a per-run option")):
        with pytest.raises(TrainerError, match=match):
            compare_variants(CompareConfig(scopes="none", sweep=spec))
    with pytest.raises(TrainerError, match="which variant 'global,beta2=0.9' sets itself"):
        compare_variants(CompareConfig(variants="global,beta2=0.9", sweep="beta2=0.95,0.99"))


def _cmp(tmp_path, name="cmp", **overrides) -> CompareConfig:
    base = {
        k: v for k, v in dataclasses.asdict(fast_config(tmp_path)).items() if k in CompareConfig.__dataclass_fields__
    }
    base.update(steps=6, warmup_steps=2, batch_size=4, eval_every=0, eval_batches=1, save=False)
    return CompareConfig(**{**base, "out_dir": str(tmp_path / name), "plot": True, **overrides})


def test_sweep_compare_writes_grouped_table_and_plots_and_resumes(tmp_path, monkeypatch):
    cfg = _cmp(tmp_path, scopes="none,global", sweep="block_size=16,32", seeds="2")
    res = compare(cfg)
    out = tmp_path / "cmp"
    assert (out / "compare.png").exists() and (out / "sweep.png").exists()
    table = (out / "summary.md").read_text()
    assert "| block_size | none | global |" in table and "### block_size = 32 (baseline: none)" in table
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "global__block_size-16",
        "global__block_size-32",
        "none",
    ]
    groups = res["sweep"]["groups"]
    assert [(g["value"], [r["scope"] for r in g["rows"]]) for g in groups] == [
        (16, ["none", "global,block_size=16"]), (32, ["none", "global,block_size=32"]),
    ]  # fmt: skip
    assert all(r["vs_baseline"]["final_val_loss"]["verdict"] for g in groups for r in g["rows"][1:])
    # The two block sizes are different runs; the shared none run is one.
    c16, c32 = res["curves"]["global,block_size=16"], res["curves"]["global,block_size=32"]
    assert c16 != c32 and len(res["runs"]) == 6
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sweep"]["key"] == "block_size" and summary["rows"][1]["sweep_value"] == 16
    # Re-running the command trains nothing; another variant list in the same out_dir is refused.
    calls = []
    real_train = compare_mod.train
    monkeypatch.setattr(compare_mod, "train", lambda c, **kw: calls.append(c.out_dir) or real_train(c, **kw))
    again = compare(cfg)
    assert calls == [] and again["rows"] == res["rows"]
    with pytest.raises(TrainerError, match="other settings"):
        compare(dataclasses.replace(cfg, sweep="block_size=16,64"))


def test_variants_compare_runs_each_variant_and_resumes(tmp_path, monkeypatch):
    cfg = _cmp(tmp_path, variants="none; layer,rotate_only=v; output,embedding=as_linear", plot=False)
    res = compare(cfg)
    assert [r["scope"] for r in res["rows"]] == ["none", "layer,rotate_only=v", "output,embedding=as_linear"]
    out = tmp_path / "cmp"
    assert (out / "layer__rotate_only-v" / "log.jsonl").exists()
    header = json.loads((out / "layer__rotate_only-v" / "log.jsonl").read_text().splitlines()[0])
    assert header["config"]["rotate_only"] == "v" and header["config"]["rotation"] == "layer"
    calls = []
    real_train = compare_mod.train
    monkeypatch.setattr(compare_mod, "train", lambda c, **kw: calls.append(c.out_dir) or real_train(c, **kw))
    assert compare(cfg)["rows"] == res["rows"] and calls == []
    # A bad option of one variant fails before anything is written, naming the variant.
    with pytest.raises(TrainerError, match="layer,rotate_only=head: .*not a layer type"):
        compare(_cmp(tmp_path, "other", variants="none; layer,rotate_only=head"))
    assert not (tmp_path / "other").exists()


def test_runs_from_before_the_new_options_still_resume(tmp_path):
    """A run whose saved config lacks the options added since (embedding, rotate_only, ...) ran with their
    defaults: compare takes it as finished."""
    cfg = _cmp(tmp_path, scopes="none", plot=False)
    compare(cfg)
    out = tmp_path / "cmp"
    log = out / "none" / "log.jsonl"
    lines = log.read_text().splitlines()
    head = json.loads(lines[0])
    for key in ("embedding", "split_qkv", "vectors", "rotate_only", "rotate_except"):
        del head["config"][key]
    log.write_text("\n".join([json.dumps(head)] + lines[1:]) + "\n")
    manifest = json.loads((out / "compare.json").read_text())
    for key in ("variants", "sweep", "embedding"):
        del manifest["config"][key]
    (out / "compare.json").write_text(json.dumps(manifest))
    assert "finished earlier" in _capture(lambda: compare(cfg))


def _capture(fn) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        fn()
    return buf.getvalue()

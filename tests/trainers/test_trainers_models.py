import pytest
import torch

from rotkern import param_groups_for
from rotkern.trainers.models import MODELS, build_model, model_config, sdpa_context


def _count(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(MODELS[name]).parameters())


# GPT-2 without biases, wpe included (nanoGPT prints 123.59M: it leaves wpe out); SimpleViT-S/16 has no class
# token and fixed positions, hence a little under ViT-S/16's 22.05M; the ResNets are torchvision's counts.
@pytest.mark.parametrize(
    "name, millions",
    [("gpt2-124m", 124.37), ("vit-s16", 21.96), ("resnet50", 25.56), ("resnet18", 11.69)],
)
def test_paper_models_have_the_published_sizes(name, millions):
    assert _count(name) / 1e6 == pytest.approx(millions, abs=0.02)


def test_gpt_is_nanogpt_shaped():
    cfg = MODELS["gpt2-124m"]
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size, cfg.bias) == (
        12,
        12,
        768,
        1024,
        50304,
        False,
    )
    model = build_model(MODELS["gpt-tiny"])
    assert model.lm_head.weight is model.transformer.wte.weight
    assert not any(n.endswith("bias") for n, _ in model.named_parameters())
    (group,) = param_groups_for(model, weight_decay=0.1)
    roles = dict(zip(group["names"], group["roles"], strict=True))
    assert roles["transformer.wte.weight"] == "embedding" and "lm_head.weight" not in roles
    assert roles["transformer.h.0.attn.c_attn.weight"] == "qkv"
    assert roles["transformer.h.0.ln_1.weight"] == "vector"
    idx = torch.randint(0, 256, (2, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 16, 256) and loss.ndim == 0


@pytest.mark.parametrize("name", ["vit-tiny", "resnet-tiny"])
def test_image_models_classify(name):
    model = build_model(model_config(name, channels=1, num_classes=10))
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    roles = param_groups_for(model)[0]["roles"]
    assert "matrix" in roles and "vector" in roles
    if name == "vit-tiny":
        assert "qkv" in roles


def test_vit_s16_tiles_224_pixel_images_with_16_pixel_patches():
    cfg = MODELS["vit-s16"]
    assert (cfg.depth, cfg.heads, cfg.dim, cfg.mlp_dim, cfg.patch_size, cfg.image_size) == (12, 6, 384, 1536, 16, 224)


def test_math_attention_matches_the_default_path():
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    with sdpa_context("math"):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="attention"):
        sdpa_context("nope")

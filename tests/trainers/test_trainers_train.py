import dataclasses
import inspect
import json

import pytest
import torch

import rotkern
from rotkern.trainers.common import TrainerError
from rotkern.trainers.train import TrainConfig, lr_at, train

from .._trainer_helpers import fast_config


@pytest.mark.parametrize("preset", ["tiny", "vit-tiny", "resnet-tiny"])
def test_tiny_presets_learn_in_20_steps(tmp_path, preset):
    res = train(fast_config(tmp_path, preset))
    losses = [r["loss"] for r in res["records"]]
    assert len(losses) == 20 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-4:]) < 0.95 * sum(losses[:4])
    assert res["evals"] and "val_loss" in res["evals"][-1]


def test_log_begins_with_versions_device_git_and_config(tmp_path):
    res = train(fast_config(tmp_path, steps=3))
    lines = [json.loads(line) for line in open(res["log"])]
    head = lines[0]
    assert head["type"] == "header"
    assert {"python", "torch", "triton"} <= set(head["versions"])
    assert head["device"].startswith("cpu") and "git_sha" in head and head["config"]["steps"] == 3
    assert head["backend"].startswith("eager")
    steps = [r for r in lines if r["type"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time", "optimizer_time"} <= set(steps[0])
    assert lines[-1]["type"] == "final"


def test_schedule_warms_up_then_decays_to_the_floor(tmp_path):
    cfg = fast_config(tmp_path, steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    lrs = [lr_at(cfg, s) for s in range(101)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False)) and lrs[100] == pytest.approx(0.1)


def test_rotation_none_is_torch_adamw_with_nanogpt_decay(tmp_path):
    a = train(fast_config(tmp_path / "a", steps=5, optimizer="adamw"))["model"]
    b = train(fast_config(tmp_path / "b", steps=5, optimizer="rotated-eager", rotation="none"))["model"]
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_sgdm_and_bf16_run(tmp_path):
    assert train(fast_config(tmp_path / "s", steps=3, optimizer="sgdm", lr=0.1))["final"]["loss"] > 0
    assert train(fast_config(tmp_path / "b", steps=3, bf16=True))["final"]["loss"] > 0


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    a = train(fast_config(tmp_path / "a", steps=4, batch_size=8, grad_accum=1))["model"]
    b = train(fast_config(tmp_path / "b", steps=4, batch_size=4, grad_accum=2))["model"]
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["rotated-eager", "adamw"])
def test_resume_continues_bit_identically(tmp_path, optimizer):
    straight = train(fast_config(tmp_path / "a", steps=10, optimizer=optimizer, rotation="layer"))
    cfg = fast_config(tmp_path / "b", steps=10, stop_step=6, optimizer=optimizer, rotation="layer")
    first = train(cfg)
    resumed = train(dataclasses.replace(cfg, stop_step=0, resume=first["checkpoint"]))
    losses = [r["loss"] for r in first["records"] + resumed["records"]]
    assert losses == [r["loss"] for r in straight["records"]]
    for pa, pb in zip(straight["model"].parameters(), resumed["model"].parameters(), strict=True):
        assert torch.equal(pa, pb)
    log = [json.loads(line) for line in open(resumed["log"])]
    assert [r["type"] for r in log].count("header") == 2 and log[-1]["step"] == 10


def test_a_resumed_run_logs_beside_its_checkpoint(tmp_path):
    """Resumed with another out_dir (e.g. the default runs/train, which may hold another run's log), the run's log
    still continues in the resumed run's folder, where its checkpoint is saved."""
    first = train(fast_config(tmp_path / "a", steps=4, stop_step=2))
    other = tmp_path / "other"
    resumed = train(dataclasses.replace(fast_config(other, steps=4), resume=str(tmp_path / "a")))
    assert resumed["log"] == first["log"] and not other.exists()
    log = [json.loads(line) for line in open(first["log"])]
    assert [r["type"] for r in log].count("header") == 2 and log[-1]["step"] == 4


def test_nothing_is_overwritten(tmp_path):
    res = train(fast_config(tmp_path, steps=2))
    before = open(res["checkpoint"], "rb").read()
    with pytest.raises(TrainerError, match="already exists"):
        train(fast_config(tmp_path, steps=2))
    assert open(res["checkpoint"], "rb").read() == before


@pytest.mark.parametrize(
    "change, match",
    [(dict(rotation="output"), "rotation is 'layer' in the checkpoint"), (dict(preset="vit-tiny"), "holds model")],
)
def test_resume_refuses_a_checkpoint_from_another_scope_or_model(tmp_path, change, match):
    res = train(fast_config(tmp_path / "a", steps=2, rotation="layer"))
    before = open(res["checkpoint"], "rb").read()
    preset = change.pop("preset", "tiny")
    with pytest.raises(TrainerError, match=match):
        train(
            fast_config(tmp_path / "b", preset, **{"steps": 4, "rotation": "layer", **change}, resume=res["checkpoint"])
        )
    assert open(res["checkpoint"], "rb").read() == before


def test_the_defaults_are_the_fused_optimizer_and_the_row_wise_embedding(tmp_path):
    """The CLI's default optimizer is the fast one the README's results use; the embedding's output-wise units
    are its tokens' rows (paper C.2), in the library as in the trainers."""
    assert TrainConfig().optimizer == "rotated-fused" and TrainConfig().embedding == "as_linear"
    for cls in (rotkern.RotatedAdamW, rotkern.RotatedSGD):
        assert inspect.signature(cls).parameters["embedding"].default == "as_linear"
    fused = rotkern.FusedRotatedAdamW([torch.nn.Parameter(torch.zeros(3, 2))], rotation="output")
    assert fused.param_groups[0]["embedding"] == "as_linear"
    cfg = fast_config(tmp_path, steps=3)
    res = train(dataclasses.replace(cfg, optimizer=TrainConfig.optimizer))
    assert type(res["optimizer"]) is rotkern.FusedRotatedAdamW
    assert res["optimizer"].backend_used in ("ext", "eager")  # CPU tensors: the extension where it is built
    assert res["optimizer"].param_groups[0]["embedding"] == "as_linear"

"""rotkern inside the trainers users already run: a PyTorch Lightning ``Trainer`` whose
``configure_optimizers`` returns ``FusedRotatedAdamW`` with a scheduler, and Hugging Face
``transformers.Trainer`` given ``optimizers=(opt, scheduler)``. Each trains a tiny model on the CPU, saves a
checkpoint halfway, resumes from it in a fresh process state (new model, optimizer, scheduler and trainer)
and must end bit-identical to the run that never stopped. The FSDP2 + DCP loop (torchtitan's path) is
``tests/test_fsdp.py::test_the_ecosystem_checkpoint_round_trips_resume_bit_identically``. Skipped, saying
why, when a framework is not installed (the test extra installs both)."""

from __future__ import annotations

import logging
import os
import warnings

import pytest
import torch
from torch import nn

from rotkern import FusedRotatedAdamW, RotatedAdamW

SCOPES = ["none", "global", "output"]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen), torch.randn(n, 3, generator=gen)


def _optimizer(model: nn.Module, scope: str, backend: str):
    if backend == "eager":
        opt = RotatedAdamW(model.named_parameters(), lr=1e-2, rotation=scope, block_size=4, weight_decay=0.1)
    else:
        opt = FusedRotatedAdamW(
            model.named_parameters(), lr=1e-2, rotation=scope, block_size=4, weight_decay=0.1, backend=backend
        )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + 0.1 * t))
    return opt, sched


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same(a: dict, b: dict, start: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n
    assert any(not torch.equal(a[n], start[n]) for n in a)  # it trained


BACKENDS = ["eager", "auto"]


# %% PyTorch Lightning --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
def test_lightning_trainer_checkpoints_and_resumes_bit_identically(scope, backend, tmp_path):
    pl = pytest.importorskip("lightning.pytorch", reason="needs lightning (pip install -e '.[test]')")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Tiny()

        def training_step(self, batch, batch_idx):
            xb, yb = batch
            return nn.functional.mse_loss(self.net(xb), yb)

        def configure_optimizers(self):
            opt, sched = _optimizer(self, scope, backend)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def trainer(epochs: int):
        return pl.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        )  # fmt: skip

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on num_workers and the like
        straight = Module()
        start = _params(straight)
        trainer(2).fit(straight, loader)
        first = Module()
        half = trainer(1)
        half.fit(first, loader)
        half.save_checkpoint(tmp_path / "half.ckpt")
        resumed = Module()
        last = trainer(2)
        last.fit(resumed, loader, ckpt_path=tmp_path / "half.ckpt")
    assert last.global_step == 10
    opt = last.optimizers[0]
    assert isinstance(opt, RotatedAdamW) and float(opt.state[resumed.net.fc1.weight]["step"]) == 10
    assert last.lr_scheduler_configs[0].scheduler.last_epoch == 10
    _assert_same(_params(resumed), _params(straight), start)


# %% Hugging Face transformers.Trainer -----------------------------------------------------------------------
class _Regression(nn.Module):
    """What transformers.Trainer calls: forward(**batch) returning the loss first."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Tiny()

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"loss": nn.functional.mse_loss(self.net(x), labels)}


class _Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.x, self.y = _data()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", SCOPES)
def test_hf_trainer_saves_and_resumes_bit_identically(scope, backend, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install -e '.[test]')")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    transformers.logging.set_verbosity_error()

    def run(out: str, resume: str | None = None, max_steps: int = 10):
        model = _Regression()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / out), max_steps=max_steps, per_device_train_batch_size=4, save_steps=5,
            save_strategy="steps", logging_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
            dataloader_num_workers=0, disable_tqdm=True,
        )  # fmt: skip
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=_Rows(), optimizers=_optimizer(model, scope, backend)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    start = _params(_Regression())
    straight, _ = run("straight")
    assert os.path.isdir(tmp_path / "straight" / "checkpoint-5")
    resumed, trainer = run("resumed", resume=str(tmp_path / "straight" / "checkpoint-5"))
    assert trainer.state.global_step == 10
    opt = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
    assert isinstance(opt, RotatedAdamW) and float(opt.state[resumed.net.fc1.weight]["step"]) == 10
    _assert_same(_params(resumed), _params(straight), start)

"""What the training step does not do: walk a batch that is already on the device, or reload
the NVML library on every optimizer step (Adam asks torch.cuda.is_available() once per step)."""

from __future__ import annotations

import os

import lightning as L
import torch

from discrete_vae.estimators import StraightThrough
from conftest import tiny_module
from discrete_vae.module import NVML_CHECK, VAEModule


def tiny_model() -> VAEModule:
    return tiny_module(StraightThrough(), input_dim=4, hidden_dims=[5])


def test_a_batch_on_the_device_is_passed_through_untouched():
    model, batch = tiny_model(), torch.ones(2, 4)
    assert model.transfer_batch_to_device(batch, torch.device("cpu"), 0) is batch
    moved = model.transfer_batch_to_device([batch], torch.device("cpu"), 0)  # anything else: Lightning's way
    assert isinstance(moved, list) and torch.equal(moved[0], batch)


class RecordEnvironment(L.Callback):
    def __init__(self):
        self.during = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.during.add(os.environ.get(NVML_CHECK))


def test_the_nvml_check_is_off_while_fitting_on_the_cpu_and_restored_after(monkeypatch):
    monkeypatch.setenv(NVML_CHECK, "1")  # Lightning's setting at import
    probe = RecordEnvironment()
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])  # fmt: skip
    trainer.fit(tiny_model(), train_dataloaders=torch.ones(3, 2, 4))  # 3 batches of 2
    assert probe.during == {"0"}
    assert os.environ.get(NVML_CHECK) == "1"

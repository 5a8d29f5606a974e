"""Each use of Lightning's private API (discrete_vae.lightning_private) against a real Trainer:
a Lightning release that renames or changes one fails here, by name, not somewhere downstream."""

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from conftest import tiny_module
from discrete_vae import estimators as E
from discrete_vae import lightning_private as private
from discrete_vae.checkpoints import LatestCheckpoint
from discrete_vae.data import Batches


class Asks(L.Callback):
    """Records, per step, what the private rules answer at the hooks where the project asks them."""

    def __init__(self):
        self.logs, self.validates = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.logs.append(private.logs_this_step(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.validates.append(private.validates_after_this_batch(trainer))


def fit(tmp_path, callbacks, max_steps=8, **trainer_args):
    torch.manual_seed(0)
    data = (torch.rand(32, 16) < 0.3).float()
    trainer = L.Trainer(
        max_steps=max_steps, callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, accelerator="cpu", **trainer_args,
    )
    model = tiny_module(E.StraightThrough(), input_dim=16)
    trainer.fit(model, train_dataloaders=Batches(data, 8, shuffle=True), val_dataloaders=Batches(data, 16, False))
    return trainer


def test_the_logging_and_validation_rules(tmp_path):
    asks = Asks()
    fit(tmp_path, [asks], max_steps=8, logger=False, enable_checkpointing=False, log_every_n_steps=3,
        num_sanity_val_steps=0)
    assert asks.logs == [False, False, True, False, False, True, False, False]  # every 3rd step
    assert asks.validates == [False, False, False, True, False, False, False, True]  # epochs of 4 batches


def test_the_tensorboard_writer(tmp_path):
    writer = private.tensorboard_writer(TensorBoardLogger(tmp_path, name="tb"))
    assert callable(writer.add_summary)


def test_the_checkpoint_callbacks_own_save(tmp_path):
    latest = LatestCheckpoint(dirpath=str(tmp_path / "checkpoints"), every_n_train_steps=5)
    assert private.every_n_train_steps(latest) == 5 and private.last_saved_step(latest) == 0
    trainer = fit(tmp_path, [latest], max_steps=7, logger=False, limit_val_batches=0)
    # step 5 by the interval, step 7 at the end of fit; both through ModelCheckpoint's own save
    assert private.last_saved_step(latest) == 7
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    assert private.skips_saving(latest, trainer)  # after fit: not fitting, and step 7 saved
    private.save_last_checkpoint(latest, trainer)  # the save itself, called directly
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]

"""Every use of Lightning's private API, in one place.

Lightning has no public way to ask these questions; each answer below is one attribute or
method that a Lightning release may rename. tests/test_lightning_private.py checks each one
against a real Trainer, so that an upgrade that changes them fails there, loudly, rather than
quietly changing what a run saves or logs.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether the trainer hands metrics to the loggers at this step (every log_every_n_steps, and
    at a requested stop): Lightning's own rule. Metrics logged on other steps would only cost
    Lightning's bookkeeping, so the model and the callbacks log nothing then."""
    return trainer._logger_connector.should_update_logs


def validates_after_this_batch(trainer: L.Trainer) -> bool:
    """Whether the fit loop validates right after the training batch that has just ended (an
    epoch's end, val_check_interval, a requested stop): Lightning's own rule, asked in
    on_train_batch_end."""
    return bool(trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


def tensorboard_writer(logger):
    """The TensorBoard logger's file writer, for summaries its public API does not write (hparams
    naming the metrics that the run logs under their own tags)."""
    return logger.experiment._get_file_writer()


def save_last_checkpoint(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    """ModelCheckpoint's own save of last.ckpt (its name, its record, its removal of the previous one)."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def skips_saving(callback: ModelCheckpoint, trainer: L.Trainer) -> bool:
    """ModelCheckpoint's rule for not saving now: a sanity check, fast_dev_run, not fitting, or this
    step already saved."""
    return callback._should_skip_saving_checkpoint(trainer)


def last_saved_step(callback: ModelCheckpoint) -> int:
    """The global step of the last checkpoint this callback wrote in this process (0 before)."""
    return callback._last_global_step_saved


def every_n_train_steps(callback: ModelCheckpoint) -> int:
    """The callback's every_n_train_steps setting (0 when it saves by epochs)."""
    return callback._every_n_train_steps


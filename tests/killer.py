"""Test helper (not a test module): a callback that `kill -9`s its own process at a given step,
once per run folder, so that a test can interrupt a run, or one job of a sweep, for real."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import lightning as L


class KillOnce(L.Callback):
    """SIGKILL at `trainer.global_step == step` unless $KILL_ONCE_DIR already holds this run's marker;
    `only` limits it to runs of that estimator class."""

    def __init__(self, step: int, only: str | None = None):
        self.step, self.only = step, only

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step or (self.only and type(pl_module.estimator).__name__ != self.only):
            return
        key = hashlib.sha1(f"{trainer.default_root_dir}:{self.step}".encode()).hexdigest()
        marker = Path(os.environ["KILL_ONCE_DIR"]) / key
        if marker.exists():
            return
        marker.touch()
        os.kill(os.getpid(), signal.SIGKILL)

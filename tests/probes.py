"""Test helpers (not a test module): callbacks that tests add to scripts/train.py runs with
`+callbacks.NAME={_target_:probes.CLASS,...}` (tests put this folder on PYTHONPATH).

- `KillOnce` `kill -9`s (or signals) its own process at a given step, once per run folder, so
  that a test can interrupt a run, or one job of a sweep, for real;
- `RecordRows` writes, per rank, a hash of every training image the rank trained on."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import lightning as L
import torch


class KillOnce(L.Callback):
    """SIGKILL (or `sig`, e.g. SIGTERM) at `trainer.global_step == step` unless $KILL_ONCE_DIR already
    holds this run's marker; `only` limits it to runs of that estimator class."""

    def __init__(self, step: int, only: str | None = None, sig: str = "SIGKILL"):
        self.step, self.only, self.sig = step, only, getattr(signal, sig)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step or (self.only and type(pl_module.estimator).__name__ != self.only):
            return
        key = hashlib.sha1(f"{trainer.default_root_dir}:{self.step}".encode()).hexdigest()
        marker = Path(os.environ["KILL_ONCE_DIR"]) / key
        if marker.exists():
            return
        marker.touch()
        if self.sig == signal.SIGINT:  # as in a terminal: a process started in the background (CI,
            signal.signal(signal.SIGINT, signal.default_int_handler)  # nohup) inherits SIGINT ignored
        os.kill(os.getpid(), self.sig)


class RecordRows(L.Callback):
    """$PROBE_DIR/rows_rank<R>.json: the SHA-1 of every training image this rank's steps saw."""

    def __init__(self):
        self.rows: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows += [hashlib.sha1(row.to(dtype=torch.uint8).cpu().numpy().tobytes()).hexdigest() for row in batch]

    def on_train_end(self, trainer, pl_module):
        path = Path(os.environ["PROBE_DIR"]) / f"rows_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.rows))

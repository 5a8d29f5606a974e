"""Checkpoints: reading one, fitting it to the configured run, the housekeeping of a resume,
the callbacks that write them, and the wall clock they carry.

- `read_checkpoint`: a checkpoint's contents as plain data (`torch.load(weights_only=True)`:
  tensors and containers, never objects), upgraded to the current layout (`upgrade`);
- `check_checkpoint_fits`: the setting in which a checkpoint and the configured run differ;
- `clear_earlier_attempt` / `clear_past_the_checkpoint`: a run folder made to hold only what the
  run about to start (or resume) will know of;
- `BestCheckpoint` / `LatestCheckpoint`: the best weights by `val/neg_elbo`, and last.ckpt every N
  steps for exact resume, both also across a resume from a run folder that has moved;
- `WallClock`: the run's wall time across its resumes, kept in every checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from discrete_vae.errors import ConfigError, DataError, require_number
from discrete_vae.lightning_private import (
    every_n_train_steps, last_saved_step, save_last_checkpoint, skips_saving, validates_after_this_batch,
)
from discrete_vae.records import evaluation_paths

log = logging.getLogger(__name__)


def rank() -> int:
    """This process's global rank under DDP, else 0: Lightning's own record of it (read from the
    launchers' and SLURM's environment, and set by the strategy once it is up)."""
    return getattr(rank_zero_only, "rank", 0) or 0


def best_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The checkpoint callback that keeps the best weights (the one with a monitor), not
    `LatestCheckpoint`, whichever comes first in the list; None when there is none."""
    return next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)


# -- reading -----------------------------------------------------------------------------------
def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The contents of a checkpoint written by `train`, or a DataError saying why it cannot be used."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}; pass ckpt_path=PATH to a .ckpt written by scripts/train.py")
    try:
        # mmap on the CPU: checking a checkpoint before Lightning loads it again reads no tensor twice
        mmap = torch.device(map_location).type == "cpu"
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:  # truncated zip, a text file, a pickle of something else ...
        raise DataError(
            f"cannot read the checkpoint {path} ({type(err).__name__}: {str(err).split('. ')[0][:120]}): "
            f"it is truncated or not a checkpoint. Use another one of the run (checkpoints/last.ckpt "
            f"or checkpoints/best-*.ckpt) or start afresh."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "config" not in checkpoint:
        raise DataError(f"{path} is not a checkpoint written by scripts/train.py (it holds no model state and config)")
    return upgrade(checkpoint)


# Checkpoints written before the model's maths moved out of the LightningModule (discrete_vae.vae)
# and the latent type became its own config group: the model was discrete_vae.model.CategoricalVAE,
# with the latent's size, the optimizer and test_iwae_samples among its settings, and the
# networks' weights at the top of the state dict.
LEGACY_MODEL = "discrete_vae.model.CategoricalVAE"
LEGACY_PREFIXES = ("encoder.", "decoder.")


def upgrade(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of the earlier layout brought, in place, to the current one: its config
    (model -> latent, model, optimizer, test_iwae_samples) and its state-dict keys (encoder.* ->
    vae.encoder.*). A checkpoint of the current layout is returned as it is."""
    cfg = checkpoint.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and cfg["model"].get("_target_") == LEGACY_MODEL:
        model = dict(cfg["model"])
        latent = {"_target_": "discrete_vae.latents.Categorical",
                  "num_latents": model.pop("num_latents", 20), "num_categories": model.pop("num_categories", 10)}
        optimizer, test_iwae_samples = model.pop("optimizer", None), model.pop("test_iwae_samples", 50)
        model.pop("seed", None)  # the run's seed, at the top of the config
        model["_target_"] = "discrete_vae.vae.VAE"
        checkpoint["config"] = {**cfg, "latent": latent, "model": model, "optimizer": optimizer,
                                "test_iwae_samples": test_iwae_samples}
    state = checkpoint.get("state_dict")
    if isinstance(state, dict) and any(key.startswith(LEGACY_PREFIXES) for key in state):
        checkpoint["state_dict"] = {f"vae.{key}" if key.startswith(LEGACY_PREFIXES) else key: value
                                    for key, value in state.items()}
    return checkpoint


# The settings that decide the shapes of the saved state: a checkpoint only fits a model with the
# same (the whole latent node: its type and every one of its settings).
ARCHITECTURE_KEYS = ("model.input_dim", "model.hidden_dims", "model.activation", "latent")


def _get(tree: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _leaves(tree: Any, prefix: str) -> dict[str, Any]:
    """{"latent.num_latents": 20, ...} of a config node (itself when it is a value)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, value in tree.items() for k, v in _leaves(value, f"{prefix}.{key}").items()}


def check_checkpoint_fits(checkpoint: dict[str, Any], cfg: dict[str, Any], path: Path, choices: dict[str, str]) -> None:
    """A ConfigError naming the setting in which the checkpoint and the configured run (`cfg`,
    resolved; `choices`, its group choices) differ."""
    saved = checkpoint["config"]
    fix = ("Resume with the checkpoint's settings (drop the override), or start a new run "
           "(another hydra.run.dir, or resume=never without ckpt_path).")
    for node in ARCHITECTURE_KEYS:
        have, want = _leaves(_get(saved, node), node), _leaves(_get(cfg, node), node)
        for key in sorted(have.keys() | want.keys()):
            if have.get(key) != want.get(key):
                raise ConfigError(
                    f"the checkpoint {path} has {key}={have.get(key)}, the config says {want.get(key)}. {fix}"
                )
    have, want = saved["estimator"]["_target_"], cfg["estimator"]["_target_"]
    if have != want:
        name = lambda choice, target: f"estimator={choice} ({target.rsplit('.', 1)[-1]})" if choice else target  # noqa: E731
        raise ConfigError(
            f"the checkpoint {path} was trained with {name(checkpoint.get('choices', {}).get('estimator'), have)}, "
            f"the config says {name(choices.get('estimator'), want)}. {fix}"
        )



# -- a resume's housekeeping ---------------------------------------------------------------------
def clear_earlier_attempt(output_dir: Path) -> bool:
    """A run folder with no last.ckpt but files of an earlier attempt (killed before its first
    last.ckpt) starts afresh: that attempt's checkpoints (any *.ckpt: with no last.ckpt there is
    nothing to resume) and the scripts/evaluate.py results beside them are deleted, so that the
    folder holds only this run's, and it tells build_run to purge that attempt's TensorBoard events.
    Rank zero only (the other ranks write no files)."""
    if rank() != 0:
        return False
    stale = remove_checkpoints(output_dir, keep=set())
    if stale:
        log.warning("starting afresh: removed %s of an earlier attempt that stopped before its first last.ckpt",
                    ", ".join(stale))
    return bool(stale) or any(output_dir.glob("events.out.tfevents.*"))


def remove_checkpoints(output_dir: Path, keep: set[str]) -> list[str]:
    """Deletes the run's checkpoints whose names are not in `keep`, with the scripts/evaluate.py
    results beside them; returns the names deleted."""
    stale = [p for p in sorted((output_dir / "checkpoints").glob("*.ckpt")) if p.name not in keep]
    for path in stale:
        for evaluation in evaluation_paths(path):
            evaluation.unlink()
        path.unlink()
    return [p.name for p in stale]


def clear_past_the_checkpoint(output_dir: Path, checkpoint: dict) -> list[str]:
    """Resuming a run from its own last.ckpt: the checkpoints that the stopped process wrote after
    that last.ckpt (the best checkpoint of a later validation) are not in the record the resumed
    run restores, so it would never replace or delete them, and would write "-v1" names beside
    them when it reaches the same steps. They are deleted (with their scripts/evaluate.py
    results): the folder is then as it was at the checkpoint, and the resumed run rewrites them.
    Returns the names deleted. Rank zero only."""
    if rank() != 0:
        return []
    known = {"last.ckpt"}
    for state in checkpoint.get("callbacks", {}).values():
        if isinstance(state, dict):
            paths = [state.get(k) for k in ("best_model_path", "kth_best_model_path", "last_model_path")]
            known.update(Path(p).name for p in [*paths, *(state.get("best_k_models") or {})] if p)
    stale = remove_checkpoints(output_dir, keep=known)
    if stale:
        log.warning("removed %s, written after the checkpoint this run resumes from (it writes them again)",
                    ", ".join(stale))
    return stale


# -- callbacks ---------------------------------------------------------------------------------
class WallClock(L.Callback):
    """The wall time of a run across its resumes: each checkpoint stores the seconds spent up to
    it (`elapsed_s`, this callback's state), and a resumed run starts its clock from there, so
    that metrics.json's wall_time_s is the whole run's, not only its last process's. The time a
    killed process spent past its last checkpoint is not counted: it is work the resume redoes."""

    def __init__(self):
        self.before = 0.0  # seconds of earlier processes, up to the checkpoint resumed from
        self._started: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def elapsed(self) -> float:
        return self.before + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def state_dict(self) -> dict:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state_dict: dict) -> None:
        """Only the restore of a resumed fit, which comes before on_fit_start: `trainer.test` of the
        best checkpoint restores the callbacks too, and that checkpoint's time is not this run's."""
        if self._started is None:
            self.before = float(state_dict.get("elapsed_s", 0.0))


class _FollowsItsFolder(ModelCheckpoint):
    """A ModelCheckpoint whose record of its files (the best k, last.ckpt) survives a resume from a
    run folder that has moved since the checkpoint was written (another machine, mount point or
    user; a sweep carried between machines).

    Lightning restores that record only when the checkpoint's `dirpath` is the current one. Else
    it keeps the old `best_model_path` alone: the resumed run forgets the earlier best score and
    keeps the best *since the resume*, leaves the earlier best file beside the new one (Lightning
    issue #18687), and writes `last-v1.ckpt` beside the `last.ckpt` it resumed from. Here the
    stored paths are first moved onto the current folder; files that are not there are dropped
    from the record, and the best and k-th are those of the files kept.
    """

    @cached_property
    def state_key(self) -> str:
        """ModelCheckpoint's key, built once (it names settings fixed at __init__): Lightning asks
        every callback for its key at every hook of every step, for its profiler's label."""
        return self._build_state_key()

    def _build_state_key(self) -> str:
        return super().state_key

    def load_state_dict(self, state_dict: dict) -> None:
        old = state_dict.get("dirpath")
        if old and self.dirpath and Path(old) != Path(self.dirpath):
            state_dict = self._rebased(state_dict, Path(old), Path(self.dirpath))
        super().load_state_dict(state_dict)

    def _rebased(self, state: dict, old: Path, new: Path) -> dict:
        def move(path: str) -> str:
            try:
                return str(new / Path(path).relative_to(old)) if path else path
            except ValueError:  # not under the old folder: left as it is
                return path

        best_k = {move(p): score for p, score in state.get("best_k_models", {}).items()}
        best_k = {p: score for p, score in best_k.items() if Path(p).is_file()}
        state = {**state, "dirpath": str(new), "best_k_models": best_k}
        if best_k:  # Lightning's bookkeeping: the best, and the k-th (the next to go)
            better, worse = (min, max) if self.mode == "min" else (max, min)
            best, kth = better(best_k, key=best_k.get), worse(best_k, key=best_k.get)
            state.update(best_model_path=best, best_model_score=best_k[best], kth_best_model_path=kth,
                         kth_value=best_k[kth])
        else:
            inf = torch.tensor(math.inf if self.mode == "min" else -math.inf)
            state.update(best_model_path="", best_model_score=None, kth_best_model_path="", kth_value=inf)
        last = move(state.get("last_model_path", ""))
        state["last_model_path"] = last if last and Path(last).is_file() else ""
        return state


class BestCheckpoint(_FollowsItsFolder):
    """Lightning's ModelCheckpoint (the best `save_top_k` checkpoints by `monitor`), also across a
    resume from a moved run folder (`_FollowsItsFolder`). It records and saves at
    on_validation_end (Lightning's default for validation at an epoch's end is
    on_train_epoch_end), so that `LatestCheckpoint`, acting there after it, saves a state that
    knows the validation's result. Its state key is ModelCheckpoint's, so the checkpoints of runs
    that used Lightning's class resume into this one."""

    def __init__(self, *args, save_on_train_epoch_end: bool | None = False, **kwargs):
        super().__init__(*args, save_on_train_epoch_end=save_on_train_epoch_end, **kwargs)

    def _build_state_key(self) -> str:
        return "ModelCheckpoint" + super()._build_state_key()[len(type(self).__qualname__):]


class LatestCheckpoint(_FollowsItsFolder):
    """`last.ckpt`: the whole training state (weights, optimizer, estimator buffers, data position,
    callback states; the noise needs none, it is seeded per step) every `every_n_train_steps` steps
    and at the end of fit, so that a run killed at any moment resumes exactly from at most that
    many steps back. It keeps no other checkpoint.

    A step followed by a validation (an epoch's end) is saved after that validation, and after
    `BestCheckpoint` has recorded its result (both act at on_validation_end, in list order:
    `checkpoint` comes before `latest` in the config), not before: Lightning does not repeat the
    validation of a step it resumes from, so a checkpoint taken before it would resume with that
    validation lost, and with a best-checkpoint record that does not know its result. (Not at
    on_train_epoch_end, where Lightning's ModelCheckpoint saves by default: from there Lightning
    resumes without restoring the data loader's position.)"""

    def __init__(self, dirpath: str, every_n_train_steps: int = 1000):
        require_number("callbacks.latest.every_n_train_steps", every_n_train_steps, positive=True, integer=True)
        super().__init__(dirpath=dirpath, every_n_train_steps=every_n_train_steps, save_top_k=0, save_last=True)
        self._after_validation: int | None = None  # the step whose save waits for its validation

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % every_n_train_steps(self) == 0 and validates_after_this_batch(trainer):
            self._after_validation = trainer.global_step
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._after_validation == trainer.global_step and not skips_saving(self, trainer):
            self._after_validation = None
            save_last_checkpoint(self, trainer)

    @property
    def saved_step(self) -> int:
        """The step of the last last.ckpt this process wrote (0 before its first)."""
        return last_saved_step(self)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.saved_step != trainer.global_step:
            save_last_checkpoint(self, trainer)

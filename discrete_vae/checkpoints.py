"""Checkpoints: reading one, fitting it to the configured run, the housekeeping of a resume,
the callbacks that write them, and the wall clock they carry.

- `read_checkpoint`: a checkpoint's contents as plain data (`torch.load(weights_only=True)`:
  tensors and containers, never objects), upgraded to the current layout (`upgrade`);
- `AtomicCheckpointIO`: Lightning's checkpoint I/O, writing whole files only and reading data only;
- `check_checkpoint_fits`: the setting in which a checkpoint and the configured run differ;
- `set_aside_earlier_attempt` / `clear_past_the_checkpoint`: a run folder made to hold only what
  the run about to start (or resume) will know of: an earlier attempt is moved into `earlier/`,
  the checkpoints a killed process wrote past the last.ckpt resumed from are moved there too (the
  resumed run writes them again, bit for bit);
- `BestCheckpoint` / `LatestCheckpoint`: the best weights by `val/neg_elbo`, and last.ckpt every N
  steps for exact resume, both also across a resume from a run folder that has moved;
- `WallClock`: the run's wall time across its resumes, kept in every checkpoint.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pickle
import time
import zipfile
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from discrete_vae.errors import ConfigError, DataError, require_number
from discrete_vae.lightning_private import (
    every_n_train_steps, last_saved_step, save_last_checkpoint, skips_saving, validates_after_this_batch,
)
from discrete_vae.records import EARLIER_DIR, METRICS_FILE, evaluation_paths, write_atomic

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
    """The contents of a checkpoint written by `train`, or a DataError saying why it cannot be used.

    A checkpoint is data: `torch.load(weights_only=True)` reads tensors and plain containers and
    refuses any other Python object, whose unpickling could run code (every checkpoint the project
    writes, DDP and bf16 runs included, is plain data)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}; pass ckpt_path=PATH to a .ckpt written by scripts/train.py")
    zipped = zipfile.is_zipfile(path)  # torch.save's format; anything else is not a checkpoint of ours
    try:
        # mmap on the CPU: checking a checkpoint before Lightning loads it again reads no tensor twice
        mmap = torch.device(map_location).type == "cpu" and zipped
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except PermissionError:
        raise DataError(f"cannot read the checkpoint {path}: permission denied; give this user read access "
                        f"to it") from None
    except pickle.UnpicklingError:
        if zipped:  # a well-formed torch file with objects in it
            raise DataError(
                f"refused the checkpoint {path}: it holds Python objects, and loading them could run code. "
                f"Checkpoints written by scripts/train.py hold only tensors and plain data; use one of those."
            ) from None
        raise DataError(f"cannot read the checkpoint {path}: it is not a torch checkpoint (a text file, a bare "
                        f"pickle, or truncated), and was not loaded. Use checkpoints/last.ckpt or "
                        f"checkpoints/best-*.ckpt of a run, or start afresh.") from None
    except Exception as err:  # truncated zip, a pickle of something else ...
        raise DataError(
            f"cannot read the checkpoint {path} ({type(err).__name__}: {str(err).split('. ')[0][:120]}): "
            f"it is truncated or not a checkpoint. Use another one of the run (checkpoints/last.ckpt "
            f"or checkpoints/best-*.ckpt) or start afresh."
        ) from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict)
            and isinstance(checkpoint.get("config"), dict)):
        raise DataError(f"{path} is not a checkpoint written by scripts/train.py (it holds no model state and config)")
    for node in ("config", "choices", "hyper_parameters"):
        problem = plain_data_problem(checkpoint.get(node) or {}, node)
        if problem:
            raise DataError(f"refused the checkpoint {path}: {problem}. A checkpoint's config is plain data, "
                            f"and scripts/train.py writes it resolved; use a checkpoint written by it")
    checkpoint = upgrade(checkpoint)
    problem = implausible_state(checkpoint)
    if problem:
        raise DataError(f"refused the checkpoint {path}: {problem}")
    return checkpoint


PARTS = ("latent", "model", "estimator", "data")  # the config nodes a checkpoint's model is rebuilt from
MAX_STEP = 10**10


def _optimizer_steps(checkpoint: dict[str, Any]) -> Any:
    """The optimizer steps Lightning's training loop counted (what a resumed run restores as its
    global step), or None where the checkpoint has no loop state."""
    loop = checkpoint.get("loops", {})
    loop = loop.get("fit_loop", {}) if isinstance(loop, dict) else {}
    progress = loop.get("epoch_loop.automatic_optimization.optim_progress") if isinstance(loop, dict) else None
    for key in ("optimizer", "step", "total", "completed"):
        progress = progress.get(key) if isinstance(progress, dict) else None
    return progress


def implausible_state(checkpoint: dict[str, Any]) -> str | None:
    """What makes a checkpoint's state one that scripts/train.py cannot have written, or None:
    a config without its parts; weights that are not finite (a diverged or damaged run, whose
    bounds would be NaN); a global step that is not a whole number in [0, 1e10], or that
    disagrees with the optimizer steps of the training loop's own record (the record of the run
    would claim steps never trained); a wall clock that is not a finite, non-negative number."""
    cfg = checkpoint["config"]
    for part in PARTS:
        if not isinstance(cfg.get(part), dict) or not isinstance(cfg[part].get("_target_"), str):
            return (f"its config has no {part} node with a _target_ (got {str(cfg.get(part))[:60]!r}), "
                    f"so its model cannot be rebuilt")
    for key, value in checkpoint["state_dict"].items():
        if not isinstance(value, torch.Tensor):
            return f"its weight {key} is a {type(value).__name__}, not a tensor"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return (f"its weight {key} holds NaN or infinite values (a run that diverged, or a damaged "
                    f"file); use an earlier checkpoint of the run")
    step = checkpoint.get("global_step", 0)
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        return f"its global_step={str(step)[:40]} is not a whole number of steps in [0, {MAX_STEP:.0e}]"
    steps = _optimizer_steps(checkpoint)
    if steps is not None and steps != step:
        return (f"its global_step={step} disagrees with the {steps} optimizer steps its training loop "
                f"recorded: it was edited, and a run resumed from it would record steps never trained")
    clock = checkpoint.get("callbacks", {}).get("WallClock") if isinstance(checkpoint.get("callbacks"), dict) else None
    elapsed = clock.get("elapsed_s", 0.0) if isinstance(clock, dict) else 0.0
    if not isinstance(elapsed, (int, float)) or isinstance(elapsed, bool) or not 0 <= elapsed < math.inf:
        return f"its wall clock (WallClock.elapsed_s={str(elapsed)[:40]}) is not a finite, non-negative number of seconds"
    return None


# Hydra's instantiate keys a checkpoint's config may hold, and the values they may take
SPECIAL_KEYS = {"_target_": None, "_convert_": ("none", "partial", "object", "all"), "_partial_": (True, False)}
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_ITEMS = 100_000


def plain_data_problem(tree: Any, where: str) -> str | None:
    """Why a checkpoint's stored config (or group choices) is not plain data, or None when it is.

    Plain data: dicts with string keys, lists, strings, numbers, booleans and None, at most
    MAX_CONFIG_DEPTH deep and MAX_CONFIG_ITEMS in all; no string holding `${` (an OmegaConf
    interpolation or resolver, such as `${oc.create:{_target_: ...}}` or `${key}` pointing at an
    unchecked node: resolving one can build any object, so none is ever resolved); and of Hydra's
    underscore keys only `_target_` (checked against the allowlist by discrete_vae.build),
    `_convert_` and `_partial_` with their plain values (`_args_`, `_recursive_` and the like
    are never written by scripts/train.py)."""
    stack, seen = [(tree, where, 0)], 0
    while stack:
        node, key, depth = stack.pop()
        seen += 1
        if depth > MAX_CONFIG_DEPTH or seen > MAX_CONFIG_ITEMS:
            return f"its {where} is nested deeper than {MAX_CONFIG_DEPTH} or holds over {MAX_CONFIG_ITEMS} values"
        if isinstance(node, dict):
            for name, value in node.items():
                if not isinstance(name, str):
                    return f"{key} has a key that is not a string ({type(name).__name__})"
                if "${" in name:
                    return f"{key} has a key holding an interpolation ({name[:60]!r})"
                if name.startswith("_") and name.endswith("_"):
                    allowed = SPECIAL_KEYS.get(name, ())
                    if allowed is not None and value not in allowed:
                        return f"{key}.{name}={repr(value)[:60]} is not a setting scripts/train.py writes"
                stack.append((value, f"{key}.{name}", depth + 1))
        elif isinstance(node, (list, tuple)):
            stack.extend((value, f"{key}[{i}]", depth + 1) for i, value in enumerate(node))
        elif isinstance(node, str):
            if "${" in node:
                return f"{key}={node[:80]!r} is an interpolation, which loading would resolve"
        elif node is not None and not isinstance(node, (bool, int, float)):
            return f"{key} holds a {type(node).__name__}, not plain data"
    return None


# Checkpoints written before the model's maths moved out of the LightningModule (discrete_vae.vae)
# and the latent type became its own config group: the model was discrete_vae.model.CategoricalVAE,
# with the latent's size, the optimizer and test_iwae_samples among its settings, and the
# networks' weights at the top of the state dict.
LEGACY_MODEL = "discrete_vae.model.CategoricalVAE"
LEGACY_PREFIXES = ("encoder.", "decoder.", "vae.")  # the module's model, before it was `model`


def upgrade(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint of an earlier layout brought, in place, to the current one. The first layout:
    its config (model -> latent, model, optimizer, test_iwae_samples) and its state-dict keys
    (encoder.* -> model.encoder.*); the next: the LightningModule's model held as `vae` (vae.* ->
    model.*). A checkpoint of the current layout is returned as it is."""
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
    if isinstance(state, dict) and any(isinstance(k, str) and k.startswith(LEGACY_PREFIXES) for k in state):
        checkpoint["state_dict"] = {renamed(key): value for key, value in state.items()}
    return checkpoint


def renamed(key: Any) -> Any:
    """A state-dict key of an earlier layout under its current name."""
    if isinstance(key, str) and key.startswith(LEGACY_PREFIXES):
        return "model." + key.removeprefix("vae.")
    return key


# The settings that decide the shapes of the saved state: a checkpoint only fits a model with the
# same (the whole latent node: its type and every one of its settings).
ARCHITECTURE_KEYS = ("model._target_", "model.input_dim", "model.hidden_dims", "model.activation",
                     "model.activation_args", "model.upper_hidden_dims", "model.split", "model.encoder",
                     "model.decoder", "latent", "upper_latents")
# what a key absent from an earlier checkpoint's config meant (it predates the key)
ARCHITECTURE_DEFAULTS = {"model._target_": "discrete_vae.vae.VAE", "model.activation_args": {},
                         "model.upper_hidden_dims": [], "upper_latents": [], "model.encoder": None,
                         "model.decoder": None}


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
        default = ARCHITECTURE_DEFAULTS.get(node)
        have, want = (_leaves(_get(tree, node) if _get(tree, node) is not None else default, node) for tree in (saved, cfg))
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



def check_weights_fit(module: torch.nn.Module, state: dict[str, Any], path: Path) -> None:
    """A DataError naming the first weight of a checkpoint that the module built from its own config
    lacks, does not have, or has in another shape (a checkpoint edited, or its config changed):
    torch's load_state_dict would stop with a traceback listing them all."""
    own = module.state_dict()
    for key in sorted(own.keys() | state.keys()):
        if key not in state:
            problem = f"has no weight {key}, which its config's model has"
        elif key not in own:
            problem = f"has a weight {key} that its config's model does not have"
        elif tuple(state[key].shape) != tuple(own[key].shape):
            problem = f"has {key} of shape {tuple(state[key].shape)}, its config's model {tuple(own[key].shape)}"
        else:
            continue
        raise DataError(f"refused the checkpoint {path}: it {problem}, so its weights do not fit its config "
                        f"(an edited file); use a checkpoint written by scripts/train.py")


# -- a resume's housekeeping ---------------------------------------------------------------------
def _kind(path: Path) -> str:
    if path.is_symlink():
        return "a symlink"
    return "a folder" if path.is_dir() else "not a regular file" if path.exists() else "absent"


def check_run_folder(output_dir: Path) -> None:
    """A ConfigError when the run folder's own places are not what scripts/train.py makes: its
    `checkpoints/` and `earlier/` folders must be folders of its own (a symlink to elsewhere would
    have a resume move the run's files out, or someone else's in), and `checkpoints/last.ckpt`,
    when there is one, a regular file (a folder, a symlink or a device there would otherwise be
    taken for "no checkpoint", and the run would silently start again from step 0)."""
    for name in ("checkpoints", EARLIER_DIR):
        place = output_dir / name
        if place.is_symlink() or (place.exists() and not place.is_dir()):
            raise ConfigError(f"{place} is {_kind(place) if place.is_symlink() else 'a file'}, not a folder of the "
                              f"run's own: remove or rename it, or train in another folder (hydra.run.dir=...)")
    last = output_dir / "checkpoints" / "last.ckpt"
    if os.path.lexists(last) and (last.is_symlink() or not last.is_file()):
        raise ConfigError(f"{last} is {_kind(last)}, not a checkpoint file written by scripts/train.py: "
                          f"remove or rename it (resume=auto would resume from it), or train in another folder")


def set_aside_earlier_attempt(output_dir: Path, why: str) -> Path | None:
    """A fresh start in a folder that holds an earlier attempt's files (resume=never, or resume=auto
    with no last.ckpt to resume from): its record, checkpoints (with their scripts/evaluate.py
    results), TensorBoard events and hparams are moved, as they are, into
    `earlier/<time>/` inside the run folder, so that the folder holds only this run's files and
    nothing recorded is lost. Returns that folder, or None when there was nothing to move. Rank
    zero only (the other ranks write no files)."""
    if rank() != 0:
        return None
    found = [p for pattern in (METRICS_FILE, "hparams.yaml", "events.out.tfevents.*", "checkpoints/*")
             for p in sorted(output_dir.glob(pattern)) if p.is_file() or p.is_symlink()]
    if not found:
        return None
    target = move_into_earlier(output_dir, found)
    log.warning("starting afresh (%s): the earlier attempt's %d files are kept in %s", why, len(found), target)
    return target


def move_into_earlier(output_dir: Path, paths: list[Path]) -> Path:
    """Moves the run folder's `paths`, as they are, into a new `earlier/<time>/` inside it (keeping
    their places relative to the run folder); returns that folder."""
    target = output_dir / EARLIER_DIR / time.strftime("%Y-%m-%d_%H-%M-%S")
    while target.exists():
        target = target.with_name(target.name + "+")
    for path in paths:
        destination = target / path.relative_to(output_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        path.rename(destination)
    return target


def clear_past_the_checkpoint(output_dir: Path, checkpoint: dict) -> list[str]:
    """Resuming a run from its own last.ckpt: the checkpoints that the stopped process wrote after
    that last.ckpt (the best checkpoint of a later validation) are not in the record the resumed
    run restores, so it would never replace or delete them, and would write "-v1" names beside
    them when it reaches the same steps. They are moved (with their scripts/evaluate.py results)
    into `earlier/<time>/checkpoints/`: the folder is then as it was at the checkpoint, the resumed
    run writes them again, and nothing recorded is lost. Returns the names moved. Rank zero only."""
    if rank() != 0:
        return []
    known = {"last.ckpt"}
    states = checkpoint.get("callbacks") if isinstance(checkpoint.get("callbacks"), dict) else {}
    for state in states.values():
        if isinstance(state, dict):
            paths = [state.get(k) for k in ("best_model_path", "kth_best_model_path", "last_model_path")]
            best_k = state.get("best_k_models") if isinstance(state.get("best_k_models"), dict) else {}
            known.update(Path(p).name for p in [*paths, *best_k] if isinstance(p, str) and p)
    stale = [p for p in sorted((output_dir / "checkpoints").glob("*.ckpt")) if p.name not in known]
    if stale:
        target = move_into_earlier(output_dir, [f for p in stale for f in (*evaluation_paths(p), p)])
        log.warning("moved %s, written after the checkpoint this run resumes from (it writes them again), into %s",
                    ", ".join(p.name for p in stale), target)
    return [p.name for p in stale]


# -- writing -----------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O for every run: a checkpoint is written whole or not at all, and
    read as data only.

    Lightning's own writer serialises to memory and then copies the bytes through a temporary file
    in $TMPDIR: when the run folder is on another filesystem, a full disk or a kill during that copy
    leaves `last.ckpt` truncated, and the run cannot resume. Here the bytes go to a temporary file
    in the checkpoint's own folder, are flushed to disk, and are renamed over the old file
    (records.write_atomic). Every load, Lightning's resume and test included, is
    `torch.load(weights_only=True)`, whatever the caller asks."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)  # serialised first: a failure here writes nothing
        write_atomic(Path(path), buffer.getbuffer())

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


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
    """A ModelCheckpoint whose record of its files (the best k, last.ckpt) is confined to its own
    folder and survives a resume from a run folder that has moved since the checkpoint was written
    (another machine, mount point or user; a sweep carried between machines).

    Every path restored from a checkpoint is mapped into this callback's folder (from the folder
    the checkpoint was written in) or dropped: a checkpoint naming `../../victim` as its best
    model would otherwise have Lightning delete that file when a better one comes. Files that are
    not there are dropped from the record too, and the best and k-th are those of the files kept.
    (Lightning restores the record only when the stored `dirpath` is the current one; else it
    keeps the old `best_model_path` alone: the resumed run forgets the earlier best score, leaves
    the earlier best file beside the new one (Lightning issue #18687), and writes `last-v1.ckpt`
    beside the `last.ckpt` it resumed from.)
    """

    @cached_property
    def state_key(self) -> str:
        """ModelCheckpoint's key, built once (it names settings fixed at __init__): Lightning asks
        every callback for its key at every hook of every step, for its profiler's label."""
        return self._build_state_key()

    def _build_state_key(self) -> str:
        return super().state_key

    def load_state_dict(self, state_dict: dict) -> None:
        if self.dirpath:
            state_dict = self._confined(state_dict, Path(self.dirpath))
        super().load_state_dict(state_dict)
        # the last monitored value, which Lightning saves and does not restore: a run resumed from the
        # checkpoint written after its final validation runs none, and its record reads it here
        self.current_score = state_dict.get("current_score")

    def _confined(self, state: dict, here: Path) -> dict:
        old = Path(state["dirpath"]) if isinstance(state.get("dirpath"), str) and state["dirpath"] else here

        def inside(path) -> str:
            """`path` as a file of `here` (moved with the folder), or "" when it names anything else."""
            if not isinstance(path, str) or not path:
                return ""
            moved = Path(path)
            try:
                moved = here / moved.relative_to(old)
            except ValueError:  # not under the folder it was written in
                pass
            return str(moved) if moved.parent == here and moved.name not in ("", ".", "..") else ""

        stored = state.get("best_k_models") if isinstance(state.get("best_k_models"), dict) else {}
        best_k = {inside(p): score for p, score in stored.items()}
        best_k = {p: score for p, score in best_k.items() if p and Path(p).is_file()}
        state = {**state, "dirpath": str(here), "best_k_models": best_k}
        if best_k:  # Lightning's bookkeeping: the best, and the k-th (the next to go)
            better, worse = (min, max) if self.mode == "min" else (max, min)
            best, kth = better(best_k, key=best_k.get), worse(best_k, key=best_k.get)
            state.update(best_model_path=best, best_model_score=best_k[best], kth_best_model_path=kth,
                         kth_value=best_k[kth])
        else:
            inf = torch.tensor(math.inf if self.mode == "min" else -math.inf)
            state.update(best_model_path="", best_model_score=None, kth_best_model_path="", kth_value=inf)
        last = inside(state.get("last_model_path"))
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
        key = "callbacks.checkpoint."
        if kwargs.get("mode", "min") not in ("min", "max"):
            raise ConfigError(f"{key}mode={kwargs['mode']!r} is not one of min, max")
        require_number(key + "save_top_k", kwargs.get("save_top_k", 1), integer=True, low=-1, hint="-1 keeps all")
        if not isinstance(kwargs.get("monitor"), str):
            raise ConfigError(f"{key}monitor must name a logged metric such as val/neg_elbo, got {kwargs.get('monitor')!r}")
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

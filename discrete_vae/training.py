"""From a Hydra config to a trained model: build, fit, test, and record the run.

scripts/train.py is a thin Hydra entry point around `train`; evaluation and
study scripts reuse `build_model` and `load_checkpoint`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from discrete_vae.callbacks import LatestCheckpoint, ValidateAtLastStep, WallClock, best_checkpoint
from discrete_vae.errors import (
    ConfigError, DataError, RunFolderBusy, TrainingDiverged, find_user_error, require_number,
)
from discrete_vae.model import CategoricalVAE

log = logging.getLogger(__name__)


def build_model(cfg: DictConfig) -> CategoricalVAE:
    """The estimator, then the model around it (which checks the estimator's budget).

    A user's mistake (ConfigError) is raised as itself, not wrapped in Hydra's InstantiationException.
    """
    try:
        return instantiate(cfg.model, estimator=instantiate(cfg.estimator))
    except InstantiationException as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        raise user_error from None


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The contents of a checkpoint written by `train`, or a DataError saying why it cannot be used."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"no checkpoint at {path}; pass ckpt_path=PATH to a .ckpt written by scripts/train.py")
    try:
        # mmap on the CPU: checking a checkpoint before Lightning loads it again reads no tensor twice
        mmap = torch.device(map_location).type == "cpu"
        checkpoint = torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
    except Exception as err:  # truncated zip, a text file, a pickle of something else ...
        raise DataError(
            f"cannot read the checkpoint {path} ({type(err).__name__}: {str(err).split('. ')[0][:120]}): "
            f"it is truncated or not a checkpoint. Use another one of the run (checkpoints/last.ckpt "
            f"or checkpoints/best-*.ckpt) or start afresh."
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "config" not in checkpoint:
        raise DataError(f"{path} is not a checkpoint written by scripts/train.py (it holds no model state and config)")
    return checkpoint


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[CategoricalVAE, DictConfig]:
    """A model and its training config from a checkpoint written by `train`."""
    checkpoint = read_checkpoint(path, map_location)
    cfg = OmegaConf.create(checkpoint["config"])
    model = build_model(cfg)
    model.load_state_dict(checkpoint["state_dict"])
    model.on_load_checkpoint(checkpoint)  # trained weights: a later fit keeps its output bias
    return model, cfg


# The settings that decide the shapes of the saved state: a checkpoint only fits a model with the same.
ARCHITECTURE_KEYS = ("num_latents", "num_categories", "input_dim", "hidden_dims", "activation")


def check_checkpoint_fits(checkpoint: dict[str, Any], cfg: DictConfig, path: Path) -> None:
    """A ConfigError naming the setting in which the checkpoint and the configured run differ."""
    saved = checkpoint["config"]
    fix = (f"Resume with the checkpoint's settings (drop the override), or start a new run "
           f"(another hydra.run.dir, or resume=never without ckpt_path).")
    for key in ARCHITECTURE_KEYS:
        have, want = saved["model"].get(key), OmegaConf.to_container(cfg.model, resolve=True).get(key)
        if have != want:
            raise ConfigError(f"the checkpoint {path} has model.{key}={have}, the config says {want}. {fix}")
    have, want = saved["estimator"]["_target_"], cfg.estimator._target_
    if have != want:
        name = lambda choice, target: f"estimator={choice} ({target.rsplit('.', 1)[-1]})" if choice else target  # noqa: E731
        raise ConfigError(
            f"the checkpoint {path} was trained with {name(checkpoint.get('choices', {}).get('estimator'), have)}, "
            f"the config says {name(run_summary(cfg)['choices'].get('estimator'), want)}. {fix}"
        )


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"model/num_latents": 20, ...} with TensorBoard-friendly values."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}/"))
        return out
    value = tree if isinstance(tree, (bool, int, float, str)) else str(tree)
    return {prefix.rstrip("/"): value}


def log_hparams(logger, params: dict[str, Any], metric_tags: list[str]) -> None:
    """Write TensorBoard's hparams summaries naming `metric_tags`; the metric values are the
    scalars the run logs under those tags, so the hparams view shows the final val/neg_elbo."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard.summary import hparams

    if not isinstance(logger, TensorBoardLogger):
        return
    experiment, start, end = hparams(params, {tag: math.nan for tag in metric_tags})
    writer = logger.experiment._get_file_writer()
    for summary in (experiment, start, end):
        writer.add_summary(summary)


def run_summary(cfg: DictConfig) -> dict[str, Any]:
    """The group choices (estimator=..., data=...) and the command-line overrides of this run."""
    try:
        hydra_cfg = HydraConfig.get()
        choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra")}
        overrides = list(hydra_cfg.overrides.task)
    except ValueError:  # not under Hydra (tests composing configs directly)
        choices, overrides = {}, []
    return {"choices": choices, "overrides": overrides}


RESUME_MODES = ("auto", "never")
DONE = ("finished", "diverged")  # a re-run with resume=auto leaves such runs as they are


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then test the best checkpoint; write metrics.json into the run directory.

    With `resume=auto` (the default) a run directory that already holds a finished (or diverged)
    metrics.json is skipped, untouched, and one that holds checkpoints/last.ckpt is resumed from
    it, so re-running a sweep finishes only what is missing. `resume=never` starts afresh.

    A run that raises still writes metrics.json, with status "failed" (or "diverged") and the
    error, so that scripts/report.py lists it; the exception is then re-raised.
    """
    start = time.perf_counter()
    output_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
    resume = cfg.get("resume", "auto")
    if resume not in RESUME_MODES:
        raise ConfigError(f"resume={resume!r} is not one of {', '.join(RESUME_MODES)}")
    if resume == "auto" and (done := _finished_record(output_dir)) is not None:
        # on stderr only: the finished run's own log stays as it was
        print(f"[discrete_vae] {output_dir} is already {done['status']} (metrics.json): skipped. "
              f"Use resume=never to run it again.", file=sys.stderr)
        return done
    with run_folder_lock(output_dir):
        return _fit_or_record_failure(cfg, output_dir, start, resume)


def _fit_or_record_failure(cfg: DictConfig, output_dir: Path, start: float, resume: str) -> dict[str, Any]:
    """Every record's wall time counts the earlier processes of a resumed run (WallClock.before)."""
    clock = WallClock()
    try:
        return _fit_and_test(cfg, output_dir, start, resume, clock)
    except TrainingDiverged as err:
        write_record(cfg, output_dir, start - clock.before, status="diverged", metrics=err.metrics, steps=err.step,
                     error=str(err))
        raise
    except Exception as err:
        error = find_user_error(err) or err
        write_record(cfg, output_dir, start - clock.before, status="failed", metrics={},
                     error=f"{type(error).__name__}: {error}")
        raise


LOCK_FILE = ".training.lock"


@contextlib.contextmanager
def run_folder_lock(output_dir: Path):
    """One process trains a run folder at a time: two (a sweep started twice, a launcher's workers
    left running by a killed parent) would overwrite each other's last.ckpt and records. An
    advisory lock on a file in the folder, held by rank zero for the whole run; the system
    releases it when the process ends, kill -9 included, so it never goes stale."""
    if _rank() != 0 or fcntl is None:  # DDP's other ranks share rank zero's folder; no fcntl on Windows
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunFolderBusy(
                f"another process (pid {holder}) is training {output_dir}: two processes in one run folder "
                f"overwrite each other's checkpoints. Wait for it, or stop it (all of a sweep's processes, "
                f"launcher workers included) and run this again to resume"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _finished_record(output_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((output_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("status") in DONE else None


def strict_json(value: Any) -> Any:
    """Non-finite floats as None (JSON has no NaN or Infinity), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_record(cfg: DictConfig, output_dir: Path, start: float, **fields: Any) -> dict[str, Any]:
    """metrics.json of a run: estimator, overrides, seed, wall time, and `fields` (status, metrics, ...),
    as strict JSON, written by rank zero only and atomically (a kill never leaves half a file)."""
    summary = run_summary(cfg)
    record = strict_json({
        "estimator": summary["choices"].get("estimator"),
        "overrides": summary["overrides"],
        "seed": cfg.get("seed"),
        "wall_time_s": round(time.perf_counter() - start, 2),
        **fields,
        "machine": machine(cfg),
        "commit": source_commit(),
    })
    if _rank() == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = output_dir / "metrics.json.part"
        tmp.write_text(json.dumps(record, indent=2, allow_nan=False))
        os.replace(tmp, output_dir / "metrics.json")
    return record


def machine(cfg: DictConfig | None = None) -> dict[str, Any]:
    """What the run ran on, for the record: CPU model, the GPU if it trained on one, torch threads."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = f"{names[0]} ({len(names)} logical cores)" if names else cpu
    except OSError:
        pass
    accelerator = str(cfg.get("trainer", {}).get("accelerator", "auto")) if cfg is not None else "auto"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and accelerator != "cpu" else None
    return {"cpu": cpu, "gpu": gpu, "threads": torch.get_num_threads(), "torch": torch.__version__}


def source_commit() -> str | None:
    """`git describe --always --dirty` of the checkout this package runs from, or None."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _rank() -> int:
    """This process's global rank under DDP, else 0: Lightning's own record of it (read from the
    launchers' and SLURM's environment, and set by the strategy once it is up)."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) or 0


def set_num_threads(cfg: DictConfig) -> None:
    """torch threads of this process: `num_threads`, or under the joblib launcher the cores shared
    out among its n_jobs, so that parallel jobs do not fight over cores."""
    threads = cfg.get("num_threads")
    if threads is None and HydraConfig.initialized():
        launcher = HydraConfig.get().launcher
        if "Joblib" in str(launcher.get("_target_", "")):
            jobs = launcher.get("n_jobs") or 1
            jobs = os.cpu_count() if jobs < 0 else jobs
            threads = max(1, (os.cpu_count() or 1) // jobs)
    if threads is not None:
        torch.set_num_threads(require_number("num_threads", threads, positive=True, integer=True))


def check_temperature_settings(overrides: list[str]) -> None:
    """`estimator.tau` and `callbacks.temperature.tau_0` both given, with different values, on the
    command line: two starts for one schedule. The user is asked to keep one."""
    given = {key.lstrip("+~"): value for key, _, value in (str(o).partition("=") for o in overrides)}
    tau, tau_0 = given.get("estimator.tau"), given.get("callbacks.temperature.tau_0")
    if tau is None or tau_0 in (None, "null"):
        return
    try:
        same = float(tau) == float(tau_0)
    except ValueError:
        return  # not numbers: the estimator or the callback names the bad value
    if not same:
        raise ConfigError(
            f"estimator.tau={tau} and callbacks.temperature.tau_0={tau_0} are two different starts of the "
            f"temperature schedule; give one (callbacks.temperature.tau_0=null, the default, starts from estimator.tau)"
        )


def _resume_from(cfg: DictConfig, output_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: ckpt_path if given, else with resume=auto the run's last.ckpt."""
    if cfg.get("ckpt_path"):
        return Path(cfg.ckpt_path).expanduser().resolve()
    last = output_dir / "checkpoints" / "last.ckpt"
    return last if resume == "auto" and last.is_file() else None


def quiet_third_party() -> None:
    """Silence what a researcher does not act on: Lightning's start-up notices (accelerators found,
    advertisements, "restoring states"; its warnings stay), a deprecation inside Lightning's own
    code, the notice that a resumed run's checkpoint folder is not empty, and the notice that our
    module's transfer_batch_to_device (a deliberate pass-through, model.py) takes precedence."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device` in `LightningModule`")


def build_run(
    cfg: DictConfig, output_dir: Path, resumed_step: int = 0, fresh: bool = True,
    datamodule=None, model: CategoricalVAE | None = None, extra_trainer: dict | None = None,
    wall_clock: WallClock | None = None, earlier_attempt: bool = False,
) -> tuple[L.LightningDataModule, CategoricalVAE, L.Trainer]:
    """The datamodule (splits loaded), the model and the Trainer of a run, as scripts/train.py
    builds them (scripts/benchmark_fit.py times exactly these). `earlier_attempt`: a fresh start
    in a folder where a killed attempt left TensorBoard events, which are then purged."""
    datamodule = datamodule if datamodule is not None else instantiate(cfg.data)
    model = model if model is not None else build_model(cfg)
    datamodule.load_splits()  # missing or corrupt data fails here, before any run output
    summary = run_summary(cfg)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)
    model.run_choices = summary["choices"]

    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    callbacks += [ValidateAtLastStep(), wall_clock or WallClock()]
    logger = False
    if cfg.get("logger"):
        # after a resume, TensorBoard drops the events the interrupted run wrote past the checkpoint
        # (all of them after a fresh start over an attempt that never reached a last.ckpt)
        purge = resumed_step if resumed_step else (0 if earlier_attempt else None)
        logger = instantiate(cfg.logger, **({"purge_step": purge} if purge is not None else {}))
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(output_dir), **(extra_trainer or {})
    )
    if logger and trainer.is_global_zero and fresh:
        params = _flat(model.run_config)
        params.update({f"choice/{k}": str(v) for k, v in summary["choices"].items()})
        log_hparams(logger, params, ["val/neg_elbo", "test/neg_elbo"])
    return datamodule, model, trainer


def _fit_and_test(cfg: DictConfig, output_dir: Path, start: float, resume: str, clock: WallClock) -> dict[str, Any]:
    quiet_third_party()
    torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "high"))
    set_num_threads(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    check_temperature_settings(run_summary(cfg)["overrides"])
    datamodule = instantiate(cfg.data)  # config errors of data and model first, before reading anything
    model = build_model(cfg)
    ckpt_path = _resume_from(cfg, output_dir, resume)
    resumed_step = 0
    if ckpt_path is not None:  # fails here, with the setting that differs, before any run output
        checkpoint = read_checkpoint(ckpt_path)
        check_checkpoint_fits(checkpoint, cfg, ckpt_path)
        resumed_step = int(checkpoint.get("global_step", 0))
        if Path(ckpt_path).resolve() == (output_dir / "checkpoints" / "last.ckpt").resolve():
            clear_past_the_checkpoint(output_dir, checkpoint)
        del checkpoint
        log.info("resuming from %s (step %d)", ckpt_path, resumed_step)
    earlier_attempt = ckpt_path is None and resume == "auto" and clear_earlier_attempt(output_dir)
    datamodule, model, trainer = build_run(cfg, output_dir, resumed_step=resumed_step, fresh=ckpt_path is None,
                                           datamodule=datamodule, model=model, wall_clock=clock,
                                           earlier_attempt=earlier_attempt)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        stopped_by_sigterm(trainer, resumed_step)
    if trainer.interrupted:
        raise KeyboardInterrupt
    best = getattr(best_checkpoint(trainer), "best_model_path", "")
    metrics = {"val/neg_elbo": _scalar(trainer.callback_metrics.get("val/neg_elbo"))}
    if cfg.get("test", True):
        if not best:
            log.warning("no best checkpoint (no validation ran): testing the final weights")
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})

    record = write_record(
        cfg, output_dir, start - clock.before, status="finished", metrics=metrics, steps=trainer.global_step,
        best_checkpoint=best or None, resumed_from_step=resumed_step or None,
    )
    log.info("metrics: %s", json.dumps(record["metrics"]))
    return record


def clear_earlier_attempt(output_dir: Path) -> bool:
    """A run folder with no last.ckpt but files of an earlier attempt (killed before its first
    last.ckpt) starts afresh: that attempt's checkpoints (any *.ckpt: with no last.ckpt there is
    nothing to resume) and the scripts/evaluate.py results beside them are deleted, so that the
    folder holds only this run's, and it tells build_run to purge that attempt's TensorBoard events.
    Rank zero only (the other ranks write no files)."""
    if _rank() != 0:
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
        for evaluation in path.parent.glob(f"{path.stem}_eval_*.json"):
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
    if _rank() != 0:
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


SIGTERM_EXIT = 143  # 128 + SIGTERM, the shell's status for a process ended by SIGTERM


def stopped_by_sigterm(trainer: L.Trainer, resumed_step: int) -> None:
    """A SIGTERM (a cluster's preemption, `kill`, a launcher shutting down) makes Lightning stop
    after the step in progress and leave fit() by a SystemExit with status 0, as if the run had
    succeeded. Here it ends with status 143 and says where the run can resume from."""
    saved = max([c.saved_step for c in trainer.callbacks if isinstance(c, LatestCheckpoint)]
                + [resumed_step])  # this process's last save, else the checkpoint it resumed from
    where = f"last.ckpt holds step {saved}" if saved > 0 else "no last.ckpt yet"
    log.error("stopped by SIGTERM at step %d, before the end of training (%s): run the same command again "
              "to resume (resume=auto)", trainer.global_step, where)
    raise SystemExit(SIGTERM_EXIT)


def _scalar(value) -> float | None:
    return None if value is None else float(value)

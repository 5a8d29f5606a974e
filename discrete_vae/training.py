"""From a Hydra config to a trained model: fit, test, and record the run.

scripts/train.py is a thin Hydra entry point around `train`. The parts come from
discrete_vae.build, the checkpoints' reading and housekeeping from discrete_vae.checkpoints,
and the record from discrete_vae.records; what is left here is the run's order: one process
per run folder (`run_folder_lock`), resume or start afresh, fit, test, record, and what a
signal or a failure leaves behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
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
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams

from discrete_vae import records
from discrete_vae.build import build, build_model
from discrete_vae.callbacks import ValidateAtLastStep
from discrete_vae.checkpoints import (
    LatestCheckpoint, WallClock, best_checkpoint, check_checkpoint_fits, clear_earlier_attempt,
    clear_past_the_checkpoint, rank, read_checkpoint,
)
from discrete_vae.errors import ConfigError, RunFolderBusy, TrainingDiverged, find_user_error, require_number
from discrete_vae.lightning_private import tensorboard_writer
from discrete_vae.module import VAEModule

log = logging.getLogger(__name__)


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
    if not isinstance(logger, TensorBoardLogger):
        return
    experiment, start, end = hparams(params, {tag: math.nan for tag in metric_tags})
    writer = tensorboard_writer(logger)
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
    if resume == "auto" and (done := records.done_record(output_dir)) is not None:
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
        write_record(cfg, output_dir, start - clock.before, status=records.DIVERGED, metrics=err.metrics,
                     steps=err.step, error=str(err))
        raise
    except Exception as err:
        error = find_user_error(err) or err
        write_record(cfg, output_dir, start - clock.before, status=records.FAILED, metrics={},
                     error=f"{type(error).__name__}: {error}")
        raise


LOCK_FILE = ".training.lock"


@contextlib.contextmanager
def run_folder_lock(output_dir: Path):
    """One process trains a run folder at a time: two (a sweep started twice, a launcher's workers
    left running by a killed parent) would overwrite each other's last.ckpt and records. An
    advisory lock on a file in the folder, held by rank zero for the whole run; the system
    releases it when the process ends, kill -9 included, so it never goes stale."""
    if rank() != 0 or fcntl is None:  # DDP's other ranks share rank zero's folder; no fcntl on Windows
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


def write_record(cfg: DictConfig, output_dir: Path, start: float, **fields: Any) -> dict[str, Any]:
    """metrics.json of a run (discrete_vae.records): estimator, overrides, seed, wall time, and
    `fields` (status, metrics, ...), written by rank zero only."""
    summary = run_summary(cfg)
    record = {
        "estimator": summary["choices"].get("estimator"),
        "overrides": summary["overrides"],
        "seed": cfg.get("seed"),
        "wall_time_s": round(time.perf_counter() - start, 2),
        **fields,
        "machine": records.machine(str(cfg.get("trainer", {}).get("accelerator", "auto"))),
        "commit": records.source_commit(),
    }
    if rank() == 0:
        return records.write_json(output_dir / records.METRICS_FILE, record)
    return records.strict_json(record)


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


def build_run_model(cfg: DictConfig) -> VAEModule:
    """The run's LightningModule, with the resolved config and group choices it saves in checkpoints."""
    return build_model(cfg, run_config=OmegaConf.to_container(cfg, resolve=True),
                       run_choices=run_summary(cfg)["choices"])


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
    module's transfer_batch_to_device (a deliberate pass-through, module.py) takes precedence."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device` in `LightningModule`")


def build_run(
    cfg: DictConfig, output_dir: Path, resumed_step: int = 0, fresh: bool = True,
    datamodule=None, model: VAEModule | None = None, extra_trainer: dict | None = None,
    wall_clock: WallClock | None = None, earlier_attempt: bool = False,
) -> tuple[L.LightningDataModule, VAEModule, L.Trainer]:
    """The datamodule (splits loaded), the model and the Trainer of a run, as scripts/train.py
    builds them (scripts/benchmark_fit.py times exactly these). `earlier_attempt`: a fresh start
    in a folder where a killed attempt left TensorBoard events, which are then purged."""
    datamodule = datamodule if datamodule is not None else build(cfg.data)
    summary = run_summary(cfg)
    model = model if model is not None else build_run_model(cfg)
    datamodule.load_splits()  # missing or corrupt data fails here, before any run output

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

    summary = run_summary(cfg)
    check_temperature_settings(summary["overrides"])
    datamodule = build(cfg.data)  # config errors of data and model first, before reading anything
    model = build_run_model(cfg)
    ckpt_path = _resume_from(cfg, output_dir, resume)
    resumed_step = 0
    if ckpt_path is not None:  # fails here, with the setting that differs, before any run output
        checkpoint = read_checkpoint(ckpt_path)
        check_checkpoint_fits(checkpoint, model.run_config, ckpt_path, summary["choices"])
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
        cfg, output_dir, start - clock.before, status=records.FINISHED, metrics=metrics, steps=trainer.global_step,
        best_checkpoint=best or None, resumed_from_step=resumed_step or None,
    )
    log.info("metrics: %s", json.dumps(record["metrics"]))
    return record


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

"""From a Hydra config to a trained model: fit, test, and record the run.

scripts/train.py is a thin Hydra entry point around `train`. The parts come from
discrete_vae.build, the checkpoints' reading and housekeeping from discrete_vae.checkpoints,
and the record from discrete_vae.records; what is left here is the run's order: one process
per run folder (`run_folder_lock`), resume or start afresh, fit, test, record, and what a
signal or a failure leaves behind.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import stat
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
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard.summary import hparams

from discrete_vae import records
from discrete_vae.build import build, build_module
from discrete_vae.callbacks import ProgressBar, ValidateAtLastStep
from discrete_vae.cli import override_pairs
from discrete_vae.checks import check_config, check_validation_interval, validation_metrics
from discrete_vae.checkpoints import (
    AtomicCheckpointIO, LatestCheckpoint, WallClock, best_checkpoint, check_checkpoint_fits, check_run_folder,
    check_weights_fit,
    clear_past_the_checkpoint, rank, read_checkpoint, set_aside_earlier_attempt,
)
from discrete_vae.errors import ConfigError, DataError, RunFolderBusy, TrainingDiverged, find_user_error, require_number
from discrete_vae.lightning_private import tensorboard_writer
from discrete_vae.module import VAEModule

log = logging.getLogger(__name__)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"latent/num_latents": 20, ...} with TensorBoard-friendly values."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}/"))
        return out
    value = tree if isinstance(tree, (bool, int, float, str)) else str(tree)
    return {prefix.rstrip("/"): value}


# what defines a run beside its group choices and command-line overrides, for TensorBoard's HPARAMS tab
HPARAM_NODES = ("seed", "latent", "upper_latents", "optimizer/lr", "data/batch_size")
NOT_HPARAMS = ("data/root", "ckpt_path", "resume", "num_threads")  # paths and resources define no run


def run_hparams(run_config: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """The keys that define a run, for TensorBoard's HPARAMS tab (not the config's ninety): its
    group choices (choice/estimator, ...), the settings its command line changed, its seed, its
    latent types, learning rate and batch size."""
    flat = _flat(run_config)
    changed = {str(o).lstrip("+~").split("=", 1)[0].replace(".", "/") for o in summary["overrides"] if "=" in str(o)}
    params = {k: v for k, v in flat.items() if (k in changed or k.startswith(HPARAM_NODES))
              and not k.startswith(NOT_HPARAMS)}
    params.update({f"choice/{k}": str(v) for k, v in summary["choices"].items()})
    return params


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
    records.source_commit()  # read now, once per process: the commit of the code this run executes
    output_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
    resume = cfg.get("resume", "auto")
    if resume not in RESUME_MODES:
        raise ConfigError(f"resume={resume!r} is not one of {', '.join(RESUME_MODES)}")
    forget_stale_rank(cfg.get("trainer", {}))
    if resume == "auto" and (done := records.done_record(output_dir)) is not None:
        if cfg.get("ckpt_path"):  # not silently ignored: the folder's run is over, its record kept
            raise ConfigError(
                f"{output_dir} holds a run that is already {done['status']} (metrics.json), so ckpt_path="
                f"{cfg.ckpt_path} would not be trained from. Train on from it in a new folder "
                f"(hydra.run.dir=NEW ckpt_path=... with the new budget), or start this folder afresh (resume=never)")
        # on stderr only: the finished run's own log stays as it was
        differ = differing_overrides(done.get("overrides"), run_summary(cfg)["overrides"])
        print(f"[discrete_vae] {output_dir} is already {done['status']} (metrics.json): skipped"
              f"{f' although {differ}' if differ else ''}. Use resume=never to run it again.", file=sys.stderr)
        return done
    check_run_folder(output_dir)
    with run_folder_lock(output_dir):
        return _fit_or_record_failure(cfg, output_dir, start, resume)


RERUN_FREE = ("ckpt_path", "resume", "num_threads", "trainer.enable_progress_bar")  # no bearing on a result


def differing_overrides(recorded, current: list[str]) -> str:
    """What a rerun asks differently from the finished run it is about to skip: the settings its folder's
    name leaves out (the quick-check limits, paths, resources), e.g. "trainer.limit_train_batches=10
    (the record: 5)". Empty when they agree, or when the record holds no overrides list."""
    if not isinstance(recorded, list):
        return ""
    before, now = override_pairs(recorded), override_pairs(current)
    keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k) and k not in RERUN_FREE)
    return ", ".join(f"{k}={now.get(k, '(default)')} (the record: {before.get(k, '(default)')})" for k in keys)


RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # what Lightning reads at import


def forget_stale_rank(trainer_cfg) -> None:
    """A single-process run (one device on one node) is rank zero, whatever a RANK or SLURM_PROCID
    left in the environment by an earlier job or a shell says: Lightning reads them at import, and
    a stale one would make this process skip the lock and never write its record."""
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1)
    one_device = devices == 1 or (isinstance(devices, (list, tuple)) and len(devices) == 1)
    if one_device and nodes == 1 and rank() != 0:
        stale = ", ".join(f"{k}={os.environ[k]}" for k in RANK_VARIABLES if os.environ.get(k) not in (None, "0"))
        log.warning("a single-process run is rank 0: ignored %s from the environment", stale or "a rank")
        rank_zero_only.rank = 0


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
    releases it when the process ends, kill -9 included, so it never goes stale. Only a lock that
    another process really holds refuses the run: on a filesystem without locks (some network
    mounts) the run goes on with a warning. The lock file is never followed through a symlink."""
    if rank() != 0 or fcntl is None:  # DDP's other ranks share rank zero's folder; no fcntl on Windows
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)  # a FIFO must not block
    try:
        fd = os.open(output_dir / LOCK_FILE, flags, 0o644)
    except OSError as err:
        raise RunFolderBusy(f"cannot open the lock file {output_dir / LOCK_FILE} ({err.strerror}): it is a "
                            f"symlink or not writable; remove it, or run in another folder") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunFolderBusy(f"the lock file {output_dir / LOCK_FILE} is not a regular file (a FIFO or a device); "
                            f"remove it, or run in another folder")
    with os.fdopen(fd, "r+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            locked = True
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunFolderBusy(
                f"another process (pid {holder}) is training {output_dir}: two processes in one run folder "
                f"overwrite each other's checkpoints. Wait for it, or stop it (all of a sweep's processes, "
                f"launcher workers included) and run this again to resume"
            ) from None
        except OSError as err:  # ENOLCK, EOPNOTSUPP, ...: this filesystem has no locks
            log.warning("cannot lock %s (%s): going on without the guard against a second process in this "
                        "folder", output_dir, err.strerror)
            locked = False
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            if locked:
                fcntl.flock(handle, fcntl.LOCK_UN)


def estimator_options(cfg: DictConfig) -> dict[str, Any] | None:
    """The estimator's options as this run used them (`estimator.above=mean_field`, ...), or None
    where they do not resolve (the record of a config error)."""
    try:
        options = OmegaConf.to_container(cfg.estimator, resolve=True)
    except Exception:  # an unresolvable interpolation, no estimator node: the record still gets written
        return None
    return options if isinstance(options, dict) else None


def write_record(cfg: DictConfig, output_dir: Path, start: float, **fields: Any) -> dict[str, Any]:
    """metrics.json of a run (discrete_vae.records): estimator, its resolved options (so that a
    default changed later leaves no record ambiguous), overrides, seed, wall time, and
    `fields` (status, metrics, ...), written by rank zero only. A finished (or diverged) record
    already there is never replaced: a fresh start sets it aside first, so one still there belongs
    to a run that this process did not start (a config error before the start, say)."""
    summary = run_summary(cfg)
    record = {
        "estimator": summary["choices"].get("estimator"),
        "estimator_config": estimator_options(cfg),
        "overrides": summary["overrides"],
        "seed": cfg.get("seed"),
        "wall_time_s": round(time.perf_counter() - start, 2),
        **fields,
        "machine": records.machine(str(cfg.get("trainer", {}).get("accelerator", "auto"))),
        "commit": records.source_commit(),
    }
    if rank() != 0:
        return records.strict_json(record)
    if (done := records.done_record(output_dir)) is not None:
        log.warning("kept the %s record of %s; this attempt ended %s: %s", done["status"], output_dir,
                    record.get("status"), record.get("error", ""))
        return records.strict_json(record)
    return records.write_json(output_dir / records.METRICS_FILE, record)


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
    given = override_pairs(overrides)
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


def build_run_model(cfg: DictConfig, choices: dict[str, str]) -> VAEModule:
    """The run's LightningModule, with the resolved config and group choices it saves in checkpoints."""
    return build_module(cfg, run_config=OmegaConf.to_container(cfg, resolve=True), run_choices=choices)


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
    wall_clock: WallClock | None = None,
) -> tuple[L.LightningDataModule, VAEModule, L.Trainer]:
    """The datamodule (splits loaded), the model and the Trainer of a run, as scripts/train.py
    builds them (scripts/benchmark_fit.py times exactly these)."""
    datamodule = datamodule if datamodule is not None else build(cfg.data)
    summary = run_summary(cfg)
    model = model if model is not None else build_run_model(cfg, summary["choices"])
    datamodule.load_splits()  # missing or corrupt data fails here, before any run output
    check_validation_interval(cfg.trainer, _batches_per_epoch(datamodule, cfg.trainer))

    callbacks = [build(c) for c in cfg.callbacks.values() if c is not None]
    callbacks += [ValidateAtLastStep(), wall_clock or WallClock()]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(ProgressBar())  # the training loss, and a total that knows max_steps
    logger = False
    if cfg.get("logger"):
        # after a resume, TensorBoard drops the events the interrupted run wrote past the checkpoint
        logger = build(cfg.logger, **({"purge_step": resumed_step} if resumed_step else {}))
    trainer: L.Trainer = build(
        cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(output_dir),
        plugins=[AtomicCheckpointIO()], **(extra_trainer or {}),
    )
    if logger and trainer.is_global_zero and fresh:
        log_hparams(logger, run_hparams(model.run_config, summary), [*validation_metrics(cfg), "test/neg_elbo"])
    return datamodule, model, trainer


def _batches_per_epoch(datamodule: L.LightningDataModule, trainer_cfg) -> int:
    """Training batches in an epoch of one process, as Lightning will count them (its limit
    included); a datamodule of the user's whose loader has no length counts as endless."""
    try:
        batches = len(datamodule.train_dataloader())
    except TypeError:
        return 2**62
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, int) and devices > 1:
        batches //= devices
    limit = trainer_cfg.get("limit_train_batches")
    if isinstance(limit, int) and not isinstance(limit, bool):
        batches = min(batches, limit)
    elif isinstance(limit, float):
        batches = int(batches * limit)
    return batches


def _fit_and_test(cfg: DictConfig, output_dir: Path, start: float, resume: str, clock: WallClock) -> dict[str, Any]:
    check_config(cfg)  # the keys no part owns, first: nothing has run yet (scripts/train.py has checked them)
    quiet_third_party()
    torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "high"))
    set_num_threads(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    summary = run_summary(cfg)
    check_temperature_settings(summary["overrides"])
    datamodule = build(cfg.data)  # config errors of data and model first, before reading anything
    model = build_run_model(cfg, summary["choices"])
    ckpt_path = _resume_from(cfg, output_dir, resume)
    resumed_step = 0
    if ckpt_path is not None:  # fails here, with the setting that differs, before any run output
        checkpoint = read_checkpoint(ckpt_path)
        check_checkpoint_fits(checkpoint, model.run_config, ckpt_path, summary["choices"])
        check_weights_fit(model, checkpoint["state_dict"], ckpt_path)
        resumed_step = checkpoint.get("global_step", 0)
        if not isinstance(resumed_step, int) or resumed_step < 0:
            raise DataError(f"the checkpoint {ckpt_path} has no valid global_step ({resumed_step!r}): it was not "
                            f"written by scripts/train.py; start afresh or use another checkpoint")
        if Path(ckpt_path).resolve() == (output_dir / "checkpoints" / "last.ckpt").resolve():
            clear_past_the_checkpoint(output_dir, checkpoint)
        del checkpoint
        log.info("resuming from %s (step %d)", ckpt_path, resumed_step)
    inside = ckpt_path is not None and output_dir.resolve() in Path(ckpt_path).resolve().parents
    if ckpt_path is None or (resume == "never" and not inside):  # a fresh start (of this folder's files):
        # whatever an earlier attempt left is kept aside, never mixed in nor overwritten
        set_aside_earlier_attempt(output_dir, "resume=never" if resume == "never" else "no last.ckpt to resume from")
    datamodule, model, trainer = build_run(cfg, output_dir, resumed_step=resumed_step, fresh=ckpt_path is None,
                                           datamodule=datamodule, model=model, wall_clock=clock)
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        stopped_by_signal(trainer, resumed_step, "SIGTERM", SIGTERM_EXIT)
    except SystemExit:  # Ctrl-C: Lightning shuts down after the step in progress, then exits with 1
        if trainer.interrupted:
            stopped_by_signal(trainer, resumed_step, "SIGINT (Ctrl-C)", SIGINT_EXIT)
        raise
    if trainer.interrupted:  # a Lightning that returns instead
        stopped_by_signal(trainer, resumed_step, "SIGINT (Ctrl-C)", SIGINT_EXIT)
    keeper = best_checkpoint(trainer)
    best = getattr(keeper, "best_model_path", "")
    metrics = {}
    for name in validation_metrics(cfg):  # the final validation's
        value = trainer.callback_metrics.get(name)
        if value is None and getattr(keeper, "monitor", None) == name:
            # resumed from the checkpoint written after the final validation: none ran here
            value = getattr(keeper, "current_score", None)
        metrics[name] = _scalar(value)
    if cfg.get("test", True):
        if not best:
            log.warning("no best checkpoint (no validation ran): testing the final weights")
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False, weights_only=True)
        metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})

    record = write_record(
        cfg, output_dir, start - clock.before, status=records.FINISHED, metrics=metrics, steps=trainer.global_step,
        best_checkpoint=best or None, resumed_from_step=resumed_step or None,
    )
    # in full in metrics.json; the log (and the terminal, where train.py's summary follows) gets them for a person
    log.info("metrics: %s", ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in record["metrics"].items()))
    return record


SIGTERM_EXIT = 143  # 128 + SIGTERM, the shell's status for a process ended by SIGTERM
SIGINT_EXIT = 130  # 128 + SIGINT


def stopped_by_signal(trainer: L.Trainer, resumed_step: int, signal: str, status: int) -> None:
    """A SIGTERM (a cluster's preemption, `kill`, a launcher shutting down) or a SIGINT (Ctrl-C)
    makes Lightning stop after the step in progress and leave fit() with status 0 (SIGTERM) or 1
    (SIGINT), and print nothing a user sees. Here it ends with the shell's status for that signal and one line that says where
    the run can resume from; no record is written (the run is neither finished nor failed)."""
    saved = max([c.saved_step for c in trainer.callbacks if isinstance(c, LatestCheckpoint)]
                + [resumed_step])  # this process's last save, else the checkpoint it resumed from
    where = f"last.ckpt holds step {saved}" if saved > 0 else "no last.ckpt yet"
    log.error("stopped by %s at step %d, before the end of training (%s): run the same command again "
              "to resume (resume=auto)", signal, trainer.global_step, where)
    raise SystemExit(status)


def _scalar(value) -> float | None:
    return None if value is None else float(value)

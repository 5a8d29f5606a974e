"""Lightning callbacks: the temperature schedule, and gradient diagnostics during training.

The schedule is a pure function of the global step, so a resumed run continues it
exactly: the callback recomputes tau from `trainer.global_step` before every batch.
`GradientStats` runs discrete_vae.diagnostics on a held-out batch every n steps and logs
the gradient's variance, bias, cosine and SNR, without changing the training trajectory.
For long runs: `LatestCheckpoint` (last.ckpt every N steps, for exact resume), `BestCheckpoint`
(the best weights; both also across a resume from a run folder that has moved),
`DivergenceGuard` (stops a run whose loss is no longer finite) and `ValidateAtLastStep`
(a run stopped mid-epoch still ends validated).
"""

from __future__ import annotations

import logging
import math
import time
from functools import cached_property
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from discrete_vae.errors import ConfigError, TrainingDiverged, require_number

log = logging.getLogger(__name__)


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether the trainer hands metrics to the loggers at this step (every log_every_n_steps, and
    at a requested stop): Lightning's own rule. Metrics logged on other steps would only cost
    Lightning's bookkeeping, so the model and the callbacks log nothing then."""
    return trainer._logger_connector.should_update_logs


def best_checkpoint(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The checkpoint callback that keeps the best weights (the one with a monitor), not
    `LatestCheckpoint`, whichever comes first in the list; None when there is none."""
    return next((c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)), None)


def temperature_schedule(step: int, tau_0: float, tau_min: float, rate: float, interval: int) -> float:
    """tau = max(tau_min, tau_0 * exp(-rate * t)), t = step rounded down to a multiple of `interval`
    (Jang et al. 2017, Sec. 4.2: tau = max(0.5, exp(-r t)), updated every N steps)."""
    t = (step // interval) * interval
    return max(tau_min, tau_0 * math.exp(-rate * t))


class TemperatureAnnealing(L.Callback):
    """Sets `estimator.tau` from `temperature_schedule` and logs `train/temperature` (on the steps
    that log) for estimators with a temperature; does nothing for the others.

    The schedule starts from the estimator's own configured `tau` (`estimator.tau=5` gives 5 at
    step 0), unless `tau_0` is given here explicitly. Its floor is `tau_min`, raised to the
    estimator's own `tau_min` where it has one (ReinMax's 1.3). A start below the floor is a
    contradiction (the temperature set would never be used) and is refused at the start of fit.
    """

    def __init__(self, tau_0: float | None = None, tau_min: float = 0.5, rate: float = 1e-4, interval: int = 1000):
        if tau_0 is not None:
            require_number("callbacks.temperature.tau_0", tau_0, positive=True, hint="or null for the estimator's tau")
        require_number("callbacks.temperature.tau_min", tau_min, positive=True)
        require_number("callbacks.temperature.rate", rate, low=0.0)
        require_number("callbacks.temperature.interval", interval, positive=True, integer=True)
        self.tau_0, self.tau_min, self.rate, self.interval = tau_0, tau_min, rate, interval

    def start(self, estimator) -> float:
        """tau at step 0: `tau_0` if given, else the estimator's configured tau."""
        return float(self.tau_0 if self.tau_0 is not None else estimator.tau_0)

    def floor(self, estimator) -> float:
        return max(self.tau_min, getattr(estimator, "tau_min", None) or 0.0)

    def temperature(self, step: int, estimator) -> float:
        return temperature_schedule(step, self.start(estimator), self.floor(estimator), self.rate, self.interval)

    def _set(self, trainer: L.Trainer, estimator) -> None:
        estimator.tau.fill_(self.temperature(trainer.global_step, estimator))  # host value, no device sync

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        estimator = pl_module.estimator
        if not isinstance(getattr(estimator, "tau", None), torch.Tensor):
            return
        start, floor = self.start(estimator), self.floor(estimator)
        if start < floor:
            source = "callbacks.temperature.tau_0" if self.tau_0 is not None else "estimator.tau"
            raise ConfigError(
                f"{source}={start:g} is below the temperature's floor {floor:g} (the larger of "
                f"callbacks.temperature.tau_min={self.tau_min:g} and estimator.tau_min="
                f"{getattr(estimator, 'tau_min', None)}), so it would never be used. Raise {source} "
                f"or lower the floor (callbacks.temperature.tau_min, estimator.tau_min=null)."
            )
        self._set(trainer, estimator)  # also right after a resume, at any step
        log.info("temperature: %g at step %d, annealed to %g (rate %g every %d steps)", float(estimator.tau),
                 trainer.global_step, floor, self.rate, self.interval)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        estimator = pl_module.estimator
        if not isinstance(getattr(estimator, "tau", None), torch.Tensor):
            return
        if trainer.global_step % self.interval == 0:
            self._set(trainer, estimator)
        if logs_this_step(trainer):
            pl_module.log("train/temperature", estimator.tau, on_step=True, on_epoch=False)


class GradientStats(L.Callback):
    """Every `every_n_steps` steps, logs `grad/variance`, `grad/bias`, `grad/bias_se`, `grad/cosine`
    and `grad/snr` of the estimator being trained (discrete_vae.diagnostics: `num_estimates`
    encoder-gradient estimates on a fixed held-out batch, against the exact or an RLOO reference).

    The held-out batch is the first `batch_size` validation images, taken once. The callback
    leaves the training trajectory bit-for-bit unchanged: it runs before the step's batch
    (after the temperature callback has set this step's tau), inside `torch.random.fork_rng`
    so that its draws do not advance the training RNG stream, with the estimator in eval mode
    (restored after), and with `torch.autograd.grad` only (no `.grad` on any parameter).
    Metrics go straight to the trainer's loggers at the current global step.
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        num_estimates: int = 100,
        batch_size: int = 100,
        max_configs: int = 4096,
        reference_estimates: int = 500,
        reference_num_samples: int = 10,
        chunk_size: int | None = None,
    ):
        checks = {
            "every_n_steps": every_n_steps >= 1,
            "num_estimates": num_estimates >= 2,
            "batch_size": batch_size >= 1,
            "max_configs": max_configs >= 1,
            "reference_estimates": reference_estimates >= 2,
            "reference_num_samples": reference_num_samples >= 2,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                f"callbacks.grad_stats: {', '.join(bad)} out of range; need every_n_steps >= 1, "
                f"num_estimates >= 2, batch_size >= 1, max_configs >= 1, reference_estimates >= 2 and "
                f"reference_num_samples >= 2 (got every_n_steps={every_n_steps}, num_estimates={num_estimates}, "
                f"batch_size={batch_size}, max_configs={max_configs}, reference_estimates={reference_estimates}, "
                f"reference_num_samples={reference_num_samples})"
            )
        self.every_n_steps, self.num_estimates, self.batch_size = every_n_steps, num_estimates, batch_size
        self.reference_options = dict(
            max_configs=max_configs, num_estimates=reference_estimates, num_samples=reference_num_samples
        )
        self.chunk_size = chunk_size
        self.batch: torch.Tensor | None = None
        self.last_report = None  # the latest diagnostics.GradientReport, for inspection
        self._last_step = -1

    def _held_out_batch(self, trainer: L.Trainer, device: torch.device) -> torch.Tensor:
        """The first `batch_size` validation images (iterating a loader may draw random numbers:
        the caller holds a forked RNG)."""
        datamodule = getattr(trainer, "datamodule", None)
        loaders = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        rows, count = [], 0
        for batch in loaders or ():
            batch = batch[0] if isinstance(batch, (list, tuple)) else batch
            rows.append(batch[: self.batch_size - count])
            count += len(rows[-1])
            if count >= self.batch_size:
                break
        if not rows:
            raise ConfigError(
                "callbacks.grad_stats needs validation data for its held-out batch: give the Trainer a "
                "datamodule with val_dataloader() (scripts/train.py does) or val_dataloaders"
            )
        return torch.cat(rows).to(device=device, dtype=torch.float32)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps != 0 or step == self._last_step:
            return
        self._last_step = step
        from discrete_vae.diagnostics import gradient_diagnostics

        device = pl_module.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if self.batch is None:
                self.batch = self._held_out_batch(trainer, device)
            report = gradient_diagnostics(
                pl_module, self.batch, pl_module.estimator, self.num_estimates,
                chunk_size=self.chunk_size, timing_repeats=0, reference_options=self.reference_options,
            )
        self.last_report = report
        metrics = {
            "grad/variance": report.variance,
            "grad/bias": report.bias,
            "grad/bias_se": report.bias_se,
            "grad/cosine": report.cosine,
            "grad/snr": report.snr,
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)


class DivergenceGuard(L.Callback):
    """Stops a run whose training loss is no longer finite, with a message naming the step and a hint.

    The loss is checked every `check_every_n_steps` steps (default: the trainer's
    log_every_n_steps, the steps on which logging synchronises with the device anyway), so a
    diverged run stops within that many steps and the other steps have no host sync. A
    non-finite validation metric stops it too, before ModelCheckpoint (which Lightning runs
    after every other callback) could keep its weights as the best. The error is a
    `TrainingDiverged`: scripts/train.py records the run as "diverged" and exits with status 1.
    """

    def __init__(self, check_every_n_steps: int | None = None, monitor: str = "val/neg_elbo"):
        if check_every_n_steps is not None:
            require_number("callbacks.divergence.check_every_n_steps", check_every_n_steps, positive=True,
                           integer=True, hint="or null for trainer.log_every_n_steps")
        self.check_every_n_steps, self.monitor = check_every_n_steps, monitor

    def _raise(self, trainer: L.Trainer, pl_module: L.LightningModule, what: str) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        tau = getattr(pl_module.estimator, "tau", None)
        hints = [f"lower the learning rate (model.optimizer.lr={lr:g} now)" if lr is not None else "lower the learning rate"]
        if isinstance(tau, torch.Tensor):
            hints.append(f"raise the temperature's floor (callbacks.temperature.tau_min; tau={float(tau):g} now)")
        best = getattr(best_checkpoint(trainer), "best_model_score", None)
        metrics = {self.monitor: float(best)} if best is not None else {}
        raise TrainingDiverged(
            f"training diverged at step {trainer.global_step}: {what}. Try again and "
            + " or ".join(hints) + ".",
            step=trainer.global_step, metrics=metrics,
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        every = self.check_every_n_steps or trainer.log_every_n_steps
        if trainer.global_step % every != 0:
            return
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not bool(torch.isfinite(loss).all()):  # the one host sync, on a logging step
            self._raise(trainer, pl_module, f"the training loss is {float(loss)} (checked every {every} steps)")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if not trainer.sanity_checking and value is not None and not bool(torch.isfinite(value)):
            self._raise(trainer, pl_module, f"{self.monitor} is {float(value)}")


class ValidateAtLastStep(L.Callback):
    """Validates after the last step of a run that stops mid-epoch (trainer.max_steps), so that every
    run ends validated and checkpointed: Lightning validates when a stop is requested
    (`trainer.should_stop`), and otherwise only at the epoch's end."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


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


def validates_after_this_batch(trainer: L.Trainer) -> bool:
    """Whether the fit loop validates right after the training batch that has just ended (an
    epoch's end, val_check_interval, a requested stop): Lightning's own rule, asked in
    on_train_batch_end."""
    epoch_loop = trainer.fit_loop.epoch_loop
    try:  # private to Lightning (2.x); where it differs, the save is not moved (tests/test_long_runs.py tells)
        return bool(epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError):
        return False


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
        if trainer.global_step % self._every_n_train_steps == 0 and validates_after_this_batch(trainer):
            self._after_validation = trainer.global_step
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if self._after_validation == trainer.global_step and not self._should_skip_saving_checkpoint(trainer):
            self._after_validation = None
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @property
    def saved_step(self) -> int:
        """The step of the last last.ckpt this process wrote (0 before its first)."""
        return self._last_global_step_saved

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.saved_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

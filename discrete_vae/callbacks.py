"""Lightning callbacks: the temperature schedule, and gradient diagnostics during training.

The schedule is a pure function of the global step, so a resumed run continues it
exactly: the callback recomputes tau from `trainer.global_step` before every batch.
`GradientStats` runs discrete_vae.diagnostics on a held-out batch every n steps and logs
the gradient's variance, bias, cosine and SNR, without changing the training trajectory.
For long runs: `DivergenceGuard` (stops a run whose loss is no longer finite) and
`ValidateAtLastStep` (every run ends validated, one stopped mid-epoch too). The checkpoint callbacks
are discrete_vae.checkpoints'.
"""

from __future__ import annotations

import logging
import math

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from discrete_vae.checkpoints import best_checkpoint
from discrete_vae.diagnostics import gradient_diagnostics
from discrete_vae.errors import ConfigError, TrainingDiverged, require_budget, require_number
from discrete_vae.lightning_private import logs_this_step
from discrete_vae.temperature import anneal, estimator_temperature, schedule_floor, schedule_rate, schedule_start

log = logging.getLogger(__name__)


class TemperatureAnnealing(L.Callback):
    """Sets `estimator.tau` by discrete_vae.temperature's schedule and logs `train/temperature` (on the
    steps that log) for estimators with a temperature; does nothing for the others.

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
        return schedule_start(estimator, self.tau_0)

    def floor(self, estimator) -> float:
        return schedule_floor(estimator, self.tau_min)

    def rate_of(self, estimator) -> float:
        return schedule_rate(estimator, self.rate)

    def temperature(self, step: int, estimator) -> float:
        return estimator_temperature(estimator, step, self.tau_min, self.rate, self.interval, self.tau_0)

    def _set(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # every stochastic layer's estimator; a host value filled in, no device sync
        anneal(pl_module.estimators, trainer.global_step, self.tau_min, self.rate, self.interval, self.tau_0)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        estimator = pl_module.estimator
        if not estimator.has_temperature:
            return
        start, floor = self.start(estimator), self.floor(estimator)
        if start < floor:
            source = "callbacks.temperature.tau_0" if self.tau_0 is not None else "estimator.tau"
            raise ConfigError(
                f"{source}={start:g} is below the temperature's floor {floor:g} (the larger of "
                f"callbacks.temperature.tau_min={self.tau_min:g} and estimator.tau_min="
                f"{estimator.tau_min}), so it would never be used. Raise {source} "
                f"or lower the floor (callbacks.temperature.tau_min, estimator.tau_min=null)."
            )
        self._set(trainer, pl_module)  # also right after a resume, at any step
        if self.rate_of(estimator) == 0:  # a preset that holds tau (the SBNs)
            log.info("temperature: held at %g", float(estimator.tau))
        else:
            log.info("temperature: %g at step %d, annealed to %g (rate %g every %d steps)", float(estimator.tau),
                     trainer.global_step, floor, self.rate_of(estimator), self.interval)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        estimator = pl_module.estimator
        if not estimator.has_temperature:
            return
        if trainer.global_step % self.interval == 0:
            self._set(trainer, pl_module)
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
        key = "callbacks.grad_stats."
        require_number(key + "every_n_steps", every_n_steps, positive=True, integer=True)
        require_number(key + "num_estimates", num_estimates, integer=True, low=2, hint="a variance needs two")
        require_number(key + "batch_size", batch_size, positive=True, integer=True)
        require_budget(key + "max_configs", max_configs)
        require_number(key + "reference_estimates", reference_estimates, integer=True, low=2)
        require_number(key + "reference_num_samples", reference_num_samples, integer=True, low=2)
        if chunk_size is not None:
            require_number(key + "chunk_size", chunk_size, positive=True, integer=True, hint="or null")
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
        device = pl_module.device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            if self.batch is None:
                self.batch = self._held_out_batch(trainer, device)
            report = gradient_diagnostics(
                pl_module.model, self.batch, pl_module.estimators, self.num_estimates,
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
        hints = [f"lower the learning rate (optimizer.lr={lr:g} now)" if lr is not None else "lower the learning rate"]
        if pl_module.estimator.has_temperature:
            tau = float(pl_module.estimator.tau)
            hints.append(f"raise the temperature's floor (callbacks.temperature.tau_min; tau={tau:g} now)")
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
    """Validates after the last step of every run, so that every run ends validated and checkpointed:
    one that stops mid-epoch (trainer.max_steps), and one whose validations are spaced by steps
    (trainer.val_check_interval=N with check_val_every_n_epoch=null) when its last epoch ends between
    two. Lightning validates when a stop is requested (`trainer.should_stop`), and otherwise only at
    an epoch's end or at the interval."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        last_epoch = trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1
        if 0 < trainer.max_steps <= trainer.global_step or (last_epoch and batch_idx + 1 >= trainer.num_training_batches):
            trainer.should_stop = True


class ProgressBar(TQDMProgressBar):
    """Lightning's progress bar (with train/loss beside it, logged with prog_bar=True), whose total
    is the batches this epoch will really run: Lightning's counts the whole epoch even when
    trainer.max_steps ends training first (a bar of 500 for max_steps=300)."""

    @property
    def total_train_batches(self) -> int | float:
        total = super().total_train_batches
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0 or not math.isfinite(total):
            return total
        batches, budget = (steps * trainer.accumulate_grad_batches for steps in (trainer.global_step, trainer.max_steps))
        done = batches % total  # of this epoch, at its start: 0, or those run before a resume in its middle
        return min(total, budget - batches + done) if batches < budget else 0

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """Lightning's, without the version number of the logger (v_num): the folder says it."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

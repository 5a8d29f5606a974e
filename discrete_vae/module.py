"""The LightningModule: a model with discrete latents (a VAE or an SBN) trained with gradient estimators.

It holds the model and the estimator (and, for the stochastic layers above the first, a copy of
it each, with its own state) and does what Lightning needs and nothing else: seeding,
logging, validation and test, images, the optimizer. The maths is the VAE's: `training_step`
is thin, it calls `VAE.objective`, hands metrics (tensors) to the logger only on the steps that
log, and returns the surrogate loss, with no host synchronisation. Each step's noise is seeded
from (seed, step, rank), so that a resumed or data-parallel run draws exactly the noise it would
have drawn uninterrupted. Validation and test report the true negative ELBO with a hard sample
z ~ q(z|x), whatever the estimator, so estimators are compared on one number; their noise is
seeded per batch, apart from the training stream. The run's config is passed in and saved in
every checkpoint (discrete_vae.checkpoints rebuilds the model from it).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor

from discrete_vae import sampling
from discrete_vae.chain import StochasticChain
from discrete_vae.checkpoints import upgrade
from discrete_vae.errors import ConfigError, require_number
from discrete_vae.estimators import Estimator
from discrete_vae.evaluation import iwae_bound
from discrete_vae.lightning_private import logs_this_step

EVAL_SEED = 0  # the seed of the noise of every validation and test pass (with the batch's index)
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"  # set to 1 by Lightning at import


def check_optimizer(optimizer: Callable | None) -> None:
    """Type and range of the optimizer's numeric settings, read here rather than deep inside torch."""
    keywords = getattr(optimizer, "keywords", None) or {}
    hint = "set it like optimizer.lr=1e-3"
    if "lr" in keywords:
        # beyond ~1e37 Adam's step size (lr / bias correction) overflows float32 before any update
        require_number("optimizer.lr", keywords["lr"], positive=True, high=1e30, hint=hint)
    for key in ("weight_decay", "eps", "momentum"):
        if key in keywords:
            require_number(f"optimizer.{key}", keywords[key], low=0, hint="a non-negative number")
    if "betas" in keywords:
        betas = keywords["betas"]
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {betas!r}")
        for beta in betas:
            require_number("optimizer.betas", beta, low=0, high=0.999999)


def image_grid(images: Tensor, nrow: int, pad: int = 2) -> Tensor:
    """Images side by side, `nrow` to a row, `pad` black pixels between and around them, as
    TensorBoard's add_image takes them: (B, C, H, W) -> (C, rows * (H + pad) + pad, nrow * (W + pad) + pad).
    (torchvision's make_grid, without torchvision: installed, it adds 1.4 s to every start-up,
    torchmetrics importing its models.)"""
    b, c, h, w = images.shape
    rows = -(-b // nrow)
    cells = images.new_zeros(rows * nrow, c, h + pad, w + pad)
    cells[:b, :, pad:, pad:] = images  # each image with its top and left border
    grid = cells.view(rows, nrow, c, h + pad, w + pad).permute(2, 0, 3, 1, 4)  # (C, rows, H+pad, nrow, W+pad)
    grid = grid.reshape(c, rows * (h + pad), nrow * (w + pad))
    return torch.nn.functional.pad(grid, (0, pad, 0, pad))  # the bottom and right border


class VAEModule(L.LightningModule):
    def __init__(
        self,
        model: StochasticChain,
        estimator: Estimator,
        optimizer: Callable | None = None,
        num_images: int = 8,
        test_iwae_samples: int = 50,
        val_iwae_samples: int = 0,
        seed: int = 0,
        run_config: dict[str, Any] | None = None,
        run_choices: dict[str, str] | None = None,
    ):
        """`run_config`: the resolved config of the run (saved in every checkpoint, from which
        discrete_vae.checkpoints rebuilds the model); `run_choices`: its group choices, for messages."""
        super().__init__()
        require_number("test_iwae_samples", test_iwae_samples, integer=True, low=0, hint="0 turns test/nll_iwae off")
        require_number("val_iwae_samples", val_iwae_samples, integer=True, low=0, hint="0 turns val/nll_iwae off")
        estimators = model.layer_estimators(estimator)  # one per stochastic layer, each checked
        check_optimizer(optimizer)
        self.save_hyperparameters(ignore=["model", "estimator", "optimizer", "run_choices"])
        self.model = model  # a VAE or an SBN: a chain of stochastic layers (discrete_vae.chain)
        self.estimator = estimator  # the lowest layer's (the only one of a one-layer model)
        self.estimators_above = torch.nn.ModuleList(estimators[1:])  # copies for the layers above
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.num_images = num_images
        self.test_iwae_samples = int(test_iwae_samples)
        self.val_iwae_samples = int(val_iwae_samples)
        self.seed = int(require_number("seed", seed, integer=True))
        self.run_config, self.run_choices = run_config, run_choices or {}
        self._image_batch: Tensor | None = None
        self._nvml_switched_off = False  # on_fit_start turned Lightning's NVML check off (CPU fits)

    @property
    def estimators(self) -> list[Estimator]:
        """One estimator per stochastic layer, lowest first."""
        return [self.estimator, *self.estimators_above]

    # -- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Before a fit: the training images' width must be model.input_dim, and a fresh model's
        output bias comes from the training split (model.output_bias_init=data_mean). A resumed fit
        then restores the checkpoint's weights over it (Lightning restores after `setup`)."""
        if stage != "fit":
            return
        train_images = getattr(self.trainer.datamodule, "train_images", None)
        images = train_images() if train_images is not None else None  # (rows, D)
        if images is not None and images.shape[-1] != self.model.input_dim:
            width = images.shape[-1]
            raise ConfigError(f"the training images have {width} pixels but model.input_dim={self.model.input_dim}; "
                              f"set model.input_dim={width}")
        if not self.model.output_bias_pending:
            return
        if images is None:
            raise ConfigError(
                "model.output_bias_init=data_mean needs the training images from the datamodule "
                "(a train_images() method, as discrete_vae.data's datamodules have); "
                "set model.output_bias_init=default to keep PyTorch's initialisation"
            )
        self.model.init_output_bias(images)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Before Lightning loads the state (resume, test): a checkpoint of an earlier layout is
        brought to this one (discrete_vae.checkpoints.upgrade), and the weights are trained ones."""
        upgrade(checkpoint)
        self.model.output_bias_pending = False

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        out = self.model.objective(batch, self.estimators)
        if logs_this_step(self.trainer):
            self.log("train/loss", out.loss, on_step=True, on_epoch=False, batch_size=batch.shape[0], prog_bar=True)
            metrics = {"train/neg_elbo": out.neg_elbo, "train/recon": out.recon, "train/kl": out.kl}
            if out.nll_iwae is not None:  # a multi-sample estimator's m-sample bound (VIMCO)
                metrics["train/nll_iwae"] = out.nll_iwae
            self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch.shape[0])
        return out.loss

    # -- per-step overhead that a hand-written loop does not have ----------------------------------
    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Our batches are tensors already on the device (discrete_vae.data serves them from there):
        returned as they are, without Lightning's walk over a collection."""
        if isinstance(batch, Tensor) and batch.device == device:
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_fit_start(self) -> None:
        """Training on the CPU: Lightning sets PYTORCH_NVML_BASED_CUDA_CHECK=1 at import, with which
        every torch.cuda.is_available() (Adam's step asks once per step) loads the NVML library
        anew: some 70 us a call with a CUDA build of torch on a machine without a GPU, where torch's
        own check costs under 1 us. Switched off for the fit, restored after it."""
        self._nvml_switched_off = self.device.type == "cpu" and os.environ.get(NVML_CHECK) == "1"
        if self._nvml_switched_off:
            os.environ[NVML_CHECK] = "0"

    def on_fit_end(self) -> None:
        if self._nvml_switched_off:
            os.environ[NVML_CHECK] = "1"

    def on_train_batch_start(self, batch: Tensor, batch_idx: int) -> None:
        """The step's noise comes from the global RNG seeded from (seed, step, rank): a pure function
        of where training is, so a resumed run (DDP included) draws exactly what the uninterrupted
        run drew, and each rank draws its own. Seeding is a host-side call: no device sync."""
        seed = sampling.derive_seed(self.seed, self.global_step, self.global_rank)
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: it queues CUDA seeding with a stack trace
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)  # this device's generator

    # -- evaluation: its own noise, which neither depends on nor moves the training stream -------
    def _eval_generator(self, batch_idx: int, num_batches) -> torch.Generator:
        """The noise of evaluation batch `batch_idx`: seeded by its index in the whole split, so every
        validation draws the same noise (epochs are comparable) and, with DDP's contiguous shards,
        each batch draws what it draws in one process (the reduced metric is the same)."""
        index = self.global_rank * int(num_batches[0] if isinstance(num_batches, list) else num_batches) + batch_idx
        return torch.Generator(self.device).manual_seed(sampling.derive_seed(EVAL_SEED, index))

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        if batch_idx == 0:
            self._image_batch = batch[: self.num_images]
        generator = self._eval_generator(batch_idx, self.trainer.num_val_batches)
        neg_elbo = self.model.neg_elbo(batch, generator).mean()
        self.log("val/neg_elbo", neg_elbo, prog_bar=True, batch_size=batch.shape[0], sync_dist=True)
        if self.val_iwae_samples > 0:  # the m-sample bound, for a checkpoint rule that follows it
            nll = iwae_bound(self.model, batch, self.val_iwae_samples, generator=generator)
            self.log("val/nll_iwae", nll.mean(), batch_size=batch.shape[0], sync_dist=True)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        generator = self._eval_generator(batch_idx, self.trainer.num_test_batches)
        neg_elbo = self.model.neg_elbo(batch, generator).mean()
        self.log("test/neg_elbo", neg_elbo, batch_size=batch.shape[0], sync_dist=True)
        if self.test_iwae_samples > 0:  # the importance-weighted bound with m samples per image
            nll = iwae_bound(self.model, batch, self.test_iwae_samples, generator=generator)
            self.log("test/nll_iwae", nll.mean(), batch_size=batch.shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self._image_batch is None:
            return
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in self.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            x = self._image_batch
            recon = self.model.reconstruct(x, generator=self._eval_generator(0, 1))
            side = math.isqrt(x.shape[-1])
            pairs = torch.cat([x, recon]).view(-1, 1, side, side)  # inputs in the first row
            logger.experiment.add_image("val/reconstructions", image_grid(pairs, nrow=len(x)), self.global_step)
            if self.model.has_prior:  # an SBN predicts the lower half: no unconditional samples
                samples = self.model.sample_images(64).view(-1, 1, side, side)
                logger.experiment.add_image("val/samples", image_grid(samples, nrow=8), self.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_config is not None:  # lets discrete_vae.checkpoints.load_checkpoint rebuild the model
            checkpoint["config"] = self.run_config
            checkpoint["choices"] = self.run_choices  # estimator=..., for messages

    def configure_optimizers(self):
        """The configured optimizer; Adam and AdamW take their fused kernel (one multi-tensor update
        instead of a loop over parameters) on the CPU and CUDA unless `fused` is set explicitly, or
        the Trainer clips gradients under mixed precision (Lightning refuses to clip for an optimizer
        that unscales its gradients itself, as the fused kernel does)."""
        factory, extra = self.optimizer_factory, {}
        fusable = getattr(factory, "func", None) in (torch.optim.Adam, torch.optim.AdamW)
        try:
            trainer = self.trainer
        except RuntimeError:  # not attached (scripts/benchmark.py calls this without a Trainer)
            trainer = None
        clips_mixed = trainer is not None and bool(trainer.gradient_clip_val) and "mixed" in str(trainer.precision)
        if fusable and "fused" not in factory.keywords and self.device.type in ("cpu", "cuda") and not clips_mixed:
            extra["fused"] = True
        return factory(self.parameters(), **extra)

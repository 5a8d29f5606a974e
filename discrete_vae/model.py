"""The categorical-latent VAE as a LightningModule.

N independent categorical latents of K categories, a uniform prior, an analytic
KL, and a pluggable gradient estimator (discrete_vae.estimators) for the
reconstruction term E_q[-log p(x|z)]. `training_step` is thin: it delegates to
`_estimate`, hands metrics (tensors) to the logger only on the steps that log, and
returns the surrogate loss, with no host synchronisation. Each step's noise is seeded
from (seed, step, rank), so that a resumed or data-parallel run draws exactly the noise
it would have drawn uninterrupted. Validation and test report the true negative ELBO with
a hard sample z ~ q(z|x), whatever the estimator, so estimators are compared on one
number; their noise is seeded per batch, apart from the training stream.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor

from discrete_vae import sampling
from discrete_vae.callbacks import logs_this_step
from discrete_vae.errors import ConfigError, require_number
from discrete_vae.estimators import Estimator
from discrete_vae.networks import Decoder, Encoder


EVAL_SEED = 0  # the seed of the noise of every validation and test pass (with the batch's index)
OUTPUT_BIAS_INITS = ("data_mean", "default")
NVML_CHECK = "PYTORCH_NVML_BASED_CUDA_CHECK"  # set to 1 by Lightning at import
MEAN_CLAMP = 1e-3  # the training mean pixel is clamped to [1e-3, 1 - 1e-3] before its logit (as Burda et al.)


def check_optimizer(optimizer: Callable | None) -> None:
    """Type and range of the optimizer's numeric settings, read here rather than deep inside torch."""
    keywords = getattr(optimizer, "keywords", None) or {}
    hint = "set it like model.optimizer.lr=1e-3"
    if "lr" in keywords:
        # beyond ~1e37 Adam's step size (lr / bias correction) overflows float32 before any update
        require_number("model.optimizer.lr", keywords["lr"], positive=True, high=1e30, hint=hint)
    for key in ("weight_decay", "eps", "momentum"):
        if key in keywords:
            require_number(f"model.optimizer.{key}", keywords[key], low=0, hint="a non-negative number")
    if "betas" in keywords:
        betas = keywords["betas"]
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
            raise ConfigError(f"model.optimizer.betas must be two numbers in [0, 1), got {betas!r}")
        for beta in betas:
            require_number("model.optimizer.betas", beta, low=0, high=0.999999)


class StepOutput(NamedTuple):
    loss: Tensor  # scalar surrogate being minimised
    neg_elbo: Tensor  # scalar, nats per image
    recon: Tensor  # scalar
    kl: Tensor  # scalar


def kl_to_uniform(logits: Tensor) -> Tensor:
    """KL(q(z|x) || Uniform) = sum_n sum_k q_nk log q_nk + N log K, analytic.  # (B, N, K) -> (B,)"""
    N, K = logits.shape[-2:]
    log_q = torch.log_softmax(logits, dim=-1)
    return (log_q.exp() * log_q).sum(dim=(-2, -1)) + N * math.log(K)


class CategoricalVAE(L.LightningModule):
    def __init__(
        self,
        estimator: Estimator,
        num_latents: int = 20,
        num_categories: int = 10,
        input_dim: int = 784,
        hidden_dims: Sequence[int] = (512, 256),
        activation: str = "ReLU",
        optimizer: Callable | None = None,
        num_images: int = 8,
        test_iwae_samples: int = 50,
        seed: int = 0,
        output_bias_init: str = "default",  # conf/model sets data_mean: on for every configured run
    ):
        super().__init__()
        if num_latents < 1 or num_categories < 2:
            raise ConfigError(
                f"model.num_latents must be >= 1 and model.num_categories >= 2, "
                f"got {num_latents} and {num_categories}"
            )
        if int(test_iwae_samples) != test_iwae_samples or test_iwae_samples < 0:
            raise ConfigError(
                f"model.test_iwae_samples must be a non-negative integer (0 turns test/nll_iwae off), "
                f"got {test_iwae_samples}"
            )
        if output_bias_init not in OUTPUT_BIAS_INITS:
            raise ConfigError(
                f"model.output_bias_init={output_bias_init!r} is not one of {', '.join(OUTPUT_BIAS_INITS)}"
            )
        estimator.check(num_latents, num_categories)
        check_optimizer(optimizer)
        self.save_hyperparameters(ignore=["estimator", "optimizer"])
        self.estimator = estimator
        self.encoder = Encoder(input_dim, hidden_dims, num_latents, num_categories, activation)
        self.decoder = Decoder(input_dim, hidden_dims, num_latents, num_categories, activation)
        self.optimizer_factory = optimizer or partial(torch.optim.Adam, lr=1e-3)
        self.num_images = num_images
        self.test_iwae_samples = int(test_iwae_samples)
        self._image_batch: Tensor | None = None
        self.seed = int(require_number("seed", seed, integer=True))
        self.output_bias_init = output_bias_init
        self.output_bias_pending = output_bias_init == "data_mean"  # done once, before the first fit
        self._nvml_switched_off = False  # on_fit_start turned Lightning's NVML check off (CPU fits)

    # -- the model ---------------------------------------------------------------------------
    def cost(self, z: Tensor, x: Tensor) -> Tensor:
        """f(z) = -log p(x|z), Bernoulli likelihood.  # z (*S, B', N, K), x (B, D) -> (*S, B)

        B' is B or 1 (a configuration shared by the batch, as exact enumeration passes).
        """
        logits_x = self.decoder(z)  # (*S, B', D)
        shape = torch.broadcast_shapes(logits_x.shape, x.shape)
        bce = F.binary_cross_entropy_with_logits(logits_x.expand(shape), x.expand(shape), reduction="none")
        return bce.sum(-1)

    def _estimate(self, x: Tensor) -> StepOutput:
        """The shared training step: the estimator's surrogate plus the analytic KL."""
        logits = self.encoder(x)  # (B, N, K)
        out = self.estimator(logits, lambda z: self.cost(z, x))
        kl = kl_to_uniform(logits)  # (B,)
        return StepOutput(
            loss=(out.loss + kl).mean(),
            neg_elbo=(out.value + kl).mean(),
            recon=out.value.mean(),
            kl=kl.mean(),
        )

    def neg_elbo(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """True negative ELBO per image: -log p(x|z) at a hard z ~ q(z|x), plus the analytic KL.  # (B,)"""
        logits = self.encoder(x)
        z = sampling.gumbel_max(logits, generator=generator)
        return self.cost(z, x) + kl_to_uniform(logits)

    @torch.no_grad()
    def init_output_bias(self, train_images: Tensor) -> None:
        """Set the decoder's output bias to the logit of the training split's mean pixel.  # (rows, D)

        With the weights near zero at initialisation, the decoder then starts at the mean image
        (about 206 nats per binarized MNIST image) instead of p = 1/2 everywhere (543 nats). This
        is the initialisation of Burda, Grosse & Salakhutdinov (2016, IWAE; their code sets the
        Bernoulli layer's bias to -log(1/clip(mean, 0.001, 0.999) - 1): yburda/iwae, iwae.py and
        datasets.py). Here it prevents a failure seen without it on small latent
        spaces (N=2, K=10): while the decoder learns the mean image, the relaxed estimators
        report cost differences between categories far larger than the true ones, the encoder's
        logits saturate within some 20 steps and every image keeps one code.
        """
        mean = train_images.float().mean(0).clamp(MEAN_CLAMP, 1 - MEAN_CLAMP)  # (D,)
        last = self.decoder.net[-1]
        if mean.shape != last.bias.shape:
            raise ConfigError(
                f"the training images have {mean.numel()} pixels but model.input_dim={last.bias.numel()}"
            )
        last.bias.copy_(torch.logit(mean).to(last.bias))
        self.output_bias_pending = False

    # -- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Before the first fit of a fresh model: the output bias from the training split
        (model.output_bias_init=data_mean). A resumed fit then restores the checkpoint's weights
        over it (Lightning restores after `setup`)."""
        if stage != "fit" or not self.output_bias_pending:
            return
        train_images = getattr(self.trainer.datamodule, "train_images", None)
        if train_images is None:
            raise ConfigError(
                "model.output_bias_init=data_mean needs the training images from the datamodule "
                "(a train_images() method, as discrete_vae.data's datamodules have); "
                "set model.output_bias_init=default to keep PyTorch's initialisation"
            )
        self.init_output_bias(train_images())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.output_bias_pending = False  # the weights are trained ones

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        out = self._estimate(batch)
        if self._trainer is not None and logs_this_step(self.trainer):
            self.log_dict(
                {"train/loss": out.loss, "train/neg_elbo": out.neg_elbo, "train/recon": out.recon, "train/kl": out.kl},
                on_step=True, on_epoch=False, batch_size=batch.shape[0],
            )
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
        neg_elbo = self.neg_elbo(batch, generator).mean()
        self.log("val/neg_elbo", neg_elbo, prog_bar=True, batch_size=batch.shape[0], sync_dist=True)

    def test_step(self, batch: Tensor, batch_idx: int) -> None:
        generator = self._eval_generator(batch_idx, self.trainer.num_test_batches)
        neg_elbo = self.neg_elbo(batch, generator).mean()
        self.log("test/neg_elbo", neg_elbo, batch_size=batch.shape[0], sync_dist=True)
        if self.test_iwae_samples > 0:  # the importance-weighted bound with m samples per image
            from discrete_vae.evaluation import iwae_bound  # evaluation imports this module

            nll = iwae_bound(self, batch, self.test_iwae_samples, generator=generator)
            self.log("test/nll_iwae", nll.mean(), batch_size=batch.shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self._image_batch is None:
            return
        from lightning.pytorch.loggers import TensorBoardLogger
        from torchvision.utils import make_grid

        for logger in self.loggers:
            if not isinstance(logger, TensorBoardLogger):
                continue
            x = self._image_batch
            recon = torch.sigmoid(self.decoder(sampling.gumbel_max(self.encoder(x), generator=self._eval_generator(0, 1))))
            side = math.isqrt(x.shape[-1])
            pairs = torch.cat([x, recon]).view(-1, 1, side, side)  # inputs in the first row
            logger.experiment.add_image("val/reconstructions", make_grid(pairs, nrow=len(x)), self.global_step)
            logger.experiment.add_image("val/samples", make_grid(self.sample_images(64), nrow=8), self.global_step)

    @torch.no_grad()
    def sample_images(self, num: int, seed: int = 0) -> Tensor:
        """Decoded draws from the uniform prior (Bernoulli means), same prior draws each call.  # (num, 1, H, W)"""
        N, K = self.hparams.num_latents, self.hparams.num_categories
        generator = torch.Generator(self.device).manual_seed(seed)
        z = sampling.gumbel_max(torch.zeros(num, N, K, device=self.device), generator=generator)
        side = math.isqrt(self.hparams.input_dim)
        return torch.sigmoid(self.decoder(z)).view(num, 1, side, side)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        run_config = getattr(self, "run_config", None)
        if run_config is not None:  # lets discrete_vae.training.load_checkpoint rebuild the model
            checkpoint["config"] = run_config
            checkpoint["choices"] = getattr(self, "run_choices", {})  # estimator=..., for messages

    def configure_optimizers(self):
        """The configured optimizer; Adam and AdamW take their fused kernel (one multi-tensor update
        instead of a loop over parameters) on the CPU and CUDA unless `fused` is set explicitly."""
        factory, extra = self.optimizer_factory, {}
        fusable = getattr(factory, "func", None) in (torch.optim.Adam, torch.optim.AdamW)
        if fusable and "fused" not in factory.keywords and self.device.type in ("cpu", "cuda"):
            extra["fused"] = True
        return factory(self.parameters(), **extra)

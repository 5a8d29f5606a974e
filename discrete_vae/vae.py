"""The VAE's maths, apart from Lightning: one plain nn.Module that training, evaluation, the
gradient diagnostics, the gradient study and the benchmarks all call.

It holds the latent type (discrete_vae.latents: shape, prior, KL, sampling, enumeration), the
encoder and decoder (discrete_vae.networks) and the Bernoulli likelihood of the pixels, and
writes the objective once: `objective(x, estimator)` is the estimator's surrogate of
E_q[-log p(x|z)] plus the analytic KL(q(z|x) || p(z)) (Kingma & Welling 2014, Eq. 7), the loss
every caller differentiates. The estimator is an argument, not a part: one model can be
compared under many estimators (scripts/gradient_study.py), and the LightningModule
(discrete_vae.module) holds the one it trains with.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from discrete_vae.errors import ConfigError, require_number
from discrete_vae.estimators import Estimator
from discrete_vae.latents import Latent
from discrete_vae.networks import Decoder, Encoder

OUTPUT_BIAS_INITS = ("data_mean", "default")
MAX_WEIGHTS = 10**9  # 4 GB of float32: a typo in a size, not a model to build
MEAN_CLAMP = 1e-3  # the training mean pixel is clamped to [1e-3, 1 - 1e-3] before its logit (as Burda et al.)


class Objective(NamedTuple):
    loss: Tensor  # scalar surrogate being minimised
    neg_elbo: Tensor  # scalar, nats per image
    recon: Tensor  # scalar
    kl: Tensor  # scalar


class VAE(nn.Module):
    """p(z) p(x|z) with q(z|x), for any latent type; pixels are Bernoulli."""

    def __init__(
        self,
        latent: Latent,
        input_dim: int = 784,
        hidden_dims: Sequence[int] = (512, 256),
        activation: str = "ReLU",
        output_bias_init: str = "default",
        activation_args: dict | None = None,  # keyword arguments of the activation, e.g. {negative_slope: 0.3}  # conf/model sets data_mean: on for every configured run
    ):
        super().__init__()
        if output_bias_init not in OUTPUT_BIAS_INITS:
            raise ConfigError(
                f"model.output_bias_init={output_bias_init!r} is not one of {', '.join(OUTPUT_BIAS_INITS)}"
            )
        require_number("model.input_dim", input_dim, positive=True, integer=True)
        if not isinstance(hidden_dims, (list, tuple)):
            raise ConfigError(f"model.hidden_dims must be a list of layer widths such as [512,256], got {hidden_dims!r}")
        for width in hidden_dims:
            require_number("model.hidden_dims", width, positive=True, integer=True, hint="layer widths such as [512,256]")
        sizes = [input_dim, *hidden_dims, math.prod(latent.param_shape)]
        weights = 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))  # the encoder and its mirror
        if weights > MAX_WEIGHTS:
            raise ConfigError(f"the encoder and decoder would hold {weights:.3g} weights ({latent.describe()}, "
                              f"hidden {list(hidden_dims)}), over {MAX_WEIGHTS:.0e}; shrink the latent space or the layers")
        self.latent = latent
        self.input_dim = int(input_dim)
        if activation_args is not None and not isinstance(activation_args, dict):
            raise ConfigError(f"model.activation_args must be a mapping such as {{negative_slope: 0.3}}, got {activation_args!r}")
        self.encoder = Encoder(input_dim, hidden_dims, latent.param_shape, activation, activation_args)
        self.decoder = Decoder(input_dim, hidden_dims, latent.decoder_dim, activation, activation_args)
        self.output_bias_init = output_bias_init
        self.output_bias_pending = output_bias_init == "data_mean"  # done once, before the first fit

    # -- the terms -----------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """The parameters of q(z|x).  # x (B, D) -> (B, *param_shape)"""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """Bernoulli logits of p(x|z).  # z (..., *param_shape) -> (..., D)"""
        return self.decoder(self.latent.decoder_input(z))

    def cost(self, z: Tensor, x: Tensor) -> Tensor:
        """f(z) = -log p(x|z), the Bernoulli likelihood.  # z (*S, B', *param_shape), x (B, D) -> (*S, B)

        B' is B or 1 (a configuration shared by the batch, as exact enumeration passes).
        """
        logits_x = self.decode(z)  # (*S, B', D)
        shape = torch.broadcast_shapes(logits_x.shape, x.shape)
        bce = F.binary_cross_entropy_with_logits(logits_x.expand(shape), x.expand(shape), reduction="none")
        return bce.sum(-1)

    def kl(self, logits: Tensor) -> Tensor:
        """KL(q(z|x) || p(z)), analytic (the latent type's).  # (B, *param_shape) -> (B,)"""
        return self.latent.kl(logits)

    def log_weights(self, z: Tensor, logits: Tensor, cost: Tensor) -> Tensor:
        """log w = log p(x|z) + log p(z) - log q(z|x) (Burda et al. 2016, Eq. 8), from cost = -log p(x|z)
        = `self.cost(z, x)`.  # z (S, B, *param_shape), logits (B, ...), cost (S, B) -> (S, B)"""
        return -cost + self.latent.prior_log_prob(z) - self.latent.log_prob(logits, z)

    # -- the objective ---------------------------------------------------------------------------
    def objective(self, x: Tensor, estimator: Estimator, logits: Tensor | None = None) -> Objective:
        """The training objective: the estimator's surrogate of E_q[-log p(x|z)] plus the analytic KL,
        batch means. Its `loss`'s gradient is the estimate; `neg_elbo` is the value it reports.
        `logits` (B, *param_shape), when given, stand for `encode(x)` (the diagnostics replicate them)."""
        logits = self.encode(x) if logits is None else logits
        out = estimator(logits, lambda z: self.cost(z, x), self.latent)  # (B,) each
        kl = self.kl(logits)  # (B,)
        return Objective(
            loss=(out.loss + kl).mean(),
            neg_elbo=(out.value + kl).mean(),
            recon=out.value.mean(),
            kl=kl.mean(),
        )

    def neg_elbo(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """True negative ELBO per image: -log p(x|z) at a hard z ~ q(z|x), plus the analytic KL.  # (B,)"""
        logits = self.encode(x)
        z = self.latent.sample(logits, generator=generator)
        return self.cost(z, x) + self.kl(logits)

    # -- images ----------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Bernoulli means of p(x|z) at a hard z ~ q(z|x).  # (B, D)"""
        return torch.sigmoid(self.decode(self.latent.sample(self.encode(x), generator=generator)))

    @torch.no_grad()
    def sample_images(self, num: int, seed: int = 0) -> Tensor:
        """Decoded draws from the prior (Bernoulli means), the same prior draws each call.  # (num, D)"""
        device = next(self.parameters()).device
        generator = torch.Generator(device).manual_seed(seed)
        return torch.sigmoid(self.decode(self.latent.prior_sample(num, generator=generator, device=device)))

    # -- initialisation --------------------------------------------------------------------------
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

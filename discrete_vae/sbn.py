"""Stochastic binary networks for structured output prediction (Jang, Gu & Poole 2017, Sec. 4.1, after
Raiko et al. 2015 and Gu et al. 2016): the lower half of a binarized MNIST image predicted from its
upper half, through a chain of stochastic layers,

    p(x_lower | x_upper) = sum_h p(h1 | x_upper) p(h2 | h1) ... p(x_lower | hL),

392-200-200-392 in the paper (each map linear, followed by sampling). There is no encoder apart
from the model: the layers' distributions are the model's own, so the training objective is the
single-sample bound E_h[-log p(x_lower | h)] >= -log p(x_lower | x_upper) (Jensen), and the
evaluation the m-sample bound -log 1/m sum_i p(x_lower | h_i), h_i ~ p(h | x_upper) (m = 1000 in
the paper's Table 1). The chain and its estimators are discrete_vae.chain's; only the local costs
differ from the VAE's: nothing below the top layer, -log p(x_lower | hL) at it.

Why a model of its own rather than a VAE: the same LightningModule, evaluation and scripts run
it (it answers the VAE's questions: `objective`, `neg_elbo`, `weights`, `reconstruct`), but
it has no prior to sample images from (`has_prior = False`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from discrete_vae.chain import Layer, StochasticChain, expand_rows
from discrete_vae.errors import ConfigError, require_number
from discrete_vae.estimators import Estimator
from discrete_vae.latents import Latent
from discrete_vae.networks import MLP, build_network
from discrete_vae.vae import MEAN_CLAMP, OUTPUT_BIAS_INITS, set_output_bias


class SBN(StochasticChain):
    """p(x_lower | x_upper) through stochastic layers: `latent` (h1) and `upper_latents` (h2, ...)."""

    has_prior = False  # no unconditional samples to show

    def __init__(
        self,
        latent: Latent,
        upper_latents: Sequence[Latent] = (),
        input_dim: int = 784,
        split: int = 392,  # pixels of the upper half (14 rows of 28)
        hidden_dims: Sequence[int] = (),  # between x_upper and h1, and between hL and x_lower
        upper_hidden_dims: Sequence[int] = (),  # between stochastic layers
        activation: str = "ReLU",
        activation_args: dict | None = None,
        output_bias_init: str = "default",
        encoder: Callable[..., nn.Module] | None = None,  # None: MLPs of hidden_dims; else networks' partials (as the VAE's)
        decoder: Callable[..., nn.Module] | None = None,
    ):
        super().__init__()
        require_number("model.input_dim", input_dim, positive=True, integer=True)
        require_number("model.split", split, positive=True, integer=True, high=input_dim - 1,
                       hint="the pixels of the upper half, 392 for MNIST")
        if output_bias_init not in OUTPUT_BIAS_INITS:
            raise ConfigError(f"model.output_bias_init={output_bias_init!r} is not one of {', '.join(OUTPUT_BIAS_INITS)}")
        for key, dims in (("model.hidden_dims", hidden_dims), ("model.upper_hidden_dims", upper_hidden_dims)):
            if not isinstance(dims, (list, tuple)):
                raise ConfigError(f"{key} must be a list of layer widths (or []), got {dims!r}")
        self.latent, self.input_dim, self.split = latent, int(input_dim), int(split)
        latents = [latent, *upper_latents]
        self.encoder = build_network("model.encoder", encoder, input_dim=self.split, output_shape=latent.param_shape) \
            if encoder is not None else MLP(self.split, hidden_dims, latent.param_shape, activation, activation_args)  # p(h1 | x_upper)
        self.upper = nn.ModuleList(
            Layer(above, below, upper_hidden_dims, activation, activation_args, prior=False)  # p(h_l | h_{l-1})
            for below, above in zip(latents[:-1], latents[1:])
        )
        lower = input_dim - self.split
        self.decoder = build_network("model.decoder", decoder, input_dim=latents[-1].decoder_dim, output_dim=lower) \
            if decoder is not None else MLP(latents[-1].decoder_dim, list(reversed(hidden_dims)), lower, activation,
                                            activation_args)  # p(x_lower | hL)
        self.output_bias_init = output_bias_init
        self.output_bias_pending = output_bias_init == "data_mean"

    def halves(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x_upper, x_lower).  # (B, D) -> (B, split), (B, D - split)"""
        return x[..., : self.split], x[..., self.split :]

    # -- the chain -------------------------------------------------------------------------------
    def encode(self, x: Tensor) -> Tensor:
        """p(h1 | x_upper)'s logits.  # (B, D) -> (B, *param_shape)"""
        return self.encoder(self.halves(x)[0])

    def output_cost(self, z: Tensor, lower: Tensor) -> Tensor:
        """-log p(x_lower | hL).  # z (*S, R', *shape), lower (R, D - split) -> (*S, R)"""
        logits = self.decoder(self.latents[-1].decoder_input(z))
        shape = torch.broadcast_shapes(logits.shape, lower.shape)
        return F.binary_cross_entropy_with_logits(logits.expand(shape), lower.expand(shape), reduction="none").sum(-1)

    def local_cost(self, level: int, z: Tensor, context: Tensor) -> Tensor | float:
        return self.output_cost(z, context) if level == len(self.upper) else 0.0

    def context_above(self, level: int, z: Tensor, context: Tensor, lead: tuple[int, ...]) -> Tensor:
        return expand_rows(context, lead)  # x_lower, for the top layer's cost

    def analytic(self, level: int, logits: Tensor) -> Tensor:
        return logits.new_zeros(logits.shape[0])  # no encoder, no KL: the layers' distributions are the model's

    # -- what the module, the evaluation and the scripts ask -------------------------------------
    def terms(self, x: Tensor, estimators: Sequence[Estimator], logits: Tensor | None = None):
        logits = self.encode(x) if logits is None else logits
        return self.layer_terms(0, logits, self.halves(x)[1], estimators)

    def weights(self, x: Tensor, drawn: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """(log w, term), (S, B) each, of draws h_i ~ p(h | x_upper) through the layers: log w = log p(x_lower | h_i)
        (the proposal is the model itself), term = -log w."""
        top = drawn[-1][1]  # (S, B, *shape of hL)
        cost = self.output_cost(top, self.halves(x)[1])  # (S, B)
        return -cost, cost

    @torch.no_grad()
    def exact_nll(self, x: Tensor, max_rows: int) -> Tensor:
        """-log p(x_lower | x_upper), summing over every configuration of every layer, all at once (small
        networks only: the caller holds them to the enumeration budget).  # (B,)"""
        lower = self.halves(x)[1]
        configs = [latent.enumerate(device=x.device, dtype=x.dtype) for latent in self.latents]  # (C_l, *shape)
        # log p(h1 | x_upper) for every h1: (C1, B)
        log_p = self.latent.log_prob(self.encode(x)[None], configs[0][:, None])
        for level in range(len(self.upper)):
            above = self.latents[level + 1]
            step = above.log_prob(self.encode_above(level, configs[level])[:, None], configs[level + 1][None])  # (C_l, C_l+1)
            log_p = torch.logsumexp(log_p[:, None, :] + step[:, :, None], dim=0)  # (C_l+1, B)
        log_p = log_p - self.output_cost(configs[-1][:, None], lower)  # (C_L, B)
        return -torch.logsumexp(log_p, dim=0)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The upper half as given, the lower half's Bernoulli means at one hard sample of the chain.  # (B, D)"""
        top = self.sample_layers(self.encode(x), 1, generator)[-1][1][0]  # (B, *shape of hL)
        return torch.cat([self.halves(x)[0], torch.sigmoid(self.decoder(self.latents[-1].decoder_input(top)))], dim=-1)

    @torch.no_grad()
    def init_output_bias(self, train_images: Tensor) -> None:
        """The output bias at the logit of the training split's mean lower-half pixel (as the VAE's)."""
        mean = self.halves(train_images.float())[1].mean(0).clamp(MEAN_CLAMP, 1 - MEAN_CLAMP)
        if train_images.shape[-1] != self.input_dim:
            raise ConfigError(f"the training images have {train_images.shape[-1]} pixels but model.input_dim={self.input_dim}")
        set_output_bias(self.decoder, mean)
        self.output_bias_pending = False



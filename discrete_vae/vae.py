"""The VAE's maths, apart from Lightning: one plain nn.Module that training, evaluation, the
gradient diagnostics, the gradient study and the benchmarks all call.

It holds the latent type (discrete_vae.latents: shape, prior, KL, sampling, enumeration), the
encoder and decoder (discrete_vae.networks) and the Bernoulli likelihood of the pixels, and
writes the objective once: `objective(x, estimator)` is the estimator's surrogate of
E_q[-log p(x|z)] plus the analytic KL(q(z|x) || p(z)) (Kingma & Welling 2014, Eq. 7), the loss
every caller differentiates. The estimator is an argument, not a part: one model can be
compared under many estimators (scripts/gradient_study.py), and the LightningModule
(discrete_vae.module) holds the one it trains with.

With `upper_latents` the VAE has several stochastic layers (Yin & Zhou 2019's two-layer model):
it is then a chain (discrete_vae.chain), each layer with its own estimator, and one stochastic
layer is the chain of length one, by the same code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from discrete_vae.chain import Layer, StochasticChain, chunk_size
from discrete_vae.errors import ConfigError, require_number
from discrete_vae.estimators import Estimator
from discrete_vae.latents import Latent
from discrete_vae.networks import MLP, build_network

OUTPUT_BIAS_INITS = ("data_mean", "default")
MAX_WEIGHTS = 10**9  # 4 GB of float32: a typo in a size, not a model to build
MEAN_CLAMP = 1e-3  # the training mean pixel is clamped to [1e-3, 1 - 1e-3] before its logit (as Burda et al.)


class VAE(StochasticChain):
    """p(z) p(x|z) with q(z|x), for any latent type; pixels are Bernoulli. With `upper_latents`, a
    chain of stochastic layers: q(z1|x) q(z2|z1) ... and p(zL) ... p(z1|z2) p(x|z1) (Yin & Zhou 2019's
    two-layer VAE), the prior being the top layer's; one stochastic layer is the case of none."""

    has_prior = True  # images can be drawn from p(z) p(x|z)

    def __init__(
        self,
        latent: Latent,
        input_dim: int = 784,
        hidden_dims: Sequence[int] = (512, 256),
        activation: str = "ReLU",
        output_bias_init: str = "default",  # conf/model sets data_mean: on for every configured run
        activation_args: dict | None = None,  # keyword arguments of the activation, e.g. {negative_slope: 0.3}
        upper_latents: Sequence[Latent] = (),  # stochastic layers above `latent`, lowest first
        upper_hidden_dims: Sequence[int] = (),  # the networks between stochastic layers ([]: linear)
        encoder: Callable[..., nn.Module] | None = None,  # None: an MLP of hidden_dims; else a network's partial,
        decoder: Callable[..., nn.Module] | None = None,  # called as encoder(input_dim=, output_shape=), decoder(input_dim=, output_dim=)
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
        if not isinstance(upper_hidden_dims, (list, tuple)):
            raise ConfigError(f"model.upper_hidden_dims must be a list of layer widths (or []), got {upper_hidden_dims!r}")
        for width in upper_hidden_dims:
            require_number("model.upper_hidden_dims", width, positive=True, integer=True, hint="layer widths, or []")
        latents = [latent, *upper_latents]
        sizes = [input_dim, *hidden_dims, math.prod(latent.param_shape)]
        weights = 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))  # the encoder and its mirror
        for below, above in zip(latents[:-1], latents[1:]):
            sizes = [below.decoder_dim, *upper_hidden_dims, math.prod(above.param_shape)]
            weights += 2 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
        if weights > MAX_WEIGHTS:
            raise ConfigError(f"the encoder and decoder would hold {weights:.3g} weights ({latent.describe()}, "
                              f"hidden {list(hidden_dims)}), over {MAX_WEIGHTS:.0e}; shrink the latent space or the layers")
        self.latent = latent
        self.input_dim = int(input_dim)
        self.encoder = build_network("model.encoder", encoder, input_dim=input_dim, output_shape=latent.param_shape) \
            if encoder is not None else MLP(input_dim, hidden_dims, latent.param_shape, activation, activation_args)
        self.decoder = build_network("model.decoder", decoder, input_dim=latent.decoder_dim, output_dim=input_dim) \
            if decoder is not None else MLP(latent.decoder_dim, list(reversed(hidden_dims)), input_dim, activation,
                                            activation_args)
        self.upper = nn.ModuleList(
            Layer(above, below, upper_hidden_dims, activation, activation_args)
            for below, above in zip(latents[:-1], latents[1:])
        )  # empty for one stochastic layer: the state of a one-layer VAE is what it always was
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

    def analytic(self, level: int, logits: Tensor) -> Tensor:
        """The analytic part of stochastic layer `level`'s term of -ELBO given its parent: the top
        layer's KL(q || p) to its prior, and E_q[log q] = -H(q) for a layer below others (whose
        prior, p(z_l | z_{l+1}), is sampled instead).  # (R, *param_shape) -> (R,)"""
        latent = self.latents[level]
        return latent.kl(logits) if level == len(self.upper) else -latent.entropy(logits)

    def kl(self, logits: Tensor) -> Tensor:
        """Layer 1's analytic term: KL(q(z|x) || p(z)) with one stochastic layer (the latent type's);
        with layers above it, -H(q(z1|x)).  # (B, *param_shape) -> (B,)"""
        return self.analytic(0, logits)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log p(z1), exactly: the latent type's prior with one stochastic layer; with layers above,
        log sum_{z2..} p(z1 | z2) ... p(zL), enumerating them (for exact likelihoods of small models).  # (C, *shape) -> (C,)"""
        return self._marginal_prior(0, z)

    def _marginal_prior(self, level: int, z: Tensor) -> Tensor:
        latent = self.latents[level]
        if level == len(self.upper):
            return latent.prior_log_prob(z)
        configs = self.latents[level + 1].enumerate(device=z.device, dtype=z.dtype)  # (C, *shape above)
        logits = self.conditional_logits(level + 1, configs)  # (C, *param_shape)
        shape = latent.event_shape
        joint = latent.log_prob(logits[:, None], z[None]) + self._marginal_prior(level + 1, configs)[:, None]  # (C, Z)
        return torch.logsumexp(joint, dim=0).reshape(z.shape[: z.dim() - len(shape)])

    # -- the objective ---------------------------------------------------------------------------
    # -- the chain (discrete_vae.chain) ------------------------------------------------------------
    def conditional_logits(self, level: int, z: Tensor) -> Tensor:
        """p(z_{l-1} | z_l)'s logits, the generative path from layer `level` (>= 1) down one layer.
        # (..., *shape) -> (..., *shape below)"""
        return self.upper[level - 1].decoder(self.latents[level].decoder_input(z))

    def local_cost(self, level: int, z: Tensor, context: Tensor) -> Tensor:
        """-log p(x | z1) at the lowest layer (context: x); -log p(z_{l-1} | z_l) above it (context: the
        sample below).  # z (*S, R', *shape) -> (*S, R)"""
        if level == 0:
            return self.cost(z, context)
        return -self.latents[level - 1].log_prob(self.conditional_logits(level, z), context)

    def context_above(self, level: int, z: Tensor, context: Tensor, lead: tuple[int, ...]) -> Tensor:
        return z  # the layer above scores the sample below: p(z_l | z_{l+1})

    def terms(self, x: Tensor, estimators: Sequence[Estimator], logits: Tensor | None = None):
        """Per image: (loss, value, analytic) of -ELBO = value + analytic (`StochasticChain.layer_terms`
        from the lowest layer): `value` is the sampled part as layer 1's estimator reports it, with the
        cost -log p(x|z1) plus the layers above given z1, and `loss` its surrogate (worth the value).
        With one stochastic layer: the estimator on -log p(x|z) and the analytic KL.  # x (B, D) -> (B,) each"""
        logits = self.encode(x) if logits is None else logits
        return self.layer_terms(0, logits, x, estimators)

    @torch.no_grad()
    def exact_nll(self, x: Tensor, max_rows: int) -> Tensor:
        """-log p(x) = -logsumexp_c(log p(c) - cost(c, x)) over the configurations c of z1, `chunk` at a
        time from the latent type's `enumerate` (p(c) summed over the layers above: `prior_log_prob`).
        # x (B, D) -> (B,)"""
        B = x.shape[0]
        chunk = chunk_size(B, max_rows)
        lse = x.new_full((B,), -math.inf)
        for start in range(0, self.latent.num_configs, chunk):
            configs = self.latent.enumerate(start, start + chunk, device=x.device, dtype=x.dtype)  # (C, *shape)
            log_joint = self.prior_log_prob(configs)[:, None] - self.cost(configs[:, None], x)  # (C, B)
            lse = torch.logaddexp(lse, torch.logsumexp(log_joint, dim=0))
        return -lse

    def weights(self, x: Tensor, drawn: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        """(log w, -ELBO term) of draws through every stochastic layer (`sample_layers`), each (S, B).

        log w = log p(x, z1..zL) - log q(z1..zL | x) (Burda et al. 2016, Eq. 8), with
        log p = log p(x|z1) + sum_l log p(z_l | z_{l+1}) + log p(zL); the -ELBO term is the sampled
        part plus the analytic ones, whose mean over draws is -ELBO with lower variance than
        -mean(log w) (for one layer: -log p(x|z) + KL).  # x (B, D), drawn [(logits_l, z_l)], z_l (S, B, *shape_l)"""
        logits, z = drawn[0]
        cost = self.cost(z, x)  # (S, B)
        log_w, term = -cost - self.latent.log_prob(logits, z), cost + self.analytic(0, logits)
        for level, (up_logits, above) in enumerate(drawn[1:], start=1):
            conditional = self.local_cost(level, above, drawn[level - 1][1])  # -log p(z_{l-1} | z_l)
            log_w = log_w - conditional - self.latents[level].log_prob(up_logits, above)
            term = term + conditional + self.analytic(level, up_logits)
        log_w = log_w + self.latents[-1].prior_log_prob(drawn[-1][1])
        return log_w, term

    # -- images ----------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Bernoulli means of p(x|z) at a hard z ~ q(z|x).  # (B, D)"""
        return torch.sigmoid(self.decode(self.latent.sample(self.encode(x), generator=generator)))

    @torch.no_grad()
    def sample_images(self, num: int, seed: int = 0) -> Tensor:
        """Decoded draws from the prior (Bernoulli means), the same prior draws each call: the top
        layer's prior, then p(z_l | z_{l+1}) down to z1.  # (num, D)"""
        device = next(self.parameters()).device
        generator = torch.Generator(device).manual_seed(seed)
        z = self.latents[-1].prior_sample(num, generator=generator, device=device)
        for level in range(len(self.upper), 0, -1):
            z = self.latents[level - 1].sample(self.conditional_logits(level, z), generator=generator)
        return torch.sigmoid(self.decode(z))

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
        set_output_bias(self.decoder, mean)
        self.output_bias_pending = False


def set_output_bias(decoder: nn.Module, mean: Tensor) -> None:
    """The decoder's bias per pixel (`output_bias`) set to the logit of the mean pixel `mean` (D,)."""
    bias = getattr(decoder, "output_bias", None)
    if not isinstance(bias, Tensor):
        raise ConfigError(f"model.output_bias_init=data_mean needs a decoder with an output_bias (one value per "
                          f"pixel); {type(decoder).__name__} has none: set model.output_bias_init=default")
    if mean.shape != bias.shape:
        raise ConfigError(f"the training images have {mean.numel()} pixels but model.input_dim={bias.numel()}")
    bias.data.copy_(torch.logit(mean).to(bias))

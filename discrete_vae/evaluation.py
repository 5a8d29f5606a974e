"""Likelihood bounds of a trained VAE (discrete_vae.vae, any latent type), in nats per image.

Training and validation report one number, the negative ELBO at one hard sample.
To compare estimators on the quantity a VAE is meant to model, log p(x), this
module computes, per image:

- `neg_elbo`: E_q[-log p(x|z)] + KL(q(z|x) || p(z)), the reconstruction term averaged
  over m hard samples z_i ~ q(z|x), the KL analytic (Kingma & Welling 2014, Eq. 7);
- `nll_iwae`: the importance-weighted bound (Burda, Grosse & Salakhutdinov 2016, Eq. 8)

      -log p(x) <= -log (1/m) sum_i w_i,   w_i = p(x, z_i) / q(z_i | x),   z_i ~ q(z|x),

  which tightens monotonically in m (their Theorem 1) and tends to -log p(x) as m grows;
- `nll_exact`: -log p(x) = -log sum_z p(z) p(x|z) over all configurations of the latent type
  (K^N for categorical latents), when they fit the enumeration budget, else absent.

The prior, the KL and log q are the latent type's. Everything is in log space (logsumexp),
and memory is bounded whatever m or K^N: samples and configurations are processed in
chunks of at most `max_rows` (sample, image) rows, with a running logsumexp. Samples
come from the latent type's `sample` with an explicit torch.Generator, so an
evaluation with a fixed seed is reproducible and leaves the global RNG untouched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from discrete_vae.errors import ConfigError, count
from discrete_vae.chain import chunk_size
from discrete_vae.vae import VAE

# (sample or configuration, image) rows per chunk: each chunk holds a few tensors of
# max_rows x 784 floats (decoder logits, BCE), about 100 MB each at the default.
DEFAULT_MAX_ROWS = 32_768


class Bounds(NamedTuple):
    neg_elbo: Tensor  # (B,) nats
    nll_iwae: Tensor  # (B,) nats


@torch.no_grad()
def sample_bounds(
    model: VAE,
    x: Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> Bounds:
    """neg_elbo and nll_iwae of each image from the same m = `num_samples` draws z_i ~ q(z|x), through
    every stochastic layer (StochasticChain.sample_terms).  # x (B, D)

    log w_i = -cost(z_i, x) + log p(z_i) - log q(z_i|x)            (Burda et al. 2016, Eq. 8)
    nll_iwae = -(logsumexp_i log w_i - log m)
    neg_elbo = mean_i cost(z_i, x) + KL(q(z|x) || p(z))           (analytic KL; with layers above,
                                                                  each layer's analytic term)

    The m draws are taken `chunk` at a time; logsumexp is accumulated across chunks.
    """
    if int(num_samples) != num_samples or num_samples < 1:
        raise ConfigError(f"the number of samples per image must be a positive integer, got {num_samples}")
    logits = model.encode(x)  # (B, *param_shape)
    B = logits.shape[0]
    chunk = chunk_size(B, max_rows)
    lse = logits.new_full((B,), -math.inf)  # running logsumexp of log w
    term_sum = logits.new_zeros(B)
    for start in range(0, num_samples, chunk):
        s = min(chunk, num_samples - start)
        log_w, term = model.sample_terms(x, logits, s, generator)  # (s, B) each
        lse = torch.logaddexp(lse, torch.logsumexp(log_w, dim=0))
        term_sum += term.sum(0)
    return Bounds(neg_elbo=term_sum / num_samples, nll_iwae=-(lse - math.log(num_samples)))


def iwae_bound(model, x, num_samples, generator=None, max_rows=DEFAULT_MAX_ROWS) -> Tensor:
    """-log (1/m) sum_i p(x, z_i) / q(z_i|x) per image (Burda et al. 2016, Eq. 8).  # x (B, D) -> (B,)"""
    return sample_bounds(model, x, num_samples, generator, max_rows).nll_iwae


def fits_exact(model: VAE, max_configs: int) -> bool:
    """Whether the configurations of all stochastic layers together fit the enumeration budget."""
    return model.num_configs <= max_configs


def check_exact(model: VAE, max_configs: int) -> None:
    """Raise ConfigError when the latent type's configurations are over the enumeration budget."""
    if not fits_exact(model, max_configs):
        raise ConfigError(
            f"nll_exact enumerates {count(model.num_configs)} configurations of "
            f"{model.describe()}, "
            f"over the budget max_configs={max_configs}; raise max_configs or leave nll_exact out"
        )


@torch.no_grad()
def exact_nll(model: VAE, x: Tensor, max_configs: int = 4096, max_rows: int = DEFAULT_MAX_ROWS) -> Tensor:
    """-log p(x), summing over every configuration of every stochastic layer (the model's `exact_nll`:
    a VAE's -log sum_c p(c) p(x|c), an SBN's -log p(x_lower | x_upper)), `max_rows` (configuration,
    image) rows at a time; raises ConfigError over the budget `max_configs`.  # x (B, D) -> (B,)"""
    check_exact(model, max_configs)
    return model.exact_nll(x, max_rows)


def evaluate(
    model: VAE,
    batches: Iterable[Tensor],
    num_samples: int = 1000,
    seed: int = 0,
    max_configs: int = 4096,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> dict[str, float | int | None]:
    """Mean neg_elbo, nll_iwae and (when K^N fits `max_configs`) nll_exact over all images of
    `batches`, in nats per image; nll_exact is None when over budget.

    Draws come from one torch.Generator seeded with `seed` on the model's device, so the
    result depends only on (model, data, num_samples, seed, max_rows) and the hardware.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device).manual_seed(int(seed))
    with_exact = fits_exact(model, max_configs)
    totals = {"neg_elbo": 0.0, "nll_iwae": 0.0, "nll_exact": 0.0}
    count = 0
    try:
        for x in batches:
            x = x.to(device=device, dtype=torch.float32)  # (B, D)
            bounds = sample_bounds(model, x, num_samples, generator, max_rows)
            totals["neg_elbo"] += bounds.neg_elbo.double().sum().item()
            totals["nll_iwae"] += bounds.nll_iwae.double().sum().item()
            if with_exact:
                totals["nll_exact"] += exact_nll(model, x, max_configs, max_rows).double().sum().item()
            count += x.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise ConfigError("no images to evaluate: the split is empty or limit_batches is 0")
    result: dict[str, float | int | None] = {k: v / count for k, v in totals.items()}
    if not with_exact:
        result["nll_exact"] = None
    result["num_images"] = count
    return result

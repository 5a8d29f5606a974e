"""A chain of stochastic layers z1 -> z2 -> ... -> zL, each drawn given the one below (z1 given the
input), with one gradient estimator per layer: the part that every multi-layer model shares.

Why it exists: the estimators (discrete_vae.estimators) are written for one stochastic layer, the
contract `estimator(logits, cost, latent)`. A chain needs no second contract, because an estimator's
loss is worth its value: layer l's estimator is run with a cost that runs layer l+1's estimator
(given layer l's samples) inside it, so each layer's estimator receives, as its learning signal,
everything that lies downstream of its sample. That is how the score-function family (REINFORCE,
RLOO, ARM, DisARM, REBAR, RELAX, IndeCateR) is defined for multi-layer networks (Mnih & Gregor
2014, Sec. 2; Yin & Zhou 2019, Sec. 2.3; Tucker et al. 2017, Sec. 3), and the pathwise family
(Gumbel-Softmax, straight-through and their kin) differentiates through every layer because the
layer above is computed from the relaxed or straight-through sample. A single stochastic layer is
the chain of length one: the same code, with nothing above.

A model (discrete_vae.vae.VAE, discrete_vae.sbn.SBN) says what its chain is: its `latents`, how
layer l+1's logits come from layer l's samples (`encode_above`), the cost local to layer l
(`local_cost`: for a VAE -log p(x|z1), then -log p(z_l | z_{l+1}); for an SBN the likelihood of
the output at the top), what that cost needs to see from below (`context_above`), and the analytic
part of each layer's term (`analytic`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from discrete_vae.errors import ConfigError
from discrete_vae.estimators import Estimator
from discrete_vae.latents import Latent

MAX_CHAIN_EVALUATIONS = 4096  # decoder evaluations per example of all layers' estimators together


class StochasticChain(nn.Module):
    """Base class of models with a chain of stochastic layers (see the module docstring)."""

    @property
    def latents(self) -> list[Latent]:  # pragma: no cover - every model defines it
        """The stochastic layers' latent types, lowest first."""
        raise NotImplementedError

    def encode_above(self, level: int, z: Tensor) -> Tensor:  # pragma: no cover
        """Layer level+1's logits from layer `level`'s samples.  # (R, *shape) -> (R, *shape above)"""
        raise NotImplementedError

    def local_cost(self, level: int, z: Tensor, context: Tensor) -> Tensor | float:  # pragma: no cover
        """The sampled cost local to layer `level`.  # z (*S, R', *shape), context (R, ...) -> (*S, R), or 0."""
        raise NotImplementedError

    def context_above(self, level: int, z: Tensor, context: Tensor, lead: tuple[int, ...]) -> Tensor:  # pragma: no cover
        """What layer level+1's cost needs, one row per row of z (R = prod(lead) * rows).
        # z (R, *shape), context (rows, ...) -> (R, ...)"""
        raise NotImplementedError

    def analytic(self, level: int, logits: Tensor) -> Tensor | float:  # pragma: no cover
        """The analytic part of layer `level`'s term given its parent.  # (R, *shape) -> (R,), or 0."""
        raise NotImplementedError

    @property
    def num_configs(self) -> int:
        """Configurations of all stochastic layers together (what exact enumeration sums over)."""
        return math.prod(latent.num_configs for latent in self.latents)

    def layer_estimators(self, estimator: Estimator | Sequence[Estimator]) -> list[Estimator]:
        """One estimator per stochastic layer: a sequence is checked as it is; a single estimator
        stands for the lowest layer, and each layer above gets a copy of it (its own state: an EMA
        baseline, a control network of its own size), checked against that layer's latent type.
        A chain whose estimators would evaluate the decoder more than MAX_CHAIN_EVALUATIONS times
        per example (the product over layers: IndeCateR's N + 1 per layer, exact enumeration's 2^N)
        is refused, with each layer's count."""
        estimators = [estimator] if isinstance(estimator, Estimator) else list(estimator)
        if len(estimators) == 1:
            estimators += [copy.deepcopy(estimator) for _ in self.latents[1:]]
        if len(estimators) != len(self.latents):
            raise ConfigError(f"{len(estimators)} estimators for {len(self.latents)} stochastic layers")
        for each, latent in zip(estimators, self.latents):
            each.check(latent)
        if len(estimators) > 1:
            counts = [each.decoder_evaluations(latent) for each, latent in zip(estimators, self.latents)]
            if math.prod(counts) > MAX_CHAIN_EVALUATIONS:
                raise ConfigError(
                    f"estimator {type(estimators[0]).__name__} on {len(counts)} stochastic layers evaluates the "
                    f"decoder {' x '.join(map(str, counts))} = {math.prod(counts):.4g} times per example, over "
                    f"{MAX_CHAIN_EVALUATIONS}; choose another estimator or smaller layers"
                )
        return estimators

    def as_estimators(self, estimator: Estimator | Sequence[Estimator]) -> list[Estimator]:
        """The estimators `objective` was given: a sequence, one per layer; a single estimator only for
        a chain of one layer (the layers above need copies with their own state: `layer_estimators`,
        made once, by the caller that keeps them)."""
        if isinstance(estimator, Estimator):
            if len(self.latents) > 1:
                raise ConfigError(f"a model with {len(self.latents)} stochastic layers needs one estimator per "
                                  f"layer: pass model.layer_estimators(estimator)")
            return [estimator]
        return list(estimator)

    def layer_terms(self, level: int, logits: Tensor, context: Tensor, estimators: Sequence[Estimator]):
        """Per row: (loss, value, analytic) of layer `level` and everything above it, given its logits
        and the context its cost needs; `value` + `analytic` is its term of the objective and `loss`
        the estimators' surrogate of `value` (worth it).  # logits (R, *shape) -> (R,) each"""
        latent = self.latents[level]
        rows = logits.shape[0]

        shape = latent.param_shape

        def above(z: Tensor) -> Tensor:  # (*S, R, *shape) -> (*S, R): the layers above, given z
            lead = tuple(z.shape[: z.dim() - len(shape) - 1])
            z = z.reshape(-1, *shape)  # every (sample, row) its own draws above
            loss, _, analytic = self.layer_terms(
                level + 1, self.encode_above(level, z), self.context_above(level, z, context, lead), estimators
            )
            return (loss + analytic).reshape(*lead, rows)

        def cost(z: Tensor) -> Tensor:  # (*S, R', *shape) -> (*S, R)
            here = self.local_cost(level, z, context)
            if level + 1 == len(self.latents):
                return here
            lead = tuple(z.shape[: z.dim() - len(shape)])[:-1]  # (*S)
            z = z.expand(*lead, rows, *shape)  # a configuration shared by the batch: one per row
            if not (estimators[level].shares_noise_above and len(lead) == 1):
                return here + above(z)
            # the layers above draw the same noise for each of the S evaluations (REBAR's f(b),
            # f(sigma(z)), f(sigma(z~))): common random numbers, the papers' multi-layer form
            with common_random_numbers(z.device) as again:
                parts = [again() or above(z[i]) for i in range(lead[0])]
            return here + torch.stack(parts)

        out = estimators[level](logits, cost, latent)
        return out.loss, out.value, self.analytic(level, logits)


class common_random_numbers:
    """Inside, `again()` puts the random number generators (the CPU's and the device's) back to where
    they were on entry, so that what follows draws the same noise as the first draw after entry."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return self.again

    def again(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)

    def __exit__(self, *exc) -> None:
        return None


def expand_rows(context: Tensor, lead: tuple[int, ...]) -> Tensor:
    """A per-row tensor repeated for each of the leading sample dims, flattened as `layer_terms`
    flattens the samples.  # (rows, ...) -> (prod(lead) * rows, ...)"""
    return context.expand(*lead, *context.shape).reshape(-1, *context.shape[1:])

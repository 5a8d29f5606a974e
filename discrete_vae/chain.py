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

A model (discrete_vae.vae.VAE, discrete_vae.sbn.SBN) holds its lowest layer's latent type as
`latent` and the layers above as `upper` (`Layer`s), and says what its chain costs: the cost
local to layer l (`local_cost`: for a VAE -log p(x|z1), then -log p(z_l | z_{l+1}); for an SBN
the likelihood of the output at the top), what that cost needs to see from below
(`context_above`), the analytic part of each layer's term (`analytic`), and what layer 1's cost
sees of the input (`terms`). The objective, the hard-sample bound and the draws through the
layers are written here, once.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from discrete_vae.errors import ConfigError
from discrete_vae.estimators import CostFn, Estimator, EstimatorOutput
from discrete_vae.latents import Latent
from discrete_vae.networks import MLP

MAX_CHAIN_EVALUATIONS = 4096  # decoder evaluations per example of all layers' estimators together


class Objective(NamedTuple):
    loss: Tensor  # scalar surrogate being minimised
    neg_elbo: Tensor  # scalar, nats per image
    recon: Tensor  # scalar: the sampled part
    kl: Tensor  # scalar: the analytic part
    nll_iwae: Tensor | None = None  # scalar: the m-sample bound being trained, with a multi-sample estimator


class Layer(nn.Module):
    """A stochastic layer above the first: its latent type, the network of its distribution given the
    layer below's sample (its `encoder`: q(z_l | z_{l-1}) in a VAE, p(h_l | h_{l-1}) in an SBN) and,
    with `prior`, that of p(z_{l-1} | z_l) (its `decoder`, the logits of the layer below; a VAE's
    generative path). MLPs with `hidden_dims` between them (none: linear maps, as the two-layer models
    of Yin & Zhou 2019 and Jang et al. 2017's SBNs)."""

    def __init__(self, latent: Latent, below: Latent, hidden_dims: Sequence[int], activation: str,
                 activation_args: dict | None = None, prior: bool = True):
        super().__init__()
        self.latent = latent
        self.encoder = MLP(below.decoder_dim, hidden_dims, latent.param_shape, activation, activation_args)
        if prior:
            self.decoder = MLP(latent.decoder_dim, list(reversed(hidden_dims)), below.param_shape, activation,
                               activation_args)


class HardSample(Estimator):
    """Not a gradient estimator: the cost at one exact sample z ~ q (the latent type's `sample`, from
    `generator`), for reporting the bound at hard samples (validation, test) through every layer."""

    def __init__(self, generator: torch.Generator | None = None):
        super().__init__()
        self.generator = generator

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator=None) -> EstimatorOutput:
        f = cost(latent.sample(logits, generator=self.generator if generator is None else generator))
        return EstimatorOutput(f, f)


class MeanField(Estimator):
    """Not a gradient estimator: the cost at the latent type's mean E_q[z] (`Latent.mean`), no sample.
    Given to every layer above, it makes a chain's cost the mean-field network of Gu et al. (2016,
    Sec. 3.3 and Fig. 1, "f-bar"): a deterministic pass that carries each layer's mean upwards."""

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator=None) -> EstimatorOutput:
        f = cost(latent.mean(logits))
        return EstimatorOutput(f, f)


class StochasticChain(nn.Module):
    """Base class of models with a chain of stochastic layers (see the module docstring)."""

    latent: Latent  # the lowest layer's
    upper: nn.ModuleList  # the `Layer`s above it, lowest first
    has_prior: bool  # whether the top layer has a prior to sample from (a VAE) or is conditional (an SBN)

    @property
    def latents(self) -> list[Latent]:
        """The stochastic layers' latent types, lowest first."""
        return [self.latent, *(layer.latent for layer in self.upper)]

    def uses_prior(self, level: int) -> bool:
        """Whether layer `level`'s latent prior is part of the model: the top layer's, in a model that
        has one (`has_prior`); a lower layer's prior is the layer above, an SBN has none."""
        return self.has_prior and level == len(self.upper)

    def describe(self) -> str:
        """The stochastic layers, lowest first, a prior named only where the model uses it."""
        return " / ".join(latent.describe(self.uses_prior(level)) for level, latent in enumerate(self.latents))

    def encode_above(self, level: int, z: Tensor) -> Tensor:
        """Layer level+1's logits from layer `level`'s samples.  # (..., *shape) -> (..., *shape above)"""
        return self.upper[level].encoder(self.latents[level].decoder_input(z))

    def terms(self, x: Tensor, estimators: Sequence[Estimator], logits: Tensor | None = None):  # pragma: no cover
        """Per example: (loss, value, analytic), `layer_terms` from the lowest layer given x.  # (B,) each"""
        raise NotImplementedError

    def local_cost(self, level: int, z: Tensor, context: Tensor) -> Tensor | float:  # pragma: no cover
        """The sampled cost local to layer `level`.  # z (*S, R', *shape), context (R, ...) -> (*S, R), or 0."""
        raise NotImplementedError

    def context_above(self, level: int, z: Tensor, context: Tensor, lead: tuple[int, ...]) -> Tensor:  # pragma: no cover
        """What layer level+1's cost needs, one row per row of z (R = prod(lead) * rows).
        # z (R, *shape), context (rows, ...) -> (R, ...)"""
        raise NotImplementedError

    def analytic(self, level: int, logits: Tensor) -> Tensor:  # pragma: no cover
        """The analytic part of layer `level`'s term given its parent.  # (R, *shape) -> (R,)"""
        raise NotImplementedError

    def weights(self, x: Tensor, drawn: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """(log w, -ELBO term) of draws through every layer (`sample_layers`), differentiable in the
        parameters with the draws held: log w the importance log-weight of each draw, the term the
        sampled part plus the analytic ones.  # x (B, D), z_l (S, B, ...) -> (S, B) each"""
        raise NotImplementedError

    # -- what every chain answers alike ----------------------------------------------------------------
    def objective(self, x: Tensor, estimator: Estimator | Sequence[Estimator], logits: Tensor | None = None) -> Objective:
        """The training objective: the estimators' surrogate of the sampled part plus the analytic part,
        batch means (a one-layer VAE: E_q[-log p(x|z)] plus the analytic KL, Kingma & Welling 2014,
        Eq. 7). Its `loss`'s gradient is the estimate; `neg_elbo` is the value it reports. `estimator`:
        one per stochastic layer (`layer_estimators`), or one for a model of one layer. `logits`
        (B, *param_shape), when given, stand for `encode(x)` (the diagnostics replicate them)."""
        estimators = self.as_estimators(estimator)
        if estimators[0].multi_sample:
            return self.multi_sample_objective(x, estimators[0], logits)
        loss, value, analytic = self.terms(x, estimators, logits)  # (B,) each
        return Objective(loss=(loss + analytic).mean(), neg_elbo=(value + analytic).mean(),
                         recon=value.mean(), kl=analytic.mean())

    def multi_sample_objective(self, x: Tensor, estimator: Estimator, logits: Tensor | None = None) -> Objective:
        """The training objective of a multi-sample estimator (VIMCO): m = `estimator.num_samples` draws
        through every layer per example, their log-weights and the proposal's log-density
        log q(h_j|x) = sum_l log q(h_j^l | h_j^(l-1)), both differentiable in the parameters with the
        draws held, and the estimator's surrogate of the negative m-sample bound (Burda et al. 2016,
        Eq. 8). `neg_elbo`, `recon` and `kl` are the ELBO's, averaged over the m draws, as the other
        estimators report them; `nll_iwae` is the bound being trained."""
        logits = self.encode(x) if logits is None else logits
        drawn = self.sample_layers(logits, estimator.num_samples)  # [(logits_l, z_l)], z_l (m, B, ...)
        log_w, term = self.weights(x, drawn)  # (m, B) each
        log_q = sum(latent.log_prob(up, z) for latent, (up, z) in zip(self.latents, drawn))  # (m, B)
        out = estimator.bound(log_w, log_q)  # (B,) each
        neg_elbo, kl = term.mean(), self.analytic(0, logits).mean()  # kl: layer 1's analytic term, as `objective`'s
        return Objective(loss=out.loss.mean(), neg_elbo=neg_elbo, recon=neg_elbo - kl, kl=kl, nll_iwae=out.value.mean())

    @torch.no_grad()
    def sample_terms(self, x: Tensor, logits: Tensor, num: int, generator: torch.Generator | None = None):
        """`num` draws through every stochastic layer per image: (log w, -ELBO term), each (num, B)
        (`weights`), for the evaluation's bounds.  # x (B, D), logits (B, *param_shape)"""
        return self.weights(x, self.sample_layers(logits, num, generator))

    def neg_elbo(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The bound at hard samples, one per stochastic layer (z1 ~ q(z1|x), then z2 ~ q(z2|z1), ...),
        with each layer's analytic term (a one-layer VAE: -log p(x|z) + KL).  # (B,)"""
        _, value, analytic = self.terms(x, [HardSample(generator)] * len(self.latents))
        return value + analytic

    def exact_nll(self, x: Tensor, max_rows: int) -> Tensor:  # pragma: no cover
        """The exact negative log-likelihood, summing over every configuration of every layer (the
        caller checks the budget: discrete_vae.evaluation.exact_nll).  # x (B, D) -> (B,)"""
        raise NotImplementedError

    def sample_layers(self, logits: Tensor, num: int, generator: torch.Generator | None = None):
        """`num` draws through every layer: [(logits_l, z_l)], lowest first; the lowest layer's logits are
        as given, those above are computed from the draws below.  # logits (B, ...) -> z_l (num, B, ...)"""
        z = self.latent.sample(logits, (num,), generator=generator)
        drawn = [(logits, z)]
        for level, layer in enumerate(self.upper):
            logits = self.encode_above(level, z)
            z = layer.latent.sample(logits, generator=generator)
            drawn.append((logits, z))
        return drawn

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
        if len({each.multi_sample for each in estimators}) > 1:
            raise ConfigError("a multi-sample estimator (VIMCO) estimates the m-sample bound of every layer at once: "
                              "give it to every stochastic layer or to none")
        if len(estimators) > 1:
            counts = self.layer_counts(estimators, rows=False)
            if math.prod(counts) > MAX_CHAIN_EVALUATIONS:
                raise ConfigError(
                    f"estimator {type(estimators[0]).__name__} on {len(counts)} stochastic layers evaluates the "
                    f"decoder {' x '.join(map(str, counts))} = {math.prod(counts):.4g} times per example, over "
                    f"{MAX_CHAIN_EVALUATIONS}; choose another estimator or smaller layers"
                )
        return estimators

    def layer_counts(self, estimators: Sequence[Estimator], rows: bool = True) -> list[int]:
        """Decoder evaluations per example of each layer's estimator (`rows`: the most in one call,
        `decoder_rows`), whose product is the chain's: each draw of a layer's estimator runs the layers
        above. A multi-sample estimator draws its m samples through every layer at once: [m]."""
        count = (lambda e, latent: e.decoder_rows(latent)) if rows else (lambda e, latent: e.decoder_evaluations(latent))
        if estimators[0].multi_sample:
            return [count(estimators[0], self.latent)]
        return [count(each, latent) for each, latent in zip(estimators, self.latents)]

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

        shape = latent.event_shape  # of a sample: what the layers above and the local cost see

        def above(z: Tensor, upper: Sequence[Estimator] = estimators) -> Tensor:  # (*S, R, *shape) -> (*S, R)
            # the layers above, given z, each run by its estimator in `upper`
            lead = tuple(z.shape[: z.dim() - len(shape) - 1])
            z = z.reshape(-1, *shape)  # every (sample, row) its own draws above
            loss, _, analytic = self.layer_terms(
                level + 1, self.encode_above(level, z), self.context_above(level, z, context, lead), upper
            )
            return (loss + analytic).reshape(*lead, rows)

        def cost(z: Tensor, upper: Sequence[Estimator] = estimators) -> Tensor:  # (*S, R', *shape) -> (*S, R)
            here = self.local_cost(level, z, context)
            if level + 1 == len(self.latents):
                return here
            lead = tuple(z.shape[: z.dim() - len(shape)])[:-1]  # (*S)
            z = z.expand(*lead, rows, *shape)  # a configuration shared by the batch: one per row
            if upper is not estimators:  # the mean-field network above (`cost.mean_field`)
                return here + above(z, upper)
            if not (estimators[level].shares_noise_above and len(lead) == 1):
                return here + above(z)
            # the layers above draw the same noise for each of the S evaluations (REBAR's f(b),
            # f(sigma(z)), f(sigma(z~))): common random numbers, the papers' multi-layer form
            with common_random_numbers(z.device) as again:
                parts = [again() or above(z[i]) for i in range(lead[0])]
            return here + torch.stack(parts)

        def mean_field(z: Tensor) -> Tensor:  # (*S, R', *shape) -> (*S, R): the cost, every layer above at its mean
            missing = [f"{lvl + 1} ({type(each).__name__})" for lvl, each in enumerate(self.latents)
                       if lvl > level and not each.has_mean]
            if missing:
                raise ConfigError(f"the mean-field network needs every layer above to have a mean; "
                                  f"layer(s) {', '.join(missing)} have none; set estimator.above=sampled")
            return cost(z, [MeanField()] * len(self.latents))

        cost.mean_field = mean_field  # Gu et al.'s f-bar, for MuProp (`above="mean_field"`)
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


def chunk_size(batch: int, max_rows: int) -> int:
    """Samples or configurations per chunk so that a chunk holds at most `max_rows` (sample, example) rows."""
    if max_rows < 1:
        raise ConfigError(f"max_rows must be a positive integer, got {max_rows}")
    return max(1, max_rows // max(batch, 1))


def expand_rows(context: Tensor, lead: tuple[int, ...]) -> Tensor:
    """A per-row tensor repeated for each of the leading sample dims, flattened as `layer_terms`
    flattens the samples.  # (rows, ...) -> (prod(lead) * rows, ...)"""
    return context.expand(*lead, *context.shape).reshape(-1, *context.shape[1:])

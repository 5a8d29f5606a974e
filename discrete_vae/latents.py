"""Latent types: what z is, under the encoder's parameters and under the prior.

The models (discrete_vae.vae, discrete_vae.sbn) and the estimators (discrete_vae.estimators)
never assume a shape of z: they ask the latent type. One latent type is one class (with one YAML
file in conf/latent/); it owns
- `param_shape`: the shape of the encoder's output per example, e.g. (N, K) logits;
- `event_shape`: the shape of one example's sample z (the parameters' shape unless the type says
  otherwise), and `decoder_input` / `decoder_dim`, z flattened for a network and its width;
- `sample` / `log_prob`: z ~ q(z|x), and log q(z|x) summed over the latents (noise comes from
  discrete_vae.sampling, the one place it is drawn, from the `generator` given or torch's own);
- `kl` / `entropy` / `prior_log_prob` / `prior_sample`: the prior p(z), with the analytic KL(q || p).

Beyond that contract a type offers what it can, declared as class attributes in the manner of
torch.distributions (`has_rsample`, `has_enumerate_support`); the estimators state what they
need of these (`Estimator.needs`) and are matched against them, never against a type's name:
- `has_enumerate_support`: `num_configs` / `enumerate`, every z in a fixed order (exact
  enumeration, exact likelihoods);
- `has_relaxation`: `perturb` / `harden` / `soften`, reparameterised noisy logits whose `harden`
  is an exact sample, and their relaxation at a temperature (Gumbel-Softmax, REBAR, RELAX);
  from them the base class derives `relaxed_sample`;
- `has_straight_through`: `straight_through_sample`, an exact sample with the gradient of the
  noise-free relaxation `soften(logits, tau)` (straight-through);
- `has_conditional_noise`: `conditional_perturb`, the noisy logits given the sample (Gumbel-Rao,
  REBAR, RELAX);
- `has_categorical_view`: `categorical_view` / `from_categorical` / `categorical_shape`, the
  latents as categorical variables (ReinMax, GST, ZGR, IndeCateR); a bit is two categories;
- `has_binary_view`: `binary_view` / `from_binary`, the latents as independent bits with logits
  (the antithetic pairs of ARM and DisARM);
- `has_mean`: `mean`, E_q[z] in the space of the samples, at which a cost can be evaluated and
  differentiated (MuProp's Taylor expansion).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from discrete_vae import sampling
from discrete_vae.errors import ConfigError, require_number

Size = tuple[int, ...] | torch.Size

# the capabilities a latent type may declare (class attributes), as an estimator's refusal names them
CAPABILITIES = {
    "has_enumerate_support": "finite support (num_configs, enumerate)",
    "has_relaxation": "a relaxation with a temperature (perturb, harden, soften)",
    "has_straight_through": "a straight-through sample (straight_through_sample)",
    "has_conditional_noise": "noise conditioned on the sample (conditional_perturb)",
    "has_categorical_view": "a categorical view (categorical_view, from_categorical)",
    "has_binary_view": "a binary view (binary_view, from_binary)",
    "has_mean": "a mean E_q[z] that the cost can be evaluated at (mean)",
}


class Latent(nn.Module):
    """Base class of latent types. An nn.Module so that a learned prior's parameters, if a type has
    them, train and checkpoint with the model. Shapes: logits (*S, B, *param_shape), z (*S, B, *event_shape)."""

    name: str = ""  # for messages and tables
    # capabilities (see the module docstring and CAPABILITIES): what the type offers beyond the contract
    has_enumerate_support: bool = False
    has_relaxation: bool = False
    has_straight_through: bool = False
    has_conditional_noise: bool = False
    has_categorical_view: bool = False
    has_binary_view: bool = False
    has_mean: bool = False

    @property
    def param_shape(self) -> tuple[int, ...]:  # pragma: no cover - every type defines it
        raise NotImplementedError

    @property
    def event_shape(self) -> tuple[int, ...]:
        """The shape of one example's sample z; the parameters' shape unless the type says otherwise."""
        return self.param_shape

    @property
    def decoder_dim(self) -> int:
        """The width of `decoder_input(z)`."""
        return math.prod(self.event_shape)

    def decoder_input(self, z: Tensor) -> Tensor:
        """z as a network receives it: the example's dims flattened.  # (..., *event_shape) -> (..., D_z)"""
        return z.flatten(-len(self.event_shape))

    def sample(self, logits: Tensor, sample_shape: Size = (), generator=None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def log_prob(self, logits: Tensor, z: Tensor) -> Tensor:  # pragma: no cover
        """log q(z|x), summed over the example's latents.  # -> (...)"""
        raise NotImplementedError

    def kl(self, logits: Tensor) -> Tensor:  # pragma: no cover
        """KL(q(z|x) || p(z)), analytic.  # (B, *param_shape) -> (B,)"""
        raise NotImplementedError

    def entropy(self, logits: Tensor) -> Tensor:  # pragma: no cover
        """H(q(z|x)) = -E_q[log q(z|x)], analytic, summed over the latents.  # (B, *param_shape) -> (B,)"""
        raise NotImplementedError

    def prior_log_prob(self, z: Tensor) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def prior_sample(self, num: int, generator=None, device=None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def num_configs(self) -> int:  # pragma: no cover
        """How many distinct z there are (for exact enumeration)."""
        raise NotImplementedError

    def enumerate(self, start: int = 0, end: int | None = None, *, device=None, dtype=torch.float32) -> Tensor:  # pragma: no cover
        """Configurations [start, end) of the `num_configs`, in a fixed order.  # (C, *event_shape)"""
        raise NotImplementedError

    def relaxed_sample(self, logits: Tensor, tau, hard: bool = False, generator=None) -> Tensor:
        """The reparameterised relaxation soften(perturb(logits), tau) (Gumbel-Softmax, Jang et al. 2017,
        Eq. 1; the binary Concrete on bits, Maddison et al. 2017, Sec. 3.3); with `hard`, forward the
        exact sample harden(z) and backward through the relaxation, the same noise (Jang et al., Sec. 2.2)."""
        z = self.perturb(logits, generator=generator)  # (B, *param_shape)
        soft = self.soften(z, tau)
        return sampling.straight_through(self.harden(z), soft) if hard else soft

    def straight_through_sample(self, logits: Tensor, tau, generator=None) -> Tensor:
        """Forward an exact sample, backward through the noise-free relaxation soften(logits, tau)
        (Bengio et al. 2013; "ST" in Jang et al. 2017, Sec. 4).  # (B, *event_shape)"""
        return sampling.straight_through(self.sample(logits, generator=generator), self.soften(logits, tau))

    def perturb(self, logits: Tensor, sample_shape: Size = (), generator=None) -> Tensor:  # pragma: no cover
        """Reparameterised noisy logits z (logits + noise, differentiable in logits) whose `harden` is an
        exact sample of q(z|x).  # (*S, B, *param_shape)"""
        raise NotImplementedError

    def harden(self, z: Tensor) -> Tensor:  # pragma: no cover
        """The sample that noisy logits z stand for (argmax or sign), no gradient.  # (..., *param_shape) -> (..., *event_shape)"""
        raise NotImplementedError

    def conditional_perturb(self, logits: Tensor, hard: Tensor, sample_shape: Size = (), generator=None) -> Tensor:  # pragma: no cover
        """Noisy logits drawn given `harden(z) = hard`, reparameterised (REBAR's z~).  # (*S, B, *param_shape)"""
        raise NotImplementedError

    def soften(self, z: Tensor, tau) -> Tensor:  # pragma: no cover
        """The relaxation of noisy logits at temperature tau, what the decoder receives in place of a sample.
        # (..., *param_shape) -> (..., *event_shape)"""
        raise NotImplementedError

    @property
    def categorical_shape(self) -> tuple[int, int]:  # pragma: no cover
        """(N, K) of `categorical_view`."""
        raise NotImplementedError

    def categorical_view(self, logits: Tensor) -> Tensor:  # pragma: no cover
        """The latents' logits as N categorical variables of K categories.  # (..., *param_shape) -> (..., N, K)"""
        raise NotImplementedError

    def from_categorical(self, one_hot: Tensor) -> Tensor:  # pragma: no cover
        """A one-hot sample of `categorical_view` as this type's z, gradients passed through.  # (..., N, K) -> (..., *event_shape)"""
        raise NotImplementedError

    def mean(self, logits: Tensor) -> Tensor:  # pragma: no cover
        """E_q[z], differentiable in the logits.  # (..., *param_shape) -> (..., *event_shape)"""
        raise NotImplementedError

    def binary_view(self, logits: Tensor) -> Tensor:  # pragma: no cover
        """The latents' parameters as the logits of independent bits.  # (..., *param_shape) -> (..., N)"""
        raise NotImplementedError

    def from_binary(self, bits: Tensor) -> Tensor:  # pragma: no cover
        """A sample of `binary_view` (0./1.) as this type's z.  # (..., N) -> (..., *event_shape)"""
        raise NotImplementedError

    def describe(self, with_prior: bool = True) -> str:
        """One line for messages and tables; `with_prior=False` for a layer whose prior the model
        does not use (a lower layer drawn given the one above, an SBN's layers)."""
        return f"{self.name} {self.param_shape}"


class Categorical(Latent):
    """N independent categorical latents of K categories, one-hot, under a uniform prior
    (Jang et al. 2017, Sec. 4.2: N = 20, K = 10). The encoder gives logits (N, K).

    KL(q || Uniform) = sum_n sum_k q_nk log q_nk + N log K (analytic; Jang et al. 2017, App.);
    log p(z) = -N log K for every z.
    """

    name = "categorical"
    has_enumerate_support = has_relaxation = has_straight_through = has_conditional_noise = True
    has_categorical_view = has_mean = True

    def __init__(self, num_latents: int = 20, num_categories: int = 10):
        super().__init__()
        self.num_latents = int(require_number("latent.num_latents", num_latents, positive=True, integer=True))
        self.num_categories = int(require_number("latent.num_categories", num_categories, low=2, integer=True,
                                                 hint="a categorical latent needs at least 2 categories"))

    @property
    def param_shape(self) -> tuple[int, int]:
        return (self.num_latents, self.num_categories)

    def sample(self, logits: Tensor, sample_shape: Size = (), generator=None) -> Tensor:
        return sampling.gumbel_max(logits, sample_shape, generator)  # (*S, B, N, K) one-hot

    def log_prob(self, logits: Tensor, z: Tensor) -> Tensor:
        return sampling.log_prob_categorical(logits, z)

    def kl(self, logits: Tensor) -> Tensor:
        log_q = torch.log_softmax(logits, dim=-1)  # (B, N, K)
        return (log_q.exp() * log_q).sum(dim=(-2, -1)) + self.num_latents * math.log(self.num_categories)

    def entropy(self, logits: Tensor) -> Tensor:
        log_q = torch.log_softmax(logits, dim=-1)  # (..., N, K)
        return -(log_q.exp() * log_q).sum(dim=(-2, -1))

    def prior_log_prob(self, z: Tensor) -> Tensor:
        return z.new_full(z.shape[:-2], -self.num_latents * math.log(self.num_categories))

    def prior_sample(self, num: int, generator=None, device=None) -> Tensor:
        return sampling.gumbel_max(torch.zeros(num, *self.param_shape, device=device), generator=generator)

    @property
    def num_configs(self) -> int:
        return self.num_categories**self.num_latents

    def enumerate(self, start: int = 0, end: int | None = None, *, device=None, dtype=torch.float32) -> Tensor:
        return sampling.enumerate_one_hot(self.num_latents, self.num_categories, start, end, device=device, dtype=dtype)

    def perturb(self, logits: Tensor, sample_shape: Size = (), generator=None) -> Tensor:
        return sampling.gumbel_scores(logits, sample_shape, generator)  # logits + Gumbel

    def harden(self, z: Tensor) -> Tensor:
        return sampling.one_hot_argmax(z.detach())

    def conditional_perturb(self, logits: Tensor, hard: Tensor, sample_shape: Size = (), generator=None) -> Tensor:
        return sampling.conditional_gumbel_scores(logits, hard, sample_shape, generator)

    def soften(self, z: Tensor, tau) -> Tensor:
        return torch.softmax(z / tau, dim=-1)  # Jang et al. 2017, Eq. 1

    @property
    def categorical_shape(self) -> tuple[int, int]:
        return self.param_shape

    def categorical_view(self, logits: Tensor) -> Tensor:
        return logits

    def from_categorical(self, one_hot: Tensor) -> Tensor:
        return one_hot

    def mean(self, logits: Tensor) -> Tensor:
        return torch.softmax(logits, dim=-1)  # E[one-hot z] = the probabilities

    def describe(self, with_prior: bool = True) -> str:
        return f"N={self.num_latents} categorical latents of K={self.num_categories}"


class Bernoulli(Latent):
    """N independent binary units z_n in {0, 1}, q(z_n = 1 | x) = sigmoid(phi_n): the latent of
    the binary-latent literature (Jang et al. 2017's "VAE Bern.", REBAR, RELAX, ARM, DisARM: N = 200).
    The encoder gives logits (N,).

    Prior: `uniform` (p = 1/2), or `learned`, a factorised Bernoulli whose logits eta train with the
    model (as in the DisARM code). Analytic KL per unit, in log space:
        KL = q (log q - log p) + (1 - q) (log(1 - q) - log(1 - p)),  log q = logsigmoid(phi), ...
    """

    name = "bernoulli"
    has_enumerate_support = has_relaxation = has_straight_through = has_conditional_noise = True
    has_categorical_view = has_binary_view = has_mean = True
    PRIORS = ("uniform", "learned")

    def __init__(self, num_latents: int = 200, prior: str = "uniform"):
        super().__init__()
        self.num_latents = int(require_number("latent.num_latents", num_latents, positive=True, integer=True))
        if prior not in self.PRIORS:
            raise ConfigError(f"latent.prior={prior!r} is not one of {', '.join(self.PRIORS)}")
        self.prior = prior
        if prior == "learned":
            self.prior_logits = nn.Parameter(torch.zeros(self.num_latents))  # (N,), trained with the model
        else:
            self.register_buffer("prior_logits", torch.zeros(self.num_latents), persistent=False)

    @property
    def param_shape(self) -> tuple[int]:
        return (self.num_latents,)

    def sample(self, logits: Tensor, sample_shape: Size = (), generator=None) -> Tensor:
        return sampling.bernoulli(logits, sample_shape, generator)  # (*S, B, N) of 0./1.

    def log_prob(self, logits: Tensor, z: Tensor) -> Tensor:
        logits, z = torch.broadcast_tensors(logits, z)
        return -F.binary_cross_entropy_with_logits(logits, z, reduction="none").sum(-1)

    def kl(self, logits: Tensor) -> Tensor:
        q = torch.sigmoid(logits)  # (B, N)
        eta = self.prior_logits.to(logits)
        on = F.logsigmoid(logits) - F.logsigmoid(eta)  # log q - log p
        off = F.logsigmoid(-logits) - F.logsigmoid(-eta)  # log(1 - q) - log(1 - p)
        return (q * on + (1 - q) * off).sum(-1)

    def entropy(self, logits: Tensor) -> Tensor:
        q = torch.sigmoid(logits)  # (..., N)
        return -(q * F.logsigmoid(logits) + (1 - q) * F.logsigmoid(-logits)).sum(-1)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        return self.log_prob(self.prior_logits.to(z), z)

    def prior_sample(self, num: int, generator=None, device=None) -> Tensor:
        return sampling.bernoulli(self.prior_logits.detach().to(device).expand(num, -1), generator=generator)

    @property
    def num_configs(self) -> int:
        return 2**self.num_latents

    def enumerate(self, start: int = 0, end: int | None = None, *, device=None, dtype=torch.float32) -> Tensor:
        return sampling.enumerate_bits(self.num_latents, start, end, device=device, dtype=dtype)

    def perturb(self, logits: Tensor, sample_shape: Size = (), generator=None) -> Tensor:
        return sampling.logistic_scores(logits, sample_shape, generator)  # phi + logistic

    def harden(self, z: Tensor) -> Tensor:
        return (z.detach() > 0).to(z.dtype)

    def conditional_perturb(self, logits: Tensor, hard: Tensor, sample_shape: Size = (), generator=None) -> Tensor:
        return sampling.conditional_logistic_scores(logits, hard, sample_shape, generator)

    def soften(self, z: Tensor, tau) -> Tensor:
        return torch.sigmoid(z / tau)  # the binary Concrete, Maddison et al. 2017, Sec. 3.3

    @property
    def categorical_shape(self) -> tuple[int, int]:
        return (self.num_latents, 2)

    def categorical_view(self, logits: Tensor) -> Tensor:
        """Bit n as two categories {0, 1} with logits (0, phi_n): softmax gives (1 - sigmoid(phi), sigmoid(phi))."""
        return torch.stack([torch.zeros_like(logits), logits], dim=-1)  # (..., N, 2)

    def from_categorical(self, one_hot: Tensor) -> Tensor:
        return one_hot[..., 1]  # (..., N): the bit, and the gradient of its "1" category

    def binary_view(self, logits: Tensor) -> Tensor:
        return logits

    def from_binary(self, bits: Tensor) -> Tensor:
        return bits

    def mean(self, logits: Tensor) -> Tensor:
        return torch.sigmoid(logits)

    def describe(self, with_prior: bool = True) -> str:
        return f"N={self.num_latents} Bernoulli latents" + (f" ({self.prior} prior)" if with_prior else "")

"""The one place where latent noise is drawn.

Every estimator gets its randomness from the functions below, so that the
numerics of Gumbel noise (clamped uniforms, log space) are written once and
tested once. Shapes follow torch.distributions: `logits` is (..., K) with the
categories last, and `sample_shape` is prepended to the result, as in
`Distribution.rsample(sample_shape)`. Every function takes an optional
`generator` so that callers (for example the gradient diagnostics) can draw
without touching the global RNG stream.

References
- Gumbel (1954); Maddison, Tarlow & Minka (2014), "A* sampling": Gumbel-max.
- Jang, Gu & Poole (2017), "Categorical Reparameterization with Gumbel-Softmax".
- Maddison, Mnih & Teh (2017), "The Concrete Distribution".
- Paulus, Maddison & Krause (2021), "Rao-Blackwellizing the Straight-Through
  Gumbel-Softmax Gradient Estimator" (conditional Gumbel noise).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Size = tuple[int, ...] | torch.Size


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys, e.g. (run seed, step, rank): independent streams for
    different keys (numpy's SeedSequence hashing), the same stream for the same keys. Makes the
    noise of a step, the order of an epoch or the noise of an evaluation batch a pure function
    of where it is, which is what lets a resumed or sharded run draw exactly the same."""
    import numpy as np

    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def clamp_unit(u: torch.Tensor) -> torch.Tensor:
    """Clamp uniforms into [tiny, 1 - eps/2], the closed range where -log(-log u) is finite.

    For float32 that is [1.2e-38, 1 - 2**-24], giving Gumbel noise in [-4.47, 16.6].
    """
    finfo = torch.finfo(u.dtype)
    return u.clamp(min=finfo.tiny, max=1.0 - finfo.eps / 2)


def uniform(shape: Size, *, device=None, dtype=torch.float32, generator=None) -> torch.Tensor:
    """Clamped U(0, 1) draws of the given shape (see `clamp_unit`)."""
    u = torch.rand(shape, device=device, dtype=dtype, generator=generator)
    return clamp_unit(u)


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF of the standard Gumbel: g = -log(-log u), finite for every u in [0, 1]."""
    return -torch.log(-torch.log(clamp_unit(u)))


def gumbel(shape: Size, *, device=None, dtype=torch.float32, generator=None) -> torch.Tensor:
    """Standard Gumbel(0, 1) noise, CDF exp(-exp(-g)) (Jang et al. 2017, Sec. 2)."""
    return gumbel_from_uniform(uniform(shape, device=device, dtype=dtype, generator=generator))


def _gumbel_like(logits: torch.Tensor, sample_shape: Size, generator) -> torch.Tensor:
    shape = torch.Size(sample_shape) + logits.shape
    return gumbel(shape, device=logits.device, dtype=logits.dtype, generator=generator)


def one_hot_argmax(scores: torch.Tensor) -> torch.Tensor:
    """One-hot of argmax over the last dim, in the dtype of `scores`.  # (..., K) -> (..., K)"""
    index = scores.argmax(dim=-1, keepdim=True)
    return torch.zeros_like(scores).scatter_(-1, index, 1.0)


def gumbel_max(logits: torch.Tensor, sample_shape: Size = (), generator=None) -> torch.Tensor:
    """Exact categorical sample as a one-hot: onehot(argmax_k(logits_k + g_k)), g ~ Gumbel(0, 1).

    Gumbel-max trick (Gumbel 1954; Maddison et al. 2014; Jang et al. 2017, Sec. 2):
    argmax(logits + g) ~ Cat(softmax(logits)). No gradient flows through it.
    """
    with torch.no_grad():
        return one_hot_argmax(gumbel_scores(logits, sample_shape, generator))


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Forward `hard` exactly, backward the gradient of `soft` (Bengio et al. 2013; Jang et al. 2017, Sec. 2.2).

    Written as hard + (soft - soft.detach()): the bracket is exactly zero in floating
    point, so the forward value is bit-for-bit `hard` (hard - soft.detach() + soft is not).
    """
    return hard + (soft - soft.detach())


def gumbel_softmax(
    logits: torch.Tensor,
    tau: float | torch.Tensor,
    sample_shape: Size = (),
    hard: bool = False,
    generator=None,
) -> torch.Tensor:
    """Gumbel-Softmax / Concrete sample y = softmax((logits + g) / tau) (Jang et al. 2017, Eq. 1;
    Maddison et al. 2017, Eq. 10). Differentiable in `logits` (an `rsample`).

    With `hard=True`, the straight-through Gumbel-Softmax (Jang et al. 2017, Sec. 2.2):
    forward onehot(argmax(logits + g)), backward through the soft sample, same noise g.
    """
    perturbed = gumbel_scores(logits, sample_shape, generator)  # (*S, ..., K)
    soft = torch.softmax(perturbed / tau, dim=-1)
    if not hard:
        return soft
    return straight_through(one_hot_argmax(perturbed.detach()), soft)


def categorical_straight_through(
    logits: torch.Tensor, tau: float | torch.Tensor, sample_shape: Size = (), generator=None
) -> torch.Tensor:
    """Straight-through categorical sample (Bengio et al. 2013; Jang et al. 2017, Sec. 2.2 / Sec. 4 "ST"):
    forward D ~ Cat(softmax(logits)), backward through softmax(logits / tau), no noise in the backward.
    """
    hard = gumbel_max(logits, sample_shape, generator)  # (*S, ..., K)
    return straight_through(hard, torch.softmax(logits / tau, dim=-1))


def conditional_gumbel_scores(
    logits: torch.Tensor, hard: torch.Tensor, sample_shape: Size = (), generator=None
) -> torch.Tensor:
    """Perturbed logits z = logits + g drawn given argmax(z) = D, reparameterised: differentiable in
    `logits` for fixed uniforms (REBAR's z~, Tucker et al. 2017, App. C; Paulus et al. 2021, App. A;
    construction of ../shared/seeds/000, "Gumbel-Max Trick Inference").

    With a = softmax(logits), uniforms v and winner k (D = onehot(k)):
        u_k = v_k ** a_k,   u_j = v_k ** a_j * v_j  (j != k),   g = -log(-log u).
    In log space, with exponentials E = -log v:
        -log u_k = a_k E_k, -log u_j = a_j E_k + E_j, so the perturbed scores are
        z_k = lse(logits) - log E_k                                       (the winner)
        z_j = z_k - softplus(log E_j - log a_j - log E_k) < z_k            (the others)
    which has no cancellation even for a_k = 1e-30.

    Floating point: the gap z_k - z_j is kept at least a few ulps of the operands, so that
    argmax(z) == D holds exactly after rounding; this moves probability mass of order 1e-7
    and nothing else.  # (*S, ..., K)
    """
    dtype, device = logits.dtype, logits.device
    shape = torch.Size(sample_shape) + logits.shape
    log_p = torch.log_softmax(logits, dim=-1)  # (..., K)
    log_E = torch.log(-torch.log(uniform(shape, device=device, dtype=dtype, generator=generator)))
    winner = hard.to(dtype).expand(shape)  # (*S, ..., K)
    log_E_win = (log_E * winner).sum(-1, keepdim=True)  # (*S, ..., 1)
    top = torch.logsumexp(logits, dim=-1, keepdim=True) - log_E_win  # winner's score z_k
    gap = F.softplus(log_E - log_p - log_E_win)  # z_k - z_j for j != k
    eps = torch.finfo(dtype).eps
    margin = 8 * eps * (top.abs() + logits.abs().amax(-1, keepdim=True) + 1.0).detach()
    return top - torch.where(winner.bool(), torch.zeros_like(gap), gap.clamp_min(margin))


@torch.no_grad()
def conditional_gumbel(
    logits: torch.Tensor, hard: torch.Tensor, sample_shape: Size = (), generator=None
) -> torch.Tensor:
    """Gumbel noise e ~ p(g | argmax(logits + g) = D), the draw Gumbel-Rao needs (Paulus et al.
    2021, Sec. 3): e = `conditional_gumbel_scores` - logits, with no gradient (a constant for
    autograd).  # (*S, ..., K)"""
    return conditional_gumbel_scores(logits, hard, sample_shape, generator) - logits


def enumerate_one_hot(
    num_latents: int,
    num_categories: int,
    start: int = 0,
    end: int | None = None,
    *,
    device=None,
    dtype=torch.float32,
) -> torch.Tensor:
    """All K**N joint one-hot configurations (or the slice [start, end) of them),
    in lexicographic order (the last latent varies fastest).  # (C, N, K)

    Configuration c has digits c // K**(N-1-n) % K, so chunks can be made without
    building the whole table, which keeps exact enumeration's memory bounded.
    """
    total = num_categories**num_latents
    end = total if end is None else min(end, total)
    index = torch.arange(start, end, device=device)  # (C,)
    powers = num_categories ** torch.arange(num_latents - 1, -1, -1, device=device)  # (N,)
    digits = (index[:, None] // powers) % num_categories  # (C, N)
    return F.one_hot(digits, num_categories).to(dtype)


def other_categories(z: torch.Tensor) -> torch.Tensor:
    """For each latent of one-hot `z`, the K - 1 categories it does not take, in increasing
    order.  # (..., N, K) -> (..., N, K-1) int64

    Category j' of the K - 1 is j' + [j' >= k], k the latent's own category.
    """
    K = z.shape[-1]
    own = z.argmax(-1, keepdim=True)  # (..., N, 1)
    rank = torch.arange(K - 1, device=z.device).expand(*z.shape[:-1], K - 1)  # (..., N, K-1)
    return rank + (rank >= own).long()


def one_latent_changes(z: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
    """Copies of the one-hot samples z (S, ..., N, K) with exactly one latent moved to another
    category: change c = (s, n, j') of the S * N * (K - 1) in lexicographic order (j' fastest)
    is z[s] with latent n set to the j'-th of its `other_categories`. Only the slice
    [start, end) is built, so callers can evaluate the changes in bounded chunks.  # (C, ..., N, K)

    These are the configurations z^{n <- k} (k != z_n) of IndeCateR (De Smet et al. 2023);
    the change k = z_n is z itself. No noise is drawn here.
    """
    S, N, K = z.shape[0], z.shape[-2], z.shape[-1]
    total = S * N * (K - 1)
    end = total if end is None else min(end, total)
    c = torch.arange(start, end, device=z.device)  # (C,)
    s, n, j = c // (N * (K - 1)), (c // (K - 1)) % N, c % (K - 1)
    base = z[s]  # (C, ..., N, K)
    batch_dims = base.dim() - 3
    others = other_categories(base)  # (C, ..., N, K-1)
    n_view = n.view(-1, *([1] * batch_dims), 1, 1)  # (C, 1.., 1, 1)
    target = others.gather(-2, n_view.expand(*others.shape[:-2], 1, K - 1))  # (C, ..., 1, K-1)
    target = target.gather(-1, j.view(-1, *([1] * batch_dims), 1, 1).expand(*target.shape[:-1], 1))  # (C, ..., 1, 1)
    new_row = F.one_hot(target.squeeze(-1), K).to(z.dtype)  # (C, ..., 1, K)
    latent = F.one_hot(n, N).to(torch.bool).view(-1, *([1] * batch_dims), N, 1)  # (C, 1.., N, 1)
    return torch.where(latent, new_row, base)


def log_prob_categorical(logits: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """log Cat(z; softmax(logits)) of one-hot z, summed over the N latents.  # (..., N, K) -> (...)"""
    return (z * torch.log_softmax(logits, dim=-1)).sum(dim=(-2, -1))


def concrete_log_prob(value: torch.Tensor, logits: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Log-density of the Concrete / Gumbel-Softmax distribution at a point of the simplex.  # (..., K) -> (...)

    Jang et al. 2017, Eq. 2; Maddison et al. 2017, Definition 1:
        p(y) = Gamma(K) tau^(K-1) (sum_i pi_i / y_i^tau)^(-K) prod_i pi_i / y_i^(tau + 1),
    computed in log space:
        log Gamma(K) + (K-1) log tau + sum_i (logits_i - (tau+1) log y_i) - K lse_i(logits_i - tau log y_i).
    Invariant to adding a constant to the logits. Equals the density of
    torch.distributions.RelaxedOneHotCategorical(tau, logits=logits).
    """
    K = value.shape[-1]
    tau = torch.as_tensor(tau, dtype=value.dtype, device=value.device)
    log_y = torch.log(value.clamp_min(torch.finfo(value.dtype).tiny))
    return (
        math.lgamma(K)
        + (K - 1) * torch.log(tau)
        + (logits - (tau + 1) * log_y).sum(-1)
        - K * torch.logsumexp(logits - tau * log_y, dim=-1)
    )


# -- binary latents ------------------------------------------------------------------------------
def logistic_from_uniform(u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF of the standard logistic: L = log u - log(1 - u), finite for every u in [0, 1]
    (clamped as `clamp_unit`). The binary analogue of Gumbel noise: sigma(phi + L) is the binary
    Concrete (Maddison et al. 2017, Sec. 3.3; Jang et al. 2017's Bernoulli case)."""
    u = clamp_unit(u)
    return torch.log(u) - torch.log1p(-u)


def _logistic_like(logits: torch.Tensor, sample_shape: Size, generator) -> torch.Tensor:
    shape = torch.Size(sample_shape) + logits.shape
    return logistic_from_uniform(uniform(shape, device=logits.device, dtype=logits.dtype, generator=generator))


def bernoulli(logits: torch.Tensor, sample_shape: Size = (), generator=None) -> torch.Tensor:
    """Exact Bernoulli(sigmoid(logits)) sample, as 0./1. in the dtype of `logits`: 1[logits + L > 0],
    L standard logistic (P(L > -phi) = sigmoid(phi)). No gradient flows through it."""
    with torch.no_grad():
        return (logistic_scores(logits, sample_shape, generator) > 0).to(logits.dtype)


def antithetic_bernoulli(logits: torch.Tensor, sample_shape: Size = (), generator=None):
    """The antithetic pair of ARM and DisARM from one uniform u per unit (Yin & Zhou 2019, Eq. 5;
    Dong et al. 2020, Sec. 3): b = 1[u > sigmoid(-phi)] and b~ = 1[u < sigmoid(phi)], written in log
    space with L = logit(u) as b = 1[phi + L > 0], b~ = 1[phi - L > 0]. Each is Bernoulli(sigmoid(phi));
    they differ only where |L| > |phi|. Returns (b, b~, u), no gradient.  # each (*S, ..., N)"""
    with torch.no_grad():
        shape = torch.Size(sample_shape) + logits.shape
        u = uniform(shape, device=logits.device, dtype=logits.dtype, generator=generator)
        noise = logistic_from_uniform(u)
        return (logits + noise > 0).to(logits.dtype), (logits - noise > 0).to(logits.dtype), u


def enumerate_bits(num_latents: int, start: int = 0, end: int | None = None, *, device=None,
                   dtype=torch.float32) -> torch.Tensor:
    """All 2**N binary configurations (or the slice [start, end) of them), the last unit fastest.  # (C, N)"""
    total = 2**num_latents
    end = total if end is None else min(end, total)
    index = torch.arange(start, end, device=device)  # (C,)
    shifts = torch.arange(num_latents - 1, -1, -1, device=device)  # (N,)
    return ((index[:, None] >> shifts) & 1).to(dtype)


def conditional_logistic_scores(
    logits: torch.Tensor, bits: torch.Tensor, sample_shape: Size = (), generator=None
) -> torch.Tensor:
    """Perturbed logits z = phi + L, L standard logistic, drawn given the bit b = 1[z > 0],
    reparameterised: differentiable in `logits` for a fixed uniform v (the binary z~ of REBAR,
    Tucker et al. 2017, Sec. 3 and App. C; the conditional noise of Gumbel-Rao on bits).

    z > 0 iff u > 1 - p for z = phi + logit(u), p = sigmoid(phi); so given b = 1, u = 1 - v p and
    given b = 0, u = v (1 - p). In log space, with s = 2b - 1 (p_s = sigmoid(s phi)):
        z = s (softplus(s phi) - log v + log1p(-v p_s)),
    finite for every clamped v; s z is kept positive (a few ulps at v -> 1), so 1[z > 0] == b
    holds exactly.  # (*S, ..., N)"""
    shape = torch.Size(sample_shape) + logits.shape
    v = uniform(shape, device=logits.device, dtype=logits.dtype, generator=generator)
    sign = 2.0 * bits.to(logits.dtype) - 1.0  # (..., N) +1 or -1
    signed = sign * logits
    magnitude = F.softplus(signed) - torch.log(v) + torch.log1p(-v * torch.sigmoid(signed))
    return sign * magnitude.clamp_min(torch.finfo(logits.dtype).tiny)


def logistic_scores(logits: torch.Tensor, sample_shape: Size = (), generator=None) -> torch.Tensor:
    """Perturbed logits z = phi + L, L standard logistic, reparameterised: 1[z > 0] ~ Bernoulli(sigmoid(phi))
    (the binary analogue of logits + Gumbel; Maddison et al. 2017, Sec. 3.3).  # (*S, ..., N)"""
    return logits + _logistic_like(logits, sample_shape, generator)


def gumbel_scores(logits: torch.Tensor, sample_shape: Size = (), generator=None) -> torch.Tensor:
    """Perturbed logits z = logits + g, g ~ Gumbel(0, 1), reparameterised: argmax(z) ~ Cat(softmax(logits))
    (Gumbel-max; Jang et al. 2017, Sec. 2).  # (*S, ..., K)"""
    return logits + _gumbel_like(logits, sample_shape, generator)

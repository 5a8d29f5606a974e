"""Estimators that enumerate: `Exact` sums over every configuration of the latents (zero variance,
finite support needed), and IndeCateR sums, per latent variable, over its categories with the
others sampled (Rao-Blackwellised REINFORCE on the categorical view)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from discrete_vae import sampling
from discrete_vae.errors import MAX_CONFIGS, ConfigError, count, require_budget, require_number
from discrete_vae.estimators.base import CostFn, Estimator, EstimatorOutput, Generator, as_categories
from discrete_vae.latents import Latent


class Exact(Estimator):
    """Exact enumeration: E_q[f(z)] = sum over all configurations c of the latent type (K^N of
    them for categorical latents) of q(c|x) f(c). Zero variance; its gradient is exact. Any latent
    type with finite support (`enumerate`, `log_prob`).

    Configurations are evaluated `chunk_size` at a time, each chunk under activation checkpointing
    when there is more than one, so memory stays bounded by one chunk in the forward and the backward.
    More configurations than `max_configs` are refused at start-up (`check`).
    """

    deterministic = True
    needs = ("has_enumerate_support",)

    def __init__(self, max_configs: int = 4096, chunk_size: int = 256):
        super().__init__()
        require_budget("estimator.max_configs", max_configs)
        require_number("estimator.chunk_size", chunk_size, positive=True, integer=True)
        self.max_configs = int(max_configs)
        self.chunk_size = int(chunk_size)

    def check(self, latent: Latent) -> None:
        super().check(latent)
        total = latent.num_configs
        if total > self.max_configs:
            raise ConfigError(
                f"estimator=exact enumerates {count(total)} configurations of {latent.describe()}, over the "
                f"budget estimator.max_configs={self.max_configs}. Shrink the latent space (for example "
                f"latent.num_latents=2 latent.num_categories=10, or experiment=small_exact)"
                + (" or raise estimator.max_configs." if total <= MAX_CONFIGS else
                   f"; no budget reaches it: an enumeration here takes at most {MAX_CONFIGS:,} configurations.")
            )

    def decoder_evaluations(self, latent: Latent) -> int:
        return latent.num_configs

    def decoder_rows(self, latent: Latent) -> int:
        return min(self.chunk_size, latent.num_configs)

    @staticmethod
    def _chunk(logits: Tensor, configs: Tensor, cost: CostFn, latent: Latent) -> Tensor:
        log_q = latent.log_prob(logits, configs[:, None])  # (C, B)
        f = cost(configs[:, None])  # (C, B)
        return (log_q.exp() * f).sum(0)  # (B,)

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        self.check(latent)
        expected = logits.new_zeros(logits.shape[0])  # (B,)
        # one chunk: its activations are needed by the backward anyway, and recomputing them would only cost time
        recompute = torch.is_grad_enabled() and latent.num_configs > self.chunk_size
        for start in range(0, latent.num_configs, self.chunk_size):
            configs = latent.enumerate(start, start + self.chunk_size, device=logits.device, dtype=logits.dtype)
            if recompute:  # configs (C, *event_shape)
                expected = expected + checkpoint(self._chunk, logits, configs, cost, latent, use_reentrant=False)
            else:
                expected = expected + self._chunk(logits, configs, cost, latent)
        return EstimatorOutput(expected, expected)


class IndeCateR(Estimator):
    """IndeCateR (De Smet, Sansone & Zuidberg Dos Martires 2023, "Differentiable Sampling of
    Categorical Distributions Using the CatLog-Derivative Trick", Sec. 4): for independent
    latents, the CatLog-derivative trick (Sec. 3) Rao-Blackwellises REINFORCE per latent. With
    S samples z_1..z_S ~ q(z|x) and z_s^{n<-k} the sample s with latent n set to category k,

        grad = sum_n sum_k grad q_n(k) * 1/S sum_s f(z_s^{n<-k}),

    unbiased (z_s's other latents are a sample of q_{-n}); sum_k grad q_n(k) = 0 acts as a
    built-in baseline. Surrogate for the encoder: sum_n sum_k q_nk stopgrad(fbar_nk). The
    decoder gets the ordinary unbiased gradient of 1/S sum_s f(z_s) at the samples, and that is
    the reported `value` (as in the authors' DVAE code).

    Cost: f(z_s) once, plus the N (K - 1) changes with k != z_n (k = z_n is z_s itself), so
    S (N (K - 1) + 1) decoder evaluations per example: 181 on the 20x10 model. The changes are
    evaluated without a graph, `chunk_size` configurations (each for the whole batch) per
    decoder call, so memory stays bounded by one chunk.

    On bits (K = 2, `as_categories`) each change flips one bit: S (N + 1) evaluations, and the
    estimate is sum_n grad sigmoid(phi_n) 1/S sum_s (f(z_s^{n<-1}) - f(z_s^{n<-0})).
    """

    needs = ("has_categorical_view",)

    def __init__(self, num_samples: int = 1, chunk_size: int = 100):
        super().__init__()
        self.num_samples = int(require_number("estimator.num_samples", num_samples, positive=True, integer=True))
        self.chunk_size = int(require_number("estimator.chunk_size", chunk_size, positive=True, integer=True))

    def decoder_evaluations(self, latent: Latent) -> int:
        N, K = latent.categorical_shape
        return self.num_samples * (N * (K - 1) + 1)

    def decoder_rows(self, latent: Latent) -> int:
        N, K = latent.categorical_shape
        changes = self.num_samples * N * (K - 1)
        return max(self.num_samples, min(self.chunk_size, changes))

    @torch.no_grad()
    def changed_costs(self, z: Tensor, f: Tensor, cost: CostFn) -> Tensor:
        """fbar_nk = 1/S sum_s f(z_s^{n<-k}), from f = f(z_s) for k = z_n.  # z (S, B, N, K), f (S, B) -> (B, N, K)"""
        S, B, N, K = z.shape
        total = S * N * (K - 1)
        parts = [
            cost(sampling.one_latent_changes(z, start, start + self.chunk_size))  # (C, B)
            for start in range(0, total, self.chunk_size)
        ]
        changed = torch.cat(parts).view(S, N, K - 1, B).permute(0, 3, 1, 2)  # (S, B, N, K-1)
        fbar = f.detach()[..., None, None].expand(S, B, N, K).clone()  # k = z_n: the sample itself
        fbar.scatter_(-1, sampling.other_categories(z), changed.to(fbar.dtype))
        return fbar.mean(0)  # (B, N, K)

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        logits, cost = as_categories(logits, cost, latent)
        z = sampling.gumbel_max(logits, (self.num_samples,), generator)  # (S, B, N, K)
        f = cost(z)  # (S, B), decoder gradient
        fbar = self.changed_costs(z, f, cost)  # (B, N, K), no graph
        rao = (torch.softmax(logits, dim=-1) * fbar).sum(dim=(-2, -1))  # (B,)
        value = f.mean(0)
        return EstimatorOutput(value + (rao - rao.detach()), value)

"""Antithetic estimators for bits: ARM and DisARM evaluate the decoder at a pair of samples drawn
from one uniform draw. They need the latents as independent bits (`Latent.binary_view`)."""

from __future__ import annotations

import torch
from torch import Tensor

from discrete_vae import sampling
from discrete_vae.estimators.base import CostFn, Estimator, EstimatorOutput, Generator
from discrete_vae.latents import Latent


class _Antithetic(Estimator):
    """Shared part of ARM and DisARM: one uniform u per unit gives the antithetic pair b, b~
    (sampling.antithetic_bernoulli), the decoder is evaluated at both (2 evaluations), and its
    gradient is that of the mean 1/2 (f(b) + f(b~)), also the reported value. The encoder's
    gradient is sum_n g_n phi_n with g the estimator's weight per unit (no gradient through g)."""

    needs = ("has_binary_view",)

    def decoder_evaluations(self, latent: Latent) -> int:
        return 2

    def weights(self, logits: Tensor, b: Tensor, b_tilde: Tensor, u: Tensor) -> Tensor:  # pragma: no cover
        """The estimate of d E[f] / d phi divided by f(b) - f(b~).  # (B, N)"""
        raise NotImplementedError

    def forward(self, logits: Tensor, cost: CostFn, latent: Latent, generator: Generator = None) -> EstimatorOutput:
        b, b_tilde, u = sampling.antithetic_bernoulli(latent.binary_view(logits), generator=generator)  # (B, N) each
        f = cost(torch.stack([b, b_tilde]))  # (2, B)
        value = f.mean(0)  # decoder gradient: the mean of the pair
        signal = (f[0] - f[1]).detach()[:, None] * self.weights(logits.detach(), b, b_tilde, u)  # (B, N)
        surrogate = (signal * logits).sum(-1)
        return EstimatorOutput(value + (surrogate - surrogate.detach()), value)


class ARM(_Antithetic):
    """ARM, augment-REINFORCE-merge (Yin & Zhou 2019, Theorem 1 / Eq. 5), for Bernoulli latents:
    u ~ U(0, 1)^N, b = 1[u > sigmoid(-phi)], b~ = 1[u < sigmoid(phi)],

        grad_phi = (f(b) - f(b~)) (u - 1/2),

    unbiased, two decoder evaluations at one uniform draw (antithetic)."""

    def weights(self, logits: Tensor, b: Tensor, b_tilde: Tensor, u: Tensor) -> Tensor:
        return u - 0.5


class DisARM(_Antithetic):
    """DisARM (Dong, Mnih & Tucker 2020, Eq. 5 and its multivariate form, Sec. 4): ARM with u
    integrated out given the pair (b, b~),

        grad_phi_n = 1/2 (f(b) - f(b~)) (-1)^{b~_n} 1[b_n != b~_n] sigmoid(|phi_n|),

    unbiased, the same two decoder evaluations, never more variance than ARM (their Theorem 1);
    as the authors' code (google-research, disarm/, the `disarm_factor`)."""

    def weights(self, logits: Tensor, b: Tensor, b_tilde: Tensor, u: Tensor) -> Tensor:
        return 0.5 * (b != b_tilde).to(logits.dtype) * (1.0 - 2.0 * b_tilde) * torch.sigmoid(logits.abs())

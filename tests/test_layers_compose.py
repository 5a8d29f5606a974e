"""Groundwork of two stochastic layers (issue #20): an estimator's loss is worth its value, so one
estimator can run inside another's cost. On a tiny chain x -> z1 -> z2 of bits (a two-layer VAE
with linear maps, 4 x 4 configurations), layer 1's estimator sees the cost
    -log p(x|z1) + [layer 2's estimator's loss for -log p(z1|z2)] + KL(q(z2|z1) || p(z2)),
and the exact enumeration of both layers equals brute force, and every unbiased estimator's mean
equals the exact gradient of both layers' parameters within the Monte-Carlo bound (which rejects
a wrong answer)."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from conftest import assert_mean_matches
from discrete_vae import estimators as E
from discrete_vae.latents import Bernoulli

D, N1, N2 = 4, 2, 2


def bce(logits, target):  # -log Bernoulli(target; sigmoid(logits)), summed, broadcasting both
    shape = torch.broadcast_shapes(logits.shape, target.shape)
    return F.binary_cross_entropy_with_logits(logits.expand(shape), target.expand(shape), reduction="none").sum(-1)


class TinyChain:
    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
        self.encoders = [r(D, N1).requires_grad_(), r(N1, N2).requires_grad_()]  # q(z1|x), q(z2|z1)
        self.to_z1, self.to_x, self.prior = r(N2, N1), r(N1, D), r(N2)  # p(z1|z2), p(x|z1), p(z2)
        self.x = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
        self.latents = [Bernoulli(N1), Bernoulli(N2)]

    def neg_elbo(self, estimators, x):  # (B,)
        B = x.shape[0]
        logits1 = x @ self.encoders[0]

        def cost1(z1):  # (*S, B', N1) -> (*S, B)
            z1 = z1.expand(*z1.shape[:-2], B, N1)
            parent = z1.reshape(-1, N1)  # every (sample, example) row its own z2
            logits2 = parent @ self.encoders[1]
            prior = Bernoulli(N2, prior="learned")
            with torch.no_grad():
                prior.prior_logits.copy_(self.prior)
            above = estimators[1](logits2, lambda z2: bce(z2 @ self.to_z1, parent), self.latents[1]).loss
            above = above + prior.kl(logits2)
            return bce(z1 @ self.to_x, x) + above.reshape(z1.shape[:-1])

        q1 = torch.sigmoid(logits1)
        neg_entropy = (q1 * F.logsigmoid(logits1) + (1 - q1) * F.logsigmoid(-logits1)).sum(-1)
        return estimators[0](logits1, cost1, self.latents[0]).loss + neg_entropy

    def brute_force(self) -> torch.Tensor:
        """-ELBO = sum over z1, z2 of q(z1|x) q(z2|z1) (log q - log p), written out."""
        bits = self.latents[0].enumerate(dtype=torch.float64)  # (4, 2)
        total = 0.0
        for z1 in bits:
            log_q1 = -bce(self.x @ self.encoders[0], z1)[0]
            for z2 in bits:
                log_q2 = -bce(z1 @ self.encoders[1], z2)
                log_p = -bce(z1 @ self.to_x, self.x)[0] - bce(z2 @ self.to_z1, z1) - bce(self.prior, z2)
                total = total + (log_q1 + log_q2).exp() * (log_q1 + log_q2 - log_p)
        return total

    def grads(self, estimators, rows: int) -> torch.Tensor:
        loss = self.neg_elbo(estimators, self.x.expand(rows, D)).mean()
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, self.encoders)])


def test_exact_enumeration_of_both_layers_is_the_brute_force_elbo():
    chain = TinyChain()
    exact = chain.neg_elbo([E.Exact(), E.Exact()], chain.x)[0]
    torch.testing.assert_close(exact, chain.brute_force())


@pytest.mark.parametrize("make", [E.ScoreFunction, lambda: E.RLOO(2), E.ARM, E.DisARM, E.REBAR, E.IndeCateR, E.MuProp,
                                  E.NVIL], ids=["sf", "rloo", "arm", "disarm", "rebar", "indecater", "muprop", "nvil"])
def test_an_unbiased_estimator_on_both_layers_is_unbiased_for_both(make):
    chain = TinyChain()
    exact = chain.grads([E.Exact(), E.Exact()], 1)
    torch.manual_seed(0)
    estimators = []
    for latent in chain.latents:
        estimator = make().double().eval()
        estimator.check(latent)
        estimators.append(estimator)
    samples = torch.stack([chain.grads(estimators, 4_000) for _ in range(12)])  # 12 means of 4,000 draws
    moving = exact != 0  # the weights of x's zero pixel get no gradient, exactly
    assert torch.equal(samples[:, ~moving], torch.zeros_like(samples[:, ~moving]))
    assert_mean_matches(samples[:, moving], exact[moving], z=5.0)
    with pytest.raises(AssertionError):
        assert_mean_matches(samples[:, moving], exact[moving] + 0.05, z=5.0)


class Record(E.Estimator):
    """A stand-in for the layer above that records its first uniform draw per call."""

    def __init__(self, seen):
        super().__init__()
        self.seen = seen

    def forward(self, logits, cost, latent):
        self.seen.append(torch.rand(logits.shape[0], dtype=logits.dtype))
        f = cost(latent.sample(logits))
        return E.EstimatorOutput(f, f)


@pytest.mark.parametrize("make, shared", [(E.REBAR, True), (E.RELAX, True), (E.ARM, False), (lambda: E.RLOO(3), False)],
                         ids=["rebar", "relax", "arm", "rloo"])
def test_rebar_and_relax_evaluate_the_layers_above_with_common_noise(make, shared):
    """REBAR's f(b), f(sigma(z)) and f(sigma(z~)) see the same noise in the layers above (its multi-layer
    form); the others' samples are independent draws and see independent noise above."""
    from discrete_vae.vae import VAE

    torch.manual_seed(0)
    model = VAE(Bernoulli(2), input_dim=D, hidden_dims=[], upper_latents=[Bernoulli(2)]).double()
    seen: list[torch.Tensor] = []
    lowest = make().double()
    lowest.check(model.latent)
    x = (torch.rand(5, D) < 0.5).double()
    model.objective(x, [lowest.train(), Record(seen)]).loss.backward()
    if shared:
        assert len(seen) == 3 and all(torch.equal(seen[0], s) for s in seen[1:])
    else:
        assert len(seen) == 1 and len(seen[0]) == 5 * lowest.decoder_evaluations(model.latent)

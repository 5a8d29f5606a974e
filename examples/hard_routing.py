"""A model of one's own, in plain PyTorch, trained through a discrete choice with discrete_vae's estimators.

A mixture of experts with hard routing: a router picks ONE of K experts for each input (a categorical
latent z, one-hot), and only that expert's prediction counts. The choice is not differentiable, so
the router learns through a gradient estimator: any of discrete_vae's, by name. No Lightning, no
Hydra, no VAE: the estimator needs the router's logits, the cost of a choice, and the latent type.

    python examples/hard_routing.py --estimator st_gumbel     # pathwise (biased, low variance)
    python examples/hard_routing.py --estimator rloo          # unbiased (score function, leave-one-out)

The data: inputs from K clusters; on cluster c the target is a linear function w_c . x of its own.
A router that sends each cluster to one expert lets the experts fit exactly (error -> 0); a router
that cannot choose leaves each expert fitting a blend.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from discrete_vae import RLOO, Categorical, GumbelSoftmax, ScoreFunction, STGumbelSoftmax, StraightThrough, anneal

ESTIMATORS = {  # the pathwise ones anneal their temperature (anneal(), below); the unbiased ones have none
    "gumbel": lambda: GumbelSoftmax(tau=1.0), "st_gumbel": lambda: STGumbelSoftmax(tau=1.0),
    "st": lambda: StraightThrough(tau=1.0), "sf": lambda: ScoreFunction(), "rloo": lambda: RLOO(num_samples=4),
}


def make_data(num: int, dim: int, clusters: int, generator: torch.Generator):
    """x (num, dim) around one of `clusters` centres, y (num,) = w_c . x on cluster c."""
    centres = 3.0 * torch.randn(clusters, dim, generator=generator)
    weights = torch.randn(clusters, dim, generator=generator)
    c = torch.randint(clusters, (num,), generator=generator)
    x = centres[c] + torch.randn(num, dim, generator=generator)
    return x, (weights[c] * x).sum(-1)


class HardRouting(nn.Module):
    """Router logits (B, 1, K) for one categorical latent of K choices; K linear experts."""

    def __init__(self, dim: int, experts: int):
        super().__init__()
        self.latent = Categorical(num_latents=1, num_categories=experts)
        self.router = nn.Linear(dim, experts)
        self.experts = nn.Linear(dim, experts)  # column k: expert k's prediction

    def loss(self, x, y, estimator, generator=None):
        logits = self.router(x).unsqueeze(1)  # (B, 1, K)
        predictions = self.experts(x)  # (B, K)

        def cost(z):  # z (*S, B, 1, K), one-hot (or relaxed) -> squared error (*S, B)
            return ((z.squeeze(-2) * predictions).sum(-1) - y) ** 2

        out = estimator(logits, cost, self.latent, generator=generator)
        return out.loss.mean(), out.value.mean()  # the surrogate to minimise, and the error to report


def train(estimator_name: str = "st_gumbel", steps: int = 1500, seed: int = 0, log_every: int = 500) -> list[float]:
    """Train, printing the squared error on held-out data; returns the held-out errors (first: before training)."""
    g = torch.Generator().manual_seed(seed)  # all the noise of data and estimator: a run is reproducible
    torch.manual_seed(seed)  # the initial weights
    x, y = make_data(4096, dim=8, clusters=4, generator=g)
    x_test, y_test = x[-1024:], y[-1024:]
    model, estimator = HardRouting(dim=8, experts=4), ESTIMATORS[estimator_name]()
    estimator.check(model.latent)  # once, before training: the latent type offers what it needs
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    errors = []
    for step in range(steps + 1):
        if step % log_every == 0 or step == steps:
            with torch.no_grad():  # a hard choice, the router's most likely expert
                hard = torch.nn.functional.one_hot(model.router(x_test).argmax(-1), 4).float()
                errors.append(float((((hard * model.experts(x_test)).sum(-1) - y_test) ** 2).mean()))
            print(f"{estimator_name}: step {step}, held-out squared error {errors[-1]:.3f}")
        if step == steps:
            break
        anneal(estimator, step, tau_min=0.5, rate=1e-3, interval=100)  # a no-op for estimators without tau
        batch = torch.randint(3072, (128,), generator=g)
        loss, _ = model.loss(x[batch], y[batch], estimator, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return errors


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--estimator", choices=sorted(ESTIMATORS), default="st_gumbel")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return train(args.estimator, args.steps, args.seed)


if __name__ == "__main__":
    main()

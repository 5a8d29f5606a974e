"""The encoder and decoder MLPs of the categorical VAE.

Kept apart from the LightningModule so the gradient diagnostics and the tests can
build the same networks without a Trainer. Sizes follow Jang et al. 2017
(784-512-256-(N*K) encoder and its mirror image as decoder).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from discrete_vae.errors import ConfigError


def activation_class(name: str) -> type[nn.Module]:
    """torch.nn activation class by name ("ReLU", "ELU", "Tanh", ...), with a clear error."""
    cls = getattr(nn, name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or name[0].islower():
        raise ConfigError(
            f"model.activation={name!r} is not a torch.nn activation; use a class name such as "
            f"ReLU, ELU, LeakyReLU, Tanh or GELU"
        )
    return cls


def mlp(sizes: Sequence[int], activation: str) -> nn.Sequential:
    """Linear layers of the given sizes with `activation` between them (none after the last)."""
    act = activation_class(activation)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x (B, D) -> logits of q(z|x), (B, N, K)."""

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], num_latents: int, num_categories: int, activation: str):
        super().__init__()
        self.shape = (num_latents, num_categories)
        self.net = mlp([input_dim, *hidden_dims, num_latents * num_categories], activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).unflatten(-1, self.shape)  # (B, N, K)


class Decoder(nn.Module):
    """z (..., N, K) -> Bernoulli logits of p(x|z), (..., D); any leading sample dims."""

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], num_latents: int, num_categories: int, activation: str):
        super().__init__()
        self.net = mlp([num_latents * num_categories, *reversed(hidden_dims), input_dim], activation)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.flatten(-2))  # (..., D)

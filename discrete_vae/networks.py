"""The encoder and decoder MLPs of the VAE.

Kept apart from the VAE's maths (discrete_vae.vae) and from the LightningModule, so that any
latent type plugs in: the encoder ends in the latent type's `param_shape`, the decoder starts
from its `decoder_dim`. Sizes follow Jang et al. 2017 (784-512-256-(N*K) encoder and its
mirror image as decoder; ARM's static-MNIST models: none, the linear model, or 200-200 with
LeakyReLU(0.3)).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from discrete_vae.errors import ConfigError


def activation_class(name: str) -> type[nn.Module]:
    """torch.nn activation class by name ("ReLU", "ELU", "Tanh", ...), with a clear error."""
    cls = getattr(nn, name, None) if isinstance(name, str) and name else None
    # torch.nn's activation functions: Module, Linear, Sequential, ... are no activation to put between layers
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__module__ == nn.modules.activation.__name__
            and cls is not nn.MultiheadAttention):
        raise ConfigError(
            f"model.activation={name!r} is not a torch.nn activation; use a class name such as "
            f"ReLU, ELU, LeakyReLU, Tanh or GELU"
        )
    return cls


def make_activation(name: str, args: Mapping[str, Any] | None = None) -> nn.Module:
    """`activation_class(name)(**args)`, e.g. ("LeakyReLU", {"negative_slope": 0.3}), with a clear error."""
    if args is not None and not isinstance(args, Mapping):
        raise ConfigError(f"model.activation_args must be a mapping such as {{negative_slope: 0.3}}, got {args!r}")
    args = dict(args or {})
    try:
        return activation_class(name)(**args)
    except TypeError as error:
        raise ConfigError(f"model.activation_args={args} do not fit torch.nn.{name}: {error}") from None


def mlp(sizes: Sequence[int], activation: str, activation_args: Mapping[str, Any] | None = None) -> nn.Sequential:
    """Linear layers of the given sizes with `activation` between them (none after the last);
    no hidden sizes is one linear map."""
    make_activation(activation, activation_args)  # refused here even when no layer needs one
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(make_activation(activation, activation_args))
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """x (B, D) -> the parameters of q(z|x), (B, *param_shape) (logits (B, N, K) for categorical z)."""

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], param_shape: Sequence[int], activation: str,
                 activation_args: Mapping[str, Any] | None = None):
        super().__init__()
        self.shape = tuple(param_shape)
        self.net = mlp([input_dim, *hidden_dims, math.prod(self.shape)], activation, activation_args)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).unflatten(-1, self.shape)  # (B, *param_shape)


class Decoder(nn.Module):
    """The decoder's input (..., D_z), the latent type's `decoder_input(z)` -> Bernoulli logits of
    p(x|z), (..., D); any leading sample dims."""

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], latent_dim: int, activation: str,
                 activation_args: Mapping[str, Any] | None = None):
        super().__init__()
        self.net = mlp([latent_dim, *reversed(hidden_dims), input_dim], activation, activation_args)

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)  # (..., D)

"""The networks of the models: MLPs (encoders, decoders, the maps between stochastic layers) and a
small convolutional encoder and decoder for 28x28 images, pluggable like every other part.

Kept apart from the models' maths (discrete_vae.vae, discrete_vae.sbn) and from the LightningModule,
so that any latent type plugs in: an encoder ends in the latent type's `param_shape`, a decoder
starts from its `decoder_dim` (a sample's width). Sizes follow Jang et al. 2017 (784-512-256-(N*K) encoder and its
mirror image as decoder; ARM's static-MNIST models: none, the linear model, or 200-200 with
LeakyReLU(0.3)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
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


class MLP(nn.Module):
    """x (..., D_in) -> (..., *output_shape): linear layers of widths `hidden_dims` with `activation`
    between them (none: one linear map). An encoder ends in a latent type's `param_shape`; a decoder
    starts from a `decoder_dim` and ends in the pixels (output_shape (D,)); any leading dims."""

    def __init__(self, input_dim: int, hidden_dims: Sequence[int], output_shape: Sequence[int] | int,
                 activation: str = "ReLU", activation_args: Mapping[str, Any] | None = None):
        super().__init__()
        self.shape = (output_shape,) if isinstance(output_shape, int) else tuple(output_shape)
        self.net = mlp([input_dim, *hidden_dims, math.prod(self.shape)], activation, activation_args)

    @property
    def output_bias(self) -> Tensor:
        """The bias of the last layer, one per output (a decoder's per pixel: its data-mean initialisation)."""
        return self.net[-1].bias

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).unflatten(-1, self.shape)  # (..., *output_shape)


# -- pluggable networks ---------------------------------------------------------------------------
# A model's `encoder` and `decoder` may be any nn.Module built by Hydra from a partial config
# (conf/model/vae_conv.yaml): the model calls `encoder(input_dim=D, output_shape=param_shape)` and
# `decoder(input_dim=decoder_dim, output_dim=D)`. A decoder with an `output_bias` of one value per
# pixel gets the data-mean initialisation (model.output_bias_init=data_mean).


def build_network(key: str, make: Callable[..., nn.Module], **sizes: Any) -> nn.Module:
    """`make(**sizes)`, a network given by the config as a partial, refused in one line unless it builds
    an nn.Module from those sizes."""
    if not callable(make):
        raise ConfigError(f"{key} must be a network's config with _partial_: true (conf/model/vae_conv.yaml), got {make!r}")
    try:
        network = make(**sizes)
    except TypeError as error:
        raise ConfigError(f"{key} could not be built with {', '.join(sizes)}: {error}") from None
    if not isinstance(network, nn.Module):
        raise ConfigError(f"{key} built a {type(network).__name__}, not a torch.nn.Module")
    return network


def _image_shape(image_shape: Sequence[int], input_dim: int, key: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in image_shape)
    if len(shape) != 3 or math.prod(shape) != input_dim or shape[1] % 4 or shape[2] % 4:
        raise ConfigError(f"{key}.image_shape={list(shape)} must be [channels, height, width] with "
                          f"channels x height x width = {input_dim} pixels, height and width multiples of 4")
    return shape


class ConvEncoder(nn.Module):
    """Images (..., C*H*W) -> (..., *output_shape): two stride-2 4x4 convolutions (H/4 x W/4 maps of
    `channels[1]`), then a linear map; for 28x28 MNIST, the small encoder of the VQ-VAE and
    convolutional VAE examples (32 and 64 channels)."""

    def __init__(self, input_dim: int, output_shape: Sequence[int], image_shape: Sequence[int] = (1, 28, 28),
                 channels: Sequence[int] = (32, 64), activation: str = "ReLU"):
        super().__init__()
        self.image = _image_shape(image_shape, input_dim, "model.encoder")
        c, h, w = self.image
        self.shape = tuple(output_shape)
        self.net = nn.Sequential(
            nn.Conv2d(c, channels[0], 4, stride=2, padding=1), make_activation(activation),
            nn.Conv2d(channels[0], channels[1], 4, stride=2, padding=1), make_activation(activation),
            nn.Flatten(), nn.Linear(channels[1] * (h // 4) * (w // 4), math.prod(self.shape)),
        )

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        out = self.net(x.reshape(-1, *self.image))  # (R, prod(output_shape))
        return out.reshape(*lead, *self.shape)


class ConvDecoder(nn.Module):
    """(..., D_z) -> pixel logits (..., C*H*W): a linear map to H/4 x W/4 maps of `channels[0]`, two
    stride-2 4x4 transposed convolutions, and a bias per pixel (`output_bias`, which the data-mean
    initialisation sets)."""

    def __init__(self, input_dim: int, output_dim: int, image_shape: Sequence[int] = (1, 28, 28),
                 channels: Sequence[int] = (64, 32), activation: str = "ReLU"):
        super().__init__()
        self.image = _image_shape(image_shape, output_dim, "model.decoder")
        c, h, w = self.image
        self.start = (channels[0], h // 4, w // 4)
        self.net = nn.Sequential(
            nn.Linear(input_dim, math.prod(self.start)), make_activation(activation),
            nn.Unflatten(-1, self.start),
            nn.ConvTranspose2d(channels[0], channels[1], 4, stride=2, padding=1), make_activation(activation),
            nn.ConvTranspose2d(channels[1], c, 4, stride=2, padding=1, bias=False), nn.Flatten(),
        )
        self.output_bias = nn.Parameter(torch.zeros(output_dim))

    def forward(self, h: Tensor) -> Tensor:
        lead = h.shape[:-1]
        out = self.net(h.reshape(-1, h.shape[-1]))  # (R, C*H*W)
        return out.reshape(*lead, -1) + self.output_bias

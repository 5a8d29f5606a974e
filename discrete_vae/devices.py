"""Choosing and naming the compute device, for the scripts that let a user pick one."""

from __future__ import annotations

import torch

from discrete_vae.errors import ConfigError
from discrete_vae.records import cpu_name


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when available, else the CPU), `cpu`, `cuda`, `cuda:1`, ...; a clear error
    when CUDA is asked for and absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    return device


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU model, core count and torch threads, for reports of timings."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_name()}), {torch.get_num_threads()} torch threads"

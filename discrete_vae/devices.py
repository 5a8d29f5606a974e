"""Choosing and naming the compute device, for the scripts that let a user pick one."""

from __future__ import annotations

import torch

from discrete_vae.errors import ConfigError
from discrete_vae.records import cpu_name


def resolve_device(name: str) -> torch.device:
    """`auto` (CUDA when available, else the CPU), `cpu`, `cuda`, `cuda:1`, `mps` where there is
    one; a clear error for any other device (`meta` holds no values) or one that is absent."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={name} is not one this script computes on; use auto, cpu, cuda or cuda:N")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name} but this machine has no Apple GPU (MPS); use device=cpu or device=auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here; use device=cpu or device=auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name} but this machine has {torch.cuda.device_count()} CUDA devices; "
                          f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def describe_device(device: torch.device) -> str:
    """The GPU's name, or the CPU model, core count and torch threads, for reports of timings."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_name()}), {torch.get_num_threads()} torch threads"

"""From a config to the objects of a run: the latent type, the VAE, the estimator, the optimizer
and the LightningModule around them; and the same from a checkpoint's stored config.

Each part is its config group's `_target_` (conf/latent, conf/model, conf/estimator, the
`optimizer` node), so adding a latent type or an estimator is one class and one YAML file. A
user's mistake (ConfigError) comes out as itself, not wrapped in Hydra's InstantiationException.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from discrete_vae.checkpoints import read_checkpoint
from discrete_vae.errors import find_user_error
from discrete_vae.estimators import Estimator
from discrete_vae.module import VAEModule
from discrete_vae.vae import VAE


def build(node: Any, **kwargs: Any) -> Any:
    """instantiate(node, **kwargs), with a user's mistake raised as itself."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        raise user_error from None


def build_vae(cfg: DictConfig) -> VAE:
    """The VAE of `cfg.model` around the latent type of `cfg.latent`."""
    return build(cfg.model, latent=build(cfg.latent))


def build_estimator(cfg: DictConfig) -> Estimator:
    return build(cfg.estimator)


def build_model(cfg: DictConfig, run_config: dict[str, Any] | None = None,
                run_choices: dict[str, str] | None = None) -> VAEModule:
    """The LightningModule of a run: the VAE, the estimator (checked against the latent type), the
    optimizer and the evaluation settings. `run_config` is saved in its checkpoints."""
    optimizer = build(cfg.optimizer) if cfg.get("optimizer") is not None else None
    return VAEModule(
        build_vae(cfg), build_estimator(cfg), optimizer=optimizer,
        num_images=cfg.get("num_images", 8), test_iwae_samples=cfg.get("test_iwae_samples", 50),
        seed=cfg.get("seed", 0), run_config=run_config, run_choices=run_choices,
    )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[VAEModule, DictConfig]:
    """The module (its VAE and estimator, with the trained weights and buffers) and the training
    config of a checkpoint written by scripts/train.py."""
    checkpoint = read_checkpoint(path, map_location)
    cfg = OmegaConf.create(checkpoint["config"])
    model = build_model(cfg, run_config=checkpoint["config"], run_choices=checkpoint.get("choices"))
    model.load_state_dict(checkpoint["state_dict"])
    model.on_load_checkpoint(checkpoint)  # trained weights: a later fit keeps its output bias
    return model, cfg

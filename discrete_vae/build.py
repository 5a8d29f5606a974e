"""From a config to the objects of a run: the latent type, the model (a VAE or an SBN), the estimator,
the optimizer and the LightningModule around them; and the same from a checkpoint's stored config.

Each part is its config group's `_target_` (conf/latent, conf/model, conf/estimator, the
`optimizer` node), so adding a latent type or an estimator is one class and one YAML file. A
user's mistake (ConfigError) comes out as itself, not wrapped in Hydra's InstantiationException.

A checkpoint's config is data from elsewhere: before it is instantiated, every `_target_` in it
must name one of the project's own latent types, VAEs, estimators or datamodules, or a
torch.optim optimizer (`check_targets`); a `_target_` such as `pathlib.Path.write_text` would
otherwise run when the checkpoint is loaded. Parts of a user's own package are rebuilt only
when the caller names that package (`trusted_modules`, e.g. evaluate.py's trusted_modules=[mypkg]).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from discrete_vae.chain import StochasticChain
from discrete_vae.checkpoints import check_weights_fit, read_checkpoint
from discrete_vae.errors import ConfigError, DataError, find_user_error
from discrete_vae.estimators import Estimator
from discrete_vae.latents import Latent
from discrete_vae.module import VAEModule


def build(node: Any, **kwargs: Any) -> Any:
    """instantiate(node, **kwargs), with a user's mistake raised as itself."""
    try:
        result = instantiate(node, **kwargs)
    except InstantiationException as err:
        user_error = find_user_error(err)
        if user_error is not None:
            raise user_error from None
        unknown = _unknown_argument(err)
        if unknown is None:
            raise
        raise _unknown_setting(node, unknown) from None
    check_partial_settings(node, result)
    return result


def _unknown_setting(node: Any, unknown: str) -> ConfigError:
    key = node._get_full_key(None) if isinstance(node, DictConfig) else None
    where = str(key) if key else "the config"
    target = node.get("_target_", "?") if hasattr(node, "get") else "?"
    return ConfigError(f"{where}.{unknown} is not a setting of {target}; remove it (a key left over from "
                       f"another {where} choice?) or see conf/{where.split('.')[0]}/ for the settings it takes")


def check_partial_settings(node: Any, result: Any) -> None:
    """A `_partial_` node (the optimizer) is called later, by code that no config names: its
    settings are matched against the callable's signature now, so that `+optimizer.lrr=0.1`
    is one line at start-up rather than a traceback at the first step."""
    if not isinstance(result, functools.partial):
        return
    try:
        inspect.signature(result.func).bind_partial(**result.keywords)
    except TypeError:
        accepted = inspect.signature(result.func).parameters
        unknown = next((k for k in result.keywords if k not in accepted), None)
        if unknown is None:
            raise
        raise _unknown_setting(node, unknown) from None
    except ValueError:  # a callable without a signature: nothing to check
        pass


def _unknown_argument(err: BaseException) -> str | None:
    """The keyword a constructor refused ("got an unexpected keyword argument 'x'"), if that is the error."""
    cause = err.__cause__
    match = re.search(r"unexpected keyword argument '(\w+)'", str(cause)) if isinstance(cause, TypeError) else None
    return match.group(1) if match else None


def build_model(cfg: DictConfig) -> StochasticChain:
    """The model of `cfg.model` (a VAE or an SBN) around the latent type of `cfg.latent`, and the
    stochastic layers of `cfg.upper_latents` above it (a list of latent configs; absent or empty: one layer)."""
    upper = cfg.get("upper_latents") or []
    if not isinstance(upper, (list, ListConfig)):
        raise ConfigError(f"upper_latents must be a list of latent types (e.g. [{{_target_: "
                          f"discrete_vae.latents.Bernoulli, num_latents: 200}}]) or [], got {upper!r}")
    return build(cfg.model, latent=build(cfg.latent), upper_latents=[build(node) for node in upper])


def build_module(cfg: DictConfig, run_config: dict[str, Any] | None = None,
                run_choices: dict[str, str] | None = None) -> VAEModule:
    """The LightningModule of a run: the model, the estimator (checked against the latent types), the
    optimizer and the evaluation settings. `run_config` is saved in its checkpoints."""
    optimizer = build(cfg.optimizer) if cfg.get("optimizer") is not None else None
    return VAEModule(
        build_model(cfg), build(cfg.estimator), optimizer=optimizer,
        num_images=cfg.get("num_images", 8), test_iwae_samples=cfg.get("test_iwae_samples", 50),
        val_iwae_samples=cfg.get("val_iwae_samples", 0), seed=cfg.get("seed", 0),
        run_config=run_config, run_choices=run_choices,
    )


# What each node of a checkpoint's config may build, and from which packages.
ALLOWED = {"latent": Latent, "upper_latents": Latent, "model": StochasticChain, "estimator": Estimator, "data": L.LightningDataModule,
           "optimizer": torch.optim.Optimizer}
OWN_PACKAGES = {"optimizer": ("torch.optim",)}  # the others: discrete_vae alone


def _targets(node: Any, where: str) -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every `_target_` in a config node, nested ones included."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "_target_":
                yield f"{where}._target_", value
            else:
                yield from _targets(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{where}[{i}]")


def _resolve(target: Any, packages: Sequence[str]) -> Any:
    """The object `target` names, imported only from `packages` (and their submodules); else None."""
    if not isinstance(target, str) or not any(target == p or target.startswith(p + ".") for p in packages):
        return None
    module, _, name = target.rpartition(".")
    try:
        obj = importlib.import_module(module)
        return getattr(obj, name)
    except (ImportError, AttributeError, ValueError):
        return None


def check_targets(config: dict[str, Any], trusted_modules: Sequence[str] = ()) -> None:
    """A DataError naming the first `_target_` in a checkpoint's config that is not one of the
    project's own parts (or torch's optimizers), unless it lies in one of `trusted_modules`."""
    for key, base in ALLOWED.items():
        packages = (*OWN_PACKAGES.get(key, ("discrete_vae",)), *trusted_modules)
        for where, target in _targets(config.get(key), key):
            obj = _resolve(target, packages)
            # inside the model node, its networks (model.encoder, model.decoder): torch modules of those packages
            need = torch.nn.Module if key == "model" and where != "model._target_" else base
            if not (isinstance(obj, type) and issubclass(obj, need)):
                raise DataError(
                    f"refused the checkpoint: its config's {where}={target!r} is not a {need.__name__} of "
                    f"{' or '.join(packages)}, and building it could run code. Use a checkpoint written by "
                    f"scripts/train.py; for your own package's parts, name it: trusted_modules=[PACKAGE]."
                )


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    trusted_modules: Sequence[str] = ()) -> tuple[VAEModule, DictConfig]:
    """The module (its model and estimator, with the trained weights and buffers) and the training
    config of a checkpoint written by scripts/train.py. Its config builds only the project's own
    parts, and those of `trusted_modules` (`check_targets`)."""
    checkpoint = read_checkpoint(path, map_location)
    check_targets(checkpoint["config"], trusted_modules)
    cfg = OmegaConf.create(checkpoint["config"])
    module = build_module(cfg, run_config=checkpoint["config"], run_choices=checkpoint.get("choices"))
    check_weights_fit(module, checkpoint["state_dict"], Path(path))
    module.load_state_dict(checkpoint["state_dict"])
    module.on_load_checkpoint(checkpoint)  # trained weights: a later fit keeps its output bias
    return module, cfg

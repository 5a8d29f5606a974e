"""From a Hydra config to a trained model: build, fit, test, and record the run.

scripts/train.py is a thin Hydra entry point around `train`; evaluation and
study scripts reuse `build_model` and `load_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from discrete_vae.errors import ConfigError, find_user_error
from discrete_vae.model import CategoricalVAE

log = logging.getLogger(__name__)


def build_model(cfg: DictConfig) -> CategoricalVAE:
    """The estimator, then the model around it (which checks the estimator's budget).

    A user's mistake (ConfigError) is raised as itself, not wrapped in Hydra's InstantiationException.
    """
    try:
        return instantiate(cfg.model, estimator=instantiate(cfg.estimator))
    except InstantiationException as err:
        user_error = find_user_error(err)
        if user_error is None:
            raise
        raise user_error from None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[CategoricalVAE, DictConfig]:
    """A model and its training config from a checkpoint written by `train`."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    if "config" not in checkpoint:
        raise ConfigError(f"{path} holds no training config; it was not written by scripts/train.py")
    cfg = OmegaConf.create(checkpoint["config"])
    model = build_model(cfg)
    model.load_state_dict(checkpoint["state_dict"])
    return model, cfg


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"model/num_latents": 20, ...} with TensorBoard-friendly values."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}/"))
        return out
    value = tree if isinstance(tree, (bool, int, float, str)) else str(tree)
    return {prefix.rstrip("/"): value}


def log_hparams(logger, params: dict[str, Any], metric_tags: list[str]) -> None:
    """Write TensorBoard's hparams summaries naming `metric_tags`; the metric values are the
    scalars the run logs under those tags, so the hparams view shows the final val/neg_elbo."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.tensorboard.summary import hparams

    if not isinstance(logger, TensorBoardLogger):
        return
    experiment, start, end = hparams(params, {tag: math.nan for tag in metric_tags})
    writer = logger.experiment._get_file_writer()
    for summary in (experiment, start, end):
        writer.add_summary(summary)


def run_summary(cfg: DictConfig) -> dict[str, Any]:
    """The group choices (estimator=..., data=...) and the command-line overrides of this run."""
    try:
        hydra_cfg = HydraConfig.get()
        choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra")}
        overrides = list(hydra_cfg.overrides.task)
    except ValueError:  # not under Hydra (tests composing configs directly)
        choices, overrides = {}, []
    return {"choices": choices, "overrides": overrides}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, then test the best checkpoint; write metrics.json into the run directory.

    A run that raises still writes metrics.json, with status "failed" and the error, so that
    scripts/report.py lists it; the exception is then re-raised.
    """
    start = time.perf_counter()
    output_dir = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()
    try:
        return _fit_and_test(cfg, output_dir, start)
    except Exception as err:
        error = find_user_error(err) or err
        write_record(cfg, output_dir, start, status="failed", metrics={}, error=f"{type(error).__name__}: {error}")
        raise


def write_record(cfg: DictConfig, output_dir: Path, start: float, **fields: Any) -> dict[str, Any]:
    """metrics.json of a run: estimator, overrides, seed, wall time, and `fields` (status, metrics, ...)."""
    summary = run_summary(cfg)
    record = {
        "estimator": summary["choices"].get("estimator"),
        "overrides": summary["overrides"],
        "seed": cfg.get("seed"),
        "wall_time_s": round(time.perf_counter() - start, 2),
        **fields,
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").write_text(json.dumps(record, indent=2))
    return record


def _fit_and_test(cfg: DictConfig, output_dir: Path, start: float) -> dict[str, Any]:
    torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "high"))
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    model = build_model(cfg)
    datamodule.load_splits()  # missing or corrupt data fails here, before any run output
    summary = run_summary(cfg)
    model.run_config = OmegaConf.to_container(cfg, resolve=True)

    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(output_dir))
    if logger:
        params = _flat(model.run_config)
        params.update({f"choice/{k}": str(v) for k, v in summary["choices"].items()})
        log_hparams(logger, params, ["val/neg_elbo", "test/neg_elbo"])

    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = {"val/neg_elbo": _scalar(trainer.callback_metrics.get("val/neg_elbo"))}
    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None, verbose=False)
        metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})

    record = write_record(
        cfg, output_dir, start, status="finished", metrics=metrics, steps=trainer.global_step,
        best_checkpoint=trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None,
    )
    log.info("metrics: %s", json.dumps(metrics))
    return record


def _scalar(value) -> float | None:
    return None if value is None else float(value)

"""Config values that no class of ours owns, checked before anything runs: the run's top-level keys
and the Trainer's settings.

The parts' own settings are checked where they are read (latent types, the VAE, estimators,
datamodules and callbacks call `errors.require_number`), so that each message names its key.
What is left here are the keys scripts/train.py reads itself and the `trainer` node, which
Lightning would otherwise refuse with a traceback, or accept and misread (log_every_n_steps=0
divides by zero; a seed out of range is silently replaced).
"""

from __future__ import annotations

import difflib
import functools
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from discrete_vae.errors import ConfigError, require_number

CONF = Path(__file__).resolve().parents[1] / "conf"
ESTIMATOR_DIR = CONF / "estimator"
MAX_SEED = 2**32 - 1  # Lightning's seed_everything and numpy take seeds in [0, 2^32 - 1]
MATMUL_PRECISIONS = ("highest", "high", "medium")
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed", "bf16", "16")
# the data, the estimators' noise and the bounds are float32: a double or all-half model fails at its first step
UNSUPPORTED_PRECISIONS = ("64-true", "64", "16-true", "bf16-true", "transformer-engine")
CUDA_ONLY_PRECISIONS = ("16-mixed", "16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
PROFILERS = (None, "simple", "advanced", "pytorch")
MAX_TIME = re.compile(r"^\d{1,2}:\d{2}:\d{2}:\d{2}$")  # DD:HH:MM:SS


def require_bool(key: str, value: Any, hint: str = "") -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}{hint and '; ' + hint}")
    return value


def require_choice(key: str, value: Any, choices) -> Any:
    if value not in choices:
        shown = ", ".join("null" if c is None else str(c) for c in choices)
        raise ConfigError(f"{key}={value!r} is not one of {shown}")
    return value


def require_seed(key: str, value: Any) -> int:
    return require_number(key, value, integer=True, low=0, high=MAX_SEED, hint="a whole number such as seed=1")


def _limit(key: str, value: Any) -> None:
    """Lightning's limit_*_batches: null (all), a number of batches, or a fraction in [0, 1]."""
    if value is None:
        return
    if isinstance(value, float) and not value.is_integer():
        require_number(key, value, low=0.0, high=1.0, hint="a fraction in [0, 1] or a number of batches")
    else:
        require_number(key, value, low=0, hint="a number of batches, a fraction in [0, 1], or null for all")


def cuda_available() -> bool:
    """torch.cuda.is_available(), importing torch only when a setting asks about CUDA: the checks
    here run before the scripts import torch and Lightning (seconds), so a mistake is answered at once."""
    import torch

    return torch.cuda.is_available()


def check_config(cfg: Mapping) -> None:
    """What scripts/train.py checks before it imports Lightning: the run's own keys and the Trainer's."""
    check_run(cfg)
    check_trainer(cfg.get("trainer") or {})


def check_run(cfg: Mapping) -> None:
    """scripts/train.py's own top-level keys, and no key it does not know."""
    check_known_keys(cfg, "train")
    require_seed("seed", cfg.get("seed"))
    if cfg.get("num_threads") is not None:
        require_number("num_threads", cfg.get("num_threads"), positive=True, integer=True, hint="or null")
    require_choice("float32_matmul_precision", cfg.get("float32_matmul_precision", "high"), MATMUL_PRECISIONS)
    require_bool("test", cfg.get("test", True))
    require_number("num_images", cfg.get("num_images", 8), integer=True, low=0, high=10_000)
    check_monitor(cfg)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is not None and not isinstance(ckpt_path, str):
        raise ConfigError(f"ckpt_path must be a path to a .ckpt file, got {ckpt_path!r}")


def validation_metrics(cfg: Mapping) -> list[str]:
    """What a validation logs: the hard-sample bound, and the m-sample one with val_iwae_samples."""
    m = require_number("val_iwae_samples", cfg.get("val_iwae_samples", 0), integer=True, low=0,
                       hint="0 turns val/nll_iwae off")
    return ["val/neg_elbo"] + (["val/nll_iwae"] if m else [])


def check_monitor(cfg: Mapping) -> None:
    """The best checkpoint's `monitor`, when it names a validation metric, is one that validation
    logs (Lightning would otherwise fail after the first validation, minutes into the run)."""
    checkpoint = (cfg.get("callbacks") or {}).get("checkpoint")
    monitor = checkpoint.get("monitor") if checkpoint else None
    logged = validation_metrics(cfg)
    if isinstance(monitor, str) and monitor not in logged:  # the best checkpoint is chosen at each validation
        hint = "; set val_iwae_samples (e.g. 50) to log it" if monitor == "val/nll_iwae" else ""
        raise ConfigError(f"callbacks.checkpoint.monitor={monitor} is not logged by validation, which logs "
                          f"{', '.join(logged)}{hint}")


def check_validation_interval(trainer: Mapping, batches_per_epoch: int) -> None:
    """A val_check_interval in steps fits in an epoch when validation also follows epochs
    (check_val_every_n_epoch set): Lightning refuses a longer one with a traceback at fit."""
    interval, every_epoch = trainer.get("val_check_interval"), trainer.get("check_val_every_n_epoch", 1)
    if isinstance(interval, int) and every_epoch is not None and interval > batches_per_epoch:
        raise ConfigError(f"trainer.val_check_interval={interval} steps is longer than an epoch ({batches_per_epoch} "
                          f"batches); lower it, or set trainer.check_val_every_n_epoch=null to count steps "
                          f"across epochs")


def estimator_names() -> list[str]:
    """The estimators of the Hydra group conf/estimator/ (the registry)."""
    return sorted(p.stem for p in ESTIMATOR_DIR.glob("*.yaml"))


def check_known_keys(cfg: Mapping, config_name: str, groups: tuple[str, ...] = ()) -> None:
    """Every top-level key of a script's config is one that conf/<config_name>.yaml (or one of its
    `groups`) defines: a misspelt key added with + (`+optimzer.lr=0.1`, `+num_sample=10`) would
    otherwise be accepted and silently ignored."""
    known = known_keys(config_name) | set(groups)
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"{key} is not a setting of conf/{config_name}.yaml{hint}: a key added with + is "
                              f"taken as new, so a misspelt one would be ignored; correct or remove it")


@functools.cache
def known_keys(config_name: str) -> frozenset[str]:
    """The top-level keys of conf/<config_name>.yaml and the config groups its defaults list names."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(OmegaConf.load(CONF / f"{config_name}.yaml"))
    groups = {next(iter(entry)).split(" ")[-1] for entry in tree.get("defaults", []) if isinstance(entry, dict)}
    return frozenset({*tree, *groups} - {"defaults", "hydra", "_self_"})


def require_writable_folder(key: str, folder: Path) -> Path:
    """`folder` (created if absent) takes a new file, or a ConfigError naming `key`: checked before
    minutes of work whose result would then have nowhere to go (a read-only or full filesystem,
    a path under a file, no permission)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise ConfigError(f"{key}: cannot write into {folder} ({err.strerror or err}); give a path in a "
                          f"writable folder") from None
    return folder


def check_trainer(trainer: Mapping) -> None:
    """The `trainer` node's settings that Lightning reads, each with its key named."""
    t = dict(trainer)
    require_choice("trainer.accelerator", t.get("accelerator", "auto"), ACCELERATORS)
    if t.get("accelerator") in ("gpu", "cuda") and not cuda_available():
        raise ConfigError(f"trainer.accelerator={t['accelerator']} but torch sees no CUDA device here; "
                          f"use trainer.accelerator=cpu (or auto)")
    devices = t.get("devices", 1)
    if not (devices == "auto" or devices == -1 or isinstance(devices, (list, str)) and devices):
        require_number("trainer.devices", devices, positive=True, integer=True, hint="a count, -1 (all) or auto")
    require_number("trainer.num_nodes", t.get("num_nodes", 1), positive=True, integer=True)
    precision = str(t.get("precision", "32-true"))
    if precision in UNSUPPORTED_PRECISIONS:
        raise ConfigError(f"trainer.precision={precision} is not supported: the data, the noise and the bounds are "
                          f"float32; use 32-true, bf16-mixed, or 16-mixed on a CUDA GPU")
    require_choice("trainer.precision", precision, PRECISIONS)
    if precision in CUDA_ONLY_PRECISIONS and (t.get("accelerator", "auto") == "cpu" or not cuda_available()):
        raise ConfigError(f"trainer.precision={precision} needs a CUDA GPU (on the CPU Lightning would quietly run "
                          f"another precision); use bf16-mixed or 32-true here")
    for key in ("max_epochs", "max_steps"):
        if t.get(key) is not None:
            require_number(f"trainer.{key}", t[key], integer=True, low=-1, hint="-1 for no limit")
            if t[key] == 0:
                raise ConfigError(f"trainer.{key}=0 trains nothing, and its record would present an untrained "
                                  f"model as a result; give a positive budget (or -1 for no limit)")
    for key in ("min_epochs", "min_steps"):
        if t.get(key) is not None:
            require_number(f"trainer.{key}", t[key], integer=True, low=0, hint="or null")
    max_time = t.get("max_time")
    if max_time is not None and not (isinstance(max_time, str) and MAX_TIME.match(max_time)):
        raise ConfigError(f"trainer.max_time must be DD:HH:MM:SS such as \"00:12:00:00\", or null; got {max_time!r}")
    require_number("trainer.log_every_n_steps", t.get("log_every_n_steps", 50), positive=True, integer=True)
    if t.get("check_val_every_n_epoch") is not None:
        require_number("trainer.check_val_every_n_epoch", t["check_val_every_n_epoch"], positive=True, integer=True,
                       hint="or null to validate by val_check_interval alone")
    interval = t.get("val_check_interval")
    if isinstance(interval, float) and not interval.is_integer():
        require_number("trainer.val_check_interval", interval, positive=True, high=1.0,
                       hint="a fraction of an epoch in (0, 1], a number of steps, or null")
    elif interval is not None:
        require_number("trainer.val_check_interval", interval, positive=True, integer=True,
                       hint="a number of steps, a fraction of an epoch in (0, 1], or null")
    require_number("trainer.num_sanity_val_steps", t.get("num_sanity_val_steps", 2), integer=True, low=-1)
    require_number("trainer.accumulate_grad_batches", t.get("accumulate_grad_batches", 1), positive=True, integer=True)
    if t.get("gradient_clip_val") is not None:
        require_number("trainer.gradient_clip_val", t["gradient_clip_val"], low=0, hint="or null for no clipping")
    require_choice("trainer.gradient_clip_algorithm", t.get("gradient_clip_algorithm"), (None, "norm", "value"))
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        _limit(f"trainer.{key}", t.get(key))
    for key in ("enable_progress_bar", "enable_model_summary", "detect_anomaly"):
        if key in t:
            require_bool(f"trainer.{key}", t[key])
    if t.get("benchmark") is not None:
        require_bool("trainer.benchmark", t["benchmark"], "or null")
    if t.get("deterministic") not in (True, False, "warn", None):
        raise ConfigError(f"trainer.deterministic must be true, false or warn, got {t.get('deterministic')!r}")
    require_choice("trainer.profiler", t.get("profiler"), PROFILERS)

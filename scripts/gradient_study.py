"""Compare gradient estimators on one model and one batch: variance, bias, cosine, SNR, time.

    python scripts/gradient_study.py latent.num_latents=2 latent.num_categories=10   # exact reference
    python scripts/gradient_study.py                      # N=20, K=10: RLOO reference, exact skipped
    python scripts/gradient_study.py ckpt_path=outputs/.../checkpoints/last.ckpt num_estimates=500

For each estimator (default: every conf/estimator/*.yaml) it runs discrete_vae.diagnostics on
the first `batch_size` validation images and writes gradient_study.md (the table),
gradient_study.csv (every statistic) and gradient_study.png (variance and bias, log scale)
into the Hydra run directory (discrete_vae.gradient_study). Config: conf/gradient_study.yaml.
The options are checked before torch and Lightning are imported.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import hydra
from omegaconf import DictConfig

from discrete_vae.checks import check_known_keys, estimator_names, require_bool, require_seed
from discrete_vae.cli import run_script
from discrete_vae.errors import ConfigError, exit_on_user_error, require_budget, require_number


def check_options(cfg: DictConfig) -> None:
    """The options of conf/gradient_study.yaml that this script reads itself, before anything runs
    (the data, latent and model groups check their own)."""
    check_known_keys(cfg, "gradient_study")
    require_seed("seed", cfg.seed)
    if cfg.num_threads is not None:
        require_number("num_threads", cfg.num_threads, positive=True, integer=True, hint="or null")
    if cfg.temperature is not None:
        require_number("temperature", cfg.temperature, positive=True, hint="a tau > 0 for every estimator, or null")
    require_number("batch_size", cfg.batch_size, positive=True, integer=True)
    require_number("num_estimates", cfg.num_estimates, integer=True, low=2, hint="a variance needs two")
    require_number("timing_repeats", cfg.timing_repeats, integer=True, low=0, hint="0 skips the timing")
    if cfg.chunk_size is not None:
        require_number("chunk_size", cfg.chunk_size, positive=True, integer=True, hint="or null")
    require_bool("warm_baseline", cfg.warm_baseline)
    require_number("warm_control_variate", cfg.warm_control_variate, integer=True, low=0, hint="Adam steps, 0 for none")
    require_budget("reference.max_configs", cfg.reference.max_configs)
    available = estimator_names()
    if cfg.estimators is not None and len(cfg.estimators) == 0:
        raise ConfigError(f"estimators=[] names no estimator to study; name some (e.g. estimators=[sf,rloo]) "
                          f"or null for all of {', '.join(available)}")
    for name in cfg.estimator_options or {}:
        if name not in available:
            close = difflib.get_close_matches(str(name), available, n=1)
            raise ConfigError(f"estimator_options.{name}: no estimator is called {name}"
                              f"{f' (did you mean {close[0]}?)' if close else ''}; choose from {', '.join(available)}")
    require_number("reference.num_estimates", cfg.reference.num_estimates, integer=True, low=2)
    require_number("reference.num_samples", cfg.reference.num_samples, integer=True, low=2)
    if cfg.ckpt_path is not None and not Path(str(cfg.ckpt_path)).expanduser().is_file():
        raise ConfigError(f"no checkpoint at {cfg.ckpt_path}; pass ckpt_path=PATH to a .ckpt written by "
                          f"scripts/train.py, or null for a fresh model")


def study(cfg: DictConfig) -> list[dict]:
    """The options checked, then the study (discrete_vae.gradient_study); returns the table's rows."""
    check_options(cfg)
    from discrete_vae.gradient_study import run_study  # torch and Lightning only now: seconds to import

    return run_study(cfg)


@hydra.main(config_path="../conf", config_name="gradient_study", version_base="1.3")
@exit_on_user_error  # a user's mistake gets its message, not a traceback
def main(cfg: DictConfig) -> None:
    study(cfg)


if __name__ == "__main__":
    run_script(main)

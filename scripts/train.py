"""Train a categorical VAE with one gradient estimator.

    python scripts/train.py estimator=st_gumbel
    python scripts/train.py -m estimator=sf,gumbel,st_gumbel,st seed=1,2,3
    python scripts/train.py --help        # the config groups and their options
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from discrete_vae.checks import check_config
from discrete_vae.cli import normalize_overrides, run_script, run_summary_lines
from discrete_vae.errors import exit_on_user_error


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
@exit_on_user_error  # a user's mistake gets its message, not a traceback
def main(cfg: DictConfig) -> float | None:
    check_config(cfg)  # before torch and Lightning are imported (seconds): a mistake is answered at once
    from discrete_vae.training import rank, train

    record = train(cfg)
    if rank() == 0:  # the folder, the bounds for a person, and the TensorBoard command
        print("\n".join(run_summary_lines(record, Path(HydraConfig.get().runtime.output_dir))))
    return record["metrics"].get("val/neg_elbo")  # for Hydra sweepers that optimise


if __name__ == "__main__":
    sys.argv = normalize_overrides(sys.argv, path_keys=("ckpt_path", "data.root"))
    run_script(main)

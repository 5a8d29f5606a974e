"""Train a categorical VAE with one gradient estimator.

    python scripts/train.py estimator=st_gumbel
    python scripts/train.py -m estimator=sf,gumbel,st_gumbel,st seed=1,2,3
    python scripts/train.py --help        # the config groups and their options
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

from discrete_vae.errors import find_user_error
from discrete_vae.training import train


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    try:
        record = train(cfg)
    except Exception as err:  # a user's mistake gets its message, not a traceback
        user_error = find_user_error(err)
        if user_error is None:
            raise
        logging.getLogger("discrete_vae").error(str(user_error))
        sys.exit(f"error: {user_error}")
    return record["metrics"].get("val/neg_elbo")  # for Hydra sweepers that optimise


if __name__ == "__main__":
    main()

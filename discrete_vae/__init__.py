"""discrete_vae: categorical-latent VAEs and the gradient estimators that train them."""

from discrete_vae.cli import register_resolvers
from discrete_vae.errors import ConfigError, DataError, UserError

register_resolvers()  # ${run_name:...} in conf/train.yaml, wherever a sweep job is resolved

__all__ = ["ConfigError", "DataError", "UserError"]
__version__ = "0.1.0"

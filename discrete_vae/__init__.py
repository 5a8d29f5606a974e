"""discrete_vae: categorical-latent VAEs and the gradient estimators that train them."""

from discrete_vae.errors import ConfigError, DataError, UserError

__all__ = ["ConfigError", "DataError", "UserError"]
__version__ = "0.1.0"

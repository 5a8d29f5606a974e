"""Errors a user can cause, each with a message that says what is wrong and how to fix it.

Scripts catch `UserError` and print its message instead of a traceback.
"""

import functools
import logging
import sys
from collections.abc import Callable


class UserError(Exception):
    """Base class: a mistake in the configuration or the environment, not a bug."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid or over a budget."""


class DataError(UserError, RuntimeError):
    """A data file is missing, truncated or corrupt, or cannot be downloaded."""


def find_user_error(exc: BaseException) -> UserError | None:
    """The first UserError in an exception's cause chain (Hydra's instantiate wraps them)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def exit_on_user_error(main: Callable) -> Callable:
    """Decorator for Hydra entry points: a UserError anywhere in the cause chain ends a single
    run with its message (exit status 1) instead of a traceback. In a multirun it is logged
    and raised as itself, so Hydra's sweeper finishes the other jobs and then reports this
    one as failed. Other errors propagate unchanged."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except Exception as err:
            user_error = find_user_error(err)
            if user_error is None:
                raise
            logging.getLogger("discrete_vae").error(str(user_error))
            if _in_multirun():
                raise user_error from None
            sys.exit(f"error: {user_error}")

    return wrapper

"""Errors a user can cause, each with a message that says what is wrong and how to fix it.

Scripts catch `UserError` and print its message instead of a traceback.
"""


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

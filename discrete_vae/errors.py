"""Errors a user can cause, each with a message that says what is wrong and how to fix it.

Scripts catch `UserError` and print its message instead of a traceback.
"""

import errno
import functools
import logging
import math
import numbers
import sys
from collections.abc import Callable
from hydra.errors import CompactHydraException


class UserError(Exception):
    """Base class: a mistake in the configuration or the environment, not a bug."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid or over a budget."""


class DataError(UserError, RuntimeError):
    """A data file is missing, truncated or corrupt, or cannot be downloaded."""


class RunFolderBusy(UserError, RuntimeError):
    """Another process is training the same run folder (training.run_folder_lock)."""


class TrainingDiverged(UserError, RuntimeError):
    """The training loss (or the validation metric) stopped being finite; usually a learning rate or
    a temperature too extreme. Carries the step and the last finite metrics for the run's record."""

    def __init__(self, message: str, step: int, metrics: dict | None = None):
        super().__init__(message)
        self.step, self.metrics = step, metrics or {}


def require_number(
    key: str, value, *, positive: bool = False, integer: bool = False, low=None, high=None, hint: str = ""
):
    """`value` if it is a real number (an integer if `integer`) within the bounds, else a ConfigError
    naming `key`. For config values read by our code, so that `lr=fast` fails where it is read."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
    if not ok_type or not math.isfinite(value):
        raise ConfigError(f"{key} must be {kind}, got {value!r}{hint and '; ' + hint}")
    if positive and not value > 0:
        raise ConfigError(f"{key} must be positive, got {value!r}{hint and '; ' + hint}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"between {low} and {high}" if low is not None and high is not None else (
            f"at least {low}" if low is not None else f"at most {high}")
        raise ConfigError(f"{key} must be {bounds}, got {value!r}{hint and '; ' + hint}")
    return value


# The most configurations any enumeration here takes (estimator=exact, nll_exact, the exact
# gradient reference), whatever a max_configs budget says: 2^20 per image is already a million
# decoder passes a step, hours on a CPU; 10^13 would exhaust memory or never finish.
MAX_CONFIGS = 2**20


def require_budget(key: str, value) -> int:
    """A max_configs budget: a positive integer no larger than MAX_CONFIGS."""
    return require_number(key, value, positive=True, integer=True, high=MAX_CONFIGS,
                          hint="larger enumerations do not fit this machine's time or memory")


def count(n: int) -> str:
    """A count of configurations for a message, however large (K^N overflows a float: 10^400)."""
    return f"{n:.4g}" if n < 10**300 else f"about 10^{len(str(n)) - 1}"


# what the machine, not the code, says when a file cannot be written: a full disk or quota, a
# read-only filesystem, no permission
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)
INTERRUPTED = 130  # 128 + SIGINT, the shell's status for Ctrl-C


class EnvironmentProblem(UserError, OSError):
    """A file could not be written or read because of the machine (a full disk, a read-only
    filesystem, no permission): one line naming the file and the fix, not a traceback."""


def find_user_error(exc: BaseException) -> UserError | None:
    """The first UserError in an exception's cause chain (Hydra's instantiate wraps them), or an
    OSError of the environment (ENVIRONMENT_ERRNOS) as an EnvironmentProblem."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        if isinstance(exc, OSError) and exc.errno in ENVIRONMENT_ERRNOS:
            where = f" {exc.filename}" if exc.filename else ""
            return EnvironmentProblem(
                f"cannot write or read{where}: {exc.strerror or exc}. Free some space, or make the folder "
                f"writable, or point the output elsewhere; then run the same command again (what was "
                f"written before is kept, and a training run resumes from its last.ckpt)")
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


class SweepJobFailed(CompactHydraException):
    """A job of a multirun ended by a user's mistake or the machine: Hydra's launchers run the other
    jobs, then print this (a CompactHydraException: its one line, no traceback) and exit with 1."""


def _job_folder() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir


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
            if _in_multirun():  # in the job's log; Hydra reports the failed job after the others ran
                logging.getLogger("discrete_vae").error(str(user_error))
                raise SweepJobFailed(f"error: the job in {_job_folder()} failed: {user_error}") from None
            sys.exit(f"error: {user_error}")  # printed once, on stderr, exit status 1

    return wrapper

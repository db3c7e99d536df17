"""Errors a user can cause.

Every error raised for bad input (a path, a shape, a value outside a likelihood's support, an
unknown name, an impossible combination of options) is a :class:`PyroVAEError`. The command
line turns it into one line on stderr and a non-zero exit; Python callers can catch it.
"""


class PyroVAEError(ValueError):
    """Bad input or an impossible request, described in one line."""


class DataError(PyroVAEError):
    """The data cannot be used as given (missing, wrong shape, NaN, outside the support)."""


class ConfigError(PyroVAEError):
    """An unknown name or an invalid option value."""


class TrainingError(PyroVAEError):
    """Training cannot go on (for example, the loss became NaN)."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM arrived during training; the state at that step was checkpointed."""

"""Errors the user can fix.

Every error raised for bad input derives from :class:`UserInputError`, so the
CLI and the worker can print its message (which says what is wrong and how to
fix it) instead of a traceback, and still let genuine bugs crash loudly.
"""


class UserInputError(ValueError):
    """Bad input: the message names the problem and the fix."""


class ModelError(UserInputError):
    """The model file cannot be loaded or does not fit the estimator."""


class DataError(UserInputError):
    """The evaluation data is malformed or does not fit the model."""


class SpecError(UserInputError):
    """The requested players, metric or estimator settings make no sense."""
